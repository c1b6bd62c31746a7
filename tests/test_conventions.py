"""What an operator of a Python service expects: every serve.py option also from
an environment variable (the flag winning), JSON log lines, and a request id
that follows a request from its answer to every log line about it."""

import argparse
import io
import json
import logging
import re
import sqlite3

import pytest
import webtest

import eventstore
import serve
from helpers import THREADED_HOST, eventually
from server import Server, event

# --- every option from the environment -------------------------------------------------

OPTIONS = [action for action in serve.build_parser()._actions if serve.env_name(action)]


def test_every_option_but_help_and_the_hidden_ones_has_a_variable():
    hidden = {"--worker", "--worker-slot", "--lifeline-fd", "-h"}
    every = {name for action in serve.build_parser()._actions for name in action.option_strings[:1]}
    assert {action.option_strings[0] for action in OPTIONS} == every - hidden
    assert serve.env_name(next(a for a in OPTIONS if a.dest == "max_body")) == "EVENTSTORE_MAX_BODY"
    assert serve.env_name(next(a for a in OPTIONS if a.dest == "access_log")) == "EVENTSTORE_NO_ACCESS_LOG"


def samples(action):
    """-> (the variable's text, the value it gives, a flag's argv, the value the flag gives)."""
    flag = action.option_strings[0]
    if action.nargs == 0:
        return "1", action.const, [flag], action.const
    if action.choices:
        other = [choice for choice in action.choices if choice != action.default]
        return str(other[0]), other[0], [flag, str(action.default)], action.default
    convert = action.type or str
    if isinstance(action, argparse._AppendAction):
        return "7, 9", [convert("7"), convert("9")], [flag, "5"], [convert("5")]
    return "7", convert("7"), [flag, "9"], convert("9")


@pytest.mark.parametrize("action", OPTIONS, ids=[a.option_strings[0] for a in OPTIONS])
def test_each_option_from_its_variable_and_the_flag_wins(action):
    name = serve.env_name(action)
    text, from_variable, argv, from_flag = samples(action)
    assert from_variable != action.default and from_flag != from_variable or action.nargs == 0
    assert getattr(serve.parse_args([], environ={name: text}), action.dest) == from_variable
    assert getattr(serve.parse_args(argv, environ={name: text}), action.dest) == from_flag
    assert getattr(serve.parse_args([], environ={}), action.dest) == action.default
    if action.nargs == 0:  # a switch also reads as off, and the flag still wins over that
        assert getattr(serve.parse_args([], environ={name: "0"}), action.dest) == action.default
        assert getattr(serve.parse_args(argv, environ={name: "false"}), action.dest) == action.const


def test_help_names_each_option_with_its_variable(capsys):
    with pytest.raises(SystemExit) as exited:
        serve.parse_args(["--help"], environ={})
    assert exited.value.code == 0
    text = capsys.readouterr().out.split("options:", 1)[1]
    entries = {entry.split()[0].rstrip(","): " ".join(entry.split()) for entry in re.split(r"\n(?=  -)", text)
               if entry.strip()}
    for action in OPTIONS:
        flag, name = action.option_strings[0], serve.env_name(action)
        assert f"[env {name}]" in entries[flag], entries[flag]


@pytest.mark.parametrize("name, text, says", [
    ("EVENTSTORE_THREADS", "0", "must be at least 1"),
    ("EVENTSTORE_PORT", "eighty", "invalid int value"),
    ("EVENTSTORE_LOG_FORMAT", "xml", "expected one of text, json"),
    ("EVENTSTORE_CREATE", "perhaps", "expected 1, true"),
])
def test_a_bad_variable_is_a_usage_error_naming_it(capsys, name, text, says):
    with pytest.raises(SystemExit) as exited:
        serve.parse_args([], environ={name: text})
    err = capsys.readouterr().err
    assert exited.value.code == 2 and f"{name}={text!r}" in err and says in err, err


def test_a_server_takes_its_options_from_the_environment_and_its_flags_win(tmp_path):
    """The test's server is started with --port 0 and --processes 1: the
    variables saying otherwise lose; EVENTSTORE_MAX_BODY is taken."""
    env = {"EVENTSTORE_MAX_BODY": "300", "EVENTSTORE_PORT": "1", "EVENTSTORE_PROCESSES": "3",
           "EVENTSTORE_LOG_FORMAT": "json"}
    server = Server(tmp_path / "env.db", env=env)
    try:
        server.register("FOO")
        admin = {"user": "admin", "key": server.admin_key}
        assert server.request("PUT", "/events/FOO-1", event(1), **admin)[0] == 200
        status, _, problem = server.request("PUT", "/events/FOO-2", event(2, pad=400), **admin)
        assert (status, problem["status"]) == (413, 413)
        assert server.port != 1 and server.workers() == []
        eventually(lambda: any('"status": 413' in line for line in server.log), "the 413's JSON access line")
    finally:
        server.stop()


# --- the request id ------------------------------------------------------------------------

@pytest.fixture
def app(tmp_path):
    app = eventstore.make_app(tmp_path / "ids.db")
    yield webtest.TestApp(app, extra_environ=THREADED_HOST)
    app.close()


def test_a_safe_request_id_is_echoed_and_in_the_problem(app):
    for given in ("4bf92f3577b34da6a3ce929d0e0e4736", "proxy-7:abc/1+x=", "x" * 128):
        response = app.get("/nowhere", headers={"X-Request-Id": given}, status=404)
        assert response.headers["X-Request-Id"] == given and response.json["requestId"] == given
    response = app.get("/health", headers={"X-Request-Id": "ok.1"})
    assert response.headers["X-Request-Id"] == "ok.1" and "requestId" not in response.json


@pytest.mark.parametrize("given", ["", "a b", "a\x01b", "a\x7fb", "line\nbreak", "é", "x" * 129, 'quo"te'])
def test_an_unsafe_request_id_is_replaced_by_a_new_one(app, given):
    response = app.get("/nowhere", extra_environ={"HTTP_X_REQUEST_ID": given}, status=404)
    made = response.headers["X-Request-Id"]
    assert made != given and re.fullmatch(r"[0-9a-f]{32}", made) and response.json["requestId"] == made


def test_every_answer_has_its_own_new_id(app):
    made = {app.get("/health").headers["X-Request-Id"] for _ in range(20)}
    made |= {app.get("/programs", status=401).headers["X-Request-Id"] for _ in range(20)}
    assert len(made) == 40 and all(re.fullmatch(r"[0-9a-f]{32}", rid) for rid in made)


def test_the_text_log_names_the_request_of_a_message(tmp_path):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(serve.TextLogFormatter())
    logger = logging.getLogger("eventstore")
    logger.addHandler(handler)
    app = eventstore.make_app(tmp_path / "text.db")
    try:
        def fail(req):
            raise eventstore.Problem(503, "Not now.")
        app.router = eventstore.Router([("GET", r"/fail", fail, eventstore.OPEN, eventstore.QUERY)])
        webtest.TestApp(app).get("/fail", headers={"X-Request-Id": "text-77"}, status=503)
        logger.warning("outside any request")
    finally:
        logger.removeHandler(handler)
        app.close()
    lines = stream.getvalue().splitlines()
    assert [line for line in lines if "answered 503: Not now." in line][0].endswith(" requestId=text-77")
    assert "requestId" not in lines[-1]


def test_json_log_lines_and_a_request_id_in_every_line_of_its_request(tmp_path):
    """A write that cannot commit (the write lock held by another process past the
    busy timeout) is a 503: its answer, its problem, its access line and the
    warning logged for it all carry the id the client sent."""
    server = Server(tmp_path / "json.db", "--log-format", "json")
    admin = {"user": "admin", "key": server.admin_key}
    try:
        server.register("FOO")
        blocker = sqlite3.connect(tmp_path / "json.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            status, headers, problem = server.request("PUT", "/events/FOO-1", event(1), **admin,
                                                      headers={"X-Request-Id": "case-4711"})
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        assert (status, headers["x-request-id"], problem["requestId"]) == (503, "case-4711", "case-4711")
        assert server.request("GET", "/nowhere", headers={"X-Request-Id": "probe-1"})[0] == 404
        eventually(lambda: any('"probe-1"' in line for line in server.log), "the probe's access line")
    finally:
        server.stop()
    after_banner = "".join(server.log)[len(server.banner):].splitlines()
    lines = [json.loads(line) for line in after_banner]  # every line is one JSON object
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]) and line["level"]
               for line in lines)
    of_request = [line for line in lines if line.get("requestId") == "case-4711"]
    access = [line for line in of_request if line["logger"] == "eventstore.access"]
    others = [line for line in of_request if line["logger"] != "eventstore.access"]
    assert len(access) == 1 and {k: access[0][k] for k in ("method", "path", "status", "user", "remoteAddr")} == {
        "method": "PUT", "path": "/events/FOO-1", "status": 503, "user": "admin", "remoteAddr": "127.0.0.1"}
    assert access[0]["bytes"] > 0 and access[0]["durationMs"] > 0
    assert others and all(line["level"] == "WARNING" and "503" in line["message"] for line in others)
    assert not [line for line in lines if line["logger"] != "eventstore.access" and "requestId" in line
                and line["requestId"] != "case-4711"]


def test_the_text_access_line_ends_with_the_request_id(tmp_path):
    server = Server(tmp_path / "text.db")
    try:
        server.request("GET", "/health", headers={"X-Request-Id": "text-access-1"})
        server.request("GET", "/health?second", headers={"X-Request-Id": "bad id"})
        eventually(lambda: len([line for line in server.log if " /health" in line]) >= 2, "two access lines")
    finally:
        server.stop()
    first, second = [line.split() for line in server.log if " /health" in line][-2:]
    assert first[-1] == "text-access-1" and re.fullmatch(r"[0-9a-f]{32}", second[-1])
