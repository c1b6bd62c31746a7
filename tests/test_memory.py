"""Memory stays flat over many failing requests: no error response keeps
anything alive (a shared exception re-raised grows its traceback chain with
every raise, holding each request's frames and environ)."""

import gc
import tracemalloc

import pytest

from helpers import basic


def grown_bytes(send, warm_up=300, count=3000):
    """Bytes still allocated after ``count`` more calls of ``send``, once warm."""
    for _ in range(warm_up):
        send()
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(count):
            send()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("kind", ["401 no credentials", "401 not basic", "403", "404 route", "404 event",
                                  "400 query"])
def test_failing_requests_do_not_grow_memory(registry, kind):
    app = registry.anonymous
    nobody = basic("nobody", registry.keys["nobody"])
    writer = basic("writer", registry.keys["writer"])
    send = {
        "401 no credentials": lambda: app.get("/events", status=401),
        "401 not basic": lambda: app.get("/events", headers={"Authorization": "Bearer x"}, status=401),
        "403": lambda: app.get("/events/FOO-1", headers=nobody, status=403),
        "404 route": lambda: app.get("/nowhere", status=404),
        "404 event": lambda: app.get("/events/FOO-missing", headers=writer, status=404),
        "400 query": lambda: app.get("/events?limit=0", headers=writer, status=400),
    }[kind]
    grown = grown_bytes(send)
    # About 6.5 KB a request leaked before (20 MB here); allow a little noise.
    assert grown < 256 * 1024, f"{grown:,} bytes kept after 3,000 requests"
