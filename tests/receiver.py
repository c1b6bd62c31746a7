"""A webhook receiver for the tests: a small HTTP server on 127.0.0.1 (no test
sends anything beyond 127.0.0.0/8) that records every delivery and answers as
the test says, and notes any two deliveries it had in flight at once."""

import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Delivery:
    """One request the receiver got: its headers (lowercase names), body and arrival
    (``arrived_us``: the wall clock's microseconds, as the registry records times)."""

    def __init__(self, headers, body, path):
        self.headers, self.body, self.path = headers, body, path
        self.arrived_us = time.time_ns() // 1000

    @property
    def json(self):
        return json.loads(self.body)

    @property
    def events(self):
        return self.json["data"]["Events"]


class Receiver:
    """``answer(delivery, n)`` (n: how many came before) says how to answer: a
    status, (status, headers), or one of "hang" (never answer), "reset" (close the
    connection at once), "garbage" (not HTTP), "flood" (a 200 whose body never
    ends); ``delay`` seconds pass first. ``refuse()`` stops listening (connections
    are refused), ``listen()`` listens again on the same port."""

    def __init__(self, answer=lambda delivery, n: 200, delay=0.0):
        self.answer, self.delay = answer, delay
        self.deliveries, self.overlaps = [], 0
        self._in_flight = 0
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self.port = None
        self._server = None
        self.listen()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/hook"

    def listen(self):
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                receiver._handle(self)

        ThreadingHTTPServer.allow_reuse_address = True
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port or 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def refuse(self):
        self._server.shutdown()
        self._server.server_close()

    def close(self):
        self._closed.set()
        self.refuse()

    def _handle(self, handler):
        body = handler.rfile.read(int(handler.headers.get("Content-Length", 0)))
        delivery = Delivery({k.lower(): v for k, v in handler.headers.items()}, body, handler.path)
        with self._lock:
            self._in_flight += 1
            if self._in_flight > 1:
                self.overlaps += 1
            n = len(self.deliveries)
            self.deliveries.append(delivery)
        try:
            what = self.answer(delivery, n)
            delivery.status = (what if isinstance(what, int) else what[0] if isinstance(what, tuple)
                               else 200 if what == "flood" else None)
            if self.delay:
                self._closed.wait(self.delay)
            if what == "hang":
                self._closed.wait(120)
                return
        finally:
            with self._lock:
                self._in_flight -= 1  # before the answer goes out: the next delivery may follow it at once
        if what == "reset":
            handler.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            handler.connection.close()
            handler.close_connection = True
            return
        if what == "garbage":
            handler.wfile.write(b"this is not HTTP at all\r\n\r\n")
            handler.close_connection = True
            return
        if what == "flood":
            handler.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\n")
            try:
                handler.wfile.write(b"x" * 131072)  # past the deliverer's bound at once
                while not self._closed.wait(0.01):
                    # Endless, but at 6.4 MB/s: a deliverer that reads it whole must
                    # fail the test's bounded wait, not fill the machine's memory first.
                    handler.wfile.write(b"x" * 65536)
            except OSError:
                pass
            handler.close_connection = True
            return
        status, headers = (what, {}) if isinstance(what, int) else what
        handler.send_response(status)
        for name, value in headers.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", "2")
        handler.end_headers()
        handler.wfile.write(b"ok")

    def sequences(self, ok_only=True):
        """The Sequences of the events delivered (of the deliveries answered 2xx, by default), in order."""
        return [event["Sequence"] for delivery in self.deliveries if not ok_only or delivery in self.accepted()
                for event in delivery.events]

    def accepted(self):
        """The deliveries this receiver answered 2xx (as its ``answer`` said then)."""
        return [d for d in self.deliveries if (getattr(d, "status", None) or 0) // 100 == 2]
