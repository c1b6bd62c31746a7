"""Start serve.py as a real waitress server on a free loopback port, for the
end-to-end tests."""

import base64
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Server:
    """``python serve.py`` on a temporary database; stopped by stop()."""

    def __init__(self, db_path, *args, env=None):
        self.port = free_port()
        self.db_path = str(db_path)
        self.process = subprocess.Popen(
            [sys.executable, "-u", str(ROOT / "serve.py"), "--port", str(self.port), "--db", self.db_path, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
            env={**os.environ, **(env or {})})
        self.banner = ""
        self.admin_key = None
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line and self.process.poll() is not None:
                raise RuntimeError(f"serve.py exited: {self.banner}")
            self.banner += line
            found = re.search(r"^\s+(esk_\S+)$", line)
            if found:
                self.admin_key = found.group(1)
            if line.startswith(("More users:", "New key for admin:")):
                break
        # Keep reading the server's log, so that it never blocks on a full pipe.
        self.log = []
        self.log_reader = threading.Thread(target=self._drain, daemon=True)
        self.log_reader.start()
        self.wait_healthy(deadline)

    def _drain(self):
        for line in self.process.stderr:
            self.log.append(line)

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

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_reader.join(5)
        for stream in (self.process.stdout, self.process.stderr):
            stream.close()


def publish_while_following(publishers, follower, key, workers=6, puts=40, ids=10):
    """Threads PUT events of program FOO through the ``publishers`` servers (round
    robin) while one thread follows ``Next`` on ``follower`` until it has caught up.
    -> (acknowledged {EventId: last acknowledged revision},
        seen [(Sequence, EventId, Revision)] in the order served)."""
    acknowledged, seen = {}, []
    lock, publishing = threading.Lock(), threading.Event()
    publishing.set()

    def publish(worker):
        server = publishers[worker % len(publishers)]
        for n in range(puts):
            event_id = f"FOO-w{worker}-{n % ids}"
            status, headers, _ = server.request("PUT", f"/events/{event_id}", {
                "ProgramId": "FOO", "ProgramMemberId": f"m{n}", "EventType": "T",
                "EventStartUTC": "2026-03-01T09:30:00Z", "EventData": {"n": n}}, user="admin", key=key)
            assert status == 200, status
            with lock:
                acknowledged[event_id] = int(headers["etag"].strip('"'))

    def follow():
        url = "/events?limit=7"
        while True:
            caught_up = not publishing.is_set()
            page = follower.request("GET", url, user="admin", key=key)[2]
            seen.extend((e["Sequence"], e["EventId"], e["Revision"]) for e in page["Events"])
            url = page["Next"]
            if caught_up and not page["HasMore"]:
                return

    following = threading.Thread(target=follow)
    following.start()
    threads = [threading.Thread(target=publish, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    publishing.clear()
    following.join(60)
    return acknowledged, seen


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
