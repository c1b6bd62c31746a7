"""End to end: serve.py with waitress on a free loopback port, over real HTTP."""

import base64
import datetime
import json
import re
import sys
import time
from pathlib import Path

import pytest

import eventstore
from helpers import run_in_thread
from server import Server, assert_seen_every_change_once_in_order, publish_while_following


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path / "e2e.db", "--threads", "8")
    yield server
    server.stop()


def test_first_start_creates_admin_and_prints_its_key_once(tmp_path):
    first = Server(tmp_path / "boot.db")
    first.stop()
    assert first.admin_key and eventstore.API_KEY_RE.fullmatch(first.admin_key)
    assert "Created the SYSTEM user 'admin'" in first.banner
    second = Server(tmp_path / "boot.db")
    second.stop()
    assert second.admin_key is None and first.admin_key not in second.banner
    assert "key add admin" in second.banner


def test_a_corrupt_database_is_refused_in_one_line(tmp_path):
    import subprocess
    import sys
    from server import ROOT
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"garbage" * 1000)
    result = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--db", str(bad), "--port", "1"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1


def test_the_readme_session_over_http(server):
    admin = {"user": "admin", "key": server.admin_key}
    server.register("FOO")
    status, headers, _ = server.request("PUT", "/events/FOO-1", {
        "ProgramId": "FOO", "ProgramMemberId": "m@example.com", "EventType": "CourseCompleted",
        "EventStartUTC": "2026-03-01T09:30:00Z"}, **admin)
    assert (status, headers["location"], headers["etag"]) == (200, "/events/FOO-1", '"1"')
    assert server.request("GET", "/events/FOO-1", **admin)[2]["Revision"] == 1
    assert [e["EventId"] for e in server.request("GET", "/events", **admin)[2]["Events"]] == ["FOO-1"]
    status, headers, body = server.request("GET", "/events")
    assert status == 401 and headers["www-authenticate"].startswith("Basic")
    assert headers["content-type"] == "application/problem+json"


def test_hostile_requests_over_http_get_4xx(server):
    admin = {"user": "admin", "key": server.admin_key}
    server.register("FOO")
    cases = [
        ("PUT", "/events/FOO-1", b"\xff\xfe\x00garbage", {"Content-Type": "application/json"}),
        ("PUT", "/events/FOO-1", b"[" * 200000, {"Content-Type": "application/json"}),
        ("PUT", "/events/FOO-1", b'{"a":1,"a":2}', {"Content-Type": "application/json"}),
        ("PUT", "/events/FOO-1", b"x" * (2 << 20), {"Content-Type": "application/json"}),
        ("GET", "/events/FOO-%ff%fe", None, {}),
        ("GET", "/events?limit=%00", None, {}),
        ("GET", "/events?" + "a=1&" * 2000, None, {}),
    ]
    for method, path, body, headers in cases:
        status, response_headers, _ = server.request(method, path, body, headers=headers, **admin)
        assert 400 <= status < 500, (method, path[:40], status)
    assert server.request("GET", "/events", **admin)[2]["Events"] == []


def test_concurrent_publishers_and_a_follower_see_every_event_once_in_order(server):
    """The sync guarantee: a consumer following Next while several threads publish
    sees every acknowledged change exactly once, in increasing Sequence."""
    server.register("FOO")
    acknowledged, seen = publish_while_following([server], server, server.admin_key, puts=60, ids=30)
    assert len(acknowledged) > 30
    assert_seen_every_change_once_in_order(seen, acknowledged)


def test_erasure_with_a_percent_encoded_member_id_over_http(server):
    import urllib.parse
    admin = {"user": "admin", "key": server.admin_key}
    server.register("FOO")
    member = "Zoë Ñúñez+tag@example.com/x"
    for n in range(3):
        server.request("PUT", f"/events/FOO-{n}", {"ProgramId": "FOO", "ProgramMemberId": member,
                                                   "EventType": "T", "EventStartUTC": "2026-03-01T09:30:00Z"}, **admin)
    path = "/programs/FOO/members/" + urllib.parse.quote(member, safe="")
    assert server.request("DELETE", path, **admin)[2] == {"Deleted": 3}
    assert server.request("DELETE", path, **admin)[2] == {"Deleted": 0}


# --- serve.py's waitress task: a response's head and body in one send -------------

def _task(status, headers, content_length):
    from types import SimpleNamespace

    import serve
    writes = []
    channel = SimpleNamespace(write_soon=writes.append,
                              server=SimpleNamespace(adj=SimpleNamespace(ident="eventstore")))
    task = serve.OneWriteTask(channel, SimpleNamespace(version="1.1", headers={}))
    task.complete, task.status, task.response_headers = True, status, list(headers)
    task.content_length = content_length
    return task, writes


def test_a_whole_body_goes_out_with_its_head_in_one_write():
    task, writes = _task("200 OK", [("Content-Length", "7")], 7)
    task.write(b'{"a":1}')
    task.finish()
    assert len(writes) == 1
    head, _, body = writes[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length: 7" in head
    assert body == b'{"a":1}' and task.content_bytes_written == 7


def test_a_body_in_pieces_or_without_a_length_is_written_as_waitress_does():
    task, writes = _task("200 OK", [("Content-Length", "6")], 6)
    task.write(b"abc")
    task.write(b"def")
    assert writes[1:] == [b"abc", b"def"] and writes[0].endswith(b"\r\n\r\n")
    task, writes = _task("200 OK", [], None)  # no length: chunked, as waitress does it
    task.write(b"abc")
    task.finish()
    assert writes[1:] == [b"3\r\nabc\r\n", b"0\r\n\r\n"] and b"Transfer-Encoding: chunked" in writes[0]


def test_pipelined_requests_get_whole_responses_in_order(server):
    import json
    import socket
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" * 2
                     + b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    answers = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        answers.append((head.split(b" ")[1], json.loads(rest[:length])))
        data = rest[length:]
    assert [status for status, _ in answers] == [b"200", b"200", b"404"]
    assert answers[0][1] == answers[1][1] and answers[2][1]["status"] == 404


# --- the access log -----------------------------------------------------------------------

ACCESS_LINE = re.compile(
    r"^(?P<time>\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z) (?P<address>\S+) (?P<user>\S+) (?P<method>[A-Z]+) "
    r"(?P<target>\S+) (?P<status>\d{3}) (?P<bytes>\d+) (?P<ms>\d+\.\d)ms (?P<request_id>\S+)$")


def access_lines(server, count, timeout=10):
    """The server's access-log lines, once there are ``count`` of them (bounded wait)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [m.groupdict() for m in map(ACCESS_LINE.match, map(str.rstrip, server.log)) if m]
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.02)


def test_the_access_log_has_a_line_per_request_with_its_fields(server):
    admin = {"user": "admin", "key": server.admin_key}
    status, headers, body = server.request("GET", "/events?EventType=A%20B", **admin)
    assert status == 200
    server.request("GET", "/events", user="admin", key="esk_" + "x" * 43)
    server.request("GET", "/nowhere/at%20all")
    targets = ("/events?EventType=A%20B", "/events", "/nowhere/at%20all")
    deadline = time.monotonic() + 10
    while True:  # each line is written once its answer has been sent
        lines = [line for line in access_lines(server, 0) if line["target"] in targets]
        if len(lines) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    # A line is written once its answer has gone out, so lines of quick successive
    # requests may come in either order.
    lines.sort(key=lambda line: targets.index(line["target"]))
    assert [(line["user"], line["method"], line["target"], line["status"]) for line in lines] == [
        ("admin", "GET", "/events?EventType=A%20B", "200"),
        ("-", "GET", "/events", "401"),
        ("-", "GET", "/nowhere/at%20all", "404")]
    assert lines[0]["bytes"] == headers["content-length"] and int(lines[1]["bytes"]) > 0
    assert all(line["address"] == "127.0.0.1" for line in lines)
    logged = datetime.datetime.fromisoformat(lines[0]["time"].replace("Z", "+00:00"))
    assert abs((datetime.datetime.now(datetime.timezone.utc) - logged).total_seconds()) < 60


def test_no_key_ever_reaches_the_access_log(server):
    key = server.admin_key
    token = base64.b64encode(f"admin:{key}".encode()).decode()
    headers_tried = [f"Basic {token}", f"Basic {token}!!", f"Bearer {key}", f"Basic admin:{key}", key]
    for header in headers_tried:
        server.request("GET", "/programs", headers={"Authorization": header})
    lines = access_lines(server, len(headers_tried) + 1)
    assert len(lines) >= len(headers_tried)
    log = "".join(server.log)
    assert log.startswith(server.banner)  # the start-up banner shows the new key once, by design
    log = log[len(server.banner):]
    assert key not in log and token not in log and key[12:] not in log


def test_no_access_log_turns_it_off(tmp_path):
    quiet = Server(tmp_path / "quiet.db", "--no-access-log")
    try:
        for _ in range(3):
            assert quiet.request("GET", "/programs", user="admin", key=quiet.admin_key)[0] == 200
    finally:
        quiet.stop()
    assert not [line for line in quiet.log if ACCESS_LINE.match(line.rstrip())]


def test_the_app_itself_logs_no_requests(registry, caplog):
    with caplog.at_level("DEBUG"):
        registry.client("admin").get("/programs")
        registry.anonymous.get("/nowhere", status=404)
    assert caplog.records == []


def test_access_log_lines_are_written_when_the_server_stops(tmp_path):
    """Lines are written in batches by a thread of their own; stopping writes the
    last ones, so a request answered just before SIGTERM is still logged."""
    quick = Server(tmp_path / "quick.db")
    for n in range(5):
        assert quick.request("GET", f"/health?n={n}")[0] == 200
    quick.stop()
    targets = [line["target"] for line in map(ACCESS_LINE.match, map(str.rstrip, quick.log)) if line]
    assert [target for target in targets if target.startswith("/health?n=")] == [f"/health?n={n}" for n in range(5)]


def test_the_access_log_loses_no_line_under_concurrent_requests():
    import io
    import serve
    stream = io.StringIO()
    log = serve.AccessLog(lambda environ, start_response: start_response("200 OK", []) or [b"ok"], stream,
                          flush_interval=0.001)

    def requests(thread):
        for n in range(500):
            environ = {"REQUEST_METHOD": "GET", "PATH_INFO": f"/t{thread}/{n}", "REMOTE_ADDR": "127.0.0.1"}
            body = log(environ, lambda status, headers, exc_info=None: None)
            list(body)
            body.close()

    switching = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: a lost line shows
    try:
        waits = [run_in_thread(requests, thread) for thread in range(4)]
        for wait in waits:
            wait()
    finally:
        sys.setswitchinterval(switching)
    log.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2000 and len(set(line.split()[4] for line in lines)) == 2000


def test_the_access_log_quotes_exactly_what_urllib_quotes():
    """A target made only of characters quote() keeps is logged without quoting it
    (the fast path); for every one of the 256 characters WSGI's latin-1 environ can
    hold, in the path and in the query, the line has what quote() gives."""
    import io
    import urllib.parse
    import serve
    stream = io.StringIO()
    log = serve.AccessLog(lambda environ, start_response: start_response("304 Not Modified", []) or [], stream,
                          flush_interval=60)
    safe = "/:@!$&'()*+,;=-._~%"
    expected = []
    for code in range(256):
        path, query = f"/a{chr(code)}b", f"x={chr(code)}"
        body = log({"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query, "REMOTE_ADDR": "::1"},
                   lambda status, headers, exc_info=None: None)
        list(body)
        body.close()
        expected.append(urllib.parse.quote(path, safe=safe, encoding="latin-1") + "?" +
                        urllib.parse.quote(query, safe=safe + "?", encoding="latin-1"))
    body = log({"REQUEST_METHOD": "G E\tT", "PATH_INFO": "/", "REMOTE_ADDR": "::1"}, lambda *args: None)
    body.close()
    log.close()
    *quoted, odd_method = stream.getvalue().splitlines()
    lines = [ACCESS_LINE.match(line) for line in quoted]
    assert all(lines) and [line["target"] for line in lines] == expected
    assert all(line["status"] == "304" and line["bytes"] == "0" for line in lines)
    assert odd_method.split()[3:5] == ["G?E?T", "/"]


def test_a_json_access_line_is_what_json_dumps_gives():
    """The JSON line is written out field by field (PERF): it is the text json.dumps
    gives for the same fields, also for a user and an address with quotes,
    backslashes, control and non-ASCII characters, and with no answer (status null)."""
    import io
    import serve
    stream = io.StringIO()
    log = serve.AccessLog(lambda environ, start_response: [], stream, clock=lambda: 0.0, json_lines=True,
                          flush_interval=60)
    odd = 'a"b\\c\x01\u00e9\u2028\U0001f600'
    environ = {"REQUEST_METHOD": "PUT", "PATH_INFO": "/events/FOO-1", "QUERY_STRING": "x=1",
               "REMOTE_ADDR": odd, "eventstore.user_id": odd, "eventstore.request_id": "r-1"}
    log.write(environ, ("201 Created", [("Content-Length", "17")]), 0, -0.00125)
    log.write({"REQUEST_METHOD": "GET", "PATH_INFO": "/"}, None, 5, 0.0)
    log.close()
    lines = stream.getvalue().splitlines()
    fields = [json.loads(line) for line in lines]
    assert [line == json.dumps(field) for line, field in zip(lines, fields)] == [True, True]
    assert {k: fields[0][k] for k in ("remoteAddr", "user", "method", "path", "status", "bytes", "durationMs",
                                      "requestId")} == {
        "remoteAddr": odd, "user": odd, "method": "PUT", "path": "/events/FOO-1?x=1", "status": 201, "bytes": 17,
        "durationMs": 1.2, "requestId": "r-1"}
    assert {k: fields[1][k] for k in ("remoteAddr", "user", "status", "bytes", "requestId")} == {
        "remoteAddr": "-", "user": "-", "status": None, "bytes": 5, "requestId": "-"}


def test_a_chunked_put_over_waitress_is_written(server):
    """waitress ends a chunked body itself (wsgi.input_terminated): the PUT is
    read and written, not refused for its missing Content-Length."""
    import http.client
    import json
    admin = {"user": "admin", "key": server.admin_key}
    server.register("FOO")
    body = json.dumps({"ProgramId": "FOO", "ProgramMemberId": "m", "EventType": "T",
                       "EventStartUTC": "2026-03-01T09:30:00Z"}).encode()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
    token = base64.b64encode(f"admin:{server.admin_key}".encode()).decode()
    connection.request("PUT", "/events/FOO-1", body=iter([body[:10], body[10:]]), encode_chunked=True,
                       headers={"Authorization": f"Basic {token}", "Content-Type": "application/json",
                                "Transfer-Encoding": "chunked"})
    response = connection.getresponse()
    assert response.status == 200, response.read()
    connection.close()
    assert server.request("GET", "/events/FOO-1", **admin)[0] == 200


# --- slow and silent clients ----------------------------------------------------------

def read_answers(sock, count=None, timeout=20):
    """The answers the server sends on ``sock`` until it closes it, or until it
    has sent ``count`` -> [(status, headers, body)]. Fails the test if that does
    not happen within ``timeout`` seconds."""
    import socket
    sock.settimeout(timeout)
    data, answers = b"", []
    try:
        while count is None or len(answers) < count:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            while b"\r\n\r\n" in data:
                head, _, rest = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
                length = int(headers.get("content-length", 0))
                if len(rest) < length:
                    break
                answers.append((int(lines[0].split()[1]), headers, rest[:length]))
                data = rest[length:]
    except socket.timeout:
        pytest.fail(f"not within {timeout} s: {count or 'the connection closed'}; received {answers}, {data[:200]!r}")
    assert not data, data
    return answers


def basic_header(key):
    return "Authorization: Basic " + base64.b64encode(f"admin:{key}".encode()).decode()


def test_a_connection_that_sends_nothing_is_closed_after_the_first_byte_timeout(tmp_path):
    """A silent connection held its slot for --channel-timeout (60 s): clients
    that open connections and say nothing could hold every slot. One that has
    spoken may stay idle between requests up to --channel-timeout."""
    import socket
    quick = Server(tmp_path / "silent.db", "--first-byte-timeout", "1")
    try:
        with socket.create_connection(("127.0.0.1", quick.port), timeout=10) as silent, \
                socket.create_connection(("127.0.0.1", quick.port), timeout=10) as spoken:
            spoken.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert spoken.recv(65536).startswith(b"HTTP/1.1 200")
            assert read_answers(silent, timeout=20) == []  # closed, long before the 60 s
            spoken.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert [status for status, _, _ in read_answers(spoken)] == [200]
    finally:
        quick.stop()


def test_one_address_cannot_hold_every_connection(tmp_path):
    """Past --max-connections-per-address, a client address's new connections are
    answered 503 and closed at once, so that slots stay for other clients: with
    every slot held by silent connections from one address, /health from another
    waited for those to time out."""
    import select
    import socket
    held = Server(tmp_path / "held.db", "--connection-limit", "10", "--max-connections-per-address", "4",
                  "--first-byte-timeout", "120", "--channel-timeout", "120")
    attackers = []
    try:
        for _ in range(14):  # from 127.0.0.2: the server sees another client address than the test's
            attackers.append(socket.create_connection(("127.0.0.1", held.port), timeout=10,
                                                      source_address=("127.0.0.2", 0)))
        refused, deadline = [], time.monotonic() + 20
        while len(refused) < 10 and time.monotonic() < deadline:
            ready, _, _ = select.select([s for s in attackers if s not in refused], [], [], 0.5)
            refused += ready
        assert len(refused) == 10, f"{len(refused)} of the 10 connections past the limit were refused"
        for sock in refused:
            assert [status for status, _, _ in read_answers(sock)] == [503]
        assert held.request("GET", "/health", timeout=10)[0] == 200  # waited 120 s without the limit
        kept = [sock for sock in attackers if sock not in refused]
        kept[0].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert [status for status, _, _ in read_answers(kept[0])] == [200]  # the first four are served
        assert "refusing connections from 127.0.0.2" in "".join(held.log)
    finally:
        for sock in attackers:
            sock.close()
        held.stop()


def test_a_request_that_does_not_all_arrive_gets_a_408_after_the_answers_before_it(tmp_path):
    """--request-timeout closed the whole connection, under a running long poll
    too (whose answer was lost), and sent no 408 to a slow upload."""
    import socket
    slow = Server(tmp_path / "slow.db", "--request-timeout", "1").register("FOO")
    poll = (f"GET /events?wait=3&after=0 HTTP/1.1\r\nHost: x\r\n{basic_header(slow.admin_key)}\r\n\r\n").encode()
    partial = b"PUT /events/FOO-1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
    try:
        with socket.create_connection(("127.0.0.1", slow.port), timeout=10) as sock:
            sock.sendall(poll + partial)  # a long poll, then a request whose body never all comes
            answers = read_answers(sock)
        assert [status for status, _, _ in answers] == [200, 408]
        assert json.loads(answers[0][2])["Events"] == []
        assert answers[1][1]["content-type"] == "application/problem+json"
        assert json.loads(answers[1][2])["status"] == 408
        with socket.create_connection(("127.0.0.1", slow.port), timeout=10) as sock:
            sock.sendall(partial)  # a slow upload alone
            assert [status for status, _, _ in read_answers(sock)] == [408]
    finally:
        slow.stop()


def test_the_request_timeout_counts_only_while_the_request_is_read(tmp_path):
    """A request whose first bytes came behind a long poll is not read on while
    the answers before it are made (waitress reads one request ahead): its time
    starts again once it is read. (The rest comes 1.5 s after those answers, so
    that the server looks at the request's clock at least once before it: its
    serving loop turns at least once a second.)"""
    import socket
    slow = Server(tmp_path / "ahead.db", "--request-timeout", "3").register("FOO")
    auth = basic_header(slow.admin_key)
    poll = f"GET /events?wait=5&after=0 HTTP/1.1\r\nHost: x\r\n{auth}\r\n\r\n".encode()
    health = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    last = f"GET /programs HTTP/1.1\r\nHost: x\r\n{auth}\r\nConnection: close\r\n\r\n".encode()
    try:
        with socket.create_connection(("127.0.0.1", slow.port), timeout=10) as sock:
            sock.sendall(poll + health + last[:20])  # the last request's first bytes come with the others
            assert [status for status, _, _ in read_answers(sock, count=2)] == [200, 200]  # 5 s later
            time.sleep(1.5)
            sock.sendall(last[20:])
            assert [status for status, _, _ in read_answers(sock)] == [200]
    finally:
        slow.stop()


@pytest.mark.parametrize("flag", ["--request-timeout", "--first-byte-timeout", "--max-connections-per-address",
                                  "--connection-limit", "--threads"])
@pytest.mark.parametrize("value", ["0", "-1", "0.5", "nan"])
def test_limits_below_their_least_are_refused(flag, value):
    """--request-timeout 0 closed a request whose body came in a later segment."""
    import subprocess
    from server import ROOT
    result = subprocess.run([sys.executable, str(ROOT / "serve.py"), flag, value, "--port", "1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and flag in result.stderr and "Traceback" not in result.stderr, result.stderr


# --- first contact -------------------------------------------------------------------

def test_a_missing_database_is_refused_unless_created(tmp_path):
    """`serve.py --db eventstor.db` (a typo) quietly made a new registry with a new
    admin key, where the command line refuses the same typo."""
    import subprocess
    from server import ROOT
    typo = tmp_path / "eventstor.db"
    for processes in ("1", "2"):
        result = subprocess.run([sys.executable, str(ROOT / "serve.py"), "--db", str(typo), "--port", "0",
                                 "--processes", processes], capture_output=True, text=True, timeout=60)
        assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
        assert str(typo) in result.stderr and "--create" in result.stderr
    assert list(tmp_path.iterdir()) == []
    made = Server(typo)  # Server passes --create
    made.stop()
    assert made.admin_key and typo.exists()


def test_a_database_in_a_missing_folder_is_named_with_its_folder(tmp_path):
    missing = tmp_path / "no" / "such" / "events.db"
    with pytest.raises(eventstore.StorageOpenError) as raised:
        eventstore.make_app(str(missing))
    assert str(missing) in str(raised.value) and f"no folder {missing.parent}" in str(raised.value)


def test_the_banner_names_this_interpreter(tmp_path):
    """The banner's commands are run as they are printed: with the interpreter
    that serves (the project's .venv/bin/python, not a bare python)."""
    import shlex
    import subprocess
    from server import ROOT
    first = Server(tmp_path / "banner.db")
    first.stop()
    again = Server(tmp_path / "banner.db")
    again.stop()
    for server, prefix in ((first, "More users: "), (again, "New key for admin: ")):
        line = next(line for line in server.banner.splitlines() if line.startswith(prefix))
        argv = shlex.split(line[len(prefix):])
        assert argv[0] == sys.executable or (ROOT / argv[0]).resolve() == Path(sys.executable).resolve()
        if prefix.startswith("New key"):
            result = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT)
            assert result.returncode == 0 and eventstore.API_KEY_RE.fullmatch(result.stdout.strip())


def test_make_app_on_a_database_without_users_says_how_to_make_one(tmp_path, caplog):
    """Every request is a 401 there, and `key add admin` answers no such user."""
    import shlex
    import subprocess
    from server import ROOT
    path = str(tmp_path / "empty.db")
    with caplog.at_level("WARNING", logger="eventstore"):
        eventstore.make_app(path).close()
    [record] = [r for r in caplog.records if "no users" in r.getMessage()]
    command = record.getMessage().split(": ", 2)[2]
    assert command.endswith(" user add admin --system")
    result = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0 and eventstore.API_KEY_RE.fullmatch(result.stdout.strip()), result.stderr
    caplog.clear()
    with caplog.at_level("WARNING", logger="eventstore"):
        eventstore.make_app(path).close()
    assert not [r for r in caplog.records if "no users" in r.getMessage()]


def test_make_run_and_serve_never_show_a_password(tmp_path):
    """make echoed the command with the URL's password; an upper-case ?PASSWORD=
    (which libpq refuses) was printed in serve.py's error."""
    import subprocess
    from server import ROOT
    url = "postgresql://u:userinfo-secret@127.0.0.1:1/x?PASSWORD=query-secret&sslPassword=ssl-secret"
    # -o and PY: this Python as it is, no venv made or pip install run from here
    result = subprocess.run(["make", "-C", str(ROOT), "-o", ".venv/.runtime", "-o", ".venv/.postgres", "run",
                             f"PY={sys.executable}", f"DB={url}", "PORT=0"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0 and "error: cannot open postgresql://u:***@127.0.0.1:1/x?" in result.stderr
    assert "secret" not in result.stdout + result.stderr, result.stdout + result.stderr
