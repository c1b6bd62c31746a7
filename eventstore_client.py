"""eventstore_client: publish to and follow an eventstore registry.

One standard-library file: copy it into a consuming program, or import it.

    from eventstore_client import Client
    client = Client("http://127.0.0.1:8080", "course-platform", os.environ["EVENTSTORE_KEY"])
    for event in client.follow(ProgramId="FOO"):
        handle(event)

``python eventstore_client.py --help`` is its command line (the key comes from
the environment variable EVENTSTORE_KEY, never from an argument).

Every failure a call raises is a ClientError: a refusal carries its HTTP status
and problem; NoAnswer (status None, also a ConnectionError) says no answer came.
"""

import argparse
import base64
import http.client
import json
import os
import queue
import random
import re
import signal
import socket
import sys
import threading
import time
import urllib.parse
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime

__all__ = ["Client", "ClientError", "NoAnswer"]

MAX_BATCH = 1000
LONG_POLL_SECONDS = 30
# A server that could not hold a long poll (its host has no thread to spare for
# it, or it is stopping) answers at once with this header: seconds to let pass
# before polling again.
POLL_AFTER_HEADER = "eventstore-poll-after"
MAX_BACKOFF_SECONDS = 10.0
EVENT_ID_RE = re.compile(r"[A-Za-z0-9_]{1,32}-[A-Za-z0-9._~:@-]{1,200}")


# ============================================================================
# Errors
# ============================================================================

class ClientError(Exception):
    """Every failure of a call. A refusal: ``status`` is the HTTP status,
    ``problem`` the RFC 9457 problem body as a dict (or None). No answer at all
    (refused, dropped or timed-out connection): a NoAnswer, status None."""

    def __init__(self, status, problem=None, message=None):
        self.status, self.problem = status, problem
        detail = (problem or {}).get("detail") if isinstance(problem, dict) else None
        super().__init__(message or f"HTTP {status}: {detail or 'no detail'}")


class NoAnswer(ClientError, ConnectionError):
    """No answer came from the registry (``status`` is None)."""

    def __init__(self, message):
        super().__init__(None, None, message)


class _Stopped(Exception):
    """The follower this page fetch was for has stopped."""


class _Retry(Exception):
    """An answer or failure worth trying again: after ``delay`` seconds if given,
    else after the next back-off step."""

    def __init__(self, error, delay=None):
        super().__init__(str(error))
        self.error, self.delay = error, delay


# ============================================================================
# The client
# ============================================================================

class Client:
    """A registry at ``url`` (``http://host:port``, perhaps with a path prefix),
    as the user ``user_id`` with ``api_key``.

    429 and 503 are retried after their Retry-After; a refused or dropped
    connection and other 5xx with exponential back-off and jitter, at most
    ``MAX_BACKOFF_SECONDS`` apart. Single calls give up after ``retry_for``
    seconds and raise the last error; ``follow`` never gives up. Any other 4xx
    raises ClientError at once. ``log`` (a function taking one string) hears
    about every retry. Every call takes ``timeout=`` (seconds to wait for an
    answer) for itself. ``with Client(...) as client:`` closes its connections
    at the end; so does ``close()``.
    """

    def __init__(self, url, user_id, api_key, timeout=60.0, retry_for=300.0, log=None, sleep=time.sleep):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"expected an http:// or https:// URL, got {url!r}")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.address = f"{self.host}:{self.port or (443 if self.scheme == 'https' else 80)}"
        self.prefix = parts.path.rstrip("/")
        self.timeout, self.retry_for = timeout, retry_for
        self.log, self.sleep = log or (lambda message: None), sleep
        token = base64.b64encode(f"{user_id}:{api_key}".encode("utf-8")).decode("ascii")
        self._headers = {"Authorization": f"Basic {token}", "Accept": "application/json"}
        self._local = threading.local()  # one keep-alive connection per thread
        self._lock = threading.Lock()
        self._connections = set()  # every thread's, for close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    # --- single calls --------------------------------------------------------

    def put(self, event_id, body, if_match=None, if_none_match=None, timeout=None):
        """Create or update an event; -> its Revision (a replay changes nothing).
        ``if_match``: a Revision (or entity tag) the event must be at;
        ``if_none_match="*"``: create only (ClientError 412 if it exists).

        A conditional PUT sent again after its answer was lost fails its
        condition if the first try took effect: then, if the event is now
        what that try made (the next revision, with this body), that is the
        answer; otherwise a ClientError 412 says an earlier try may have
        applied it."""
        headers = _conditions(if_match, if_none_match)

        def resent_refused(error):
            if error.status != 412 or not headers:
                return None
            asked = 0 if if_none_match == "*" else _revision(if_match)
            expected = None if asked is None else asked + 1  # what the earlier try made
            current = self._current(event_id, timeout)
            if expected is not None and current is not None and current["Revision"] == expected \
                    and _same_event(current, body):
                return 200, {"etag": f'"{expected}"'}, None  # the earlier try's own result
            now = "is deleted" if current is None else f"is at revision {current['Revision']}"
            raise ClientError(412, error.problem, f"HTTP 412: the event {now}; an earlier try of this call, "
                              "whose answer was lost, may have applied it") from None

        _, answer_headers, _ = self._call("PUT", self._event_path(event_id), body, headers, timeout=timeout,
                                          resent_refused=resent_refused)
        return int(answer_headers["etag"].strip('"'))

    def _current(self, event_id, timeout):
        """The event's representation, or None if it does not exist (or is deleted)."""
        try:
            return self.get(event_id, timeout=timeout)
        except ClientError as error:
            if error.status == 404:
                return None
            raise

    def get(self, event_id, if_none_match=None, timeout=None):
        """-> the event's representation as a dict (ClientError 404 if there is
        none); with ``if_none_match`` (a Revision or entity tag), None while the
        event is still at that revision."""
        status, _, event = self._call("GET", self._event_path(event_id), headers=_conditions(None, if_none_match),
                                      timeout=timeout)
        return None if status == 304 else event

    def delete(self, event_id, if_match=None, timeout=None):
        """Delete an event; -> the tombstone's Revision, or None when a resent
        DELETE (its first answer lost) found the event already deleted. With
        ``if_match``, a resent DELETE that finds the event live at another
        revision raises a ClientError 412 saying an earlier try may have
        deleted it (before it was written again)."""
        def resent_refused(error):
            if error.status == 404:
                return 404, {}, None  # an earlier try did it; its answer was lost
            if error.status == 412:
                raise ClientError(412, error.problem, "HTTP 412: the event is at another revision; an earlier "
                                  "try of this call, whose answer was lost, may have deleted it before it was "
                                  "written again") from None
            return None

        _, answer_headers, _ = self._call("DELETE", self._event_path(event_id), headers=_conditions(if_match, None),
                                          timeout=timeout, resent_refused=resent_refused)
        return int(answer_headers["etag"].strip('"')) if answer_headers else None

    def publish(self, events, timeout=None):
        """Publish any number of events (each a PUT body plus its ``EventId``),
        in order, in all-or-nothing batches of at most 1000; an EventId already
        in the current batch starts a new one. -> the server's Results entries,
        ``{"EventId", "Revision", "Status"}``, in order."""
        results = []
        for batch in _batches(events):
            results += self._call("POST", "/events", {"Events": batch}, timeout=timeout)[2]["Results"]
        return results

    # --- following the feed ----------------------------------------------------

    def follow(self, after=None, until_caught_up=False, subscription=None, **filters):
        """Every change after Sequence ``after`` (default 0), in Sequence order, as
        representation dicts: forever, long-polling, or with
        ``until_caught_up=True`` until the first empty page. Filters are the
        feed's parameters (``ProgramId=`` and ``EventType=`` take a string or a
        list; ``ProgramMemberId=``, ``ReferenceEventId=``, ``EventStartFromUTC=``,
        ``EventStartBeforeUTC=``, ``limit=``).

        With ``subscription="NAME"`` it reads that subscription from the
        registry's Position instead (its filter is the subscription's own: only
        ``limit=`` is taken, and ``after`` or a filter is a ValueError), and
        acknowledges each page once it has been yielded on: when the loop asks
        for the change after the page's last. Stopped at any moment, it misses
        nothing and gives again at most the page it was in."""
        if subscription is not None:
            if after is not None or set(filters) - {"limit"}:
                raise ValueError("follow(subscription=...) reads from the subscription's Position with its own "
                                 "filter: give no after= and no filters (limit= only)")
            for events, _, _ in self._subscription_pages(subscription, until_caught_up, filters.get("limit")):
                yield from events
            return
        for events, _ in self.follow_pages(after or 0, until_caught_up, **filters):
            yield from events

    def follow_pages(self, after=0, until_caught_up=False, **filters):
        """follow, a page at a time: -> (events, the Sequence to resume after)."""
        for events, _, last in self._pages(after, until_caught_up, filters):
            yield events, last

    def subscribe(self, name, filter=None, start_from=None, description=None, timeout=None):
        """Create or change the subscription ``name`` -> its representation (a
        dict). ``filter``: ``{"ProgramId": [...], "EventType": [...]}`` (a list
        empty or left out: every); ``start_from``: "beginning", "now", a Sequence
        (int), or a time (a datetime, or an RFC 3339 string); ``description``: a
        text. What is None is left as it is (on creation: every program and type,
        from the beginning, no description)."""
        body = {}
        if filter is not None:
            body["Filter"] = {field: [value] if isinstance(value, str) else list(value)
                              for field, value in filter.items() if value is not None}
        if start_from is not None:
            body["StartFrom"] = _start_from(start_from)
        if description is not None:
            body["Description"] = description
        return self._call("PUT", self._subscription_path(name), body, timeout=timeout)[2]

    def _subscription_pages(self, name, until_caught_up, limit):
        """A subscription's pages -> (events, their JSON texts, Through), each
        acknowledged when the next is asked for (after it was handled), never
        before; the next page is read only then: reading moves nothing."""
        wait = 0 if until_caught_up else LONG_POLL_SECONDS
        path = (f"{self._subscription_path(name)}/events?"
                + urllib.parse.urlencode(([("limit", int(limit))] if limit else []) + [("wait", wait)]))
        while True:
            _, headers, raw = self._call("GET", path, retry_for=None, timeout=max(self.timeout, wait + 30),
                                         parse=bytes)
            events, texts, rest = parse_page(raw)
            if not events:
                if until_caught_up:
                    return
                pause = _poll_after(headers.get(POLL_AFTER_HEADER))  # the server could not wait: not at once
                if pause:
                    self.sleep(pause)
                continue
            yield events, texts, rest["Through"]
            try:
                self._call("POST", f"{self._subscription_path(name)}/ack", {"Through": rest["Through"]},
                           retry_for=None)
            except ClientError as error:
                if error.status != 409:  # 409: another consumer acknowledged further meanwhile
                    raise

    def _pages(self, after, until_caught_up, filters):
        """-> (events, their JSON texts as the server sent them, last Sequence) a page at a time."""
        wait = 0 if until_caught_up else LONG_POLL_SECONDS
        query = []
        for name, value in filters.items():
            for item in ([value] if isinstance(value, (str, int)) else value):
                query.append((name, str(item)))
        path = "/events?" + urllib.parse.urlencode(query + [("after", int(after))])
        # A thread of its own (with its own connection) fetches the next page
        # while this one is parsed and handled: Next stands at the end of a page,
        # so it is known before the events are decoded.
        pages, fetch = queue.Queue(maxsize=2), _Fetch()
        fetcher = threading.Thread(target=self._fetch_pages, args=(path, wait, until_caught_up, pages, fetch),
                                   daemon=True, name="eventstore-client-fetch")
        fetcher.start()
        try:
            while True:
                raw = pages.get()
                if isinstance(raw, BaseException):
                    raise raw
                events, texts, _ = parse_page(raw)
                if events:
                    yield events, texts, events[-1]["Sequence"]
                elif until_caught_up:
                    return
        finally:
            fetch.stop()  # a long poll in flight ends now, not in 30 s

    def _fetch_pages(self, path, wait, until_caught_up, pages, fetch):
        """Fetch pages in order into ``pages`` until ``fetch`` stops (or, until
        caught up, the first empty page); an error is handed over in their place."""
        def hand_over(item):
            while not fetch.stopped.is_set():
                try:
                    return pages.put(item, timeout=0.5)
                except queue.Full:
                    continue

        try:
            while not fetch.stopped.is_set():
                _, headers, raw = self._call("GET", f"{path}&wait={wait}", retry_for=None,
                                             timeout=max(self.timeout, wait + 30), parse=bytes, fetch=fetch)
                hand_over(raw)
                if until_caught_up and raw.startswith(PAGE_START.encode() + b"]"):
                    return
                next_url = page_tail(raw)["Next"]
                # Next is relative to the server's root; keep our own path prefix off it.
                path = next_url[len(self.prefix):] if next_url.startswith(self.prefix + "/") else next_url
                # The server answered without waiting (it had no thread to spare, or
                # is stopping): ask again only after the pause it names, not at once.
                pause = _poll_after(headers.get(POLL_AFTER_HEADER))
                if pause and fetch.stopped.wait(pause):
                    return
        except _Stopped:
            pass
        except BaseException as exc:
            hand_over(exc)
        finally:
            self._close()

    # --- HTTP ------------------------------------------------------------------

    def _event_path(self, event_id):
        return "/events/" + urllib.parse.quote(event_id, safe="")

    def _subscription_path(self, name):
        return "/subscriptions/" + urllib.parse.quote(name, safe="")

    def _call(self, method, path, body=None, headers=None, retry_for=..., timeout=None,
              resent_refused=None, parse=None, fetch=None):
        """One request, retried as the class says -> (status, headers, parsed body);
        ``parse`` reads a successful answer's bytes instead of json.loads; for a
        follower's ``fetch``, retries end when it stops. A refusal of a request
        sent again (an earlier try may have taken effect, its answer lost) goes
        to ``resent_refused(error)``: it returns the answer to give instead, or
        None for the refusal itself."""
        retry_for = self.retry_for if retry_for is ... else retry_for
        deadline = None if retry_for is None else time.monotonic() + retry_for
        payload = None if body is None else json.dumps(body, ensure_ascii=False).encode("utf-8")
        attempt = 0
        while True:
            attempt += 1
            try:
                return self._send(method, path, payload, headers or {}, timeout, parse, fetch)
            except ClientError as error:
                if attempt > 1 and resent_refused is not None:
                    answer = resent_refused(error)
                    if answer is not None:
                        return answer
                raise
            except _Retry as retry:
                delay = retry.delay if retry.delay is not None else min(
                    MAX_BACKOFF_SECONDS, 0.25 * 2 ** min(attempt, 10)) * random.uniform(0.5, 1.0)
                if deadline is not None and time.monotonic() + delay > deadline:
                    raise retry.error from None
                self.log(f"{method} {path}: {retry.error}; trying again in {delay:.1f} s")
                if fetch is None:
                    self.sleep(delay)
                elif fetch.stopped.wait(delay):  # nobody wants the answer any more (a follower stopped)
                    raise _Stopped() from None

    def _send(self, method, path, payload, headers, timeout, parse=None, fetch=None):
        all_headers = dict(self._headers, **headers)
        if payload is not None:
            all_headers["Content-Type"] = "application/json"
        try:
            connection = self._connect(timeout)
            if fetch is not None:
                fetch.using(connection)
            connection.request(method, self.prefix + path, body=payload, headers=all_headers)
            response = connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            self._close()
            if fetch is not None and fetch.stopped.is_set():
                raise _Stopped() from None
            raise _Retry(NoAnswer(f"no answer from {self.address}: {exc or type(exc).__name__}")) from None
        if response.getheader("Connection", "").lower() == "close":
            self._close()
        answer_headers = {name.lower(): value for name, value in response.getheaders()}
        if response.status < 400 and parse is not None:
            return response.status, answer_headers, parse(raw)
        try:
            answer = json.loads(raw) if raw else None
        except ValueError:
            answer = None
        if response.status < 400:
            return response.status, answer_headers, answer
        error = ClientError(response.status, answer if isinstance(answer, dict) else None)
        if response.status in (429, 503):
            raise _Retry(error, _retry_after(answer_headers.get("retry-after")))
        if response.status >= 500:
            raise _Retry(error)
        raise error

    def _connect(self, timeout):
        timeout = timeout or self.timeout
        connection = getattr(self._local, "connection", None)
        if connection is None:
            factory = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
            connection = self._local.connection = factory(self.host, self.port, timeout=timeout)
        connection.timeout = timeout
        if connection.sock is None:  # new, or closed (by the server, or by close() from another thread)
            connection.connect()
            with self._lock:
                self._connections.add(connection)
        connection.sock.settimeout(timeout)
        return connection

    def _close(self):
        connection = getattr(self._local, "connection", None)
        if connection is not None:
            connection.close()
            self._local.connection = None
            with self._lock:
                self._connections.discard(connection)

    def close(self):
        """Close every connection this client holds, in every thread."""
        with self._lock:
            connections, self._connections = self._connections, set()
        for connection in connections:
            connection.close()
        self._local.connection = None


class _Fetch:
    """A follower's page fetching: ``stop()`` ends it at once, even in the middle
    of a long poll, by shutting down the socket it waits on."""

    def __init__(self):
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._sock = None

    def using(self, connection):
        """Called with the (connected) connection before each request: either
        stop() has run (then _Stopped) or it will see this socket."""
        with self._lock:
            if self.stopped.is_set():
                raise _Stopped()
            self._sock = connection.sock

    def stop(self):
        with self._lock:
            self.stopped.set()
            if self._sock is not None:
                try:
                    self._sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already closed


def _revision(tag):
    """A Revision (int) or an entity tag for one (``"3"``, ``W/"3"``) -> the
    Revision, or None (``*``, a list of tags)."""
    if isinstance(tag, int):
        return tag
    text = str(tag).strip().removeprefix("W/").strip('"')
    return int(text) if text.isdigit() else None


def _instant(text):
    """A date-time as the server reads it (no offset means UTC; fractions beyond
    microseconds dropped) -> an aware datetime, or None if it cannot be read here."""
    match = isinstance(text, str) and DATETIME_RE.fullmatch(text)
    if not match:
        return None
    text = re.sub(r"[.,](\d+)", lambda m: "." + m.group(1)[:6].ljust(6, "0"), text)
    try:
        moment = datetime.fromisoformat(re.sub(r"[Zz]$", "+00:00", text))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _same_event(representation, body):
    """Whether the stored event holds what PUTting ``body`` stores (the fields
    the server compares for a replay, as it fills in what is left out)."""
    if not isinstance(body, dict):
        return False
    start = _instant(body.get("EventStartUTC"))
    end = start if body.get("EventEndUTC") is None else _instant(body.get("EventEndUTC"))
    canonical = lambda value: json.dumps(value, sort_keys=True)  # noqa: E731
    return (start is not None and end is not None
            and representation.get("ProgramMemberId") == body.get("ProgramMemberId")
            and representation.get("EventType") == body.get("EventType")
            and _instant(representation.get("EventStartUTC")) == start
            and _instant(representation.get("EventEndUTC")) == end
            and canonical(representation.get("EventData")) == canonical(body.get("EventData") or {})
            and representation.get("ReferenceEventId") == body.get("ReferenceEventId"))


def _start_from(value):
    """A subscription's start -> its StartFrom: "beginning" and "now" as they are,
    a Sequence (int) as {"Sequence": n}, a time (datetime or text) as {"TimeUTC": ...}."""
    if value in ("beginning", "now"):
        return value
    if isinstance(value, bool):
        raise ValueError(f"start_from: expected \"beginning\", \"now\", a Sequence or a time, got {value!r}")
    if isinstance(value, int):
        return {"Sequence": value}
    if isinstance(value, datetime):
        return {"TimeUTC": value.isoformat()}  # no offset: the registry takes it as UTC
    if isinstance(value, str):
        return {"TimeUTC": value}
    raise ValueError(f"start_from: expected \"beginning\", \"now\", a Sequence or a time, got {value!r}")


def _conditions(if_match, if_none_match):
    """If-Match / If-None-Match headers from Revisions (ints) or entity tags."""
    tag = lambda value: f'"{value}"' if isinstance(value, int) else value  # noqa: E731
    return {name: tag(value) for name, value in (("If-Match", if_match), ("If-None-Match", if_none_match))
            if value is not None}


_DECODER = json.JSONDecoder()
PAGE_START = '{"Events":['


def parse_page(raw):
    """A feed page's bytes -> (events as dicts, each event's JSON text as sent,
    the rest of the page). Each event is decoded where it stands and its text
    kept, so that writing JSON Lines needs no second encoding."""
    text = raw.decode("utf-8")
    if not text.startswith(PAGE_START):  # not the server's compact form: the slow way
        page = json.loads(text)
        return page["Events"], [json_line(event)[:-1] for event in page["Events"]], page
    events, texts, index = [], [], len(PAGE_START)
    while text[index] != "]":
        event, end = _DECODER.raw_decode(text, index)
        events.append(event)
        texts.append(text[index:end])
        index = end + 1 if text[end] == "," else end
    return events, texts, json.loads("{" + text[index + 2:])


def page_tail(raw):
    """A feed page's bytes -> {"Next": ..., "HasMore": ...}, read from its end."""
    start = raw.rfind(b',"Next":')
    if start < 0:
        return json.loads(raw)
    return json.loads(b"{" + raw[start + 1:])


def _poll_after(value):
    """Eventstore-Poll-After -> seconds to let pass before the next poll (None
    without the header; one second if it cannot be read; at most a long poll)."""
    if value is None:
        return None
    value = value.strip()
    return min(float(value), LONG_POLL_SECONDS) if value.isdigit() else 1.0


def _retry_after(value):
    """Retry-After (seconds or an HTTP date) -> seconds to wait, or None."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def _batches(events):
    batch, ids = [], set()
    for event in events:
        if len(batch) == MAX_BATCH or event.get("EventId") in ids:
            yield batch
            batch, ids = [], set()
        batch.append(event)
        ids.add(event.get("EventId"))
    if batch:
        yield batch


# ============================================================================
# Publishing a file
# ============================================================================

EVENT_FIELDS = ("ProgramId", "ProgramMemberId", "EventType", "EventStartUTC", "EventEndUTC",
                "EventData", "ReferenceEventId")
EXPORT_FIELDS = ("Revision", "Sequence", "CreatedUTC", "UpdatedUTC", "Deleted")
DATETIME_RE = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}(:\d{2}([.,]\d+)?)?([Zz]|[+-]\d{2}(:?\d{2})?)?")


def _reject_duplicates(pairs):
    names = [name for name, _ in pairs]
    if len(names) != len(set(names)):
        raise ValueError("a key appears twice")
    return dict(pairs)


def parse_line(text):
    """One JSON line -> ("put", event) or ("delete", event_id); ValueError
    saying what is wrong. Checks what can be checked here; the server checks
    the rest when it is sent."""
    try:
        record = json.loads(text, object_pairs_hook=_reject_duplicates)
    except ValueError as exc:
        raise ValueError(f"not valid JSON ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    event_id = record.get("EventId")
    if not isinstance(event_id, str) or not EVENT_ID_RE.fullmatch(event_id):
        raise ValueError("EventId: expected a ProgramId, a hyphen, then 1-200 of A-Z a-z 0-9 . _ ~ : @ -")
    if record.get("Deleted") is True:
        return "delete", event_id
    if record.get("Deleted") not in (None, False):
        raise ValueError("Deleted: expected true or false")
    body = {name: value for name, value in record.items() if name not in EXPORT_FIELDS}
    problems = [f"{name}: unknown field" for name in body if name not in EVENT_FIELDS + ("EventId",)]
    for name in EVENT_FIELDS[:4]:
        if body.get(name) is None:
            problems.append(f"{name}: is required")
    for name in ("ProgramId", "ProgramMemberId", "EventType", "EventStartUTC"):
        if body.get(name) is not None and not isinstance(body[name], str):
            problems.append(f"{name}: expected a string")
    if isinstance(body.get("ProgramId"), str) and body["ProgramId"] != event_id.partition("-")[0]:
        problems.append(f"ProgramId: must equal the EventId's prefix {event_id.partition('-')[0]!r}")
    for name in ("EventStartUTC", "EventEndUTC"):
        value = body.get(name)
        if value is not None and not (isinstance(value, str) and DATETIME_RE.fullmatch(value)):
            problems.append(f"{name}: expected an ISO 8601 date-time such as 2026-03-01T09:30:00Z")
    if body.get("EventData") is not None and not isinstance(body["EventData"], dict):
        problems.append("EventData: expected a JSON object")
    ref = body.get("ReferenceEventId")
    if ref is not None and not (isinstance(ref, str) and EVENT_ID_RE.fullmatch(ref)):
        problems.append("ReferenceEventId: expected an EventId")
    if problems:
        raise ValueError("; ".join(problems))
    return "put", body


def publish_file(client, lines):
    """Send checked lines in file order: PUT bodies in batches, tombstones as
    DELETEs (one for an event that does not exist counts as done). -> counts."""
    counts = dict.fromkeys(("created", "updated", "unchanged", "deleted"), 0)
    pending = []

    def flush():
        for result in client.publish(pending):
            counts[result["Status"]] += 1
        pending.clear()

    for kind, value in lines:
        if kind == "put":
            pending.append(value)
            continue
        flush()  # the DELETE comes after every earlier line
        try:
            client.delete(value)
        except ClientError as exc:
            if exc.status != 404:
                raise
        counts["deleted"] += 1
    flush()
    return counts


# ============================================================================
# The command line
# ============================================================================

def json_line(value):
    """Compact JSON on one line: U+2028/U+2029 escaped, since line readers split there."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029") + "\n"


def write_cursor(path, sequence):
    """Replace the cursor file atomically: its digits and a newline, fsynced,
    through one staging file of a fixed name (``PATH.writing``), so that a
    follower killed while writing leaves at most that one, which its next save
    (or start) replaces."""
    staging = f"{path}.writing"
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, f"{sequence}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(staging, path)
    folder = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a crash
    finally:
        os.close(folder)


def forget_unsaved_cursor(path):
    """Remove the staging file a follower killed while saving left behind."""
    try:
        os.unlink(f"{path}.writing")
    except FileNotFoundError:
        pass


def read_cursor(path):
    try:
        text = open(path, encoding="ascii").read().strip()
    except FileNotFoundError:
        return 0
    if not text.isdigit():
        raise ValueError(f"{path} does not hold a Sequence (digits), it holds {text[:40]!r}")
    return int(text)


def cmd_follow(client, args, out, err):
    if args.subscription:
        # Each page is acknowledged when the next is asked for: after it was written and flushed.
        pages = client._subscription_pages(args.subscription, args.until_caught_up, args.limit)
    else:
        if args.cursor_file:
            forget_unsaved_cursor(args.cursor_file)
        after = read_cursor(args.cursor_file) if args.cursor_file else args.after or 0
        filters = {name: value for name, value in (("ProgramId", args.program), ("EventType", args.type),
                                                     ("ProgramMemberId", args.member), ("limit", args.limit)) if value}
        pages = client._pages(after, args.until_caught_up, filters)
    count = 0
    for events, texts, last in pages:
        out.write(("\n".join(texts) + "\n").encode("utf-8"))
        out.flush()  # the events are out before the cursor (or the acknowledgement) says so
        if args.cursor_file:
            write_cursor(args.cursor_file, last)
        count += len(events)
        print(f"followed {count:,} changes, up to Sequence {last}", file=err, flush=True)
    return 0


def cmd_publish(client, args, out, err):
    checked, bad = [], []
    with open(args.file, "rb") as lines:
        for number, raw in enumerate(lines, 1):
            if not raw.strip():
                continue
            try:
                checked.append(parse_line(raw.decode("utf-8")))
            except UnicodeDecodeError:
                bad.append(f"line {number}: not valid UTF-8")
            except ValueError as exc:
                bad.append(f"line {number}: {exc}")
    if bad:
        print("\n".join(bad), file=err)
        print(f"error: {len(bad)} of {len(checked) + len(bad)} lines are not valid; nothing was sent", file=err)
        return 1
    counts = publish_file(client, checked)
    out.write((f"published {len(checked):,} lines: " + ", ".join(f"{n:,} {what}" for what, n in counts.items())
               + "\n").encode("utf-8"))
    return 0


def cmd_get(client, args, out, err):
    out.write((json.dumps(client.get(args.event_id), ensure_ascii=False, indent=2) + "\n").encode("utf-8"))
    return 0


ONE_SHOT_RETRY_SECONDS = 30.0


def build_parser():
    # The connection options go before or after the command (defaults SUPPRESSed,
    # so that a command's own copy does not overwrite a value given before it).
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help="the registry, e.g. http://127.0.0.1:8080 (default: $EVENTSTORE_URL)")
    common.add_argument("--user", default=argparse.SUPPRESS, metavar="USER_ID",
                        help="your user id (default: $EVENTSTORE_USER)")
    common.add_argument("--retry-for", type=float, default=argparse.SUPPRESS, metavar="SECONDS",
                        help=f"give up on an unanswered get or publish after SECONDS (default "
                             f"{ONE_SHOT_RETRY_SECONDS:g}); follow never gives up")
    parser = argparse.ArgumentParser(
        prog="eventstore_client.py", parents=[common],
        description="Follow and publish to an eventstore registry. The API key is read from "
                    "the environment variable EVENTSTORE_KEY, never from an argument.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    follow = commands.add_parser("follow", help="write every change as JSON Lines to standard output",
                                 parents=[common],
                                 description="Write every change, in Sequence order, as JSON Lines to "
                                             "standard output; long-poll for more unless --until-caught-up.")
    start = follow.add_mutually_exclusive_group()
    start.add_argument("--after", type=int, metavar="N", help="start after Sequence N (default 0)")
    start.add_argument("--cursor-file", metavar="PATH",
                       help="start after the Sequence stored here (0 if missing); rewritten after each "
                            "page is written out (through PATH.writing)")
    start.add_argument("--subscription", metavar="NAME",
                       help="read the registry's subscription NAME from its Position, acknowledging each page "
                            "once it is written out (with --limit and --until-caught-up only)")
    follow.add_argument("--program", action="append", metavar="P", help="only this program (repeatable)")
    follow.add_argument("--type", action="append", metavar="T", help="only this event type (repeatable)")
    follow.add_argument("--member", metavar="M", help="only this ProgramMemberId")
    follow.add_argument("--until-caught-up", action="store_true", help="stop at the first empty page")
    follow.add_argument("--limit", type=int, default=MAX_BATCH, metavar="N",
                        help="events per page, 1-1000 (default: %(default)s)")
    follow.set_defaults(func=cmd_follow)
    publish = commands.add_parser("publish", help="publish a JSON Lines file (every line checked first)",
                                  parents=[common],
                                  description="Publish JSON Lines of PUT bodies plus EventId (export's extra "
                                              "fields are ignored; a tombstone line is sent as a DELETE). Every "
                                              "line is checked before anything is sent.")
    publish.add_argument("file", metavar="FILE.jsonl")
    publish.set_defaults(func=cmd_publish)
    get = commands.add_parser("get", help="print one event", parents=[common],
                              description="Print one event's representation.")
    get.add_argument("event_id", metavar="EVENT_ID")
    get.set_defaults(func=cmd_get)
    return parser


def main(argv=None, environ=None, out=None, err=None):
    """The command line; -> exit status: 0 done, 1 failed, 2 wrong usage."""
    environ = os.environ if environ is None else environ
    out, err = out or sys.stdout.buffer, err or sys.stderr
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "subscription", None) and (args.program or args.type or args.member):
        parser.error("follow --subscription reads the subscription's own filter: it takes --limit and "
                     "--until-caught-up only")
    url = getattr(args, "url", None) or environ.get("EVENTSTORE_URL")
    if not url:
        parser.error("give the registry's URL: --url http://HOST:PORT, or set EVENTSTORE_URL")
    user = getattr(args, "user", None) or environ.get("EVENTSTORE_USER")
    if not user:
        parser.error("give your user id: --user USER_ID, or set EVENTSTORE_USER")
    key = environ.get("EVENTSTORE_KEY")
    if not key:
        print("error: set EVENTSTORE_KEY to your API key (it is never taken as an argument)", file=err)
        return 2
    try:
        client = Client(url, user, key, retry_for=getattr(args, "retry_for", ONE_SHOT_RETRY_SECONDS),
                        log=lambda message: print(message, file=err, flush=True))
    except ValueError as exc:
        print(f"error: --url: {exc}", file=err)
        return 2
    try:
        return args.func(client, args, out, err)
    except (ClientError, OSError, ValueError) as exc:  # a refusal, no answer, a file, a bad line
        print(f"error: {exc}", file=err)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        client.close()


def _stop_on_sigterm(signum, frame):
    # SIGTERM ends the command as Ctrl-C does: through its finally blocks, so a
    # follower closes its long poll and leaves its cursor whole.
    raise KeyboardInterrupt


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    sys.exit(main())
