"""``make bench``: eventstore's speed and memory, each figure a ratio to a baseline
measured in the same run on the same machine.

Issue 3:
  1. single PUT, new ids, 16 connections, authenticated, durable, events/s
     / a WSGI app that only reads the body and answers 200 (same waitress settings)
  2. GET /events/{id} req/s / the same baseline app answering the same GETs
  3. POST /events, 1,000 events a request, events/s
     / raw sqlite3 executemany of the same rows in 1,000-row synchronous=FULL transactions
  4. pulling the whole database through Next with limit=1000, events/s
     / raw keyset SELECT of the same rows serialized with json.dumps
  5. PUT events/s with the database full / PUT events/s on an empty database
  6. server RSS after 100,000 requests / before them
  7. server RSS after 50,000 requests without credentials (401s) / before them
  8. eventstore_client.py follow --until-caught-up of the full database to /dev/null
     / figure 4's pull through Next
Issue 14 (bench/feed.py, printed last): a feed page at 1,000 programs / the same page
at 1 program, and a commit's CPU with 8 long polls it cannot match / with none.
Figures 1, 2, 4, 8, 9, 10 and 11: the median of 3 rounds' ratios, the runs compared taking turns.
Issue 10 (serve.py --processes):
  9. GET /events/{id} at --processes 2 / the baseline app served by 2 processes
 10. GET at --processes 2 / GET at --processes 1 (figure 2's server, in figure 9's rounds)
 11. PUT at --processes 2 / the baseline at 1 process (figure 1's), and its p99
 12. cross-process long-poll wake-up: ms from a PUT sent to one process to the
     answer of a long poll waiting in another (p50/p99)
  plus p50/p99 latency of 1 and 2.
Issue 12 (bench/event_types.py, printed after issue 14's):
 13. GET /event-types on a 1,000,000-event database / GET /programs, same server
 14. single PUT with the event-type counts kept / without them (triggers dropped)
Issue 11 (bench/postgres.py, printed last): PostgreSQL against SQLite, P1-P7.
Issue 4:
  export and import events/s / raw sqlite3 read and executemany of the same rows,
  and the exporter's peak RSS.

The load generator is wrk (Debian's package; the Makefile installs it).
``python bench/run.py --events 100000`` runs a smaller database.
"""

import argparse
import base64
import threading
import http.client
import json
import os
import re
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import eventstore  # noqa: E402
import eventstore_storage
import eventstore_sqlite
import feed  # noqa: E402  (bench/feed.py)
from server import Server, free_port  # noqa: E402

PYTHON = sys.executable
TARGETS = {  # figure -> (lowest acceptable ratio, or highest for RSS growth)
    "1. PUT vs baseline app": (">=", 0.5),
    "2. GET vs baseline app": (">=", 0.6),
    "3. POST batch vs executemany": (">=", 0.5),
    "4. pull via Next vs keyset SELECT": (">=", 0.35),
    "5. PUT full vs PUT empty": (">=", 0.8),
    "6. RSS after/before 100k requests": ("<", 1.10),
    "7. RSS after/before 50k 401s": ("<", 1.10),
    "8. client follow vs pull via Next": (">=", 0.7),
    "9. GET, 2 processes vs baseline at 2": (">=", 0.6),
    "10. GET, 2 processes vs 1 process": (">=", 2.0),
    "11. PUT, 2 processes vs baseline at 1": (">=", 0.5),
}
LATENCY_TARGETS = {  # (p99 in ms, at most)
    "11. PUT, 2 processes": 25.0,
    "12. cross-process long-poll wake-up": 100.0,
}

NO_AUTH_LUA = """
function request() return wrk.format("GET", "/events") end
"""

PUT_LUA = """
local counter = 0
local threads = 0
function setup(thread) threads = threads + 1; thread:set("tid", threads) end
function init(args) run = args[1] end
wrk.method = "PUT"
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "%(auth)s"
wrk.body = '%(body)s'
function request()
  counter = counter + 1
  return wrk.format(nil, "/events/FOO-" .. run .. "-" .. tid .. "-" .. counter)
end
"""

GET_LUA = """
wrk.headers["Authorization"] = "%(auth)s"
function request()
  return wrk.format("GET", "/events/FOO-g-" .. math.random(1, %(count)d))
end
"""


def event_body(n):
    return {"ProgramId": "FOO", "ProgramMemberId": f"member{n % 5000}@example.com",
            "EventType": ("CourseCompleted", "CourseStarted", "CreditEarned")[n % 3],
            "EventStartUTC": "2026-03-01T09:30:00Z", "EventEndUTC": "2026-03-01T11:00:00.250000Z",
            "EventData": {"course": f"CPR-{n % 300}", "score": n % 100, "passed": True}}


# --- measuring ------------------------------------------------------------------------

def wrk(port, lua, seconds, connections=16, args=(), expect_errors=False, timeouts_allowed=False):
    """-> (requests/s, p50 ms, p99 ms, total requests, wrk's own CPU seconds per
    request); fails on any non-2xx (unless ``expect_errors``) and on any socket
    error (but requests that took over wrk's 2 s, with ``timeouts_allowed``: they
    are said, and count in p99)."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(lua)
    try:
        result = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", script.name,
             f"http://127.0.0.1:{port}", "--", *args], capture_output=True, text=True, check=True)
    finally:
        os.unlink(script.name)
    out = result.stdout
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors and timeouts_allowed and not any(map(int, socket_errors.groups()[:3])):
        say(f"note: {socket_errors.group(4)} requests took over 2 s (wrk's timeout) in this run")
    elif socket_errors or ("Non-2xx" in out and not expect_errors):
        raise SystemExit(f"wrk saw errors:\n{out}")

    def latency(percent):
        value, unit = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]

    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk has been waited for: its time is in
    wrk_cpu = sum(getattr(cpu_after, f) - getattr(cpu_before, f) for f in ("ru_utime", "ru_stime"))
    return rate, latency(50), latency(99), total, wrk_cpu / max(total, 1)


ROUNDS = 3


def alternating(runs, rounds=ROUNDS):
    """{name: run(round)} -> {name: [its results]}: every run once a round, in
    turn, ``rounds`` rounds, the order reversed every other round (so that
    neither the machine's drift nor coming first falls on one side only)."""
    results = {name: [] for name in runs}
    for round_number in range(rounds):
        order = list(runs) if round_number % 2 == 0 else list(runs)[::-1]
        for name in order:
            results[name].append(runs[name](round_number))
    return results


def median_pair(results, ours, base):
    """-> (our rate, the base's rate) whose ratio is the median of the rounds'
    ratios (the pair of the round that gave it)."""
    pairs = sorted(zip(results[ours], results[base]), key=lambda pair: pair[0][0] / pair[1][0])
    middle = pairs[len(pairs) // 2]
    return middle[0][0], middle[1][0]


def median_run(runs):
    """The wrk result with the median rate."""
    return sorted(runs, key=lambda result: result[0])[len(runs) // 2]


def cpu_seconds(pid):
    """CPU seconds (user + system) process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


# Runs the command from a small process, so that its peak RSS is its own and not
# that of this (large) process it would otherwise be forked from.
PEAK_RSS_WRAPPER = ("import resource, subprocess, sys; code = subprocess.call(sys.argv[1:]);"
                    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(code)")


def timed_child(argv, stdout=subprocess.DEVNULL):
    """Run a command; -> (seconds, peak RSS in MB) of that command alone."""
    started = time.perf_counter()
    result = subprocess.run([PYTHON, "-c", PEAK_RSS_WRAPPER, *argv], stdout=stdout, stderr=subprocess.PIPE, cwd=ROOT)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{argv} failed: {result.stderr.decode()}")
    return elapsed, int(result.stderr.decode().split()[-1]) / 1024


class Baseline:
    def __init__(self, processes=1):
        self.port = free_port()
        self.process = subprocess.Popen([PYTHON, str(ROOT / "bench" / "baseline_server.py"), "--port",
                                         str(self.port), "--processes", str(processes)], stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", "/")
                connection.getresponse().read()
                return
            except OSError:
                time.sleep(0.05)

    def stop(self):
        self.process.terminate()
        self.process.wait()


def wake_up_latencies(db, samples=60):
    """Cross-process long-poll wake-up: a long poll waiting in one server process,
    a PUT through another on the same database (a SQLite file, or a PostgreSQL
    URL: two servers); -> sorted ms from sending the PUT to the poll's answer."""
    first = Server(db)
    second = Server(db)
    key = first.admin_key
    first.request("PUT", "/programs/FOO", {"Name": "Foo"}, user="admin", key=key)
    latencies = []
    try:
        for n in range(samples):
            after = first.request("GET", "/events?limit=1000", user="admin", key=key)[2]["Next"].split("after=")[1]
            answered = {}

            def poll():
                answered["page"] = first.request("GET", f"/events?wait=10&after={after}", user="admin", key=key)[2]
                answered["at"] = time.perf_counter()

            poller = threading.Thread(target=poll)
            poller.start()
            deadline = time.monotonic() + 10
            while first.request("GET", "/health")[2]["longPolls"] != 1:
                if time.monotonic() > deadline:
                    raise SystemExit("the long poll did not start waiting")
                time.sleep(0.005)
            sent = time.perf_counter()
            second.request("PUT", f"/events/FOO-{n}", event_body(n), user="admin", key=key)
            poller.join(15)
            if not answered.get("page", {}).get("Events"):
                raise SystemExit("a long poll was not woken by the other process's commit")
            latencies.append((answered["at"] - sent) * 1000)
    finally:
        first.stop()
        second.stop()
    return sorted(latencies)


def pull_through_next(port, user, key):
    """Follow Next from the start with limit=1000 on one keep-alive connection
    -> (events pulled, events/s)."""
    auth = {"Authorization": "Basic " + base64.b64encode(f"{user}:{key}".encode()).decode()}
    connection = http.client.HTTPConnection("127.0.0.1", port)
    url, pulled = "/events?limit=1000", 0
    started = time.perf_counter()
    while True:
        connection.request("GET", url, headers=auth)
        body = connection.getresponse().read()
        pulled += body.count(b'"EventId":')
        tail = json.loads(body[body.rindex(b',"Next":') + 1:].join((b"{", b"")))
        url = tail["Next"]
        if not tail["HasMore"]:
            break
    rate = pulled / (time.perf_counter() - started)
    connection.close()
    return pulled, rate


def keyset_pull(fetch_page):
    """The raw read a pull through Next is measured against: pages of 1,000 rows
    in Sequence order, ``fetch_page(after_seq)`` -> rows (Sequence first), each
    page serialized with json.dumps -> events/s."""
    started, after_seq, selected = time.perf_counter(), 0, 0
    while True:
        page = fetch_page(after_seq)
        if not page:
            break
        json.dumps(page)
        selected += len(page)
        after_seq = page[-1][0]
    return selected / (time.perf_counter() - started)


def percentile(values, percent):
    return values[min(len(values) - 1, int(len(values) * percent / 100))]


# --- building databases -------------------------------------------------------------

def rows_for(count, start=0):
    """Event rows exactly as the app stores them (validated, normalized, hashed)."""
    for n in range(start, start + count):
        event = eventstore.validate_event(f"FOO-e{n}", event_body(n))
        yield (event.event_id, event.program_id, event.event_type, event.member_id, event.start_us,
               event.end_us, event.doc, event.ref_event_id, event.content_hash)


INSERT = ("INSERT INTO events (seq, event_id, program_id, event_type, member_id, start_us, end_us, doc,"
          " ref_event_id, content_hash, deleted, revision, created_us, updated_us)"
          " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 1, ?, ?)")


def insert_rows(conn, rows, first_seq, batch):
    """Raw executemany in ``batch``-row synchronous=FULL transactions."""
    now = eventstore.now_us()
    seq = first_seq
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT, [(seq + i, *row, now, now) for i, row in enumerate(chunk)])
        conn.execute("COMMIT")
        seq += len(chunk)


def fresh_database(path):
    session = eventstore_sqlite.SQLiteStorage(path).session()
    with session.transaction(eventstore.now_us()) as tx:
        tx.put_program("FOO", "Foo")
    return session.conn


def say(text):
    print(text, file=sys.stderr, flush=True)


# --- the figures ----------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="size of the full database (default 1,000,000)")
    parser.add_argument("--seconds", type=int, default=10, help="length of each wrk run (default 10)")
    options = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="eventstore-bench-"))
    figures, notes = {}, []

    def ratio(name, ours, base, unit):
        figures[name] = ours / base
        notes.append(f"{name}: {ours:,.0f} vs {base:,.0f} {unit}")

    # 1, 2: single requests against the baseline app.
    say("1-2: PUT and GET, eventstore vs baseline app ...")
    baseline = Baseline()
    server = Server(workdir / "empty.db")
    auth = "Basic " + base64.b64encode(f"admin:{server.admin_key}".encode()).decode()
    server.request("PUT", "/programs/FOO", {"Name": "Foo"}, user="admin", key=server.admin_key)
    put_lua = PUT_LUA % {"auth": auth, "body": json.dumps(event_body(1))}
    get_count = 10_000
    batch_bodies = [json.dumps({"Events": [{"EventId": f"FOO-g-{n}", **event_body(n)}
                                           for n in range(start, start + 1000)]}).encode()
                    for start in range(1, get_count + 1, 1000)]
    for body in batch_bodies:
        assert server.request("POST", "/events", body, user="admin", key=server.admin_key,
                              headers={"Content-Type": "application/json"})[0] == 200
    get_lua = GET_LUA % {"auth": auth, "count": get_count}
    wrk(server.port, put_lua, 2, args=["warm"])
    # Each figure is the median of ROUNDS rounds' ratios, the runs it compares taking
    # turns, so that this machine's drift (of the order of the differences measured)
    # falls on both sides of a ratio alike.
    server_cpu, get_requests = 0.0, 0  # the server's CPU in our GET runs, and their requests

    def ours_get_run(seconds):
        nonlocal server_cpu, get_requests
        before = cpu_seconds(server.process.pid)
        result = wrk(server.port, get_lua, seconds)
        server_cpu, get_requests = server_cpu + cpu_seconds(server.process.pid) - before, get_requests + result[3]
        return result

    one = alternating({
        "base_put": lambda r: wrk(baseline.port, put_lua, options.seconds, args=[f"b{r}"]),
        "put_empty": lambda r: wrk(server.port, put_lua, options.seconds, args=[f"empty{r}"]),
        "base_get": lambda r: wrk(baseline.port, get_lua, options.seconds),
        "ours_get": lambda r: ours_get_run(options.seconds)})
    get_cpu = server_cpu / get_requests  # the server's CPU a GET
    ratio("1. PUT vs baseline app", *median_pair(one, "put_empty", "base_put"), "req/s")
    ratio("2. GET vs baseline app", *median_pair(one, "ours_get", "base_get"), "req/s")
    put_empty, base_put, ours_get = (median_run(one[name]) for name in ("put_empty", "base_put", "ours_get"))
    latencies = {"1. PUT": put_empty[1:3], "1. baseline PUT": base_put[1:3],
                 "2. GET": ours_get[1:3], "2. baseline GET": median_run(one["base_get"])[1:3]}

    # Issue 10: the same PUTs and GETs with 2 worker processes, against the
    # baseline app served by 2 processes the same way (and PUT against the
    # baseline at 1 process, still up, in the same rounds).
    say("9-11: PUT and GET at --processes 2, and the baseline at 2 ...")
    two = Server(workdir / "empty.db", processes=2)
    baseline2 = Baseline(processes=2)
    wrk(two.port, put_lua, 2, args=["warm2"])
    both = alternating({
        "base_get2": lambda r: wrk(baseline2.port, get_lua, options.seconds),
        "get2": lambda r: wrk(two.port, get_lua, options.seconds),
        "get1": lambda r: wrk(server.port, get_lua, options.seconds),  # figure 10 in the same rounds
        "base_put": lambda r: wrk(baseline.port, put_lua, options.seconds, args=[f"b1{r}"]),
        "put2": lambda r: wrk(two.port, put_lua, options.seconds, args=[f"two{r}"]),
        "base_put2": lambda r: wrk(baseline2.port, put_lua, options.seconds, args=[f"b2{r}"])})
    baseline.stop()
    baseline2.stop()
    two.stop()
    get2, put2, base_put2, base_get2 = (median_run(both[name]) for name in ("get2", "put2", "base_put2", "base_get2"))
    ratio("9. GET, 2 processes vs baseline at 2", *median_pair(both, "get2", "base_get2"), "req/s")
    ratio("10. GET, 2 processes vs 1 process", *median_pair(both, "get2", "get1"), "req/s")
    # What figure 10 can reach on this machine: one process is bound by its one
    # core (s CPU seconds a GET); two need s of the server's and w of wrk's CPU a
    # GET out of the machine's cores, so the ratio is at most cores * s / (s + w).
    cores = len(os.sched_getaffinity(0))
    notes.append(f"10. at most {min(2.0, cores * get_cpu / (get_cpu + get2[4])):.2f} on this machine: "
                 f"{cores} cores, the server's CPU a GET at 1 process {get_cpu * 1e6:.0f} us, "
                 f"wrk's {get2[4] * 1e6:.0f} us")
    ratio("11. PUT, 2 processes vs baseline at 1", *median_pair(both, "put2", "base_put"), "req/s")
    notes.append(f"baseline PUT at 2 processes: {base_put2[0]:,.0f} req/s; "
                 f"PUT at 2 processes vs baseline at 2: {put2[0] / base_put2[0]:.2f}")
    latencies.update({"9. GET, 2 processes": get2[1:3], "11. PUT, 2 processes": put2[1:3],
                      "9. baseline GET, 2": base_get2[1:3]})
    say("12: cross-process long-poll wake-up ...")
    wakes = wake_up_latencies(workdir / "wake.db")
    latencies["12. cross-process long-poll wake-up"] = (percentile(wakes, 50), percentile(wakes, 99))

    # 6: RSS over 100,000 requests on the same server (it has served ~warm-up already).
    say("6: RSS over 100,000 requests ...")
    before = rss_mb(server.process.pid)
    served = 0
    while served < 100_000:
        served += wrk(server.port, get_lua, 5)[3]
        served += wrk(server.port, put_lua, 3, args=[f"rss{served}"])[3]
    after = rss_mb(server.process.pid)
    figures["6. RSS after/before 100k requests"] = after / before
    notes.append(f"6. RSS: {before:.1f} MB before, {after:.1f} MB after {served:,} requests")

    # 7: RSS over 50,000 requests without credentials (each a 401; it once leaked ~6.5 KB a 401).
    say("7: RSS over 50,000 401s ...")
    wrk(server.port, NO_AUTH_LUA, 2, expect_errors=True)
    before = rss_mb(server.process.pid)
    refused = 0
    while refused < 50_000:
        refused += wrk(server.port, NO_AUTH_LUA, 5, expect_errors=True)[3]
    after = rss_mb(server.process.pid)
    figures["7. RSS after/before 50k 401s"] = after / before
    notes.append(f"7. RSS: {before:.1f} MB before, {after:.1f} MB after {refused:,} requests answered 401")
    server.stop()

    # 3: batches of 1,000 against raw executemany of the same rows.
    say("3: POST /events batches vs executemany ...")
    batches = 50
    server = Server(workdir / "batch.db")
    server.request("PUT", "/programs/FOO", {"Name": "Foo"}, user="admin", key=server.admin_key)
    bodies = [json.dumps({"Events": [{"EventId": f"FOO-e{n}", **event_body(n)}
                                     for n in range(start, start + 1000)]}).encode()
              for start in range(0, batches * 1000, 1000)]
    connection = http.client.HTTPConnection("127.0.0.1", server.port)
    batch_auth = "Basic " + base64.b64encode(f"admin:{server.admin_key}".encode()).decode()
    headers = {"Authorization": batch_auth, "Content-Type": "application/json"}
    started = time.perf_counter()
    for body in bodies:
        connection.request("POST", "/events", body, headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status
    post_rate = batches * 1000 / (time.perf_counter() - started)
    connection.close()
    server.stop()
    rows = list(rows_for(batches * 1000))
    conn = fresh_database(workdir / "raw-batch.db")
    started = time.perf_counter()
    insert_rows(conn, rows, 1, 1000)
    raw_rate = len(rows) / (time.perf_counter() - started)
    conn.close()
    ratio("3. POST batch vs executemany", post_rate, raw_rate, "events/s")

    # The full database, built with raw inserts (the same rows).
    say(f"building a {options.events:,}-event database ...")
    full = workdir / "full.db"
    conn = fresh_database(full)
    chunk = 100_000
    for start in range(0, options.events, chunk):
        insert_rows(conn, list(rows_for(min(chunk, options.events - start), start)), start + 1, 10_000)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    # 4: pull everything through Next against a raw keyset SELECT + json.dumps.
    say("4: pulling through Next vs keyset SELECT ...")
    server = Server(full)
    with eventstore_sqlite.write_transaction(conn):
        tx = eventstore_sqlite.SQLiteTransaction(conn, eventstore.now_us())
        key = eventstore.add_user(tx, "bench", True, {})
    def pull(_):
        pulled, rate = pull_through_next(server.port, "bench", key)
        assert pulled == options.events, pulled
        return (rate,)

    def raw(_):
        return (keyset_pull(lambda after_seq: conn.execute(
            f"SELECT {eventstore_storage.EVENT_COLUMNS} FROM events WHERE seq > ? ORDER BY seq LIMIT 1000",
            (after_seq,)).fetchall()),)

    # Issue 13: the client's follow, to /dev/null, against the server's own pull (figure 4).
    def follow(_):
        with open(os.devnull, "wb") as sink:
            started = time.perf_counter()
            subprocess.run([PYTHON, "eventstore_client.py", "--url", f"http://127.0.0.1:{server.port}",
                            "--user", "bench", "follow", "--until-caught-up"], stdout=sink, stderr=subprocess.DEVNULL,
                           env={**os.environ, "EVENTSTORE_KEY": key}, cwd=ROOT, check=True)
            return (options.events / (time.perf_counter() - started),)

    say(f"   and the client's follow --until-caught-up, in {ROUNDS} rounds taken in turn ...")
    pulls = alternating({"pull": pull, "raw": raw, "follow": follow})
    ratio("4. pull via Next vs keyset SELECT", *median_pair(pulls, "pull", "raw"), "events/s")
    ratio("8. client follow vs pull via Next", *median_pair(pulls, "follow", "pull"), "events/s")

    # 5: PUT with the database full against PUT on an empty one (figure 1's run).
    say("5: PUT on the full database ...")
    full_auth = "Basic " + base64.b64encode(f"bench:{key}".encode()).decode()
    put_full = wrk(server.port, PUT_LUA % {"auth": full_auth, "body": json.dumps(event_body(1))},
                   options.seconds, args=["full"])
    server.stop()
    ratio("5. PUT full vs PUT empty", put_full[0], put_empty[0], "req/s")
    latencies["5. PUT full"] = put_full[1:3]

    # Issue 4: export and import against raw reads and executemany.
    say("export and import ...")
    dump = workdir / "dump.jsonl"
    with open(dump, "wb") as out:
        export_time, export_rss = timed_child([PYTHON, "eventstore.py", "--db", str(full), "export"], stdout=out)
    started = time.perf_counter()
    read = sum(1 for _ in conn.execute(f"SELECT {eventstore_storage.EVENT_COLUMNS} FROM events ORDER BY seq"))
    raw_read = read / (time.perf_counter() - started)
    conn.close()
    fresh_database(workdir / "import.db").close()
    import_time, import_rss = timed_child([PYTHON, "eventstore.py", "--db", str(workdir / "import.db"),
                                           "import", str(dump)])
    raw = fresh_database(workdir / "raw-import.db")
    started = time.perf_counter()
    insert_rows(raw, list(rows_for(options.events)), 1, 5000)
    raw_import = options.events / (time.perf_counter() - started)
    raw.close()
    ratio("export vs raw read", options.events / export_time, raw_read, "events/s")
    ratio("import vs executemany", options.events / import_time, raw_import, "events/s")

    # The report.
    print(f"\neventstore benchmark: {options.events:,} events, wrk -t1 -c16 -d{options.seconds}s, "
          f"{os.cpu_count()} cores, Python {sys.version.split()[0]}, SQLite {sqlite3.sqlite_version}")
    print(f"{'figure':40} {'ratio':>7}  target")
    for name, value in figures.items():
        target = TARGETS.get(name)
        verdict = ""
        if target:
            op, bound = target
            met = value >= bound if op == ">=" else value < bound
            verdict = f"{op} {bound:<5} {'met' if met else 'NOT MET'}"
        print(f"{name:40} {value:7.2f}  {verdict}")
    print(f"\n{'latency (ms)':40} {'p50':>7} {'p99':>7}  target")
    for name, (p50, p99) in latencies.items():
        bound = LATENCY_TARGETS.get(name)
        verdict = f"p99 < {bound:g} {'met' if p99 < bound else 'NOT MET'}" if bound else ""
        print(f"{name:40} {p50:7.2f} {p99:7.2f}  {verdict}")
    print(f"\nexporter peak RSS: {export_rss:.1f} MB; importer peak RSS: {import_rss:.1f} MB")
    print("\n".join(notes))
    feed.main()  # issue 14: feed pages at 1 and 1,000 programs, long polls that a commit cannot match
    import event_types  # issue 12 (bench/event_types.py imports this module: imported here, not above)
    event_types.main(options.events, options.seconds)
    import postgres  # issue 11 (bench/postgres.py), last: it starts a PostgreSQL cluster of its own
    postgres.main(options.events, options.seconds)


if __name__ == "__main__":
    main()
