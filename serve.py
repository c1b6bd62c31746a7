"""Serve eventstore with waitress: ``python serve.py [--host] [--port] [--db] [--processes] ...``.

Reads flags and, for each, ``EVENTSTORE_<OPTION>`` (the flag wins), creates the SYSTEM user ``admin`` on a
database that has none (printing its key once to standard error), and serves
``eventstore.make_app`` until SIGTERM or SIGINT: in one process, or in N worker
processes on one port (each its own SO_REUSEPORT socket, so the kernel spreads
connections over them) supervised by the first, which restarts any that dies.

Sections: the command line; one process (waitress and its connections); several
processes; the access log.
"""

import argparse
import collections
import errno
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

try:
    import waitress
    import waitress.channel
    import waitress.server
    import waitress.task
    import waitress.utilities
    import waitress.wasyncore
except ImportError:
    sys.exit(f"serve.py needs waitress, which this Python ({sys.executable}) does not have. `make run` "
             "installs it in .venv and serves; or run .venv/bin/python serve.py, or first: "
             "pip install -r requirements.txt")
# What of waitress (3.0) this module leans on beyond create_server, to check on an upgrade:
# - the server (waitress.server.BaseWSGIServer): _map (its socket map), task_dispatcher
#   (.queue, .shutdown(cancel_pending, timeout)), pull_trigger(), effective_port, add_task(),
#   and per listener accepting, socket, del_channel(), channel_class (replaced by ours);
# - waitress.wasyncore.loop(timeout, map, use_poll, count), run here instead of server.run();
# - the connection (waitress.channel.HTTPChannel), subclassed by Channel: __init__(server,
#   sock, addr, adj, map), received(), readable() (asked once per turn of the loop),
#   del_channel(), handle_close(), request (the one being received), requests and
#   requests_lock, will_close, total_outbufs_len, task_class;
# - the response (waitress.task.WSGITask), subclassed by OneWriteTask: write(), complete,
#   wrote_header, has_body, chunked_response, content_length, content_bytes_written,
#   build_response_header(), channel.write_soon(); and ErrorTask, which answers a request
#   whose .error (a waitress.utilities.Error: code, reason, to_response()) is set;
# - Adjustments: channel_request_lookahead (waitress.client_disconnected), cleanup_interval;
#   the logger "waitress.queue".

import eventstore
import eventstore_metrics
import eventstore_webhooks
from eventstore_storage import POSTGRES_SCHEMES, StorageOpenError, safe_db_name, safe_text


# ============================================================================
# The command line
# ============================================================================

def build_parser():
    """The command line's options (without what the environment adds: parse_args)."""
    parser = argparse.ArgumentParser(
        description="Serve the eventstore registry with waitress.",
        epilog=f"Every option can also be given as an environment variable, {ENV_PREFIX}<OPTION> "
               f"({ENV_PREFIX}PORT=9000, {ENV_PREFIX}NO_ACCESS_LOG=1); a flag given wins over its variable.")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on, or a name: every address it resolves to (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080,
                        help="port to listen on; 0 picks a free one, which the banner names (default: %(default)s)")
    parser.add_argument("--db", default=eventstore.DEFAULT_DB,
                        help="a SQLite database file, or a postgresql://user@host:port/dbname URL "
                             "(default: %(default)s)")
    parser.add_argument("--create", action="store_true",
                        help="make a new SQLite database if there is none at --db (otherwise a missing file is "
                             "an error: a mistyped name would make an empty registry)")
    parser.add_argument("--threads", type=at_least(1, int), default=16,
                        help="waitress worker threads (default: %(default)s)")
    parser.add_argument("--max-waiting", type=at_least(0, int), default=None, metavar="N",
                        help="long polls (wait=N) allowed to wait at once; more answer at once "
                             "(default: half the threads)")
    parser.add_argument("--connection-limit", type=at_least(1, int), default=200, metavar="N",
                        help="open connections accepted at once, per process (default: %(default)s)")
    parser.add_argument("--max-connections-per-address", type=at_least(1, int), default=50, metavar="N",
                        help="open connections one client address may hold, per process; more are answered "
                             "503 and closed. Behind a reverse proxy every client has the proxy's address: "
                             "raise it to --connection-limit there (default: %(default)s)")
    parser.add_argument("--first-byte-timeout", type=at_least(1, float), default=5, metavar="SECONDS",
                        help="close a new connection that has sent nothing this long (default: %(default)s)")
    parser.add_argument("--channel-timeout", type=at_least(1, int), default=60, metavar="SECONDS",
                        help="close a connection idle this long, between requests (default: %(default)s)")
    parser.add_argument("--request-timeout", type=at_least(1, float), default=30, metavar="SECONDS",
                        help="answer 408 and close when a request (headers and body) has not all arrived this "
                             "long after its first byte, or after the answers before it on the connection went "
                             "out (those are sent first); at least 1 (default: %(default)s)")
    parser.add_argument("--max-auth-failures", type=at_least(0, int), default=10, metavar="N",
                        help="failed authentications per address or user id in 60 s before 429s "
                             "(default: %(default)s; 0 switches throttling off, for fuzzing)")
    parser.add_argument("--max-body", type=at_least(1, int), default=eventstore.DEFAULT_MAX_BODY, metavar="BYTES",
                        help="largest request body accepted (default: %(default)s)")
    parser.add_argument("--metrics-public", action="store_true",
                        help="serve GET /metrics without credentials, for a scraper on a private network "
                             "(otherwise it needs a SYSTEM user's)")
    parser.add_argument("--no-metrics", dest="metrics", action="store_false",
                        help="count nothing for GET /metrics (it answers 404)")
    parser.add_argument("--no-access-log", dest="access_log", action="store_false",
                        help="do not write a line per request to standard error")
    parser.add_argument("--retention-interval", type=at_least(1, int), default=3600, metavar="SECONDS",
                        help="seconds between looks for events past their type's RetainDays (default: %(default)s)")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="text lines, or one JSON object per line (the access log and every other message; "
                             "default: %(default)s)")
    parser.add_argument("--webhook-allow-host", dest="webhook_allow_hosts", action="append", default=[],
                        metavar="HOST", help="a host any user may point a webhook at (others: SYSTEM users only), "
                                             "also over http://; compared as written, no DNS (repeatable)")
    parser.add_argument("--webhook-max-backoff", type=at_least(1, int), default=eventstore_webhooks.MAX_BACKOFF,
                        metavar="SECONDS",
                        help="the longest wait between a failing webhook's attempts (default: %(default)s)")
    parser.add_argument("--webhook-pause-after", type=at_least(1, int), default=eventstore_webhooks.PAUSE_AFTER,
                        metavar="SECONDS",
                        help="pause a webhook that has had no 2xx answer this long (default: %(default)s, 3 days)")
    parser.add_argument("--no-webhook-delivery", dest="webhook_delivery", action="store_false",
                        help="deliver no webhooks from this server (python eventstore.py deliver does, apart)")
    parser.add_argument("--processes", type=at_least(1, int), default=None, metavar="N",
                        help="worker processes on the one port (default: one per available CPU, "
                             f"here {default_processes()})")
    parser.add_argument("--no-cpu-pinning", dest="cpu_pinning", action="store_false",
                        help="let the kernel move each serving process between CPUs (default: each process "
                             "stays on one CPU, worker i on the i-th available one)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # started by the supervisor
    parser.add_argument("--worker-slot", type=int, default=0, help=argparse.SUPPRESS)  # which worker it is
    parser.add_argument("--lifeline-fd", type=int, default=None, help=argparse.SUPPRESS)  # see stop_with_supervisor
    return parser


def parse_args(argv=None, environ=None):
    """The options: each from its flag, else from its environment variable, else its default."""
    parser = build_parser()
    from_environment(parser, os.environ if environ is None else environ)
    return parser.parse_args(argv)


# Every option also from the environment, as operators of containers and
# process managers expect: --max-body from EVENTSTORE_MAX_BODY, --no-access-log
# from EVENTSTORE_NO_ACCESS_LOG=1. Generic over the parser's options, so that a
# flag added later gets its variable without a line here.
ENV_PREFIX = "EVENTSTORE_"
ENV_TRUE, ENV_FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off", "")


def env_name(action):
    """The environment variable of an option (None for --help and hidden ones)."""
    long_names = [name for name in action.option_strings if name.startswith("--")]
    if not long_names or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
        return None
    return ENV_PREFIX + long_names[0][2:].upper().replace("-", "_")


def from_environment(parser, environ):
    """Name each option's variable in its --help, and make a variable that is set
    the option's default, converted and checked as the flag would be (a bad value
    is a usage error naming the variable). A flag on the command line wins: for a
    repeatable option its values replace the variable's."""
    for action in parser._actions:
        name = env_name(action)
        if name is None:
            continue
        action.help = f"{action.help} [env {name}]"
        text = environ.get(name)
        if text is None:
            continue
        action.default = environment_value(parser, action, name, text)
        if isinstance(action, (argparse._AppendAction, argparse._ExtendAction)):
            action.__class__ = type(type(action).__name__, (FlagReplacesEnvironment, type(action)), {})


def environment_value(parser, action, name, text):
    if action.nargs == 0:  # a switch: --create, --no-access-log
        word = text.strip().lower()
        if word in ENV_TRUE:
            return action.const
        if word in ENV_FALSE:
            return action.default
        parser.error(f"{name}={text!r}: expected 1, true, yes or on (or 0, false, no, off)")
    repeatable = isinstance(action, (argparse._AppendAction, argparse._ExtendAction))
    values = []
    for part in ([part.strip() for part in text.split(",") if part.strip()] if repeatable else [text]):
        try:
            value = action.type(part) if action.type else part
        except argparse.ArgumentTypeError as exc:
            parser.error(f"{name}={text!r}: {exc}")
        except (TypeError, ValueError):  # as argparse says it of a flag's value
            parser.error(f"{name}={text!r}: invalid {getattr(action.type, '__name__', 'value')} value")
        if action.choices is not None and value not in action.choices:
            parser.error(f"{name}={text!r}: expected one of {', '.join(map(str, action.choices))}")
        values.append(value)
    return values if repeatable else values[0]


class FlagReplacesEnvironment(argparse.Action):
    """A repeatable option whose variable is set: the first flag given drops the
    variable's values (argparse would add to them)."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest, None) is self.default:
            setattr(namespace, self.dest, None)
        super().__call__(parser, namespace, values, option_string)


def at_least(lowest, kind):
    """An argparse type: a number of ``kind`` no smaller than ``lowest``."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value >= lowest:  # also refuses nan
            raise argparse.ArgumentTypeError(f"must be at least {lowest}, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its errors
    return parse


def default_processes():
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def main(argv=None):
    args = parse_args(argv)
    configure_logging(args.log_format)
    # waitress warns of queued requests on every request past the thread count;
    # under load and with long polls that is the normal state, not news.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    if not args.worker and not missing_database_allowed(args):
        return 1
    processes = args.processes or default_processes()
    if args.worker or processes == 1:
        return serve_one(args, announce_it=not args.worker)
    if not hasattr(socket, "SO_REUSEPORT"):
        print("note: this platform has no SO_REUSEPORT; serving in one process", file=sys.stderr)
        return serve_one(args, announce_it=True)
    return supervise(args, sys.argv[1:] if argv is None else list(argv), processes, prepare=prepare_database)


def missing_database_allowed(args):
    """A SQLite file that does not exist is made only with --create, as the
    command line does: a mistyped --db quietly made a new registry with a new
    admin key."""
    if str(args.db).startswith(POSTGRES_SCHEMES) or os.path.exists(args.db) or args.create:
        return True
    print(f"error: there is no database at {args.db} (--create makes one there)", file=sys.stderr)
    return False


def cannot_open(db, exc):
    """The one line for a database that cannot be opened -> exit status 1."""
    print(f"error: cannot open {safe_db_name(db)} as an eventstore database: "
          f"{safe_text(exc, db)}", file=sys.stderr)
    return 1


def cannot_listen(host, port, exc):
    """The one line for an address that cannot be listened on -> exit status 1."""
    why = exc.strerror or str(exc)
    if exc.errno == errno.EADDRINUSE:
        why = f"another server is bound to it, or to the any-address on that port ({why})"
    print(f"error: cannot listen on {host}:{port}: {why}", file=sys.stderr)
    return 1


def create_first_admin(storage):
    """On a database with no users, create the SYSTEM user ``admin`` -> its
    key (None where there are users)."""
    try:
        session = storage.session()
        try:
            return eventstore.bootstrap_admin(session, eventstore.now_us())
        finally:
            session.close()
    except storage.errors as exc:  # a database that opens but takes no write (read-only, say)
        raise StorageOpenError(str(exc)) from None


def announce(storage, host, port, admin_key, processes=1):
    """Tell the operator what is served and how to authenticate: the key of a
    first admin just made is printed once, to standard error."""
    base = f"http://{host}:{port}"
    say = lambda text="": print(text, file=sys.stderr)  # noqa: E731
    workers = f" with {processes} worker processes" if processes > 1 else ""
    db_path = safe_db_name(storage)  # a URL without its password
    name = os.path.abspath(db_path) if storage.backend == "sqlite" else db_path
    command = eventstore.admin_command(storage)
    say(f"eventstore serving {name}{workers} on {base}")
    say(storage.durability())
    if admin_key:
        say()
        say("Created the SYSTEM user 'admin'. Its API key is shown only this once:")
        say()
        say(f"    {admin_key}")
        say()
        say(f"Try:  curl -u 'admin:{admin_key}' {base}/programs")
        say(f"More users: {command} user add USER_ID --write PROGRAM_ID")
    else:
        say("Authenticate with HTTP Basic: your user id and API key (curl -u USER_ID:API_KEY ...).")
        say(f"New key for admin: {command} key add admin")
    sys.stderr.flush()


# ============================================================================
# One process
# ============================================================================
#
# serve_one serves in this process (alone, or as one worker of several): the
# app, waitress with its connections (Channel) and answers (OneWriteTask), and a
# clean stop on SIGTERM or SIGINT.

def serve_one(args, announce_it):
    """Serve in this process until SIGTERM or SIGINT; -> exit status."""
    pin_to_cpu(args)
    if args.lifeline_fd is not None:
        stop_with_supervisor(args.lifeline_fd)
    try:
        max_waiting = args.max_waiting if args.max_waiting is not None else args.threads // 2
        storage = eventstore.open_storage(args.db, threads=args.threads)
        admin_key = create_first_admin(storage) if announce_it else None  # before make_app, which warns of none
        app = eventstore.make_app(storage, max_body_bytes=args.max_body, max_waiting=max_waiting,
                                  max_auth_failures=args.max_auth_failures,
                                  retention_interval=args.retention_interval, metrics=args.metrics,
                                  metrics_public=args.metrics_public,
                                  webhook_allow_hosts=args.webhook_allow_hosts,
                                  webhook_max_backoff=args.webhook_max_backoff,
                                  webhook_pause_after=args.webhook_pause_after,
                                  webhook_delivery=args.webhook_delivery)
    except (StorageOpenError, OSError) as exc:
        return cannot_open(args.db, exc)
    access_log = AccessLog(app, json_lines=args.log_format == "json") if args.access_log else None
    try:
        server = create_waitress(access_log or app, args, reuse_port=args.worker)
    except OSError as exc:
        app.close()
        return cannot_listen(args.host, args.port, exc)
    if announce_it:
        announce(app.storage, args.host, server.effective_port, admin_key)
    app.start()  # the engines (the retention sweeper, the webhook deliverer), before the first request
    try:
        run_until_stopped(server, app)
    finally:
        if access_log is not None:
            access_log.close()
    return 0


def pin_to_cpu(args):
    """Keep this serving process on one CPU (worker slot i on the i-th CPU it may
    use), unless --no-cpu-pinning. PERF: its threads take turns on one GIL, and
    spread over several cores every hand-over went through the kernel
    (docs/DESIGN.md, "Measured choices"). Not on platforms without sched_setaffinity."""
    if args.cpu_pinning and hasattr(os, "sched_setaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpus[args.worker_slot % len(cpus)]})


def create_waitress(app, args, reuse_port=False):
    """A waitress server for ``app``, listening (so the port is known), not yet
    serving; with ``reuse_port``, on SO_REUSEPORT sockets of its own (a worker)."""
    listeners = {}
    if reuse_port:
        sockets = {"sockets": [reuse_port_socket(family, address, listen=True)
                               for family, address in resolve(args.host, args.port)]}
    else:
        sockets = {"host": args.host, "port": args.port}
    # waitress reads a whole body before the app sees the request; up to 8x the
    # app's limit it lets the app answer 413 as problem+json, beyond that it
    # answers its own plain 413 and closes the connection without buffering more.
    server = waitress.create_server(
        app, map=listeners, **sockets, threads=args.threads,
        connection_limit=args.connection_limit, channel_timeout=args.channel_timeout,
        cleanup_interval=max(1, min(30, args.channel_timeout // 2)),
        max_request_header_size=64 * 1024, max_request_body_size=8 * args.max_body,
        # Reading on while a request runs is how waitress notices a client that
        # left (waitress.client_disconnected): a long poll it waited for ends then.
        channel_request_lookahead=1, ident="eventstore")
    channel_class = type("Channel", (Channel,), {
        "request_timeout": args.request_timeout, "first_byte_timeout": args.first_byte_timeout,
        "max_per_address": args.max_connections_per_address, "per_address": collections.Counter()})
    for listener in listeners.values():  # one per listening socket (and waitress's trigger)
        if isinstance(listener, waitress.server.BaseWSGIServer):
            listener.channel_class = channel_class
    return server


def run_until_stopped(server, app=None, grace=10.0):
    """Run waitress until SIGTERM or SIGINT, then stop cleanly: stop accepting,
    answer waiting long polls now, finish the requests in progress and send
    their answers (at most ``grace`` seconds), stop the app's writer."""
    stopping = threading.Event()

    def stop(signum, frame):
        stopping.set()
        server.pull_trigger()  # wake the loop now

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    loop = waitress.wasyncore.loop
    # At least once a second, so that every connection's limits are checked (Channel.readable).
    while not stopping.is_set():
        loop(timeout=1.0, map=server._map, use_poll=True, count=1)
    for listener in list(server._map.values()):
        if isinstance(listener, waitress.server.BaseWSGIServer):
            listener.accepting = False
            listener.del_channel()
            listener.socket.close()
    if app is not None and hasattr(app, "end_long_polls"):
        app.end_long_polls()
    if app is not None and hasattr(app, "begin_stop"):
        app.begin_stop()  # no new webhook deliveries; those in flight end within seconds
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and not idle(server):
        loop(timeout=0.05, map=server._map, use_poll=True, count=1)
    server.task_dispatcher.shutdown(cancel_pending=True, timeout=1)
    if app is not None and hasattr(app, "close"):
        app.close()


def idle(server):
    """No request being worked on, and every answer sent."""
    dispatcher = server.task_dispatcher
    channels = [c for c in server._map.values() if isinstance(c, waitress.channel.HTTPChannel)]
    return not dispatcher.queue and all(not c.requests and not c.total_outbufs_len for c in channels)


class OneWriteTask(waitress.task.WSGITask):
    """waitress writes a response's status line and headers, then its body, as
    two socket sends: two TCP segments and two wake-ups of the client for even
    the smallest JSON answer (PERF: docs/DESIGN.md, "Measured choices"). When
    the app hands over the whole body in one piece with its Content-Length
    (every eventstore response does), send the head and the body together."""

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


class RequestTimeout(waitress.utilities.Error):
    """The 408 of a request that did not all arrive within --request-timeout."""

    code, reason = 408, "Request Timeout"

    def to_response(self, ident=None):
        body = json.dumps({"type": "about:blank", "title": self.reason, "status": self.code,
                           "detail": self.body}).encode()
        return f"{self.code} {self.reason}", [("Content-Type", "application/problem+json")], body


class Channel(waitress.channel.HTTPChannel):
    """One client connection, with the limits waitress lacks, so that slow and
    silent clients cannot hold every connection slot (waitress closes only
    connections idle for channel_timeout, checked every cleanup_interval: 210
    clients trickling a byte now and then stopped the server answering):

    - a new connection that sends nothing within ``first_byte_timeout`` is closed;
    - a request must arrive whole within ``request_timeout`` of its first byte,
      or of being read again: while the answers of requests before it on the
      connection go out, waitress reads no further; past it the client gets a
      408, after those answers, and the connection closes;
    - one client address holds at most ``max_per_address`` connections (of the
      process); more are answered 503 and closed at once.

    The limits are checked in readable(), which the serving loop asks of every
    connection at least once a second. Its answers go out in one write (OneWriteTask)."""

    task_class = OneWriteTask
    # Set for each server by create_waitress:
    request_timeout = 30.0
    first_byte_timeout = 5.0
    max_per_address = 50
    per_address = collections.Counter()  # open connections by client address; the serving loop's thread only

    def __init__(self, server, sock, addr, adj, map=None):
        self.opened = self.receiving_since = time.monotonic()
        self.heard_from, self.paused, self.timed_out, self.address = False, False, False, None
        super().__init__(server, sock, addr, adj, map)
        address = addr[0] if isinstance(addr, tuple) else str(addr)
        if self.per_address[address] >= self.max_per_address:
            too_many_connections(address, self.max_per_address)
            try:
                sock.send(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Length: 0\r\n"
                          b"Connection: close\r\n\r\n")
            except OSError:
                pass
            self.handle_close()
            return
        self.per_address[address] += 1
        self.address = address

    def del_channel(self, map=None):
        if self.address is not None:
            self.per_address[self.address] -= 1
            if not self.per_address[self.address]:
                del self.per_address[self.address]
            self.address = None
        super().del_channel(map)

    def received(self, data):
        if self.timed_out:
            return False
        if data and self.request is None:  # the first bytes of a request
            self.receiving_since, self.paused = time.monotonic(), False
            self.heard_from = True
        return super().received(data)

    def readable(self):
        reading = super().readable() and not self.timed_out
        if self.request is None:
            if not self.heard_from and reading and time.monotonic() - self.opened > self.first_byte_timeout:
                self.will_close = True
                return False
        elif not reading:
            self.paused = True  # while earlier answers go out: the request is not being read
        elif self.paused:
            self.receiving_since, self.paused = time.monotonic(), False  # read again: its clock starts again
        elif time.monotonic() - self.receiving_since > self.request_timeout:
            self.time_out()
            return False
        return reading

    def time_out(self):
        """The request being received took too long: it is answered 408 in its
        turn, after the requests before it, and the connection closes then."""
        with self.requests_lock:
            request, self.request = self.request, None
            request.error = RequestTimeout(f"The request did not all arrive within {self.request_timeout:g} s.")
            request.completed = True
            self.timed_out = True
            self.requests.append(request)
            if len(self.requests) == 1:  # nothing running: answer it now
                self.server.add_task(self)


_last_warned = {}


def too_many_connections(address, limit, every=60.0):
    """Log a refused connection, at most once a minute per address."""
    now = time.monotonic()
    if now - _last_warned.get(address, -every) >= every:
        _last_warned[address] = now
        if len(_last_warned) > 10000:
            _last_warned.clear()
        logging.getLogger("eventstore.serve").warning(
            "refusing connections from %s: it holds %d already (--max-connections-per-address)", address, limit)


# ============================================================================
# Several processes
# ============================================================================
#
# The supervisor reserves the port, prepares the database once and starts the
# workers, each serve_one with a listening SO_REUSEPORT socket of its own on the
# same address and port, so the kernel spreads connections over them.
#
# SO_REUSEPORT lets any process of the same user bind that port too, and a
# second server would then share the connections, unseen. So every server
# first binds each address it will serve without SO_REUSEPORT: that fails beside
# any socket bound to the same port on that address or the any-address, however
# it was spelled and whoever holds it (connections of a stopped server waiting
# in TIME_WAIT do not count). The supervisor then reserves the port with
# SO_REUSEPORT and without SO_REUSEADDR, so that such a check by a later server
# fails beside it even before a worker listens. (Between its check and its
# reservation, a few microseconds, a server started at that very moment could
# pass its own check too; a lock would close that gap, but any local user could
# hold a lock at a path known to all and keep the server from starting.)

def supervise(args, argv, processes, prepare, script=__file__, restart_limit=5, restart_window=30.0):
    """The first process: reserve the port, ``prepare(args, port, processes)``
    (create the first admin; what it returns is held until the end, then closed), start ``processes`` workers (``script`` with
    --worker) and keep them running.
    SIGTERM/SIGINT stop them all cleanly; a worker that dies is restarted and
    logged; if workers die ``restart_limit`` times within ``restart_window``
    seconds of starting, the server gives up with exit status 1."""
    try:
        reserved = reserve_port(args.host, args.port)
    except OSError as exc:
        return cannot_listen(args.host, args.port, exc)
    port = reserved[0].getsockname()[1]
    try:
        held = prepare(args, port, processes)
    except StorageOpenError as exc:
        return cannot_open(args.db, exc)
    lifeline, lifeline_end = os.pipe()  # see stop_with_supervisor; only this process holds lifeline_end
    command = [sys.executable, os.path.abspath(script), *without_port(argv), "--port", str(port), "--worker",
               "--lifeline-fd", str(lifeline)]
    start = lambda slot: subprocess.Popen([*command, "--worker-slot", str(slot)], pass_fds=(lifeline,))  # noqa: E731
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    log = logging.getLogger("eventstore.supervisor")
    workers, early_deaths = {}, []
    for slot in range(processes):
        workers[slot] = (start(slot), time.monotonic())
    status = 0
    while not stopping.wait(0.2):
        for slot, (worker, started) in list(workers.items()):
            code = worker.poll()
            if code is None:
                continue
            now = time.monotonic()
            log.warning("worker %d (pid %d) exited with status %s; starting another", slot, worker.pid, code)
            if now - started < restart_window:
                early_deaths = [t for t in early_deaths if now - t < restart_window] + [now]
            if len(early_deaths) >= restart_limit:
                log.error("workers keep dying at start (%d times in %.0f s); stopping", len(early_deaths),
                          restart_window)
                stopping.set()
                status = 1
                break
            workers[slot] = (start(slot), now)
    for worker, _ in workers.values():
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 15
    for worker, _ in workers.values():
        try:
            worker.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    for sock in reserved:
        sock.close()
    if held is not None:
        held.close()
    os.close(lifeline_end)
    os.close(lifeline)
    return status


def prepare_database(args, port, processes):
    """The supervisor's part before any worker starts: check the database and its
    schema once, create the first admin, say how to authenticate. -> the metrics
    table it holds while it runs (so that the workers' counts survive even all of
    them dying at once: the table starts afresh only when no process holds it)."""
    storage = eventstore.open_storage(args.db, threads=1)
    try:
        announce(storage, args.host, port, create_first_admin(storage), processes)
        return eventstore_metrics.Metrics(storage.local_file(eventstore_metrics.FILE_SUFFIX)) if args.metrics else None
    finally:
        storage.close()


def resolve(host, port):
    """-> [(family, address)]: every address ``host`` names, with ``port``."""
    found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    return list(dict.fromkeys((family, address[:2]) for family, _, _, _, address in found
                              if family in (socket.AF_INET, socket.AF_INET6)))


def reserve_port(host, port):
    """-> the supervisor's bound, not listening SO_REUSEPORT sockets, one per
    address ``host`` names, which hold ``port`` (or the one ``port`` 0 picked)
    for the workers. OSError (EADDRINUSE) if another server is bound there."""
    addresses = resolve(host, port)
    if port:
        for family, address in addresses:  # see the section's comment
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                probe.bind(address)
    reserved = []
    try:
        for family, address in addresses:
            reserved.append(reuse_port_socket(family, (address[0], port), reuse_address=False))
            port = reserved[-1].getsockname()[1]  # --port 0: the one picked, for every address
    except OSError:
        for sock in reserved:
            sock.close()
        raise
    return reserved


def reuse_port_socket(family, address, listen=False, reuse_address=True):
    """A TCP socket bound with SO_REUSEPORT: several of them share one port. A
    listening one also with SO_REUSEADDR, so that a restart binds at once beside
    the last run's connections in TIME_WAIT (without it, "Address already in
    use" for up to a minute)."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse_address))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        if listen:
            sock.listen(1024)
    except OSError:
        sock.close()
        raise
    return sock


def stop_with_supervisor(lifeline_fd):
    """A worker stops as on SIGTERM when its supervisor is gone, however it died
    (SIGKILL too): the supervisor alone holds the pipe's other end, so a read
    here ends (EOF) only then. Orphaned workers served on for good."""
    def watch():
        while os.read(lifeline_fd, 1):
            pass
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="eventstore-lifeline", daemon=True).start()


def without_port(argv):
    """The command line minus --port (the workers get the port the supervisor reserved)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--port":
            skip = True
        elif not arg.startswith("--port="):
            kept.append(arg)
    return kept


# ============================================================================
# The access log
# ============================================================================
#
# The access log, and the server's other messages (logging), as text lines or
# one JSON object a line (--log-format json); a message logged while a request
# is handled carries its request id (eventstore.REQUEST_ID), as its access
# log line does.

def configure_logging(log_format):
    handler = logging.StreamHandler()
    handler.setFormatter(JsonLogFormatter() if log_format == "json" else TextLogFormatter())
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def utc_time(record):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class TextLogFormatter(logging.Formatter):
    """``time LEVEL logger: message``, and ``requestId=...`` when logged for a request."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record):
        text = super().format(record)
        request_id = eventstore.REQUEST_ID.get()
        if request_id is None:
            return text
        first, newline, rest = text.partition("\n")  # after the message, before a traceback
        return f"{first} requestId={request_id}{newline}{rest}"


class JsonLogFormatter(logging.Formatter):
    """One JSON object a line: time (UTC), level, logger, message, the request's
    id when logged for a request, and the traceback of an exception."""

    def format(self, record):
        line = {"time": utc_time(record), "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        request_id = eventstore.REQUEST_ID.get()
        if request_id is not None:
            line["requestId"] = request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


class AccessLog:
    """WSGI middleware: one line per request on standard error, once the response
    has been sent: time (UTC), client address, authenticated user id (or -),
    method, path with query, status, response bytes, duration in ms, request id
    (or -); with ``json_lines``, one JSON object with those fields. Never a
    header's value: the Authorization header and keys stay out of it.

    Lines are written by a thread of their own every ``flush_interval`` seconds,
    many in one write (PERF: not a write and a flush per request from its thread;
    docs/DESIGN.md, "Measured choices"). close() writes what is left; a process killed outright loses at most the
    last ``flush_interval`` of lines."""

    def __init__(self, app, stream=None, clock=time.monotonic, flush_interval=0.2, json_lines=False):
        self.app, self.stream, self.clock = app, stream or sys.stderr, clock
        self.flush_interval, self.json_lines = flush_interval, json_lines
        self._lines = collections.deque()  # append and popleft are thread-safe: no lock
        self._second = (None, "")  # a whole second of time.time() and its UTC time, formatted
        self._closed = threading.Event()
        self._writer = threading.Thread(target=self._write_lines, daemon=True, name="access-log")
        self._writer.start()

    def __call__(self, environ, start_response):
        started, answer = self.clock(), []

        def recording_start_response(status, headers, exc_info=None):
            answer[:] = status, headers
            return start_response(status, headers, exc_info)

        return _LoggedBody(self.app(environ, recording_start_response), self, environ, answer, started)

    def write(self, environ, answer, sent, started):
        """Add the line of one answered request. PERF: it runs on every request's
        path (docs/DESIGN.md, "Measured choices"): the time's seconds are formatted
        once a second, and a target is quoted only if it has a character to quote."""
        elapsed_ms = (self.clock() - started) * 1000
        now = time.time()
        second, stamp = self._second
        if int(now) != second:
            second = int(now)
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._second = second, stamp
        target = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        if not LOGGED_PATH.fullmatch(target):
            target = urllib.parse.quote(target, safe=LOGGED_PATH_SAFE, encoding="latin-1")
        query = environ.get("QUERY_STRING")
        if query:
            if not LOGGED_QUERY.fullmatch(query):
                query = urllib.parse.quote(query, safe=LOGGED_PATH_SAFE + "?", encoding="latin-1")
            target += "?" + query
        method = environ.get("REQUEST_METHOD", "-")
        if not (method.isascii() and method.isalpha() and len(method) <= 20):
            method = re.sub(r"[^A-Za-z]", "?", method)[:20]
        status, headers = answer or ("-", ())
        length = next((v for k, v in headers if k.lower() == "content-length"), None) or sent
        when = f"{stamp}.{int((now - second) * 1000):03d}Z"
        address, user = environ.get("REMOTE_ADDR", "-"), environ.get("eventstore.user_id", "-")
        request_id = environ.get("eventstore.request_id", "-")  # the app's: a safe token
        if self.json_lines:
            code, length = status.split(" ", 1)[0], str(length)
            # PERF: the object written out, not json.dumps of a dict: 6 -> 3 µs a line, and
            # a JSON log's cost a request about halved (docs/DESIGN.md, "Measured choices").
            # The same text json.dumps gives: strings through its own escaping, numbers as ints.
            text = JSON_STRING
            self._lines.append(
                f'{{"time": "{when}", "level": "INFO", "logger": "eventstore.access", "remoteAddr": {text(address)}, '
                f'"user": {text(user)}, "method": {text(method)}, "path": {text(target)}, '
                f'"status": {int(code) if code.isdigit() else "null"}, '
                f'"bytes": {int(length) if length.isdigit() else "null"}, '
                f'"durationMs": {round(elapsed_ms, 1)!r}, "requestId": {text(request_id)}}}\n')
            return
        self._lines.append(f"{when} {address} {user} {method} {target} {status.split(' ', 1)[0]} {length} "
                           f"{elapsed_ms:.1f}ms {request_id}\n")

    def _write_lines(self):
        while not self._closed.wait(self.flush_interval):
            self.flush()

    def flush(self):
        lines = [self._lines.popleft() for _ in range(len(self._lines))]  # a line added meanwhile waits
        if lines:
            self.stream.write("".join(lines))
            self.stream.flush()

    def close(self):
        self._closed.set()
        self._writer.join(timeout=5)
        self.flush()


JSON_STRING = json.encoder.encode_basestring_ascii  # a str -> its JSON string (json.dumps's)

# The characters urllib.parse.quote keeps as they are, given LOGGED_PATH_SAFE as
# its safe set: a target made of these only is logged as it is, without quote().
LOGGED_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
LOGGED_PATH = re.compile(r"[A-Za-z0-9_.~/:@!$&'()*+,;=%-]*")
LOGGED_QUERY = re.compile(r"[A-Za-z0-9_.~/:@!$&'()*+,;=%?-]*")


class _LoggedBody:
    """The app's body iterable; has ``log`` write the request's line once the
    server closes it."""

    def __init__(self, body, log, environ, answer, started):
        self.body, self.log, self.environ, self.answer, self.started = body, log, environ, answer, started
        self.sent = 0

    def __iter__(self):
        if type(self.body) is list:  # every eventstore answer: all of it handed over at once
            self.sent = sum(map(len, self.body))
            return iter(self.body)
        return self._counted()

    def _counted(self):
        for chunk in self.body:
            self.sent += len(chunk)
            yield chunk

    def close(self):
        try:
            if hasattr(self.body, "close"):
                self.body.close()
        finally:
            self.log.write(self.environ, self.answer, self.sent, self.started)


if __name__ == "__main__":
    sys.exit(main())
