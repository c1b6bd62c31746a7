"""docs/API.md §2: Basic authentication, API keys, grants and the order of checks."""

import base64
import hashlib
import sqlite3
import time

import pytest

import eventstore
import eventstore_sqlite
from helpers import Registry, eventually, run_in_thread, basic, event_body
from eventstore import parse_basic_auth


def b64(text):
    return base64.b64encode(text.encode("utf-8")).decode()


# --- the Basic-auth parser -------------------------------------------------------

def test_parser_splits_at_the_first_colon():
    assert parse_basic_auth("Basic " + b64("alice:pa:ss")) == ("alice", "pa:ss")


def test_parser_scheme_is_case_insensitive():
    assert parse_basic_auth("bAsIc " + b64("alice:key")) == ("alice", "key")


def test_parser_decodes_utf8():
    assert parse_basic_auth("Basic " + b64("ålice:këy")) == ("ålice", "këy")


@pytest.mark.parametrize("header", [
    None, "", "Basic", "Basic ", "Bearer " + b64("alice:key"), "Basic !!!notbase64",
    "Basic " + b64("no-colon"), "Basic " + b64(":key"), "Basic " + b64("alice:"),
    "Basic " + base64.b64encode(b"alice:\xff\xfe").decode(), "Basic " + b64("alice:key")[:-1],
])
def test_parser_rejects_malformed_headers(header):
    assert parse_basic_auth(header) is None


# --- 401: one answer for every bad credential ------------------------------------

def bad_credentials(registry):
    registry.add_user("disabled")
    registry.sql.execute("UPDATE users SET disabled = TRUE WHERE user_id = 'disabled'")
    registry.add_user("revoked")
    registry.sql.execute("UPDATE api_keys SET revoked_us = 1 WHERE user_id = 'revoked'")
    good = registry.keys["writer"]
    return {
        "missing": {},
        "malformed": {"Authorization": "Basic %%%"},
        "other scheme": {"Authorization": "Bearer " + good},
        "unknown user": basic("mallory", good),
        "wrong key": basic("writer", good[:-1] + ("A" if good[-1] != "A" else "B")),
        "someone else's key": basic("reader", good),
        "not a key at all": basic("writer", "hunter2"),
        "revoked key": basic("revoked", registry.keys["revoked"]),
        "disabled user": basic("disabled", registry.keys["disabled"]),
    }


def test_every_bad_credential_gets_the_same_401(registry):
    answers = set()
    for name, headers in bad_credentials(registry).items():
        # The same request id each time: the answers may differ in nothing else.
        response = registry.anonymous.get("/events", headers={**headers, "X-Request-Id": "same"}, status=401)
        assert response.headers["WWW-Authenticate"] == 'Basic realm="eventstore", charset="UTF-8"', name
        assert response.content_type == "application/problem+json", name
        answers.add((response.body, response.headers["WWW-Authenticate"]))
    assert len(answers) == 1


def test_401_comes_before_403_and_validation(registry):
    # A bad credential on a forbidden program with an invalid body is still a 401.
    registry.anonymous.put("/events/BAR-1", "not json", headers=basic("writer", "esk_x"), status=401)


def test_a_good_key_authenticates(writer):
    writer.get("/events", status=200)


def test_only_a_hash_of_the_key_is_stored(registry):
    key = registry.keys["writer"]
    stored = registry.sql.execute("SELECT key_id, key_hash FROM api_keys WHERE user_id = 'writer'").fetchone()
    assert stored == (key[:12], hashlib.sha256(key.encode()).digest())
    assert key not in registry.dump() and key[12:] not in registry.dump()


def test_keys_have_the_documented_shape(registry):
    for key in registry.keys.values():
        assert eventstore.API_KEY_RE.fullmatch(key)
        assert len(key) == 47


def test_a_user_may_hold_several_keys_and_a_revoked_one_stops_within_a_second(registry):
    first = registry.keys["writer"]
    with registry.transaction() as tx:
        second = eventstore.add_key(tx, "writer")
    app = registry.anonymous
    app.get("/events", headers=basic("writer", first), status=200)
    app.get("/events", headers=basic("writer", second), status=200)
    registry.sql.execute("UPDATE api_keys SET revoked_us = 1 WHERE key_id = ?", (first[:12],))
    time.sleep(eventstore.AUTH_CACHE_SECONDS)
    app.get("/events", headers=basic("writer", first), status=401)
    app.get("/events", headers=basic("writer", second), status=200)


def test_a_key_records_its_last_use(registry, writer):
    query = "SELECT last_used_us FROM api_keys WHERE user_id = 'writer'"
    assert registry.sql.execute(query).fetchone()[0] is None
    writer.get("/events")
    eventually(lambda: registry.sql.execute(query).fetchone()[0] is not None, "the last use is recorded")


def test_a_read_never_waits_for_the_write_lock_to_record_a_key_s_last_use(tmp_path):
    """Another process holds the write lock; a first request with a key must be
    answered at once, its last use recorded once the lock is free."""
    registry = Registry(tmp_path / "locked.db", busy_timeout_ms=60_000)
    try:
        blocker = eventstore_sqlite.connect(registry.db_path)
        blocker.execute("BEGIN IMMEDIATE")
        answered = run_in_thread(lambda: registry.client("reader").get("/events?ProgramId=FOO").status_int)
        assert answered(timeout=10) == 200  # well before the 60 s busy timeout
        blocker.execute("ROLLBACK")
        eventually(lambda: registry.sql.execute(
            "SELECT last_used_us FROM api_keys WHERE user_id = 'reader'").fetchone()[0], "last use recorded")
    finally:
        registry.close()


def test_the_auth_cache_never_accepts_a_wrong_key_after_a_right_one(registry):
    """The cache is keyed by the whole credential, not by the user id."""
    app = registry.anonymous
    app.get("/events", headers=basic("writer", registry.keys["writer"]), status=200)
    wrong = "esk_" + "A" * 43
    app.get("/events", headers=basic("writer", wrong), status=401)
    app.get("/events", headers=basic("writer", registry.keys["writer"] + "x"), status=401)
    app.get("/events", headers=basic("writer", registry.keys["reader"]), status=401)


# --- 403: decided from the ProgramId before any lookup ------------------------------

def test_write_needs_a_write_grant(reader, writer, registry):
    reader.put_json("/events/FOO-1", event_body(), status=403)
    writer.put_json("/events/FOO-1", event_body(), status=200)
    reader.delete("/events/FOO-1", status=403)
    assert registry.row("FOO-1")["deleted"] == 0


def test_read_grant_reads(reader, writer):
    writer.put_json("/events/FOO-1", event_body())
    assert reader.get("/events/FOO-1").json["EventId"] == "FOO-1"


def test_no_grant_is_forbidden_whether_or_not_the_event_exists(registry, admin):
    nobody = registry.client("nobody")
    admin.put_json("/events/BAR-1", event_body("BAR"))
    existing = nobody.get("/events/BAR-1", status=403)
    missing = nobody.get("/events/BAR-2", status=403)
    unregistered = nobody.get("/events/ZZZ-2", status=403)
    assert existing.json["detail"].replace("BAR", "X") == missing.json["detail"].replace("BAR", "X")
    assert unregistered.json["status"] == 403


def test_403_comes_before_body_validation(writer, registry):
    response = writer.put("/events/BAR-1", "{not json", status=403,
                          headers={"Content-Type": "text/plain"})
    assert response.content_type == "application/problem+json"
    assert registry.count_events() == 0


def test_an_id_without_a_program_prefix_is_forbidden_to_non_system_users(writer):
    writer.get("/events/nohyphen", status=403)
    writer.put_json("/events/nohyphen", event_body(), status=403)
    writer.delete("/events/nohyphen", status=403)


def test_an_id_without_a_hyphen_is_malformed_not_forbidden_for_a_system_user(admin, registry):
    """A SYSTEM user holds every right: a malformed id is its mistake (400), and a
    GET of it finds nothing (404), as for an id ending in a hyphen."""
    for event_id in ("FOO", "FOO-"):
        put = admin.put_json(f"/events/{event_id}", event_body(), status=400)
        assert "EventId" in [e["field"] for e in put.json["errors"]]
        admin.get(f"/events/{event_id}", status=404)
        deleted = admin.delete(f"/events/{event_id}", status=400)
        assert [e["field"] for e in deleted.json["errors"]] == ["EventId"]
    assert registry.count_events() == 0


def test_delete_is_403_before_404_for_a_program_without_a_grant(registry, reader, writer):
    """Whether the event exists is never told to a caller without the right."""
    writer.delete("/events/BAR-missing", status=403)     # no grant on BAR
    writer.delete("/events/ZZZ-missing", status=403)     # unregistered program
    reader.delete("/events/FOO-missing", status=403)     # read is not write
    registry.client("nobody").delete("/events/FOO-missing", status=403)


def test_system_user_may_do_everything(admin):
    admin.put_json("/events/BAR-1", event_body("BAR"), status=200)
    admin.get("/events/BAR-1", status=200)
    admin.delete("/events/BAR-1", status=204)


def test_grants_and_disabling_take_effect_within_a_second(registry):
    nobody = registry.client("nobody")
    nobody.get("/events?ProgramId=BAR", status=403)
    with registry.transaction() as tx:
        tx.set_grants("nobody", {"BAR": "read"})
    time.sleep(eventstore.AUTH_CACHE_SECONDS)
    nobody.get("/events?ProgramId=BAR", status=200)
    registry.sql.execute("UPDATE users SET disabled = TRUE WHERE user_id = 'nobody'")
    time.sleep(eventstore.AUTH_CACHE_SECONDS)
    nobody.get("/events?ProgramId=BAR", status=401)


def test_failed_authentications_are_not_cached(registry):
    registry.anonymous.get("/events", headers=basic("writer", "esk_wrong"), status=401)
    assert len(registry.app._auth_cache) == 0


# --- order of checks: route -> 401 -> 403 -> 400/413/415 -> 404 -> 412 -----------

def test_route_errors_come_before_authentication(registry):
    registry.anonymous.get("/nowhere", status=404)
    response = registry.anonymous.post("/events/FOO-1", status=405)
    assert "PUT" in response.headers["Allow"]


def test_validation_comes_before_existence(admin):
    # ZZZ is not registered (404), but the body is invalid: 400 wins.
    admin.put_json("/events/ZZZ-1", {"ProgramId": "ZZZ"}, status=400)
    admin.put_json("/events/ZZZ-1", event_body("ZZZ"), status=404)


def test_existence_comes_before_preconditions(admin):
    admin.delete("/events/FOO-404", headers={"If-Match": '"1"'}, status=404)


def test_a_key_s_last_use_is_written_by_the_writer_not_by_a_read_connection(registry, writer):
    """A write from a request thread's read connection would contend with the
    group-commit writer for the write lock; read connections are query-only."""
    if registry.storage.backend == "sqlite":
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            registry.app.storage.reads().conn.execute("UPDATE api_keys SET last_used_us = 0")
    else:
        import psycopg
        with registry.storage.pool.connection() as conn, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            conn.execute("UPDATE api_keys SET last_used_us = 0")
    commits = registry.record_commits()
    writer.get("/events")
    eventually(lambda: registry.sql.execute("SELECT last_used_us FROM api_keys WHERE user_id = 'writer'")
               .fetchone()[0], "the last use recorded")
    assert commits == [1]  # by the writer, in one commit
