"""schemathesis hooks (SCHEMATHESIS_HOOKS=schemathesis_hooks): the rules the
OpenAPI document cannot state, all relations between fields: an event body's
ProgramId equals its EventId's prefix, its EventEndUTC is not before its
EventStartUTC, and a batch names each EventId once. A generated body that gets
everything else right gets these right too, so a 400 for a schema-valid body
means a real disagreement.

Two rules depend on state: once a program takes registered event types only,
a schema-valid event of an unregistered type is rightly a 400. So the fuzzer
never switches that on (a generated `"RegisteredEventTypesOnly": true` is sent
as false); tests/test_event_types.py covers the setting. And a Sequence past
the largest one committed is rightly a 400: generated Sequences are sent as 0
(tests/test_feed.py and tests/test_subscriptions.py cover the rule). Likewise
schemas (docs/API.md §5b): a generated Schema is dropped (one the fuzzer made up
would make its own later events 400s, or be refused by the metaschema the
document cannot state), and a type the fuzzer registers always gets a
Description (registering needs one; changing does not, which the document
cannot state either); tests/test_schemas.py covers them."""

import schemathesis

import eventstore


def _prefix(event_id):
    return event_id.partition("-")[0] if isinstance(event_id, str) and "-" in event_id else None


def _align(body, event_id):
    if not isinstance(body, dict):
        return
    # Only a well-formed ProgramId is aligned: a malformed one is a negative case
    # the fuzzer made on purpose, and must stay malformed.
    if isinstance(body.get("ProgramId"), str) and eventstore.PROGRAM_ID_RE.fullmatch(body["ProgramId"]) \
            and _prefix(event_id):
        body["ProgramId"] = _prefix(event_id)
    try:
        if eventstore.parse_datetime(body["EventEndUTC"]) < eventstore.parse_datetime(body["EventStartUTC"]):
            body["EventEndUTC"] = body["EventStartUTC"]
    except (KeyError, ValueError):
        pass


MAX_SEQUENCE = 2**63 - 1


def _a_sequence(value):
    """Whether a generated value is a schema-valid Sequence (a whole number, or its digits)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, str) and value.isascii() and value.isdigit():
        value = int(value)
    if isinstance(value, float) and value.is_integer():  # 2.0 is a whole number to JSON Schema
        value = int(value)
    return isinstance(value, int) and 0 <= value <= MAX_SEQUENCE


def _align_cursors(case):
    """A Sequence past the largest one committed is rightly a 400 (docs/API.md
    §4, cursor hygiene), however schema-valid: the fuzzer's Sequences (the feed's
    after, a subscription's StartFrom and an acknowledgement's Through) become 0,
    which every registry has."""
    if isinstance(case.query, dict) and _a_sequence(case.query.get("after")):
        case.query["after"] = 0
    body = case.body if isinstance(case.body, dict) else {}
    if _a_sequence(body.get("Through")):
        body["Through"] = 0
    start = body.get("StartFrom")
    if isinstance(start, dict) and _a_sequence(start.get("Sequence")):
        start["Sequence"] = 0


def _align_case(case):
    _align_cursors(case)
    if case.path_parameters and "EventType" in case.path_parameters and case.method.upper() == "PUT" \
            and isinstance(case.body, dict):
        if isinstance(case.body.get("Schema"), dict):  # one of another type is a negative case: kept
            case.body.pop("Schema")
        if case.body.get("Description") is None:
            case.body["Description"] = "Registered by the fuzzer."
    if case.path_parameters and "ProgramId" in case.path_parameters and case.method.upper() == "PUT" \
            and isinstance(case.body, dict) and case.body.get("RegisteredEventTypesOnly") is True:
        case.body["RegisteredEventTypesOnly"] = False
    if case.path_parameters and "eventId" in case.path_parameters:
        _align(case.body, case.path_parameters["eventId"])
    elif isinstance(case.body, dict) and isinstance(case.body.get("Events"), list):
        seen = set()
        for index, item in enumerate(case.body["Events"]):
            event_id = item.get("EventId") if isinstance(item, dict) else None
            if not isinstance(event_id, str):
                continue  # a body of the wrong shape: left as generated
            if event_id in seen and _prefix(event_id):
                event_id = item["EventId"] = f"{_prefix(event_id)}-dup{index}"
            seen.add(event_id)
            _align(item, event_id)


@schemathesis.hook
def map_case(ctx, case):
    _align_case(case)
    return case


@schemathesis.hook
def before_call(ctx, case, kwargs):
    _align_case(case)  # the examples and coverage phases do not pass through map_case
