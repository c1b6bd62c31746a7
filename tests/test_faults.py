"""Faults against the real server: a full disk."""

import errno
import os
import sqlite3
import subprocess

import pytest

from helpers import eventually
from server import Server, event



@pytest.fixture
def tiny_disk(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    mount = tmp_path / "tiny"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("this machine does not let the test mount a tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


def fill(path):
    """Write a file until the disk is full; return its path."""
    with open(path, "wb", buffering=0) as filler:  # unbuffered: a partial last write leaves nothing to flush
        try:
            while True:
                filler.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return path


def test_a_full_disk_answers_507_keeps_reads_and_recovers_without_a_restart(tiny_disk):
    server = Server(tiny_disk / "full.db")
    admin = {"user": "admin", "key": server.admin_key}
    try:
        server.register("FOO")
        acknowledged = []
        for n in range(20):
            assert server.request("PUT", f"/events/FOO-{n}", event(n), **admin)[0] == 200
            acknowledged.append(f"FOO-{n}")
        filler = fill(tiny_disk / "filler")
        statuses, refused = set(), None
        for n in range(20, 60):  # big events, until the database cannot grow
            status, headers, problem = server.request("PUT", f"/events/FOO-{n}", event(n, pad=50_000), **admin)
            statuses.add(status)
            if status == 200:
                acknowledged.append(f"FOO-{n}")
            else:
                refused = f"FOO-{n}"
                assert status == 507, problem
                assert headers["content-type"] == "application/problem+json"
                break
        assert 507 in statuses
        # Reads keep working.
        assert server.request("GET", "/events/FOO-0", **admin)[0] == 200
        assert server.request("GET", "/events?limit=1000", **admin)[0] == 200
        # Space comes back: writes succeed again, no restart.
        filler.unlink()
        assert server.request("PUT", "/events/FOO-after", event(1), **admin)[0] == 200
        acknowledged.append("FOO-after")
    finally:
        server.stop()
    conn = sqlite3.connect(tiny_disk / "full.db")
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    stored = {row[0] for row in conn.execute("SELECT event_id FROM events")}
    conn.close()
    assert set(acknowledged) <= stored
    assert refused not in stored  # nothing half-written


def test_idle_connections_past_the_limit_do_not_stop_the_server_for_good(tmp_path):
    import socket
    import time
    server = Server(tmp_path / "idle.db", "--connection-limit", "4", "--channel-timeout", "2")
    idle = []
    try:
        for _ in range(8):
            sock = socket.create_connection(("127.0.0.1", server.port))
            idle.append(sock)
        started = time.monotonic()
        status, _, body = server.request("GET", "/health", timeout=20)
        assert status == 200 and body["status"] == "ok"
        assert time.monotonic() - started < 15
    finally:
        for sock in idle:
            sock.close()
        server.stop()


def test_a_slow_body_does_not_hold_up_other_clients(tmp_path):
    import socket
    import threading
    import time
    server = Server(tmp_path / "slow.db")
    body = b'{"Name": "' + b"x" * 40 + b'"}'
    finished = threading.Event()

    def trickle():
        with socket.create_connection(("127.0.0.1", server.port)) as sock:
            sock.sendall(b"PUT /programs/SLOW HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body))
            for byte in body:
                sock.sendall(bytes([byte]))
                time.sleep(0.05)
            finished.set()
            sock.recv(1000)

    try:
        slow = threading.Thread(target=trickle)
        slow.start()
        served = 0
        while not finished.is_set():
            started = time.monotonic()
            assert server.request("GET", "/health", timeout=5)[0] == 200
            assert time.monotonic() - started < 1
            served += 1
        slow.join(30)
        assert not slow.is_alive(), 'a thread did not finish in 30 s'
        assert served >= 5
    finally:
        server.stop()


def test_a_write_lock_held_by_another_process_is_503_and_nothing_stays_stuck(tmp_path):
    server = Server(tmp_path / "locked.db")
    admin = {"user": "admin", "key": server.admin_key}
    try:
        server.register("FOO")
        blocker = sqlite3.connect(tmp_path / "locked.db", isolation_level=None)  # this test's own process
        blocker.execute("BEGIN IMMEDIATE")
        status, headers, problem = server.request("PUT", "/events/FOO-1", event(1), **admin)
        # Busy after the 5 s busy timeout, as a rule. On a loaded machine SQLite's busy
        # handler counts the sleeps it planned, not the time they took, and can outlast
        # the 10 s write timeout: that 503 says so, with its own Retry-After.
        retry_after = [retry for words, retry in (("is busy", "1"), ("did not confirm", "5"))
                       if words in problem["detail"]]
        assert (status, problem["status"], [headers["retry-after"]]) == (503, 503, retry_after)
        assert server.request("GET", "/events/FOO-0", **admin)[0] == 404  # readers are not blocked
        status, _, problem = server.request("GET", "/health")  # but the writer cannot write: it says so
        assert (status, "cannot take writes" in problem["detail"]) == (503, True)
        blocker.execute("ROLLBACK")
        blocker.close()
        eventually(lambda: server.request("GET", "/health")[0] == 200, "the writer writes again", timeout=30)
        assert server.request("PUT", "/events/FOO-1", event(1), **admin)[0] == 200
        assert server.request("GET", "/events/FOO-1", **admin)[0] == 200
    finally:
        server.stop()
    conn = sqlite3.connect(tmp_path / "locked.db")
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert conn.execute("SELECT revision FROM events WHERE event_id = 'FOO-1'").fetchone() == (1,)
    conn.close()


def test_a_read_only_database_serves_reads_and_answers_writes_with_503(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root")
    writable, read_only = tmp_path / "rw", tmp_path / "ro"
    writable.mkdir()
    read_only.mkdir()
    first = Server(writable / "ro.db")
    admin = {"user": "admin", "key": first.admin_key}
    first.register("FOO")
    first.request("PUT", "/events/FOO-1", event(1), **admin)
    first.stop()
    keeper = sqlite3.connect(writable / "ro.db")  # keeps the -wal and -shm files in place
    keeper.execute("SELECT 1 FROM events").fetchall()
    mounted = subprocess.run(["mount", "--bind", str(writable), str(read_only)]).returncode == 0 and \
        subprocess.run(["mount", "-o", "remount,ro,bind", str(read_only)]).returncode == 0
    if not mounted:
        subprocess.run(["umount", "-l", str(read_only)])
        pytest.skip("this machine does not let the test make a read-only bind mount")
    try:
        server = Server(read_only / "ro.db")
        try:
            assert server.request("GET", "/events/FOO-1", **admin)[0] == 200
            status, headers, problem = server.request("PUT", "/events/FOO-2", event(2), **admin)
            assert status == 503 and headers["retry-after"] and problem["status"] == 503
            assert headers["content-type"] == "application/problem+json"
        finally:
            server.stop()
    finally:
        subprocess.run(["umount", "-l", str(read_only)])
        keeper.close()
    conn = sqlite3.connect(writable / "ro.db")
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert [row[0] for row in conn.execute("SELECT event_id FROM events")] == ["FOO-1"]


def test_requests_trickling_in_past_the_request_timeout_do_not_keep_the_server_from_answering(tmp_path):
    """More clients than connection slots, each sending a request a byte at a
    time (never idle long enough for the channel timeout): each is closed once
    its request has taken longer than --request-timeout, and others are served
    again. Before, they held every slot as long as they kept trickling."""
    import socket
    import threading
    import time
    server = Server(tmp_path / "trickle.db", "--connection-limit", "4", "--request-timeout", "2",
                    "--channel-timeout", "60")
    stop = threading.Event()
    closed = []

    def trickle():
        with socket.create_connection(("127.0.0.1", server.port), timeout=20) as sock:
            try:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
                while not stop.wait(0.3):
                    sock.sendall(b"X-A: b\r\n")
            except OSError:
                closed.append(True)

    clients = [threading.Thread(target=trickle, daemon=True) for _ in range(8)]
    try:
        for client in clients:
            client.start()
        time.sleep(0.5)
        started = time.monotonic()
        status, _, body = server.request("GET", "/health", timeout=20)
        assert status == 200 and body["status"] == "ok"
        assert time.monotonic() - started < 15
    finally:
        stop.set()
        for client in clients:
            client.join(30)
        server.stop()
    assert not any(client.is_alive() for client in clients)
    assert closed  # the server closed the trickling connections, not the clients
