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
from eventstore_client import Client, ClientError
from conftest import eventually
from server import ROOT, Server, free_port

CLIENT = [sys.executable, str(ROOT / "eventstore_client.py")]


def body(n=0, member="m", program="FOO"):
    return {"ProgramId": program, "ProgramMemberId": member, "EventType": "T",
            "EventStartUTC": "2026-03-01T09:30:00Z", "EventData": {"n": n}}


@pytest.fixture
def server(tmp_path):
    server = Server(tmp_path / "client.db")
    server.request("PUT", "/programs/FOO", {"Name": "Foo"}, user="admin", key=server.admin_key)
    server.request("PUT", "/programs/BAR", {"Name": "Bar"}, user="admin", key=server.admin_key)
    yield server
    server.stop()


def admin_client(server, **options):
    return Client(f"http://127.0.0.1:{server.port}", "admin", server.admin_key, **options)


def requests_logged(server, method, path_prefix, at_least=0, timeout=5):
    """How many requests the server's access log shows for this method and path,
    once it shows ``at_least`` (a line is written after its answer is sent)."""
    deadline = time.monotonic() + timeout
    while True:
        count = sum(1 for line in server.log if f" {method} {path_prefix}" in line)
        if count >= at_least or time.monotonic() > deadline:
            return count
        time.sleep(0.02)


def add_user(server, user_id, grants):
    from conftest import create_user
    return create_user(server.db_path, user_id, grants)


def run_cli(server, *args, key=None, timeout=60, user="admin"):
    env = {k: v for k, v in os.environ.items() if k != "EVENTSTORE_KEY"}
    if key is not False:
        env["EVENTSTORE_KEY"] = key or server.admin_key
    return subprocess.run([*CLIENT, "--url", f"http://127.0.0.1:{server.port}", "--user", user, *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


# --- the Python API ----------------------------------------------------------------------

def test_round_trip_put_get_delete_publish_and_follow(server):
    client = admin_client(server)
    assert client.put("FOO-1", body(1)) == 1
    assert client.put("FOO-1", body(1)) == 1  # a replay
    assert client.put("FOO-1", body(2), if_match='"1"') == 2
    assert client.get("FOO-1")["EventData"] == {"n": 2}
    assert client.delete("FOO-1") == 3
    events = [{"EventId": f"FOO-p{n}", **body(n)} for n in range(2500)]
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


def test_publish_starts_a_new_batch_for_an_event_id_already_in_it(server):
    client = admin_client(server)
    results = client.publish([{"EventId": "FOO-x", **body(1)}, {"EventId": "FOO-y", **body(1)},
                              {"EventId": "FOO-x", **body(2)}])
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
    client.put("FOO-1", body())
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
    with pytest.raises(ConnectionError):
        closed.get("FOO-1")
    assert time.monotonic() - started < 10


def test_a_follower_outlives_a_server_restart_on_the_same_port(tmp_path):
    port = free_port()
    first = Server(tmp_path / "restart.db", port=port)
    key = first.admin_key
    first.request("PUT", "/programs/FOO", {"Name": "Foo"}, user="admin", key=key)
    first.request("PUT", "/events/FOO-before", body(), user="admin", key=key)
    seen, errors = [], []
    client = Client(f"http://127.0.0.1:{port}", "admin", key)

    def follow():
        try:
            for event in client.follow():
                seen.append(event["EventId"])
                if event["EventId"] == "FOO-after":
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
        second.request("PUT", "/events/FOO-after", body(), user="admin", key=key)
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
    server.request("PUT", "/programs/FOO", {"Name": "Foo"}, user="admin", key=server.admin_key)
    server.request("PUT", "/events/FOO-1", body(), user="admin", key=server.admin_key)
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


def test_get_prints_the_representation_and_a_404_is_exit_1(server):
    server.request("PUT", "/events/FOO-1", body(5), user="admin", key=server.admin_key)
    found = run_cli(server, "get", "FOO-1")
    assert found.returncode == 0 and json.loads(found.stdout)["EventData"] == {"n": 5}
    missing = run_cli(server, "get", "FOO-2")
    assert missing.returncode == 1 and missing.stdout == "" and "404" in missing.stderr


def test_publish_checks_every_line_and_sends_nothing_if_one_is_bad(server, tmp_path):
    lines = [json.dumps({"EventId": "FOO-1", **body()}), "{not json",
             json.dumps({"EventId": "FOO-2", **body(), "Extra": 1}),
             json.dumps({"EventId": "BAR-3", **body()}), json.dumps({"EventId": "FOO-4", **body()})]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = run_cli(server, "publish", str(path))
    assert result.returncode == 1 and result.stdout == ""
    reported = [line for line in result.stderr.splitlines() if line.startswith("line ")]
    assert [line.split(":")[0] for line in reported] == ["line 2", "line 3", "line 4"]
    assert "Extra" in reported[1] and "ProgramId" in reported[2]
    assert requests_logged(server, "POST", "/events") == 0 and requests_logged(server, "DELETE", "/events") == 0


def test_publish_sends_puts_and_tombstones_in_file_order_and_summarises(server, tmp_path):
    server.request("PUT", "/events/FOO-gone", body(), user="admin", key=server.admin_key)
    exported = {"EventId": "FOO-2", **body(2), "Revision": 9, "Sequence": 99, "Deleted": False,
                "CreatedUTC": "2026-01-01T00:00:00Z", "UpdatedUTC": "2026-01-01T00:00:00Z"}
    lines = [{"EventId": "FOO-1", **body(1)}, exported,
             {"EventId": "FOO-gone", "ProgramId": "FOO", "EventType": "T", "Deleted": True},
             {"EventId": "FOO-never", "ProgramId": "FOO", "EventType": "T", "Deleted": True},
             {"EventId": "FOO-1", **body(1)}]
    path = tmp_path / "good.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = run_cli(server, "publish", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "published 5 lines: 2 created, 0 updated, 1 unchanged, 2 deleted\n"
    assert server.request("GET", "/events/FOO-gone", user="admin", key=server.admin_key)[0] == 404
    assert server.request("GET", "/events/FOO-2", user="admin", key=server.admin_key)[2]["Revision"] == 1


def test_follow_writes_only_events_on_stdout_and_progress_on_stderr(server):
    for n in range(3):
        server.request("PUT", f"/events/FOO-{n}", body(n), user="admin", key=server.admin_key)
    server.request("PUT", "/events/BAR-1", body(program="BAR"), user="admin", key=server.admin_key)
    result = run_cli(server, "follow", "--program", "FOO", "--until-caught-up")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [json.loads(line)["EventId"] for line in lines] == ["FOO-0", "FOO-1", "FOO-2"]
    assert "followed 3 changes" in result.stderr


def test_a_follower_killed_at_any_moment_and_restarted_on_its_cursor_misses_nothing(server, tmp_path):
    """Publishing goes on while a `follow --cursor-file` is SIGKILLed three times
    and restarted; in the end every event's last change is in the output, in
    Sequence order per run, and each restart repeats at most one page."""
    cursor, output = tmp_path / "cursor", tmp_path / "out.jsonl"
    stop, acknowledged = threading.Event(), {}

    def publish():
        client, n = admin_client(server), 0
        while not stop.is_set() and n < 3000:
            batch = [{"EventId": f"FOO-{(n + i) % 400}", **body(n + i)} for i in range(20)]
            for result in client.publish(batch):
                acknowledged[result["EventId"]] = result["Revision"]
            n += 20

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    env = {**os.environ, "EVENTSTORE_KEY": server.admin_key}
    command = [*CLIENT, "--url", f"http://127.0.0.1:{server.port}", "--user", "admin", "follow",
               "--cursor-file", str(cursor)]
    runs = []
    with open(output, "ab") as sink:
        for delay in (0.4, 0.7, 0.3):
            follower = subprocess.Popen(command, stdout=sink, stderr=subprocess.DEVNULL, env=env)
            time.sleep(delay)  # a random-ish moment, not a synchronization
            follower.send_signal(signal.SIGKILL)
            follower.wait(10)
            runs.append(output.stat().st_size)
    stop.set()
    publisher.join(60)
    assert not publisher.is_alive()
    with open(output, "ab") as sink:
        last = subprocess.run(command + ["--until-caught-up"], stdout=sink, stderr=subprocess.PIPE, env=env,
                              timeout=60)
    assert last.returncode == 0
    served = [json.loads(line) for line in output.read_text().splitlines()]
    final = {}
    for event in served:
        final[event["EventId"]] = event["Revision"]
    assert final == acknowledged  # every event's last change was seen
    assert len(acknowledged) >= 20
    # A repeat happens only where a run was killed between writing a page and its cursor.
    sequences = [event["Sequence"] for event in served]
    repeats = len(sequences) - len(set(sequences))
    assert repeats <= 3 * 1000, repeats  # at most one page (--limit, 1000) per restart
    assert int(cursor.read_text()) == max(sequences)


def test_follow_keeps_tricky_strings_whole(server):
    tricky = {"a": '},{"EventId":"x"}]', "b": "line\u2028sep\u2029", "c": ["]", "[", "\\"], "d": "é\n\"q\""}
    server.request("PUT", "/events/FOO-t", {**body(), "EventData": tricky}, user="admin", key=server.admin_key)
    result = run_cli(server, "follow", "--until-caught-up")
    assert result.returncode == 0, result.stderr
    (line,) = result.stdout.splitlines()  # str.splitlines splits at U+2028 too: it must be escaped
    assert json.loads(line)["EventData"] == tricky
    assert list(admin_client(server).follow(until_caught_up=True))[0]["EventData"] == tricky
