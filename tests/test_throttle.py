"""Guessing attackers: failed authentications are throttled per user id and per
client address (429 with Retry-After), without locking out the real owner."""

import os
import stat
import tempfile

import pytest
import webtest

import eventstore_throttle
from helpers import Registry, basic


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture(params=["this process", "shared file"])
def throttle(clock, request, tmp_path):
    """The same rules whether the counts live in this process or in the file
    that every process of a server shares."""
    path = tmp_path / "db-throttle" if request.param == "shared file" else None
    return eventstore_throttle.AuthThrottle(threshold=3, window=60, base_delay=2, max_delay=30, clock=clock, path=path)


def fail(throttle, user="writer", address="10.0.0.1", times=1):
    for _ in range(times):
        throttle.failed(user, address)


def test_below_the_threshold_nothing_waits(throttle):
    fail(throttle, times=2)
    assert throttle.retry_after("writer", "10.0.0.1") == 0


def test_at_the_threshold_the_delay_starts_and_doubles(throttle, clock):
    fail(throttle, times=3)
    assert throttle.retry_after("writer", "10.0.0.1") == 2
    fail(throttle)
    assert throttle.retry_after("writer", "10.0.0.1") == 4
    fail(throttle, times=5)
    assert throttle.retry_after("writer", "10.0.0.1") == 30  # capped
    clock.now += 30
    assert throttle.retry_after("writer", "10.0.0.1") == 0


def test_failures_age_out_of_the_window(throttle, clock):
    fail(throttle, times=2)
    clock.now += 61
    fail(throttle)
    assert throttle.retry_after("writer", "10.0.0.1") == 0


def test_a_failing_address_is_refused_for_every_user(throttle):
    fail(throttle, user="a", times=1)
    fail(throttle, user="b", times=1)
    fail(throttle, user="c", times=1)
    assert throttle.retry_after("anyone", "10.0.0.1") > 0


def test_a_guessed_user_is_refused_only_to_failing_addresses(throttle):
    for n in range(3):
        fail(throttle, user="owner", address=f"10.0.1.{n}")
    assert throttle.retry_after("owner", "10.0.1.0") > 0  # a guesser that failed before
    assert throttle.retry_after("owner", "192.168.5.5") == 0  # the owner, elsewhere


def test_memory_is_bounded(clock):
    throttle = eventstore_throttle.AuthThrottle(max_sources=100, clock=clock)
    for n in range(1000):
        throttle.failed(f"user{n}", f"10.1.{n // 256}.{n % 256}")
    assert len(throttle._failures) <= 100


def client_from(registry, address):
    return webtest.TestApp(registry.app, extra_environ={"REMOTE_ADDR": address})


def test_over_http_guessing_gets_429_and_the_owner_elsewhere_still_gets_in(tmp_path, clock):
    registry = Registry(tmp_path / "t.db", throttle=eventstore_throttle.AuthThrottle(threshold=5, clock=clock))
    try:
        attacker = client_from(registry, "203.0.113.9")
        for n in range(5):
            attacker.get("/events", headers=basic("writer", f"esk_guess{n}"), status=401)
        refused = attacker.get("/events", headers=basic("writer", "esk_guess"), status=429)
        assert refused.content_type == "application/problem+json"
        assert int(refused.headers["Retry-After"]) >= 1
        # Even the right key is refused from the guessing address ...
        attacker.get("/events", headers=basic("writer", registry.keys["writer"]), status=429)
        # ... but works from the owner's own address.
        owner = client_from(registry, "198.51.100.7")
        owner.get("/events", headers=basic("writer", registry.keys["writer"]), status=200)
        clock.now += 2
        attacker.get("/events", headers=basic("writer", registry.keys["writer"]), status=200)
    finally:
        registry.close()


def test_a_key_authenticated_a_moment_ago_is_refused_too_once_its_address_guesses(tmp_path, clock):
    """The one-second cache of good credentials does not bypass the throttle."""
    registry = Registry(tmp_path / "t.db", throttle=eventstore_throttle.AuthThrottle(threshold=5, clock=clock))
    try:
        client = client_from(registry, "203.0.113.9")
        right = basic("writer", registry.keys["writer"])
        client.get("/events", headers=right, status=200)  # now cached
        for n in range(5):
            client.get("/events", headers=basic("writer", f"esk_guess{n}"), status=401)
        client.get("/events", headers=right, status=429)
    finally:
        registry.close()


def test_requests_without_credentials_are_401_and_count_nothing(tmp_path, clock):
    registry = Registry(tmp_path / "t.db", throttle=eventstore_throttle.AuthThrottle(threshold=2, clock=clock))
    try:
        client = client_from(registry, "203.0.113.9")
        for header in ({}, {"Authorization": "Bearer x"}, {"Authorization": "Basic %%%"}) * 3:
            client.get("/events", headers=header, status=401)
        client.get("/events", headers=basic("writer", registry.keys["writer"]), status=200)
    finally:
        registry.close()


def test_a_threshold_of_zero_switches_throttling_off(clock):
    throttle = eventstore_throttle.AuthThrottle(threshold=0, clock=clock)
    fail(throttle, times=100)
    assert throttle.retry_after("writer", "10.0.0.1") == 0 and not throttle._failures


def test_processes_sharing_the_file_share_the_count(clock, tmp_path):
    """Two throttles on one file, as two worker processes of one server: the
    guesses made against either count for both."""
    first, second = (eventstore_throttle.AuthThrottle(threshold=4, clock=clock, path=tmp_path / "t") for _ in range(2))
    for throttle in (first, second, first, second):
        assert throttle.retry_after("writer", "10.0.0.9") == 0
        throttle.failed("writer", "10.0.0.9")
    assert first.retry_after("writer", "10.0.0.9") > 0 and second.retry_after("writer", "10.0.0.9") > 0
    assert second.retry_after("writer", "10.0.0.10") == 0  # another address, not failing itself


def test_the_shared_table_keeps_its_size_and_forgets_the_stalest(clock, tmp_path):
    throttle = eventstore_throttle.AuthThrottle(threshold=2, clock=clock, path=tmp_path / "t")
    size = (tmp_path / "t").stat().st_size
    for n in range(40_000):
        clock.now += 0.001
        throttle.failed(f"user{n}", f"10.1.{n // 256}.{n % 256}")
    assert (tmp_path / "t").stat().st_size == size
    fail(throttle, user="fresh", address="10.9.9.9", times=2)
    assert throttle.retry_after("fresh", "10.9.9.9") > 0


def test_a_table_made_before_the_latest_failure_was_kept_still_throttles(clock, tmp_path):
    """The table ends in the time of the last failure of any source, so that a
    quiet server checks one number per request; a file made without it (by the
    previous version) is extended, and what it counted still holds."""
    path = tmp_path / "t"
    throttle = eventstore_throttle.AuthThrottle(threshold=2, clock=clock, path=path)
    fail(throttle, times=2)
    assert throttle.retry_after("writer", "10.0.0.1") > 0
    table = eventstore_throttle.SharedFailureTable
    with open(path, "r+b") as old:
        old.truncate(table.SLOT.size * table.SLOTS)  # as the previous version made it
    reopened = eventstore_throttle.AuthThrottle(threshold=2, clock=clock, path=path)
    assert path.stat().st_size == table.SLOT.size * table.SLOTS + table.LATEST.size
    assert reopened.retry_after("writer", "10.0.0.1") > 0
    clock.now += 61
    assert reopened.retry_after("writer", "10.0.0.1") == 0


def test_postgresql_s_shared_counts_live_in_a_folder_of_this_user_s_alone(tmp_path, monkeypatch):
    """On PostgreSQL the counts' file sits in the temporary folder, where another
    local user could make it (or a link by its name) first: it lives in a folder of
    this user's alone, and where that folder is not private the counts stay per
    process."""
    import eventstore_pg
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    path = eventstore_pg.local_file("postgresql://u@db.example/events", "throttle")
    folder = os.stat(os.path.dirname(path))
    assert stat.S_IMODE(folder.st_mode) == 0o700 and folder.st_uid == os.getuid()
    os.chmod(os.path.dirname(path), 0o777)  # opened to others (or made by someone else)
    assert eventstore_pg.local_file("postgresql://u@db.example/events", "throttle") is None
    assert eventstore_throttle.shared_throttle(None).shared is None


def test_the_shared_counts_never_follow_a_link(tmp_path):
    """A link at the counts' file's name is not followed (the table would be
    written over whatever it points to): the counts stay per process."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (tmp_path / "events.db-throttle").symlink_to(victim)
    throttle = eventstore_throttle.shared_throttle(str(tmp_path / "events.db-throttle"))
    assert throttle.shared is None and victim.read_bytes() == b"precious"
