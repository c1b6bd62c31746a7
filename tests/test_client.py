"""eventstore_client.py against the real server: the Python API, its command
line, retries, and a follower that never misses a change."""

import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import eventstore_client
from eventstore_client import Client, ClientError, NoAnswer
from helpers import eventually, run_in_thread
from server import ROOT, Server, free_port, event

CLIENT = [sys.executable, str(ROOT / "eventstore_client.py")]



@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path / "client.db")
    server.register("FOO")
    server.register("BAR")
    yield server
    server.stop()


def admin_client(server, **options):
    return Client(f"http://127.0.0.1:{server.port}", "admin", server.admin_key, **options)


def requests_logged(server, method, path_prefix, at_least=0, timeout=30):
    """How many requests the server's access log shows for this method and path,
    once it shows ``at_least`` (a line is written after its answer is sent)."""
    deadline = time.monotonic() + timeout
    while True:
        count = sum(1 for line in server.log if f" {method} {path_prefix}" in line)
        if count >= at_least or time.monotonic() > deadline:
            return count
        time.sleep(0.02)


def add_user(server, user_id, grants):
    from helpers import create_user
    return create_user(server.db_path, user_id, grants)


def run_cli(server, *args, key=None, timeout=60, user="admin", url=True, env=None):
    """The command line with --url (unless ``url`` is false) and --user before the command."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}, **(env or {})}
    if key is not False:
        env["EVENTSTORE_KEY"] = key or server.admin_key
    where = ["--url", f"http://127.0.0.1:{server.port}"] if url else []
    return subprocess.run([*CLIENT, *where, "--user", user, *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def silent_listener():
    """A socket that accepts connections (the kernel does) and never answers."""
    import socket
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    return listener, f"http://127.0.0.1:{listener.getsockname()[1]}"


# --- the Python API ----------------------------------------------------------------------

def test_the_client_checks_event_ids_and_batches_by_the_servers_rules():
    """eventstore_client.py is one file with no import of the server: its copies
    of the EventId pattern and the batch limit must stay the server's."""
    import eventstore
    assert eventstore_client.EVENT_ID_RE.pattern == eventstore.EVENT_ID_RE.pattern
    assert eventstore_client.MAX_BATCH == eventstore.MAX_BATCH

def test_round_trip_put_get_delete_publish_and_follow(server):
    client = admin_client(server)
    assert client.put("FOO-1", event(1)) == 1
    assert client.put("FOO-1", event(1)) == 1  # a replay
    assert client.put("FOO-1", event(2), if_match='"1"') == 2
    assert client.get("FOO-1")["EventData"] == {"n": 2}
    assert client.delete("FOO-1") == 3
    events = [{"EventId": f"FOO-p{n}", **event(n)} for n in range(2500)]
    before = requests_logged(server, "POST", "/events")
    results = client.publish(events)
    assert requests_logged(server, "POST", "/events", at_least=before + 3) - before == 3  # 1000 + 1000 + 500
    assert [r["EventId"] for r in results] == [e["EventId"] for e in events]
    assert {r["Status"] for r in results} == {"created"} and all(r["Revision"] == 1 for r in results)
    followed = list(client.follow(until_caught_up=True, limit=1000))
    assert [e["EventId"] for e in followed] == ["FOO-1"] + [e["EventId"] for e in events]
    assert followed[0]["Deleted"] is True
    sequences = [e["Sequence"] for e in followed]
    assert sequences == sorted(set(sequences))
    assert [e["EventId"] for e in client.follow(after=sequences[-2], until_caught_up=True)] == ["FOO-p2499"]
    assert list(client.follow(ProgramId=["BAR"], until_caught_up=True)) == []


def test_conditional_put_and_get_by_revision(server):
    client = admin_client(server)
    assert client.put("FOO-1", event(1), if_none_match="*") == 1
    with pytest.raises(ClientError) as raised:
        client.put("FOO-1", event(2), if_none_match="*")  # create only: it exists
    assert raised.value.status == 412
    assert client.get("FOO-1", if_none_match=1) is None  # 304: still at revision 1
    assert client.get("FOO-1", if_none_match='"1"') is None
    assert client.put("FOO-1", event(2), if_match=1) == 2
    assert client.get("FOO-1", if_none_match=1)["EventData"] == {"n": 2}
    with pytest.raises(ClientError) as raised:
        client.delete("FOO-1", if_match=1)
    assert raised.value.status == 412


def losing_the_first_answer(client, meanwhile=lambda: None, applied=True):
    """The client's first request takes effect (unless not ``applied``) but its
    answer is lost; then ``meanwhile()`` runs (another client's change, say).
    -> the requests sent."""
    original, calls = client._send, []

    def send(*args):
        calls.append(args[:2])
        if len(calls) == 1:
            if applied:
                original(*args)
            meanwhile()
            raise eventstore_client._Retry(NoAnswer("connection reset"), 0)
        return original(*args)

    client._send = send
    return calls


@pytest.mark.parametrize("condition", [{"if_none_match": "*"}, {"if_match": 1}, {"if_match": '"1"'}])
def test_a_conditional_put_resent_after_its_answer_was_lost_reports_its_own_write(server, condition):
    """The resent PUT fails its condition because the first try took effect:
    the event now holds this body at the next revision, which is the answer."""
    client = admin_client(server)
    created = "if_none_match" in condition
    if not created:
        client.put("FOO-1", event(1))
    body = {**event(2), "EventStartUTC": "2026-03-01 09:30:00.1234567", "EventEndUTC": None}  # as the server reads it
    calls = losing_the_first_answer(client)
    assert client.put("FOO-1", body, **condition) == (1 if created else 2)
    assert [method for method, _ in calls] == ["PUT", "PUT", "GET"]
    assert admin_client(server).get("FOO-1")["Revision"] == (1 if created else 2)


@pytest.mark.parametrize("condition, meanwhile", [
    # (create-only after a delete is no conflict: the resent PUT creates the event anew)
    (condition, meanwhile) for condition in ({"if_none_match": "*"}, {"if_match": 1})
    for meanwhile in ("another body first", "changed after", "deleted after", "the same body, one revision more")
    if "if_match" in condition or meanwhile != "deleted after"])
def test_a_conditional_put_resent_after_another_change_says_it_may_have_been_applied(server, condition, meanwhile):
    client, other = admin_client(server), admin_client(server)
    if "if_match" in condition:
        client.put("FOO-1", event(1))
    change = {"another body first": lambda: other.put("FOO-1", event(3)),  # the first try never arrived
              "changed after": lambda: other.put("FOO-1", event(3)),
              "deleted after": lambda: other.delete("FOO-1"),
              "the same body, one revision more": lambda: (other.put("FOO-1", event(3)),
                                                           other.put("FOO-1", event(2)))}
    losing_the_first_answer(client, meanwhile=change[meanwhile], applied=meanwhile != "another body first")
    with pytest.raises(ClientError) as raised:
        client.put("FOO-1", event(2), **condition)
    assert raised.value.status == 412 and "may have applied it" in str(raised.value)


def test_a_conditional_delete_resent_after_its_answer_was_lost_reports_it_done(server):
    client = admin_client(server)
    client.put("FOO-1", event(1))
    calls = losing_the_first_answer(client)
    assert client.delete("FOO-1", if_match=1) is None  # the earlier try deleted it
    assert len(calls) == 2
    assert server.request("GET", "/events/FOO-1", user="admin", key=server.admin_key)[0] == 404
    client.put("FOO-2", event(1))
    losing_the_first_answer(client, meanwhile=lambda: admin_client(server).put("FOO-2", event(2)))  # deleted, made anew
    with pytest.raises(ClientError) as raised:
        client.delete("FOO-2", if_match=1)
    assert raised.value.status == 412 and "may have deleted it" in str(raised.value)


def test_every_failure_is_a_client_error_and_a_call_takes_its_own_timeout(server):
    refused = Client(f"http://127.0.0.1:{free_port()}", "u", "k", retry_for=0)
    with pytest.raises(ClientError) as raised:
        refused.get("FOO-1")
    assert isinstance(raised.value, NoAnswer) and raised.value.status is None
    listener, url = silent_listener()
    try:
        silent = Client(url, "u", "k", timeout=120, retry_for=0)
        started = time.monotonic()
        with pytest.raises(NoAnswer):
            silent.get("FOO-1", timeout=0.5)  # the call's timeout, not the client's 120 s
        assert time.monotonic() - started < 30
        with pytest.raises(NoAnswer):
            silent.put("FOO-1", event(), timeout=0.5)
    finally:
        listener.close()


def test_a_client_in_a_with_block_closes_every_connection_it_opened(server):
    with admin_client(server) as client:
        client.put("FOO-1", event())
        in_thread = run_in_thread(lambda: client.get("FOO-1"))
        in_thread()
        connections = set(client._connections)
        assert len(connections) == 2 and all(c.sock is not None for c in connections)
    assert all(c.sock is None for c in connections) and not client._connections


def test_breaking_out_of_follow_leaves_no_long_poll_behind(server):
    """The fetcher thread waits in a 30 s long poll for the next page while the
    loop handles this one: leaving the loop ends it at once, on both sides (the
    client shuts its socket; the server notices the client left)."""
    server.request("PUT", "/events/FOO-1", event(), user="admin", key=server.admin_key)
    client = admin_client(server)
    before = {t for t in threading.enumerate() if t.name == "eventstore-client-fetch"}

    def long_polls():
        return server.request("GET", "/health")[2]["longPolls"]

    for followed in client.follow():
        assert followed["EventId"] == "FOO-1"
        eventually(lambda: long_polls() == 1, "the fetcher waiting in a long poll for the next page")
        break
    fetchers = {t for t in threading.enumerate() if t.name == "eventstore-client-fetch"} - before
    eventually(lambda: not any(t.is_alive() for t in fetchers), "the fetcher thread ending", timeout=5)
    eventually(lambda: long_polls() == 0, "the server's long poll ending", timeout=5)


def test_publish_starts_a_new_batch_for_an_event_id_already_in_it(server):
    client = admin_client(server)
    results = client.publish([{"EventId": "FOO-x", **event(1)}, {"EventId": "FOO-y", **event(1)},
                              {"EventId": "FOO-x", **event(2)}])
    assert [(r["EventId"], r["Revision"], r["Status"]) for r in results] == [
        ("FOO-x", 1, "created"), ("FOO-y", 1, "created"), ("FOO-x", 2, "updated")]


@pytest.mark.parametrize("status", [401, 403, 404])
def test_client_errors_are_raised_at_once_and_never_retried(server, status):
    key = add_user(server, "reader", {"FOO": "read"})
    client = {401: Client(f"http://127.0.0.1:{server.port}", "admin", "esk_" + "x" * 43),
              403: Client(f"http://127.0.0.1:{server.port}", "reader", key),
              404: admin_client(server)}[status]
    before = requests_logged(server, "GET", "/events/BAR-1")
    with pytest.raises(ClientError) as raised:
        client.get("BAR-1")
    assert raised.value.status == status
    assert raised.value.problem["status"] == status
    assert requests_logged(server, "GET", "/events/BAR-1", at_least=before + 1) - before == 1
    time.sleep(0.3)  # room for a retry to show up in the log, had there been one
    assert requests_logged(server, "GET", "/events/BAR-1") - before == 1


def test_a_delete_resent_after_its_answer_was_lost_counts_as_done(server):
    client = admin_client(server)
    client.put("FOO-1", event())
    original, calls = client._send, []

    def lose_the_first_answer(*args):
        calls.append(args)
        result = original(*args)
        if len(calls) == 1:  # it was done, but the answer never arrived
            raise eventstore_client._Retry(ConnectionError("connection reset"), 0)
        return result

    client._send = lose_the_first_answer
    assert client.delete("FOO-1") is None
    assert len(calls) == 2 and server.request("GET", "/events/FOO-1", user="admin", key=server.admin_key)[0] == 404
    with pytest.raises(ClientError) as raised:
        admin_client(server).delete("FOO-1")  # sent once: a plain 404
    assert raised.value.status == 404


class ScriptedServer:
    """A tiny HTTP server answering from a script of (status, headers, body)."""

    def __init__(self, answers):
        answers, self.requests = list(answers), []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.requests.append(self.path)
                status, headers, payload = answers.pop(0)
                data = json.dumps(payload).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_503_and_429_are_retried_after_their_retry_after():
    event = {"EventId": "FOO-1"}
    scripted = ScriptedServer([(503, {"Retry-After": "3"}, {"status": 503}),
                               (429, {"Retry-After": "7"}, {"status": 429}),
                               (200, {}, event)])
    slept = []
    try:
        client = Client(scripted.url, "u", "k", sleep=slept.append)
        assert client.get("FOO-1") == event
    finally:
        scripted.close()
    assert slept == [3.0, 7.0] and len(scripted.requests) == 3


def test_other_5xx_and_refused_connections_back_off_with_jitter_and_give_up_after_retry_for():
    scripted = ScriptedServer([(500, {}, {"status": 500})] * 3 + [(200, {}, {"EventId": "FOO-1"})])
    slept = []
    try:
        assert Client(scripted.url, "u", "k", sleep=slept.append).get("FOO-1") == {"EventId": "FOO-1"}
    finally:
        scripted.close()
    assert len(slept) == 3 and all(0 < s <= eventstore_client.MAX_BACKOFF_SECONDS for s in slept)
    closed = Client(f"http://127.0.0.1:{free_port()}", "u", "k", retry_for=2, sleep=time.sleep)
    started = time.monotonic()
    with pytest.raises(NoAnswer):
        closed.get("FOO-1")
    assert time.monotonic() - started < 10


def test_a_follower_outlives_a_server_restart_on_the_same_port(tmp_path):
    port = free_port()
    first = Server(tmp_path / "restart.db", port=port)
    key = first.admin_key
    first.register("FOO")
    first.request("PUT", "/events/FOO-before", event(), user="admin", key=key)
    seen, errors = [], []
    client = Client(f"http://127.0.0.1:{port}", "admin", key)

    def follow():
        try:
            for followed in client.follow():
                seen.append(followed["EventId"])
                if followed["EventId"] == "FOO-after":
                    return
        except Exception as exc:  # handed to the test below
            errors.append(exc)

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    deadline = time.monotonic() + 10
    while seen != ["FOO-before"]:
        assert time.monotonic() < deadline, seen
        time.sleep(0.02)
    first.stop()
    time.sleep(0.5)  # the follower meets a refused connection now, and backs off
    second = Server(tmp_path / "restart.db", port=port)
    try:
        second.request("PUT", "/events/FOO-after", event(), user="admin", key=key)
        follower.join(30)
        assert not follower.is_alive() and not errors
        assert seen == ["FOO-before", "FOO-after"]
    finally:
        second.stop()


def test_a_follower_that_stops_while_the_server_is_down_leaves_no_thread_retrying(tmp_path):
    """The page fetcher retries a refused connection for as long as somebody
    follows; once the follower stops, it gives up at its next retry instead of
    retrying forever in the background."""
    server = Server(tmp_path / "gone.db")
    server.register("FOO")
    server.request("PUT", "/events/FOO-1", event(), user="admin", key=server.admin_key)
    retries = []
    client = admin_client(server, log=retries.append)
    before = {t for t in threading.enumerate() if t.name == "eventstore-client-fetch"}
    pages = client.follow_pages()
    events, _ = next(pages)
    assert [e["EventId"] for e in events] == ["FOO-1"]
    fetchers = {t for t in threading.enumerate() if t.name == "eventstore-client-fetch"} - before
    server.stop()
    eventually(lambda: any("trying again" in message for message in retries), "the fetcher backing off")
    pages.close()  # the follower stops
    eventually(lambda: not any(t.is_alive() for t in fetchers), "the fetcher giving up", timeout=5)


# --- the command line ----------------------------------------------------------------------

def test_the_key_comes_only_from_the_environment(server):
    missing = run_cli(server, "get", "FOO-1", key=False)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1 and "EVENTSTORE_KEY" in missing.stderr
    as_argument = run_cli(server, "--key", server.admin_key, "get", "FOO-1", key=False)
    assert as_argument.returncode == 2 and server.admin_key not in as_argument.stdout
    assert requests_logged(server, "GET", "/events/FOO-1") == 0


def test_url_and_user_go_before_or_after_the_command_and_the_url_comes_from_the_environment(server):
    server.request("PUT", "/events/FOO-1", event(5), user="admin", key=server.admin_key)
    url = f"http://127.0.0.1:{server.port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}
    after = subprocess.run([*CLIENT, "get", "FOO-1", "--url", url, "--user", "admin"], capture_output=True,
                           text=True, env={**env, "EVENTSTORE_KEY": server.admin_key}, timeout=60)
    assert after.returncode == 0 and json.loads(after.stdout)["EventData"] == {"n": 5}, after.stderr
    from_env = run_cli(server, "get", "FOO-1", url=False, env={"EVENTSTORE_URL": url})
    assert from_env.returncode == 0 and json.loads(from_env.stdout)["EventData"] == {"n": 5}, from_env.stderr
    wrong_env = run_cli(server, "get", "FOO-1", env={"EVENTSTORE_URL": "http://127.0.0.1:1"})
    assert wrong_env.returncode == 0, "--url wins over EVENTSTORE_URL"
    missing = run_cli(server, "get", "FOO-1", url=False)
    assert missing.returncode == 2 and "EVENTSTORE_URL" in missing.stderr and "Traceback" not in missing.stderr


def test_the_user_comes_from_user_or_the_environment(server):
    server.request("PUT", "/events/FOO-1", event(5), user="admin", key=server.admin_key)
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTSTORE_")}
    env.update(EVENTSTORE_KEY=server.admin_key, EVENTSTORE_URL=f"http://127.0.0.1:{server.port}")
    from_env = subprocess.run([*CLIENT, "get", "FOO-1"], capture_output=True, text=True, timeout=60,
                              env={**env, "EVENTSTORE_USER": "admin"})
    assert from_env.returncode == 0 and json.loads(from_env.stdout)["EventData"] == {"n": 5}, from_env.stderr
    wrong_env = subprocess.run([*CLIENT, "get", "FOO-1", "--user", "admin"], capture_output=True, text=True,
                               timeout=60, env={**env, "EVENTSTORE_USER": "nobody"})
    assert wrong_env.returncode == 0, "--user wins over EVENTSTORE_USER"
    missing = subprocess.run([*CLIENT, "get", "FOO-1"], capture_output=True, text=True, timeout=60, env=env)
    assert missing.returncode == 2 and "EVENTSTORE_USER" in missing.stderr and "Traceback" not in missing.stderr


def test_a_one_shot_command_gives_up_after_retry_for_seconds():
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: refused, retried
    for where in ("before", "after"):
        options = ["--url", url, "--user", "admin", "--retry-for", "1"]
        argv = options + ["get", "FOO-1"] if where == "before" else ["get", "FOO-1"] + options
        started = time.monotonic()
        result = subprocess.run([*CLIENT, *argv], capture_output=True, text=True,
                                env={**os.environ, "EVENTSTORE_KEY": "k"}, timeout=60)
        assert result.returncode == 1 and f"no answer from {url.removeprefix('http://')}" in result.stderr, \
            result.stderr  # names the port it gave up on
        assert "Traceback" not in result.stderr
        assert time.monotonic() - started < 20  # not the default 30 s of retrying
    assert "--retry-for" in subprocess.run([*CLIENT, "get", "--help"], capture_output=True, text=True).stdout


def test_get_prints_the_representation_and_a_404_is_exit_1(server):
    server.request("PUT", "/events/FOO-1", event(5), user="admin", key=server.admin_key)
    found = run_cli(server, "get", "FOO-1")
    assert found.returncode == 0 and json.loads(found.stdout)["EventData"] == {"n": 5}
    missing = run_cli(server, "get", "FOO-2")
    assert missing.returncode == 1 and missing.stdout == "" and "404" in missing.stderr


def test_publish_checks_every_line_and_sends_nothing_if_one_is_bad(server, tmp_path):
    lines = [json.dumps({"EventId": "FOO-1", **event()}), "{not json",
             json.dumps({"EventId": "FOO-2", **event(), "Extra": 1}),
             json.dumps({"EventId": "BAR-3", **event()}), json.dumps({"EventId": "FOO-4", **event()})]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = run_cli(server, "publish", str(path))
    assert result.returncode == 1 and result.stdout == ""
    reported = [line for line in result.stderr.splitlines() if line.startswith("line ")]
    assert [line.split(":")[0] for line in reported] == ["line 2", "line 3", "line 4"]
    assert "Extra" in reported[1] and "ProgramId" in reported[2]
    assert requests_logged(server, "POST", "/events") == 0 and requests_logged(server, "DELETE", "/events") == 0


def test_publish_sends_puts_and_tombstones_in_file_order_and_summarises(server, tmp_path):
    server.request("PUT", "/events/FOO-gone", event(), user="admin", key=server.admin_key)
    exported = {"EventId": "FOO-2", **event(2), "Revision": 9, "Sequence": 99, "Deleted": False,
                "CreatedUTC": "2026-01-01T00:00:00Z", "UpdatedUTC": "2026-01-01T00:00:00Z"}
    lines = [{"EventId": "FOO-1", **event(1)}, exported,
             {"EventId": "FOO-gone", "ProgramId": "FOO", "EventType": "T", "Deleted": True},
             {"EventId": "FOO-never", "ProgramId": "FOO", "EventType": "T", "Deleted": True},
             {"EventId": "FOO-1", **event(1)}]
    path = tmp_path / "good.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run_cli(server, "publish", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "published 5 lines: 2 created, 0 updated, 1 unchanged, 2 deleted\n"
    assert server.request("GET", "/events/FOO-gone", user="admin", key=server.admin_key)[0] == 404
    assert server.request("GET", "/events/FOO-2", user="admin", key=server.admin_key)[2]["Revision"] == 1


def test_follow_writes_only_events_on_stdout_and_progress_on_stderr(server):
    for n in range(3):
        server.request("PUT", f"/events/FOO-{n}", event(n), user="admin", key=server.admin_key)
    server.request("PUT", "/events/BAR-1", event(program="BAR"), user="admin", key=server.admin_key)
    result = run_cli(server, "follow", "--program", "FOO", "--until-caught-up")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [json.loads(line)["EventId"] for line in lines] == ["FOO-0", "FOO-1", "FOO-2"]
    assert "followed 3 changes" in result.stderr


def test_a_follower_killed_at_any_moment_and_restarted_on_its_cursor_misses_nothing(server, tmp_path):
    """Publishing goes on while a `follow --cursor-file` is SIGKILLed three times
    and restarted. Every event is new, so each stays in the feed at its one
    Sequence: a page lost between runs would be missing from the output. A
    restart starts where the output ends (the cursor never runs ahead of it),
    repeats at most one page, and a kill leaves no file but the cursor and
    perhaps its one staging file."""
    (tmp_path / "cursor-folder").mkdir()
    cursor, output = tmp_path / "cursor-folder" / "cursor", tmp_path / "out.jsonl"
    stop, acknowledged = threading.Event(), {}

    def publish():
        client, n = admin_client(server), 0
        while not stop.is_set() and n < 3000:
            batch = [{"EventId": f"FOO-{n + i}", **event(n + i)} for i in range(20)]
            for result in client.publish(batch):
                acknowledged[result["EventId"]] = result["Revision"]
            n += 20

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    env = {**os.environ, "EVENTSTORE_KEY": server.admin_key}
    command = [*CLIENT, "--url", f"http://127.0.0.1:{server.port}", "--user", "admin", "follow",
               "--cursor-file", str(cursor)]
    def written_so_far():
        return [json.loads(line)["Sequence"] for line in output.read_text().splitlines()]

    with open(output, "ab") as sink:
        for delay in (0.4, 0.7, 0.3):
            follower = subprocess.Popen(command, stdout=sink, stderr=subprocess.DEVNULL, env=env)
            time.sleep(delay)  # a random-ish moment, not a synchronization
            follower.send_signal(signal.SIGKILL)
            follower.wait(10)
            assert {p.name for p in cursor.parent.iterdir()} <= {"cursor", "cursor.writing"}
            if cursor.exists():
                assert int(cursor.read_text()) <= max(written_so_far())
    stop.set()
    publisher.join(60)
    assert not publisher.is_alive()
    with open(output, "ab") as sink:
        last = subprocess.run(command + ["--until-caught-up"], stdout=sink, stderr=subprocess.PIPE, env=env,
                              timeout=60)
    assert last.returncode == 0
    served = [json.loads(line) for line in output.read_text().splitlines()]
    assert {event["EventId"] for event in served} == set(acknowledged)  # no page lost
    assert len(acknowledged) >= 20
    assert [p.name for p in cursor.parent.iterdir()] == ["cursor"]
    # A repeat happens only where a run was killed between writing a page and its cursor.
    sequences = [event["Sequence"] for event in served]
    repeats = len(sequences) - len(set(sequences))
    assert repeats <= 3 * 1000, repeats  # at most one page (--limit, 1000) per restart
    assert int(cursor.read_text()) == max(sequences)


def test_the_cursor_is_saved_only_after_its_page_is_written(server, tmp_path):
    """Standard output fails on the second page (a full disk, a closed pipe):
    the cursor must still say the first page, or the second is lost for good."""
    import io
    for n in range(5):
        server.request("PUT", f"/events/FOO-{n}", event(n), user="admin", key=server.admin_key)
    sequences = [e["Sequence"] for e in admin_client(server).follow(until_caught_up=True)]

    class FailingOnSecondPage(io.BytesIO):
        pages = 0

        def write(self, data):
            self.pages += 1
            if self.pages == 2:
                raise OSError(28, "No space left on device")
            return super().write(data)

    cursor, out, err = tmp_path / "cursor", FailingOnSecondPage(), io.StringIO()
    status = eventstore_client.main(
        ["--url", f"http://127.0.0.1:{server.port}", "--user", "admin", "follow", "--limit", "2",
         "--until-caught-up", "--cursor-file", str(cursor)], environ={"EVENTSTORE_KEY": server.admin_key},
        out=out, err=err)
    assert status == 1 and "No space left" in err.getvalue()
    assert len(out.getvalue().splitlines()) == 2
    assert int(cursor.read_text()) == sequences[1]


def test_a_follow_removes_the_staging_file_a_killed_one_left(server, tmp_path):
    server.request("PUT", "/events/FOO-1", event(), user="admin", key=server.admin_key)
    cursor = tmp_path / "cursor"
    (tmp_path / "cursor.writing").write_text("12")  # killed before its rename
    result = run_cli(server, "follow", "--until-caught-up", "--cursor-file", str(cursor))
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("cursor")) == ["cursor"]
    assert [json.loads(line)["EventId"] for line in result.stdout.splitlines()] == ["FOO-1"]


def test_sigterm_stops_a_follower_cleanly(server, tmp_path):
    server.request("PUT", "/events/FOO-1", event(), user="admin", key=server.admin_key)
    env = {**os.environ, "EVENTSTORE_KEY": server.admin_key}
    follower = subprocess.Popen([*CLIENT, "--url", f"http://127.0.0.1:{server.port}", "--user", "admin", "follow",
                                 "--cursor-file", str(tmp_path / "cursor")],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        assert json.loads(run_in_thread(follower.stdout.readline)(timeout=20))["EventId"] == "FOO-1"
        eventually(lambda: server.request("GET", "/health")[2]["longPolls"] == 1, "the follower long-polling")
        follower.send_signal(signal.SIGTERM)
        assert follower.wait(10) == 130
        assert b"Traceback" not in follower.stderr.read()
    finally:
        follower.kill()
    eventually(lambda: server.request("GET", "/health")[2]["longPolls"] == 0, "its long poll ending", timeout=5)


def test_a_cursor_past_the_head_is_a_clear_error_never_a_loop(server, tmp_path):
    """A cursor kept from a restored older backup (or mistyped) is past the
    registry's head: follow raises the 400 at once, naming the head, and the
    command line exits 1 saying so, after one request."""
    server.request("PUT", "/events/FOO-1", event(), user="admin", key=server.admin_key)
    with pytest.raises(ClientError) as raised:
        next(admin_client(server).follow(after=99))
    assert raised.value.status == 400 and raised.value.problem["Head"] == 1
    assert "past the feed's head, 1" in str(raised.value)
    cursor = tmp_path / "cursor"
    cursor.write_text("99\n")
    asked = requests_logged(server, "GET", "/events?", at_least=1)
    for options in (["--after", "99"], ["--cursor-file", str(cursor)]):
        result = run_cli(server, "follow", *options)
        assert result.returncode == 1 and result.stdout == "", result.stderr
        assert "error: HTTP 400" in result.stderr and "head, 1" in result.stderr and "Traceback" not in result.stderr
        asked += 1
        time.sleep(0.3)  # room for a repeat to show in the log, had there been one
        assert requests_logged(server, "GET", "/events?", at_least=asked) == asked
    assert cursor.read_text() == "99\n"


def test_follow_keeps_tricky_strings_whole(server):
    tricky = {"a": '},{"EventId":"x"}]', "b": "line\u2028sep\u2029", "c": ["]", "[", "\\"], "d": "é\n\"q\""}
    server.request("PUT", "/events/FOO-t", {**event(), "EventData": tricky}, user="admin", key=server.admin_key)
    result = run_cli(server, "follow", "--until-caught-up")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()  # str.splitlines splits at U+2028 too: it must be escaped
    assert json.loads(line)["EventData"] == tricky
    assert list(admin_client(server).follow(until_caught_up=True))[0]["EventData"] == tricky


# --- subscriptions ---------------------------------------------------------------------------

def test_subscribe_creates_and_changes_a_subscription_from_every_kind_of_start(server):
    import datetime
    client = admin_client(server)
    for n in range(3):
        client.put(f"FOO-{n}", event(n))
    created = client.subscribe("lms", filter={"ProgramId": "FOO", "EventType": ["T"]}, description="The LMS.")
    assert (created["Filter"], created["Position"], created["Description"]) == (
        {"ProgramId": ["FOO"], "EventType": ["T"]}, 0, "The LMS.")
    updated = {n: client.get(f"FOO-{n}")["UpdatedUTC"] for n in range(3)}
    later = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=1)
    for start_from, position in (("now", 3), ("beginning", 0), (2, 2), (updated[1], 1), (later, 3),
                                 (later.replace(tzinfo=None), 3)):
        assert client.subscribe("lms", start_from=start_from)["Position"] == position, start_from
    unchanged = client.subscribe("lms")
    assert (unchanged["Filter"]["ProgramId"], unchanged["Description"]) == (["FOO"], "The LMS.")
    for wrong in (True, 1.5, None.__class__):
        with pytest.raises(ValueError):
            client.subscribe("lms", start_from=wrong)
    with pytest.raises(ClientError) as raised:
        client.subscribe("lms", start_from=99)
    assert raised.value.status == 400 and raised.value.problem["Head"] == 3


def test_following_a_subscription_acknowledges_each_page_once_it_is_yielded_on(server):
    client = admin_client(server)
    for n in range(5):
        client.put(f"FOO-{n}", event(n))
    client.subscribe("lms")

    def position():
        return server.request("GET", "/subscriptions/lms", user="admin", key=server.admin_key)[2]["Position"]

    followed = client.follow(subscription="lms", limit=2)
    assert [next(followed)["EventId"] for _ in range(2)] == ["FOO-0", "FOO-1"]
    assert position() == 0  # the page is being handled: not acknowledged yet
    assert next(followed)["EventId"] == "FOO-2"  # asked for the next: the first page is done
    assert position() == 2
    followed.close()  # stopped within the second page: it comes again, and nothing before it
    again = list(client.follow(subscription="lms", until_caught_up=True, limit=2))
    assert [e["EventId"] for e in again] == ["FOO-2", "FOO-3", "FOO-4"]
    assert position() == 5  # until caught up: the page before the empty one acknowledged
    assert list(client.follow(subscription="lms", until_caught_up=True)) == []


@pytest.mark.parametrize("options", [{"after": 0}, {"after": 5}, {"ProgramId": "FOO"}, {"EventType": ["T"]},
                                     {"ProgramMemberId": "m"}])
def test_following_a_subscription_takes_no_cursor_and_no_filter(server, options):
    with pytest.raises(ValueError):
        next(admin_client(server).follow(subscription="lms", **options))


def test_follow_subscription_on_the_command_line(server):
    client = admin_client(server)
    for n in range(3):
        client.put(f"FOO-{n}", event(n))
    client.put("BAR-0", event(program="BAR"))
    client.subscribe("lms", filter={"ProgramId": ["FOO"]})
    result = run_cli(server, "follow", "--subscription", "lms", "--limit", "2", "--until-caught-up")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["EventId"] for line in result.stdout.splitlines()] == ["FOO-0", "FOO-1", "FOO-2"]
    state = server.request("GET", "/subscriptions/lms", user="admin", key=server.admin_key)[2]
    assert (state["Position"], state["Behind"]) == (3, 0)
    for options in (["--after", "1"], ["--cursor-file", "c"], ["--program", "FOO"], ["--type", "T"],
                    ["--member", "m"]):
        wrong = run_cli(server, "follow", "--subscription", "lms", *options)
        assert wrong.returncode == 2 and wrong.stdout == "" and "--subscription" in wrong.stderr, options
    missing = run_cli(server, "follow", "--subscription", "none", "--until-caught-up")
    assert missing.returncode == 1 and "404" in missing.stderr


def test_a_subscription_follower_killed_at_any_moment_misses_nothing_and_repeats_at_most_a_page(server, tmp_path):
    """Publishing goes on while `follow --subscription` is SIGKILLed 20 times at
    random moments and started again. Every event is new, so each stays in the
    feed at its one Sequence: a page lost between runs would be missing from the
    output. A run repeats at most the one page it started with (the one the run
    before wrote and had not yet acknowledged)."""
    import random
    limit, rng = 50, random.Random(31)
    client = admin_client(server)
    client.subscribe("kill", filter={"ProgramId": ["FOO"]})
    stop, acknowledged = threading.Event(), {}

    def publish():
        publisher, n = admin_client(server), 0
        while not stop.is_set() and n < 20_000:
            batch = [{"EventId": f"FOO-{n + i}", **event(n + i)} for i in range(20)]
            for result in publisher.publish(batch):
                acknowledged[result["EventId"]] = result["Revision"]
            n += 20
            time.sleep(0.01)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    env = {**os.environ, "EVENTSTORE_KEY": server.admin_key}
    command = [*CLIENT, "--url", f"http://127.0.0.1:{server.port}", "--user", "admin", "follow",
               "--subscription", "kill", "--limit", str(limit)]
    outputs = []
    for run in range(20):
        outputs.append(tmp_path / f"run{run}.jsonl")
        with open(outputs[-1], "wb") as sink:
            follower = subprocess.Popen(command, stdout=sink, stderr=subprocess.DEVNULL, env=env)
            time.sleep(rng.uniform(0.1, 0.6))  # a random moment, not a synchronization
            follower.send_signal(signal.SIGKILL)
            follower.wait(10)
    stop.set()
    publisher.join(60)
    assert not publisher.is_alive()
    outputs.append(tmp_path / "last.jsonl")
    with open(outputs[-1], "wb") as sink:
        last = subprocess.run(command + ["--until-caught-up"], stdout=sink, stderr=subprocess.PIPE, env=env,
                              timeout=60)
    assert last.returncode == 0, last.stderr
    seen, runs = set(), []
    for output in outputs:
        lines = output.read_text().splitlines()
        events = []
        for number, line in enumerate(lines):
            try:
                events.append(json.loads(line)["EventId"])
            except ValueError:  # killed while writing its last line: that page was not acknowledged
                assert number == len(lines) - 1, output
        repeated = [event_id for event_id in events if event_id in seen]
        assert len(repeated) <= limit and events[:len(repeated)] == repeated, (output, len(repeated))
        runs.append(len(events))
        seen.update(events)
    assert seen == set(acknowledged)  # nothing missed
    assert len(acknowledged) >= 200 and sum(1 for count in runs[:-1] if count) >= 10, runs
