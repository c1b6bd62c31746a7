"""eventstore's webhook deliverer (docs/API.md §11): the registry posts every
change a subscription's filter matches to the subscription's webhook, in
Sequence order, signed as Standard Webhooks says, one delivery at a time, and
never gives a change up: the subscription's Position moves only on a 2xx answer.

The rules live here: which URLs a webhook may have (decided from the URL as
written: no DNS, no connection), secrets and signatures, the delivery's body and
headers, back-off, and what an attempt's outcome does to the webhook's state
(``after_attempt``). The app validates a PUT's ``Webhook`` with them and stores
the webhook in the subscription's row (eventstore_storage.WebhookRow).

The engine (``WebhookDeliverer``, docs/DESIGN.md "Engines"): one per serving
process (or ``python eventstore.py deliver``), made by the app for each process,
started with the app, stopped by ``close()``. Its manager thread keeps a
listener (eventstore_news) per webhook subscription, so that a commit its filter
may match, in this process, another or another server, makes it due; a
subscription that is due gets a thread of its own for as long as it has
something to deliver (at most MAX_IN_FLIGHT at once per process), which:
reads the subscription and its next changes through a small pool of the
deliverer's own sessions (never a request thread's connection, never one per
subscription), takes the subscription's lease (eventstore_leases: one delivery
in flight per subscription across processes and servers), posts the batch
with http.client (bounded by TimeoutSeconds, never following a redirect,
reading at most MAX_ANSWER_BYTES of the answer), and records the outcome through
the group-commit writer in one transaction that checks the lease: on a 2xx the
Position moves to the batch's Through; otherwise the failure, the batch in
flight and the next attempt's time (back-off with jitter, capped), so that any
process carries on from the database after a crash. A subscription with nothing
to deliver holds no thread, no lease and no connection. A slow safety re-check
every RECHECK_SECONDS catches what no commit announced (a lease whose holder
died, a webhook made through another process). Imports nothing of the app.
"""

import base64
import contextlib
import email.utils
import hashlib
import hmac
import http.client
import ipaddress
import json
import logging
import random
import re
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
from typing import NamedTuple

from eventstore_forks import FORK_GUARD
from eventstore_leases import Lease, LeaseLost
from eventstore_storage import FeedQuery, WebhookRow, now_us

log = logging.getLogger("eventstore")

ACTIVE, PAUSED, DISABLED = "Active", "Paused", "Disabled"
SECRET_PREFIX = "whsec_"
OLD_SECRET_SECONDS = 24 * 3600   # after a rotation, deliveries carry the old signature too this long
MAX_BACKOFF = 3600               # seconds: --webhook-max-backoff's default
PAUSE_AFTER = 259200             # seconds failing before a webhook pauses: --webhook-pause-after's default
MIN_WAIT = 1.0                   # seconds between attempts at least: the back-off's first, Retry-After's floor
MAX_EVENTS = (1, 1000, 100)      # a webhook's MaxEvents: lowest, highest, default
TIMEOUT_SECONDS = (1, 60, 10)    # its TimeoutSeconds: lowest, highest, default
MAX_URL = 2000
MAX_ANSWER_BYTES = 64 * 1024     # of a receiver's answer body, read at most (then the connection closes)
MAX_BATCH_BYTES = 4 << 20        # a delivery's body stops growing past this (at least one change goes)
LEASE_SECONDS = 15               # a subscription's lease: a dead holder's passes on within this and a re-check
RECHECK_SECONDS = 5.0            # the slow safety re-check
MAX_IN_FLIGHT = 32               # deliveries in flight at once per process
STOP_GRACE = 5.0                 # seconds a delivery in flight may still take once the deliverer stops
USER_AGENT = "eventstore"
# What a URL may hold, as written: RFC 3986's characters (percent-encode the rest;
# a host in punycode).
URL_CHARACTERS = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")


# --- Which URLs: decided from the URL as written (no DNS, no connection) ---------------

def url_error(url, allow_hosts=()):
    """Why ``url`` may not be a webhook's Url (the 400's message), or None. A scheme
    other than http(s), user information, a fragment, no host, or ``http://`` to
    a host neither loopback nor in ``allow_hosts``."""
    if not isinstance(url, str):
        return "expected a URL, a string"
    if not 0 < len(url) <= MAX_URL or not URL_CHARACTERS.fullmatch(url):
        return (f"expected a URL of at most {MAX_URL} characters, ASCII without spaces (percent-encode the rest; "
                "a host in punycode)")
    try:
        parts = urllib.parse.urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not one
    except ValueError as exc:
        return f"is not a URL ({exc})"
    if port == 0:
        return "is not a URL (port 0 is no port to connect to: expected 1-65535)"
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        return "the scheme must be https (or http, to loopback or an allowed host)"
    if "@" in parts.netloc:
        return "must not hold user information (user:password@)"
    if "#" in url:
        return "must not hold a fragment (#...)"
    host = parts.hostname
    if not host:
        return "has no host"
    if scheme == "http" and not (is_loopback(host) or host in allowed_hosts(allow_hosts)):
        return ("http:// is accepted only to loopback or a host the server allows (--webhook-allow-host); "
                "use https://")
    return None


def host_of(url):
    """The host of a URL that passed url_error, lowercase, as written."""
    return urllib.parse.urlsplit(url).hostname


def allowed_hosts(allow_hosts):
    """--webhook-allow-host values as hosts are compared: lowercase, an IPv6 address without brackets."""
    return {host.strip().lower().removeprefix("[").removesuffix("]") for host in allow_hosts}


def is_loopback(host):
    """The name ``localhost``, an address of 127.0.0.0/8, or ``::1``, as written (no DNS)."""
    if host in ("localhost", "::1"):
        return True
    try:
        return ipaddress.IPv4Address(host) in ipaddress.IPv4Network("127.0.0.0/8")
    except ValueError:
        return False


def may_set_url(url, is_system, allow_hosts):
    """Whether a user may point a webhook at ``url``: a SYSTEM user anywhere; others only
    at a host the server allows."""
    return is_system or host_of(url) in allowed_hosts(allow_hosts)


# --- Secrets and signatures -------------------------------------------------------------

def new_secret():
    """``whsec_`` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode("ascii")


def rotated(webhook, new, now):
    """The webhook with secret ``new``; the one it replaces signs too for OLD_SECRET_SECONDS
    (an older one is retired at once: at most two in use)."""
    return webhook._replace(secret=new, old_secret=webhook.secret,
                            old_secret_until_us=now + OLD_SECRET_SECONDS * 1_000_000)


def signing_secrets(webhook, now):
    """The secrets a delivery is signed with at ``now``: the current one first."""
    if webhook.old_secret and webhook.old_secret_until_us is not None and now < webhook.old_secret_until_us:
        return [webhook.secret, webhook.old_secret]
    return [webhook.secret]


def signature(secret, msg_id, timestamp, body):
    """Standard Webhooks' v1 signature: HMAC-SHA256, with the secret's decoded bytes,
    over ``id.timestamp.body``."""
    key = base64.b64decode(secret.removeprefix(SECRET_PREFIX))
    digest = hmac.new(key, f"{msg_id}.{timestamp}.".encode("utf-8") + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode("ascii")


# --- The delivery -----------------------------------------------------------------------

class GrantLost(Exception):
    """What ``programs_of`` raises when the subscription's owner can no longer read
    a program its filter names (or any program): the webhook is paused, saying why
    (the exception's text)."""


class Batch(NamedTuple):
    """A delivery: the changes after the Position up to ``last`` (its Through)."""

    first: int
    last: int
    first_attempt_us: int
    msg_id: str
    body: bytes
    count: int


def delivery_id(name, first, last, restarts):
    """webhook-id: the same on every retry of a delivery; ``_r{n}`` once rewound or restarted n times."""
    return f"{name}_{first}_{last}" + (f"_r{restarts}" if restarts else "")


def delivery_body(name, events, through, timestamp):
    """The JSON body: ``events`` are the changes' representations (JSON texts),
    ``timestamp`` the first attempt's time (RFC 3339)."""
    return (f'{{"type":"eventstore.changes","timestamp":{json.dumps(timestamp)},"data":{{"Subscription":'
            f'{json.dumps(name)},"Events":[{",".join(events)}],"Through":{through}}}}}').encode("utf-8")


class Answer(NamedTuple):
    """What an attempt came to: ``outcome`` (ok, http_error, timeout, refused: the
    metrics' labels), the HTTP status (None without an answer), the Retry-After
    wait in seconds (a 429 or 503's, else None), and a short error text (None on a
    2xx; never a secret or the answer's body)."""

    outcome: str
    status: int | None
    retry_after: float | None
    error: str | None

    @property
    def ok(self):
        return self.outcome == "ok"


def backoff_seconds(failures, cap, rng=random):
    """The wait after the n-th consecutive failure: a random time between 2^(n-1)
    and 1.5 x 2^(n-1) seconds, never more than ``cap``."""
    base = 2.0 ** (min(failures, 64) - 1)
    return min(rng.uniform(base, 1.5 * base), cap)


def retry_after_seconds(value, now_seconds):
    """A Retry-After header (seconds, or an HTTP date) -> seconds from now, or None."""
    value = (value or "").strip()
    if value.isascii() and value.isdigit():
        return float(value[:12])
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        return None
    return max(0.0, moment.timestamp() - now_seconds)


def after_attempt(webhook, batch, answer, started_us, now, max_backoff, pause_after, rng=random):
    """The webhook once an attempt that began at ``started_us`` ended with ``answer``
    (recorded at ``now``): a 2xx clears the failures and the batch; a failure counts,
    keeps the batch, and schedules the next attempt (back-off, or the Retry-After of
    a 429 or 503, never past ``max_backoff`` nor below MIN_WAIT: a Retry-After of 0
    or in the past does not make it spin); a 410 disables it; failing without a 2xx
    for ``pause_after`` seconds pauses it."""
    tried = webhook._replace(last_attempt_us=started_us, last_status=answer.status, last_error=answer.error)
    if answer.ok:
        return tried._replace(failures=0, next_attempt_us=None, failing_since_us=None, batch_first=None,
                              batch_last=None, batch_first_attempt_us=None)
    since = webhook.failing_since_us if webhook.failing_since_us is not None else started_us
    failed = tried._replace(failures=webhook.failures + 1, failing_since_us=since, batch_first=batch.first,
                            batch_last=batch.last, batch_first_attempt_us=batch.first_attempt_us, next_attempt_us=None)
    if webhook.state != ACTIVE:  # paused or stopped meanwhile: it stays so
        return failed
    if answer.status == 410:
        return failed._replace(state=DISABLED, disabled_reason="the receiver answered 410 Gone")
    if now - since >= pause_after * 1_000_000:
        return failed._replace(state=PAUSED, disabled_reason=f"no 2xx answer for {pause_after} s or more "
                                                             "(--webhook-pause-after)")
    wait = answer.retry_after if answer.retry_after is not None else backoff_seconds(failed.failures, max_backoff,
                                                                                      rng)
    return failed._replace(next_attempt_us=now + int(max(MIN_WAIT, min(wait, max_backoff)) * 1_000_000))


def new_webhook(url, max_events, timeout_seconds):
    """A webhook just added: Active, a new secret, nothing delivered yet."""
    return WebhookRow(url, max_events, timeout_seconds, ACTIVE, new_secret(), None, None, 0, None, None, None, 0,
                      None, None, None, None, None, None)


def restarted(webhook):
    """The webhook Active again (PUT with ``Active: true``): failures and the schedule
    cleared, the batch in progress ended, and one more restart (webhook-id's _r{n})."""
    return ended_batch(webhook)._replace(state=ACTIVE, failures=0, next_attempt_us=None, failing_since_us=None,
                                         disabled_reason=None, restarts=webhook.restarts + 1)


def ended_batch(webhook):
    """The webhook without its batch in progress (a Rewind, a change of Filter)."""
    return webhook._replace(batch_first=None, batch_last=None, batch_first_attempt_us=None)


# --- Posting --------------------------------------------------------------------------

class _Attempt:
    """One POST in flight: its socket, which the manager shuts down at the attempt's
    deadline (TimeoutSeconds, the lease's safe time, the deliverer's stop)."""

    def __init__(self, timeout, lease, stop_by):
        self.started = time.monotonic()
        self.timeout, self.lease, self.stop_by = timeout, lease, stop_by
        self.sock = None
        self.cut_for = None  # "timeout", "lease" or "stop" once cut
        self._lock = threading.Lock()

    def remaining(self):
        return max(0.01, self.started + self.timeout - time.monotonic())

    def due_cut(self, now):
        """Why it must be cut now, or None."""
        if now >= self.started + self.timeout:
            return "timeout"
        if now >= self.lease.safe_until:
            return "lease"  # its lease may pass on: a delivery must not overlap the next holder's
        if self.stop_by() is not None and now >= self.stop_by():
            return "stop"
        return None

    def cut(self, why):
        with self._lock:
            if self.cut_for is None:
                self.cut_for = why
            sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)  # the plain socket's, under TLS too

    def connect(self, address, timeout=None, source_address=None, *args, **kwargs):
        """http.client's _create_connection: a socket the attempt can cut."""
        sock = socket.create_connection(address, min(timeout or self.timeout, self.remaining()), source_address)
        with self._lock:
            self.sock = sock
            cut = self.cut_for
        if cut is not None:
            sock.close()
            raise TimeoutError("cut")
        return sock


def post(url, headers, body, attempt, tls_context=None):
    """POST ``body`` to ``url`` -> an Answer. Never follows a redirect (http.client
    does not); reads at most MAX_ANSWER_BYTES of the answer's body."""
    parts = urllib.parse.urlsplit(url)
    https = parts.scheme.lower() == "https"
    port = parts.port or (443 if https else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if https:
        conn = http.client.HTTPSConnection(parts.hostname, port, timeout=attempt.remaining(),
                                           context=tls_context or ssl.create_default_context())
    else:
        conn = http.client.HTTPConnection(parts.hostname, port, timeout=attempt.remaining())
    conn._create_connection = attempt.connect
    try:
        conn.request("POST", target, body=body, headers=headers)
        response = conn.getresponse()
        status = response.status
        with contextlib.suppress(OSError, http.client.HTTPException):
            response.read(MAX_ANSWER_BYTES)  # the answer came; its body matters not
        retry = None
        if status in (429, 503):
            retry = retry_after_seconds(response.getheader("Retry-After"), time.time())
        if 200 <= status < 300:
            return Answer("ok", status, None, None)
        why = f"HTTP {status}" + (": redirects are not followed" if 300 <= status < 400 else "")
        return Answer("http_error", status, retry, why)
    except Exception as exc:  # the attempt failed: say how, briefly
        if attempt.cut_for is not None or isinstance(exc, TimeoutError):
            return Answer("timeout", None, None, f"no answer within {attempt.timeout} s")
        if isinstance(exc, ssl.SSLError):
            return Answer("refused", None, None, f"TLS: {getattr(exc, 'reason', None) or type(exc).__name__}")
        if isinstance(exc, http.client.HTTPException):
            return Answer("http_error", None, None, "the answer was not HTTP")
        if isinstance(exc, ConnectionRefusedError):
            return Answer("refused", None, None, "connection refused")
        if isinstance(exc, (ConnectionResetError, BrokenPipeError, ConnectionAbortedError)):
            return Answer("refused", None, None, "connection reset")
        if isinstance(exc, socket.gaierror):
            return Answer("refused", None, None, "host not found")
        if isinstance(exc, OSError):
            return Answer("refused", None, None, f"network error: {exc.strerror or type(exc).__name__}")
        raise
    finally:
        conn.close()


# --- The engine -------------------------------------------------------------------------

class _Sessions:
    """The deliverer's own small pool of storage sessions: borrowed for a read,
    inside the fork guard; at most ``size`` open; a broken one is closed."""

    def __init__(self, storage, size=2, wait_seconds=30.0):
        self.storage, self.size, self.wait_seconds = storage, size, wait_seconds
        self._idle, self._open = [], 0
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def reads(self):
        """A session to read on; TimeoutError when none is free within ``wait_seconds``
        (a read that hangs elsewhere: the caller's attempt fails and is tried again)."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._idle or self._open < self.size, self.wait_seconds):
                raise TimeoutError(f"no storage session came free within {self.wait_seconds:g} s")
            session = self._idle.pop() if self._idle else None
            if session is None:
                self._open += 1
        broken = True
        try:
            with FORK_GUARD.database_calls():
                if session is None:
                    session = self.storage.session()
                yield session
            broken = False
        finally:
            with self._changed:
                if broken:
                    self._open -= 1
                else:
                    self._idle.append(session)
                self._changed.notify()
            if broken and session is not None:
                with contextlib.suppress(Exception), FORK_GUARD.database_calls():
                    session.close()

    def close_idle(self):
        with self._changed:
            idle, self._idle = self._idle, []
            self._open -= len(idle)
        for session in idle:
            with contextlib.suppress(Exception), FORK_GUARD.database_calls():
                session.close()


class _Subscription:
    """What the deliverer of this process knows of one webhook subscription."""

    def __init__(self, name, lease):
        self.name, self.lease = name, lease
        self.listener, self.filter = None, None
        self.active = True
        self.due = None          # time.monotonic() when its thread should run, or None
        self.quiet_until = 0.0   # commits do not make it due before this (another holds it; a retry's time)
        self.running = False     # its thread runs
        self.again = False       # something happened while it ran: run again
        self.poked = False       # ... and it was a change of the subscription: at once, whatever the schedule
        self.attempt = None      # the _Attempt in flight
        self.renewing = False
        self.cached = None       # (key, Batch): the batch in flight, for retries byte for byte


class WebhookDeliverer:
    """Delivers every webhook subscription's changes (see the module's docstring).

    Collaborators: ``programs_of(reads, row)``, the programs a delivery of the
    subscription ``row`` reads now (None: all), raising GrantLost when its owner
    lost a grant its filter needs; ``render(event_row)``, a change's representation
    (JSON text); ``format_time(us)``, RFC 3339; ``count(subscription, outcome)``,
    called once per attempt (the metrics' webhook deliveries; outcome ok,
    http_error, timeout or refused); ``on_error(exc)``, called with each failure
    of the deliverer's own (the database, a bug; not a receiver's) once it is
    logged."""

    def __init__(self, storage, writer, news, *, programs_of, render, format_time, clock=now_us,
                 max_backoff=MAX_BACKOFF, pause_after=PAUSE_AFTER, count=lambda subscription, outcome: None,
                 on_error=lambda exc: None, lease_seconds=LEASE_SECONDS, recheck_seconds=RECHECK_SECONDS,
                 tls_context=None, rng=None):
        self.storage, self.writer, self.news = storage, writer, news
        self.programs_of, self.render, self.format_time = programs_of, render, format_time
        self.clock, self.max_backoff, self.pause_after, self.count = clock, max_backoff, pause_after, count
        self.on_error = on_error
        self.lease_seconds, self.recheck_seconds = lease_seconds, recheck_seconds
        self.tls_context, self.rng = tls_context, rng or random.Random()
        self.sessions = _Sessions(storage)
        self._subs = {}
        self._changed = threading.Condition()
        self._stopping = False
        self._stop_by = None
        self._thread = None
        self._threads = set()
        self._in_flight = 0
        self._watching = False
        self._next_recheck = 0.0
        self._rechecking = False

    # --- life ---

    def start(self):
        with self._changed:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(target=self._manage, name="eventstore-webhooks", daemon=True)
                self._thread.start()

    def begin_stop(self):
        """Start no more deliveries; those in flight get STOP_GRACE seconds, then are cut
        (not recorded: sent again later)."""
        with self._changed:
            if not self._stopping:
                self._stopping = True
                self._stop_by = time.monotonic() + STOP_GRACE
            self._changed.notify_all()

    def stop(self, timeout=STOP_GRACE + 3):
        """Stop: the deliveries in flight end (recorded, or cut and sent again later),
        their leases are given up."""
        self.begin_stop()
        deadline = time.monotonic() + timeout
        with self._changed:
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._changed:
            jobs = list(self._threads)
        for job in jobs:
            job.join(max(0.0, deadline - time.monotonic()))
        with self._changed:
            subs = list(self._subs.values())
            watching, self._watching = self._watching, False
        for sub in subs:
            if sub.listener is not None:
                sub.listener.close()
        if watching:
            self.news.stop_watching()
        self.sessions.close_idle()

    def poke(self, name):
        """Subscription ``name`` changed here (a PUT, an ack's Rewind, a new secret):
        look at it now."""
        with self._changed:
            sub = self._sub(name)
            sub.quiet_until = 0.0
            self._make_due(sub, time.monotonic(), news=False)

    # --- the manager: deadlines, renewals, what is due ---

    def _sub(self, name):
        sub = self._subs.get(name)
        if sub is None:
            sub = self._subs[name] = _Subscription(name, Lease(self.writer, f"webhook:{name}", self.lease_seconds))
        return sub

    def _make_due(self, sub, now, news=True):
        """(Under the lock.) Run ``sub``'s thread now (again after it ends, if it runs)."""
        if sub.running:
            sub.again = True
            sub.poked = sub.poked or not news
        elif not news or (sub.active and now >= sub.quiet_until):
            sub.due = now
        self._changed.notify_all()

    def _heard(self, sub):
        """A commit its filter may match (from the committing or the watching thread)."""
        with self._changed:
            self._make_due(sub, time.monotonic())

    def _manage(self):
        while True:
            with self._changed:
                now = time.monotonic()
                if self._stopping and not self._in_flight:
                    return
                wake = now + 1.0
                for sub in self._subs.values():
                    attempt = sub.attempt
                    if attempt is not None:
                        why = attempt.due_cut(now)
                        if why is not None:
                            attempt.cut(why)
                        wake = min(wake, now + 0.1)
                    if sub.running and sub.lease.held and not sub.renewing and now >= sub.lease.renew_at:
                        sub.renewing = True
                        self._spawn(self._renew, sub)
                    if not self._stopping and sub.due is not None and not sub.running:
                        if sub.due <= now and self._in_flight < MAX_IN_FLIGHT:
                            sub.due, sub.running = None, True
                            self._in_flight += 1
                            self._spawn(self._deliver_while_due, sub)
                        elif sub.due > now:
                            wake = min(wake, sub.due)
                if not self._stopping:
                    if now >= self._next_recheck and not self._rechecking:
                        self._rechecking, self._next_recheck = True, now + self.recheck_seconds
                        self._spawn(self._recheck)
                    wake = min(wake, self._next_recheck)
                self._changed.wait(max(0.01, wake - now))

    def _spawn(self, target, *args):
        def run():
            try:
                target(*args)
            finally:
                with self._changed:
                    self._threads.discard(thread)
        thread = threading.Thread(target=run, name="eventstore-webhook", daemon=True)
        self._threads.add(thread)
        thread.start()

    def _renew(self, sub):
        try:
            sub.lease.keep()
        except Exception as exc:  # the database is away: the attempt is cut at the lease's safe time
            log.warning("webhook %s: renewing its lease failed: %r", sub.name, exc)
        finally:
            with self._changed:
                sub.renewing = False

    def _recheck(self):
        """The slow safety re-check: every webhook subscription as stored; listeners
        for new ones and changed filters; those with something to deliver made due."""
        try:
            with self.sessions.reads() as reads:
                rows = reads.webhook_subscriptions()
            now, clock = time.monotonic(), self.clock()
            candidates = []
            with self._changed:
                for name in set(self._subs) - {row.name for row in rows}:
                    self._forget(self._subs[name])
                for row in rows:
                    sub = self._sub(row.name)
                    self._listen(sub, row)
                    if sub.running or not sub.active or now < sub.quiet_until:
                        continue
                    next_attempt = row.webhook.next_attempt_us
                    if next_attempt is not None and next_attempt > clock:
                        sub.quiet_until = now + (next_attempt - clock) / 1e6
                        sub.due = sub.quiet_until
                    else:
                        candidates.append((sub, row))
                self._watch(bool(rows))
            for sub, row in candidates:
                if row.webhook.batch_last is not None or self._anything_to_deliver(row):
                    with self._changed:
                        self._make_due(sub, time.monotonic())
            if not rows:
                self.sessions.close_idle()
        except Exception as exc:  # the database is away, say: the next re-check tries again
            log.warning("webhooks: the re-check failed: %r", exc)
            self.on_error(exc)
        finally:
            with self._changed:
                self._rechecking = False

    def _watch(self, wanted):
        """(Under the lock.) Have other processes' commits watched while there are webhooks."""
        if wanted and not self._watching:
            self.news.keep_watching()
        elif not wanted and self._watching:
            self.news.stop_watching()
        self._watching = wanted

    def _listen(self, sub, row):
        """(Under the lock.) ``sub`` hears the commits its filter may match; Active or not."""
        sub.active = row.webhook is not None and row.webhook.state == ACTIVE
        wanted = (row.programs, row.event_types)
        if sub.filter != wanted:
            if sub.listener is not None:
                sub.listener.close()
            sub.listener = self.news.listen(row.programs or None, row.event_types, lambda: self._heard(sub))
            sub.filter = wanted
        self._watch(True)  # other processes' commits too

    def _forget(self, sub):
        """(Under the lock.) The subscription or its webhook is gone."""
        if sub.listener is not None:
            sub.listener.close()
        sub.listener, sub.filter, sub.active, sub.due, sub.cached = None, None, False, None, None
        if not sub.running:
            self._subs.pop(sub.name, None)

    # --- one subscription's thread ---

    def _deliver_while_due(self, sub):
        retry_in = None
        try:
            retry_in = self._deliver(sub)
        except Exception as exc:  # the database is away, say: try again in a while
            log.warning("webhook %s: delivery failed: %r; trying again in %g s", sub.name, exc, self.recheck_seconds)
            self.on_error(exc)
            retry_in = self.recheck_seconds
        finally:
            if sub.lease.held:
                with contextlib.suppress(Exception):
                    sub.lease.give_up()
            with self._changed:
                sub.running = False
                self._in_flight -= 1
                now = time.monotonic()
                if retry_in is not None:
                    sub.quiet_until = now + retry_in
                    sub.due = sub.quiet_until
                if sub.again and not self._stopping:
                    if sub.poked:
                        sub.quiet_until = 0.0
                    self._make_due(sub, now, news=not sub.poked)
                    sub.again = sub.poked = False
                if sub.listener is None and sub.name in self._subs and sub.filter is None:
                    self._subs.pop(sub.name, None)  # forgotten while it ran
                self._changed.notify_all()

    def _read(self, read):
        with self.sessions.reads() as reads:
            return read(reads)

    def _deliver(self, sub):
        """Deliver while there is something to -> seconds until it should run again
        (a retry's time, or another process holds its lease), or None."""
        while True:
            with self._changed:
                if self._stopping:
                    return None
                sub.again = False
            row = self._read(lambda reads: reads.find_subscription(sub.name))
            with self._changed:
                if row is None or row.webhook is None:
                    self._forget(sub)
                    return None
                self._listen(sub, row)
                if not sub.active:
                    return None
            webhook, clock = row.webhook, self.clock()
            if webhook.next_attempt_us is not None and webhook.next_attempt_us > clock:
                return (webhook.next_attempt_us - clock) / 1e6
            if not sub.lease.held:
                if webhook.batch_last is None and not self._anything_to_deliver(row):
                    return None
                if not sub.lease.take():
                    return self.lease_seconds / 2  # another process delivers it; look again in a while
                continue  # read it again under the lease: the last holder may just have moved it
            if not sub.lease.keep():
                return self.lease_seconds / 2
            batch = self._batch(sub, row)
            if batch is None:
                return None
            started_us = self.clock()
            answer = self._post(sub, row, batch)
            if answer is None:
                return None  # cut by a stop, or the lease was not confirmed in time: sent again later
            self._record(sub, row, batch, answer, started_us)

    def _anything_to_deliver(self, row):
        def read(reads):
            try:
                programs = self.programs_of(reads, row)
            except GrantLost:
                return True  # the webhook is to be paused
            return bool(reads.read_feed(programs, FeedQuery(event_types=row.event_types, after=row.position,
                                                            limit=1)))
        return self._read(read)

    def _batch(self, sub, row):
        """The batch to send now -> a Batch, or None when there is nothing to deliver
        (or the owner lost a grant: paused). The owner's grants are read first, at
        every attempt, a retry's too: the batch in flight goes again byte for byte
        while this process keeps it and the programs it reads are the same; else it
        is formed again from the Position, up to its last Sequence (after another
        process tried it, or a grant changed); else a new one of up to MaxEvents."""
        webhook = row.webhook
        try:
            programs = self._read(lambda reads: self.programs_of(reads, row))
        except GrantLost as lost:  # the owner can no longer read a program the filter names
            self._pause(sub, row, str(lost))
            return None
        key = (webhook.batch_first, webhook.batch_last, webhook.batch_first_attempt_us, webhook.restarts,
               row.position, programs, row.event_types)
        if webhook.batch_last is not None and sub.cached is not None and sub.cached[0] == key:
            return sub.cached[1]

        def read(reads):
            rows = reads.read_feed(programs, FeedQuery(event_types=row.event_types, after=row.position,
                                                       limit=webhook.max_events))  # up to MaxEvents + 1
            if webhook.batch_last is not None:  # the batch in flight, formed again up to its last Sequence
                kept = [event for event in rows if event.seq <= webhook.batch_last]
                if 0 < len(kept) <= webhook.max_events:  # every matching change up to its last: the same Through
                    return kept[0].seq, webhook.batch_last, webhook.batch_first_attempt_us, kept
            rows = rows[:webhook.max_events]  # a new batch (or one that now holds more: its first MaxEvents)
            return (rows[0].seq, rows[-1].seq, None, rows) if rows else None

        found = self._read(read)
        if found is None:
            return None
        first, last, first_attempt_us, rows = found
        first_attempt_us = first_attempt_us or self.clock()
        events, size = [], 0
        for event in rows:  # bounded in bytes too: a thousand large events would not fit in memory
            events.append(self.render(event))
            size += len(events[-1])
            if size > MAX_BATCH_BYTES:
                last = event.seq  # its Through is then the last change it holds
                break
        body = delivery_body(row.name, events, last, self.format_time(first_attempt_us))
        batch = Batch(first, last, first_attempt_us, delivery_id(row.name, first, last, webhook.restarts), body,
                      len(events))
        sub.cached = ((first, last, first_attempt_us, webhook.restarts, row.position, programs, row.event_types),
                      batch)
        return batch

    def _post(self, sub, row, batch):
        """Send the batch -> its Answer, or None when it was cut by a stop or for the
        lease (sent again later: nothing is recorded)."""
        webhook, now = row.webhook, self.clock()
        # The secrets as they are now, read after the batch's changes were: ``row`` may
        # be older than a rotation whose 200 came before a change this batch holds.
        current = self._read(lambda reads: reads.find_subscription(row.name))
        secrets = current.webhook if current is not None and current.webhook is not None else webhook
        timestamp = now // 1_000_000
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT, "Connection": "close",
                   "webhook-id": batch.msg_id, "webhook-timestamp": str(timestamp),
                   "webhook-signature": " ".join(signature(secret, batch.msg_id, timestamp, batch.body)
                                                 for secret in signing_secrets(secrets, now))}
        attempt = _Attempt(webhook.timeout_seconds, sub.lease, lambda: self._stop_by)
        with self._changed:
            sub.attempt = attempt
        if self.tls_context is None and webhook.url[:6].lower() == "https:":
            self.tls_context = ssl.create_default_context()  # once: it loads the system's certificates
        try:
            answer = post(webhook.url, headers, batch.body, attempt, self.tls_context)
        finally:
            with self._changed:
                sub.attempt = None
        if answer.status is None and attempt.cut_for in ("stop", "lease"):
            return None
        self.count(row.name, answer.outcome)  # the metrics' eventstore_webhook_deliveries_total
        return answer

    def _record(self, sub, row, batch, answer, started_us):
        """The attempt's outcome, in one transaction that checks the lease: on a 2xx the
        Position moves to the batch's Through. Nothing is recorded when the
        subscription changed meanwhile (a Rewind, a new Filter, Active: true)."""
        def change(tx):
            sub.lease.check(tx)
            current = tx.lock_subscription(row.name)
            if not same_delivery(current, row):
                return False
            tx.set_webhook(row.name, after_attempt(current.webhook, batch, answer, started_us, tx.now,
                                                   self.max_backoff, self.pause_after, self.rng))
            if answer.ok:
                tx.acknowledge(row.name, batch.last, tx.now)
            return True
        try:
            self.writer.submit(change, touched=lambda result: False, seqs=0)
        except LeaseLost:
            log.warning("webhook %s: its lease passed on during a delivery; the next holder sends it again",
                        row.name)

    def _pause(self, sub, row, why):
        def change(tx):
            sub.lease.check(tx)
            current = tx.lock_subscription(row.name)
            if same_delivery(current, row) and current.webhook.state == ACTIVE:
                tx.set_webhook(row.name, current.webhook._replace(
                    state=PAUSED, last_error=why, next_attempt_us=None,
                    disabled_reason="the owner can no longer read a program its filter names"))
        with contextlib.suppress(LeaseLost):
            self.writer.submit(change, touched=lambda result: False, seqs=0)


def same_delivery(current, row):
    """Whether subscription ``current`` (read in the recording transaction) still
    delivers what ``row`` did: same webhook, Position, filter and restarts."""
    return (current is not None and current.webhook is not None and current.position == row.position
            and current.programs == row.programs and current.event_types == row.event_types
            and current.webhook.url == row.webhook.url and current.webhook.restarts == row.webhook.restarts)
