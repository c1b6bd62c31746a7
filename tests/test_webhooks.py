"""docs/API.md §11: webhooks. The registry delivers a subscription's changes to a
receiver (tests/receiver.py: a real HTTP server on 127.0.0.1; no test sends
anything beyond 127.0.0.0/8), signed, in order, one at a time, and never gives
a change up."""

import base64
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import standardwebhooks
import webtest

import eventstore
import eventstore_webhooks as webhooks
from eventstore_errors import Problem
from eventstore_leases import LeaseLost
from helpers import ROOT, THREADED_HOST, Registry, basic, create_user, event_body, eventually
from receiver import Receiver
from server import Server, event

sys.path.insert(0, str(ROOT / "docs" / "examples"))
import webhook_receiver  # noqa: E402  (the README's receiver, standard library only)

DELIVERER_ERRORS = []  # what the deliverers of this module's apps failed at for their own reasons


def checked_deliverer(*args, **options):
    """The app's webhook deliverer (make_app's ``make_deliverer``), handing its own
    failures (the database, a bug; not a receiver's) to DELIVERER_ERRORS."""
    return eventstore.webhook_deliverer(*args, on_error=DELIVERER_ERRORS.append, **options)


CHECKED = {"make_deliverer": checked_deliverer}  # every app of these tests takes it
FAST = {"webhook_max_backoff": 1, **CHECKED}  # back-off capped at a second: the tests' receivers recover quickly


@pytest.fixture(autouse=True)
def no_failed_deliveries():
    """A delivery or re-check that failed for the deliverer's own reasons is a bug
    here: what each deliverer of the test handed over is looked at after it."""
    DELIVERER_ERRORS.clear()
    yield
    assert DELIVERER_ERRORS == []


@pytest.fixture
def hooks(db):
    """A registry whose failing webhooks try again within a second."""
    registry = Registry(db, **FAST)
    yield registry
    registry.close()


@pytest.fixture
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.close()


def publish(client, *numbers, program="FOO"):
    """PUT events {program}-{n} -> their Sequences."""
    return [client.put_json(f"/events/{program}-{n}", event_body(program, EventData={"n": n})).headers["ETag"] and
            client.get(f"/events/{program}-{n}").json["Sequence"] for n in numbers]


def subscribe(client, name, url, status=201, **webhook):
    """A subscription with a webhook to ``url`` -> the answer's JSON (with the Secret)."""
    return client.put_json(f"/subscriptions/{name}", {"Webhook": {"Url": url, **webhook}}, status=status).json


def state(client, name):
    return client.get(f"/subscriptions/{name}").json


def verified(secret, delivery):
    """The delivery as the Standard Webhooks reference verifier reads it (raises if the signature is wrong)."""
    return standardwebhooks.Webhook(secret).verify(delivery.body, delivery.headers)


# --- Delivering ---------------------------------------------------------------------------------

def test_changes_are_delivered_signed_in_order_and_the_position_moves_on_2xx(hooks, receiver):
    admin = hooks.client("admin")
    sequences = publish(admin, *range(5))
    created = subscribe(admin, "lms", receiver.url, MaxEvents=2)
    secret = created["Secret"]
    assert secret.startswith("whsec_") and len(base64.b64decode(secret[6:])) == 32
    eventually(lambda: receiver.sequences() == sequences, "every change delivered")
    eventually(lambda: state(admin, "lms")["Position"] == sequences[-1], "the Position moved")
    first = receiver.deliveries[0]
    assert verified(secret, first) == first.json  # the reference verifier
    assert all(webhook_receiver.verify(secret, d.headers, d.body) for d in receiver.deliveries)  # the README's
    assert first.json["type"] == "eventstore.changes"
    assert first.json["data"] == {"Subscription": "lms", "Events": [admin.get("/events/FOO-0").json,
                                                                     admin.get("/events/FOO-1").json],
                                  "Through": sequences[1]}
    assert [len(d.events) for d in receiver.deliveries] == [2, 2, 1]  # MaxEvents
    assert [d.headers["webhook-id"] for d in receiver.deliveries] == [
        f"lms_{sequences[0]}_{sequences[1]}", f"lms_{sequences[2]}_{sequences[3]}", f"lms_{sequences[4]}_{sequences[4]}"]
    assert first.headers["content-type"] == "application/json" and first.headers["user-agent"] == "eventstore"
    assert abs(int(first.headers["webhook-timestamp"]) - time.time()) < 300
    assert first.headers["webhook-signature"].startswith("v1,") and " " not in first.headers["webhook-signature"]
    assert first.json["timestamp"].endswith("Z") and first.path == "/hook"
    done = state(admin, "lms")
    assert (done["Behind"], done["Webhook"]["State"], done["Webhook"]["ConsecutiveFailures"]) == (0, "Active", 0)
    assert done["LastAckUTC"] is not None and done["Webhook"]["LastStatus"] == 200
    assert done["Webhook"]["LastError"] is None and done["Webhook"]["NextAttemptUTC"] is None
    # A commit wakes the deliverer: later changes follow.
    more = publish(admin, 5, 6)
    eventually(lambda: receiver.sequences() == sequences + more, "the later changes delivered")
    assert receiver.overlaps == 0


def test_a_webhook_delivers_only_its_filter_and_what_its_owner_reads(db, receiver):
    registry = Registry(db, webhook_allow_hosts=["127.0.0.1"], **FAST)
    try:
        admin, reader = registry.client("admin"), registry.client("reader")
        publish(admin, 1, program="BAR")
        foo = publish(admin, 1, 2)
        subscribe(reader, "mine", receiver.url)  # reader reads FOO only; an allowed host
        eventually(lambda: receiver.sequences() == foo, "FOO's changes, not BAR's")
        other = Receiver()
        try:
            admin.put_json("/subscriptions/typed", {"Filter": {"EventType": ["Other"]},
                                                    "Webhook": {"Url": other.url}})
            publish(admin, 3, program="BAR")
            later = publish(admin, 4)
            typed = admin.put_json("/events/BAR-9", event_body("BAR", EventType="Other")).headers and \
                admin.get("/events/BAR-9").json["Sequence"]
            # In Sequence order: BAR-3 would have come before FOO-4, CourseCompleted before BAR-9.
            eventually(lambda: receiver.sequences() == foo + later, "FOO's later change, and nothing of BAR")
            eventually(lambda: other.sequences() == [typed], "only the type of its filter")
        finally:
            other.close()
    finally:
        registry.close()


def test_the_secret_is_shown_once_and_a_rotation_signs_with_both_for_24_hours(hooks, receiver):
    admin = hooks.client("admin")
    secret = subscribe(admin, "lms", receiver.url)["Secret"]
    assert "Secret" not in state(admin, "lms") and "Secret" not in admin.get("/subscriptions").json["Subscriptions"][0]
    changed = admin.put_json("/subscriptions/lms", {"Webhook": {"Url": receiver.url, "MaxEvents": 5}}).json
    assert "Secret" not in changed and changed["Webhook"]["MaxEvents"] == 5  # a change keeps the secret
    publish(admin, 1)
    eventually(lambda: len(receiver.accepted()) == 1, "delivered")
    verified(secret, receiver.deliveries[0])
    rotated = admin.post("/subscriptions/lms/secret").json
    new = rotated["Secret"]
    assert new != secret and new.startswith("whsec_") and rotated["Name"] == "lms"
    publish(admin, 2)
    eventually(lambda: len(receiver.accepted()) == 2, "delivered after the rotation")
    second = receiver.deliveries[1]
    signatures = second.headers["webhook-signature"].split(" ")
    assert len(signatures) == 2  # both, the new one first
    assert signatures[0] == webhooks.signature(new, second.headers["webhook-id"], second.headers["webhook-timestamp"],
                                               second.body)
    verified(new, second), verified(secret, second)
    # A second rotation within 24 hours retires the oldest at once: at most two in use.
    newest = admin.post("/subscriptions/lms/secret", headers={"Content-Length": "0"}).json["Secret"]
    publish(admin, 3)
    eventually(lambda: len(receiver.accepted()) == 3, "delivered after a second rotation")
    third = receiver.deliveries[2]
    verified(newest, third), verified(new, third)
    with pytest.raises(standardwebhooks.WebhookVerificationError):
        verified(secret, third)


def test_a_change_committed_after_a_rotation_is_signed_with_both_secrets(db, receiver):
    """Even when the deliverer read the subscription before the rotation: here the
    rotation commits while the batch holding FOO-2 is formed (in its render)."""
    rotations = []

    def render(row):
        if row.event_id == "FOO-2" and not rotations:
            rotations.append(registry.client("admin").post("/subscriptions/lms/secret").json["Secret"])
        return eventstore.render_event(row)

    def deliverer(*args, **options):
        return webhooks.WebhookDeliverer(*args, programs_of=eventstore.webhook_programs, render=render,
                                         format_time=eventstore.format_datetime, on_error=DELIVERER_ERRORS.append,
                                         **options)

    registry = Registry(db, make_deliverer=deliverer, webhook_max_backoff=1)
    try:
        admin = registry.client("admin")
        old = subscribe(admin, "lms", receiver.url)["Secret"]
        publish(admin, 1)
        eventually(lambda: len(receiver.accepted()) == 1, "delivered")
        publish(admin, 2)
        eventually(lambda: any(b"FOO-2" in d.body for d in receiver.accepted()), "FOO-2 delivered")
        delivery = next(d for d in receiver.deliveries if b"FOO-2" in d.body)
        assert len(delivery.headers["webhook-signature"].split(" ")) == 2
        verified(rotations[0], delivery), verified(old, delivery)
    finally:
        registry.close()


def test_after_24_hours_only_the_new_secret_signs(db, receiver):
    clock = {"offset": 0}
    registry = Registry(db, clock=lambda: eventstore.now_us() + clock["offset"], **FAST)
    try:
        admin = registry.client("admin")
        old = subscribe(admin, "lms", receiver.url, Active=False)["Secret"]
        new = admin.post("/subscriptions/lms/secret").json["Secret"]
        clock["offset"] = 24 * 3600 * 1_000_000 + 1_000_000
        publish(admin, 1)
        admin.put_json("/subscriptions/lms", {"Webhook": {"Url": receiver.url, "Active": True}})
        eventually(lambda: receiver.deliveries, "delivered")
        delivery = receiver.deliveries[0]
        assert len(delivery.headers["webhook-signature"].split()) == 1
        assert webhook_receiver.verify(new, delivery.headers, delivery.body, tolerance=10**9)
        assert not webhook_receiver.verify(old, delivery.headers, delivery.body, tolerance=10**9)
    finally:
        registry.close()


def test_a_new_secret_needs_a_webhook_no_body_and_a_visible_subscription(hooks, receiver):
    admin, writer = hooks.client("admin"), hooks.client("writer")
    admin.put_json("/subscriptions/plain", {})
    assert "webhook" in admin.post("/subscriptions/plain/secret", status=409).json["detail"]
    subscribe(admin, "hooked", receiver.url, Active=False)
    writer.post("/subscriptions/hooked/secret", status=404)  # another user's: as if there were none
    admin.post("/subscriptions/nothing/secret", status=404)
    admin.post("/subscriptions/hooked/secret", b'{"x": 1}', headers={"Content-Type": "application/json"},
               status=400)
    admin.post("/subscriptions/hooked/secret?x=1", status=400)


def test_webhook_null_removes_it_and_a_new_one_has_a_new_secret(hooks, receiver):
    admin = hooks.client("admin")
    first = subscribe(admin, "lms", receiver.url, Active=False)["Secret"]
    gone = admin.put_json("/subscriptions/lms", {"Webhook": None}).json
    assert gone["Webhook"] is None and "Secret" not in gone
    again = admin.put_json("/subscriptions/lms", {"Webhook": {"Url": receiver.url, "Active": False}}).json
    assert again["Secret"] != first
    admin.put_json("/subscriptions/lms", {"Description": "kept"})  # a PUT without Webhook keeps it
    kept = state(admin, "lms")["Webhook"]
    assert kept == {"Url": receiver.url, "MaxEvents": 100, "TimeoutSeconds": 10, "State": "Paused",
                    "LastAttemptUTC": None, "LastStatus": None, "LastError": None, "ConsecutiveFailures": 0,
                    "NextAttemptUTC": None, "DisabledReason": 'paused by a PUT with "Active": false'}


# --- Which URLs: decided from the URL as written, before any lookup or connection ------------------

@pytest.fixture
def no_network(monkeypatch):
    """Any name lookup or connection fails the test: the refusals send nothing anywhere."""
    def forbidden(*args, **kwargs):
        raise AssertionError(f"a lookup or connection was attempted: {args}")
    monkeypatch.setattr(socket, "getaddrinfo", forbidden)
    monkeypatch.setattr(socket, "create_connection", forbidden)


@pytest.fixture
def undelivered(db):
    """A registry that delivers nothing (webhook_delivery=False), allowing hooks.example.org."""
    registry = Registry(db, webhook_delivery=False, webhook_allow_hosts=["Hooks.Example.org", "[::1]"], **CHECKED)
    yield registry
    registry.close()


@pytest.mark.parametrize("url", [
    "ftp://example.com/hook", "file:///etc/passwd", "gopher://example.com", "//example.com/hook", "example.com/hook",
    "https://user:pw@example.com/hook", "https://user@example.com/hook", "https://example.com/hook#frag",
    "https://example.com/hook#", "https:///hook", "https://", "http://example.com/hook", "http://10.0.0.1/hook",
    "http://169.254.169.254/latest", "http://[::ffff:127.0.0.1]/", "http://127.1/hook", "http://localhost./hook",
    "https://example.com:99999/", "https://example.com:0/", "http://localhost:0/hook", "https://exa mple.com/", "https://ex\u00e4mple.com/", "https://[::1/", 5, None,
    "https://example.com/" + "a" * 2000, "https://evil.example\\@127.0.0.1/",
])
def test_a_url_of_the_wrong_form_is_a_400_on_webhook_url(undelivered, no_network, url):
    admin = undelivered.client("admin")
    problem = admin.put_json("/subscriptions/s", {"Webhook": {"Url": url}}, status=400).json
    assert [e["field"] for e in problem["errors"]] == ["Webhook/Url"]
    admin.get("/subscriptions/s", status=404)


@pytest.mark.parametrize("url", ["http://localhost:9/hook", "http://127.0.0.1:9/", "http://127.255.0.7/x",
                                 "http://[::1]:9/", "https://example.com/hook", "HTTPS://Example.COM:8443/a?b=c",
                                 "http://hooks.example.org/h", "https://10.1.2.3/internal"])
def test_a_system_user_may_point_a_webhook_anywhere_of_the_right_form(undelivered, no_network, url):
    admin = undelivered.client("admin")
    created = admin.put_json("/subscriptions/s", {"Webhook": {"Url": url, "Active": False}}, status=201).json
    assert created["Webhook"]["Url"] == url


@pytest.mark.parametrize("url, status", [
    ("https://hooks.example.org/h", 201), ("https://HOOKS.example.ORG:444/h", 201), ("http://hooks.example.org/h", 201),
    ("http://[::1]:9/", 201), ("https://example.com/hook", 403), ("http://127.0.0.1:9/", 403),
    ("http://localhost:9/", 403), ("https://hooks.example.org.evil.example/h", 403), ("https://10.0.0.1/", 403),
    ("http://example.com/", 400),  # the form first: http:// to a host neither allowed nor loopback
])
def test_other_users_may_point_a_webhook_only_at_allowed_hosts(undelivered, no_network, url, status):
    writer = undelivered.client("writer")
    answer = writer.put_json("/subscriptions/s", {"Webhook": {"Url": url, "Active": False}}, status=status).json
    if status == 403:
        assert "--webhook-allow-host" in answer["detail"]
        writer.get("/subscriptions/s", status=404)  # a refused PUT changes nothing


def test_the_host_rule_applies_only_when_a_put_gives_a_webhook(undelivered, no_network):
    admin, writer = undelivered.client("admin"), undelivered.client("writer")
    writer.put_json("/subscriptions/s", {})
    admin.put_json("/subscriptions/s", {"Webhook": {"Url": "https://example.com/h", "Active": False}})  # SYSTEM
    assert writer.put_json("/subscriptions/s", {"Description": "mine"}).json["Webhook"]["Url"] == \
        "https://example.com/h"
    writer.put_json("/subscriptions/s", {"Webhook": {"Url": "https://example.com/h"}}, status=403)
    assert state(writer, "s")["Webhook"]["State"] == "Paused"  # unchanged


@pytest.mark.parametrize("webhook, field", [
    ({"Url": "https://example.com/h", "MaxEvents": 0}, "Webhook/MaxEvents"),
    ({"Url": "https://example.com/h", "MaxEvents": 1001}, "Webhook/MaxEvents"),
    ({"Url": "https://example.com/h", "MaxEvents": "5"}, "Webhook/MaxEvents"),
    ({"Url": "https://example.com/h", "MaxEvents": True}, "Webhook/MaxEvents"),
    ({"Url": "https://example.com/h", "TimeoutSeconds": 0}, "Webhook/TimeoutSeconds"),
    ({"Url": "https://example.com/h", "TimeoutSeconds": 61}, "Webhook/TimeoutSeconds"),
    ({"Url": "https://example.com/h", "TimeoutSeconds": 1.5}, "Webhook/TimeoutSeconds"),
    ({"Url": "https://example.com/h", "Active": "yes"}, "Webhook/Active"),
    ({"Url": "https://example.com/h", "Active": 1}, "Webhook/Active"),
    ({"Url": "https://example.com/h", "Active": None}, "Webhook/Active"),
    ({"Url": "https://example.com/h", "MaxEvents": None}, "Webhook/MaxEvents"),
    ({"Url": "https://example.com/h", "Secret": "whsec_x"}, "Webhook/Secret"),
    ({"MaxEvents": 5}, "Webhook/Url"), ([], "Webhook"), ("https://example.com/h", "Webhook"),
])
def test_a_webhook_of_the_wrong_shape_is_a_400_naming_the_field(undelivered, webhook, field):
    admin = undelivered.client("admin")
    problem = admin.put_json("/subscriptions/s", {"Webhook": webhook}, status=400).json
    assert field in [e["field"] for e in problem["errors"]]
    admin.get("/subscriptions/s", status=404)


def test_limits_of_a_webhook_are_taken(undelivered):
    admin = undelivered.client("admin")
    for max_events, timeout in ((1, 1), (1000, 60), (5.0, 7.0)):
        hook = admin.put_json("/subscriptions/s", {"Webhook": {"Url": "https://example.com/h", "MaxEvents": max_events,
                                                               "TimeoutSeconds": timeout, "Active": False}}).json
        assert (hook["Webhook"]["MaxEvents"], hook["Webhook"]["TimeoutSeconds"]) == (max_events, timeout)


def test_a_webhook_subscription_is_read_by_its_webhook_alone(undelivered):
    admin = undelivered.client("admin")
    publish(admin, 1)
    admin.put_json("/subscriptions/s", {"Webhook": {"Url": "https://example.com/h"}})
    assert "webhook" in admin.get("/subscriptions/s/events", status=409).json["detail"]
    assert "Rewind" in admin.post_json("/subscriptions/s/ack", {"Through": 1}, status=409).json["detail"]
    assert admin.post_json("/subscriptions/s/ack", {"Through": 1, "Rewind": True}).json["Position"] == 1


# --- Failures: retried with back-off, never given up -------------------------------------------------

def test_a_receiver_down_then_failing_gets_every_change_in_order_once_it_recovers(db):
    """Connections refused, then 503s, while 500 changes are published: once it answers
    2xx, all 500 arrive, in order, none missing."""
    registry = Registry(db, **FAST)
    healthy = threading.Event()
    receiver = Receiver(lambda delivery, n: 200 if healthy.is_set() else 503)
    try:
        admin = registry.client("admin")
        subscribe(admin, "lms", receiver.url, MaxEvents=50, TimeoutSeconds=2)
        receiver.refuse()
        for start in range(0, 500, 100):
            admin.post_json("/events", {"Events": [dict(event_body(EventData={"n": n}), EventId=f"FOO-{n}")
                                                   for n in range(start, start + 100)]})
        eventually(lambda: state(admin, "lms")["Webhook"]["ConsecutiveFailures"] >= 2, "refused, and retried")
        failing = state(admin, "lms")["Webhook"]
        assert (failing["LastStatus"], failing["LastError"], failing["State"]) == (None, "connection refused",
                                                                                    "Active")
        assert failing["NextAttemptUTC"] is not None and state(admin, "lms")["Position"] == 0
        receiver.listen()
        eventually(lambda: receiver.deliveries and receiver.deliveries[-1].status == 503, "503s")
        eventually(lambda: state(admin, "lms")["Webhook"]["LastStatus"] == 503, "recorded")
        assert state(admin, "lms")["Position"] == 0  # never moved without a 2xx
        healthy.set()
        eventually(lambda: state(admin, "lms")["Behind"] == 0, "caught up", timeout=60)
        delivered = receiver.sequences()
        assert delivered == sorted(set(delivered)) and len(delivered) == 500
        assert [e["EventId"] for d in receiver.accepted() for e in d.events] == [f"FOO-{n}" for n in range(500)]
        # Every retry of a delivery was the same bytes, under the same webhook-id.
        by_id = {}
        for delivery in receiver.deliveries:
            by_id.setdefault(delivery.headers["webhook-id"], set()).add(delivery.body)
        assert all(len(bodies) == 1 for bodies in by_id.values())
        assert state(admin, "lms")["Webhook"]["ConsecutiveFailures"] == 0
        assert receiver.overlaps == 0
    finally:
        receiver.close()
        registry.close()


def test_a_410_disables_the_webhook_and_active_true_starts_it_again(hooks):
    gone = threading.Event()
    gone.set()
    receiver = Receiver(lambda delivery, n: 410 if gone.is_set() else 200)
    try:
        admin = hooks.client("admin")
        sequences = publish(admin, 1, 2)
        subscribe(admin, "lms", receiver.url)
        eventually(lambda: state(admin, "lms")["Webhook"]["State"] == "Disabled", "disabled")
        hook = state(admin, "lms")["Webhook"]
        assert hook["DisabledReason"] == "the receiver answered 410 Gone" and hook["LastStatus"] == 410
        assert hook["NextAttemptUTC"] is None and state(admin, "lms")["Position"] == 0
        sequences += publish(admin, 3)
        assert len(receiver.deliveries) == 1  # never retried: the later commit wakes nothing
        # A PUT without Active keeps the state.
        admin.put_json("/subscriptions/lms", {"Webhook": {"Url": receiver.url}})
        assert state(admin, "lms")["Webhook"]["State"] == "Disabled" and len(receiver.deliveries) == 1
        gone.clear()
        started = admin.put_json("/subscriptions/lms", {"Webhook": {"Url": receiver.url, "Active": True}}).json
        assert started["Webhook"]["State"] == "Active" and started["Webhook"]["DisabledReason"] is None
        assert started["Webhook"]["ConsecutiveFailures"] == 0
        eventually(lambda: state(admin, "lms")["Behind"] == 0, "delivered after the restart")
        assert receiver.deliveries[1].headers["webhook-id"] == f"lms_{sequences[0]}_{sequences[2]}_r1"
    finally:
        receiver.close()


def noting(client, name, answers, seen):
    """A receiver's ``answer``: ``answers(n)``, noting in ``seen`` the webhook ``name`` as
    recorded when each attempt arrives (``seen[n]``: the outcome of attempt n - 1)."""
    def answer(delivery, n):
        seen.append(state(client, name)["Webhook"])
        return answers(n)
    return answer


def retries(receiver, seen):
    """For each retry, in order: (the seconds from the LastAttemptUTC recorded before it
    to the NextAttemptUTC recorded with it, whether it came no earlier than that)."""
    found = []
    for delivery, recorded in zip(receiver.deliveries[1:], seen[1:]):
        last, scheduled = (eventstore.parse_datetime(recorded[k]) for k in ("LastAttemptUTC", "NextAttemptUTC"))
        found.append(((scheduled - last) / 1e6, delivery.arrived_us >= scheduled))
    return found


def test_retry_after_is_honoured_within_the_cap(db):
    registry = Registry(db, webhook_max_backoff=3, **CHECKED)
    admin, seen = registry.client("admin"), []
    answers = [(503, {"Retry-After": "2"}), (429, {"Retry-After": "3600"}), 200]
    receiver = Receiver(noting(admin, "lms", lambda n: answers[min(n, 2)], seen))
    try:
        publish(admin, 1)
        subscribe(admin, "lms", receiver.url)
        eventually(lambda: state(admin, "lms")["Behind"] == 0, "delivered after two retries", timeout=20)
        (after_2, came), (after_3600, came_too) = retries(receiver, seen)
        assert after_2 >= 2 and came  # Retry-After: 2, not the first second of back-off
        assert 3 <= after_3600 < 3600 and came_too  # an hour, cut to the cap
        assert len(receiver.deliveries) == 3
    finally:
        receiver.close()
        registry.close()


def test_a_retry_after_of_0_or_in_the_past_still_waits_a_second(db):
    """Neither makes the deliverer spin (it made 3,071 attempts in 3 s): the wait has
    the back-off's first second as its floor."""
    registry = Registry(db, **FAST)
    admin, seen = registry.client("admin"), []
    receiver = Receiver(noting(admin, "lms", lambda n: (503, {"Retry-After": "0" if n % 2 else
                                                              "Wed, 21 Oct 2015 07:28:00 GMT"}), seen))
    try:
        publish(admin, 1)
        subscribe(admin, "lms", receiver.url)
        eventually(lambda: len(seen) >= 4, "three retries")
        assert [(wait >= 1, came) for wait, came in retries(receiver, seen)[:3]] == [(True, True)] * 3
    finally:
        receiver.close()
        registry.close()


def test_backoff_grows_with_jitter_and_never_passes_the_cap():
    rng = random.Random(7)
    for failures in range(1, 70):
        wait = webhooks.backoff_seconds(failures, 3600, rng)
        base = 2 ** (failures - 1)
        assert min(base, 3600) <= wait <= min(1.5 * base, 3600)
    assert len({webhooks.backoff_seconds(3, 3600, rng) for _ in range(20)}) > 1  # jitter
    assert webhooks.retry_after_seconds("120", 0) == 120
    assert webhooks.retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480 - 60) == 60
    assert webhooks.retry_after_seconds("soon", 0) is None


def test_a_failing_webhook_waits_at_most_the_cap_between_attempts(db):
    registry = Registry(db, webhook_max_backoff=1, **CHECKED)
    admin, seen = registry.client("admin"), []
    receiver = Receiver(noting(admin, "lms", lambda n: 500, seen))
    try:
        publish(admin, 1)
        subscribe(admin, "lms", receiver.url, TimeoutSeconds=1)
        eventually(lambda: len(seen) >= 8, "seven failures", timeout=30)
        waits = retries(receiver, seen)[:7]
        assert all(came for _, came in waits)
        # The n-th failure's back-off is 2^(n-1) s at least uncapped: 32 s for the sixth. From
        # the attempt's start the cap of 1 s and the attempt (TimeoutSeconds 1) are far less.
        assert all(1 <= wait < 2 ** (n - 1) for n, (wait, _) in enumerate(waits, 1) if n >= 6)
        hook = state(admin, "lms")["Webhook"]
        assert hook["LastError"] == "HTTP 500" and state(admin, "lms")["Position"] == 0
    finally:
        receiver.close()
        registry.close()


def test_after_attempt_caps_the_wait_and_stops_at_a_410():
    hook = webhooks.new_webhook("https://example.com/h", 100, 10)._replace(failures=40)
    batch = webhooks.Batch(1, 5, 10, "s_1_5", b"{}", 5)
    failed = webhooks.after_attempt(hook, batch, webhooks.Answer("http_error", 500, None, "HTTP 500"), 10, 20,
                                    max_backoff=60, pause_after=10**9)
    assert failed.next_attempt_us == 20 + 60_000_000 and failed.failures == 41 and failed.state == "Active"
    assert (failed.batch_first, failed.batch_last, failed.batch_first_attempt_us) == (1, 5, 10)
    gone = webhooks.after_attempt(hook, batch, webhooks.Answer("http_error", 410, None, "HTTP 410"), 10, 20,
                                  max_backoff=60, pause_after=10**9)
    assert gone.state == "Disabled" and gone.next_attempt_us is None
    waited = webhooks.after_attempt(hook, batch, webhooks.Answer("http_error", 503, 7200.0, "HTTP 503"), 10, 20,
                                    max_backoff=60, pause_after=10**9)
    assert waited.next_attempt_us == 20 + 60_000_000
    for now in (0.0, webhooks.retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", 1445412480 + 60)):
        at_once = webhooks.after_attempt(hook, batch, webhooks.Answer("http_error", 503, now, "HTTP 503"), 10, 20,
                                         max_backoff=60, pause_after=10**9)
        assert at_once.next_attempt_us == 20 + 1_000_000  # never sooner than the back-off's first second
    ok = webhooks.after_attempt(failed, batch, webhooks.Answer("ok", 204, None, None), 30, 40, 60, 10**9)
    assert (ok.failures, ok.next_attempt_us, ok.batch_last, ok.failing_since_us) == (0, None, None, None)


def test_failing_for_the_pause_time_pauses_it_and_active_true_resumes_it(db):
    registry = Registry(db, webhook_max_backoff=1, webhook_pause_after=2, **CHECKED)
    healthy = threading.Event()
    receiver = Receiver(lambda delivery, n: 200 if healthy.is_set() else 500)
    try:
        admin = registry.client("admin")
        publish(admin, 1, 2)
        subscribe(admin, "lms", receiver.url)
        eventually(lambda: state(admin, "lms")["Webhook"]["State"] == "Paused", "paused", timeout=20)
        hook = state(admin, "lms")["Webhook"]
        assert "--webhook-pause-after" in hook["DisabledReason"] and hook["NextAttemptUTC"] is None
        attempts = len(receiver.deliveries)
        assert attempts >= 2
        publish(admin, 3)  # a paused webhook is not woken
        assert state(admin, "lms")["Position"] == 0
        healthy.set()
        resumed = admin.put_json("/subscriptions/lms", {"Webhook": {"Url": receiver.url, "Active": True}}).json
        assert (resumed["Webhook"]["State"], resumed["Webhook"]["ConsecutiveFailures"]) == ("Active", 0)
        eventually(lambda: state(admin, "lms")["Behind"] == 0, "delivered from its Position")
        assert len(receiver.deliveries) >= attempts + 1
        assert receiver.accepted()[0].headers["webhook-id"].endswith("_r1")
        assert [e["EventId"] for d in receiver.accepted() for e in d.events] == ["FOO-1", "FOO-2", "FOO-3"]
    finally:
        receiver.close()
        registry.close()


def test_active_false_pauses_a_webhook(hooks, receiver):
    admin = hooks.client("admin")
    subscribe(admin, "lms", receiver.url, Active=False)
    publish(admin, 1)
    other = Receiver()
    try:
        subscribe(admin, "witness", other.url)
        eventually(lambda: other.deliveries, "another webhook delivered")
        eventually(lambda: state(admin, "witness")["Behind"] == 0, "recorded")
        assert receiver.deliveries == [] and state(admin, "lms")["Webhook"]["State"] == "Paused"
    finally:
        other.close()


def test_ack_with_rewind_redelivers_from_an_earlier_point(hooks, receiver):
    admin = hooks.client("admin")
    sequences = publish(admin, 1, 2, 3)
    subscribe(admin, "lms", receiver.url, MaxEvents=10)
    eventually(lambda: state(admin, "lms")["Position"] == sequences[-1], "delivered")
    admin.post_json("/subscriptions/lms/ack", {"Through": sequences[0]}, status=409)
    rewound = admin.post_json("/subscriptions/lms/ack", {"Through": sequences[0], "Rewind": True}).json
    assert rewound["Position"] == sequences[0]
    eventually(lambda: len(receiver.accepted()) == 2 and state(admin, "lms")["Behind"] == 0, "redelivered")
    again = receiver.accepted()[1]
    assert [e["Sequence"] for e in again.events] == sequences[1:]
    assert again.headers["webhook-id"] == f"lms_{sequences[1]}_{sequences[2]}_r1"  # not the first id: not deduplicated


def test_a_lost_grant_pauses_the_webhook_before_its_next_delivery(db, receiver):
    registry = Registry(db, webhook_allow_hosts=["127.0.0.1"], **FAST)
    try:
        admin, reader = registry.client("admin"), registry.client("reader")
        reader.put_json("/subscriptions/mine", {"Filter": {"ProgramId": ["FOO"]}, "Webhook": {"Url": receiver.url}})
        first = publish(admin, 1)
        eventually(lambda: receiver.sequences() == first, "delivered")
        eventually(lambda: state(admin, "mine")["Position"] == first[0], "recorded")
        with registry.transaction() as tx:
            tx.revoke_grant("reader", "FOO")
        publish(admin, 2)
        eventually(lambda: state(admin, "mine")["Webhook"]["State"] == "Paused", "paused")
        hook = state(admin, "mine")["Webhook"]
        assert "can no longer read FOO" in hook["LastError"] and "owner" in hook["DisabledReason"]
        assert receiver.sequences() == first  # nothing more was posted
    finally:
        registry.close()


@pytest.mark.parametrize("named", [True, False], ids=["filter-names-both", "no-filter"])
def test_a_retry_checks_the_owners_grants_first(db, named):
    """The first attempt of FOO-1 and BAR-1 fails; BAR's grant is revoked while it is
    in flight. The retry reads the grants again: with a filter naming BAR the webhook
    is paused and nothing more is posted; without a filter it carries FOO's change
    alone (the programs the owner reads then)."""
    revoked = threading.Event()
    receiver = Receiver(lambda delivery, n: 500 if n == 0 and revoked.wait(10) else 200)
    registry = Registry(db, webhook_allow_hosts=["127.0.0.1"], **FAST)
    try:
        admin, reader = registry.client("admin"), registry.client("reader")
        with registry.transaction() as tx:
            tx.set_grants("reader", {"BAR": "read"})
        publish(admin, 1), publish(admin, 1, program="BAR")
        reader.put_json("/subscriptions/mine", {"Filter": {"ProgramId": ["FOO", "BAR"] if named else []},
                                                "Webhook": {"Url": receiver.url}})
        eventually(lambda: receiver.deliveries, "the first attempt in flight")
        assert [e["EventId"] for e in receiver.deliveries[0].events] == ["FOO-1", "BAR-1"]
        with registry.transaction() as tx:
            tx.revoke_grant("reader", "BAR")
        revoked.set()
        if named:
            eventually(lambda: state(admin, "mine")["Webhook"]["State"] == "Paused", "paused")
            assert "can no longer read BAR" in state(admin, "mine")["Webhook"]["LastError"]
            assert len(receiver.deliveries) == 1 and state(admin, "mine")["Position"] == 0  # nothing more posted
        else:
            eventually(lambda: state(admin, "mine")["Behind"] == 0 and receiver.accepted(), "delivered")
            assert [e["EventId"] for d in receiver.deliveries[1:] for e in d.events] == ["FOO-1"]
    finally:
        receiver.close()
        registry.close()


def test_a_batch_formed_again_by_another_process_holds_at_most_maxevents_and_skips_nothing(db):
    """MaxEvents 2; the owner reads FOO, not the 1000 BAR changes between FOO-first and
    FOO-last: the first attempt holds those two (Through FOO-last) and fails. Another
    process then forms the batch again, the owner reading BAR too by then: it holds
    FOO-first and BAR-0 (Through BAR-0's Sequence), and every change follows in order."""
    healthy = threading.Event()
    receiver = Receiver(lambda delivery, n: 200 if healthy.is_set() else 500)
    registry = Registry(db, webhook_allow_hosts=["127.0.0.1"], **FAST)
    second = None
    try:
        names = ["FOO-first"] + [f"BAR-{n}" for n in range(1000)] + ["FOO-last"]
        with registry.transaction(seqs=len(names)) as tx:
            tx.insert_events([(eventstore.validate_event(name, event_body(name[:3])), tx.take_seq())
                              for name in names])
        admin, writer = registry.client("admin"), registry.client("writer")
        writer.put_json("/subscriptions/w", {"Webhook": {"Url": receiver.url, "MaxEvents": 2}})
        eventually(lambda: state(admin, "w")["Webhook"]["ConsecutiveFailures"] >= 1, "the first attempt failed")
        registry.app.deliverer.stop()  # this process's deliverer goes, its batch in memory with it
        first = receiver.deliveries[0]
        assert [e["EventId"] for e in first.events] == ["FOO-first", "FOO-last"]
        assert first.json["data"]["Through"] == first.events[-1]["Sequence"]
        with registry.transaction() as tx:
            tx.set_grants("writer", {"BAR": "read"})
        healthy.set()
        second = eventstore.make_app(db, **FAST)
        webtest.TestApp(second, extra_environ=THREADED_HOST).get("/health")  # starts its engines
        eventually(lambda: state(admin, "w")["Behind"] == 0, "delivered", timeout=60)
        accepted = receiver.accepted()
        assert all(len(d.events) <= 2 for d in receiver.deliveries)
        assert all(d.json["data"]["Through"] == d.events[-1]["Sequence"] for d in accepted)
        assert [e["EventId"] for d in accepted for e in d.events] == names  # in order, none skipped
    finally:
        receiver.close()
        if second is not None:
            second.close()
        registry.close()


def test_the_engines_steer_by_exceptions_of_their_own_not_by_http_errors(undelivered):
    """A lost grant reaches the deliverer as GrantLost, a lost lease as LeaseLost:
    neither is a Problem (an HTTP answer); the app's own answer stays a 403."""
    assert not issubclass(LeaseLost, Problem) and not issubclass(webhooks.GrantLost, Problem)
    reader = undelivered.client("reader")
    reader.put_json("/subscriptions/mine", {"Filter": {"ProgramId": ["FOO"]}})
    with undelivered.transaction() as tx:
        tx.revoke_grant("reader", "FOO")
    row = undelivered.storage.reads().find_subscription("mine")
    with pytest.raises(webhooks.GrantLost, match="can no longer read FOO"):
        eventstore.webhook_programs(undelivered.storage.reads(), row)
    assert "can no longer read FOO" in reader.get("/subscriptions/mine/events", status=403).json["detail"]


# --- A receiver costs only its own subscription's time ----------------------------------------------

@pytest.mark.parametrize("misbehaviour, outcome, error", [
    ("hang", "timeout", "no answer within 1 s"), ("reset", "refused", "connection reset"),
    ("garbage", "http_error", "the answer was not HTTP"), ((302, {"Location": "REDIRECT"}), "http_error",
                                                           "HTTP 302: redirects are not followed"),
])
def test_a_misbehaving_receiver_holds_only_its_own_subscription(hooks, misbehaviour, outcome, error):
    redirected = Receiver()
    what = ((302, {"Location": redirected.url}) if isinstance(misbehaviour, tuple) else misbehaviour)
    bad, good = Receiver(lambda delivery, n: what), Receiver()
    counted = []
    hooks.app.deliverer.count = lambda subscription, result: counted.append((subscription, result))
    try:
        admin = hooks.client("admin")
        subscribe(admin, "bad", bad.url, TimeoutSeconds=1)
        subscribe(admin, "good", good.url, MaxEvents=1)
        sequences = publish(admin, 1, 2, 3)
        eventually(lambda: good.sequences() == sequences, "the other subscription's deliveries went on")
        eventually(lambda: state(admin, "bad")["Webhook"]["ConsecutiveFailures"] >= 1, "the bad one failed")
        hook = state(admin, "bad")["Webhook"]
        assert (hook["LastError"], hook["LastStatus"]) == (error, what[0] if isinstance(what, tuple) else None)
        assert state(admin, "bad")["Position"] == 0 and redirected.deliveries == []  # never followed
        assert ("bad", outcome) in counted and ("good", "ok") in counted
    finally:
        for receiver in (bad, good, redirected):
            receiver.close()


def test_a_hanging_receiver_does_not_hold_another_subscriptions_deliveries(hooks):
    hanging, good = Receiver(lambda delivery, n: "hang"), Receiver()
    try:
        admin = hooks.client("admin")
        subscribe(admin, "stuck", hanging.url, TimeoutSeconds=60)
        first = publish(admin, 1)
        eventually(lambda: hanging.deliveries, "the hanging receiver holds a delivery")
        subscribe(admin, "fine", good.url, MaxEvents=1)
        sequences = publish(admin, 2, 3, 4)
        eventually(lambda: good.sequences() == first + sequences, "every change delivered to the other one")
        assert state(admin, "stuck")["Webhook"]["ConsecutiveFailures"] == 0  # still in flight, 60 s
    finally:
        hanging.close()
        good.close()


def test_an_answer_is_read_only_up_to_a_bound(hooks):
    flood = Receiver(lambda delivery, n: "flood")
    try:
        admin = hooks.client("admin")
        sequences = publish(admin, 1, 2)
        subscribe(admin, "lms", flood.url, MaxEvents=1, TimeoutSeconds=30)
        eventually(lambda: state(admin, "lms")["Position"] == sequences[-1], "a 200 with an endless body counts")
        assert [d.events[0]["Sequence"] for d in flood.deliveries] == sequences
    finally:
        flood.close()


# --- One delivery in flight per subscription, across apps, processes and servers ---------------------

def test_two_apps_on_one_database_never_have_two_deliveries_in_flight(db):
    """Each app is a process as the lease sees it (a holder of its own)."""
    receiver = Receiver(delay=0.01)
    first, second = Registry(db, **FAST), None
    try:
        second = eventstore.make_app(db, **FAST)
        other = webtest.TestApp(second, extra_environ=THREADED_HOST)
        auth = basic("admin", first.keys["admin"])
        admin = first.client("admin")
        subscribe(admin, "lms", receiver.url, MaxEvents=3)
        other.get("/subscriptions/lms", headers=auth)  # starts the second app's engines
        done = []
        for n in range(60):
            client = admin if n % 2 else None
            if client:
                publish(client, n)
            else:
                other.put_json(f"/events/FOO-{n}", event_body(EventData={"n": n}), headers=auth)
            done.append(f"FOO-{n}")
        eventually(lambda: state(admin, "lms")["Behind"] == 0 and len(receiver.sequences()) >= 60, "all delivered",
                   timeout=30)
        assert [e["EventId"] for d in receiver.accepted() for e in d.events] == done
        assert receiver.overlaps == 0
    finally:
        receiver.close()
        if second is not None:
            second.close()
        first.close()


def test_a_delivery_recorded_under_a_lost_lease_moves_nothing(hooks):
    receiver = Receiver(delay=1.0)
    try:
        admin = hooks.client("admin")
        publish(admin, 1)
        subscribe(admin, "lms", receiver.url)
        eventually(lambda: receiver.deliveries, "a delivery in flight")
        # Another holder takes the lease meanwhile (this one stalled past its expiry, say).
        hooks.sql.execute("UPDATE leases SET holder = 'another process', expires_us = ? WHERE name = 'webhook:lms'",
                          (eventstore.now_us() + 60_000_000,))
        sub = hooks.app.deliverer._subs["lms"]
        eventually(lambda: len(receiver.deliveries) == 1 and not sub.running, "the attempt ended")
        assert state(admin, "lms")["Position"] == 0  # its 2xx was not recorded over the new holder
        assert state(admin, "lms")["Webhook"]["LastAttemptUTC"] is None
    finally:
        receiver.close()


def _publish_through(server, key, numbers, threads=4):
    """PUT events FOO-{n} through ``server`` from several threads (so several processes take them)."""
    errors = []

    def put(chunk):
        for n in chunk:
            status = server.request("PUT", f"/events/FOO-{n}", event(n), user="admin", key=key)[0]
            if status != 200:
                errors.append(status)
    workers = [threading.Thread(target=put, args=(numbers[i::threads],)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(60)
    assert not errors and not any(worker.is_alive() for worker in workers)


def _feed_sequences(server, key):
    return [e["Sequence"] for e in server.request("GET", "/events?limit=1000", user="admin", key=key)[2]["Events"]]


def test_with_two_processes_one_delivery_at_a_time_and_no_secret_in_the_log(db):
    receiver = Receiver(lambda delivery, n: 503 if n < 2 else 200, delay=0.01)
    server = Server(db, "--webhook-max-backoff", "1", processes=2)
    try:
        key = server.admin_key
        server.register("FOO")
        status, _, created = server.request("PUT", "/subscriptions/lms", {"Webhook": {"Url": receiver.url,
                                                                                      "MaxEvents": 3}},
                                            user="admin", key=key)
        assert status == 201
        secrets_shown = [created["Secret"], server.request("POST", "/subscriptions/lms/secret", user="admin",
                                                           key=key)[2]["Secret"]]
        _publish_through(server, key, list(range(60)))
        expected = _feed_sequences(server, key)
        eventually(lambda: receiver.sequences() == expected, "every change delivered, in order", timeout=60)
        assert receiver.overlaps == 0
        assert all(verified(secrets_shown[1], delivery) for delivery in receiver.accepted())
    finally:
        server.stop()
        receiver.close()
    log = "".join(server.log)
    assert "/subscriptions/lms/secret" in log  # the access log was written
    for secret in secrets_shown:
        assert secret not in log and secret.removeprefix("whsec_")[:20] not in log


@pytest.mark.postgresql_only
def test_two_servers_on_one_postgresql_database_deliver_one_at_a_time(db):
    receiver = Receiver(delay=0.01)
    first = Server(db, "--webhook-max-backoff", "1")
    second = None
    try:
        second = Server(db, "--webhook-max-backoff", "1")
        key = first.admin_key
        first.register("FOO")
        assert first.request("PUT", "/subscriptions/lms", {"Webhook": {"Url": receiver.url, "MaxEvents": 2}},
                             user="admin", key=key)[0] == 201
        threads = [threading.Thread(target=_publish_through, args=(server, key, list(range(start, 80, 2)), 2))
                   for start, server in ((0, first), (1, second))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        expected = _feed_sequences(first, key)
        assert len(expected) == 80
        eventually(lambda: receiver.sequences() == expected, "every change delivered, in order", timeout=60)
        assert receiver.overlaps == 0
    finally:
        for server in (first, second):
            if server is not None:
                server.stop()
        receiver.close()


def test_a_server_killed_mid_delivery_and_started_again_misses_nothing(db):
    receiver = Receiver(delay=0.2)  # each delivery takes a while: the kill lands in one
    server = Server(db, "--webhook-max-backoff", "1")
    try:
        key = server.admin_key
        server.register("FOO")
        server.request("PUT", "/subscriptions/lms", {"Webhook": {"Url": receiver.url, "MaxEvents": 2}},
                       user="admin", key=key)
        _publish_through(server, key, list(range(20)), threads=1)
        expected = _feed_sequences(server, key)
        eventually(lambda: len(receiver.deliveries) >= 3, "deliveries under way")
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
        server.stop()
        server = Server(db, "--webhook-max-backoff", "1")
        eventually(lambda: set(receiver.sequences()) == set(expected), "every change delivered after the restart",
                   timeout=60)
        eventually(lambda: server.request("GET", "/subscriptions/lms", user="admin", key=key)[2]["Behind"] == 0,
                   "caught up")
        firsts = [d.events[0]["Sequence"] for d in receiver.accepted()]
        assert firsts == sorted(firsts)  # in order; the one in flight at the kill perhaps twice
    finally:
        server.stop()
        receiver.close()


def test_sigterm_stops_a_delivery_in_flight_within_10_s_and_it_is_sent_again(db):
    hanging = threading.Event()
    hanging.set()
    receiver = Receiver(lambda delivery, n: "hang" if hanging.is_set() else 200)
    server = Server(db, "--webhook-max-backoff", "1")
    try:
        key = server.admin_key
        server.register("FOO")
        _publish_through(server, key, [1, 2], threads=1)
        server.request("PUT", "/subscriptions/lms", {"Webhook": {"Url": receiver.url, "TimeoutSeconds": 60}},
                       user="admin", key=key)
        eventually(lambda: receiver.deliveries, "a delivery in flight")
        os.killpg(server.process.pid, signal.SIGTERM)
        server.process.wait(10)  # (raises past 10 s)
        assert server.process.returncode == 0
        server.stop()
        hanging.clear()
        server = Server(db, "--webhook-max-backoff", "1")
        eventually(lambda: receiver.accepted(), "sent again after the restart", timeout=30)
        # Not recorded (the stop cut it): formed again from the Position, the same changes under the same id.
        assert receiver.accepted()[0].headers["webhook-id"] == receiver.deliveries[0].headers["webhook-id"]
        assert receiver.accepted()[0].events == receiver.deliveries[0].events
    finally:
        server.stop()
        receiver.close()


def test_deliveries_apart_in_eventstore_py_deliver_which_stops_within_10_s_of_sigterm(db):
    hanging = threading.Event()
    receiver = Receiver(lambda delivery, n: "hang" if hanging.is_set() else 200)
    server = Server(db, "--no-webhook-delivery")
    deliver = None
    try:
        key = server.admin_key
        server.register("FOO")
        created = server.request("PUT", "/subscriptions/lms", {"Webhook": {"Url": receiver.url}},
                                 user="admin", key=key)[2]
        _publish_through(server, key, [1, 2, 3], threads=1)
        deliver = subprocess.Popen([sys.executable, str(ROOT / "eventstore.py"), "--db", server.db_path, "deliver",
                                    "--webhook-max-backoff", "1"], stderr=subprocess.PIPE, text=True)
        expected = _feed_sequences(server, key)
        eventually(lambda: receiver.sequences() == expected, "delivered by eventstore.py deliver", timeout=30)
        hanging.set()
        _publish_through(server, key, [4], threads=1)
        eventually(lambda: len(receiver.deliveries) == len(receiver.accepted()) + 1, "a delivery in flight")
        deliver.send_signal(signal.SIGTERM)
        deliver.wait(10)
        assert deliver.returncode == 0
        assert created["Secret"] not in deliver.stderr.read()
    finally:
        if deliver is not None and deliver.poll() is None:
            deliver.kill()
            deliver.wait()
        server.stop()
        receiver.close()


# --- The schema upgrade from version 4 ---------------------------------------------------------------

def _check_upgraded(app, key, receiver):
    client = webtest.TestApp(app, extra_environ=THREADED_HOST)
    auth = basic("upgrader", key)
    assert client.get("/health").json["schemaVersion"] == eventstore.SCHEMA_VERSION
    subscriptions = {s["Name"]: s for s in client.get("/subscriptions", headers=auth).json["Subscriptions"]}
    assert subscriptions["lms"]["Webhook"] is None and subscriptions["lms"]["Description"] == "the LMS"
    assert subscriptions["lms"]["Position"] == 2 and subscriptions["all"]["Position"] == 0
    client.put_json("/subscriptions/lms", {"Webhook": {"Url": receiver.url}}, headers=auth, status=200)
    eventually(lambda: [e["EventId"] for e in receiver.events()] == ["FOO-2", "FOO-3"], "delivered after the upgrade")


@pytest.mark.sqlite_only
def test_a_version_4_sqlite_database_is_upgraded_idempotently(tmp_path, receiver):
    import shutil
    import eventstore_sqlite
    path = tmp_path / "v4.db"
    shutil.copy(ROOT / "tests" / "data" / "schema-v4.db", path)
    receiver.events = lambda: [e for d in receiver.accepted() for e in d.events]
    app = eventstore.make_app(path, **CHECKED)
    try:
        _check_upgraded(app, create_user(path, "upgrader", {}, is_system=True), receiver)
    finally:
        app.close()
    for _ in range(2):  # again, on an upgraded database: nothing changes
        conn = eventstore_sqlite.connect(str(path))
        conn.execute("PRAGMA user_version = 4")
        eventstore_sqlite.apply_schema(conn)
        assert conn.execute("PRAGMA user_version").fetchone()[0] == eventstore.SCHEMA_VERSION
        assert conn.execute("SELECT name, webhook_url IS NOT NULL FROM subscriptions ORDER BY name").fetchall() == [
            ("all", 0), ("lms", 1)]
        conn.close()


@pytest.mark.postgresql_only
def test_a_version_4_postgresql_database_is_upgraded_idempotently(db, receiver):
    import psycopg
    import eventstore_pg
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    with psycopg.connect(db, autocommit=True) as conn:  # (the dump empties the search path)
        conn.execute((ROOT / "tests" / "data" / "schema-v4-postgres.sql").read_text())
    with psycopg.connect(db, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM eventstore_schema").fetchone() == (4,)
        conn.execute("UPDATE events SET xid = '3'")  # the dumping cluster's transaction ids: older than any here
    receiver.events = lambda: [e for d in receiver.accepted() for e in d.events]
    app = eventstore.make_app(db, **CHECKED)
    try:
        _check_upgraded(app, create_user(db, "upgrader", {}, is_system=True), receiver)
    finally:
        app.close()
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("UPDATE eventstore_schema SET version = 4")
    eventstore_pg.PostgresStorage(db, threads=1).close()
    with psycopg.connect(db, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM eventstore_schema").fetchall() == [(eventstore.SCHEMA_VERSION,)]
        assert conn.execute("SELECT name, webhook_url IS NOT NULL FROM subscriptions ORDER BY name").fetchall() == [
            ("all", False), ("lms", True)]


def test_the_readme_verifies_as_the_receiver_to_copy_does():
    import re
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(def verify\(.*?)```", readme, re.S).group(1)
    example = (ROOT / "docs" / "examples" / "webhook_receiver.py").read_text(encoding="utf-8")
    lines = [line.split("  #")[0].rstrip() for line in code.splitlines()]
    assert len(lines) <= 10 and all(line in example for line in lines), lines


def test_a_commit_wakes_the_deliverer_in_this_process_and_from_another(db, receiver):
    """Deliveries follow each commit, this process's and another's, not the slow
    safety re-check (pushed out of the way here: it runs once, at the start)."""
    registry = Registry(db, **FAST)
    registry.app.deliverer.recheck_seconds = 3600
    other = eventstore.make_app(db, webhook_delivery=False, **CHECKED)
    try:
        admin = registry.client("admin")
        subscribe(admin, "lms", receiver.url, MaxEvents=1)
        mine = publish(admin, 1)
        eventually(lambda: receiver.sequences() == mine, "this process's commit delivered")
        eventually(lambda: not registry.app.deliverer._subs["lms"].running, "its thread done: nothing to deliver")
        client = webtest.TestApp(other, extra_environ=THREADED_HOST)
        client.put_json("/events/FOO-2", event_body(EventData={"n": 2}), headers=basic("admin", registry.keys["admin"]))
        theirs = admin.get("/events/FOO-2").json["Sequence"]
        eventually(lambda: receiver.sequences() == mine + [theirs], "another process's commit delivered")
    finally:
        other.close()
        registry.close()


def test_the_app_makes_its_deliverer_with_the_collaborator_it_is_given(db, receiver):
    """make_app's ``make_deliverer``: here a deliverer whose reading of the owner's
    grants fails (a bug, say), handing that failure to its own ``on_error``."""
    failures = []

    def broken(reads, row):
        raise RuntimeError("a bug in programs_of")

    def make_deliverer(storage, writer, news, **options):
        return webhooks.WebhookDeliverer(storage, writer, news, programs_of=broken, render=eventstore.render_event,
                                         format_time=eventstore.format_datetime, on_error=failures.append, **options)
    registry = Registry(db, make_deliverer=make_deliverer, webhook_max_backoff=1)
    try:
        admin = registry.client("admin")
        publish(admin, 1)
        subscribe(admin, "lms", receiver.url)
        eventually(lambda: failures, "the failure handed over")
        assert isinstance(failures[0], RuntimeError) and receiver.deliveries == []
    finally:
        registry.close()


def test_each_attempt_counts_in_metrics_by_outcome(hooks):
    answers = iter([503, 200, 200])
    receiver = Receiver(lambda delivery, n: next(answers))
    try:
        admin = hooks.client("admin")
        publish(admin, 1)
        subscribe(admin, "lms", receiver.url)
        eventually(lambda: state(admin, "lms")["Behind"] == 0, "delivered after a 503")
        page = admin.get("/metrics").text
        assert 'eventstore_webhook_deliveries_total{subscription="lms",outcome="http_error"} 1' in page
        assert 'eventstore_webhook_deliveries_total{subscription="lms",outcome="ok"} 1' in page
    finally:
        receiver.close()


def test_serve_py_takes_the_webhook_options_from_flags_and_the_environment():
    import serve
    args = serve.parse_args([], {"EVENTSTORE_WEBHOOK_ALLOW_HOST": "a.example, b.example",
                                 "EVENTSTORE_WEBHOOK_MAX_BACKOFF": "5", "EVENTSTORE_NO_WEBHOOK_DELIVERY": "1"})
    assert (args.webhook_allow_hosts, args.webhook_max_backoff, args.webhook_pause_after, args.webhook_delivery) == (
        ["a.example", "b.example"], 5, 259200, False)
    args = serve.parse_args(["--webhook-allow-host", "c.example", "--webhook-pause-after", "60"], {})
    assert (args.webhook_allow_hosts, args.webhook_pause_after, args.webhook_delivery) == (["c.example"], 60, True)
    with pytest.raises(SystemExit):
        serve.parse_args(["--webhook-max-backoff", "0"], {})


def test_a_delivery_holds_at_most_a_few_mib_whatever_maxevents_says(hooks, receiver):
    admin = hooks.client("admin")
    for n in range(10):  # 10 events of 600 KB: 6 MB in all, past the bound of one body
        admin.put_json(f"/events/FOO-{n}", event_body(EventData={"n": n, "pad": "x" * 600_000}))
    subscribe(admin, "lms", receiver.url, MaxEvents=1000)
    eventually(lambda: state(admin, "lms")["Behind"] == 0, "delivered")
    assert [e["EventId"] for d in receiver.accepted() for e in d.events] == [f"FOO-{n}" for n in range(10)]
    assert len(receiver.accepted()) >= 2
    assert all(len(d.body) <= webhooks.MAX_BATCH_BYTES + 700_000 for d in receiver.accepted())
    assert all(d.json["data"]["Through"] == d.events[-1]["Sequence"] for d in receiver.accepted())


def test_allowed_hosts_are_compared_as_written_localhost_is_not_127_0_0_1(db, no_network):
    registry = Registry(db, webhook_delivery=False, webhook_allow_hosts=["127.0.0.1"], **CHECKED)
    try:
        writer = registry.client("writer")
        writer.put_json("/subscriptions/a", {"Webhook": {"Url": "http://127.0.0.1:9/h", "Active": False}}, status=201)
        writer.put_json("/subscriptions/b", {"Webhook": {"Url": "http://localhost:9/h"}}, status=403)
        writer.put_json("/subscriptions/c", {"Webhook": {"Url": "http://127.0.0.2:9/h"}}, status=403)
    finally:
        registry.close()


@pytest.mark.parametrize("option", ["webhook_max_backoff", "webhook_pause_after"])
def test_make_app_takes_whole_seconds(tmp_path, option):
    for bad in (0, 1.5, True, "60"):
        with pytest.raises(ValueError):
            eventstore.make_app(tmp_path / "x.db", **{option: bad})


def test_a_webhook_is_given_whole_and_a_new_filter_ends_the_batch_in_progress(hooks):
    healthy = threading.Event()
    receiver = Receiver(lambda delivery, n: 200 if healthy.is_set() else 503)
    try:
        admin = hooks.client("admin")
        publish(admin, 1)
        bar = publish(admin, 2, program="BAR")
        subscribe(admin, "lms", receiver.url, MaxEvents=7)
        eventually(lambda: state(admin, "lms")["Webhook"]["ConsecutiveFailures"] >= 1, "a batch in flight, failing")
        assert len(receiver.deliveries[0].events) == 2
        changed = admin.put_json("/subscriptions/lms", {"Filter": {"ProgramId": ["BAR"]},
                                                        "Webhook": {"Url": receiver.url}}).json
        assert changed["Webhook"]["MaxEvents"] == 100 and changed["Webhook"]["ConsecutiveFailures"] >= 1  # kept
        healthy.set()
        eventually(lambda: receiver.accepted(), "delivered")
        assert [e["Sequence"] for e in receiver.accepted()[0].events] == bar  # a new batch, of the new filter
        assert receiver.accepted()[0].headers["webhook-id"] == f"lms_{bar[0]}_{bar[0]}"
    finally:
        receiver.close()


def test_a_webhook_row_shown_in_a_log_line_or_a_traceback_hides_its_secrets(undelivered):
    admin = undelivered.client("admin")
    secret = admin.put_json("/subscriptions/s", {"Webhook": {"Url": "https://example.com/hook"}}).json["Secret"]
    admin.post("/subscriptions/s/secret")  # now an old secret too
    session = undelivered.app.storage.session()
    row = session.find_subscription("s")
    session.close()
    assert row.webhook.old_secret == secret and row.webhook.secret.startswith("whsec_")
    for shown in (repr(row), repr(row.webhook), str(row), f"{row!r}"):
        assert "whsec_" not in shown and secret not in shown
        assert "secret=<hidden>" in shown and "old_secret=<hidden>" in shown and "url='https://example.com/hook'" in shown


def test_a_deliverer_waiting_for_a_storage_session_gives_up_after_its_bound(undelivered):
    sessions = webhooks._Sessions(undelivered.app.storage, size=1, wait_seconds=0.2)
    with sessions.reads() as held:
        assert held.last_sequence() == 0
        with pytest.raises(TimeoutError, match="no storage session came free within 0.2 s"):
            with sessions.reads():
                pass
    with sessions.reads() as again:  # the one session is free again: taken at once
        assert again is held
    sessions.close_idle()
