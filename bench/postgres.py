"""Issue 11: the PostgreSQL backend against SQLite, in the same run, on this box.

A throwaway PostgreSQL cluster (Debian's server binaries, tests/pg_cluster.py)
with fsync ON (a benchmark never turns it off), default settings otherwise.

  P1. single PUT req/s, one server (1 process) on PostgreSQL / the same on SQLite:
      both servers up at once, measured in alternation, the median of 3 rounds'
      ratios (this machine drifts by more than some of the differences)
  P2. GET /events/{id} req/s, same / same
  P3. POST /events (1,000 events a request) events/s, same / same (one round)
  P1'-P3'. the same with 2 processes a server (serve.py's default on this 2-core
      machine; the PostgreSQL server's backends share those 2 cores)
  P4. PUT and GET req/s with two servers on one PostgreSQL database (wrk on each at
      once, 8 connections each) / one server (P1, P2)
  P5. pulling N events through Next (limit=1000) on PostgreSQL / a raw keyset
      SELECT of the same rows on the same table, serialized with json.dumps
  P6. cross-server long-poll wake-up: ms from a PUT sent to one server to the
      answer of a long poll waiting in the other (p50/p99)
  P7. missed changes: 8 publishers on two servers for 60 s (--soak), a follower on
      each following Next all the while: changes acknowledged but never served, and
      Sequences served out of order (both must be 0)

``python bench/postgres.py [--events N] [--seconds S] [--soak S]`` runs it alone;
``make bench`` runs it last.
"""

import argparse
import base64
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (bench/common.py: wrk, Server, event_body, rounds in turn, percentile)
import eventstore  # noqa: E402
import eventstore_storage  # noqa: E402
from tests.pg_cluster import Cluster  # noqa: E402

TARGETS = {"P1. PUT, PostgreSQL vs SQLite": 0.7, "P2. GET, PostgreSQL vs SQLite": 0.8,
           "P1'. PUT, PG vs SQLite, 2 processes": 0.7, "P2'. GET, PG vs SQLite, 2 processes": 0.8,
           "P5. pull via Next vs keyset SELECT (PG)": 0.35}
WAKE_TARGET_MS = 100.0


def auth_of(key, user="admin"):
    return "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()


def prepare(server):
    """FOO, and 10,000 events to GET -> the wrk scripts' (PUT, GET) for this server."""
    key = server.admin_key
    server.request("PUT", "/programs/FOO", {"Name": "Foo"}, user="admin", key=key)
    for start in range(1, 10_001, 1000):
        body = json.dumps({"Events": [{"EventId": f"FOO-g-{n}", **common.event_body(n)}
                                      for n in range(start, start + 1000)]}).encode()
        assert server.request("POST", "/events", body, user="admin", key=key,
                              headers={"Content-Type": "application/json"})[0] == 200
    auth = auth_of(key)
    return (common.PUT_LUA % {"auth": auth, "body": json.dumps(common.event_body(1))},
            common.GET_LUA % {"auth": auth, "count": 10_000})


def post_rate(server, seconds, tag):
    """POST /events, 1,000 events a request, one client -> events/s."""
    started, posted = time.perf_counter(), 0
    while time.perf_counter() - started < seconds:
        body = json.dumps({"Events": [{"EventId": f"FOO-b{tag}-{posted + n}", **common.event_body(n)}
                                      for n in range(1000)]}).encode()
        assert server.request("POST", "/events", body, user="admin", key=server.admin_key,
                              headers={"Content-Type": "application/json"})[0] == 200
        posted += 1000
    return posted / (time.perf_counter() - started)


def backend_figures(sqlite_path, pg_url, processes, seconds, rounds=3):
    """One server on each backend, both up at once, measured in alternation
    (this machine drifts by more than some of the differences): -> per backend
    the median PUT and GET req/s and p99 over ``rounds``, and POST events/s, and
    the median of the rounds' PostgreSQL/SQLite ratios."""
    servers = {"sqlite": common.Server(sqlite_path, "--processes", str(processes)),
               "postgresql": common.Server(pg_url, "--processes", str(processes))}
    try:
        scripts = {name: prepare(server) for name, server in servers.items()}
        for name, server in servers.items():
            common.wrk(server.port, scripts[name][0], 2, args=[f"warm{processes}"])
        runs = common.alternating({
            (name, kind): lambda n, name=name, script=scripts[name][script_index]: common.wrk(
                servers[name].port, script, seconds, args=[f"r{processes}-{n}"], timeouts_allowed=True)
            for kind, script_index in (("put", 0), ("get", 1)) for name in servers}, rounds)
        figures = {name: {kind: statistics.median(run[0] for run in runs[name, kind]) for kind in ("put", "get")}
                   for name in servers}
        for name in servers:
            figures[name].update({f"{kind}_p99": statistics.median(run[2] for run in runs[name, kind])
                                  for kind in ("put", "get")})
            figures[name]["post"] = post_rate(servers[name], seconds, f"{name}{processes}")
        ratios = {kind: statistics.median(pg[0] / lite[0] for pg, lite in zip(runs["postgresql", kind],
                                                                              runs["sqlite", kind]))
                  for kind in ("put", "get")}
        ratios["post"] = figures["postgresql"]["post"] / figures["sqlite"]["post"]
        return figures, ratios, servers["postgresql"].admin_key
    finally:
        for server in servers.values():
            server.stop()


def two_server_figures(url, key, seconds):
    """PUT, then GET, through two servers on one database at once -> summed req/s."""
    servers = [common.Server(url, "--processes", "1"), common.Server(url, "--processes", "1")]
    try:
        auth = auth_of(key)
        put_lua = common.PUT_LUA % {"auth": auth, "body": json.dumps(common.event_body(1))}
        get_lua = common.GET_LUA % {"auth": auth, "count": 10_000}
        rates = {}
        for name, lua in (("put", put_lua), ("get", get_lua)):
            loads = [common.in_thread(common.wrk, servers[i].port, lua, seconds, 8, [f"two{name}{i}"])
                     for i in range(2)]
            rates[name] = sum(load()[0] for load in loads)
        return rates
    finally:
        for server in servers:
            server.stop()


def pull_figures(cluster, events):
    """Fill a database with ``events`` rows (raw COPY-like inserts), then pull it
    through Next and with a raw keyset SELECT -> (pull events/s, raw events/s)."""
    import psycopg
    url = cluster.new_database()
    storage = eventstore.open_storage(url)
    session = storage.session()
    with session.transaction(eventstore.now_us()) as tx:
        tx.put_program("FOO", "Foo")
        key = eventstore.add_user(tx, "bench", True, {})
    for start in range(0, events, 50_000):
        count = min(50_000, events - start)
        with session.transaction(eventstore.now_us(), seqs=count) as tx:
            tx.insert_events([(eventstore.validate_event(f"FOO-e{n}", common.event_body(n)), tx.take_seq())
                              for n in range(start, start + count)])
    session.close()
    storage.close()
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE events")
    server = common.Server(url)
    try:
        pulled, pull_rate = common.pull_through_next(server.port, "bench", key)
    finally:
        server.stop()
    assert pulled == events, pulled
    with psycopg.connect(url, autocommit=True) as conn:
        raw_rate = common.keyset_pull(lambda after_seq: conn.execute(
            f"SELECT {eventstore_storage.EVENT_COLUMNS} FROM events WHERE seq > %s ORDER BY seq LIMIT 1000",
            (after_seq,)).fetchall())
    return pull_rate, raw_rate


def soak(url, seconds, publishers=8):
    """-> (acknowledged changes, missed, out of order, changes served per follower)."""
    servers = [common.Server(url), common.Server(url)]
    key = servers[0].admin_key
    servers[0].register("FOO")
    acknowledged, lock, stop = {}, threading.Lock(), threading.Event()
    seen = [[], []]

    def publish(w):
        server, n = servers[w % 2], 0
        while not stop.is_set():
            event_id = f"FOO-s{w}-{n % 50}"
            status, headers, _ = server.request("PUT", f"/events/{event_id}", common.event_body(n), user="admin",
                                                key=key)
            if status == 200:
                with lock:
                    acknowledged[event_id] = max(acknowledged.get(event_id, 0), int(headers["etag"].strip('"')))
            n += 1

    def follow(i, done):
        url_path = "/events?limit=500"
        while True:
            caught_up = done.is_set()
            page = servers[i].request("GET", url_path, user="admin", key=key)[2]
            seen[i].extend((e["Sequence"], e["EventId"], e["Revision"]) for e in page["Events"])
            url_path = page["Next"] + ("" if page["HasMore"] or done.is_set() else "&wait=1")  # as followers do
            if caught_up and not page["HasMore"]:
                return

    done = threading.Event()
    followers = [common.in_thread(follow, i, done) for i in range(2)]
    writers = [common.in_thread(publish, w) for w in range(publishers)]
    time.sleep(seconds)
    stop.set()
    try:  # a publisher or follower that died fails the soak: it would only have lightened it
        for wait in writers:
            wait()
    finally:
        done.set()
        try:
            for wait in followers:
                wait()
        finally:
            for server in servers:
                server.stop()
    if not acknowledged:
        raise SystemExit("P7: no event acknowledged")
    missed = out_of_order = 0
    for served in seen:
        sequences = [s for s, _, _ in served]
        out_of_order += sum(1 for a, b in zip(sequences, sequences[1:]) if b <= a)
        last = {}
        for _, event_id, revision in served:
            last[event_id] = max(last.get(event_id, 0), revision)
        missed += sum(1 for event_id, revision in acknowledged.items() if last.get(event_id, 0) < revision)
    return sum(acknowledged.values()), missed, out_of_order, [len(served) for served in seen]


def main(events=1_000_000, seconds=10, soak_seconds=60):
    folder = Path(tempfile.mkdtemp(prefix="eventstore-bench-pg-"))
    cluster = Cluster.start(fsync=True)
    if cluster is None:
        raise SystemExit("PostgreSQL's server binaries are not installed: no PostgreSQL figures")
    try:
        common.say("P1-P3: one server on each backend, 1 process, measured in alternation ...")
        url = cluster.new_database()
        one, one_ratios, key = backend_figures(folder / "one.db", url, 1, seconds)
        common.say("P1-P3 again with 2 processes a server (serve.py's default on this machine) ...")
        two_procs, two_ratios, _ = backend_figures(folder / "two.db", cluster.new_database(), 2, seconds)
        common.say("P4: two servers on one PostgreSQL database ...")
        two = two_server_figures(url, key, seconds)
        common.say(f"P5: pulling {events:,} events through Next on PostgreSQL ...")
        pull, raw = pull_figures(cluster, events)
        common.say("P6: cross-server long-poll wake-up ...")
        wakes = common.wake_up_latencies(cluster.new_database())
        common.say(f"P7: {soak_seconds} s, 8 publishers on two servers, a follower on each ...")
        changes, missed, out_of_order, served = soak(cluster.new_database(), soak_seconds)
    finally:
        cluster.stop()
    on_pg, on_sqlite = one["postgresql"], one["sqlite"]
    figures = {"P1. PUT, PostgreSQL vs SQLite": one_ratios["put"],
               "P2. GET, PostgreSQL vs SQLite": one_ratios["get"],
               "P3. POST batch, PostgreSQL vs SQLite": one_ratios["post"],
               "P1'. PUT, PG vs SQLite, 2 processes": two_ratios["put"],
               "P2'. GET, PG vs SQLite, 2 processes": two_ratios["get"],
               "P3'. POST, PG vs SQLite, 2 processes": two_ratios["post"],
               "P4. PUT, 2 servers vs 1 (PostgreSQL)": two["put"] / on_pg["put"],
               "P4. GET, 2 servers vs 1 (PostgreSQL)": two["get"] / on_pg["get"],
               "P5. pull via Next vs keyset SELECT (PG)": pull / raw}
    print(f"\nissue 11, PostgreSQL (fsync on; wrk -t1 -c16 -d{seconds}s; P1-P3: medians of 3 alternating rounds, "
          f"1 process a server, P1'-P3' 2; {events:,} events for P5)")
    for name, value in figures.items():
        target = TARGETS.get(name)
        verdict = f">= {target:<5} {'met' if value >= target else 'NOT MET'}" if target else ""
        print(f"{name:40} {value:7.2f}  {verdict}")
    p50, p99 = common.percentile(wakes, 50), common.percentile(wakes, 99)
    print(f"{'P6. cross-server long-poll wake-up (ms)':40} p50 {p50:.1f}, p99 {p99:.1f}  "
          f"p99 < {WAKE_TARGET_MS:g} {'met' if p99 < WAKE_TARGET_MS else 'NOT MET'}")
    print(f"{'P7. missed / out of order':40} {missed} / {out_of_order} of {changes:,} acknowledged changes "
          f"(followers served {served[0]:,} and {served[1]:,})  0 {'met' if missed == out_of_order == 0 else 'NOT MET'}")
    print(f"SQLite: PUT {on_sqlite['put']:,.0f} req/s (p99 {on_sqlite['put_p99']:.1f} ms), GET {on_sqlite['get']:,.0f},"
          f" POST {on_sqlite['post']:,.0f} events/s; PostgreSQL: PUT {on_pg['put']:,.0f} req/s (p99 "
          f"{on_pg['put_p99']:.1f} ms), GET {on_pg['get']:,.0f}, POST {on_pg['post']:,.0f} events/s; "
          f"at 2 processes SQLite PUT {two_procs['sqlite']['put']:,.0f}, GET {two_procs['sqlite']['get']:,.0f}, "
          f"PostgreSQL PUT {two_procs['postgresql']['put']:,.0f}, GET {two_procs['postgresql']['get']:,.0f} req/s; "
          f"two servers: PUT {two['put']:,.0f}, GET {two['get']:,.0f} req/s; pull {pull:,.0f} vs raw {raw:,.0f} events/s")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="events pulled for P5 (default 1,000,000)")
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run (default 10)")
    parser.add_argument("--soak", type=int, default=60, help="length of P7's run (default 60)")
    options = parser.parse_args()
    main(options.events, options.seconds, options.soak)
