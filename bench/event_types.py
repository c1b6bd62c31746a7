"""Issue 12: the event-type catalogue costs what the number of types and programs
costs, never what the number of events costs, and keeping its counts costs PUT
almost nothing.

  13. GET /event-types req/s on a 1,000,000-event database / GET /programs req/s,
      same server, same SYSTEM user (wrk, 16 connections). The database: 10
      programs, 30 event types (20 registered), each program using 10 of them:
      100 counts, so the catalogue answer is bigger than the programs answer.
  14. single PUT req/s with the counts kept / the same PUTs on a database whose
      count triggers were dropped: the median ratio of 8 pairs of short runs, each
      pair's order alternating (this machine drifts by more than the difference).

``python bench/event_types.py [--events N]`` runs it alone; ``make bench`` runs
it after the rest (figures 13 and 14 of its table come from here).
"""

import argparse
import base64
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (bench/common.py: wrk, Server, event_body, rounds in turn, percentile)
import eventstore  # noqa: E402
import eventstore_sqlite  # noqa: E402

PROGRAMS = [f"P{n}" for n in range(10)]
TYPES = [f"Type{n:02}" for n in range(30)]
TARGETS = {"13. GET /event-types vs GET /programs": 0.5, "14. PUT, counts kept vs not": 0.95}

GET_LUA = """
wrk.headers["Authorization"] = "%(auth)s"
function request() return wrk.format("GET", "%(path)s") end
"""


def build(path, events):
    """``events`` events over PROGRAMS, program n using types 3n .. 3n+9 (of 30, wrapping), inserted
    raw in 10,000-row transactions (the count triggers keep the counts as they go)."""
    session = eventstore_sqlite.SQLiteStorage(path).session()
    conn = session.conn
    now = eventstore.now_us()
    with session.transaction(now) as tx:
        for program in PROGRAMS:
            tx.put_program(program, f"Program {program}")
        for event_type in TYPES[:20]:
            tx.register_event_type(event_type, f"What {event_type} means.")
        key = eventstore.add_user(tx, "bench", True, {})
    doc = '{"EventId":"x","Deleted":false'
    for start in range(0, events, 10_000):
        rows = [(n + 1, f"{PROGRAMS[n % 10]}-e{n}", PROGRAMS[n % 10], TYPES[((n % 10) * 3 + n // 10 % 10) % 30],
                 f"m{n % 5000}", now, now, doc, now, now) for n in range(start, min(events, start + 10_000))]
        with eventstore_sqlite.write_transaction(conn):
            conn.executemany("INSERT INTO events (seq, event_id, program_id, event_type, member_id, start_us, end_us,"
                             " doc, revision, created_us, updated_us) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)", rows)
    counted = conn.execute("SELECT COUNT(*), SUM(events) FROM event_type_counts WHERE events > 0").fetchone()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    assert counted == (100, events), counted
    return key


def catalogue_figure(folder, events, seconds):
    path = folder / "catalogue.db"
    common.say(f"13: building a {events:,}-event database over 10 programs and 30 types ...")
    key = build(path, events)
    server = common.Server(path)
    try:
        auth = "Basic " + base64.b64encode(f"bench:{key}".encode()).decode()
        status, _, answer = server.request("GET", "/event-types", user="bench", key=key)
        assert status == 200 and len(answer["EventTypes"]) == 30, status
        lua = {name: GET_LUA % {"auth": auth, "path": f"/{name}"} for name in ("event-types", "programs")}
        common.wrk(server.port, lua["event-types"], 2)  # warm
        runs = common.alternating({name: lambda n, script=script: common.wrk(server.port, script, seconds)
                                  for name, script in lua.items()})
    finally:
        server.stop()
    return {name: statistics.median(run[0] for run in values) for name, values in runs.items()}


def put_figure(folder, seconds, rounds=8):
    """PUT on two empty databases, one of them without the count triggers: short
    runs in pairs, the order alternating, so that the machine's drift cancels;
    -> the median of the rounds' ratios, and each side's median rate."""
    servers = {}
    for name in ("kept", "not kept"):
        path = folder / f"put-{name.replace(' ', '-')}.db"
        conn = eventstore_sqlite.SQLiteStorage(path).session().conn
        if name == "not kept":
            for (trigger,) in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'trigger'").fetchall():
                conn.execute(f"DROP TRIGGER {trigger}")  # this bench's own copy: what PUT cost before the counts
        conn.close()
        server = common.Server(path)
        server.request("PUT", "/programs/FOO", {"Name": "Foo"}, user="admin", key=server.admin_key)
        servers[name] = server
    scripts = {name: common.PUT_LUA % {"auth": "Basic " + base64.b64encode(f"admin:{server.admin_key}".encode()).decode(),
                                      "body": json.dumps(common.event_body(1))} for name, server in servers.items()}
    try:
        for name, server in servers.items():
            common.wrk(server.port, scripts[name], 2, args=["warm"])
        runs = common.alternating({name: lambda n, name=name: common.wrk(servers[name].port, scripts[name], seconds,
                                                                        args=[f"r{n}"])[0]
                                  for name in servers}, rounds)
    finally:
        for server in servers.values():
            server.stop()
    ratios = [kept / not_kept for kept, not_kept in zip(runs["kept"], runs["not kept"])]
    return statistics.median(ratios), {name: statistics.median(values) for name, values in runs.items()}


def main(events=1_000_000, seconds=10):
    folder = Path(tempfile.mkdtemp(prefix="eventstore-bench-types-"))
    catalogue = catalogue_figure(folder, events, seconds)
    common.say("14: PUT with the counts kept and without ...")
    put_ratio, puts = put_figure(folder, max(3, seconds // 2))
    figures = {"13. GET /event-types vs GET /programs": catalogue["event-types"] / catalogue["programs"],
               "14. PUT, counts kept vs not": put_ratio}
    print(f"\nissue 12, event types ({events:,} events; wrk -t1 -c16; 13: medians of {common.ROUNDS} rounds of {seconds} s; "
          f"14: the median ratio of 8 pairs of {max(3, seconds // 2)} s runs)")
    for name, value in figures.items():
        print(f"{name:40} {value:7.2f}  >= {TARGETS[name]:<5} {'met' if value >= TARGETS[name] else 'NOT MET'}")
    print(f"GET /event-types {catalogue['event-types']:,.0f} req/s, GET /programs {catalogue['programs']:,.0f} req/s; "
          f"PUT {puts['kept']:,.0f} req/s with counts, {puts['not kept']:,.0f} without")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="events in the catalogue's database")
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run (default 10)")
    options = parser.parse_args()
    main(options.events, options.seconds)
