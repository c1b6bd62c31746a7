"""The admin command line of eventstore: ``python eventstore.py [--db PATH|URL] COMMAND``
(or ``python eventstore_admin.py``). Programs, users and keys, the event-type
catalogue, subscriptions, backup, export and import, on either backend, also while
a server runs.
"""

import argparse
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from eventstore import (DEFAULT_DB, EVENT_ID_RE, EVENT_ID_RULE, USER_ID_RE, _text_error, add_key, add_user,
                        compiled_schema, event_type_error, format_datetime, import_tombstone, open_storage, parse_json,
                        program_id_error, program_of, put_event_later, put_event_type, render_event,
                        process_writer, subscriptions_json, unregister_event_type, unregistered_type_error,
                        validate_event, validate_event_type_body, webhook_deliverer)
from eventstore_metrics import FILE_SUFFIX as METRICS_FILE
from eventstore_metrics import Metrics
from eventstore_news import CommitNews
from eventstore_schemas import SchemaCache
from eventstore_errors import Problem, bad_request
from eventstore_storage import (POSTGRES_SCHEMES, Backups, StorageOpenError, TypeRules, now_us, safe_db_name,
                                safe_text)
from eventstore_webhooks import MAX_BACKOFF, PAUSE_AFTER
from eventstore_writer import Later


class CommandError(Exception):
    """A command-line error: printed to standard error, exit status 1."""


def _grants_from(args):
    grants = {program_id: "read" for program_id in args.read or ()}
    grants.update({program_id: "write" for program_id in args.write or ()})
    return grants


def _check_programs(session, program_ids):
    missing = [p for p in program_ids if session.find_program(p) is None]
    if missing:
        raise CommandError(f"not a registered program: {', '.join(missing)} "
                           "(register it with: program add PROGRAM_ID)")


def _check_user(session, user_id):
    """-> the user's state ("active" or "disabled"); CommandError if there is no such user."""
    state = session.user_state(user_id)
    if state is None:
        raise CommandError(f"no such user: {user_id}")
    return state


def _fmt_time(micros):
    return format_datetime(micros) if micros is not None else "never"


def cmd_program_add(session, args, out):
    if program_id_error(args.program_id):
        raise CommandError(program_id_error(args.program_id)["message"])
    if args.name is not None and not args.name.strip():
        raise CommandError("--name must not be empty")
    with session.transaction(now_us()) as tx:
        found = tx.find_program(args.program_id)
        current = found and found.name
        if found and args.name is None and args.registered_types_only is None:
            raise CommandError(f"program {args.program_id} already exists (give --name to rename it, "
                               "--registered-types-only or --any-types to change what it takes)")
        name = args.name or current or args.program_id
        strict = tx.put_program(args.program_id, name, args.registered_types_only)
    takes = "registered event types only" if strict else "any event type"
    print(f"program {args.program_id} registered ({takes})", file=sys.stderr)


def cmd_program_list(session, args, out):
    for program in session.list_programs():
        takes = "registered-types-only" if program.registered_types_only else "any-types"
        print(f"{program.program_id}\t{program.name}\t{takes}", file=out)


def cmd_user_add(session, args, out):
    if not USER_ID_RE.fullmatch(args.user_id):
        raise CommandError(f"{args.user_id!r} is not a userId: 1-64 characters of A-Z a-z 0-9 . _ @ -")
    grants = _grants_from(args)
    _check_programs(session, grants)
    if session.user_state(args.user_id) is not None:
        raise CommandError(f"user {args.user_id} already exists (use: key add {args.user_id})")
    with session.transaction(now_us()) as tx:
        api_key = add_user(tx, args.user_id, args.system, grants)
    print(api_key, file=out)


def cmd_user_grant(session, args, out):
    grants = _grants_from(args)
    if not grants:
        raise CommandError("nothing to grant: give --read PROGRAM_ID or --write PROGRAM_ID")
    _check_user(session, args.user_id)
    _check_programs(session, grants)
    with session.transaction(now_us()) as tx:
        tx.set_grants(args.user_id, grants)
    print(f"granted {args.user_id}: " + ", ".join(f"{a} {p}" for p, a in grants.items()), file=sys.stderr)


def cmd_user_revoke(session, args, out):
    with session.transaction(now_us()) as tx:
        revoked = tx.revoke_grant(args.user_id, args.program_id)
    if not revoked:
        raise CommandError(f"user {args.user_id} holds no grant on {args.program_id}")
    print(f"revoked {args.user_id}'s access to {args.program_id}", file=sys.stderr)


def cmd_user_disable(session, args, out):
    _set_user_disabled(session, args.user_id, True)


def cmd_user_enable(session, args, out):
    _set_user_disabled(session, args.user_id, False)


def _set_user_disabled(session, user_id, disabled):
    with session.transaction(now_us()) as tx:
        if not tx.set_user_disabled(user_id, disabled):
            raise CommandError(f"no such user: {user_id}")
    print(f"user {user_id} {'disabled' if disabled else 'enabled'}", file=sys.stderr)


def cmd_user_list(session, args, out):
    for user in session.list_users():
        rights = "SYSTEM" if user.is_system else " ".join(f"{a}:{p}" for p, a in user.grants) or "-"
        print(f"{user.user_id}\t{rights}\t{'disabled' if user.disabled else 'active'}", file=out)


def cmd_key_add(session, args, out):
    if _check_user(session, args.user_id) == "disabled":
        raise CommandError(f"user {args.user_id} is disabled, so a key would not work "
                           f"(enable it first: user enable {args.user_id})")
    with session.transaction(now_us()) as tx:
        api_key = add_key(tx, args.user_id)
    print(api_key, file=out)


def cmd_key_list(session, args, out):
    _check_user(session, args.user_id)
    for key in session.list_keys(args.user_id):
        state = f"\trevoked {_fmt_time(key.revoked_us)}" if key.revoked_us else ""
        print(f"{key.key_id}\tcreated {_fmt_time(key.created_us)}\tlast used {_fmt_time(key.last_used_us)}{state}",
              file=out)


def cmd_key_revoke(session, args, out):
    with session.transaction(now_us()) as tx:
        revoked = tx.revoke_key(args.user_id, args.key_id)
    if not revoked:
        raise CommandError(f"user {args.user_id} has no key {args.key_id} (see: key list {args.user_id})")
    print(f"key {args.key_id} revoked", file=sys.stderr)


def _event_type_arg(event_type):
    message = event_type_error(event_type)
    if message:
        raise CommandError(f"EVENT_TYPE {event_type!r}: {message}")
    return event_type


FLAGS = {"Description": "--description", "Schema": "--schema", "RetainDays": "--retain-days"}


def cmd_type_add(session, args, out):
    event_type = _event_type_arg(args.event_type)
    body = {}
    if args.description is not None:
        body["Description"] = args.description
    if args.schema is not None:
        try:
            with open(args.schema, "rb") as schema_file:
                body["Schema"] = parse_json(schema_file.read())
        except Problem as problem:
            raise CommandError(f"--schema {args.schema}: {problem.detail}") from None
    elif args.no_schema:
        body["Schema"] = None
    if args.retain_days is not None:
        body["RetainDays"] = args.retain_days
    elif args.no_retain_days:
        body["RetainDays"] = None
    if not body:
        raise CommandError("nothing to do: give --description, --schema, --no-schema, --retain-days or "
                           "--no-retain-days")

    def write(work):
        with session.transaction(now_us()) as tx:
            return work(tx)
    try:
        change = validate_event_type_body(body)
        outcome = put_event_type(session, write, event_type, change, args.dry_run)
    except Problem as problem:
        print(_problem_lines(problem, FLAGS), file=sys.stderr)
        raise CommandError(problem.detail) from None
    if args.dry_run:
        print(json.dumps(outcome, ensure_ascii=False, indent=2), file=out)
        print(f"dry run: the schema is {'compatible with' if outcome['Compatible'] else 'refused by'} the "
              f"{event_type} events stored ({outcome['Total']} do not validate); nothing was changed",
              file=sys.stderr)
        if not outcome["Compatible"]:
            raise CommandError("the schema does not validate every live event of the type")
        return
    entry = json.loads(outcome)
    said = [f"schema version {entry['SchemaVersion']}" if entry["SchemaVersion"] else "no schema",
            f"kept {entry['RetainDays']} days" if entry["RetainDays"] else "kept for ever"]
    print(f"event type {event_type} registered ({', '.join(said)})", file=sys.stderr)


def _problem_lines(problem, flags):
    """A problem's errors (and a 409's violations), one per line, fields named as flags."""
    lines = [f"{flags.get(error['field'], error['field'])}: {error['message']}" for error in problem.errors or ()]
    lines += [f"{violation['EventId']}: {violation['field']}: {violation['message']}"
              for violation in problem.members.get("Violations", ())]
    return "\n".join(lines) or problem.detail


def cmd_type_show(session, args, out):
    event_type = _event_type_arg(args.event_type)
    entries = json.loads(session.event_types_json(None, event_type))
    if not entries:
        raise CommandError(f"no event type {event_type}: neither registered nor used")
    print(json.dumps(entries[0], ensure_ascii=False, indent=2), file=out)


def _escape(text):
    """A field of a tab-separated line: backslash, tab and line feed escaped."""
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n")


def cmd_type_list(session, args, out):
    for entry in json.loads(session.event_types_json(None)):
        used = " ".join(f"{count['ProgramId']}={count['Events']}" for count in entry["Programs"]) or "-"
        print(f"{_escape(entry['EventType'])}\t{'registered' if entry['Registered'] else 'unregistered'}\t{used}"
              f"\t{_escape(entry['Description'] or '')}", file=out)


def cmd_type_remove(session, args, out):
    event_type = _event_type_arg(args.event_type)
    try:
        with session.transaction(now_us()) as tx:
            unregister_event_type(tx, event_type)
    except Problem as problem:
        raise CommandError(problem.detail) from None
    print(f"event type {event_type} unregistered", file=sys.stderr)


def cmd_subscription_list(session, args, out):
    for state in subscriptions_json(session, session.list_subscriptions()):
        behind = f"{state['Behind']}{'' if state['BehindIsExact'] else '+'}"
        print(f"{state['Name']}\t{state['Owner']}\t{state['Position']}\t{behind}\t{state['PendingSinceUTC'] or '-'}",
              file=out)


def cmd_subscription_remove(session, args, out):
    with session.transaction(now_us()) as tx:
        if not tx.delete_subscription(args.name):
            raise CommandError(f"no such subscription: {args.name} (see: subscription list)")
    print(f"subscription {args.name} removed", file=sys.stderr)


class Progress:
    """Progress of long work on standard error, only when it is a terminal:
    count, rate and, where the total is known, an estimate of the time left."""

    def __init__(self, label, total=None, stream=None, enabled=None):
        self.label, self.total = label, total
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.started = self.shown = time.monotonic()
        self.count = 0

    def update(self, count):
        self.count = count
        now = time.monotonic()
        if self.enabled and now - self.shown >= 0.5:
            self.shown = now
            self.stream.write(f"\r{self.describe(now)}\x1b[K")
            self.stream.flush()

    def describe(self, now):
        rate = self.count / max(now - self.started, 1e-9)
        text = f"{self.label}: {self.count:,}"
        if self.total:
            text += f"/{self.total:,} ({100 * self.count / self.total:.0f}%)"
        text += f", {rate:,.0f}/s"
        if self.total and rate > 0:
            text += f", about {max(self.total - self.count, 0) / rate:.0f}s left"
        return text

    def finish(self):
        if self.enabled:
            self.stream.write(f"\r{self.describe(time.monotonic())}\x1b[K\n")
            self.stream.flush()


def _fsync_path(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cmd_backup(session, args, out):
    if not isinstance(session.storage, Backups):
        raise CommandError(f"backup copies a SQLite file; on {session.storage.backend} use its own tools "
                           "(for PostgreSQL: pg_dump, or a base backup with WAL archiving)")
    dest = Path(args.dest)
    if not dest.parent.is_dir():
        raise CommandError(f"there is no folder {dest.parent} to write {dest.name} into")
    if dest.exists() and not args.force:
        raise CommandError(f"{dest} exists; give --force to overwrite it")
    partial = dest.with_name(dest.name + ".partial")
    partial.unlink(missing_ok=True)
    progress = Progress("backup (pages)")
    events = session.storage.backup_to(partial, lambda done, total: (setattr(progress, "total", total), progress.update(done)))
    progress.finish()
    _fsync_path(partial)
    verdict, copied = session.storage.check_copy(partial)
    if verdict != "ok" or copied != events:
        partial.unlink(missing_ok=True)
        raise CommandError(f"the copy did not verify ({verdict}); nothing was written to {dest}")
    os.replace(partial, dest)
    _fsync_path(dest.parent)
    print(f"ok: {events:,} events backed up to {dest} (integrity_check ok)", file=sys.stderr)


def cmd_export(session, args, out):
    programs = tuple(dict.fromkeys(args.program or ()))
    for program_id in programs:
        if session.find_program(program_id) is None:
            raise CommandError(f"not a registered program: {program_id}")
    progress = Progress("export")
    count = 0
    for count, row in enumerate(session.export_events(programs), 1):
        out.write(render_event(row) + "\n")
        if count % 1000 == 0:
            progress.update(count)
    out.flush()
    progress.update(count)
    progress.finish()
    print(f"ok: {count:,} events exported", file=sys.stderr)


IMPORT_IGNORED = frozenset(("Revision", "Sequence", "CreatedUTC", "UpdatedUTC", "Deleted"))
TOMBSTONE_FIELDS = frozenset(("EventId", "ProgramId", "EventType"))


def parse_import_line(line, registered):
    """One JSON line as export writes it -> ("put", EventInput) or ("delete",
    event_id); Problem if it would not be accepted by PUT or DELETE."""
    record = parse_json(line)
    if not isinstance(record, dict):
        raise bad_request("expected a JSON object")
    event_id = record.get("EventId")
    if not isinstance(event_id, str) or not EVENT_ID_RE.fullmatch(event_id):
        raise bad_request(f"EventId: expected {EVENT_ID_RULE}")
    program_id = program_of(event_id)
    if program_id not in registered:
        raise Problem(404, f"program {program_id!r} is not registered")
    body = {name: value for name, value in record.items() if name not in IMPORT_IGNORED and name != "EventId"}
    if record.get("Deleted") is True:
        unknown = sorted(set(body) - TOMBSTONE_FIELDS)
        if unknown:
            raise bad_request(f"a tombstone carries no {', '.join(unknown)}")
        if body.get("ProgramId", program_id) != program_id:
            raise bad_request("ProgramId: must equal the EventId's prefix")
        message = _text_error(body.get("EventType"), 1, 100, allow_controls=False)
        if message:
            raise bad_request(f"EventType: {message}")
        return "delete", (event_id, body["EventType"])
    if record.get("Deleted") not in (None, False):
        raise bad_request("Deleted: expected true or false")
    return "put", validate_event(event_id, body)


def _problem_text(problem):
    if problem.errors:
        return "; ".join(f"{e['field']}: {e['message']}" for e in problem.errors)
    return problem.detail


def _read_lines(path):
    with open(path, "rb") as lines:
        for number, line in enumerate(lines, 1):
            if line.strip():
                yield number, line


def cmd_import(session, args, out):
    registered = {program.program_id for program in session.list_programs()}
    rules = TypeRules(session)  # what programs take and types' schemas, read once for the check
    schemas = SchemaCache()
    # First pass: check every line, import nothing if any is bad.
    bad, total = [], 0
    checking = Progress("checking")
    for number, line in _read_lines(args.file):
        total += 1
        try:
            kind, value = parse_import_line(line, registered)
            if kind == "put" and not rules.type_allowed(value.program_id, value.event_type):
                raise bad_request("", [unregistered_type_error(session, value.program_id, value.event_type)])
            if kind == "put" and rules.schema_version(value.event_type) is not None:
                violations = compiled_schema(schemas, session, value.event_type,
                                             rules.schema_version(value.event_type)).violations(value.data)
                if violations:
                    raise bad_request("", violations)
        except Problem as problem:
            bad.append(f"line {number}: {_problem_text(problem)}")
        if total % 1000 == 0:
            checking.update(total)
    checking.finish()
    if bad:
        print("\n".join(bad), file=sys.stderr)
        raise CommandError(f"{len(bad)} of {total} lines are not valid; nothing was imported")
    # Second pass: apply, as PUT and DELETE would, in large transactions.
    outcomes = dict.fromkeys(("created", "updated", "unchanged", "deleted", "already deleted"), 0)
    progress = Progress("import", total)
    lines = _read_lines(args.file)
    done = 0
    while chunk := list(itertools.islice(lines, args.batch)):
        with session.transaction(now_us(), seqs=len(chunk)) as tx:
            applied = []  # PUTs' outcomes are asked for at the end (see Later)
            for number, line in chunk:
                kind, value = parse_import_line(line, registered)
                try:
                    applied.append(put_event_later(tx, value, schemas=schemas) if kind == "put"
                                   else import_tombstone(tx, *value))
                except Problem as problem:  # a program's rules changed since the check
                    raise CommandError(f"line {number}: {_problem_text(problem)}; the {done:,} lines before "
                                       "its transaction were imported") from None
            for outcome in applied:
                outcomes[outcome.get()[0] if isinstance(outcome, Later) else outcome] += 1
        done += len(chunk)
        progress.update(done)
    progress.finish()
    print(f"ok: {total:,} lines imported: " + ", ".join(f"{n:,} {what}" for what, n in outcomes.items()),
          file=sys.stderr)


def cmd_deliver(session, args, out):
    """Deliver webhooks until SIGTERM or SIGINT (docs/API.md §11), as a serving
    process does: a deployment may serve with --no-webhook-delivery and run this
    apart. Within 10 s of the signal it has stopped, the deliveries in flight
    recorded or left to be sent again."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    storage = session.storage
    news = CommitNews(storage)
    metrics = Metrics(storage.local_file(METRICS_FILE))  # its deliveries count in the servers' /metrics
    writer = process_writer(storage, news, metrics)
    deliverer = webhook_deliverer(storage, writer, news, max_backoff=args.webhook_max_backoff,
                                  pause_after=args.webhook_pause_after, count=metrics.webhook_delivery)
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    deliverer.start()
    print(f"delivering the webhooks of {safe_db_name(storage)} until SIGTERM or SIGINT", file=sys.stderr, flush=True)
    while not stopping.wait(1.0):
        pass
    deliverer.stop()
    news.close()
    writer.stop()
    metrics.close()
    print("stopped delivering", file=sys.stderr)


def _positive_int(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def build_parser():
    parser = argparse.ArgumentParser(
        prog="eventstore.py", description="Administer an eventstore database.")
    parser.add_argument("--db", default=os.environ.get("EVENTSTORE_DB", DEFAULT_DB),
                        help="a SQLite database file, or a PostgreSQL URL postgresql://USER@HOST/DBNAME "
                             "(default: $EVENTSTORE_DB or %(default)s)")
    parser.add_argument("--create", action="store_true",
                        help="make a new SQLite database if there is none at --db (otherwise a missing file is "
                             "an error: a mistyped name would make an empty database)")
    groups = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")

    def command(group, name, func, help):
        sub = group.add_parser(name, help=help, description=help)
        sub.set_defaults(func=func)
        return sub

    def grant_flags(sub):
        sub.add_argument("--read", action="append", metavar="PROGRAM_ID", help="grant read on a program")
        sub.add_argument("--write", action="append", metavar="PROGRAM_ID", help="grant write on a program")

    program = groups.add_parser("program", help="register and list programs").add_subparsers(
        dest="command", required=True, metavar="COMMAND")
    sub = command(program, "add", cmd_program_add, "register a program (or rename one with --name)")
    sub.add_argument("program_id", metavar="PROGRAM_ID")
    sub.add_argument("--name", help="display name (default: the ProgramId)")
    takes = sub.add_mutually_exclusive_group()
    takes.add_argument("--registered-types-only", dest="registered_types_only", action="store_const", const=True,
                       help="accept only events whose EventType is registered (see: type add)")
    takes.add_argument("--any-types", dest="registered_types_only", action="store_const", const=False,
                       help="accept any EventType (the default for a new program)")
    command(program, "list", cmd_program_list,
            "list programs: id, name, and registered-types-only or any-types, tab-separated")

    event_type = groups.add_parser("type", help="the event-type catalogue").add_subparsers(
        dest="command", required=True, metavar="COMMAND")
    sub = command(event_type, "add", cmd_type_add,
                  "register an event type, or change its description, schema or retention")
    sub.add_argument("event_type", metavar="EVENT_TYPE")
    sub.add_argument("--description", metavar="TEXT",
                     help="what the type means and who publishes it (1-2000 characters; needed to register)")
    schema = sub.add_mutually_exclusive_group()
    schema.add_argument("--schema", metavar="FILE.json",
                        help="a JSON Schema for the events' EventData, proved on every live event of the type first")
    schema.add_argument("--no-schema", action="store_true", help="remove the type's schema")
    sub.add_argument("--dry-run", action="store_true",
                     help="only prove --schema on the stored events and print the report; change nothing")
    retain = sub.add_mutually_exclusive_group()
    retain.add_argument("--retain-days", type=_positive_int, metavar="N",
                        help="erase the type's events N days after their last change (1-36500)")
    retain.add_argument("--no-retain-days", action="store_true", help="keep the type's events for ever")
    sub = command(event_type, "show", cmd_type_show,
                  "print a type's entry as JSON: description, counts, schema and its version, RetainDays")
    sub.add_argument("event_type", metavar="EVENT_TYPE")
    command(event_type, "list", cmd_type_list,
            "list every registered or used type: name, registered or unregistered, PROGRAM=live events "
            "(- for none), description; tab-separated, with \\, tab and line feed escaped as \\\\, \\t, \\n")
    sub = command(event_type, "remove", cmd_type_remove, "unregister an event type (its events keep it)")
    sub.add_argument("event_type", metavar="EVENT_TYPE")

    user = groups.add_parser("user", help="manage users and their grants").add_subparsers(
        dest="command", required=True, metavar="COMMAND")
    sub = command(user, "add", cmd_user_add, "create a user and print its first API key")
    sub.add_argument("user_id", metavar="USER_ID")
    sub.add_argument("--system", action="store_true", help="every right on every program, and admin")
    grant_flags(sub)
    sub = command(user, "grant", cmd_user_grant, "grant a user read or write on programs")
    sub.add_argument("user_id", metavar="USER_ID")
    grant_flags(sub)
    sub = command(user, "revoke", cmd_user_revoke, "remove a user's grant on a program")
    sub.add_argument("user_id", metavar="USER_ID")
    sub.add_argument("program_id", metavar="PROGRAM_ID")
    sub = command(user, "disable", cmd_user_disable, "disable a user: none of its keys work any more")
    sub.add_argument("user_id", metavar="USER_ID")
    sub = command(user, "enable", cmd_user_enable, "enable a disabled user: its keys that are not revoked work again")
    sub.add_argument("user_id", metavar="USER_ID")
    command(user, "list", cmd_user_list, "list users: id, rights, state, tab-separated")

    key = groups.add_parser("key", help="manage API keys").add_subparsers(
        dest="command", required=True, metavar="COMMAND")
    sub = command(key, "add", cmd_key_add, "create another API key for a user and print it")
    sub.add_argument("user_id", metavar="USER_ID")
    sub = command(key, "list", cmd_key_list, "list a user's keys: public id, created, last used")
    sub.add_argument("user_id", metavar="USER_ID")
    sub = command(key, "revoke", cmd_key_revoke, "revoke one of a user's keys by its public id")
    sub.add_argument("user_id", metavar="USER_ID")
    sub.add_argument("key_id", metavar="KEY_ID")

    subscription = groups.add_parser("subscription", help="the subscriptions consumers keep in the registry"
                                     ).add_subparsers(dest="command", required=True, metavar="COMMAND")
    command(subscription, "list", cmd_subscription_list,
            "list every subscription: name, owner, position, behind (+ past 1000), pending since (- for "
            "nothing pending); tab-separated")
    sub = command(subscription, "remove", cmd_subscription_remove, "delete a subscription")
    sub.add_argument("name", metavar="NAME")

    sub = command(groups, "deliver", cmd_deliver,
                  "deliver webhooks until SIGTERM or SIGINT, apart from the servers (serve.py --no-webhook-delivery)")
    sub.add_argument("--webhook-max-backoff", type=_positive_int, default=MAX_BACKOFF, metavar="SECONDS",
                     help="the longest wait between a failing webhook's attempts (default: %(default)s)")
    sub.add_argument("--webhook-pause-after", type=_positive_int, default=PAUSE_AFTER, metavar="SECONDS",
                     help="pause a webhook that has had no 2xx answer this long (default: %(default)s)")
    sub = command(groups, "backup", cmd_backup,
                  "copy the database consistently while it is in use, verified before it says ok")
    sub.add_argument("dest", metavar="DEST_PATH")
    sub.add_argument("--force", action="store_true", help="overwrite DEST_PATH if it exists")
    sub = command(groups, "export", cmd_export,
                  "write every event (tombstones too) as JSON Lines to standard output, in feed order")
    sub.add_argument("--program", action="append", metavar="PROGRAM_ID", help="only this program (repeatable)")
    sub = command(groups, "import", cmd_import,
                  "apply JSON Lines as export writes them, as PUT and DELETE would; all lines checked first")
    sub.add_argument("file", metavar="FILE")
    sub.add_argument("--batch", type=_positive_int, default=5000, metavar="N",
                     help="lines per transaction (default: %(default)s)")
    return parser


def main(argv=None, out=None):
    """The admin command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    if not str(args.db).startswith(POSTGRES_SCHEMES) and not os.path.exists(args.db) and not args.create:
        print(f"error: there is no database at {args.db} (--create makes one there)", file=sys.stderr)
        return 1
    try:
        storage = open_storage(args.db)
    except StorageOpenError as exc:
        print(f"error: cannot open {safe_db_name(args.db)} as an eventstore database: "
              f"{safe_text(exc, args.db)}", file=sys.stderr)
        return 1
    session = storage.session()
    try:
        args.func(session, args, out)
    except CommandError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except storage.errors as exc:
        print(f"error: database: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return 1
    finally:
        session.close()
        storage.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
