"""End to end: serve.py with waitress on a free loopback port, over real HTTP."""

import pytest

import eventstore
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
    assert server.request("PUT", "/programs/FOO", {"Name": "Foo"}, **admin)[0] == 200
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
    server.request("PUT", "/programs/FOO", {"Name": "Foo"}, **admin)
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
    server.request("PUT", "/programs/FOO", {"Name": "Foo"}, user="admin", key=server.admin_key)
    acknowledged, seen = publish_while_following([server], server, server.admin_key, puts=60, ids=30)
    assert len(acknowledged) > 30
    assert_seen_every_change_once_in_order(seen, acknowledged)


def test_erasure_with_a_percent_encoded_member_id_over_http(server):
    import urllib.parse
    admin = {"user": "admin", "key": server.admin_key}
    server.request("PUT", "/programs/FOO", {"Name": "Foo"}, **admin)
    member = "Zoë Ñúñez+tag@example.com/x"
    for n in range(3):
        server.request("PUT", f"/events/FOO-{n}", {"ProgramId": "FOO", "ProgramMemberId": member,
                                                   "EventType": "T", "EventStartUTC": "2026-03-01T09:30:00Z"}, **admin)
    path = "/programs/FOO/members/" + urllib.parse.quote(member, safe="")
    assert server.request("DELETE", path, **admin)[2] == {"Deleted": 3}
    assert server.request("DELETE", path, **admin)[2] == {"Deleted": 0}
