"""Serve eventstore with waitress: ``python serve.py [--host] [--port] [--db] [--threads]``.

Reads flags and ``EVENTSTORE_DB``, creates the SYSTEM user ``admin`` on a
database that has none (printing its key once to standard error), and serves
``eventstore.make_app`` until interrupted.
"""

import argparse
import datetime
import logging
import os
import re
import sqlite3
import sys
import time
import urllib.parse

import waitress
import waitress.channel
import waitress.server
import waitress.task

import eventstore


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Serve the eventstore registry with waitress.")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080,
                        help="port to listen on; 0 picks a free one, which the banner names (default: %(default)s)")
    parser.add_argument("--db", default=os.environ.get("EVENTSTORE_DB", eventstore.DEFAULT_DB),
                        help="database file (default: $EVENTSTORE_DB or %(default)s)")
    parser.add_argument("--threads", type=int, default=16,
                        help="waitress worker threads (default: %(default)s)")
    parser.add_argument("--max-waiting", type=int, default=None, metavar="N",
                        help="long polls (wait=N) allowed to wait at once; more answer at once "
                             "(default: half the threads)")
    parser.add_argument("--connection-limit", type=int, default=200, metavar="N",
                        help="open connections accepted at once (default: %(default)s)")
    parser.add_argument("--channel-timeout", type=int, default=60, metavar="SECONDS",
                        help="close a connection idle this long, between requests (default: %(default)s)")
    parser.add_argument("--max-auth-failures", type=int, default=10, metavar="N",
                        help="failed authentications per address or user id in 60 s before 429s "
                             "(default: %(default)s; 0 switches throttling off, for fuzzing)")
    parser.add_argument("--max-body", type=int, default=eventstore.DEFAULT_MAX_BODY, metavar="BYTES",
                        help="largest request body accepted (default: %(default)s)")
    parser.add_argument("--no-access-log", dest="access_log", action="store_false",
                        help="do not write a line per request to standard error")
    return parser.parse_args(argv)


def announce(db_path, host, port):
    """Create the first admin on an empty database and tell the operator how to
    authenticate. The key is printed once, to standard error."""
    conn = eventstore.open_database(db_path)
    try:
        admin_key = eventstore.bootstrap_admin(conn, eventstore.now_us())
    finally:
        conn.close()
    base = f"http://{host}:{port}"
    say = lambda text="": print(text, file=sys.stderr)  # noqa: E731
    say(f"eventstore serving {os.path.abspath(db_path)} on {base}")
    if admin_key:
        say()
        say("Created the SYSTEM user 'admin'. Its API key is shown only this once:")
        say()
        say(f"    {admin_key}")
        say()
        say(f"Try:  curl -u 'admin:{admin_key}' {base}/programs")
        say(f"More users: python eventstore.py --db {db_path} user add USER_ID --write PROGRAM_ID")
    else:
        say("Authenticate with HTTP Basic: your user id and API key (curl -u USER_ID:API_KEY ...).")
        say(f"New key for admin: python eventstore.py --db {db_path} key add admin")
    sys.stderr.flush()


def main(argv=None):
    args = parse_args(argv)
    try:
        max_waiting = args.max_waiting if args.max_waiting is not None else args.threads // 2
        app = eventstore.make_app(args.db, max_body_bytes=args.max_body, max_waiting=max_waiting,
                                  throttle=eventstore.shared_throttle(args.db, threshold=args.max_auth_failures))
    except (sqlite3.Error, RuntimeError, OSError) as exc:
        print(f"error: cannot open {args.db} as an eventstore database: {exc}", file=sys.stderr)
        return 1
    if args.access_log:
        app = AccessLog(app)
    try:
        server = create_waitress(app, args)
    except OSError as exc:
        print(f"error: cannot listen on {args.host}:{args.port}: {exc.strerror}", file=sys.stderr)
        return 1
    try:
        announce(args.db, args.host, server.effective_port)
    except (sqlite3.Error, RuntimeError, OSError) as exc:
        print(f"error: cannot open {args.db} as an eventstore database: {exc}", file=sys.stderr)
        return 1
    server.run()
    return 0


class AccessLog:
    """WSGI middleware: one line per request on standard error, written when the
    response has been sent: time (UTC), client address, authenticated user id
    (or -), method, path with query, status, response bytes, duration in ms.
    Never a header's value: the Authorization header and keys stay out of it."""

    def __init__(self, app, stream=None, clock=time.monotonic):
        self.app, self.stream, self.clock = app, stream or sys.stderr, clock

    def __call__(self, environ, start_response):
        started, answer = self.clock(), {}

        def recording_start_response(status, headers, exc_info=None):
            answer["status"] = status.split(" ", 1)[0]
            answer["length"] = next((v for k, v in headers if k.lower() == "content-length"), None)
            return start_response(status, headers, exc_info)

        body = self.app(environ, recording_start_response)
        return _LoggedBody(body, lambda sent: self.write(environ, answer, sent, started))

    def write(self, environ, answer, sent, started):
        target = urllib.parse.quote(environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", ""),
                                    safe="/:@!$&'()*+,;=-._~%", encoding="latin-1")
        if environ.get("QUERY_STRING"):
            target += "?" + urllib.parse.quote(environ["QUERY_STRING"], safe="/:@!$&'()*+,;=-._~%?",
                                               encoding="latin-1")
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        method = re.sub(r"[^A-Za-z]", "?", environ.get("REQUEST_METHOD", "-"))[:20]
        self.stream.write(
            f"{now.replace('+00:00', 'Z')} {environ.get('REMOTE_ADDR', '-')} "
            f"{environ.get('eventstore.user_id', '-')} {method} {target} {answer.get('status', '-')} "
            f"{answer.get('length') or sent} {(self.clock() - started) * 1000:.1f}ms\n")
        self.stream.flush()


class _LoggedBody:
    """The app's body iterable; calls ``on_close(bytes sent)`` once the server closes it."""

    def __init__(self, body, on_close):
        self.body, self.on_close, self.sent = body, on_close, 0

    def __iter__(self):
        for chunk in self.body:
            self.sent += len(chunk)
            yield chunk

    def close(self):
        try:
            if hasattr(self.body, "close"):
                self.body.close()
        finally:
            self.on_close(self.sent)


class OneWriteTask(waitress.task.WSGITask):
    """waitress writes a response's status line and headers, then its body, as
    two socket sends: two TCP segments and two wake-ups of the client for even
    the smallest JSON answer, which halved GET throughput on loopback. When the
    app hands over the whole body in one piece with its Content-Length (every
    eventstore response does), send the head and the body together."""

    def write(self, data):
        if self.wrote_header or not data or not self.complete:
            return super().write(data)
        head = self.build_response_header()
        self.wrote_header = True
        if self.has_body and not self.chunked_response and self.content_length == len(data):
            self.content_bytes_written += len(data)
            self.channel.write_soon(head + data)
            return None
        self.channel.write_soon(head)
        return super().write(data)


class OneWriteChannel(waitress.channel.HTTPChannel):
    task_class = OneWriteTask


def run_waitress(app, args):
    """Serve ``app`` with the settings the flags give (the benchmark's baseline
    app is served through here too, so both run under the same settings)."""
    create_waitress(app, args).run()


def create_waitress(app, args):
    """A waitress server for ``app``, listening (so the port is known), not yet serving."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # waitress warns of queued requests on every request past the thread count;
    # under load and with long polls that is the normal state, not news.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)

    # waitress reads a whole body before the app sees the request; up to 8x the
    # app's limit it lets the app answer 413 as problem+json, beyond that it
    # answers its own plain 413 and closes the connection without buffering more.
    listeners = {}
    server = waitress.create_server(
        app, map=listeners, host=args.host, port=args.port, threads=args.threads,
        connection_limit=args.connection_limit, channel_timeout=args.channel_timeout,
        cleanup_interval=max(1, min(30, args.channel_timeout // 2)),
        max_request_header_size=64 * 1024, max_request_body_size=8 * args.max_body,
        ident="eventstore")
    for listener in listeners.values():  # one per listening socket
        if isinstance(listener, waitress.server.BaseWSGIServer):
            listener.channel_class = OneWriteChannel
    return server


if __name__ == "__main__":
    sys.exit(main())
