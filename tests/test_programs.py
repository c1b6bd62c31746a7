"""docs/API.md §5 programs, §6 service endpoints, §7 errors and routing."""

import json

import pytest

from helpers import event_body


def test_system_sees_every_program_with_write(admin):
    programs = admin.get("/programs").json["Programs"]
    assert programs == [{"ProgramId": "BAR", "Name": "Program BAR", "Access": "write", "RegisteredEventTypesOnly": False},
                        {"ProgramId": "FOO", "Name": "Program FOO", "Access": "write", "RegisteredEventTypesOnly": False}]


def test_a_user_sees_its_programs_with_its_access(registry, reader, writer):
    assert reader.get("/programs").json["Programs"] == [
        {"ProgramId": "FOO", "Name": "Program FOO", "Access": "read", "RegisteredEventTypesOnly": False}]
    assert writer.get("/programs").json["Programs"][0]["Access"] == "write"
    assert registry.client("nobody").get("/programs").json == {"Programs": []}


def test_system_registers_and_renames_a_program(admin):
    assert admin.put_json("/programs/NEW_1", {"Name": "New"}).json == {
        "ProgramId": "NEW_1", "Name": "New", "RegisteredEventTypesOnly": False}
    admin.put_json("/events/NEW_1-1", event_body("NEW_1"), status=200)
    admin.put_json("/programs/NEW_1", {"Name": "Renamed"})
    names = {p["ProgramId"]: p["Name"] for p in admin.get("/programs").json["Programs"]}
    assert names["NEW_1"] == "Renamed"


def test_only_system_registers_programs(writer, registry):
    writer.put_json("/programs/FOO", {"Name": "Mine now"}, status=403)
    writer.put_json("/programs/NEW", {"Name": "x"}, status=403)
    assert registry.sql.execute("SELECT name FROM programs WHERE program_id = 'FOO'").fetchone() == ("Program FOO",)


@pytest.mark.parametrize("path, body, field", [
    ("/programs/A-B", {"Name": "x"}, "ProgramId"),
    ("/programs/" + "A" * 33, {"Name": "x"}, "ProgramId"),
    ("/programs/OK", {}, "Name"),
    ("/programs/OK", {"Name": ""}, "Name"),
    ("/programs/OK", {"Name": 5}, "Name"),
    ("/programs/OK", {"Name": "x", "Owner": "me"}, "Owner"),
    ("/programs/OK", [], "body"),
    ("/programs/OK", {"Name": "x", "RegisteredEventTypesOnly": "yes"}, "RegisteredEventTypesOnly"),
    ("/programs/OK", {"Name": "x", "RegisteredEventTypesOnly": 1}, "RegisteredEventTypesOnly"),
])
def test_bad_program_registrations_are_400(admin, path, body, field):
    problem = admin.put_json(path, body, status=400).json
    assert field in [e["field"] for e in problem["errors"]]
    assert all(p["ProgramId"] != "OK" for p in admin.get("/programs").json["Programs"])


def test_health_needs_no_credentials(registry):
    import eventstore
    assert registry.anonymous.get("/health").json == {
        "status": "ok", "backend": registry.storage.backend, "schemaVersion": eventstore.SCHEMA_VERSION,
        "longPolls": 0, "retention": {"intervalSeconds": 3600, "lastSweepUTC": None, "erased": None},
        **registry.storage.health_details()}


def test_health_is_503_when_the_database_does_not_answer(tmp_path):
    import eventstore
    app = eventstore.make_app(tmp_path / "gone.db")
    (tmp_path / "gone.db").write_bytes(b"this is not a database" * 100)
    import webtest
    try:
        response = webtest.TestApp(app).get("/health", status=503)
        assert response.content_type == "application/problem+json"
    finally:
        app.close()  # its engines, started by the request, stop with it


def test_openapi_document_describes_every_route(registry):
    import eventstore
    document = registry.anonymous.get("/openapi.json").json
    assert document["openapi"].startswith("3.1")
    described = {(method.upper(), path) for path, item in document["paths"].items() for method in item
                 if method in ("get", "put", "post", "delete")}
    routed = {("GET", "/health"), ("GET", "/openapi.json"), ("GET", "/metrics"), ("GET", "/console"),
              ("GET", "/console/{file}"), ("GET", "/events"), ("POST", "/events"), ("PUT", "/events/{eventId}"),
              ("GET", "/events/{eventId}"), ("DELETE", "/events/{eventId}"), ("GET", "/programs"),
              ("PUT", "/programs/{ProgramId}"), ("DELETE", "/programs/{ProgramId}/members/{ProgramMemberId}"),
              ("GET", "/event-types"), ("GET", "/event-types/{EventType}"), ("PUT", "/event-types/{EventType}"),
              ("DELETE", "/event-types/{EventType}"), ("GET", "/event-types/{EventType}/schemas/{SchemaVersion}"),
              ("GET", "/subscriptions"), ("PUT", "/subscriptions/{Name}"), ("GET", "/subscriptions/{Name}"),
              ("DELETE", "/subscriptions/{Name}"), ("GET", "/subscriptions/{Name}/events"),
              ("POST", "/subscriptions/{Name}/ack"), ("POST", "/subscriptions/{Name}/secret")}
    assert routed <= described
    assert len(routed) == len(eventstore.ROUTES)


def test_openapi_document_passes_the_validator_as_served(registry, tmp_path):
    """openapi-spec-validator reads the file as YAML, which refuses raw C1 control
    characters (U+007F-U+009F): invisible characters in patterns are \\u escapes."""
    import subprocess
    import sys
    import unicodedata
    served = registry.anonymous.get("/openapi.json").body.decode("utf-8")
    invisible = {c for c in served if unicodedata.category(c) in ("Cc", "Zs", "Zl", "Zp")} - {" ", "\n"}
    assert not invisible, sorted(map(hex, map(ord, invisible)))
    (tmp_path / "openapi.json").write_text(served, encoding="utf-8")
    checked = subprocess.run([sys.executable, "-m", "openapi_spec_validator", str(tmp_path / "openapi.json")],
                             capture_output=True, text=True, timeout=60)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_openapi_gives_generators_named_types_and_a_default_problem(registry):
    """Code generators (openapi-python-client) drop an operation whose body has a
    union of object and null: EventData is a component, nullable through anyOf.
    Every operation says what any other status carries: a problem document."""
    document = registry.anonymous.get("/openapi.json").json
    schemas = document["components"]["schemas"]

    def types_listed(node):
        if isinstance(node, dict):
            if isinstance(node.get("type"), list):
                yield node["type"]
            for value in node.values():
                yield from types_listed(value)
        elif isinstance(node, list):
            for value in node:
                yield from types_listed(value)

    assert all(len(types) == 2 and "null" in types and "object" not in types for types in types_listed(document))
    assert schemas["EventData"]["type"] == "object"
    assert {"$ref": "#/components/schemas/EventData"} in schemas["EventInput"]["properties"]["EventData"]["anyOf"]
    assert schemas["Event"]["properties"]["EventData"] == {"$ref": "#/components/schemas/EventData"}
    default = document["components"]["responses"]["Problem"]["content"]["application/problem+json"]["schema"]
    assert default == {"$ref": "#/components/schemas/Problem"}
    operations = [op for item in document["paths"].values() for op in item.values() if "responses" in op]
    import eventstore
    assert len(operations) == len(eventstore.ROUTES)
    assert all(op["responses"]["default"] == {"$ref": "#/components/responses/Problem"} for op in operations)


def test_openapi_states_what_the_linters_ask_and_a_batch_item_whole(registry):
    """Redocly and Spectral (run by hand, both clean now) asked for a license, a
    contact, tag and operation descriptions and a 4XX answer of every operation;
    code generators made a batch item (an allOf of EventInput and EventId) a plain
    EventInput, so a generated client's batch had no EventId."""
    document = registry.anonymous.get("/openapi.json").json
    info, schemas = document["info"], document["components"]["schemas"]
    assert info["contact"]["name"] and info["license"]["name"] and info["license"]["identifier"]
    assert all(tag["description"] for tag in document["tags"])
    operations = [op for item in document["paths"].values() for op in item.values() if "responses" in op]
    assert all(op["description"] for op in operations)
    assert all(any(code.startswith("4") for code in op["responses"]) for op in operations)
    item, body = schemas["BatchItem"], schemas["EventInput"]
    assert "allOf" not in item and item["type"] == "object" and item["additionalProperties"] is False
    assert item["properties"] == {"EventId": schemas["Event"]["properties"]["EventId"], **body["properties"]}
    assert item["required"] == ["EventId", *body["required"]]


def test_unknown_paths_are_404_problem_json(registry):
    for path in ("/", "/event", "/events/", "/programs/FOO/extra", "/EVENTS"):
        response = registry.anonymous.get(path, status=404)
        assert response.content_type == "application/problem+json"
        assert response.json["status"] == 404 and response.json["title"] == "Not Found"


@pytest.mark.parametrize("method, path, allow", [
    ("POST", "/events/FOO-1", "DELETE, GET, HEAD, PUT"),
    ("PATCH", "/programs/FOO", "PUT"),
    ("DELETE", "/programs", "GET, HEAD"),
    ("PUT", "/health", "GET, HEAD"),
])
def test_wrong_method_is_405_with_allow(registry, method, path, allow):
    response = registry.anonymous.request(path, method=method, status=405)
    assert response.headers["Allow"] == allow
    assert response.json["status"] == 405


def test_head_is_get_without_a_body(registry, writer):
    writer.put_json("/events/FOO-1", event_body())
    response = writer.head("/events/FOO-1")
    assert response.status_int == 200 and response.body == b""
    assert int(response.headers["Content-Length"]) > 0


def test_an_unexpected_error_is_a_bare_500_and_logged(tmp_path, caplog):
    import eventstore
    import webtest

    def explode(req):
        raise RuntimeError("secret internals /var/db/path")

    app = eventstore.make_app(tmp_path / "boom.db", routes=[("GET", "/boom", explode, eventstore.OPEN, eventstore.NO_QUERY)])
    try:
        response = webtest.TestApp(app).get("/boom", headers={"X-Request-Id": "boom-1"}, status=500)
        assert response.json == {"type": "about:blank", "title": "Internal Server Error", "status": 500,
                                 "detail": "Internal error.", "requestId": "boom-1"}
        assert "secret internals" in caplog.text
    finally:
        app.close()


def test_location_includes_the_mount_point(writer):
    response = writer.put("/events/FOO-1", json.dumps(event_body()),
                          headers={"Content-Type": "application/json"},
                          extra_environ={"SCRIPT_NAME": "/registry"})
    assert response.headers["Location"] == "/registry/events/FOO-1"
