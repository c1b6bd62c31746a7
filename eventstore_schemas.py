"""eventstore's event-type schemas: a JSON Schema per event type (docs/API.md
§5b), checked when it is set and used to validate every write of that type.

The validator is ``jsonschema`` (the reference implementation of every draft),
imported on first use: a server without it runs until a schema is needed,
and then answers 503 naming the package. Nothing is ever fetched: a schema
must be self-contained (every reference internal, checked to resolve when it
is set), and the validators resolve references through a registry that holds
only the metaschemas and the schema itself (``referencing``'s Registry, which
retrieves nothing). ``format`` is an annotation only.

Bounded work. Python's ``re`` backtracks: ``^(a+)+$`` against 25 characters
took 0.87 s and each more character doubles it; even ``\\d+x`` against 20,000
digits took 1.7 s (quadratic: unanchored search). So patterns run on RE2
(``google-re2``, linear time: 3 ms for a million characters), and a pattern RE2
cannot run (a backreference, a lookaround) is refused when the schema is set.
jsonschema calls ``re.search`` in four modules (pattern, patternProperties,
additionalProperties, unevaluatedProperties); each of those modules is handed
a ``re`` whose ``search`` is RE2's for any pattern RE2 compiles. uniqueItems is
done by hashing (jsonschema compares every pair: quadratic); multipleOf of an
integer past float range by fractions (jsonschema 4.26 raises OverflowError
there). And every keyword
evaluated counts against a budget of MAX_STEPS per event (a schema can refer to
itself in ways that make one event cost exponentially many evaluations): past
it, the event does not validate (one violation saying so), whatever it holds.

Most events are valid: a schema of "properties" and assertion keywords only is
also walked without jsonschema's error machinery (fast_pass): each keyword still
decided by jsonschema's own keyword function or type checker; only an event
refused there goes through jsonschema's iter_errors, for its errors.

Below the app; imports nothing of it. Compiled validators are kept per process
by (event type, SchemaVersion): see SchemaCache.
"""

import functools
import json
import re
import threading
from collections import OrderedDict
from fractions import Fraction

from eventstore_errors import Problem, bad_request, field_error

DRAFT_2020_12 = "https://json-schema.org/draft/2020-12/schema"
DRAFTS = {  # $schema -> the jsonschema validator class's name
    DRAFT_2020_12: "Draft202012Validator",
    "https://json-schema.org/draft/2019-09/schema": "Draft201909Validator",
    "http://json-schema.org/draft-07/schema": "Draft7Validator",
}
MAX_SCHEMA_BYTES = 256 * 1024   # a schema's canonical JSON
MAX_STEPS = 200_000             # keyword evaluations for one event (well under a second of CPU)
REFERENCE_STEPS = 10            # what following a reference counts: it costs ten plain keywords
MAX_MESSAGE = 300               # characters of a violation's message
MAX_LISTED = 100                # violations listed in one answer
PACKAGES = "jsonschema and google-re2"


class TooCostly(Exception):
    """One event's validation went past MAX_STEPS."""


# --- The packages, imported on first use -------------------------------------------

_loaded = None
_loading = threading.Lock()


def packages():
    """-> the loaded validation toolkit (a _Toolkit); Problem 503 naming the
    packages when they are not installed."""
    global _loaded
    if _loaded is None:
        with _loading:
            if _loaded is None:
                try:
                    _loaded = _Toolkit()
                except ImportError as exc:
                    raise Problem(503, f"Event-type schemas need the Python packages {PACKAGES}, which are not "
                                       f"installed on this server ({exc}); install them with: pip install -r "
                                       "requirements.txt", headers=[("Retry-After", "60")]) from None
    return _loaded


class _Toolkit:
    """jsonschema's validator classes for the three drafts, extended for bounded work."""

    def __init__(self):
        import attrs
        import jsonschema
        import jsonschema._keywords
        import jsonschema._legacy_keywords
        import jsonschema._utils
        import re2
        from jsonschema.exceptions import ValidationError
        from jsonschema_specifications import REGISTRY as METASCHEMAS
        from referencing import Resource
        from referencing.exceptions import Unresolvable
        import referencing.jsonschema

        self.re2 = re2
        self.re2_options = re2.Options()
        self.re2_options.log_errors = False  # a refused pattern is the client's error, not a log line
        self.ValidationError, self.Resource, self.Unresolvable = ValidationError, Resource, Unresolvable
        self.metaschemas = METASCHEMAS  # a Registry without retrieval: nothing is ever fetched
        self.specification_of = {uri: referencing.jsonschema.specification_with(uri) for uri in DRAFTS}
        for module in (jsonschema._keywords, jsonschema._legacy_keywords, jsonschema._utils):
            if not isinstance(module.re, _RE2Search):
                module.re = _RE2Search(self.regex)
        self.jsonschema_multiple_of = jsonschema._keywords.multipleOf
        overrides = {"uniqueItems": self._unique_items, "multipleOf": self._multiple_of}
        self.classes = {}
        self.metaschema_checkers = {}
        self.fast_parts = {}  # draft -> (its keywords' functions, uncounted; its type checker's functions)
        for uri, name in DRAFTS.items():
            base = getattr(jsonschema, name)
            keywords = {keyword: _counted(function, REFERENCE_STEPS if keyword in REFERENCES else 1)
                        for keyword, function in {**base.VALIDATORS, **overrides}.items()}
            extended = self.classes[uri] = jsonschema.validators.extend(base, keywords)
            extended.descend = _leaf_descend(extended.descend, {**base.VALIDATORS, **overrides})
            extended.is_type = _direct_is_type(extended.is_type, extended.TYPE_CHECKER)
            self.fast_parts[uri] = ({**base.VALIDATORS, **overrides}, _type_functions(extended.TYPE_CHECKER))
            meta = jsonschema.validators.validator_for(base.META_SCHEMA, default=base)
            # format_checker None: the metaschema's "format": "regex" would compile
            # patterns with Python's re, which refuses some RE2 takes (\p{L}).
            self.metaschema_checkers[uri] = meta(base.META_SCHEMA, registry=METASCHEMAS, format_checker=None)
        extended_of = {getattr(jsonschema, name): self.classes[uri] for uri, name in DRAFTS.items()}
        for extended in self.classes.values():
            extended.evolve = _evolve_within(extended, extended_of, jsonschema.validators.validator_for, attrs)

    @functools.lru_cache(maxsize=1024)
    def regex(self, pattern):
        """RE2's compiled ``pattern``, or None when RE2 cannot run it."""
        try:
            return self.re2.compile(pattern, self.re2_options)
        except Exception:
            return None

    def _unique_items(self, validator, unique, instance, schema):
        if unique and validator.is_type(instance, "array"):
            seen = set()
            for item in instance:
                key = _equality_key(item)
                if key in seen:
                    yield self.ValidationError(f"{_short(instance)} has non-unique elements")
                    return
                seen.add(key)

    def _multiple_of(self, validator, divisor, instance, schema):
        """jsonschema's multipleOf; but where a float divisor's quotient is no float (an
        integer past 1e308: jsonschema 4.26 divides outside its try and raises
        OverflowError, a 500), decided exactly as its own overflow fallback does."""
        try:
            yield from self.jsonschema_multiple_of(validator, divisor, instance, schema)
        except OverflowError:
            if (Fraction(instance) / Fraction(divisor)).denominator != 1:
                yield self.ValidationError(f"{instance!r} is not a multiple of {divisor}")


class _RE2Search:
    """What jsonschema's modules see as ``re``: ``search`` runs RE2 for a pattern
    RE2 compiles (every pattern of a schema set here does), Python's re for
    others (jsonschema used elsewhere in the process); everything else is re's."""

    def __init__(self, compiled):
        self._compiled = compiled

    def search(self, pattern, string, flags=0):
        compiled = self._compiled(pattern) if not flags else None
        return compiled.search(string) if compiled is not None else re.search(pattern, string, flags)

    def __getattr__(self, name):
        return getattr(re, name)


_budget = threading.local()

# Keywords that only assert or annotate: a subschema made of these alone needs no
# validator of its own (no references, no subschemas, no annotations to collect).
LEAF_KEYWORDS = frozenset((
    "type", "enum", "const", "multipleOf", "maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum",
    "maxLength", "minLength", "pattern", "maxItems", "minItems", "uniqueItems", "maxProperties", "minProperties",
    "required", "dependentRequired", "format", "title", "description", "default", "examples", "deprecated",
    "readOnly", "writeOnly", "$comment", "contentEncoding", "contentMediaType"))


def _type_functions(checker):
    """{type name: a function instance -> bool} calling the type checker's own
    functions, or None where this jsonschema's checker keeps them elsewhere."""
    functions = getattr(checker, "_type_checkers", None)
    if functions is None:
        return None
    return {name: functools.partial(function, checker) for name, function in functions.items()}


def _direct_is_type(is_type, checker):
    """The validator's ``is_type``, calling the type checker's own function for each
    type directly (PERF: through the checker's map and its error handling, a quarter
    of a 20-property event's time). Where this jsonschema's checker keeps them
    elsewhere, or for a type it does not know, jsonschema's own way."""
    direct = _type_functions(checker)
    if direct is None:
        return is_type

    def is_type_directly(self, instance, type):
        function = direct.get(type)
        return function(instance) if function is not None else is_type(self, instance, type)
    return is_type_directly


def _evolve_within(cls, extended_of, validator_for, attrs):
    """jsonschema's ``evolve`` (descend's and references' way to a subschema's
    validator), but always to one of the extended classes: for a subschema naming
    its own $schema, jsonschema's picks that draft's plain class, whose keywords
    count no steps (a schema could run past the budget: 2**15 evaluations of an
    event went unbounded). A $schema of an accepted draft gets that draft's
    extended class (as jsonschema would switch drafts); any other, the class at hand."""
    fields = [(field.name, field.alias) for field in attrs.fields(cls) if field.init]

    def evolve(self, **changes):
        schema = changes.setdefault("schema", self.schema)
        chosen = extended_of.get(validator_for(schema, default=type(self)), type(self))
        for name, alias in fields:
            changes.setdefault(alias, getattr(self, name))
        return chosen(**changes)
    return evolve


def _leaf_descend(descend, keywords):
    """jsonschema's ``descend``, but for a subschema of LEAF_KEYWORDS only, whose
    keywords (``keywords``: their functions, uncounted) are run with the validator
    at hand, counting one step for the subschema (PERF: descend builds a validator
    per subschema, most of a property's cost: a 20-property event took 330 µs;
    docs/DESIGN.md "Measured choices"). The keywords' own functions still decide;
    the errors get the places descend gives them. A leaf subschema's work is linear
    in the value it checks, so one step each keeps the budget's bound."""
    def leaf_or_descend(self, instance, schema, path=None, schema_path=None, resolver=None):
        if not isinstance(schema, dict) or not schema.keys() <= LEAF_KEYWORDS:
            yield from descend(self, instance, schema, path, schema_path, resolver)
            return
        _budget.left -= 1
        if _budget.left < 0:
            raise TooCostly()
        for keyword, value in schema.items():
            function = keywords.get(keyword)
            for error in (function and function(self, value, instance, schema)) or ():
                error._set(validator=keyword, validator_value=value, instance=instance, schema=schema,
                           type_checker=self.TYPE_CHECKER)
                error.schema_path.appendleft(keyword)
                if path is not None:
                    error.path.appendleft(path)
                if schema_path is not None:
                    error.schema_path.appendleft(schema_path)
                yield error
    return leaf_or_descend


REFERENCES = ("$ref", "$dynamicRef", "$recursiveRef")


def _counted(keyword, steps):
    """A keyword's function that counts ``steps`` against this thread's budget first."""
    def evaluate(validator, value, instance, schema):
        _budget.left -= steps
        if _budget.left < 0:
            raise TooCostly()
        return keyword(validator, value, instance, schema)
    return evaluate


# --- The fast pass: is the event valid? ------------------------------------------
#
# PERF: jsonschema's iter_errors spends most of a valid event's time on its
# machinery (a generator per keyword, error bookkeeping, a validator per non-leaf
# subschema): 35 µs for a 20-property event, where the checks themselves are a
# few. Most events are valid, so a schema made of "properties" and LEAF_KEYWORDS
# only is also compiled into a walk of its "properties" that asks jsonschema's own
# keyword functions (and its type checker's functions, for "type") about each
# leaf keyword, stopping at the first error; only an event refused there goes
# through jsonschema's iter_errors, whose errors are the answer. No value is judged
# by code of ours (issue 33: no validator by hand), so "valid" means what it meant.
# The budget: such a schema visits each of its subschemas once per event, so an
# event costs at most as many steps as the schema has keywords and subschemas,
# counted at compile time: a schema that could reach MAX_STEPS gets no fast pass.

FAST_NESTING = 32  # "properties" levels a fast pass follows (MAX_SCHEMA_DEPTH 64 allows 32)


class _NoFastPass(Exception):
    """The schema has a keyword the fast pass leaves to jsonschema."""


def fast_pass(schema, keywords, types, validator):
    """A function EventData -> True when it validates against ``schema`` (for the
    validator class whose keyword functions are ``keywords`` and type functions
    ``types``; ``validator`` the schema's, handed to the leaf keywords' functions),
    False when it does not; None when the schema is not one the fast pass takes."""
    if types is None or not {"object", "number", "string"} <= types.keys():
        return None
    steps = [0]
    try:
        check = _fast_subschema(schema, keywords, types, validator, steps, 0)
    except _NoFastPass:
        return None
    return check if steps[0] < MAX_STEPS else None


def _fast_subschema(schema, keywords, types, validator, steps, depth):
    if schema is True:
        return _always
    if schema is False:
        return _never
    if not isinstance(schema, dict) or depth > FAST_NESTING or (depth and "$schema" in schema):
        raise _NoFastPass()  # a subschema's own $schema switches jsonschema to that draft's rules
    steps[0] += 1 + len(schema)
    checks = []
    for keyword, value in schema.items():
        function = keywords.get(keyword)
        if function is None:
            continue  # not a keyword of this draft: jsonschema skips it too
        if keyword == "properties" and isinstance(value, dict):
            checks.append(_fast_properties({name: _fast_subschema(subschema, keywords, types, validator, steps,
                                                                  depth + 1)
                                            for name, subschema in value.items()}, types["object"]))
        elif keyword in LEAF_KEYWORDS:
            checks.append(_fast_leaf(keyword, value, schema, function, types, validator))
        else:
            raise _NoFastPass()
    return _every(checks)


def _always(instance):
    return True


def _never(instance):
    return False


def _every(checks):
    if not checks:
        return _always
    if len(checks) == 1:
        return checks[0]
    if len(checks) == 2:
        first, second = checks
        return lambda instance: first(instance) and second(instance)

    def every(instance):
        for check in checks:
            if not check(instance):
                return False
        return True
    return every


def _fast_properties(children, is_object):
    """jsonschema's ``properties``: each property present validates against its subschema."""
    children = list(children.items())

    def properties(instance):
        if not is_object(instance):
            return True
        for name, check in children:
            if name in instance and not check(instance[name]):
                return False
        return True
    return properties


def _fast_leaf(keyword, value, schema, function, types, validator):
    """One leaf keyword as a predicate, decided by jsonschema itself: ``type`` by
    the type checker's own functions, every other keyword by its keyword function
    (whose first error, if any, is the answer). Nothing here judges a value."""
    if keyword == "type":
        names = value if isinstance(value, list) else [value]
        if all(isinstance(name, str) and name in types for name in names):
            functions = [types[name] for name in names]
            if len(functions) == 1:
                return functions[0]
            return lambda instance: any(is_type(instance) for is_type in functions)

    def by_jsonschema(instance):
        for _ in function(validator, value, instance, schema) or ():
            return False
        return True
    return by_jsonschema


def _equality_key(value):
    """A hashable key equal for JSON-equal values (1 and 1.0 alike, true and 1 not)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return (type(value).__name__, value)
    if isinstance(value, (int, float)):
        return ("number", int(value) if isinstance(value, float) and value.is_integer() else value)
    if isinstance(value, list):
        return ("array", tuple(map(_equality_key, value)))
    return ("object", frozenset((key, _equality_key(item)) for key, item in value.items()))


def _short(value):
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 100 else text[:97] + "..."


# --- Checking a schema when it is set ----------------------------------------------

def schema_error(message):
    return bad_request("The Schema is not valid; see errors.", [field_error("Schema", message)])


def check_schema(schema, size):
    """A parsed ``Schema`` (``size``: its canonical JSON's length) -> None, or
    Problem(400) naming Schema: not an object, too large, an unknown draft,
    invalid against its metaschema, a reference that is not internal or does
    not resolve, a ``$id`` below the root, a pattern RE2 cannot run. Problem
    503 when the packages are missing."""
    if not isinstance(schema, dict):
        raise schema_error(f"expected a JSON Schema whose root is an object, got {_kind(schema)}")
    if size > MAX_SCHEMA_BYTES:
        raise schema_error(f"is {size} bytes as JSON; at most {MAX_SCHEMA_BYTES} are accepted")
    draft = draft_of(schema)
    toolkit = packages()
    errors = []
    for error in toolkit.metaschema_checkers[draft].iter_errors(schema):
        errors.append(field_error("Schema", f"at {_pointer(error.absolute_path) or '/'}: {_message(error)} "
                                            "(by the draft's metaschema)"))
        if len(errors) >= MAX_LISTED:
            break
    if errors:
        raise bad_request(f"The Schema is not valid against its metaschema ({draft}); see errors.", errors)
    specification = toolkit.specification_of[draft]
    resolver = toolkit.metaschemas.resolver_with_root(toolkit.Resource(contents=schema, specification=specification))
    for place, subschema in _subschemas(specification, schema):
        if place and "$id" in subschema:
            errors.append(field_error("Schema", f"at {place}: a $id below the root is not accepted "
                                                "(the schema must be one resource)"))
        for keyword in REFERENCES:
            ref = subschema.get(keyword)
            if ref is None:
                continue
            if not isinstance(ref, str) or not ref.startswith("#"):
                errors.append(field_error("Schema", f"at {place or '/'}: {keyword} {_short(ref)} is not internal "
                                                    "(it must begin with #); nothing is ever fetched"))
                continue
            try:
                resolver.lookup(ref)
            except (toolkit.Unresolvable, LookupError, ValueError, TypeError):
                errors.append(field_error("Schema", f"at {place or '/'}: {keyword} {_short(ref)} does not "
                                                    "resolve within the schema"))
        patterns = [subschema.get("pattern")] + list(_object(subschema.get("patternProperties")))
        for pattern in patterns:
            if isinstance(pattern, str) and toolkit.regex(pattern) is None:
                errors.append(field_error("Schema", f"at {place or '/'}: the pattern {_short(pattern)} is not "
                                                    "accepted: its matching time could not be bounded (a "
                                                    "backreference or lookaround), or it is not a regular expression"))
    if errors:
        raise bad_request("The Schema is not valid; see errors.", errors)


def draft_of(schema):
    """The draft's $schema URI a schema names (2020-12 by default); Problem(400) for another."""
    uri = schema.get("$schema", DRAFT_2020_12)
    normalized = uri.rstrip("#") if isinstance(uri, str) else None
    if normalized not in DRAFTS:
        raise schema_error(f"$schema {_short(uri)} is not one of the accepted drafts: " + ", ".join(DRAFTS))
    return normalized


def _subschemas(specification, schema):
    """(JSON Pointer within the schema, subschema) for the root and every subschema
    below it, by the draft's own keywords (so a "$ref" inside a "const" is data)."""
    stack = [("", schema)]
    while stack:
        place, subschema = stack.pop()
        if not isinstance(subschema, dict):
            continue
        yield place, subschema
        for keyword, value in subschema.items():
            inner = specification.subresources_of({keyword: value})
            for child in inner:
                stack.append((f"{place}/{_escape(keyword)}{_locate(value, child)}", child))


def _locate(value, child):
    """Where ``child`` sits within a keyword's ``value``: "" (the value itself),
    "/n" (an array's item) or "/name" (an object's member)."""
    if value is child:
        return ""
    if isinstance(value, list):
        for index, item in enumerate(value):
            if item is child:
                return f"/{index}"
    if isinstance(value, dict):
        for name, item in value.items():
            if item is child:
                return f"/{_escape(name)}"
    return ""


def _object(value):
    return value if isinstance(value, dict) else ()


def _kind(value):
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            type(None): "null"}.get(type(value), "a number")


# --- Validating events ------------------------------------------------------------

def _escape(name):
    return str(name).replace("~", "~0").replace("/", "~1")


def _pointer(path):
    return "".join(f"/{_escape(part)}" for part in path)


def _message(error):
    message = error.message
    return message if len(message) <= MAX_MESSAGE else message[:MAX_MESSAGE - 3] + "..."


class CompiledSchema:
    """One schema version, ready to validate EventData."""

    def __init__(self, schema):
        toolkit = packages()
        self.draft = draft_of(schema)
        self.validator = toolkit.classes[self.draft](schema, registry=toolkit.metaschemas)
        self.valid = fast_pass(schema, *toolkit.fast_parts[self.draft], self.validator)

    def violations(self, data, limit=MAX_LISTED):
        """[{"field": "EventData/<pointer>", "message"}] of ``data`` (at most ``limit``;
        empty when it validates)."""
        if self.valid is not None and self.valid(data):  # PERF: most events are valid; see fast_pass
            return []
        found = []
        _budget.left = MAX_STEPS
        try:
            for error in self.validator.iter_errors(data):
                found.extend(_entries(error))
                if len(found) >= limit:
                    return found[:limit]
        except TooCostly:
            return [field_error("EventData", f"checking it against the schema took more than {MAX_STEPS:,} steps; "
                                             "an event must be checkable within that")]
        except RecursionError:
            return [field_error("EventData", "the schema refers to itself without end for this event")]
        return found


def _entries(error):
    """A jsonschema error -> its violation entries: ``field`` is EventData plus the
    place as a JSON Pointer; a missing required property is named by its own place."""
    place = "EventData" + _pointer(error.absolute_path)
    if error.validator in ("required", "dependentRequired", "dependencies") and isinstance(error.instance, dict):
        names = error.validator_value if isinstance(error.validator_value, list) else \
            [name for names in _object(error.validator_value).values() if isinstance(names, list) for name in names]
        for name in names:
            if isinstance(name, str) and name not in error.instance and error.message.startswith(repr(name)):
                return [field_error(f"{place}/{_escape(name)}", _message(error))]
    return [field_error(place, _message(error))]


class SchemaCache:
    """Compiled schemas of this process, by (event type, SchemaVersion): a version
    never changes, so an entry never goes stale; a write reads its type's current
    version inside its transaction and asks for that one. ``latest`` remembers the
    version last seen per type, so that a request can validate before its
    transaction (which then only checks that the version is still that one)."""

    MAX_ENTRIES = 1000

    def __init__(self):
        self._compiled = OrderedDict()
        self._lock = threading.Lock()
        self.latest = {}  # event type -> the SchemaVersion last seen (None: no schema)

    def compiled(self, event_type, version, load):
        """The CompiledSchema of (event_type, version); ``load()`` gives its schema
        (a parsed JSON value) when it is not compiled yet."""
        key = (event_type, version)
        with self._lock:
            found = self._compiled.get(key)
            if found is not None:
                self._compiled.move_to_end(key)
                return found
        compiled = CompiledSchema(load())
        with self._lock:
            self._compiled[key] = compiled
            while len(self._compiled) > self.MAX_ENTRIES:
                self._compiled.popitem(last=False)
        return compiled

    def seen(self, event_type, version):
        if len(self.latest) > 10 * self.MAX_ENTRIES:
            self.latest.clear()
        self.latest[event_type] = version
