"""The app embedded in the hosts the README names, run as it runs them, on
loopback ports: with 8 idle followers each still answers /health and a PUT at
once, and the followers do not spin; gunicorn with the README's stopping hook
stops at once with a long poll waiting, whatever wraps the app."""

import json
import time

import pytest

from helpers import Registry, eventually, run_in_thread
from eventstore_client import Client
from hosts import GUNICORN_GTHREAD, GUNICORN_SYNC, HOSTS, ROOT, UWSGI, Host, basic
from server import event

FOLLOWERS = 8


class CountingClient(Client):
    """A Client that counts the feed requests it sends."""

    polls = 0

    def _send(self, method, path, *args, **kwargs):
        if path.startswith("/events?"):
            self.polls += 1
        return super()._send(method, path, *args, **kwargs)


@pytest.fixture
def registry(tmp_path):
    """A database with an admin and program FOO, closed before a host opens it."""
    registry = Registry(tmp_path / "hosts.db")
    registry.close()
    return registry


def test_the_readme_shows_the_host_command_lines_these_tests_run():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for shown in (GUNICORN_SYNC, GUNICORN_GTHREAD, UWSGI, "make_app(..., max_waiting=4)"):
        assert shown in readme


@pytest.mark.parametrize("name", HOSTS)
def test_a_host_answers_health_and_a_put_with_idle_followers_who_do_not_spin(tmp_path, registry, name):
    command, options = HOSTS[name]
    host = Host(tmp_path, registry.db_path, command, options)
    key = registry.keys["admin"]
    try:
        followers, seen = [], []

        def follow(client):
            for followed in client.follow(ProgramId="FOO"):
                seen.append(followed["EventId"])
                return

        for _ in range(FOLLOWERS):
            client = CountingClient(f"http://127.0.0.1:{host.port}", "admin", key)
            followers.append((client, run_in_thread(follow, client)))
        eventually(lambda: all(client.polls for client, _ in followers), "every follower polling")
        time.sleep(0.5)  # the followers idle: polls held where the host has threads to spare, else paced
        polls, idle = sum(client.polls for client, _ in followers), 2.0
        time.sleep(idle)
        sent = sum(client.polls for client, _ in followers) - polls
        assert sent <= FOLLOWERS * idle * 2, f"{FOLLOWERS} idle followers sent {sent} polls in {idle:g} s"
        # Answered at all within 5 s (before: 11 s on gunicorn sync, 5 s on uWSGI);
        # how soon is bench/hosts.py's to measure.
        assert host.request("GET", "/health", timeout=5)[0] == 200
        assert host.request("PUT", "/events/FOO-1", event(), basic("admin", key), timeout=5)[0] == 200
        for _, done in followers:
            done(timeout=15)
        assert seen == ["FOO-1"] * FOLLOWERS
    finally:
        took = host.stop()
    assert took is not None, f"{name} did not stop on SIGTERM:\n{host.log()}"
    assert "Traceback" not in host.log(), host.log()


def test_gunicorn_with_the_readmes_hook_stops_at_once_with_a_poll_waiting_behind_middleware(tmp_path, registry):
    """The hook ends every app's long polls through eventstore.end_long_polls(),
    not through the object gunicorn hosts (a plain function here: calling
    worker.wsgi.end_long_polls raised AttributeError, and stopping took 23 s)."""
    host = Host(tmp_path, registry.db_path, "gunicorn -k gthread -w 1 --threads 4 -c gunicorn.conf.py app:application",
                {"max_waiting": 2}, wrapped=True)
    headers = basic("admin", registry.keys["admin"])
    try:
        poll = run_in_thread(lambda: host.request("GET", "/events?wait=30", headers=headers, timeout=60))
        eventually(lambda: json.loads(host.request("GET", "/health")[2])["longPolls"] == 1, "a long poll waiting")
    finally:
        took = host.stop(timeout=10)
    assert took is not None, f"gunicorn still ran 10 s after SIGTERM:\n{host.log()}"
    status, answer_headers, _ = poll(timeout=5)
    assert status == 200 and answer_headers.get("Eventstore-Poll-After") == "1"  # answered, not cut
    assert "Traceback" not in host.log() and "Error" not in host.log(), host.log()
