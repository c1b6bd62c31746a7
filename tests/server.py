"""Start serve.py as a real waitress server on a free loopback port, for the
end-to-end tests."""

import base64
import http.client
import json
import os
import queue
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def event_body(program_id="FOO", **fields):
    """The tests' event body: a course completion of program ``program_id``; a
    field given as ``...`` is left out, any other given replaces the default."""
    body = {
        "ProgramId": program_id,
        "ProgramMemberId": "joebob@example.com",
        "EventType": "CourseCompleted",
        "EventStartUTC": "2026-03-01T09:30:00Z",
        "EventEndUTC": "2026-03-01T11:00:00.250000Z",
        "EventData": {"course": "CPR-101", "score": 97},
    }
    body.update(fields)
    return {k: v for k, v in body.items() if v is not ...}


def event(n=0, member="m", program="FOO", pad=0):
    """event_body as the end-to-end tests number their events: EventData {"n": n}
    (padded with ``pad`` bytes where a test needs big events), type T."""
    return event_body(program, ProgramMemberId=member, EventType="T", EventEndUTC=...,
                      EventData={"n": n, "pad": "x" * pad} if pad else {"n": n})


def free_port():
    """A port that was free a moment ago (for a test that must restart a server
    on the same port; otherwise let serve.py pick one with --port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python serve.py`` on a temporary database, on a port it picks itself
    (named in its banner) unless ``port`` is given, in one process unless
    ``processes`` says more; stopped by stop(). ``prefix`` runs it under another
    command (strace); ``program`` runs another serve.py (an installed one), from
    the folder ``cwd``. The database is made if missing (--create)."""

    def __init__(self, db_path, *args, env=None, port=0, prefix=(), startup_seconds=30, processes=1,
                 errors_expected=False, program=(sys.executable, "-u", str(ROOT / "serve.py")), cwd=ROOT):
        # Unless ``errors_expected``, stop() fails the test if the server's log
        # shows a traceback or an answer of 500: a client may never see one.
        self.db_path, self.errors_expected, self._checked = str(db_path), errors_expected, False
        self.process = subprocess.Popen(
            [*prefix, *program, "--port", str(port), "--db", self.db_path,
             "--processes", str(processes), "--create", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd,
            env={**os.environ, **(env or {})}, start_new_session=True)
        # Read the server's log from the start, in a thread, so that it never
        # blocks on a full pipe and no read here can wait without a bound.
        self.log, self._lines = [], queue.Queue()
        self.log_reader = threading.Thread(target=self._drain, daemon=True)
        self.log_reader.start()
        self.banner, self.admin_key, self.port = "", None, None
        deadline = time.monotonic() + startup_seconds
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"serve.py did not start within {startup_seconds} s: {self.banner}") from None
            if line is None:
                self.stop()
                raise RuntimeError(f"serve.py exited: {self.banner}")
            self.banner += line
            found = re.search(r"^\s+(esk_\S+)$", line)
            if found:
                self.admin_key = found.group(1)
            found = re.search(r" on http://[^\s:]+:(\d+)$", line)
            if found:
                self.port = int(found.group(1))
            if line.startswith(("More users:", "New key for admin:")):
                break
        self.wait_healthy(deadline)

    def _drain(self):
        for line in self.process.stderr:
            self.log.append(line)
            self._lines.put(line)
        self._lines.put(None)

    def wait_healthy(self, deadline):
        while time.monotonic() < deadline:
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("the server did not become healthy")

    def request(self, method, path, body=None, user=None, key=None, headers=None, timeout=40):
        """-> (status, headers dict, parsed JSON body or raw bytes)."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        all_headers = dict(headers or {})
        if user:
            token = base64.b64encode(f"{user}:{key}".encode()).decode()
            all_headers["Authorization"] = f"Basic {token}"
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        try:
            connection.request(method, path, body=body, headers=all_headers)
            response = connection.getresponse()
            raw = response.read()
            response_headers = {k.lower(): v for k, v in response.getheaders()}
            if "json" in response_headers.get("content-type", ""):
                raw = json.loads(raw)
            return response.status, response_headers, raw
        finally:
            connection.close()

    def register(self, program_id="FOO"):
        """Register a program as the admin; -> the server, for chaining."""
        status = self.request("PUT", f"/programs/{program_id}", {"Name": program_id.title()}, user="admin",
                              key=self.admin_key)[0]
        assert status == 200, status
        return self

    def workers(self):
        """The pids of the supervisor's worker processes (--processes > 1)."""
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(pid) for pid in path.read_text().split()] if path.exists() else []

    def stop(self):
        """SIGTERM to the server's process group (a wrapper such as strace and
        the server itself), SIGKILL if it has not stopped within 10 s."""
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            if self.process.poll() is not None:
                break
            try:
                os.killpg(self.process.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # whatever of the group is left
        except (ProcessLookupError, PermissionError):
            pass
        self.log_reader.join(10)
        if not self.log_reader.is_alive():  # closing a pipe another thread reads would block
            for stream in (self.process.stdout, self.process.stderr):
                stream.close()
        if not self.errors_expected and not self._checked:
            self._checked = True
            assert not self.errors_logged(), "the server logged:\n" + "".join(self.errors_logged())

    def errors_logged(self):
        """Log lines of tracebacks and of requests answered 500."""
        return [line for line in self.log if "Traceback (most recent call last)" in line
                or re.search(r" \S+ \S+ 500 \d+ [\d.]+ms \S+$", line)
                or '"status": 500,' in line]


class PutLoad:
    """``workers`` threads PUTting events of program FOO through ``server`` until
    stop(); ``acknowledged`` maps each EventId to its highest acknowledged
    revision. A connection error ends a thread (``retry=False``: the server
    died) or is tried again (``retry=True``: one worker of several died)."""

    def __init__(self, server, key, name, workers=8, ids=25, retry=False):
        self.acknowledged, self._lock, self._stop = {}, threading.Lock(), threading.Event()
        self._threads = [threading.Thread(target=self._publish, args=(server, key, f"FOO-{name}-w{w}", ids, retry),
                                          daemon=True) for w in range(workers)]
        for thread in self._threads:
            thread.start()

    def _publish(self, server, key, prefix, ids, retry):
        n = 0
        while not self._stop.is_set():
            event_id = f"{prefix}-{n % ids}"
            body = event(n)
            try:
                status, headers, _ = server.request("PUT", f"/events/{event_id}", body, user="admin", key=key,
                                                    timeout=10)
            except OSError:
                if retry:
                    continue  # not acknowledged
                return
            if status == 200:
                with self._lock:
                    self.acknowledged[event_id] = max(self.acknowledged.get(event_id, 0),
                                                      int(headers["etag"].strip('"')))
            n += 1

    def stop(self):
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
            assert not thread.is_alive(), "a publisher did not stop"
        return self.acknowledged


def missing_from(db_path, acknowledged):
    """Acknowledged revisions the database does not hold; a SQLite file must pass integrity_check."""
    if str(db_path).startswith("postgresql://"):
        import psycopg
        with psycopg.connect(db_path) as conn:
            stored = dict(conn.execute("SELECT event_id, revision FROM events").fetchall())
        return {e: r for e, r in acknowledged.items() if stored.get(e, 0) < r}
    conn = sqlite3.connect(db_path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        stored = dict(conn.execute("SELECT event_id, revision FROM events"))
    finally:
        conn.close()
    return {e: r for e, r in acknowledged.items() if stored.get(e, 0) < r}


def publish_while_following(publishers, follower, key, workers=6, puts=40, ids=10, followers=()):
    """Threads PUT events of program FOO through the ``publishers`` servers (round
    robin) while a thread follows ``Next`` on ``follower`` (and one on each of
    ``followers``) until it has caught up.
    -> (acknowledged {EventId: last acknowledged revision},
        seen [(Sequence, EventId, Revision)] in the order served to the first
        follower; with ``followers``, a list of those, one per follower)."""
    acknowledged = {}
    lock, publishing = threading.Lock(), threading.Event()
    publishing.set()

    def publish(worker):
        server = publishers[worker % len(publishers)]
        for n in range(puts):
            event_id = f"FOO-w{worker}-{n % ids}"
            status, headers, _ = server.request("PUT", f"/events/{event_id}", event(n, member=f"m{n}"),
                                                user="admin", key=key)
            assert status == 200, status
            with lock:
                acknowledged[event_id] = int(headers["etag"].strip('"'))

    def follow(server, seen):
        url = "/events?limit=7"
        while True:
            caught_up = not publishing.is_set()
            page = server.request("GET", url, user="admin", key=key)[2]
            seen.extend((e["Sequence"], e["EventId"], e["Revision"]) for e in page["Events"])
            url = page["Next"]
            if caught_up and not page["HasMore"]:
                return

    seens = [[] for _ in (follower, *followers)]
    followings = [threading.Thread(target=follow, args=(server, seen), daemon=True)
                  for server, seen in zip((follower, *followers), seens)]
    for following in followings:
        following.start()
    threads = [threading.Thread(target=publish, args=(w,), daemon=True) for w in range(workers)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
        assert not thread.is_alive(), "a publisher did not finish in time"
    publishing.clear()
    for following in followings:
        following.join(60)
        assert not following.is_alive(), "a follower did not catch up in time"
    # An exception in a thread fails the test (pytest.ini); and the run did its work:
    assert len(acknowledged) == workers * ids, f"{len(acknowledged)} of {workers * ids} events acknowledged"
    assert all(len(seen) >= len(acknowledged) for seen in seens)
    return acknowledged, (seens if followers else seens[0])


def assert_seen_every_change_once_in_order(seen, acknowledged):
    """The sync guarantee: Sequences strictly increase, each served revision of an
    event is new to the follower, and the last one of each is the last acknowledged."""
    sequences = [sequence for sequence, _, _ in seen]
    assert sequences == sorted(set(sequences))
    last_seen = {}
    for _, event_id, revision in seen:
        assert revision > last_seen.get(event_id, 0)
        last_seen[event_id] = revision
    assert last_seen == acknowledged
