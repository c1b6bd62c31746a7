"""Long polls a host has no thread for: the server answers at once with
Eventstore-Poll-After, and the client waits that long before it asks again,
so an idle follower never spins."""

import socketserver
import sys
import time
import types
import wsgiref.simple_server

import pytest

import eventstore
from helpers import Registry, event_body, eventually, run_in_thread
from eventstore_client import Client

POLL_AFTER = "Eventstore-Poll-After"


def publish(registry, event_id):
    registry.client("admin").put_json(f"/events/{event_id}", event_body(event_id.split("-")[0]))


@pytest.fixture
def registry(tmp_path):
    registry = Registry(tmp_path / "poll-after.db", max_waiting=1)
    yield registry
    registry.close()


# --- the server: when it says so -------------------------------------------------

def feed(registry, query, **environ):
    """GET /events?query as the admin, the host saying ``environ`` of itself."""
    return registry.client("admin").get(f"/events?{query}", extra_environ=environ)


def test_a_long_poll_answered_at_once_for_want_of_a_slot_says_when_to_ask_again(registry):
    one_at_a_time = {"wsgi.multithread": False, "wsgi.multiprocess": True}  # gunicorn's sync workers
    assert feed(registry, "wait=5", **one_at_a_time).headers[POLL_AFTER] == "1"
    held = run_in_thread(lambda: feed(registry, "ProgramId=BAR&wait=20"))
    eventually(lambda: registry.app.long_polls == 1, "the one slot taken")
    full = feed(registry, "ProgramId=FOO&wait=20")  # max_waiting reached: answered at once, saying so
    assert full.json["Events"] == [] and full.headers[POLL_AFTER] == "1"
    publish(registry, "BAR-1")
    answered = held()
    assert [e["EventId"] for e in answered.json["Events"]] == ["BAR-1"] and POLL_AFTER not in answered.headers


@pytest.mark.parametrize("query", ["wait=0", "after=0", "ProgramId=FOO&wait=5"])
def test_an_answer_with_events_or_to_a_plain_read_says_nothing_of_polling(registry, query):
    publish(registry, "FOO-1")
    answer = feed(registry, query, **{"wsgi.multithread": False})
    assert answer.json["Events"] and POLL_AFTER not in answer.headers
    assert POLL_AFTER not in feed(registry, "ProgramId=BAR&wait=0").headers  # empty, but no wait was asked


def test_a_long_poll_that_waited_its_time_says_nothing_of_polling(registry):
    answer = feed(registry, "wait=1")
    assert answer.json["Events"] == [] and POLL_AFTER not in answer.headers


def test_a_stopping_app_answers_waiting_and_new_polls_with_poll_after(registry):
    held = run_in_thread(lambda: feed(registry, "wait=20"))
    eventually(lambda: registry.app.long_polls == 1, "a long poll waiting")
    eventstore.end_long_polls()
    assert held(timeout=10).headers[POLL_AFTER] == "1"
    assert feed(registry, "wait=20").headers[POLL_AFTER] == "1"


@pytest.mark.parametrize("environ, max_waiting, uwsgi_threads, slots", [
    ({"wsgi.multithread": False, "wsgi.multiprocess": True}, None, None, 0),  # gunicorn sync
    ({"wsgi.multithread": False, "wsgi.multiprocess": True}, 8, None, 0),  # told 8: still one at a time
    ({"wsgi.multithread": True, "SERVER_SOFTWARE": "gunicorn/27.0.1"}, None, None, 0),  # gthread: threads unsaid
    ({"wsgi.multithread": True, "SERVER_SOFTWARE": "gunicorn/27.0.1"}, 4, None, 4),
    ({"wsgi.multithread": True, "SERVER_SOFTWARE": "waitress"}, None, None, 0),
    ({"wsgi.multithread": True}, None, 4, 2),  # uWSGI --threads 4
    ({"wsgi.multithread": True}, 8, 4, 2),  # told 8, but uWSGI has 4 threads
    ({"wsgi.multithread": True}, 1, 4, 1),
    ({"wsgi.multithread": False}, None, 1, 0),  # uWSGI without --threads
    ({"wsgi.multithread": True, "SERVER_SOFTWARE": "Werkzeug/3.1.9 Python/3.11.7"}, None, None, 8),
    ({"wsgi.multithread": True, "SERVER_SOFTWARE": "Werkzeug/3.1.9 Python/3.11.7"}, 2, None, 2),
])
def test_the_slots_for_long_polls_come_from_what_the_host_says_of_itself(
        monkeypatch, environ, max_waiting, uwsgi_threads, slots):
    if uwsgi_threads is None:
        monkeypatch.delitem(sys.modules, "uwsgi", raising=False)
    else:
        monkeypatch.setitem(sys.modules, "uwsgi", types.SimpleNamespace(cores=uwsgi_threads))
    assert eventstore.host_long_poll_slots(environ, max_waiting) == slots


def test_the_default_holds_no_poll_where_the_host_does_not_say_its_threads(tmp_path):
    registry = Registry(tmp_path / "default.db", max_waiting=None)
    try:
        answer = feed(registry, "wait=20")  # WebTest: threaded, says no more
        assert answer.headers[POLL_AFTER] == "1" and registry.app.long_polls == 0
    finally:
        registry.close()


# --- the client: it paces itself -------------------------------------------------

class Host:
    """``app`` served on a loopback port by wsgiref, one request at a time or (with
    ``threads``) a thread per request; ``polls`` counts its feed requests."""

    def __init__(self, app, threads=False):
        self.polls = 0

        def counting(environ, start_response):
            if environ["PATH_INFO"].endswith("/events"):  # the feed's, or a subscription's
                self.polls += 1
            if threads:
                environ["wsgi.multithread"] = True
            return app(environ, start_response)

        class Quiet(wsgiref.simple_server.WSGIRequestHandler):
            def log_message(self, *args):
                pass

        server_class = wsgiref.simple_server.WSGIServer
        if threads:
            server_class = type("ThreadingWSGIServer", (socketserver.ThreadingMixIn, server_class),
                                {"daemon_threads": True})
        self.server = wsgiref.simple_server.make_server("127.0.0.1", 0, counting, server_class=server_class,
                                                        handler_class=Quiet)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.serving = run_in_thread(self.server.serve_forever)

    def close(self):
        self.server.shutdown()
        self.serving()
        self.server.server_close()


def following(registry, url, **filters):
    """A Client.follow() in a thread until it sees an event -> (the events seen,
    a function that waits for it to end)."""
    seen = []

    def follow():
        for event in Client(url, "admin", registry.keys["admin"]).follow(**filters):
            seen.append(event["EventId"])
            return

    return seen, run_in_thread(follow)


@pytest.mark.parametrize("following_what", ["feed", "subscription"])
def test_an_idle_follower_of_a_host_that_cannot_wait_polls_about_once_a_second(registry, following_what):
    """wsgiref serves one request at a time, so every long poll is answered at
    once: without the pause the follower sent thousands of requests a second. A
    subscription's reads are long polls as the feed's are: the same pause."""
    host = Host(registry.app)
    try:
        if following_what == "subscription":
            Client(host.url, "admin", registry.keys["admin"]).subscribe("lms", filter={"ProgramId": ["FOO"]})
            seen, done = following(registry, host.url, subscription="lms")
        else:
            seen, done = following(registry, host.url, ProgramId="FOO")
        eventually(lambda: host.polls >= 1, "the follower's first poll")
        first = host.polls
        time.sleep(3)
        assert host.polls - first <= 6, f"{host.polls - first} polls in 3 s"
        publish(registry, "FOO-1")
        done(timeout=10)
        assert seen == ["FOO-1"]
    finally:
        host.close()


def test_a_paced_follower_long_polls_again_once_the_server_holds_its_polls(registry):
    """max_waiting=1, taken by another poll: the follower is paced; once the slot
    is free its next poll is held, and a commit reaches it without a pause."""
    host = Host(registry.app, threads=True)
    try:
        other = run_in_thread(lambda: feed(registry, "ProgramId=BAR&wait=30"))
        eventually(lambda: registry.app.long_polls == 1, "the one slot taken")
        seen, done = following(registry, host.url, ProgramId="FOO")
        eventually(lambda: host.polls >= 1, "the follower's first poll")
        first = host.polls
        time.sleep(2)
        assert host.polls - first <= 4, f"{host.polls - first} polls in 2 s"
        publish(registry, "BAR-1")  # frees the slot
        other()
        eventually(lambda: registry.app.long_polls == 1, "the follower's poll held")
        held = host.polls
        time.sleep(1.5)
        assert host.polls == held, "a held poll is not asked again"
        publish(registry, "FOO-1")
        done(timeout=5)  # (its fetcher may have asked for the next page meanwhile)
        assert seen == ["FOO-1"]
    finally:
        host.close()
