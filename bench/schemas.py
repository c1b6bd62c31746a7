"""Issue 33: what a type's schema and retention cost (docs/API.md §5b).

  15. single PUT req/s of a type with a 20-property schema / the same PUTs of a
      type without one, same server, same body (20 properties): the median ratio
      of 8 pairs of short runs, each pair's order alternating.
  16. proving a 20-property schema against 100,000 live events of its type
      (PUT /event-types/{T} until its 200), seconds; GET by id p99 while it runs
      (wrk, 16 connections), against GET p99 without it, same server.
  17. a retention sweep of 100,000 expired events (from RetainDays set until
      /health says they were erased), seconds; PUT p99 while it runs (wrk, 16
      connections), against PUT p99 without it, same server.

``python bench/schemas.py [--events N] [--seconds S]`` runs it alone; ``make bench``
runs it after the rest.
"""

import argparse
import base64
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (bench/common.py)
import eventstore  # noqa: E402
import eventstore_sqlite  # noqa: E402

PROPERTIES = 20
SCHEMA = {"type": "object", "required": [f"p{n}" for n in range(PROPERTIES)],
          "properties": {f"p{n}": ({"type": "integer", "minimum": 0} if n % 2 else {"type": "string", "maxLength": 50})
                         for n in range(PROPERTIES)}}
TARGETS = {"15. PUT, 20-property schema vs none": (">=", 0.85), "16. proving 100,000 events, s": ("<=", 10.0),
           "16. GET p99 while proving, ms": None, "17. sweeping 100,000 expired, s": None,
           "17. PUT p99 while sweeping, ms": ("<", 50.0)}


def data(n):
    return {f"p{k}": (n + k if k % 2 else f"value {n % 977} {k}") for k in range(PROPERTIES)}


def body(event_type, n=1):
    return common.tests_event_body("FOO", EventType=event_type, ProgramMemberId=f"member{n % 5000}@example.com",
                                   EventData=data(n))


def auth_of(server):
    return "Basic " + base64.b64encode(f"admin:{server.admin_key}".encode()).decode()


def put_figure(folder, seconds, rounds=8):
    """15: one server, two types: "Checked" with the schema, "Free" without."""
    server = common.Server(folder / "put.db")
    try:
        server.request("PUT", "/programs/FOO", {"Name": "Foo"}, user="admin", key=server.admin_key)
        status, _, _ = server.request("PUT", "/event-types/Checked", {"Description": "With a schema.",
                                                                      "Schema": SCHEMA},
                                      user="admin", key=server.admin_key)
        assert status == 200, status
        scripts = {name: common.PUT_LUA % {"auth": auth_of(server), "body": json.dumps(body(name))}
                   for name in ("Checked", "Free")}
        for name in scripts:
            common.wrk(server.port, scripts[name], 2, args=[f"warm{name}"])
        runs = common.alternating({name: lambda n, name=name: common.wrk(server.port, scripts[name], seconds,
                                                                        args=[f"{name}{n}"])[0]
                                  for name in scripts}, rounds)
    finally:
        server.stop()
    ratios = [checked / free for checked, free in zip(runs["Checked"], runs["Free"])]
    return statistics.median(ratios), {name: statistics.median(values) for name, values in runs.items()}


def build(path, events, event_type, updated_us):
    """``events`` live events of ``event_type`` in program FOO, inserted raw (their
    representation as a PUT would store it), last changed at ``updated_us``."""
    session = eventstore_sqlite.SQLiteStorage(path).session()
    conn = session.conn
    with session.transaction(eventstore.now_us()) as tx:
        tx.put_program("FOO", "Foo")
    for start in range(0, events, 10_000):
        rows = []
        for n in range(start, min(events, start + 10_000)):
            event = eventstore.validate_event(f"FOO-e{n}", body(event_type, n))
            rows.append((n + 1, event.event_id, "FOO", event_type, event.member_id, event.start_us, event.end_us,
                         event.doc, event.content_hash, updated_us, updated_us))
        with eventstore_sqlite.write_transaction(conn):
            conn.executemany("INSERT INTO events (seq, event_id, program_id, event_type, member_id, start_us, end_us,"
                             " doc, content_hash, revision, created_us, updated_us)"
                             " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)", rows)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    session.close()


def during(load, seconds, action, settle=1.0):
    """Run ``load()`` (a wrk run of ``seconds``) in a thread; ``settle`` s after it
    starts, time ``action()`` -> (the action's seconds, its result, the load's
    outcome, the share of the load's run the action ran in: the load's p99 is
    over its whole run, so this says how much of it the action's)."""
    loaded = common.in_thread(load)
    time.sleep(settle)
    started = time.monotonic()
    result = action()
    took = time.monotonic() - started
    try:
        outcome = loaded()
    except BaseException as exc:  # wrk's errors end in SystemExit
        raise SystemExit(f"the load beside the action failed (the action took {took:.2f} s): {exc}") from exc
    return took, result, outcome, min(took, seconds - settle) / seconds


def prove_figure(folder, events, seconds):
    """16: PUT /event-types/Proved with the schema over ``events`` live events, GETs meanwhile."""
    path = folder / "prove.db"
    common.say(f"16: building {events:,} live events ...")
    build(path, events, "Proved", eventstore.now_us())
    server = common.Server(path)
    try:
        get_lua = common.GET_LUA.replace("FOO-g-", "FOO-e") % {"auth": auth_of(server), "count": events - 1}
        common.wrk(server.port, get_lua, 2)  # warm
        alone = common.wrk(server.port, get_lua, seconds)
        common.say("16: proving the schema on them, GETs meanwhile ...")

        def prove():
            status, _, answer = server.request("PUT", "/event-types/Proved", {"Description": "Proved.",
                                                                              "Schema": SCHEMA},
                                               user="admin", key=server.admin_key, timeout=120)
            assert status == 200 and answer["SchemaVersion"] == 1, (status, answer)
        took, _, loaded, share = during(lambda: common.wrk(server.port, get_lua, seconds), seconds, prove)
    finally:
        server.stop()
    return took, loaded[2], alone[2], share


def sweep_figure(folder, events, seconds):
    """17: RetainDays on ``events`` events ten days old, PUTs of another type meanwhile."""
    path = folder / "sweep.db"
    common.say(f"17: building {events:,} events ten days old ...")
    build(path, events, "Expiring", eventstore.now_us() - 10 * 86_400_000_000)
    server = common.Server(path, "--retention-interval", "1")
    try:
        put_lua = common.PUT_LUA % {"auth": auth_of(server), "body": json.dumps(body("Other"))}
        common.wrk(server.port, put_lua, 2, args=["warm"])
        alone = common.wrk(server.port, put_lua, seconds, args=["alone"])
        common.say("17: sweeping them, PUTs meanwhile ...")

        def sweep():
            status, _, _ = server.request("PUT", "/event-types/Expiring", {"Description": "Expiring.", "RetainDays": 1},
                                          user="admin", key=server.admin_key)
            assert status == 200, status
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                _, _, health = server.request("GET", "/health")
                if (health["retention"]["erased"] or 0) >= events:
                    return health["retention"]["erased"]
                time.sleep(0.1)
            raise RuntimeError("the sweep did not finish within 120 s")
        took, _, loaded, share = during(lambda: common.wrk(server.port, put_lua, seconds, args=["during"]), seconds,
                                        sweep)
    finally:
        server.stop()
    return took, loaded[2], alone[2], share


def main(events=100_000, seconds=10):
    folder = Path(tempfile.mkdtemp(prefix="eventstore-bench-schemas-"))
    common.say("15: PUT of a type with a 20-property schema and of one without ...")
    put_ratio, puts = put_figure(folder, max(3, seconds // 2))
    proved, get_p99, get_p99_alone, proof_share = prove_figure(folder, events, max(seconds, 15))
    swept, put_p99, put_p99_alone, sweep_share = sweep_figure(folder, events, max(seconds, 15))
    figures = {"15. PUT, 20-property schema vs none": put_ratio, "16. proving 100,000 events, s": proved,
               "16. GET p99 while proving, ms": get_p99, "17. sweeping 100,000 expired, s": swept,
               "17. PUT p99 while sweeping, ms": put_p99}
    print(f"\nissue 33, type schemas and retention ({events:,} events; wrk -t1 -c16; 15: the median ratio of "
          f"8 pairs of {max(3, seconds // 2)} s runs)")
    for name, value in figures.items():
        target = TARGETS[name]
        verdict = "" if target is None else f"{target[0]} {target[1]:<6} " + (
            "met" if {">=": value >= target[1], "<=": value <= target[1], "<": value < target[1]}[target[0]]
            else "NOT MET")
        print(f"{name:40} {value:9.2f}  {verdict}")
    print(f"PUT {puts['Checked']:,.0f} req/s with the schema, {puts['Free']:,.0f} without; GET p99 {get_p99_alone:.1f} ms "
          f"without a proof running; PUT p99 {put_p99_alone:.1f} ms without a sweep running; the proof ran during "
          f"{proof_share:.0%} of its GET run, the sweep during {sweep_share:.0%} of its PUT run")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=100_000, help="live events proved, and expired events swept")
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run (default 10)")
    options = parser.parse_args()
    main(options.events, options.seconds)
