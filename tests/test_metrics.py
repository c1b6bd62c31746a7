"""GET /metrics (docs/API.md §6): Prometheus text, the whole server's counts
across processes and worker restarts, and labels that never carry a learner's
data. Every answer is read with prometheus_client's own parser."""

import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import webtest
from prometheus_client.parser import text_string_to_metric_families

import eventstore
import eventstore_metrics
from helpers import THREADED_HOST, basic, eventually, line_within, run_in_thread
from server import ROOT, Server, event_body

SERIES = {  # every family /metrics has, and its type
    "eventstore_http_requests": "counter", "eventstore_http_request_duration_seconds": "histogram",
    "eventstore_writes_committed": "counter", "eventstore_group_commit_size": "histogram",
    "eventstore_group_commit_seconds": "histogram", "eventstore_feed_head": "gauge",
    "eventstore_long_polls_waiting": "gauge", "eventstore_subscription_behind": "gauge",
    "eventstore_subscription_pending_seconds": "gauge", "eventstore_webhook_deliveries": "counter",
    "eventstore_auth_failures": "counter",
}


def parse(text):
    """-> ({family name: type}, {(sample name, sorted label items): value})."""
    families, samples = {}, {}
    for family in text_string_to_metric_families(text):
        families[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return families, samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def scrape_app(caller):
    response = caller.get("/metrics")
    assert response.content_type == "text/plain" and "version=0.0.4" in response.headers["Content-Type"]
    return parse(response.text)


# --- who may read them --------------------------------------------------------------------

def test_metrics_need_a_system_user(registry):
    response = registry.anonymous.get("/metrics", status=401)
    assert response.headers["WWW-Authenticate"].startswith("Basic") and response.json["status"] == 401
    registry.anonymous.get("/metrics", headers=basic("admin", "esk_" + "x" * 43), status=401)
    for user in ("reader", "writer", "nobody"):
        assert registry.client(user).get("/metrics", status=403).json["status"] == 403
    families, _ = scrape_app(registry.client("admin"))
    assert families == SERIES


def test_public_metrics_need_no_credentials_and_ignore_them(tmp_path):
    app = eventstore.make_app(tmp_path / "public.db", metrics_public=True)
    try:
        anonymous = webtest.TestApp(app, extra_environ=THREADED_HOST)
        assert parse(anonymous.get("/metrics").text)[0] == SERIES
        wrong = anonymous.get("/metrics?from=prometheus", headers=basic("admin", "esk_" + "x" * 43))
        assert wrong.status_int == 200
        _, samples = parse(anonymous.get("/metrics").text)
        assert value(samples, "eventstore_auth_failures_total") == 0  # the credentials were not even read
    finally:
        app.close()


def test_metrics_switched_off_count_nothing_and_are_a_404(tmp_path):
    app = eventstore.make_app(tmp_path / "off.db", metrics=False)
    try:
        key = eventstore.bootstrap_admin(app.storage.session(), eventstore.now_us())
        admin = webtest.TestApp(app, extra_environ=THREADED_HOST)
        admin.get("/health")
        assert admin.get("/metrics", headers=basic("admin", key), status=404).json["status"] == 404
    finally:
        app.close()
    assert not (tmp_path / "off.db-metrics-v1").exists()


# --- what they count ------------------------------------------------------------------------

def test_every_series_counts_what_it_says(registry, admin, writer, reader):
    before = scrape_app(admin)[1]
    for n in range(3):
        writer.put_json(f"/events/FOO-m{n}", event_body())
    writer.post_json("/events", {"Events": [{"EventId": "FOO-b1", **event_body()}]})
    reader.get("/events/FOO-m1")
    reader.get("/events/FOO-none", status=404)
    registry.anonymous.get("/nowhere/at/all", status=404)
    registry.anonymous.request("/events/FOO-m1", method="POST", status=405)
    registry.anonymous.get("/programs", headers=basic("writer", "esk_" + "y" * 43), status=401)
    registry.anonymous.get("/programs", status=401)  # no credentials: not a failed authentication
    waiting = run_in_thread(lambda: reader.get("/events?ProgramId=FOO&after=now&wait=10").json)
    eventually(lambda: registry.app.long_polls == 1, "a long poll waiting")
    families, samples = scrape_app(admin)
    assert value(samples, "eventstore_long_polls_waiting") == 1
    writer.put_json("/events/FOO-m9", event_body())  # wakes it
    assert [e["EventId"] for e in waiting()["Events"]] == ["FOO-m9"]
    families, samples = scrape_app(admin)
    assert families == SERIES
    counted = lambda name, **labels: value(samples, name, **labels) - value(before, name, **labels)  # noqa: E731
    requests = "eventstore_http_requests_total"
    assert counted(requests, route="/events/{eventId}", method="PUT", status="200") == 4
    assert counted(requests, route="/events", method="POST", status="200") == 1
    assert counted(requests, route="/events/{eventId}", method="GET", status="200") == 1
    assert counted(requests, route="/events/{eventId}", method="GET", status="404") == 1
    assert counted(requests, route="unmatched", method="GET", status="404") == 1
    assert counted(requests, route="/events/{eventId}", method="POST", status="405") == 1
    assert counted(requests, route="/programs", method="GET", status="401") == 2
    assert counted(requests, route="/events", method="GET", status="200") == 1
    assert counted(requests, route="/metrics", method="GET", status="200") == 2  # those before this one
    assert value(samples, "eventstore_auth_failures_total") == 1
    assert value(samples, "eventstore_long_polls_waiting") == 0
    assert counted("eventstore_writes_committed_total") == 5
    head = registry.app.storage.reads().last_sequence()
    assert head >= 5 and value(samples, "eventstore_feed_head") == head
    # Durations: one observation per request, in cumulative buckets; the long poll waited.
    duration = "eventstore_http_request_duration_seconds"
    feed_count = value(samples, f"{duration}_count", route="/events")
    assert feed_count == value(samples, f"{duration}_bucket", route="/events", le="+Inf") == 2  # the POST, the poll
    assert admin.get("/events?ProgramId=BAR&after=now&wait=1").json["Events"] == []  # waits its whole second
    _, samples = scrape_app(admin)
    assert value(samples, f"{duration}_sum", route="/events") >= 1.0
    assert value(samples, f"{duration}_bucket", route="/events", le="0.5") <= 2
    assert value(samples, f"{duration}_bucket", route="/events", le="+Inf") == 3
    assert counted(f"{duration}_count", route="/events/{eventId}") == 7  # 4 PUTs, 2 GETs, the 405
    # Group commits: every write went through one; the key's last use is written there too.
    groups = counted("eventstore_group_commit_size_count")
    assert 1 <= groups <= counted("eventstore_group_commit_size_sum")
    assert counted("eventstore_group_commit_size_sum") >= 5
    assert counted("eventstore_group_commit_seconds_count") == groups
    buckets = [value(samples, "eventstore_group_commit_size_bucket", le=le) for le in
               ("1", "2", "4", "8", "16", "32", "64", "128", "256", "512", "1000", "+Inf")]
    assert buckets == sorted(buckets) and buckets[-1] == value(samples, "eventstore_group_commit_size_count")


def test_a_method_no_route_knows_is_counted_as_other(registry, admin):
    registry.anonymous.request("/health", method="BREW", status=405)
    _, samples = scrape_app(admin)
    assert value(samples, "eventstore_http_requests_total", route="/health", method="other", status="405") == 1
    assert not [key for key in samples if ("method", "BREW") in key[1]]


def test_each_subscription_has_its_lag_read_from_the_database(registry, admin, writer):
    admin.put_json("/subscriptions/all-of-foo", {"Filter": {"ProgramId": ["FOO"]}})
    admin.put_json("/subscriptions/only-bar", {"Filter": {"ProgramId": ["BAR"]}})
    _, samples = scrape_app(admin)
    behind, pending = "eventstore_subscription_behind", "eventstore_subscription_pending_seconds"
    assert value(samples, behind, subscription="all-of-foo") == 0 and (behind, (("subscription", "all-of-foo"),)) in samples
    assert value(samples, pending, subscription="all-of-foo") == 0
    for n in range(3):
        writer.put_json(f"/events/FOO-s{n}", event_body())
    time.sleep(0.05)  # the first of them has waited at least this long at the scrape
    _, samples = scrape_app(admin)
    assert value(samples, behind, subscription="all-of-foo") == 3
    assert 0.05 <= value(samples, pending, subscription="all-of-foo") < 60
    assert (value(samples, behind, subscription="only-bar"), value(samples, pending, subscription="only-bar")) == (0, 0)
    listed = {s["Name"]: s for s in admin.get("/subscriptions").json["Subscriptions"]}
    admin.post_json("/subscriptions/all-of-foo/ack", {"Through": listed["all-of-foo"]["Head"]})
    _, samples = scrape_app(admin)
    assert (value(samples, behind, subscription="all-of-foo"), value(samples, pending, subscription="all-of-foo")) == (0, 0)
    admin.delete("/subscriptions/only-bar")
    _, samples = scrape_app(admin)
    assert not [key for key in samples if ("subscription", "only-bar") in key[1]]


@pytest.mark.sqlite_only
def test_no_label_carries_an_event_id_a_member_or_a_path(registry, admin, writer):
    """After varied events, erasures, event types and unknown paths, every label
    value is a route template, a method, a status, a bucket bound (or later a
    subscription name and an outcome): never anything a request carried."""
    secrets_sent = set()
    for n in range(30):
        suffix, member = uuid.uuid4().hex[:12], f"learner-{uuid.uuid4().hex[:8]}@example.com"
        kind = f"Type{uuid.uuid4().hex[:6]}"
        secrets_sent |= {suffix, member, kind}
        writer.put_json(f"/events/FOO-{suffix}", event_body(ProgramMemberId=member, EventType=kind))
        writer.get(f"/events/FOO-{suffix}")
        writer.get(f"/events/FOO-x{suffix}", status=404)
        registry.anonymous.get(f"/{suffix}/{kind}", status=404)
        if n % 10 == 0:
            admin.delete(f"/programs/FOO/members/{member}")
            admin.get(f"/event-types/{kind}", status="*")
    _, samples = scrape_app(admin)
    templates = {route.template for route in registry.app.router.routes} | {"unmatched"}
    for (name, labels), _ in samples.items():
        for label, text in labels:
            assert not any(secret in text for secret in secrets_sent), (name, label, text)
            allowed = {"route": templates, "method": eventstore_metrics.METHODS | {"other"},
                       "outcome": set(eventstore_metrics.WEBHOOK_OUTCOMES)}.get(label)
            if allowed is not None:
                assert text in allowed, (name, label, text)
            elif label == "status":
                assert text.isdigit() and len(text) == 3
            else:
                assert label in ("le", "subscription"), label


def in_four_threads_switching_often(work):
    """``work(t)`` in four threads t at once, the interpreter switching threads as
    often as it can (a lost addition needs a switch inside it); waits for all."""
    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        waits = [run_in_thread(work, t) for t in range(4)]
        for wait in waits:
            wait()
    finally:
        sys.setswitchinterval(switching)


def test_counting_from_many_threads_loses_nothing(tmp_path):
    metrics = eventstore_metrics.Metrics(str(tmp_path / "threads-metrics"))
    in_four_threads_switching_often(lambda t: [metrics.request("/health", "GET", 200, 0.001) for _ in range(2000)])
    _, samples = parse(metrics.exposition({}).decode())
    assert value(samples, "eventstore_http_requests_total", route="/health", method="GET", status="200") == 8000
    assert value(samples, "eventstore_http_request_duration_seconds_count", route="/health") == 8000
    # New series from many threads at once: each gets a record of its own in the region.
    in_four_threads_switching_often(lambda t: [metrics.webhook_delivery(f"s{t}-{n}", "ok") for n in range(300)])
    _, samples = parse(metrics.exposition({}).decode())
    metrics.close()
    delivered = {dict(labels)["subscription"]: count for (name, labels), count in samples.items()
                 if name == "eventstore_webhook_deliveries_total"}
    assert delivered == {f"s{t}-{n}": 1 for t in range(4) for n in range(300)}


# --- across processes ------------------------------------------------------------------------

RECORDER = """
import sys, time
sys.path.insert(0, {root!r})
import eventstore_metrics
metrics = eventstore_metrics.Metrics({path!r})
for _ in range(5):
    metrics.request("/health", "GET", 200, 0.01)
metrics.long_polls(+1)
print("counted", flush=True)
time.sleep(60)
"""


def test_a_dead_process_keeps_its_counts_but_not_its_gauges_and_its_successor_goes_on(tmp_path):
    path = str(tmp_path / "dead-metrics")
    scraper = eventstore_metrics.Metrics(path)  # holds the table: it does not start afresh
    scraper.request("/health", "GET", 200, 0.01)
    child = subprocess.Popen([sys.executable, "-c", RECORDER.format(root=str(ROOT), path=path)],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert line_within(child.stdout, 30) == "counted\n"
        health = lambda: value(parse(scraper.exposition({}).decode())[1],  # noqa: E731
                               "eventstore_http_requests_total", route="/health", method="GET", status="200")
        waiting = lambda: value(parse(scraper.exposition({}).decode())[1],  # noqa: E731
                                "eventstore_long_polls_waiting")
        assert (health(), waiting()) == (6, 1)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert (health(), waiting()) == (6, 0)  # its long poll ended with it; its requests were answered
        successor = eventstore_metrics.Metrics(path)  # takes the dead one's region, counts and all
        successor.request("/health", "GET", 200, 0.01)
        assert (health(), waiting()) == (7, 0)
        successor.close()
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
    scraper.close()
    fresh = eventstore_metrics.Metrics(path)  # nobody held the table: a new run starts from zero
    assert value(parse(fresh.exposition({}).decode())[1], "eventstore_http_requests_total",
                 route="/health", method="GET", status="200") == 0
    fresh.close()


def test_a_full_region_counts_the_series_it_has_and_says_so(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(eventstore_metrics.SharedTable, "REGION", 4096)
    metrics = eventstore_metrics.Metrics(str(tmp_path / "full-metrics"))
    for n in range(100):
        metrics.webhook_delivery(f"subscription-{n}", "ok")
    metrics.webhook_delivery("subscription-0", "ok")
    _, samples = parse(metrics.exposition({}).decode())
    metrics.close()
    assert value(samples, "eventstore_webhook_deliveries_total", subscription="subscription-0", outcome="ok") == 2
    assert 10 < len([key for key in samples if key[0] == "eventstore_webhook_deliveries_total"]) < 100
    assert "metrics region of this process is full" in caplog.text


def test_the_webhook_hook_takes_only_known_outcomes(tmp_path):
    metrics = eventstore_metrics.Metrics(str(tmp_path / "hook-metrics"))
    try:
        for outcome in eventstore_metrics.WEBHOOK_OUTCOMES:
            metrics.webhook_delivery("nightly", outcome)
        with pytest.raises(ValueError):
            metrics.webhook_delivery("nightly", "exploded")
        _, samples = parse(metrics.exposition({}).decode())
    finally:
        metrics.close()
    assert all(value(samples, "eventstore_webhook_deliveries_total", subscription="nightly", outcome=outcome) == 1
               for outcome in eventstore_metrics.WEBHOOK_OUTCOMES)


def listening(port):
    from test_processes import listening_sockets
    return listening_sockets(port)


def health_count(server):
    status, headers, body = server.request("GET", "/metrics", user="admin", key=server.admin_key)
    assert status == 200, body
    return value(parse(body.decode())[1], "eventstore_http_requests_total", route="/health", method="GET",
                 status="200")


def test_two_workers_count_together_and_a_restarted_worker_takes_nothing_away(tmp_path):
    server = Server(tmp_path / "two.db", processes=2)
    try:
        eventually(lambda: listening(server.port) == 2, "two workers listening", timeout=20)
        start = health_count(server)
        for _ in range(40):  # each a new connection: the kernel spreads them over both workers
            assert server.request("GET", "/health")[0] == 200
        # Whichever worker each scrape lands on, it reports both workers' requests.
        assert {health_count(server) for _ in range(10)} == {start + 40}
        victim = server.workers()[0]
        os.kill(victim, signal.SIGKILL)
        eventually(lambda: len(server.workers()) == 2 and victim not in server.workers(), "a new worker", 20)
        eventually(lambda: listening(server.port) == 2, "two workers listening again", timeout=20)
        seen = []
        for _ in range(10):
            try:
                seen.append(health_count(server))
            except (ConnectionResetError, ConnectionRefusedError):
                pass  # a connection the killed worker's socket held
        assert seen and set(seen) == {start + 40}  # the dead worker's requests still count
        for _ in range(20):
            assert server.request("GET", "/health")[0] == 200
        assert {health_count(server) for _ in range(10)} == {start + 60}
        # Both workers at once: the supervisor holds the table meanwhile, so it does not start afresh.
        victims = server.workers()
        for victim in victims:
            os.kill(victim, signal.SIGKILL)
        eventually(lambda: len(server.workers()) == 2 and not set(victims) & set(server.workers()), "new workers", 20)
        eventually(lambda: listening(server.port) == 2, "two workers listening again", timeout=20)
        seen = []
        for _ in range(10):
            try:
                seen.append(health_count(server))
            except (ConnectionResetError, ConnectionRefusedError):
                pass
        assert seen and set(seen) == {start + 60}
    finally:
        server.stop()
    assert "exited with status -9; starting another" in "".join(server.log)


def test_metrics_public_over_serve_and_the_scrape_of_a_prometheus_job(tmp_path):
    server = Server(tmp_path / "public.db", "--metrics-public")
    try:
        status, headers, body = server.request("GET", "/metrics")
        assert status == 200 and headers["content-type"] == eventstore_metrics.CONTENT_TYPE
        assert parse(body.decode())[0] == SERIES
    finally:
        server.stop()
    closed = Server(tmp_path / "closed.db")
    try:
        assert closed.request("GET", "/metrics")[0] == 401
    finally:
        closed.stop()


def test_the_shared_file_is_never_opened_through_a_link(tmp_path, caplog):
    target = tmp_path / "elsewhere"
    target.write_bytes(b"someone else's file")
    (tmp_path / "linked-metrics").symlink_to(target)
    metrics = eventstore_metrics.Metrics(str(tmp_path / "linked-metrics"))
    try:
        metrics.request("/health", "GET", 200, 0.01)
        assert isinstance(metrics.table, eventstore_metrics.PrivateTable)
    finally:
        metrics.close()
    assert target.read_bytes() == b"someone else's file" and "counted per process" in caplog.text


FULL_DISK = """
import errno, sys
sys.path.insert(0, {root!r})
import eventstore_metrics
taken = eventstore_metrics.Metrics({path!r})
assert isinstance(taken.table, eventstore_metrics.SharedTable)
with open({filler!r}, "wb", buffering=0) as filler:
    try:
        while True:
            filler.write(b"\\0" * 65536)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
for n in range(3000):  # every page of its region written
    taken.webhook_delivery("subscription-%d" % n, "ok")
late = eventstore_metrics.Metrics({path!r})
assert isinstance(late.table, eventstore_metrics.PrivateTable)
late.request("/health", "GET", 200, 0.01)
print("counted", flush=True)
"""


def test_a_full_disk_never_kills_a_process_and_leaves_a_late_one_counting_for_itself(tmp_path):
    """A region's blocks are allocated when it is taken: a page of a sparse file
    first written on a full disk would end the process (SIGBUS). Where they cannot
    be had, the process counts for itself."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("this machine does not let the test mount a tmpfs")
    try:
        child = subprocess.run([sys.executable, "-c", FULL_DISK.format(
            root=str(ROOT), path=str(mount / "db-metrics"), filler=str(mount / "filler"))],
            capture_output=True, text=True, timeout=60)
    finally:
        subprocess.run(["umount", "-l", str(mount)])
    assert (child.returncode, child.stdout) == (0, "counted\n"), child.stderr
    assert "counted per process" in child.stderr


FORKED = """
import os, sys
sys.path.insert(0, {root!r})
import eventstore_metrics
metrics = eventstore_metrics.Metrics({path!r})
metrics.request("/health", "GET", 200, 0.01)
metrics.long_polls(+1)
child = os.fork()
if child == 0:
    metrics.after_fork()
    metrics.request("/health", "GET", 200, 0.01)
    metrics.request("/health", "GET", 200, 0.01)
    print(metrics.table.region, flush=True)
    os._exit(0)
os.waitpid(child, 0)
print(metrics.table.region, metrics.exposition({{}}).decode(), flush=True)
"""


def test_a_forked_child_counts_in_a_region_of_its_own_and_leaves_the_parents_held(tmp_path):
    """As gunicorn --preload forks: the child takes a region of its own; its counts
    stay when it ends, and the parent's region stays held (its long poll counted)."""
    out = subprocess.run([sys.executable, "-c", FORKED.format(root=str(ROOT), path=str(tmp_path / "fork-metrics"))],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    child_region, parent_region, text = out.split(maxsplit=2)
    assert child_region != parent_region
    _, samples = parse(text)
    assert value(samples, "eventstore_http_requests_total", route="/health", method="GET", status="200") == 3
    assert value(samples, "eventstore_long_polls_waiting") == 1
