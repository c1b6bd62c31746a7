"""serve.py --processes N: worker processes on one port over one database,
supervised; writers that take turns across processes; long polls and the
throttle that hold for the server as a whole."""

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import eventually
from server import ROOT, PutLoad, Server, assert_seen_every_change_once_in_order, missing_from, publish_while_following, event




def wait_for(predicate, what):
    eventually(predicate, what, timeout=20)


@pytest.fixture
def two(tmp_path):
    server = Server(tmp_path / "two.db", processes=2)
    wait_for(lambda: len(server.workers()) == 2, "two workers")
    server.register("FOO")
    yield server
    server.stop()


def test_two_worker_processes_keep_the_sync_guarantee_for_every_follower(two):
    acknowledged, seens = publish_while_following([two], two, two.admin_key, workers=6, puts=40, ids=10,
                                                  followers=[two])
    for seen in seens:
        assert_seen_every_change_once_in_order(seen, acknowledged)


def test_both_workers_answer(two):
    """Connections are spread over the workers (each its own SO_REUSEPORT socket):
    a long poll held in one worker does not stop the other from answering."""
    pids = set(two.workers())
    assert len(pids) == 2
    answered = []

    def poll():
        answered.append(two.request("GET", "/events?wait=3", user="admin", key=two.admin_key)[0])

    pollers = [threading.Thread(target=poll, daemon=True) for _ in range(6)]
    for poller in pollers:
        poller.start()
    for _ in range(20):
        assert two.request("GET", "/health")[0] == 200
    for poller in pollers:
        poller.join(20)
    assert answered == [200] * 6


def test_long_polls_in_each_worker_wake_on_commits_of_the_other(tmp_path):
    """Two separate servers on one file stand for two workers, so that the test
    knows which process holds the poll and which commits."""
    first, second = Server(tmp_path / "wake.db"), Server(tmp_path / "wake.db")
    try:
        first.register("FOO")
        for poller, publisher, n in ((first, second, 1), (second, first, 2), (first, first, 3)):
            result = {}

            def consume():
                started = time.monotonic()
                result["page"] = poller.request("GET", f"/events?wait=20&after={n - 1}", user="admin",
                                                key=first.admin_key)[2]
                result["elapsed"] = time.monotonic() - started

            consumer = threading.Thread(target=consume, daemon=True)
            consumer.start()
            wait_for(lambda: poller.request("GET", "/health")[2]["longPolls"] == 1, "the poll waits")
            assert publisher.request("PUT", f"/events/FOO-{n}", event(n), user="admin", key=first.admin_key)[0] == 200
            consumer.join(25)
            assert not consumer.is_alive()
            assert [e["EventId"] for e in result["page"]["Events"]] == [f"FOO-{n}"]
            assert result["elapsed"] < 10  # woken, not timed out (speed is make bench's job)
        # The command line's commit wakes a poll too.
        result = {}
        consumer = threading.Thread(target=lambda: result.update(page=first.request(
            "GET", "/events?wait=20&after=3", user="admin", key=first.admin_key)[2]), daemon=True)
        consumer.start()
        wait_for(lambda: first.request("GET", "/health")[2]["longPolls"] == 1, "the poll waits")
        line = tmp_path / "one.jsonl"
        line.write_text(json.dumps({"EventId": "FOO-cli", **event()}) + "\n")
        subprocess.run([sys.executable, str(ROOT / "eventstore.py"), "--db", first.db_path, "import", str(line)],
                       check=True, capture_output=True, timeout=30)
        consumer.join(25)
        assert not consumer.is_alive()
        assert [e["EventId"] for e in result["page"]["Events"]] == ["FOO-cli"]
    finally:
        first.stop()
        second.stop()


def cpus_of(pid):
    return os.sched_getaffinity(pid)


AVAILABLE = sorted(os.sched_getaffinity(0))


def test_each_worker_stays_on_a_cpu_of_its_own(two):
    """Worker i on the i-th available CPU (with one CPU, both on it)."""
    expected = sorted(AVAILABLE[n % len(AVAILABLE)] for n in range(2))

    def placed():
        return sorted(cpu for pid in two.workers() for cpu in cpus_of(pid))

    wait_for(lambda: placed() == expected, f"the workers on CPUs {expected}")


def test_no_cpu_pinning_leaves_processes_where_the_kernel_puts_them(tmp_path):
    one = Server(tmp_path / "one.db", "--no-cpu-pinning")
    try:
        assert cpus_of(one.process.pid) == set(AVAILABLE)
    finally:
        one.stop()
    alone = Server(tmp_path / "alone.db")  # one process, pinned to the first available CPU
    try:
        assert cpus_of(alone.process.pid) == {AVAILABLE[0]}  # pinned before it announced itself
    finally:
        alone.stop()


def test_a_killed_worker_is_restarted_and_nothing_acknowledged_is_lost(two):
    load = PutLoad(two, two.admin_key, "k", workers=6, ids=20, retry=True)
    wait_for(lambda: len(load.acknowledged) >= 30, "publishing under way")
    victim, survivor = two.workers()
    victim_cpus = cpus_of(victim)
    os.kill(victim, signal.SIGKILL)
    # Meanwhile the server keeps answering, and the supervisor starts another
    # worker. A connection queued on the killed worker's socket is reset, and
    # one made in the moment the kernel closes that socket can be refused
    # (SO_REUSEPORT, without net.ipv4.tcp_migrate_req): a client tries again.

    def health(tries=5):
        for _ in range(tries):
            try:
                return two.request("GET", "/health")[0]
            except (ConnectionResetError, ConnectionRefusedError):
                time.sleep(0.05)
        return f"no answer in {tries} tries"
    answered_during = [health() for _ in range(10)]
    wait_for(lambda: len(two.workers()) == 2 and victim not in two.workers(), "a new worker")
    assert survivor in two.workers()
    replacement = next(pid for pid in two.workers() if pid != survivor)
    # The same slot, the same CPU (once the new worker is far enough to have pinned itself).
    wait_for(lambda: cpus_of(replacement) == victim_cpus, "the new worker on the old one's CPU")
    assert answered_during == [200] * 10
    time.sleep(0.5)  # more load on the new pair of workers
    acknowledged = load.stop()
    assert "exited with status -9; starting another" in "".join(two.log)
    assert missing_from(two.db_path, acknowledged) == {}
    assert len(acknowledged) >= 60


def test_sigterm_stops_every_process_cleanly_answering_long_polls(tmp_path):
    server = Server(tmp_path / "term.db", processes=2)
    try:
        wait_for(lambda: len(server.workers()) == 2, "two workers")
        server.register("FOO")
        assert server.request("PUT", "/events/FOO-1", event(), user="admin", key=server.admin_key)[0] == 200
        workers = server.workers()
        answers = []

        def poll():
            started = time.monotonic()
            try:
                status = server.request("GET", "/events?wait=30&after=1", user="admin", key=server.admin_key,
                                        timeout=40)[0]
            except ConnectionRefusedError:
                status = "refused"  # sent after the workers stopped listening: fine
            answers.append((status, time.monotonic() - started))

        pollers = [threading.Thread(target=poll, daemon=True) for _ in range(4)]
        for poller in pollers:
            poller.start()
        wait_for(lambda: server.request("GET", "/health")[2]["longPolls"] >= 1, "long polls waiting")
        time.sleep(0.3)  # the others are most likely waiting too; any that is not is refused, not lost
        started = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        assert server.process.wait(15) == 0
        stopped_in = time.monotonic() - started
        for poller in pollers:
            poller.join(10)
            assert not poller.is_alive()
        answered = [elapsed for status, elapsed in answers if status == 200]
        assert len(answered) >= 1 and {status for status, _ in answers} <= {200, "refused"}, answers
        assert all(elapsed < 15 for elapsed in answered)  # answered early, not after their 30 s
        assert stopped_in < 10
        assert not [pid for pid in workers if os.path.exists(f"/proc/{pid}")]
    finally:
        server.stop()
    conn = sqlite3.connect(tmp_path / "term.db")
    assert conn.execute("SELECT revision FROM events WHERE event_id = 'FOO-1'").fetchone() == (1,)
    conn.close()


def listening_sockets(port):
    """How many sockets listen on ``port`` (each worker has its own, SO_REUSEPORT)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            count += int(local.rsplit(":", 1)[1], 16) == port and state == "0A"  # 0A: LISTEN
    return count


def test_the_failed_authentication_throttle_holds_across_workers(tmp_path):
    server = Server(tmp_path / "throttle.db", "--max-auth-failures", "4", processes=2)
    try:
        # Both workers listening (a worker still starting takes no connection, and
        # one worker alone would count every failure itself: the test could not fail).
        wait_for(lambda: listening_sockets(server.port) == 2, "two workers listening")
        statuses = [server.request("GET", "/programs", user="admin", key="esk_" + "x" * 43)[0] for _ in range(10)]
    finally:
        server.stop()
    # Each request is a new connection, spread over both workers; had each kept its
    # own count, up to 8 guesses would have been answered 401.
    assert statuses[:4] == [401] * 4 and set(statuses[4:]) == {429}, statuses


def test_workers_that_keep_dying_at_start_stop_the_server_with_status_1(tmp_path):
    import eventstore_sqlite
    db = tmp_path / "dying.db"
    eventstore_sqlite.SQLiteStorage(db).close()
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    # A sitecustomize that makes every worker (and only the workers) exit at once.
    (tmp_path / "sitecustomize.py").write_text(
        "import os, sys\nif '--worker' in sys.argv: os._exit(3)\n")
    result = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--db", str(db), "--port", "0",
                             "--processes", "2"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 1
    assert "workers keep dying at start" in result.stderr


def test_workers_stop_when_their_supervisor_is_killed(tmp_path):
    """SIGKILL to the supervisor alone: its workers stop (they served on as
    orphans, on a port a new server could share)."""
    server = Server(tmp_path / "orphans.db", processes=2)
    try:
        wait_for(lambda: len(server.workers()) == 2, "two workers")
        workers = server.workers()
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait(10)

        def gone(pid):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
            with open(f"/proc/{pid}/stat") as stat:  # exited, not yet reaped by init
                return stat.read().split(") ", 1)[1].startswith("Z")

        wait_for(lambda: all(gone(pid) for pid in workers), "the orphaned workers stop")
    finally:
        server.stop()


@pytest.mark.parametrize("first_processes", [1, 2])
def test_a_second_server_is_refused_by_what_is_bound_however_its_host_is_spelled(tmp_path, first_processes):
    """The guard was a lock file named after --host as spelled, in $TMPDIR:
    `--host localhost`, another TMPDIR (systemd's PrivateTmp) or `--host 0.0.0.0`
    started beside a server on 127.0.0.1 and took about half of its connections.
    No file is left in the temporary folder."""
    tmp, other_tmp = tmp_path / "tmp", tmp_path / "other-tmp"
    tmp.mkdir()
    other_tmp.mkdir()
    first = Server(tmp_path / "a.db", processes=first_processes, env={"TMPDIR": str(tmp)})
    try:
        for host in ("127.0.0.1", "localhost", "0.0.0.0"):
            for processes in ("1", "2"):
                command = [sys.executable, "serve.py", "--host", host, "--port", str(first.port), "--db",
                           str(tmp_path / "b.db"), "--create", "--processes", processes]
                try:
                    second = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=ROOT,
                                            env={**os.environ, "TMPDIR": str(other_tmp)})
                except subprocess.TimeoutExpired:
                    pytest.fail(f"a server on {host} with {processes} processes started beside the first")
                assert second.returncode == 1 and "another server is bound to it" in second.stderr, second.stderr
        assert first.request("GET", "/health")[0] == 200
    finally:
        first.stop()
    assert list(tmp.iterdir()) == [] and list(other_tmp.iterdir()) == []


def test_a_second_server_on_the_same_port_is_refused_and_a_restart_binds_at_once(tmp_path):
    """Two multi-process servers on one port would share its connections
    (SO_REUSEPORT lets every process of the user bind it): the second is refused,
    saying why. Stopped after serving a connection, a server starts again on that
    port at once (SO_REUSEADDR: the old connections wait in TIME_WAIT)."""
    from server import free_port
    port = free_port()
    first = Server(tmp_path / "a.db", port=port, processes=2)
    try:
        for _ in range(3):
            assert first.request("GET", "/health")[0] == 200
        second = subprocess.run([sys.executable, "serve.py", "--port", str(port), "--db", str(tmp_path / "b.db"),
                                 "--processes", "2", "--create"], capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert second.returncode == 1 and "another server is bound to it" in second.stderr, second.stderr
        # Connections the server closes first, so that they wait in TIME_WAIT on its side.
        kept = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(4)]
        for conn in kept:
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert conn.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        first.stop()
    for conn in kept:
        conn.close()
    again = Server(tmp_path / "a.db", port=port, processes=2)
    try:
        assert again.request("GET", "/health")[0] == 200
    finally:
        again.stop()
