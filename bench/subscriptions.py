"""Issue 31: a subscription costs what the feed costs.

  18. GET /subscriptions with 100 subscriptions over a 1,000,000-event database: the
      median time of 20 requests (target: at most 200 ms on this machine), printed
      beside the feed's own page time in the same run (GET /events?limit=100 from the
      start, same server, same SYSTEM user).
  19. reading a subscription's page / reading GET /events with the same filter from
      the same position (limit 100), req/s with wrk (16 connections): the median of 3
      rounds' ratios, the runs taking turns (target at least 0.9).

The database: 1,000,000 events over 10 programs and 3 types, inserted raw
(executemany in 10,000-row transactions), and 100 subscriptions of every kind:
owned by a SYSTEM user or by one who reads 5 of the programs; with no filter, a
program, two programs and a type, or a type; at the start, half way, 500 from the
head, at the head, or anywhere between.

``python bench/subscriptions.py [--events N] [--seconds S]`` runs it alone; ``make
bench`` runs it after issue 33's figures.
"""

import argparse
import base64
import http.client
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (bench/common.py: wrk, Server, rounds in turn)
import eventstore  # noqa: E402
import eventstore_sqlite  # noqa: E402
from eventstore_storage import SubscriptionRow  # noqa: E402

PROGRAMS = [f"P{n}" for n in range(10)]
TYPES = ("CourseCompleted", "CourseStarted", "CreditEarned")
SUBSCRIPTIONS = 100
TARGETS = {"18. GET /subscriptions, 100 over the database (ms)": ("<=", 200.0),
           "19. subscription page vs /events, same filter": (">=", 0.9)}
PAGE_PATHS = ("/subscriptions/page-reader/events?limit=100",
              "/events?ProgramId=P1&ProgramId=P2&EventType=CourseCompleted&after={after}&limit=100")

GET_LUA = """
wrk.headers["Authorization"] = "%(auth)s"
function request() return wrk.format("GET", "%(path)s") end
"""


def build(path, events):
    """The database: events inserted raw, as the app stores them (their doc is the
    representation up to "Deleted"), then users and subscriptions -> the keys."""
    session = eventstore_sqlite.SQLiteStorage(path).session()
    now = eventstore.now_us()
    with session.transaction(now) as tx:
        for program in PROGRAMS:
            tx.put_program(program, f"Program {program}")
        keys = {"bench": eventstore.add_user(tx, "bench", True, {}),
                "half": eventstore.add_user(tx, "half", False, {p: "read" for p in PROGRAMS[:5]})}
    for start in range(0, events, 10_000):
        rows = []
        for n in range(start, min(events, start + 10_000)):
            program, event_type = PROGRAMS[n % 10], TYPES[n // 10 % 3]
            doc = (f'{{"EventId":"{program}-e{n}","ProgramId":"{program}","ProgramMemberId":"m{n % 5000}@example.com",'
                   f'"EventType":"{event_type}","EventStartUTC":"2026-03-01T09:30:00Z",'
                   f'"EventEndUTC":"2026-03-01T09:30:00Z","EventData":{{"course":"CPR-{n % 300}","score":{n % 100}}},'
                   f'"ReferenceEventId":null,"Deleted":false')
            rows.append((n + 1, f"{program}-e{n}", program, event_type, f"m{n % 5000}@example.com", now, now, doc,
                         now + n, now + n))
        with eventstore_sqlite.write_transaction(session.conn):
            session.conn.executemany(
                "INSERT INTO events (seq, event_id, program_id, event_type, member_id, start_us, end_us, doc,"
                " revision, created_us, updated_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)", rows)
    rng = random.Random(31)
    with session.transaction(now) as tx:
        for n in range(SUBSCRIPTIONS):
            owner = "bench" if n % 2 == 0 else "half"
            readable = PROGRAMS if owner == "bench" else PROGRAMS[:5]
            programs, types = [((), ()), ((readable[n % len(readable)],), ()),
                               ((readable[n % 5], readable[(n + 1) % 5]), (TYPES[n % 3],)), ((), (TYPES[n % 3],))][n % 4]
            position = [0, events // 2, events - 500, events, rng.randrange(events)][n // 4 % 5]
            tx.put_subscription(SubscriptionRow(f"s{n:03}", owner, None, programs, types, position, now, None))
        tx.put_subscription(SubscriptionRow("page-reader", "bench", None, ("P1", "P2"), ("CourseCompleted",),
                                            events // 2, now, None))
    session.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    session.close()
    return keys


def median_ms(server, path, key, repeat=20):
    """The median time of ``repeat`` GETs of ``path`` on one keep-alive connection."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port)
    headers = {"Authorization": "Basic " + base64.b64encode(f"bench:{key}".encode()).decode()}
    times = []
    for n in range(repeat + 2):
        started = time.perf_counter()
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body[:300])
        if n >= 2:  # the first two warm the caches
            times.append((time.perf_counter() - started) * 1000)
    connection.close()
    return statistics.median(times), body


def main(events=1_000_000, seconds=10):
    folder = Path(tempfile.mkdtemp(prefix="eventstore-bench-subscriptions-"))
    common.say(f"18-19: building a {events:,}-event database with {SUBSCRIPTIONS} subscriptions ...")
    started = time.perf_counter()
    keys = build(folder / "subscriptions.db", events)
    common.say(f"   built in {time.perf_counter() - started:.0f} s")
    server = common.Server(folder / "subscriptions.db")
    try:
        listing_ms, listing = median_ms(server, "/subscriptions", keys["bench"])
        states = json.loads(listing)["Subscriptions"]
        assert len(states) == SUBSCRIPTIONS + 1, len(states)
        page_ms, _ = median_ms(server, "/events?limit=100", keys["bench"])
        paths = [PAGE_PATHS[0], PAGE_PATHS[1].format(after=events // 2)]
        pages = [json.loads(median_ms(server, path, keys["bench"], repeat=1)[1])["Events"] for path in paths]
        assert pages[0] == pages[1] and len(pages[0]) == 100, "the two reads do not give the same page"
        auth = "Basic " + base64.b64encode(f"bench:{keys['bench']}".encode()).decode()
        scripts = {name: GET_LUA % {"auth": auth, "path": path} for name, path in zip(("subscription", "feed"), paths)}
        for script in scripts.values():
            common.wrk(server.port, script, 2)  # warm
        runs = common.alternating({name: lambda n, script=script: common.wrk(server.port, script, seconds)
                                   for name, script in scripts.items()})
    finally:
        server.stop()
    subscription_rate, feed_rate = common.median_pair(runs, "subscription", "feed")
    figures = {"18. GET /subscriptions, 100 over the database (ms)": listing_ms,
               "19. subscription page vs /events, same filter": subscription_rate / feed_rate}
    behind = [state["Behind"] for state in states]
    print(f"\nissue 31, subscriptions ({events:,} events, {SUBSCRIPTIONS} subscriptions; 18: the median of 20 "
          f"requests; 19: wrk -t1 -c16, the median of {common.ROUNDS} rounds' ratios of {seconds} s runs)")
    for name, value in figures.items():
        op, bound = TARGETS[name]
        met = value <= bound if op == "<=" else value >= bound
        print(f"{name:52} {value:8.2f}  {op} {bound:<5} {'met' if met else 'NOT MET'}")
    print(f"GET /subscriptions {listing_ms:.1f} ms ({len(listing):,} bytes; Behind 1000+ for "
          f"{sum(not state['BehindIsExact'] for state in states)}, 0 for {behind.count(0)}); the feed's own page "
          f"(GET /events?limit=100) {page_ms:.1f} ms; subscription page {subscription_rate:,.0f} req/s, "
          f"/events with its filter {feed_rate:,.0f} req/s")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the database (default 1,000,000)")
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run (default 10)")
    options = parser.parse_args()
    main(options.events, options.seconds)
