"""eventstore: the Learning Hub's event registry, as one WSGI application.

Programs publish learners' events with ``PUT /events/{eventId}``; other programs
read them back and follow the change feed ``GET /events``. The contract is
docs/API.md; ``make_app(db)`` returns the WSGI application. This module holds
what the HTTP contract needs and nothing else: parsing and validation, the
registry's write rules, Basic authentication, the handlers, the route table
and the app. Below it, each in a module of its own that never imports this one:
the storage interface (eventstore_storage.py) and its backends
(eventstore_sqlite.py, eventstore_pg.py), the group-commit writer
(eventstore_writer.py), the event types' schemas (eventstore_schemas.py), the
engines (the retention sweeper, eventstore_retention.py, and the webhook
deliverer, eventstore_webhooks.py, under leases of eventstore_leases.py), the
metrics every process counts into and /metrics reads (eventstore_metrics.py),
the failed-authentication throttle (eventstore_throttle.py) and the errors
(eventstore_errors.py). The console's page, served as it is, is in console/.
``python eventstore.py --help`` is the admin command line (eventstore_admin.py).
docs/DESIGN.md shows how they fit.

The sections stand in dependency order, leaves first: each uses only what
stands above it. A request enters at the bottom, at ``EventStore.__call__``,
and goes up: the router, authentication, a handler, the write rules, storage.
"""

import base64
import binascii
import contextvars
import functools
import hashlib
import hmac
import http
import json
import logging
import math
import os
import re
import secrets
import shlex
import sys
import threading
import time
import urllib.parse
import weakref
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import NamedTuple

from eventstore_errors import Problem, bad_request, field_error, service_unavailable, storage_problem
from eventstore_metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from eventstore_metrics import FILE_SUFFIX as METRICS_FILE
from eventstore_metrics import FEED_HEAD, SUBSCRIPTION_BEHIND, SUBSCRIPTION_PENDING, Metrics, NoMetrics
from eventstore_news import CommitNews
from eventstore_retention import RetentionSweeper
from eventstore_schemas import MAX_LISTED, CompiledSchema, SchemaCache, check_schema
from eventstore_sqlite import SQLiteStorage
from eventstore_storage import (POSTGRES_SCHEMES, SCHEMA_VERSION, EventInput, FeedBacklog, FeedQuery, StorageOpenError,
                                SubscriptionRow, TypeRules, data_path, erase_events, now_us, safe_db_name)
from eventstore_throttle import shared_throttle
from eventstore_webhooks import (MAX_BACKOFF, MAX_EVENTS, PAUSE_AFTER, PAUSED, TIMEOUT_SECONDS, GrantLost,
                                 WebhookDeliverer, ended_batch, may_set_url, new_secret, new_webhook, restarted, rotated, url_error)
from eventstore_writer import GroupCommitWriter, Later

__all__ = ["make_app", "end_long_polls", "EventStore", "Problem"]

HERE = Path(__file__).resolve().parent
OPENAPI_PATH = data_path("openapi.json")
CONSOLE_PATH = data_path("console")
DEFAULT_DB = "eventstore.db"
DEFAULT_MAX_BODY = 1 << 20  # 1 MiB
REALM = 'Basic realm="eventstore", charset="UTF-8"'
AUTH_CACHE_SECONDS = 1.0

log = logging.getLogger("eventstore")


# ============================================================================
# Parsing and validation
# ============================================================================

PROGRAM_ID_RE = re.compile(r"[A-Za-z0-9_]{1,32}")
EVENT_ID_RE = re.compile(r"[A-Za-z0-9_]{1,32}-[A-Za-z0-9._~:@-]{1,200}")
USER_ID_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")
API_KEY_RE = re.compile(r"esk_[A-Za-z0-9_-]{43}")
KEY_ID_LENGTH = 12

PROGRAM_ID_RULE = "a ProgramId: 1-32 characters of A-Z a-z 0-9 _"
EVENT_ID_RULE = ("an EventId: a ProgramId, a hyphen, then 1-200 characters of "
                 "A-Z a-z 0-9 . _ ~ : @ -")


def program_of(event_id):
    """The ProgramId an EventId claims: everything before its first hyphen."""
    return event_id.partition("-")[0] if "-" in event_id else None


# --- JSON with the contract's strictness -------------------------------------

def _reject_duplicates(pairs):
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name):
    raise ValueError(f"{name} is not allowed in JSON")


def _finite_float(text):
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def json_depth(value):
    """Nesting depth of a parsed JSON value: a scalar is 0, ``{}`` and ``[]`` are 1.
    Iterative, so no input can exhaust the stack; only containers are visited."""
    if isinstance(value, dict) and not any(isinstance(child, (dict, list)) for child in value.values()):
        return 1  # the usual EventData: flat
    depth, stack = 0, [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        item, level = stack.pop()
        depth = max(depth, level)
        children = item.values() if isinstance(item, dict) else item
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return depth


def has_lone_surrogate(value):
    """Whether any string or key in a parsed JSON value holds a lone surrogate."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return True
    return False


SURROGATE_ESCAPE_RE = re.compile(r"\\u[dD][89abcdefABCDEF]")


# PERF: built once; json.loads with these hooks builds a decoder and its scanner
# at every call (docs/DESIGN.md, "Measured choices").
_STRICT_DECODER = json.JSONDecoder(object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant,
                                   parse_float=_finite_float)


def parse_json(body):
    """Request body bytes -> parsed JSON, or Problem(400) saying what is wrong."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise bad_request(f"The body is not valid UTF-8 (byte {exc.start}).") from None
    try:
        if text.startswith("\ufeff"):  # as json.loads says it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        value = _STRICT_DECODER.decode(text)
    except RecursionError:
        raise bad_request("The body is not valid JSON: it is nested too deeply.") from None
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise bad_request(f"The body is not valid JSON: {exc}.") from None
    # Decoded UTF-8 holds no surrogates, so only a \uD800-\uDFFF escape can
    # make one; walk the value only when the text has such an escape.
    if SURROGATE_ESCAPE_RE.search(text) and has_lone_surrogate(value):
        raise bad_request("The body is not valid JSON: a string holds a lone surrogate (\\ud800-\\udfff).")
    return value


def _encoder(sort_keys):
    """A compact, non-ASCII-escaping JSON encoder function, the stdlib's C encoder
    built once when there is one. (No cycle check: values parsed from JSON or
    built here have no cycles.)"""
    # PERF: json.dumps sets up a new encoder on every call (docs/DESIGN.md, "Measured choices").
    encoder = json.JSONEncoder(sort_keys=sort_keys, separators=(",", ":"), ensure_ascii=False)
    if json.encoder.c_make_encoder is None:
        return encoder.encode
    encode = json.encoder.c_make_encoder(None, encoder.default, json.encoder.encode_basestring, None,
                                         ":", ",", sort_keys, False, True)
    return lambda value: "".join(encode(value, 0))


_canonical_encode = _encoder(sort_keys=True)
_compact_encode = _encoder(sort_keys=False)


def canonical_json(value):
    """One spelling per JSON value: sorted keys, no spaces. ``1``, ``1.0`` and
    ``true`` stay distinct."""
    return _canonical_encode(value)


def json_text(value):
    """Compact JSON as this service writes it. U+2028/U+2029 are escaped: valid
    raw in JSON, but many line readers (Python's str.splitlines among them)
    break lines there, and export writes one event per line."""
    text = _compact_encode(value)
    if "\u2028" in text or "\u2029" in text:
        text = text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    return text


def _dumps(value):
    return json_text(value).encode("utf-8")


# --- Times --------------------------------------------------------------------

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
DATETIME_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2})(?::(\d{2})(?:[.,](\d+))?)?"
    r"(?:([Zz])|([+-])(\d{2})(?::?(\d{2}))?)?",
    re.ASCII,
)
DATETIME_RULE = "an ISO 8601 date-time such as 2026-03-01T09:30:00Z"


EPOCH_ORDINAL = EPOCH.toordinal()
MIN_US = (datetime(1, 1, 1).toordinal() - EPOCH_ORDINAL) * 86_400_000_000
MAX_US = (datetime(9999, 12, 31).toordinal() - EPOCH_ORDINAL + 1) * 86_400_000_000 - 1


# PERF: the common spelling goes to datetime.fromisoformat (docs/DESIGN.md,
# "Measured choices"); anything else, or anything it rejects, takes the general
# path below (and gets its error message).
COMMON_DATETIME_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d{1,6})?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)?", re.ASCII)
ONE_MICROSECOND = timedelta(microseconds=1)


def parse_datetime(text):
    """ISO 8601 date-time -> microseconds since the epoch, UTC. No offset means
    UTC; fractions beyond microseconds are truncated. Raises ValueError."""
    if isinstance(text, str) and COMMON_DATETIME_RE.fullmatch(text):
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=timezone.utc)
            micros = (moment - EPOCH) // ONE_MICROSECOND
            if MIN_US <= micros <= MAX_US:
                return micros
    return parse_any_datetime(text)


def parse_any_datetime(text):
    """parse_datetime for every spelling DATETIME_RE accepts, with the error messages."""
    match = DATETIME_RE.fullmatch(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"expected {DATETIME_RULE}")
    year, month, day, hour, minute, second, fraction, _z, sign, off_h, off_m = match.groups()
    hour, minute, second = int(hour), int(minute), int(second or 0)
    offset = int(off_h or 0) * 60 + int(off_m or 0)
    try:
        if hour > 23 or minute > 59 or second > 59:
            raise ValueError("time out of range")
        if int(off_h or 0) > 23 or int(off_m or 0) > 59:
            raise ValueError("offset out of range")
        days = date(int(year), int(month), int(day)).toordinal() - EPOCH_ORDINAL
    except ValueError as exc:
        raise ValueError(f"{text!r} is not a valid date-time ({exc})") from None
    micros = ((days * 86400 + hour * 3600 + minute * 60 + second) * 1_000_000
              + int((fraction or "0")[:6].ljust(6, "0")))
    micros += -offset * 60_000_000 if sign == "+" else offset * 60_000_000
    if not MIN_US <= micros <= MAX_US:
        raise ValueError(f"{text!r} is not a valid date-time (outside years 0001-9999 in UTC)")
    return micros


def format_datetime(micros):
    """Microseconds since the epoch -> RFC 3339 UTC with ``Z``; six fraction digits
    only when there are microseconds."""
    seconds, fraction = divmod(micros, 1_000_000)
    text = _format_second(seconds)
    return f"{text}.{fraction:06d}Z" if fraction else f"{text}Z"


@functools.lru_cache(maxsize=4096)
def _format_second(seconds):
    """Whole seconds since the epoch -> ``YYYY-MM-DDTHH:MM:SS``. Cached: a feed page
    formats two of these per event, and in Sequence (commit) order the Created
    and Updated times of neighbouring events mostly fall in the same few seconds."""
    days, seconds = divmod(seconds, 86400)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    return f"{(EPOCH + timedelta(days=days)).date().isoformat()}T{hours:02d}:{minutes:02d}:{seconds:02d}"


# --- Event bodies -------------------------------------------------------------

EVENT_FIELDS = ("ProgramId", "ProgramMemberId", "EventType", "EventStartUTC",
                "EventEndUTC", "EventData", "ReferenceEventId")
EVENT_FIELD_SET = frozenset(EVENT_FIELDS)
MAX_EVENT_DATA_DEPTH = 32


CONTROL_CHARACTER_RE = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc


def _text_error(value, low, high, allow_controls=True):
    if not isinstance(value, str):
        return f"expected a string of {low}-{high} characters"
    if not low <= len(value) <= high:
        return f"expected {low}-{high} characters, got {len(value)}"
    if not value.strip():
        return "must not be only white space"
    if not allow_controls and CONTROL_CHARACTER_RE.search(value):
        return "must not contain control characters"
    return None


def require_object(body):
    """Problem(400) unless a parsed body is a JSON object."""
    if not isinstance(body, dict):
        raise bad_request("The body must be a JSON object.",
                          [field_error("body", f"expected an object, got {_json_type(body)}")])


def program_id_error(program_id):
    """The error entry for a malformed ProgramId, or None when it is well formed."""
    if PROGRAM_ID_RE.fullmatch(program_id):
        return None
    return field_error("ProgramId", f"{program_id!r} is not {PROGRAM_ID_RULE}")


def validate_event(event_id, body, ignore=()):
    """A parsed PUT body for ``event_id`` -> EventInput, or Problem(400) listing
    every problem (one ``errors`` entry each). Fields named in ``ignore`` are
    skipped (a batch item's own EventId).

    Written for speed (a batch validates a thousand of these): locals rather
    than lookups, and the error messages built only when there is an error."""
    require_object(body)
    errors = []

    def check(name, message):
        if message:
            errors.append(field_error(name, message))

    if not EVENT_ID_RE.fullmatch(event_id):
        check("EventId", f"{event_id!r} is not {EVENT_ID_RULE}")
    if not body.keys() <= EVENT_FIELD_SET:
        for name in body:
            if name not in EVENT_FIELD_SET and name not in ignore:
                check(name, "unknown field; accepted fields are " + ", ".join(EVENT_FIELDS))
    # An optional field sent as null counts as absent.
    program_id, member_id, event_type, start_text, end_text, data, ref = map(body.get, EVENT_FIELDS)
    if program_id is None or member_id is None or event_type is None or start_text is None:
        for name, value in zip(EVENT_FIELDS[:4], (program_id, member_id, event_type, start_text)):
            if value is None:
                check(name, "is required" if name not in body else "is required and must not be null")

    if program_id is not None:
        if not isinstance(program_id, str):
            check("ProgramId", f"expected a string, got {_json_type(program_id)}")
        elif program_id != program_of(event_id) and program_of(event_id) is not None:
            check("ProgramId", f"must equal the eventId's prefix {program_of(event_id)!r}")
    if member_id is not None:
        check("ProgramMemberId", _text_error(member_id, 1, 256))
    if event_type is not None:
        check("EventType", event_type_error(event_type))

    start_us = end_us = None
    if start_text is not None:
        start_us = _parse_field_datetime("EventStartUTC", start_text, check)
    if end_text is None:
        end_us = start_us
    else:
        end_us = _parse_field_datetime("EventEndUTC", end_text, check)
    if start_us is not None and end_us is not None and end_us < start_us:
        check("EventEndUTC", "must not be before EventStartUTC")

    if data is None:
        data = {}
    if not isinstance(data, dict):
        check("EventData", f"expected a JSON object, got {_json_type(data)}")
    elif json_depth(data) > MAX_EVENT_DATA_DEPTH:
        check("EventData", f"nested more than {MAX_EVENT_DATA_DEPTH} levels deep")

    if ref is not None and not (isinstance(ref, str) and EVENT_ID_RE.fullmatch(ref)):
        check("ReferenceEventId", f"expected {EVENT_ID_RULE}")

    if errors:
        raise bad_request("The event is not valid; see errors.", errors)
    content = canonical_json([member_id, event_type, start_us, end_us, data, ref])
    doc = json_text({
        "EventId": event_id, "ProgramId": program_id, "ProgramMemberId": member_id,
        "EventType": event_type, "EventStartUTC": format_datetime(start_us),
        "EventEndUTC": format_datetime(end_us), "EventData": data, "ReferenceEventId": ref,
        "Deleted": False})[:-1]
    return EventInput(event_id, program_id, member_id, event_type, start_us, end_us, doc, ref,
                      hashlib.sha256(content.encode("utf-8")).digest(), data)


def _parse_field_datetime(name, value, check):
    try:
        return parse_datetime(value)
    except ValueError as exc:
        check(name, str(exc) if isinstance(value, str) else f"expected a string holding {DATETIME_RULE}")
        return None


def whole_number(value):
    """A JSON number that is whole (``2`` or ``2.0``: JSON Schema counts both as
    integers, and so do generated clients) -> that int; anything else -> None."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _json_type(value):
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


MAX_BATCH = 1000


def parse_batch(body):
    """``{"Events": [...]}`` -> [(index, EventId, the item: a PUT body plus its EventId)], or
    Problem(400) when the body is not of that shape (checked before authorization)."""
    def shape_error(field, message):
        return bad_request("The body must be {\"Events\": [1-1000 events, each with its EventId]}.",
                           [field_error(field, message)])

    if not isinstance(body, dict):
        raise shape_error("body", f"expected an object, got {_json_type(body)}")
    unknown = [name for name in body if name != "Events"]
    if unknown:
        raise shape_error(unknown[0], "unknown field; the only accepted field is Events")
    items = body.get("Events")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_BATCH:
        raise shape_error("Events", f"expected an array of 1-{MAX_BATCH} events")
    batch = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("EventId"), str):
            raise shape_error(f"Events[{index}]", "expected an object with a string EventId")
        batch.append((index, item["EventId"], item))
    return batch


def batch_errors(index, event_id, errors):
    return [{"index": index, "EventId": event_id, **error} for error in errors]


def unknown_fields(body, accepted, prefix=""):
    """The errors of the fields of ``body`` (a dict) not among ``accepted``;
    ``prefix``: where the body stands in the request ("Webhook/", say)."""
    return [field_error(prefix + name, "unknown field; accepted fields are " + ", ".join(accepted))
            for name in body if name not in accepted]


PROGRAM_FIELDS = ("Name", "RegisteredEventTypesOnly")


def validate_program_body(body):
    """``{"Name": "...", "RegisteredEventTypesOnly": true|false|null}`` -> (name,
    the setting or None to keep it), or Problem(400)."""
    require_object(body)
    errors = unknown_fields(body, PROGRAM_FIELDS)
    name, strict = body.get("Name"), body.get("RegisteredEventTypesOnly")
    message = "is required" if name is None else _text_error(name, 1, 200, allow_controls=False)
    if message:
        errors.append(field_error("Name", message))
    if strict is not None and not isinstance(strict, bool):
        errors.append(field_error("RegisteredEventTypesOnly", f"expected true or false, got {_json_type(strict)}"))
    if errors:
        raise bad_request("The program is not valid; see errors.", errors)
    return name, strict


def event_type_error(event_type):
    """What is wrong with an EventType (docs/API.md §3), or None."""
    return _text_error(event_type, 1, 100, allow_controls=False)


# Line feed and tab are the control characters a description may hold.
DESCRIPTION_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def description_error(value):
    """What is wrong with a Description (of a type, of a subscription), or None."""
    message = _text_error(value, 1, 2000)
    if not message and DESCRIPTION_CONTROL_RE.search(value):
        message = "must not contain control characters other than line feed and tab"
    return message
EVENT_TYPE_FIELDS = ("Description", "Schema", "RetainDays")
MAX_RETAIN_DAYS = 36500
MAX_SCHEMA_DEPTH = 64  # a Schema's nesting: checking and compiling it recurse
class _Absent:
    def __repr__(self):
        return "ABSENT"


ABSENT = _Absent()  # a field a body leaves out: a change keeps its value (null is another thing: it removes)


@dataclass(frozen=True)
class EventTypeChange:
    """What a ``PUT /event-types/{EventType}`` asks for (docs/API.md §5a, §5b): each
    field ABSENT (keep it), None (remove it; never for the description), or a value."""

    description: object = ABSENT
    schema: object = ABSENT       # the parsed schema (a dict)
    schema_text: str | None = None  # as it is stored: compact JSON in the client's key order
    canonical: str | None = None    # one spelling, to compare with the current schema
    retain_days: object = ABSENT


def validate_event_type_body(body):
    """``{"Description", "Schema", "RetainDays"}`` (each optional; Description is
    needed to register a type, which the write checks) -> EventTypeChange, or
    Problem(400) naming each bad field; 503 for a Schema when the validator's
    packages are missing."""
    require_object(body)
    errors = unknown_fields(body, EVENT_TYPE_FIELDS)
    description = body.get("Description", ABSENT)
    if description is None:
        description = ABSENT  # a description cannot be removed: null counts as absent
    if description is not ABSENT and (message := description_error(description)):
        errors.append(field_error("Description", message))
    retain_days = body.get("RetainDays", ABSENT)
    if retain_days not in (ABSENT, None):
        given, retain_days = retain_days, whole_number(retain_days)
        if retain_days is None or not 1 <= retain_days <= MAX_RETAIN_DAYS:
            errors.append(field_error("RetainDays", f"expected a whole number of days from 1 to {MAX_RETAIN_DAYS}, "
                                                    f"or null, got {json_text(given)[:40]}"))
    schema, schema_text, canonical = body.get("Schema", ABSENT), None, None
    if schema not in (ABSENT, None) and json_depth(schema) > MAX_SCHEMA_DEPTH:
        errors.append(field_error("Schema", f"nested more than {MAX_SCHEMA_DEPTH} levels deep"))
    elif schema not in (ABSENT, None):
        schema_text, canonical = json_text(schema), canonical_json(schema)
        try:
            check_schema(schema, len(canonical.encode("utf-8")))
        except Problem as problem:
            if problem.status != 400:
                raise
            errors += problem.errors
    if errors:
        raise bad_request("The event type is not valid; see errors.", errors)
    return EventTypeChange(description, schema, schema_text, canonical, retain_days)


def parse_dry_run(pairs):
    """``?dryRun=true|false`` -> bool, or Problem(400)."""
    errors = [field_error(name, "unknown parameter; the only accepted parameter is dryRun")
              for name, _ in pairs if name != "dryRun"]
    values = [value for name, value in pairs if name == "dryRun"]
    if len(values) > 1:
        errors.append(field_error("dryRun", "given more than once"))
    elif values and values[0] not in ("true", "false"):
        errors.append(field_error("dryRun", "expected true or false"))
    if errors:
        raise bad_request("The query is not valid; see errors.", errors)
    return values == ["true"]


# --- Representations ------------------------------------------------------------

def render_event(row):
    """An EventRow -> its JSON representation (docs/API.md §3) as text: the stored
    doc (or, for a tombstone, what it keeps) plus the bookkeeping members."""
    seq, event_id, program_id, event_type, doc, revision, created_us, updated_us = row
    if doc is None:
        doc = (f'{{"EventId":{json_text(event_id)},"ProgramId":{json_text(program_id)},'
               f'"EventType":{json_text(event_type)},"Deleted":true')
    return (f'{doc},"Revision":{revision},"Sequence":{seq},"CreatedUTC":"{format_datetime(created_us)}",'
            f'"UpdatedUTC":"{format_datetime(updated_us)}"}}')


# --- Conditional request headers ----------------------------------------------

def etag(revision):
    return f'"{revision}"'


ENTITY_TAG_RE = re.compile(r'[ \t]*(W/)?("[\x21\x23-\x7e]*")[ \t]*(,|$)')


def parse_etags(name, header):
    """``If-Match``/``If-None-Match`` value -> None (no condition), "*", or a set
    of ``(weak, opaque_tag)`` pairs (RFC 9110 §8.8.3); Problem(400) when it is
    neither ``*`` nor a list of entity-tags."""
    if header is None or not header.strip(" \t"):  # an empty header is no condition
        return None
    if header.strip(" \t") == "*":
        return "*"
    tags, position = set(), 0
    while position < len(header):
        found = ENTITY_TAG_RE.match(header, position)
        if not found or (found.group(3) == "," and found.end() == len(header)):
            raise bad_request(f"{name} is not valid.", [field_error(
                name, 'expected * or a comma-separated list of entity tags such as "3" or W/"3"')])
        tags.add((bool(found.group(1)), found.group(2)))
        position = found.end()
    return tags


def strong_match(tags, current):
    """If-Match compares strongly: a weak tag never matches (RFC 9110 §13.1.1)."""
    return tags == "*" or (False, current) in tags


def weak_match(tags, current):
    """If-None-Match compares weakly: ``W/"2"`` matches ``"2"`` (RFC 9110 §13.1.2)."""
    return tags == "*" or any(opaque == current for _, opaque in tags)


@dataclass(frozen=True)
class Preconditions:
    if_match: object = None       # None, "*" or a set of (weak, tag) pairs (parse_etags)
    if_none_match: object = None

    def __bool__(self):
        return self.if_match is not None or self.if_none_match is not None

    def check(self, live_revision):
        """Raise 412 unless the headers hold for the event's current live revision
        (None when there is no live event)."""
        current = None if live_revision is None else etag(live_revision)
        if self.if_match is not None:
            if current is None or not strong_match(self.if_match, current):
                raise Problem(412, "If-Match does not name the event's current revision (as a strong ETag).")
        if self.if_none_match is not None and current is not None:
            if weak_match(self.if_none_match, current):
                raise Problem(412, "If-None-Match: the event exists with a matching revision.")


# --- Feed queries -------------------------------------------------------------

FEED_PARAMETERS = ("ProgramId", "EventType", "ProgramMemberId", "ReferenceEventId",
                   "EventStartFromUTC", "EventStartBeforeUTC", "after", "limit", "wait")
REPEATABLE = ("ProgramId", "EventType")
MAX_REPEATED = 100  # values of one repeatable parameter: each one is an index range to walk
MAX_LIMIT = 1000
MAX_WAIT = 30
MAX_SEQUENCE = 2**63 - 1  # a Sequence is a signed 64-bit integer on both backends


def _whole_number(name, text, low, high, errors):
    if not re.fullmatch(r"[0-9]{1,19}", text) or not low <= int(text) <= high:
        errors.append(field_error(name, f"expected a whole number from {low} to {high}"))
        return None
    return int(text)


AFTER_NOW = "now"  # after=now: the feed's head (feed_cursor() turns it into that Sequence)


def query_values(pairs, accepted, errors, repeatable=()):
    """Query pairs -> {name: value, or a list of values for a ``repeatable`` name};
    an unknown name, or one given twice that is not repeatable, goes to ``errors``."""
    values = {}
    for name, value in pairs:
        if name not in accepted:
            errors.append(field_error(name, "unknown parameter; accepted: " + ", ".join(accepted)))
        elif name in repeatable:
            values.setdefault(name, []).append(value)
        elif name in values:
            errors.append(field_error(name, "given more than once"))
        else:
            values[name] = value
    return values


def parse_feed_query(pairs):
    """Query string pairs of ``GET /events`` -> FeedQuery, or Problem(400). Its
    ``after`` may be AFTER_NOW, until feed_cursor() reads the head."""
    errors = []
    values = query_values(pairs, FEED_PARAMETERS, errors, REPEATABLE)
    for name in REPEATABLE:
        if len(values.get(name, ())) > MAX_REPEATED:
            errors.append(field_error(name, f"at most {MAX_REPEATED} values, got {len(values[name])}"))
            values[name] = []
    errors += filter(None, map(program_id_error, values.get("ProgramId", ())))
    times = {}
    for name in ("EventStartFromUTC", "EventStartBeforeUTC"):
        if name in values:
            try:
                times[name] = parse_datetime(values[name])
            except ValueError as exc:
                errors.append(field_error(name, str(exc)))
    after = AFTER_NOW if values.get("after") == AFTER_NOW else _whole_number(
        "after", values.get("after", "0"), 0, MAX_SEQUENCE, errors)
    limit = _whole_number("limit", values.get("limit", "100"), 1, MAX_LIMIT, errors)
    wait = _whole_number("wait", values.get("wait", "0"), 0, MAX_WAIT, errors)
    if errors:
        raise bad_request("The query is not valid; see errors.", errors)
    return FeedQuery(
        programs=tuple(dict.fromkeys(values.get("ProgramId", ()))),
        event_types=tuple(dict.fromkeys(values.get("EventType", ()))),
        member_id=values.get("ProgramMemberId"),
        ref_event_id=values.get("ReferenceEventId"),
        start_from_us=times.get("EventStartFromUTC"),
        start_before_us=times.get("EventStartBeforeUTC"),
        after=after, limit=limit, wait=wait,
    )


def parse_event_types_query(pairs):
    """Query string pairs of ``GET /event-types`` -> the ProgramIds asked for
    (without repeats; empty for none), or Problem(400)."""
    errors = [field_error(name, "unknown parameter; the only accepted parameter is ProgramId")
              for name, _ in pairs if name != "ProgramId"]
    given = [value for name, value in pairs if name == "ProgramId"]
    if len(given) > MAX_REPEATED:  # counted as sent, repeats too: the limit is on the query's size
        errors.append(field_error("ProgramId", f"at most {MAX_REPEATED} values, got {len(given)}"))
    programs = list(dict.fromkeys(given))
    errors += filter(None, map(program_id_error, programs))
    if errors:
        raise bad_request("The query is not valid; see errors.", errors)
    return programs


# ============================================================================
# Opening the storage
# ============================================================================
#
# The handlers and the command line speak to one storage interface
# (eventstore_storage.py); SQL lives only behind it, in eventstore_sqlite.py
# (the default, standard library only) and eventstore_pg.py (for several
# servers on one database), chosen by open_storage() from the database's name.

def open_storage(db, busy_timeout_ms=5000, threads=None):
    """A database name -> its storage: a ``postgresql://`` URL is PostgreSQL
    (eventstore_pg, which needs psycopg; ``threads``, the server's, sizes its
    connection pool), anything else a SQLite file; a storage object is
    returned as it is."""
    if not isinstance(db, (str, os.PathLike)):
        return db
    if str(db).startswith(POSTGRES_SCHEMES):
        try:
            import eventstore_pg
        except ImportError as exc:
            raise StorageOpenError(f"PostgreSQL needs psycopg ({exc}); install it with: "
                                   "pip install -r requirements-postgres.txt") from None
        return eventstore_pg.PostgresStorage(str(db), busy_timeout_ms=busy_timeout_ms, threads=threads)
    return SQLiteStorage(db, busy_timeout_ms)


# ============================================================================
# Cursors
# ============================================================================
#
# A Sequence a client gives (the feed's ``after``, a subscription's StartFrom and
# Through) is checked against the largest Sequence committed: past it, no change
# can ever come, and a consumer waiting there would miss every change below it
# (docs/API.md §4, cursor hygiene). On PostgreSQL that limit may be ahead of the
# head, the largest Sequence the feed may serve now; a cursor between the two
# is valid.

def check_cursor(reads, field, sequence):
    """Problem 400 naming the head (``"Head"`` in the problem, ``field`` in its
    errors) when ``sequence`` is past the largest Sequence committed."""
    if not sequence:
        return
    limit = reads.last_committed_sequence()
    if sequence > limit:
        head = reads.last_sequence()
        raise Problem(400, f"{field} {sequence} is past the feed's head, {head}: no change has that Sequence. "
                           f"A mistyped cursor, or one kept from before a restore of an older backup? Go on from "
                           f"{head} to see what happens from now on, or from an earlier Sequence (0: everything).",
                      [field_error(field, f"expected a Sequence of at most {limit}, the largest committed")],
                      Head=head)


def feed_cursor(reads, after):
    """A feed query's ``after`` -> the Sequence to read after: AFTER_NOW is the
    head; a Sequence past the largest committed one is a 400 (check_cursor)."""
    if after == AFTER_NOW:
        return reads.last_sequence()
    check_cursor(reads, "after", after)
    return after


# ============================================================================
# Write rules
# ============================================================================
#
# What a write must respect, whatever the backend, over a Transaction (or, for
# checks made before one, a Reads): the 404s and 412s, the type rule, what a
# batch, a delete, an erasure and an import do. The handlers and the command
# line's import both write through them.

# --- Programs and event types ----------------------------------------------------

MAX_TYPES_NAMED = 20  # an error for an unregistered type names at most this many registered ones


def unregistered_type_error(reads, program_id, event_type):
    """The EventType error entry for a program that takes registered types only."""
    registered, count = reads.registered_types(MAX_TYPES_NAMED + 1)
    if not registered:
        known = "no type is registered yet"
    elif count <= MAX_TYPES_NAMED:
        known = "registered: " + ", ".join(registered)
    else:
        known = f"{count} types are registered (GET /event-types lists them)"
    return field_error("EventType", f"{event_type!r} is not a registered event type, and program "
                                    f"{program_id!r} takes registered types only; {known}")


def unregistered_type_errors(rules, events):
    """[(index or None, event_id, program_id, event_type)] -> the error entries of
    those whose program takes registered types only (by ``rules``, a TypeRules)
    and whose type is not registered (for a batch, with the item's index and EventId)."""
    errors = []
    for index, event_id, program_id, event_type in events:
        if not rules.type_allowed(program_id, event_type):
            error = unregistered_type_error(rules.reads, program_id, event_type)
            errors += [error] if index is None else batch_errors(index, event_id, [error])
    return errors


def unregister_event_type(tx, event_type):
    """Problem 404 when it is not registered, 409 while a program that takes
    registered types only has live events of it (docs/API.md §5a); before writing.
    The type is locked first: a write of it in progress elsewhere (PostgreSQL)
    commits before the check, and one after it sees the type gone."""
    if not tx.lock_event_type(event_type):
        raise Problem(404, f"Event type {event_type!r} is not registered.")
    users = tx.strict_users_of_type(event_type)
    if users:
        named = ", ".join(f"{program_id} ({events} events)" for program_id, events in users[:MAX_TYPES_NAMED])
        raise Problem(409, f"Event type {event_type!r} cannot be unregistered: programs that take registered "
                           f"types only have live events of it: {named}. Delete those events or let the "
                           "programs take any type first.")
    tx.delete_event_type(event_type)


# --- Schemas (docs/API.md §5b) -------------------------------------------------------

def compiled_schema(schemas, reads, event_type, version):
    """The CompiledSchema of a type's schema version, from this process's cache."""
    return schemas.compiled(event_type, version, lambda: json.loads(reads.type_schema(event_type, version).schema))


def precheck(schemas, reads, event):
    """Validate ``event`` before its transaction against the version of its type's
    schema this process saw last -> ``(version, violations)`` for the write to
    reuse if that version is still in force, or None (the write validates)."""
    version = schemas.latest.get(event.event_type, ABSENT)
    if version is ABSENT:
        return None
    if version is None:
        return None, []
    return version, compiled_schema(schemas, reads, event.event_type, version).violations(event.data)


def schema_violations(tx, schemas, event, checked=None):
    """The violations of ``event``'s EventData against its type's schema in force in
    ``tx`` (empty without one): ``checked`` (precheck's) when it was made against that
    version, else validated now."""
    version = tx.rules.schema_version(event.event_type)
    schemas.seen(event.event_type, version)
    if version is None:
        return []
    if checked is not None and checked[0] == version:
        return checked[1]
    return compiled_schema(schemas, tx, event.event_type, version).violations(event.data)


def prove_schema(compiled, events, limit=MAX_LISTED):
    """A schema's proof on the data: ``events`` (LiveEvents) -> (up to ``limit``
    violations, each {"EventId", "field", "message"}; how many events do not validate)."""
    violations, total = [], 0
    for event in events:
        found = compiled.violations(json.loads(event.doc + "}")["EventData"], limit)
        if found:
            total += 1
            violations += [{"EventId": event.event_id, **error} for error in found[:limit - len(violations)]]
    return violations, total


def incompatible(event_type, violations, total):
    return Problem(409, f"{total} live events of type {event_type!r} do not validate against the new Schema; "
                        "nothing was changed. Violations lists the first of them.",
                   Violations=violations, Total=total)


def change_event_type(tx, event_type, change, compiled=None, proved_through=None):
    """Apply an EventTypeChange (validated; ``compiled``: its schema's CompiledSchema)
    in ``tx``: register the type or change it. A new or changed schema is proved on
    every live event of the type (those above Sequence ``proved_through`` only, when
    a proof from a snapshot with that head found the others valid): Problem 409 when
    any does not validate. Every check before any write."""
    registered = tx.lock_event_type(event_type)
    if not registered and change.description is ABSENT:
        raise bad_request("The event type is not registered; registering it needs a Description.",
                          [field_error("Description", "is required to register a type")])
    new_schema = change.schema not in (ABSENT, None) and not same_schema(tx, event_type, change) and change
    if new_schema:
        violations, total = prove_schema(compiled, tx.live_events_of_type(event_type, proved_through or 0)[1])
        if total:
            raise incompatible(event_type, violations, total)
    if change.description is not ABSENT:
        tx.register_event_type(event_type, change.description)
    if new_schema or (change.schema is None and tx.rules.schema_version(event_type) is not None):
        tx.set_type_schema(event_type, new_schema.schema_text if new_schema else None)
    if change.retain_days is not ABSENT:
        tx.set_retain_days(event_type, change.retain_days)


def put_event_type(reads, write, event_type, change, dry_run=False):
    """Register or change a type (docs/API.md §5a, §5b): ``change`` an EventTypeChange,
    ``write(work)`` runs ``work(tx)`` in a durable write transaction -> the entry's
    JSON text; with ``dry_run``, the proof's report (a dict) and nothing changed.

    A new schema is proved on the type's live events first from a snapshot, outside
    the write lock (a 409 costs other writes nothing), and then, in the write
    transaction, only on the events changed since that snapshot: other writes wait
    for those, not for the whole proof."""
    if change.description is ABSENT and reads.type_state(event_type) is None:
        raise bad_request("The event type is not registered; registering it needs a Description.",
                          [field_error("Description", "is required to register a type")])
    compiled, violations, total, proved_through = None, [], 0, None
    if change.schema not in (ABSENT, None):
        compiled = CompiledSchema(change.schema)
        if not same_schema(reads, event_type, change):
            proved_through, events = reads.live_events_of_type(event_type)
            violations, total = prove_schema(compiled, events)
    if dry_run:
        return {"Compatible": total == 0, "Violations": violations, "Total": total}
    if total:
        raise incompatible(event_type, violations, total)

    def register(tx):
        change_event_type(tx, event_type, change, compiled, proved_through)
        return tx.event_types_json(None, event_type)[1:-1]
    return write(register)


def same_schema(reads, event_type, change):
    """Whether the change's schema is the type's current one (as canonical JSON)."""
    state = reads.type_state(event_type)
    if state is None or state.schema_version is None:
        return False
    current = reads.type_schema(event_type, state.schema_version)
    return canonical_json(json.loads(current.schema)) == change.canonical


# --- Events -------------------------------------------------------------------

def put_event(tx, event, preconditions=None, schemas=None, checked=None):
    """Create, update or replay ``event`` in transaction ``tx``.

    Returns ``(status, revision)``, status "created", "updated" or "unchanged".
    Raises Problem 404 (unregistered program), 400 (a type its program does
    not take, EventData its type's schema refuses) or 412, always before writing.
    ``schemas``: the process's SchemaCache; ``checked``: precheck's outcome.
    """
    return put_event_later(tx, event, preconditions, schemas, checked).get()


def put_event_later(tx, event, preconditions=None, schemas=None, checked=None):
    """put_event, its outcome a Later: the checks and the write now, what
    came of the write when asked (for a group commit's changes, after the
    group's other writes were sent)."""
    if not tx.rules.program_exists(event.program_id):
        raise Problem(404, f"Program {event.program_id!r} is not registered.")
    if not tx.rules.type_allowed(event.program_id, event.event_type):
        raise bad_request("The event is not valid; see errors.",
                          [unregistered_type_error(tx, event.program_id, event.event_type)])
    violations = schema_violations(tx, schemas or SchemaCache(), event, checked)
    if violations:
        listed = f"the first {MAX_LISTED} are listed" if len(violations) >= MAX_LISTED else "see errors"
        raise bad_request(f"The EventData does not validate against the Schema of {event.event_type!r}; "
                          f"{listed}.", violations)
    current = None
    if preconditions:
        current = tx.current(event.event_id)
        preconditions.check(current.revision if current and not current.deleted else None)
    written = tx.upsert_event(event)

    def outcome():
        revision = written()
        if revision is not None:
            return ("created" if revision == 1 else "updated"), revision
        return "unchanged", (current or tx.current(event.event_id)).revision
    return Later(outcome)


def put_events(tx, indexed_events, schemas=None, checked=None):
    """A batch of distinct EventIds, all or nothing: [(index, EventInput)] ->
    [(status, revision)] in order. Raises Problem 404 listing every item of an
    unregistered program, or 400 every item of a type its program does not
    take or whose EventData its type's schema refuses, before writing.
    ``checked``: precheck's outcome per item, in order (or None).

    One lookup per 500 events and two statements run many times, rather than a
    statement per event: the Sequences are handed out here, in request order."""
    unregistered = [(index, event) for index, event in indexed_events
                    if not tx.rules.program_exists(event.program_id)]
    if unregistered:
        raise Problem(404, f"{len(unregistered)} events name an unregistered program; nothing was written.",
                      [e for index, event in unregistered for e in batch_errors(
                          index, event.event_id, [field_error("ProgramId", f"{event.program_id!r} is not registered")])])
    wrong_types = unregistered_type_errors(tx.rules, [(index, event.event_id, event.program_id, event.event_type)
                                                     for index, event in indexed_events])
    schemas = schemas or SchemaCache()
    invalid = [error for (index, event), item_checked in zip(indexed_events, checked or [None] * len(indexed_events))
               for error in batch_errors(index, event.event_id, schema_violations(tx, schemas, event, item_checked))]
    if wrong_types or invalid:
        failing = len({error["index"] for error in wrong_types + invalid})
        raise bad_request(f"{failing} events name a type their program does not take or do not validate against "
                          "their type's Schema; nothing was written.",
                          sorted(wrong_types + invalid, key=lambda error: error["index"]))
    events = [event for _, event in indexed_events]
    current = tx.current_many([event.event_id for event in events])
    inserts, updates, results = [], [], []
    for event in events:
        found = current.get(event.event_id)
        if found and not found.deleted and bytes(found.content_hash) == event.content_hash:
            results.append(("unchanged", found.revision))
            continue
        (updates if found else inserts).append((event, tx.take_seq()))
        results.append(("updated", found.revision + 1) if found else ("created", 1))
    tx.insert_events(inserts)
    tx.update_events(updates)
    return results


def delete_event(tx, event_id, preconditions=None):
    """Turn a live event into a tombstone. Returns the new revision. Raises
    Problem 404 or 412, before writing."""
    revision = tx.live_revision(event_id)
    if revision is None:
        raise Problem(404, f"Event {event_id!r} does not exist.")
    if preconditions:
        preconditions.check(revision)
    return tx.tombstone(event_id)


def erase_member(tx, program_id, member_id):
    """Tombstone every live event of one member in one program, each with its own
    new Revision and Sequence (erase_events, which retention shares). Returns how
    many. Raises Problem 404 before writing."""
    if not tx.rules.program_exists(program_id):
        raise Problem(404, f"Program {program_id!r} is not registered.")
    return erase_events(tx, tx.member_event_ids(program_id, member_id))


def import_tombstone(tx, event_id, event_type):
    """Apply an exported tombstone: delete the live event, or record the tombstone
    of an event this database never had, so an export/import round trip keeps
    every deletion. Returns "deleted" or "already deleted"."""
    current = tx.current(event_id)
    if current is None:
        tx.insert_tombstone(event_id, program_of(event_id), event_type)
        return "deleted"
    if current.deleted:
        return "already deleted"
    tx.tombstone(event_id)
    return "deleted"


# ============================================================================
# Authentication
# ============================================================================
#
# Basic credentials, API keys (only their SHA-256 is stored), users and grants.
# EventStore.authenticate puts them together with the throttle on failed
# attempts (eventstore_throttle.py).

def unauthorized():
    """The one 401 for every kind of bad credential. A new exception each time:
    re-raising one shared instance grows its traceback chain (frames, environ)
    with every raise, without bound."""
    return Problem(401, "Valid credentials are required: HTTP Basic authentication with your user id and API key.",
                   headers=[("WWW-Authenticate", REALM)])


def parse_basic_auth(header):
    """``Authorization`` header value -> ``(user_id, api_key)``, or None if malformed.

    RFC 7617: case-insensitive scheme, base64 of UTF-8 ``user-id ":" password``
    split at the first colon.
    """
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    user_id, colon, api_key = decoded.partition(":")
    if not colon or not user_id or not api_key:
        return None
    return user_id, api_key


def hash_key(api_key):
    return hashlib.sha256(api_key.encode("utf-8")).digest()


_DUMMY_HASH = hash_key("esk_" + "0" * 43)


@dataclass(frozen=True)
class Principal:
    """An authenticated user and what it may do."""

    user_id: str
    is_system: bool
    grants: dict = field(default_factory=dict)  # program_id -> "read" | "write"

    def may(self, access, program_id):
        if self.is_system:
            return True
        granted = self.grants.get(program_id)
        return granted == "write" or (granted == "read" and access == "read")


def authenticate(reads, user_id, api_key, now, touch):
    """``(user_id, api_key)`` -> Principal, or None for any kind of bad credential.

    Takes the same steps for every failure (a hash and a constant-time compare),
    so neither the answer nor its timing tells which part was wrong. A key's last
    use is recorded, to the minute, by ``touch(key_id, now)``.
    """
    key = reads.key_row(api_key[:KEY_ID_LENGTH]) if API_KEY_RE.fullmatch(api_key) else None
    stored = bytes(key.key_hash) if key else _DUMMY_HASH
    hash_ok = hmac.compare_digest(stored, hash_key(api_key))
    if not (key and hash_ok and key.user_id == user_id and key.revoked_us is None and not key.disabled):
        return None
    if key.last_used_us is None or now - key.last_used_us > 60_000_000:
        touch(api_key[:KEY_ID_LENGTH], now)
    return Principal(key.user_id, key.is_system, reads.grants_of(key.user_id))


def new_api_key():
    return "esk_" + secrets.token_urlsafe(32)


def add_key(tx, user_id):
    """Create a key for ``user_id``; returns the key, which is never stored."""
    api_key = new_api_key()
    tx.insert_key(api_key[:KEY_ID_LENGTH], user_id, hash_key(api_key))
    return api_key


def add_user(tx, user_id, is_system, grants):
    """Create a user with ``grants`` ({program_id: access}) and its first key."""
    tx.insert_user(user_id, is_system)
    tx.set_grants(user_id, grants)
    return add_key(tx, user_id)


def bootstrap_admin(session, now):
    """On a database with no users, create the SYSTEM user ``admin`` and return its
    key; otherwise None."""
    if session.any_user():
        return None  # checked before taking the write lock, which a read-only file refuses
    with session.transaction(now) as tx:
        if tx.any_user():
            return None
        return add_user(tx, "admin", True, {})


def admin_command(db):
    """The command line that administers ``db``, as this process would run it:
    this interpreter and eventstore.py, each shown relative to the current
    folder where it is inside it (``.venv/bin/python eventstore.py --db events.db``)."""
    def shown(path):
        relative = os.path.relpath(path)
        return path if relative.startswith(os.pardir) else relative
    return shlex.join([shown(sys.executable), shown(str(HERE / "eventstore.py")), "--db", safe_db_name(db)])


def warn_if_no_users(storage):
    """Every request to a database without users is a 401: say how to make the
    first (serve.py makes it itself before it makes the app)."""
    try:
        session = storage.session()
        try:
            empty = not session.any_user()
        finally:
            session.close()
    except storage.errors:
        return  # the app answers what is wrong with the database
    if empty:
        log.warning("%s has no users: every request is a 401 until one is made: %s user add admin --system",
                    safe_db_name(storage), admin_command(storage))


def readable_programs(principal):
    """Every program the principal may read: None (all) for SYSTEM."""
    return None if principal.is_system else sorted(principal.grants)


# ============================================================================
# Subscriptions
# ============================================================================
#
# A subscription is a named, durable position in the feed with a filter
# (docs/API.md §4a). It is read as the feed is read: read_feed from its
# Position, with its filter and its owner's grants of the moment (and
# EventStore.wait_for_feed's long polls); reading never moves it. Its changes,
# an acknowledgement among them, go through the group-commit writer as any
# write does, so a 200 means committed and fsynced, and they are decided inside
# their write transaction, on the row locked there: they take effect in commit
# order. Behind is the feed's own walk, counted (Reads.feed_backlog) and
# bounded: it costs what a page costs, whatever the lag.

SUBSCRIPTION_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
SUBSCRIPTION_NAME_RULE = "a subscription name: 1-64 characters of A-Z a-z 0-9 _ -"
SUBSCRIPTION_FIELDS = ("Filter", "StartFrom", "Description", "Webhook")
FILTER_FIELDS = ("ProgramId", "EventType")
WEBHOOK_FIELDS = ("Url", "MaxEvents", "TimeoutSeconds", "Active")
ACK_FIELDS = ("Through", "Rewind")
SUBSCRIPTION_READ_PARAMETERS = ("limit", "wait")
MAX_BEHIND = 1000  # Behind is counted exactly up to this many changes
START_FROM_RULE = 'expected "beginning", "now", {"Sequence": n} or {"TimeUTC": "2026-03-01T09:30:00Z"}'


class SubscriptionChange(NamedTuple):
    """A ``PUT /subscriptions/{Name}`` body, validated; ABSENT for each field left out."""

    filter: object       # (ProgramIds, EventTypes), each a tuple, empty for every
    start_from: object   # "beginning", "now", ("Sequence", n) or ("TimeUTC", microseconds)
    description: object  # the text, or None (no description)
    webhook: object = ABSENT  # a WebhookChange, or None (no webhook)


class WebhookChange(NamedTuple):
    """A PUT's ``Webhook`` (docs/API.md §11), given whole: Url, MaxEvents and
    TimeoutSeconds (defaults for the absent ones); ``active`` True, False or None
    (not given: the state is kept)."""

    url: str
    max_events: int
    timeout_seconds: int
    active: bool | None


# --- Bodies and queries ----------------------------------------------------------

def subscription_name_error(name):
    """The error entry for a name outside the rule, or None."""
    if SUBSCRIPTION_NAME_RE.fullmatch(name):
        return None
    return field_error("Name", f"{name!r} is not {SUBSCRIPTION_NAME_RULE}")


def validate_subscription_body(body, allow_hosts=()):
    """A parsed ``PUT /subscriptions/{Name}`` body -> SubscriptionChange, or
    Problem(400) listing every problem. ``null`` clears Description, sets
    Filter to every program and type, and removes the Webhook; a null StartFrom
    counts as absent. ``allow_hosts``: the hosts a webhook may reach over http://
    besides loopback (--webhook-allow-host)."""
    require_object(body)
    errors = unknown_fields(body, SUBSCRIPTION_FIELDS)
    change = SubscriptionChange(
        filter=ABSENT if "Filter" not in body else _subscription_filter(body["Filter"], errors),
        start_from=_start_from(body.get("StartFrom"), errors),
        description=ABSENT if "Description" not in body else _subscription_description(body["Description"], errors),
        webhook=ABSENT if "Webhook" not in body else _webhook(body["Webhook"], errors, allow_hosts))
    if errors:
        raise bad_request("The subscription is not valid; see errors.", errors)
    return change


def _webhook(value, errors, allow_hosts):
    """A PUT's Webhook -> WebhookChange, or None (null: no webhook). The Url's form
    is checked here (a 400); who may reach its host, by the handler (a 403)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        errors.append(field_error("Webhook", f'expected an object {{"Url": "https://...", ...}} or null, '
                                             f"got {_json_type(value)}"))
        return None
    errors += unknown_fields(value, WEBHOOK_FIELDS, "Webhook/")
    url = value.get("Url")
    problem = "is required" if url is None else url_error(url, allow_hosts)
    if problem:
        errors.append(field_error("Webhook/Url", problem))
    numbers = []
    for name, (low, high, default) in (("MaxEvents", MAX_EVENTS), ("TimeoutSeconds", TIMEOUT_SECONDS)):
        number = whole_number(value.get(name, default))
        if number is None or not low <= number <= high:
            errors.append(field_error(f"Webhook/{name}", f"expected a whole number from {low} to {high}"))
        numbers.append(number)
    active = value.get("Active")
    if "Active" in value and not isinstance(active, bool):
        errors.append(field_error("Webhook/Active", f"expected true or false, got {_json_type(active)}"))
    return WebhookChange(url, *numbers, active)


def _subscription_filter(value, errors):
    if value is None:
        return (), ()
    if not isinstance(value, dict):
        errors.append(field_error("Filter", f'expected an object {{"ProgramId": [...], "EventType": [...]}}, '
                                            f"got {_json_type(value)}"))
        return (), ()
    errors += unknown_fields(value, FILTER_FIELDS, "Filter/")
    programs = _filter_list("ProgramId", value.get("ProgramId"), errors,
                            lambda program_id: None if PROGRAM_ID_RE.fullmatch(program_id) else f"is not {PROGRAM_ID_RULE}")
    return programs, _filter_list("EventType", value.get("EventType"), errors, event_type_error)


def _filter_list(name, values, errors, rule):
    """A Filter list -> its values without repeats, in order (null: none)."""
    field_name = f"Filter/{name}"
    if values is None:
        return ()
    if not isinstance(values, list) or not all(isinstance(value, str) for value in values):
        errors.append(field_error(field_name, "expected a list of strings"))
        return ()
    if len(values) > MAX_REPEATED:
        errors.append(field_error(field_name, f"at most {MAX_REPEATED} values, got {len(values)}"))
        return ()
    errors += [field_error(field_name, f"{value!r} {message}") for value in values
               for message in [rule(value)] if message]
    return tuple(dict.fromkeys(values))


def _start_from(value, errors):
    if value is None:
        return ABSENT
    if value in ("beginning", "now"):
        return value
    if isinstance(value, dict) and len(value) == 1:
        (form, given), = value.items()
        if form == "Sequence":
            if (sequence := _sequence(given)) is not None:
                return form, sequence
            errors.append(field_error("StartFrom/Sequence", f"expected a whole number from 0 to {MAX_SEQUENCE}"))
            return ABSENT
        if form == "TimeUTC":
            moment = _parse_field_datetime("StartFrom/TimeUTC", given, lambda name, message: errors.append(
                field_error(name, message)))
            return ABSENT if moment is None else (form, moment)
    errors.append(field_error("StartFrom", START_FROM_RULE))
    return ABSENT


def _sequence(value):
    """A JSON number that is a Sequence -> that int, or None."""
    value = whole_number(value)
    return value if value is not None and 0 <= value <= MAX_SEQUENCE else None


def _subscription_description(value, errors):
    if value is not None and (message := description_error(value)):
        errors.append(field_error("Description", message))
    return value


def validate_ack_body(body):
    """``{"Through": n, "Rewind": true|false}`` -> (n, rewind), or Problem(400)."""
    require_object(body)
    errors = unknown_fields(body, ACK_FIELDS)
    through, rewind = _sequence(body.get("Through")), body.get("Rewind")
    if through is None:
        errors.append(field_error("Through", "is required" if body.get("Through") is None else
                                  f"expected a Sequence: a whole number from 0 to {MAX_SEQUENCE}"))
    if rewind is not None and not isinstance(rewind, bool):
        errors.append(field_error("Rewind", f"expected true or false, got {_json_type(rewind)}"))
    if errors:
        raise bad_request("The acknowledgement is not valid; see errors.", errors)
    return through, bool(rewind)


def parse_subscription_read_query(pairs):
    """Query pairs of ``GET /subscriptions/{Name}/events`` -> (limit, wait), or Problem(400)."""
    errors = []
    values = query_values(pairs, SUBSCRIPTION_READ_PARAMETERS, errors)
    limit = _whole_number("limit", values.get("limit", "100"), 1, MAX_LIMIT, errors)
    wait = _whole_number("wait", values.get("wait", "0"), 0, MAX_WAIT, errors)
    if errors:
        raise bad_request("The query is not valid; see errors.", errors)
    return limit, wait


# --- Who sees a subscription, and what it reads ------------------------------------

def subscription_visible(user, row):
    """SYSTEM users see every subscription; other users their own."""
    return user.is_system or row.owner == user.user_id


def visible_subscription(reads, user, name):
    """-> the SubscriptionRow named ``name``; Problem 404 when there is none, or it is
    another user's (the same answer: nothing tells them apart)."""
    row = reads.find_subscription(name)
    if row is None or not subscription_visible(user, row):
        raise no_such_subscription(name)
    return row


def no_such_subscription(name):
    return Problem(404, f"There is no subscription {name!r}.")


def principal_of(reads, user_id):
    """A user's Principal, its grants as they are now (a subscription's owner)."""
    user = reads.find_user(user_id)
    return Principal(user.user_id, user.is_system, dict(user.grants))


def readable_by_owner(owner, row):
    """-> (the programs of the subscription its ``owner`` can read now: the
    filter's, or with none named every program it can read, None: all, for
    SYSTEM; those the filter names that it can no longer read)."""
    if not row.programs:
        return readable_programs(owner), []
    denied = unreadable(owner, row.programs)
    return [program_id for program_id in row.programs if program_id not in denied], denied


def unreadable(owner, programs):
    """Those of ``programs`` that ``owner`` may not read."""
    return [program_id for program_id in programs if not owner.may("read", program_id)]


def subscription_programs(owner, row):
    """The programs a read of the subscription reads (readable_by_owner); Problem
    403 when the filter names one the owner can no longer read, or the owner can
    read no program at all."""
    programs, denied = readable_by_owner(owner, row)
    if denied:
        raise Problem(403, f"The subscription's owner {owner.user_id!r} can no longer read "
                           f"{', '.join(denied)}, which its filter names.")
    if programs == []:
        raise Problem(403, f"The subscription's owner {owner.user_id!r} can read no program.")
    return programs


def subscription_backlog(reads, row, owner):
    """The FeedBacklog after the subscription's Position (up to MAX_BEHIND + 1
    changes), in the programs its ``owner`` can read now: a named program it can no
    longer read counts nothing."""
    programs, _ = readable_by_owner(owner, row)
    if programs == []:
        return FeedBacklog(0, None)
    return reads.feed_backlog(programs, FeedQuery(event_types=row.event_types, after=row.position, limit=MAX_BEHIND))


def subscription_backlogs(reads, rows):
    """(row, its FeedBacklog) for each of ``rows``, each owner's grants read once."""
    owners = {}
    for row in rows:
        if row.owner not in owners:
            owners[row.owner] = principal_of(reads, row.owner)
        yield row, subscription_backlog(reads, row, owners[row.owner])


def subscriptions_json(reads, rows):
    """The representations of ``rows`` (docs/API.md §4a), with the head and each
    owner's grants read once."""
    head, rendered = reads.last_sequence(), []
    for row, backlog in subscription_backlogs(reads, rows):
        rendered.append({
            "Name": row.name, "Owner": row.owner, "Description": row.description,
            "Filter": {"ProgramId": list(row.programs), "EventType": list(row.event_types)},
            "Position": row.position, "Head": head, "Behind": min(backlog.changes, MAX_BEHIND),
            "BehindIsExact": backlog.changes <= MAX_BEHIND,
            "PendingSinceUTC": _optional_time(backlog.first_updated_us), "CreatedUTC": format_datetime(row.created_us),
            "LastAckUTC": _optional_time(row.last_ack_us), "Webhook": webhook_json(row.webhook)})
    return rendered


def webhook_json(webhook):
    """A WebhookRow's representation (docs/API.md §11): never its secrets."""
    if webhook is None:
        return None
    return {"Url": webhook.url, "MaxEvents": webhook.max_events, "TimeoutSeconds": webhook.timeout_seconds,
            "State": webhook.state, "LastAttemptUTC": _optional_time(webhook.last_attempt_us),
            "LastStatus": webhook.last_status, "LastError": webhook.last_error,
            "ConsecutiveFailures": webhook.failures, "NextAttemptUTC": _optional_time(webhook.next_attempt_us),
            "DisabledReason": webhook.disabled_reason}


def webhook_programs(reads, row):
    """What a delivery of subscription ``row`` reads now, by its owner's grants
    (subscription_programs); the deliverer's GrantLost, saying why, where a read
    of the subscription would answer 403."""
    try:
        return subscription_programs(principal_of(reads, row.owner), row)
    except Problem as refused:
        raise GrantLost(refused.detail) from None


def _optional_time(micros):
    return None if micros is None else format_datetime(micros)


# --- Changes, in their write transaction ---------------------------------------------

def put_subscription(tx, name, caller, change):
    """Create or change subscription ``name`` for ``caller`` (a Principal), as the
    SubscriptionChange says -> (whether it was created, the SubscriptionRow, the
    secret of a webhook it added, else None). Raises before writing: 400 for a
    StartFrom Sequence past the largest one committed, 409 for a name another
    user holds, 403 when the owner cannot read a program the new filter names."""
    if isinstance(change.start_from, tuple) and change.start_from[0] == "Sequence":
        check_cursor(tx, "StartFrom/Sequence", change.start_from[1])
    current = tx.lock_subscription(name)
    if current is not None and not subscription_visible(caller, current):
        raise name_taken(name)
    owner = caller if current is None or current.owner == caller.user_id else principal_of(tx, current.owner)
    if change.filter is not ABSENT:
        if denied := unreadable(owner, change.filter[0]):
            raise Problem(403, f"The subscription's owner {owner.user_id!r} has no read access to "
                               f"{', '.join(denied)}.")
    kept = current or SubscriptionRow(name, owner.user_id, None, (), (), 0, tx.now, None)
    programs, event_types = (kept.programs, kept.event_types) if change.filter is ABSENT else change.filter
    webhook, secret = changed_webhook(kept.webhook, change)
    if webhook is not None and kept.webhook is not None and (
            (programs, event_types) != (kept.programs, kept.event_types) or change.start_from is not ABSENT):
        webhook = ended_batch(webhook)  # a new Filter or Position ends the batch in progress
        if change.start_from is not ABSENT and webhook.restarts == kept.webhook.restarts:
            webhook = webhook._replace(restarts=webhook.restarts + 1)  # as a Rewind: _r{n} in webhook-id
    row = kept._replace(
        programs=programs, event_types=event_types,
        description=kept.description if change.description is ABSENT else change.description,
        position=kept.position if change.start_from is ABSENT else start_position(tx, change.start_from),
        webhook=webhook)
    if not tx.put_subscription(row):  # another user's, created meanwhile (PostgreSQL: by another server)
        raise name_taken(name)
    return current is None, row, secret


def changed_webhook(webhook, change):
    """A subscription's webhook as a PUT changes it -> (the WebhookRow or None, the
    secret of one just added, else None). A change keeps the secret, the state and
    the failures, unless ``Active`` is given: true restarts it, false pauses it."""
    if change.webhook is ABSENT:
        return webhook, None
    if change.webhook is None:
        return None, None
    given = change.webhook
    if webhook is None:
        webhook = new_webhook(given.url, given.max_events, given.timeout_seconds)
        secret = webhook.secret
    else:
        webhook, secret = webhook._replace(url=given.url, max_events=given.max_events,
                                           timeout_seconds=given.timeout_seconds), None
        if given.active:
            webhook = restarted(webhook)
    if given.active is False:
        webhook = webhook._replace(state=PAUSED, next_attempt_us=None,
                                   disabled_reason='paused by a PUT with "Active": false')
    return webhook, secret


def name_taken(name):
    return Problem(409, f"The name {name!r} is taken by another user's subscription; choose another.")


def start_position(reads, start_from):
    """A StartFrom -> the Position it sets: "beginning" 0, "now" the head, a
    Sequence itself, a time the last change before it (the head for a time to come)."""
    if start_from == "beginning":
        return 0
    if start_from == "now":
        return reads.last_sequence()
    form, value = start_from
    return value if form == "Sequence" else reads.sequence_before(value)


def locked_subscription(tx, name, caller):
    """-> the SubscriptionRow named ``name``, locked until ``tx`` ends; Problem 404
    when ``caller`` sees none of that name."""
    current = tx.lock_subscription(name)
    if current is None or not subscription_visible(caller, current):
        raise no_such_subscription(name)
    return current


def acknowledge_subscription(tx, name, caller, through, rewind):
    """Move subscription ``name``'s Position to ``through`` -> the SubscriptionRow.
    Raises before writing: 400 past the largest Sequence committed, 404, and 409
    for a ``through`` below the Position at this commit, unless ``rewind``."""
    check_cursor(tx, "Through", through)
    current = locked_subscription(tx, name, caller)
    webhook = current.webhook
    if webhook is not None and not rewind:
        raise Problem(409, f"The subscription {name!r} has a webhook, which acknowledges what it delivers; an "
                           'acknowledgement must say "Rewind": true (to deliver again from Through).')
    if through < current.position and not rewind:
        raise Problem(409, f"Through {through} is below the subscription's Position, {current.position}: those "
                           f"changes were acknowledged already. To read again from {through}, send "
                           '"Rewind": true.')
    if webhook is not None:  # a Rewind ends the batch in progress; its redelivery has a webhook-id of its own
        webhook = ended_batch(webhook)._replace(restarts=webhook.restarts + 1)
        tx.set_webhook(name, webhook)
    tx.acknowledge(name, through, tx.now)
    return current._replace(position=through, last_ack_us=tx.now, webhook=webhook)


def rotate_secret(tx, name, caller):
    """A new signing secret for subscription ``name``'s webhook -> (the
    SubscriptionRow, the secret); the old one signs too for 24 hours. 404, or 409
    without a webhook."""
    current = locked_subscription(tx, name, caller)
    if current.webhook is None:
        raise Problem(409, f"The subscription {name!r} has no webhook, so no secret.")
    secret = new_secret()
    webhook = rotated(current.webhook, secret, tx.now)
    tx.set_webhook(name, webhook)
    return current._replace(webhook=webhook), secret


def remove_subscription(tx, name, caller):
    """Delete subscription ``name``; Problem 404 when ``caller`` sees none of that name."""
    locked_subscription(tx, name, caller)
    tx.delete_subscription(name)


# ============================================================================
# Requests and responses
# ============================================================================

@dataclass
class Response:
    """What a handler returns; EventStore.__call__ alone sends it."""

    status: int
    headers: list = field(default_factory=list)
    body: bytes = b""
    content_type: str | None = None


def json_response(value, status=200, headers=()):
    return Response(status, list(headers), _dumps(value), "application/json")


def problem_response(problem, request_id=None):
    """A Problem -> its application/problem+json Response (RFC 9457), with the
    request's id as ``requestId`` so that a user's report can be found in the log."""
    body = problem.to_dict()
    if request_id is not None:
        body["requestId"] = request_id
    return Response(problem.status, problem.headers, _dumps(body), "application/problem+json")


# --- Request ids ----------------------------------------------------------------
#
# Every request has an id: the client's X-Request-Id when it is a safe token
# (a proxy's or a caller's own, so that one id follows a request through every
# log), else one made here. It is echoed in the answer, put in problem bodies,
# left in environ["eventstore.request_id"] for the host's access log, and set
# in REQUEST_ID while the request runs, so that a log formatter (serve.py's)
# writes it in every line logged for that request.

REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._~:@/+=-]{1,128}", re.ASCII)
REQUEST_ID = contextvars.ContextVar("eventstore_request_id", default=None)


def request_id(environ):
    """The client's X-Request-Id when it is a safe token (1-128 letters, digits
    and ``._~:@/+=-``; no space or control character, nothing a log line could be
    forged with), else a new random one."""
    given = environ.get("HTTP_X_REQUEST_ID")
    if given and REQUEST_ID_RE.fullmatch(given):
        return given
    return os.urandom(16).hex()


@dataclass
class Request:
    """What a handler needs: the parsed request, the caller and the app."""

    app: "EventStore"
    method: str
    path: str
    params: dict
    query: list          # [(name, value)] in order, names repeatable
    environ: dict
    user: Principal | None = None

    @property
    def reads(self):
        """The storage's reads for this thread."""
        return self.app.storage.reads()

    def header(self, name):
        key = name.upper().replace("-", "_")
        return self.environ.get(key if key in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + key)

    def require(self, access, program_id):
        """403 unless the caller holds ``access`` on ``program_id``; decided from
        the id alone, before anything is looked up. A SYSTEM user holds every
        right, so an id that names no program is left to validation (400/404)."""
        if self.user.is_system:
            return
        if program_id is None or not self.user.may(access, program_id):
            raise Problem(403, f"This key has no {access} access to program {program_id!r}."
                          if program_id else "This key has no access to that program.")

    def require_system(self):
        if not self.user.is_system:
            raise Problem(403, "Only a SYSTEM user may do this.")

    def preconditions(self):
        return Preconditions(parse_etags("If-Match", self.header("If-Match")),
                             parse_etags("If-None-Match", self.header("If-None-Match")))

    def url(self, path):
        """A path of this app as clients must request it (mount prefix included)."""
        return self.environ.get("SCRIPT_NAME", "").rstrip("/") + path

    def json_body(self):
        """The body as strict JSON: 415 for a non-JSON type, 413 over the limit."""
        content_type = self.environ.get("CONTENT_TYPE")
        if content_type and content_type != "application/json":
            media_type, _, params = content_type.partition(";")
            charset = re.search(r"charset\s*=\s*\"?([^\";\s]+)", params, re.I)
            if media_type.strip().lower() != "application/json" or (
                    charset and charset.group(1).lower() not in ("utf-8", "utf8")):
                raise Problem(415, "The body must be JSON: send Content-Type: application/json (UTF-8).")
        limit = self.app.max_body_bytes
        length = self.environ.get("CONTENT_LENGTH")
        stream = self.environ["wsgi.input"]
        if length:
            # Checked here, not left to the server: ASCII digits only (str.isdigit
            # takes "²"), and a length of more digits than int() parses is too large.
            if not CONTENT_LENGTH_RE.fullmatch(length):
                raise bad_request("Content-Length is not a whole number of bytes.",
                                  [field_error("Content-Length", "expected ASCII digits")])
            digits = length.lstrip("0") or "0"
            if len(digits) > 18 or int(digits) > limit:
                raise _too_large(limit)
            body = stream.read(int(digits))
        elif self.environ.get("wsgi.input_terminated"):  # the server ends the input (a chunked body, say)
            body = stream.read(limit + 1)
            if len(body) > limit:
                raise _too_large(limit)
        else:  # reading on would wait for bytes that may never come (PEP 3333)
            raise Problem(411, "Send the body with a Content-Length header.")
        return parse_json(body)


CONTENT_LENGTH_RE = re.compile(r"[0-9]+", re.ASCII)


def _too_large(limit):
    return Problem(413, f"The body is larger than the limit of {limit} bytes.")


# ============================================================================
# Handlers
# ============================================================================

def _event_id_param(req):
    event_id = req.params["event_id"]
    return event_id, program_of(event_id)


def _type_errors(req, items):
    """For [(index or None, event_id, body)] that fail validation: the EventType
    errors of programs that take registered types only (docs/API.md §5a), so that
    the 400 lists them among the others. (Bodies that pass are checked in the
    write transaction, against what is registered then.)"""
    candidates = [(index, event_id, program_of(event_id), body.get("EventType")) for index, event_id, body in items
                  if isinstance(body, dict) and program_of(event_id)
                  and not event_type_error(body.get("EventType"))]
    return unregistered_type_errors(TypeRules(req.reads), candidates) if candidates else []


def _schema_errors(req, items):
    """For [(index or None, event_id, body)] that fail validation: the violations of
    their EventData against their types' schemas in force now, so that the 400
    lists them among the others (docs/API.md §5b). (Bodies that pass are checked
    in the write transaction.)"""
    errors, rules = [], TypeRules(req.reads)
    for index, event_id, body in items:
        if not isinstance(body, dict) or event_type_error(body.get("EventType")):
            continue
        data = {} if body.get("EventData") is None else body["EventData"]
        version = rules.schema_version(body["EventType"])
        if version is None or not isinstance(data, dict) or json_depth(data) > MAX_EVENT_DATA_DEPTH:
            continue
        found = compiled_schema(req.app.schemas, req.reads, body["EventType"], version).violations(data)
        errors += found if index is None else batch_errors(index, event_id, found)
    return errors


def put_event_handler(req):
    event_id, program_id = _event_id_param(req)
    req.require("write", program_id)
    body = req.json_body()
    try:
        event = validate_event(event_id, body)
    except Problem as problem:
        problem.errors += _type_errors(req, [(None, event_id, body)]) + _schema_errors(req, [(None, event_id, body)])
        raise
    preconditions = req.preconditions()
    schemas = req.app.schemas
    checked = precheck(schemas, req.reads, event)
    status, revision = req.app.write(lambda tx: put_event_later(tx, event, preconditions, schemas, checked),
                                     touched=lambda outcome: outcome[0] != "unchanged" and {
                                         (event.program_id, event.event_type)})
    return Response(200, [("Location", req.url(f"/events/{event_id}")), ("ETag", etag(revision))])


def post_events_handler(req):
    batch = parse_batch(req.json_body())
    forbidden = [e for index, event_id, _ in batch if not req.user.may("write", program_of(event_id))
                 for e in batch_errors(index, event_id, [field_error(
                     "EventId", f"no write access to program {program_of(event_id)!r}")])]
    if forbidden:
        raise Problem(403, f"{len(forbidden)} events are in programs this key may not write; "
                      "nothing was written.", forbidden)
    events, errors, seen = [], [], set()
    for index, event_id, body in batch:
        if event_id in seen:
            errors += batch_errors(index, event_id, [field_error("EventId", "appears more than once in the batch")])
        seen.add(event_id)
        try:
            events.append((index, validate_event(event_id, body, ignore=("EventId",))))
        except Problem as problem:
            errors += batch_errors(index, event_id, problem.errors)
    if errors:
        errors += _type_errors(req, batch) + _schema_errors(req, batch)
        errors.sort(key=lambda error: error["index"])
        failing = len({e["index"] for e in errors})
        raise bad_request(f"{failing} of {len(batch)} events are not valid; nothing was written.", errors)
    schemas = req.app.schemas
    checked = [precheck(schemas, req.reads, event) for _, event in events]
    results = req.app.write(lambda tx: put_events(tx, events, schemas, checked),
                            touched=lambda results: {(event.program_id, event.event_type) for (_, event), (
                                status, _) in zip(events, results, strict=True) if status != "unchanged"},
                            seqs=len(events))
    return json_response({"Results": [{"EventId": event.event_id, "Revision": revision, "Status": status}
                                      for (_, event), (status, revision) in zip(events, results, strict=True)]})


def get_event_handler(req):
    event_id, program_id = _event_id_param(req)
    req.require("read", program_id)
    if_none_match = parse_etags("If-None-Match", req.header("If-None-Match"))
    row = req.reads.read_event(event_id) if EVENT_ID_RE.fullmatch(event_id) else None
    if row is None or row.deleted:
        raise Problem(404, f"Event {event_id!r} does not exist.")
    tag = etag(row.revision)
    if if_none_match is not None and weak_match(if_none_match, tag):
        return Response(304, [("ETag", tag)])
    return Response(200, [("ETag", tag)], render_event(row).encode("utf-8"), "application/json")


def delete_event_handler(req):
    event_id, program_id = _event_id_param(req)
    req.require("write", program_id)
    if not EVENT_ID_RE.fullmatch(event_id):
        raise bad_request("The eventId is not valid.", [field_error("EventId", f"expected {EVENT_ID_RULE}")])
    preconditions = req.preconditions()
    revision = req.app.write(lambda tx: delete_event(tx, event_id, preconditions),
                             touched=lambda _: {(program_id, None)})
    return Response(204, [("ETag", etag(revision))])


def _require_read_on_requested_programs(req):
    """403 unless the caller may read every ProgramId of the query (before validating it)."""
    for name, value in req.query:
        if name == "ProgramId":
            req.require("read", value)


def _feed_rows(req, programs, query):
    """A page of the feed (a FeedQuery) for ``programs``: up to ``query.limit + 1``
    rows, long-polling as ``query.wait`` says and the host allows -> (rows, the
    headers of the answer: Eventstore-Poll-After where it could not wait; see
    EventStore.wait_for_feed)."""
    return req.app.wait_for_feed(programs, query, req.environ)


def _page(rows, limit):
    """Up to ``limit + 1`` feed rows -> (the page's rows, whether more follow, the
    page's events as JSON text)."""
    page = rows[:limit]
    return page, len(rows) > limit, ",".join(map(render_event, page))


def list_events_handler(req):
    _require_read_on_requested_programs(req)
    query = parse_feed_query(req.query)
    now = query.after == AFTER_NOW
    query = replace(query, after=feed_cursor(req.reads, query.after))
    programs = query.programs or readable_programs(req.user)
    rows, headers = ([], []) if now and not query.wait else _feed_rows(req, programs, query)
    rows, has_more, events = _page(rows, query.limit)
    last = rows[-1].seq if rows else query.after
    kept = [(name, value) for name, value in req.query if name not in ("after", "wait")]
    next_url = req.url("/events?" + urllib.parse.urlencode(kept + [("after", last)]))
    if has_more:
        headers.append(("Link", f'<{next_url}>; rel="next"'))
    body = f'{{"Events":[{events}],"Next":{json_text(next_url)},"HasMore":{json_text(has_more)}}}'
    return Response(200, headers, body.encode("utf-8"), "application/json")


def list_programs_handler(req):
    user = req.user
    programs = [{"ProgramId": program.program_id, "Name": program.name,
                 "Access": "write" if user.is_system else user.grants[program.program_id],
                 "RegisteredEventTypesOnly": program.registered_types_only}
                for program in req.reads.list_programs()
                if user.is_system or program.program_id in user.grants]
    return json_response({"Programs": programs})


def put_program_handler(req):
    req.require_system()
    program_id = req.params["program_id"]
    if program_id_error(program_id):
        raise bad_request("The ProgramId is not valid.", [program_id_error(program_id)])
    name, asked = validate_program_body(req.json_body())
    strict = req.app.write(lambda tx: tx.put_program(program_id, name, asked), touched=lambda _: False, seqs=0)
    return json_response({"ProgramId": program_id, "Name": name, "RegisteredEventTypesOnly": strict})


def erase_member_handler(req):
    program_id, member_id = req.params["program_id"], req.params["member_id"]
    req.require("write", program_id)
    member_error = _text_error(member_id, 1, 256)
    errors = [error for error in (program_id_error(program_id),
                                  member_error and field_error("ProgramMemberId", member_error)) if error]
    if errors:
        raise bad_request("The path is not valid; see errors.", errors)
    erased = req.app.write(lambda tx: erase_member(tx, program_id, member_id),
                           touched=lambda erased: erased and {(program_id, None)})
    return json_response({"Deleted": erased})


def _event_type_param(req):
    """The path's EventType (percent-decoded), or 400 when it breaks EventType's rule."""
    event_type = req.params["event_type"]
    message = event_type_error(event_type)
    if message:
        raise bad_request("The EventType in the path is not valid.", [field_error("EventType", message)])
    return event_type


def list_event_types_handler(req):
    _require_read_on_requested_programs(req)
    programs = parse_event_types_query(req.query) or readable_programs(req.user)
    body = f'{{"EventTypes":{req.reads.event_types_json(programs)}}}'
    return Response(200, [], body.encode("utf-8"), "application/json")


def get_event_type_handler(req):
    event_type = _event_type_param(req)
    entries = req.reads.event_types_json(readable_programs(req.user), event_type)
    if entries == "[]":
        raise Problem(404, f"Event type {event_type!r} is neither registered nor used in a program you can read.")
    return Response(200, [], entries[1:-1].encode("utf-8"), "application/json")  # the one entry


def put_event_type_handler(req):
    req.require_system()
    event_type = _event_type_param(req)
    dry_run = parse_dry_run(req.query)
    change = validate_event_type_body(req.json_body())
    outcome = put_event_type(req.reads, lambda work: req.app.write(work, touched=lambda _: False, seqs=0),
                             event_type, change, dry_run)
    if dry_run:
        return json_response(outcome)
    return Response(200, [], outcome.encode("utf-8"), "application/json")


def get_schema_version_handler(req):
    """``GET /event-types/{EventType}/schemas/{n}``: one version of a type's schema."""
    event_type = _event_type_param(req)
    text = req.params["version"]
    if not re.fullmatch(r"[1-9][0-9]*", text):
        raise bad_request("The schema version is not valid.",
                          [field_error("SchemaVersion", "expected a whole number from 1")])
    # No type has had a billion schemas: a longer number is a version that does not exist.
    found = req.reads.type_schema(event_type, int(text)) if len(text) <= 9 else None
    if found is None:
        raise Problem(404, f"Event type {event_type!r} has no schema version {text}.")
    body = (f'{{"EventType":{json_text(event_type)},"SchemaVersion":{found.version},"Schema":{found.schema},'
            f'"CreatedUTC":"{format_datetime(found.created_us)}"}}')
    return Response(200, [], body.encode("utf-8"), "application/json")


def delete_event_type_handler(req):
    req.require_system()
    event_type = _event_type_param(req)
    req.app.write(lambda tx: unregister_event_type(tx, event_type), touched=lambda _: False, seqs=0)
    return Response(204)


def _subscription_name(req):
    """The path's subscription name, or 400 when it breaks the rule (every method)."""
    name = req.params["name"]
    error = subscription_name_error(name)
    if error:
        raise bad_request("The subscription's name in the path is not valid.", [error])
    return name


def _subscription_response(req, row, status=200, headers=(), secret=None):
    """The representation; with ``secret``, plus "Secret" (shown once: a webhook added, a secret rotated)."""
    rendered = subscriptions_json(req.reads, [row])[0]
    return json_response({**rendered, "Secret": secret} if secret else rendered, status, headers)


def _require_read_on_filter(req, body):
    """403 unless the caller may read every ProgramId its Filter names (before
    validating the rest); the owner of another user's subscription is checked
    in the write."""
    named = body.get("Filter") if isinstance(body, dict) else None
    programs = named.get("ProgramId") if isinstance(named, dict) else None
    for program_id in programs if isinstance(programs, list) else ():
        if isinstance(program_id, str):
            req.require("read", program_id)


def list_subscriptions_handler(req):
    rows = req.reads.list_subscriptions(None if req.user.is_system else req.user.user_id)
    return json_response({"Subscriptions": subscriptions_json(req.reads, rows)})


def get_subscription_handler(req):
    return _subscription_response(req, visible_subscription(req.reads, req.user, _subscription_name(req)))


def put_subscription_handler(req):
    name = _subscription_name(req)
    body = req.json_body()
    _require_read_on_filter(req, body)
    change = validate_subscription_body(body, req.app.webhook_allow_hosts)
    if isinstance(change.webhook, WebhookChange) and not may_set_url(change.webhook.url, req.user.is_system,
                                                                     req.app.webhook_allow_hosts):
        raise Problem(403, "Only a SYSTEM user may point a webhook at this host; other users only at the hosts "
                           "the server allows (--webhook-allow-host).")
    created, row, secret = req.app.write(lambda tx: put_subscription(tx, name, req.user, change),
                                         touched=lambda _: False, seqs=0)
    if row.webhook is not None:
        req.app.webhook_changed(name)
    if created:
        return _subscription_response(req, row, 201, [("Location", req.url(f"/subscriptions/{name}"))], secret)
    return _subscription_response(req, row, secret=secret)


def rotate_secret_handler(req):
    name = _subscription_name(req)
    if (req.header("Content-Length") or "0").strip() != "0":
        raise bad_request("This request takes no body.", [field_error("body", "send none")])
    row, secret = req.app.write(lambda tx: rotate_secret(tx, name, req.user), touched=lambda _: False, seqs=0)
    return _subscription_response(req, row, secret=secret)


def delete_subscription_handler(req):
    name = _subscription_name(req)
    req.app.write(lambda tx: remove_subscription(tx, name, req.user), touched=lambda _: False, seqs=0)
    return Response(204)


def subscription_events_handler(req):
    """The page after the Position, read as the feed is; reading moves nothing."""
    name = _subscription_name(req)
    limit, wait = parse_subscription_read_query(req.query)
    row = visible_subscription(req.reads, req.user, name)
    if row.webhook is not None:
        raise Problem(409, f"The subscription {name!r} has a webhook, which delivers its changes: it cannot be "
                           "read as well (one consumer at a time).")
    programs = subscription_programs(principal_of(req.reads, row.owner), row)
    rows, headers = _feed_rows(req, programs, FeedQuery(programs=row.programs, event_types=row.event_types,
                                                        after=row.position, limit=limit, wait=wait))
    rows, has_more, events = _page(rows, limit)
    through = rows[-1].seq if rows else row.position
    body = f'{{"Events":[{events}],"HasMore":{json_text(has_more)},"Through":{through}}}'
    return Response(200, headers, body.encode("utf-8"), "application/json")


def ack_subscription_handler(req):
    name = _subscription_name(req)
    through, rewind = validate_ack_body(req.json_body())
    row = req.app.write(lambda tx: acknowledge_subscription(tx, name, req.user, through, rewind),
                        touched=lambda _: False, seqs=0)
    if row.webhook is not None:
        req.app.webhook_changed(name)  # redeliver from the new Position at once
    return _subscription_response(req, row)


def health_handler(req):
    try:
        req.reads.answers()
    except req.app.storage.errors:
        raise service_unavailable("The database does not answer.", retry_after=5) from None
    writer = req.app.writer
    writer.start()  # brings back a writer that died, even while nobody writes
    if writer.failure is not None:
        raise service_unavailable("The database answers reads but its writer is down; writes get 503 "
                                  "until it is back.", retry_after=5)
    if writer.stuck():
        raise service_unavailable(f"The database writer has been in one transaction for {writer.stuck():.0f} s; "
                                  "writes get 503 until it finishes.", retry_after=5)
    if writer.failing is not None:  # the last write failed: see whether one can commit now
        try:
            writer.submit(lambda tx: None, touched=lambda result: False, seqs=0)
        except (Problem, *req.app.storage.errors):
            raise service_unavailable("The database answers reads but cannot take writes; writes get 503 "
                                      "until it can.", retry_after=5) from None
    swept = req.reads.last_sweep(RetentionSweeper.NAME)
    retention = {"intervalSeconds": req.app.retention_interval,
                 "lastSweepUTC": swept and format_datetime(swept.finished_us), "erased": swept and swept.count}
    return json_response({"status": "ok", "backend": req.app.storage.backend, "schemaVersion": SCHEMA_VERSION,
                          "longPolls": req.app.long_polls, "retention": retention,
                          **req.app.storage.health_details()})


def openapi_handler(req):
    return Response(200, [], req.app.openapi, "application/json")


# The console (docs/API.md §12): static files from the console folder, read
# once; they hold no data (the page asks the API with the credentials typed into
# it) and are sent with a policy that lets the page load nothing but its own
# script, style and requests, and be framed by nobody.
CONSOLE_HEADERS = [
    ("Content-Security-Policy", "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    ("X-Frame-Options", "DENY"), ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-cache")]
CONSOLE_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}


def read_console(folder):
    """{file name: (bytes, content type)} of the console's files."""
    return {path.name: (path.read_bytes(), CONSOLE_TYPES[path.suffix]) for path in sorted(folder.iterdir())
            if path.suffix in CONSOLE_TYPES}


def console_handler(req):
    return console_file(req, "index.html")


def console_file_handler(req):
    return console_file(req, req.params["file"])


def console_file(req, name):
    found = req.app.console.get(name)
    if found is None:
        raise Problem(404, "There is no such resource.")
    body, content_type = found
    return Response(200, list(CONSOLE_HEADERS), body, content_type)


def metrics_handler(req):
    """Prometheus' text format, the whole server's: for SYSTEM users, or anyone
    where the app was made with ``metrics_public`` (then no credentials are read)."""
    if req.user is not None:
        req.require_system()
    if not req.app.metrics.enabled:
        raise Problem(404, "Metrics are switched off on this server (serve.py --no-metrics).")
    return Response(200, [], req.app.metrics.exposition(metrics_from_database(req.reads, req.app.clock())),
                    METRICS_CONTENT_TYPE)


def metrics_from_database(reads, now):
    """The gauges a scrape reads from the database: the feed's head, and each
    subscription's Behind and how long its first pending change has waited
    (seconds since its UpdatedUTC; 0 when none waits), as its representation says."""
    behind, pending = [], []
    for row, backlog in subscription_backlogs(reads, reads.list_subscriptions()):
        behind.append(((row.name,), min(backlog.changes, MAX_BEHIND)))
        waited = 0 if backlog.first_updated_us is None else max(0, now - backlog.first_updated_us) / 1e6
        pending.append(((row.name,), waited))
    return {FEED_HEAD: [((), reads.last_sequence())], SUBSCRIPTION_BEHIND: behind, SUBSCRIPTION_PENDING: pending}


# ============================================================================
# Routes
# ============================================================================

AUTH, OPEN = True, False    # whether a route needs credentials
RAW_PATH = "raw:"           # a pattern so marked matches the path as sent; its groups are decoded
SYSTEM_UNLESS_PUBLIC = "credentials unless make_app(metrics_public=True)"  # /metrics: AUTH, or OPEN
QUERY, NO_QUERY = True, False  # whether its handler reads the query string (or ignores it on
                               # purpose: probes add cache-busters to /health); a route that takes
                               # none answers 400 to any parameter (silence let `PUT ...?dryRun=1` write)

# (method, path pattern, handler, credentials, query), read top to bottom.
ROUTES = [
    ("GET", r"/health", health_handler, OPEN, QUERY),
    ("GET", r"/openapi\.json", openapi_handler, OPEN, QUERY),
    ("GET", r"/metrics", metrics_handler, SYSTEM_UNLESS_PUBLIC, QUERY),
    ("GET", r"/console", console_handler, OPEN, QUERY),
    ("GET", r"/console/(?P<file>[^/]+)", console_file_handler, OPEN, QUERY),
    ("GET", r"/events", list_events_handler, AUTH, QUERY),
    ("POST", r"/events", post_events_handler, AUTH, NO_QUERY),
    ("PUT", r"/events/(?P<event_id>[^/]+)", put_event_handler, AUTH, NO_QUERY),
    ("GET", r"/events/(?P<event_id>[^/]+)", get_event_handler, AUTH, NO_QUERY),
    ("DELETE", r"/events/(?P<event_id>[^/]+)", delete_event_handler, AUTH, NO_QUERY),
    ("GET", r"/programs", list_programs_handler, AUTH, NO_QUERY),
    ("PUT", r"/programs/(?P<program_id>[^/]+)", put_program_handler, AUTH, NO_QUERY),
    # The member id is the rest of the path: a percent-encoded "/" in it arrives decoded.
    ("DELETE", r"/programs/(?P<program_id>[^/]+)/members/(?P<member_id>.+)", erase_member_handler, AUTH, NO_QUERY),
    # Likewise an event type: "/" in it is sent as %2F and arrives decoded.
    ("GET", r"/event-types", list_event_types_handler, AUTH, QUERY),
    # Matched on the path as sent (RAW_PATH), before percent-decoding: "%2F" in an
    # event type never separates segments, so only literal ones name a version.
    ("GET", RAW_PATH + r"/event-types/(?P<event_type>[^/]+)/schemas/(?P<version>[^/]+)", get_schema_version_handler,
     AUTH, NO_QUERY),
    ("GET", r"/event-types/(?P<event_type>.+)", get_event_type_handler, AUTH, NO_QUERY),
    ("PUT", r"/event-types/(?P<event_type>.+)", put_event_type_handler, AUTH, QUERY),
    ("DELETE", r"/event-types/(?P<event_type>.+)", delete_event_type_handler, AUTH, NO_QUERY),
    ("GET", r"/subscriptions", list_subscriptions_handler, AUTH, NO_QUERY),
    # As sent too: "%2F" in a name (a 400) never reaches another subscription's /events or /ack.
    ("PUT", RAW_PATH + r"/subscriptions/(?P<name>[^/]+)", put_subscription_handler, AUTH, NO_QUERY),
    ("GET", RAW_PATH + r"/subscriptions/(?P<name>[^/]+)", get_subscription_handler, AUTH, NO_QUERY),
    ("DELETE", RAW_PATH + r"/subscriptions/(?P<name>[^/]+)", delete_subscription_handler, AUTH, NO_QUERY),
    ("GET", RAW_PATH + r"/subscriptions/(?P<name>[^/]+)/events", subscription_events_handler, AUTH, QUERY),
    ("POST", RAW_PATH + r"/subscriptions/(?P<name>[^/]+)/ack", ack_subscription_handler, AUTH, NO_QUERY),
    ("POST", RAW_PATH + r"/subscriptions/(?P<name>[^/]+)/secret", rotate_secret_handler, AUTH, NO_QUERY),
]


class Route(NamedTuple):
    method: str
    pattern: re.Pattern
    handler: object
    needs_auth: bool
    takes_query: bool
    raw: bool  # matched on the path as sent (RAW_PATH)
    template: str  # the path as docs/API.md writes it, /events/{eventId}: the metrics' route label


# How docs/API.md names a path's parameters (others as their group is named).
PARAMETER_NAMES = {"event_id": "eventId", "program_id": "ProgramId", "member_id": "ProgramMemberId",
                   "event_type": "EventType", "version": "n", "name": "Name"}


def route_template(pattern):
    """r"/events/(?P<event_id>[^/]+)" -> "/events/{eventId}"."""
    named = re.sub(r"\(\?P<(\w+)>[^)]*\)", lambda m: "{" + PARAMETER_NAMES.get(m.group(1), m.group(1)) + "}",
                   pattern.removeprefix(RAW_PATH))
    return re.sub(r"\\(.)", r"\1", named)


class Router:
    """Matches (method, path) against a route table read top to bottom."""

    def __init__(self, routes):
        # DOTALL: a percent-encoded line feed in a member id or event type is part of it.
        self.routes = [Route(method, re.compile(pattern.removeprefix(RAW_PATH), re.DOTALL), handler, auth, query,
                             pattern.startswith(RAW_PATH), route_template(pattern))
                       for method, pattern, handler, auth, query in routes]

    def template(self, path):
        """The template of the first route the path matches, whatever its method,
        or "unmatched" (the metrics' label of a 404 or 405)."""
        found = path is not None and next((route for route in self.routes if route.pattern.fullmatch(
            urllib.parse.quote(path, safe="/") if route.raw else path)), None)
        return found.template if found else "unmatched"

    def match(self, method, path, raw_path=None):
        """-> (the Route, its path params); Problem 404, or 405 with Allow.
        ``raw_path``: the path as sent, for RAW_PATH routes (None: ``path`` quoted)."""
        allowed, claimed = [], False
        for route in self.routes:
            if claimed and not route.raw:
                continue  # the path as sent is a RAW_PATH route's: no decoded reading of it counts
            if route.raw:
                found = route.pattern.fullmatch(raw_path or urllib.parse.quote(path, safe="/"))
                try:
                    params = found and {name: urllib.parse.unquote(value, errors="strict")
                                        for name, value in found.groupdict().items()}
                except UnicodeError:  # not UTF-8 once decoded: as request_path, no route
                    found = None
            else:
                found = route.pattern.fullmatch(path)
                params = found and found.groupdict()
            if found:
                if route.method == method or (method == "HEAD" and route.method == "GET"):
                    return route, params
                allowed.append(route.method)
                claimed = claimed or route.raw
        if not allowed:
            raise Problem(404, "There is no such resource.")
        if "GET" in allowed:
            allowed.append("HEAD")
        raise Problem(405, f"{method} is not allowed here.",
                      headers=[("Allow", ", ".join(sorted(set(allowed))))])


def request_path(environ):
    """The request path, percent-decoded as UTF-8. PATH_INFO carries it as
    latin-1-decoded bytes (PEP 3333); a path that is not UTF-8 matches no route."""
    raw = environ.get("PATH_INFO", "") or "/"
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeError:
        return None


def raw_request_path(environ, path):
    """The app's part of the path as the client sent it, not percent-decoded, from
    the host's REQUEST_URI or RAW_URI (waitress, gunicorn and uWSGI give one), when
    it agrees with ``path``; else None (PEP 3333 gives only the decoded path)."""
    uri = environ.get("REQUEST_URI") or environ.get("RAW_URI")
    if not uri:
        return None
    raw = urllib.parse.urlsplit(uri).path if not uri.startswith("/") else uri.partition("?")[0]
    mount = environ.get("SCRIPT_NAME", "").rstrip("/").count("/")
    if mount:
        parts = raw.split("/", mount + 1)
        raw = "/" + parts[mount + 1] if len(parts) > mount + 1 else "/"
    try:
        return raw if urllib.parse.unquote(raw, errors="strict") == path else None
    except UnicodeError:
        return None


# ============================================================================
# The app
# ============================================================================

# A long poll the app could not hold (no slot for it: see host_long_poll_slots,
# or the app is stopping) is answered at once, empty, with this header: seconds
# the client should let pass before it asks again, so that it does not spin.
POLL_AFTER_HEADER = "Eventstore-Poll-After"
POLL_AFTER_SECONDS = 1
# Long polls a host that starts a thread for each connection may hold, per process.
MANY_LONG_POLLS = 8


def host_long_poll_slots(environ, max_waiting):
    """How many long polls one process of this request's host may hold at once,
    by what the host says of itself; ``max_waiting`` (None: not set) bounds it.

    A waiting poll holds one of the host's threads, and a host's queued requests
    (``/health`` too) cannot be seen from here: a poll may only be held where a
    thread is sure to be left for them.

    - ``wsgi.multithread`` false: a process serves one request at a time
      (gunicorn's sync workers, uWSGI without --threads, wsgiref): none, ever.
    - uWSGI says its threads per process (``uwsgi.cores``): at most half of them.
    - Otherwise ``max_waiting`` if set; unset, none, except under Werkzeug's
      threaded server, which starts a thread per connection: a host that does
      not say how many threads it has (gunicorn's gthread, waitress) may have
      one, which a single poll would hold.
    """
    if not environ.get("wsgi.multithread"):
        return 0
    threads = getattr(sys.modules.get("uwsgi"), "cores", None)
    if isinstance(threads, int) and threads > 0:
        return threads // 2 if max_waiting is None else min(max_waiting, threads // 2)
    if max_waiting is not None:
        return max_waiting
    return MANY_LONG_POLLS if environ.get("SERVER_SOFTWARE", "").startswith("Werkzeug/") else 0


STATUS_LINES = {status.value: f"{status.value} {status.phrase}" for status in http.HTTPStatus}

# Forks (see EventStore._after_fork). A fork waits until no thread the app
# started is inside a database call (eventstore_forks.FORK_GUARD).
_APPS = weakref.WeakSet()
_INHERITED = []      # storages a forked child inherited: kept, so never closed
_FORK_LOCKS = {}     # pid -> the lock of that process's _after_fork


def end_long_polls():
    """Answer every waiting long poll of every app in this process now, and
    every later one at once: for a host's stopping hook (the README's
    gunicorn.conf.py), whatever middleware wraps the apps. It takes locks: call
    it from a thread, not from inside a signal handler."""
    for app in list(_APPS):
        app.end_long_polls()


class EventStore:
    """The WSGI application. Only ``__call__`` touches environ and start_response."""

    def __init__(self, db, *, max_body_bytes=DEFAULT_MAX_BODY, max_waiting=None, write_timeout=10.0,
                 max_waiting_writes=4, busy_timeout_ms=5000, auth_cache_seconds=AUTH_CACHE_SECONDS,
                 max_auth_failures=10, poll_interval=0.025, retention_interval=3600, metrics=True,
                 metrics_public=False, webhook_allow_hosts=(), webhook_max_backoff=MAX_BACKOFF,
                 webhook_pause_after=PAUSE_AFTER, webhook_delivery=True, clock=now_us, throttle=None, make_deliverer=None, openapi=None, routes=ROUTES):
        for name, seconds in (("retention_interval", retention_interval), ("webhook_max_backoff", webhook_max_backoff),
                              ("webhook_pause_after", webhook_pause_after)):
            if isinstance(seconds, bool) or not isinstance(seconds, int) or seconds < 1:
                raise ValueError(f"{name} is a whole number of seconds, at least 1")
        if isinstance(webhook_allow_hosts, str):
            raise ValueError("webhook_allow_hosts is a list of hosts")
        self.retention_interval = retention_interval
        self.webhook_allow_hosts = tuple(webhook_allow_hosts)
        self.webhook_max_backoff, self.webhook_pause_after = webhook_max_backoff, webhook_pause_after
        self.webhook_delivery = webhook_delivery
        self.make_deliverer = make_deliverer or webhook_deliverer
        self.storage = open_storage(db, busy_timeout_ms)
        warn_if_no_users(self.storage)
        self.throttle = throttle if throttle is not None else shared_throttle(
            self.storage.local_file("throttle"), threshold=max_auth_failures)
        self.auth_cache_seconds = auth_cache_seconds
        # /metrics needs credentials unless the app was made with metrics_public: decided here, once.
        self.router = Router([(method, pattern, handler, (not metrics_public) if auth is SYSTEM_UNLESS_PUBLIC else auth,
                               query) for method, pattern, handler, auth, query in routes])
        self.max_body_bytes = max_body_bytes
        self.clock = clock
        self.openapi = openapi if openapi is not None else OPENAPI_PATH.read_bytes()
        self.console = read_console(CONSOLE_PATH)
        self.poll_interval, self.max_waiting, self.write_timeout = poll_interval, max_waiting, write_timeout
        self.max_waiting_writes = max_waiting_writes
        self.metrics = (Metrics if metrics else NoMetrics)(self.storage.local_file(METRICS_FILE))
        self._start_process()
        _APPS.add(self)

    def _start_process(self):
        """What belongs to one process: the writer thread, the long polls, locks, the
        compiled schemas, the engines (made here, started by start())."""
        # Every commit made through this app wakes the long polls it may match at
        # once; other processes' commits reach them through the news's watcher.
        self.news = CommitNews(self.storage, self.poll_interval)
        self._slots = threading.Lock()
        self._held = 0  # long polls holding a slot (host_long_poll_slots), under _slots
        self._auth_cache = {}
        self.writer = process_writer(self.storage, self.news, self.metrics, self.clock, timeout=self.write_timeout,
                                     max_waiting=self.max_waiting_writes)
        self.schemas = SchemaCache()
        self.engines = [RetentionSweeper(self.storage, self.writer, self.retention_interval, self.clock)]
        self.deliverer = None
        if self.webhook_delivery:
            self.deliverer = self.make_deliverer(self.storage, self.writer, self.news, clock=self.clock,
                                                 max_backoff=self.webhook_max_backoff,
                                                 pause_after=self.webhook_pause_after,
                                                 count=self.metrics.webhook_delivery)
            self.engines.append(self.deliverer)
        self._engines_started = False
        self._pid = os.getpid()

    def start(self):
        """Start this process's engines (the retention sweeper, the webhook deliverer),
        once: serve.py calls it at start-up; an embedding host's first request in a
        process does."""
        if not self._engines_started:
            self._engines_started = True
            for engine in self.engines:
                engine.start()

    def begin_stop(self):
        """The server is stopping (serve.py, on SIGTERM): the engines start no new work
        (a webhook delivery in flight ends within seconds); close() then stops them."""
        for engine in self.engines:
            if hasattr(engine, "begin_stop"):
                engine.begin_stop()

    def webhook_changed(self, name):
        """Subscription ``name``'s webhook changed through this app: its deliverer looks now."""
        if self.deliverer is not None and self._engines_started:
            self.deliverer.poke(name)

    def _after_fork(self):
        """This process is a fork of the one that made the app (gunicorn --preload,
        uWSGI without --lazy-apps): that process's threads are not here, and its
        connections and lock files are shared with it. Everything of a process is
        made anew; the inherited connections are kept, never used or closed
        (closing them would end or damage the parent's)."""
        with _FORK_LOCKS.setdefault(os.getpid(), threading.Lock()):
            if self._pid == os.getpid():
                return  # another thread got here first
            log.info("eventstore: this process (pid %d) was forked from %d after the app was made; opening "
                     "the database anew", os.getpid(), self._pid)
            _INHERITED.append(self.storage)
            self.storage.forget_after_fork()
            self.storage = self.storage.reopened()
            self.throttle.after_fork()
            self.metrics.after_fork()
            self._start_process()

    def write(self, change, touched=lambda result: True, seqs=1):
        """Run ``change(tx)`` in a committed, durable write transaction
        shared with whatever other writes are queued (group commit); wake the
        long polls that ``touched(result)`` may concern (see GroupCommitWriter);
        ``seqs``, the Sequences it will probably take. Returns the change's result."""
        result = self.writer.submit(change, touched, seqs)
        self.metrics.write_committed()
        return result

    @property
    def long_polls(self):
        """Requests waiting in a long poll now (reported by /health)."""
        return self.news.waiting

    def close(self):
        """Stop the engines and the writer, and close the storage."""
        self.end_long_polls()
        self.begin_stop()  # all at once; then each is waited for
        for engine in self.engines:
            engine.stop()
        self.writer.stop()
        self.metrics.close()
        self.storage.close()

    def wait_for_feed(self, programs, query, environ):
        """Read a feed page; with ``query.wait``, if it is empty, wait up to that
        many seconds for a matching commit -> (rows, the headers of the answer).

        A request waits only where its host has a slot for it
        (host_long_poll_slots); otherwise, or while the app is stopping, an empty
        page is answered at once with ``Eventstore-Poll-After``, so the client
        waits before it asks again. Where the host says whether the client is
        still there (waitress's client_disconnected), a wait ends within a
        second of it leaving."""
        reads = self.storage.reads()
        if not query.wait:
            return reads.read_feed(programs, query), []
        could_not_wait = [(POLL_AFTER_HEADER, str(POLL_AFTER_SECONDS))]
        slots = host_long_poll_slots(environ, self.max_waiting)
        if not slots or self.news.closed:
            rows = reads.read_feed(programs, query)
            return rows, ([] if rows else could_not_wait)
        client_gone = environ.get("waitress.client_disconnected")
        with self.news.listen(programs, query.event_types) as listener:  # before the first read
            rows = reads.read_feed(programs, query)
            if rows:
                return rows, []
            with self._slots:
                if self._held >= slots:
                    return rows, could_not_wait
                self._held += 1
            self.metrics.long_polls(+1)
            try:
                with listener.waiting():
                    deadline = time.monotonic() + query.wait
                    while not self.news.closed:
                        left = deadline - time.monotonic()
                        if not listener.news.wait(left if client_gone is None else min(left, 1.0)):
                            if left <= 1.0 or client_gone is None or client_gone():
                                return rows, []  # the wait is over (or nobody awaits it): empty
                            continue
                        listener.news.clear()  # before the read: a later commit sets it again
                        if self.news.closed:
                            break
                        rows = reads.read_feed(programs, query)
                        if rows:
                            return rows, []
                    return rows, could_not_wait  # the app is stopping
            finally:
                with self._slots:
                    self._held -= 1
                self.metrics.long_polls(-1)

    def end_long_polls(self):
        """Answer every waiting long poll now, and every new one at once (a
        server that is stopping calls this, so that nothing keeps it waiting)."""
        self.news.close()

    def handle(self, environ):
        """environ -> Response: route, authenticate, run the handler."""
        method = environ.get("REQUEST_METHOD", "GET").upper()
        path = request_path(environ)
        if path is None:
            raise Problem(404, "There is no such resource.")
        route, params = self.router.match(method, path, raw_request_path(environ, path))
        environ["eventstore.route"] = route.template
        query_string = environ.get("QUERY_STRING")
        query = urllib.parse.parse_qsl(query_string, keep_blank_values=True) if query_string else []
        req = Request(self, method, path, params, query, environ)
        if route.needs_auth:
            req.user = self.authenticate(environ.get("HTTP_AUTHORIZATION"), environ.get("REMOTE_ADDR", ""))
            # For the server's access log (serve.py): who the request was, once authenticated.
            environ["eventstore.user_id"] = req.user.user_id
        if query and not route.takes_query:
            raise bad_request("This resource takes no query parameters.",
                              [field_error(name, "unknown parameter; this resource takes none")
                               for name in dict.fromkeys(name for name, _ in query)])
        return route.handler(req)

    def authenticate(self, header, address):
        """Authorization header -> Principal, or the one 401 (429 while the source
        is throttled). Successful answers are cached for a second (keyed by a hash
        of the header), so a revoked key or disabled user stops working within a
        second."""
        cache_key = hashlib.sha256(header.encode("utf-8", "surrogateescape")).digest() if header else None
        cached = self._auth_cache.get(cache_key)
        if cached and cached[0] > time.monotonic():
            credentials, user_id = None, cached[1].user_id  # parsed when it was cached
        else:
            credentials = parse_basic_auth(header)
            if not credentials:  # nothing was guessed: no credentials, or not Basic ones
                raise unauthorized()
            user_id = credentials[0]
        wait = self.throttle.retry_after(user_id, address)
        if wait:
            raise Problem(429, "Too many failed authentications; try again later.",
                          headers=[("Retry-After", str(wait))])
        if credentials is None:
            return cached[1]
        principal = authenticate(self.storage.reads(), *credentials, self.clock(), touch=self._touch_key)
        if not principal:
            self.throttle.failed(user_id, address)
            self.metrics.auth_failure()
            raise unauthorized()
        if len(self._auth_cache) >= 10_000:  # bounded: forget everything, refill on demand
            self._auth_cache.clear()
        self._auth_cache[cache_key] = (time.monotonic() + self.auth_cache_seconds, principal)
        return principal

    def _touch_key(self, key_id, now):
        """Record a key's last use through the writer, best effort, without
        waiting for it: the request being authenticated may be a read, and a read
        never waits for the write lock. (From a read connection the update would
        contend with the writer for that lock.)"""
        try:
            self.writer.post(lambda tx: tx.touch_key(key_id, now), touched=lambda result: False)
        except RuntimeError:  # the app is closing
            pass

    def __call__(self, environ, start_response):
        if self._pid != os.getpid():
            self._after_fork()
        if not self._engines_started:
            self.start()
        started = time.perf_counter()
        rid = environ["eventstore.request_id"] = request_id(environ)
        context = REQUEST_ID.set(rid)
        try:
            response = self._respond(environ, rid)
        finally:
            REQUEST_ID.reset(context)
        route = environ.get("eventstore.route") or self.router.template(request_path(environ))
        self.metrics.request(route, environ.get("REQUEST_METHOD", ""), response.status, time.perf_counter() - started)
        headers = list(response.headers)
        headers.append(("X-Request-Id", rid))
        if response.content_type:
            headers.append(("Content-Type", response.content_type))
        body = response.body
        if response.status in (204, 304):
            body = b""
        else:
            headers.append(("Content-Length", str(len(body))))
        if environ.get("REQUEST_METHOD", "").upper() == "HEAD":
            body = b""
        start_response(STATUS_LINES[response.status], headers)
        return [body]

    def _respond(self, environ, rid):
        """environ -> the Response, a Problem's included. Server errors are logged
        (with the request's id, through REQUEST_ID): a 500 where it arises, a 503
        or 507 here, so that the operator finds the line a user's ``requestId`` names."""
        try:
            return self.handle(environ)
        except Problem as raised:
            problem = raised
        except self.storage.errors as exc:
            problem = storage_problem(self.storage, exc)
        except Exception:
            log.exception("unhandled error in %r %r", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"))
            problem = Problem(500, "Internal error.")
        if problem.status > 500:
            log.warning("%r %r answered %d: %s", environ.get("REQUEST_METHOD"), environ.get("PATH_INFO"),
                        problem.status, problem.detail)
        return problem_response(problem, rid)


def process_writer(storage, news, metrics, clock=now_us, **options):
    """A process's group-commit writer (the app's, and ``python eventstore.py
    deliver``'s): its commits wake ``news``, each group is counted in ``metrics``.
    ``options``: GroupCommitWriter's."""
    writer = GroupCommitWriter(storage.session, clock, on_commit=news.committed, **options)
    writer.observers.append(metrics.group_commit)
    return writer


def webhook_deliverer(storage, writer, news, **options):
    """The webhook deliverer of one process (docs/API.md §11) over these, with the
    app's rules for what a subscription reads and how a change is represented:
    the app's engine (make_app's default ``make_deliverer``), and ``python
    eventstore.py deliver``'s. ``options``: WebhookDeliverer's (``clock``,
    ``max_backoff``, ``pause_after``, ``count``: the metrics'
    eventstore_webhook_deliveries_total, ``on_error``)."""
    return WebhookDeliverer(storage, writer, news, programs_of=webhook_programs, render=render_event,
                            format_time=format_datetime, **options)


def make_app(db, *, max_body_bytes=DEFAULT_MAX_BODY, max_waiting=None, write_timeout=10.0, max_waiting_writes=4,
             busy_timeout_ms=5000, auth_cache_seconds=AUTH_CACHE_SECONDS, max_auth_failures=10,
             poll_interval=0.025, retention_interval=3600, metrics=True, metrics_public=False,
             webhook_allow_hosts=(), webhook_max_backoff=MAX_BACKOFF, webhook_pause_after=PAUSE_AFTER,
             webhook_delivery=True, clock=now_us, throttle=None, make_deliverer=None, openapi=None, routes=ROUTES):
    """The WSGI application over ``db``: a SQLite file (created if missing), a
    ``postgresql://`` URL, or a storage object.

    - ``max_body_bytes``: the largest request body (413 past it).
    - ``max_waiting``: long polls one process may hold at once; more answer at
      once, saying when to ask again. None: what the host says it can spare
      (host_long_poll_slots); a number bounds that.
    - ``write_timeout``: seconds a write waits for its commit before a 503.
    - ``max_waiting_writes``: while one transaction has run longer than a second,
      at most this many writes wait for the writer; the others are answered 503
      at once (nothing written), so that waiting writes leave the host's threads
      to reads and /health.
    - ``busy_timeout_ms``: how long a request waits for the database's locks or
      connections before a 503.
    - ``auth_cache_seconds``: how long a successful authentication is reused
      (a revoked key stops working within it).
    - ``max_auth_failures``: failed authentications per address or user id in
      60 s before 429s (0: no throttling).
    - ``poll_interval``: seconds between looks for other processes' commits
      while long polls wait.
    - ``retention_interval``: whole seconds between the retention sweeper's
      looks for expired events (docs/API.md §5b); it also looks soon after start.
    - ``metrics``: count requests, writes and the rest for ``GET /metrics``
      (False: nothing is counted and /metrics is a 404).
    - ``metrics_public``: ``GET /metrics`` needs no credentials (for a scraper
      on a private network); otherwise a SYSTEM user's.
    - ``webhook_allow_hosts``: hosts any user may point a webhook at (and reach
      over http://); others only SYSTEM users (docs/API.md §11).
    - ``webhook_max_backoff``: whole seconds, the longest wait between a failing
      webhook's attempts; ``webhook_pause_after``: whole seconds without a 2xx
      after which a webhook is paused.
    - ``webhook_delivery``: False leaves deliveries to ``python eventstore.py
      deliver`` (or other processes).

    The engines (the retention sweeper, the webhook deliverer) start on the app's
    first request in a process, or when the host calls ``app.start()``;
    ``app.close()`` stops them.

    Collaborators, for tests and extensions: ``clock`` (microseconds since the
    epoch), ``throttle`` (an AuthThrottle, in place of the one made from
    ``max_auth_failures``), ``make_deliverer`` (makes each process's webhook
    deliverer, called as ``webhook_deliverer``, the default, is: a test hands
    it its own ``on_error``), ``openapi`` (the document's bytes), ``routes``
    (the route table)."""
    return EventStore(db, max_body_bytes=max_body_bytes, max_waiting=max_waiting, write_timeout=write_timeout,
                      max_waiting_writes=max_waiting_writes, busy_timeout_ms=busy_timeout_ms,
                      auth_cache_seconds=auth_cache_seconds,
                      max_auth_failures=max_auth_failures, poll_interval=poll_interval,
                      retention_interval=retention_interval, metrics=metrics, metrics_public=metrics_public,
                      webhook_allow_hosts=webhook_allow_hosts, webhook_max_backoff=webhook_max_backoff,
                      webhook_pause_after=webhook_pause_after, webhook_delivery=webhook_delivery,
                      clock=clock, throttle=throttle, make_deliverer=make_deliverer, openapi=openapi,
                      routes=routes)


if __name__ == "__main__":  # the admin command line lives in eventstore_admin.py
    import eventstore_admin
    sys.exit(eventstore_admin.main())
