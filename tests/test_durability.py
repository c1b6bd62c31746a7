"""Durability end to end: long polls under load, two server processes on one file,
and acknowledged writes surviving SIGKILL."""

import os
import random
import re
import signal
import threading
import time


from helpers import require_tool
from server import PutLoad, Server, assert_seen_every_change_once_in_order, missing_from, publish_while_following, event




def test_publishes_stay_prompt_while_more_consumers_wait_than_there_are_threads(tmp_path):
    server = Server(tmp_path / "lp.db", "--threads", "4", "--max-waiting", "2")
    try:
        server.register("FOO")
        admin = {"user": "admin", "key": server.admin_key}
        answers = []

        def consume():
            started = time.monotonic()
            status, _, page = server.request("GET", "/events?ProgramId=FOO&wait=8", **admin)
            answers.append((status, time.monotonic() - started, len(page["Events"])))

        consumers = [threading.Thread(target=consume, daemon=True) for _ in range(10)]
        for consumer in consumers:
            consumer.start()
        wait_for_long_polls(server, 2)  # the two that may wait are waiting
        started = time.monotonic()
        status, _, _ = server.request("PUT", "/events/FOO-1", event(), **admin)
        publish_time = time.monotonic() - started
        for consumer in consumers:
            consumer.join(20)
            assert not consumer.is_alive()
        assert status == 200 and publish_time < 2, publish_time
        # The two that could wait were woken by the publish; the rest answered at once.
        woken = [a for a in answers if a[2] == 1]
        assert all(status == 200 for status, _, _ in answers)
        assert len(answers) == 10 and len(woken) >= 2
        assert all(elapsed < 7 for _, elapsed, _ in answers)
    finally:
        server.stop()


def wait_for_long_polls(server, count, timeout=10):
    """Bounded wait until ``count`` long polls wait in ``server`` (its /health says)."""
    deadline = time.monotonic() + timeout
    while server.request("GET", "/health")[2]["longPolls"] != count:
        assert time.monotonic() < deadline, f"{count} long polls were not waiting within {timeout} s"
        time.sleep(0.02)


def two_servers(tmp_path, name):
    first, second = Server(tmp_path / name), Server(tmp_path / name)
    first.register("FOO")
    return first, second


def test_two_server_processes_on_one_file_keep_sequence_in_commit_order(tmp_path):
    first, second = two_servers(tmp_path, "two.db")
    try:
        acknowledged, seen = publish_while_following([first, second], second, first.admin_key)
        assert_seen_every_change_once_in_order(seen, acknowledged)
    finally:
        first.stop()
        second.stop()


def test_long_poll_on_one_process_wakes_for_a_commit_on_another(tmp_path):
    first, second = two_servers(tmp_path, "lp2.db")
    try:
        result = {}

        def consume():
            started = time.monotonic()
            result["page"] = first.request("GET", "/events?wait=10", user="admin", key=first.admin_key)[2]
            result["elapsed"] = time.monotonic() - started

        consumer = threading.Thread(target=consume, daemon=True)
        consumer.start()
        wait_for_long_polls(first, 1)
        second.request("PUT", "/events/FOO-x", event(), user="admin", key=first.admin_key)
        consumer.join(20)
        assert not consumer.is_alive()
        assert [e["EventId"] for e in result["page"]["Events"]] == ["FOO-x"]
        assert result["elapsed"] < 2.5
    finally:
        first.stop()
        second.stop()


def test_acknowledged_writes_survive_sigkill(tmp_path):
    """Run the real server under concurrent PUT load, SIGKILL it at a random
    moment, restart; every acknowledged event must be there with at least its
    acknowledged revision, and the file must pass integrity_check. Several times."""
    db = tmp_path / "crash.db"
    rng = random.Random(7)
    acknowledged = {}
    key = None
    for round_number in range(4):
        server = Server(db)
        key = key or server.admin_key
        server.register("FOO") if round_number == 0 else None
        load = PutLoad(server, key, f"r{round_number}")
        time.sleep(rng.uniform(0.3, 1.2))  # a random moment under load, not a synchronization
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
        acknowledged.update(load.stop())
        server.stop()
        assert missing_from(db, acknowledged) == {}
    assert len(acknowledged) > 50


def traced_server(tmp_path, name):
    """serve.py under strace, one thread, its fsyncs and socket traffic written to
    tmp_path / "trace" -> (the server, the trace's path)."""
    require_tool("strace")
    trace = tmp_path / "trace"
    server = Server(tmp_path / name, "--threads", "1", prefix=(
        "strace", "-f", "-y", "-qq", "-s", "40", "-o", str(trace),
        "-e", "trace=fsync,fdatasync,recvfrom,read,sendto,write,sendmsg,writev"))
    return server, trace


def answers_after_fsyncs(trace, request):
    """Check that every request whose line holds ``request`` is followed by a WAL
    fsync before the next 200 is sent -> (requests, fsyncs, answers) seen."""
    # strace splits a call that another thread's call interrupts into "<unfinished ...>"
    # and "<... fdatasync resumed>) = 0": a WAL fsync is done when its resumed line comes.
    requests = synced = answered = 0
    state, begun = None, set()  # begun: the threads with a WAL fsync under way
    for line in trace.read_text().splitlines():
        thread = line.split(" ", 1)[0]
        wal_fsync = re.search(r"f(data)?sync\(\d+<[^>]*-wal>", line)
        if wal_fsync and line.endswith("<unfinished ...>"):
            begun.add(thread)
            continue
        resumed = thread in begun and re.search(r"<\.\.\. f(data)?sync resumed>\) += 0", line)
        begun.discard(thread)
        if request in line:
            requests, state = requests + 1, "received"
        elif state == "received" and ((wal_fsync and re.search(r"\) += 0$", line)) or resumed):
            synced, state = synced + 1, "synced"
        elif state is not None and "HTTP/1.1 200" in line:
            assert state == "synced", f"a 200 was sent before the WAL was fsynced:\n{line}"
            answered, state = answered + 1, None
    return requests, synced, answered


def test_a_200_is_sent_only_after_the_write_ahead_log_is_fsynced(tmp_path):
    """What a SIGKILL cannot show (the kernel keeps what the process wrote): the
    COMMIT's fsync of the WAL happens before the answer leaves, for every write.
    Traced with strace: each response to a PUT must follow a WAL fsync that
    follows that PUT's request."""
    server, trace = traced_server(tmp_path, "sync.db")
    admin = {"user": "admin", "key": server.admin_key}
    try:
        server.register("FOO")
        for n in range(5):
            assert server.request("PUT", f"/events/FOO-{n}", event(n), **admin)[0] == 200
    finally:
        server.stop()
    assert answers_after_fsyncs(trace, '"PUT /events/') == (5, 5, 5)


def test_an_acks_200_is_sent_only_after_the_write_ahead_log_is_fsynced(tmp_path):
    """An acknowledged Position is durable as an event is (docs/API.md §4a): each
    ack's 200 follows the fsync of its commit."""
    server, trace = traced_server(tmp_path, "ack.db")
    admin = {"user": "admin", "key": server.admin_key}
    try:
        server.register("FOO")
        for n in range(5):
            assert server.request("PUT", f"/events/FOO-{n}", event(n), **admin)[0] == 200
        assert server.request("PUT", "/subscriptions/lms", {}, **admin)[0] == 201
        for through in range(1, 6):
            assert server.request("POST", "/subscriptions/lms/ack", {"Through": through}, **admin)[0] == 200
    finally:
        server.stop()
    assert answers_after_fsyncs(trace, '"POST /subscriptions/lms/ack') == (5, 5, 5)
