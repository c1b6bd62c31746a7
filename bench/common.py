"""What the benchmarks share: wrk and its Lua scripts, the event body, rounds
taken in turn, the baseline app, CPU and RSS readings, pulling a feed, the
cross-process wake-up and percentiles. bench/run.py, bench/postgres.py,
bench/event_types.py, bench/schemas.py, bench/subscriptions.py and bench/cost.py import this;
none of them imports another (run.py runs the others).

The servers are started as the end-to-end tests start them (tests/server.py),
imported as the package ``tests`` from the repository's root.
"""

import base64
import http.client
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # eventstore's modules, and tests/ as a package

from tests.server import Server, free_port  # noqa: E402
from tests.server import event_body as tests_event_body  # noqa: E402

PYTHON = sys.executable


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
    """The tests' event body, varied by ``n`` as real traffic is: 5,000 members,
    three types, 300 courses."""
    return tests_event_body("FOO", ProgramMemberId=f"member{n % 5000}@example.com",
                            EventType=("CourseCompleted", "CourseStarted", "CreditEarned")[n % 3],
                            EventData={"course": f"CPR-{n % 300}", "score": n % 100, "passed": True})


def wrk(port, lua, seconds, connections=16, args=(), expect_errors=False, timeouts_allowed=False, cpu=None):
    """-> (requests/s, p50 ms, p99 ms, total requests, wrk's own CPU seconds per
    request); fails on any non-2xx (with ``expect_errors``, on any answer that is
    not an error: 401s expected, say) and on any socket
    error (but, with ``timeouts_allowed``, requests that took over 2 s: they are
    said, and count in p99, since wrk is given 30 s before it gives up on one and
    leaves it out of its latencies). ``cpu``: the CPU wrk is kept to (taskset)."""
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as script:
        script.write(lua)
    try:
        result = subprocess.run(
            [*(("taskset", "-c", str(cpu)) if cpu is not None else ()), "wrk", "-t1", f"-c{connections}",
             f"-d{seconds}s", "--latency", *(("--timeout", "30s") if timeouts_allowed else ()),
             "-s", script.name, f"http://127.0.0.1:{port}", "--", *args],
            capture_output=True, text=True, check=True)
    finally:
        os.unlink(script.name)
    out = result.stdout
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if socket_errors and (not timeouts_allowed or any(map(int, socket_errors.groups()[:3]))):
        raise SystemExit(f"wrk saw errors:\n{out}")
    total = int(re.search(r"(\d+) requests in", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors and not expect_errors:  # whether or not some requests timed out too
        raise SystemExit(f"wrk saw errors:\n{out}")
    if expect_errors and (not errors or int(errors.group(1)) != total):
        raise SystemExit(f"wrk saw answers that were not errors:\n{out}")
    if socket_errors:
        say(f"note: {socket_errors.group(4)} requests took over 30 s (wrk's timeout) in this run")

    def latency(percent):
        value, unit = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 0.001, "ms": 1, "s": 1000}[unit]

    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)  # wrk has been waited for: its time is in
    wrk_cpu = sum(getattr(cpu_after, f) - getattr(cpu_before, f) for f in ("ru_utime", "ru_stime"))
    return rate, latency(50), latency(99), total, wrk_cpu / max(total, 1)


def in_thread(function, *args):
    """Start ``function(*args)`` in a thread -> a callable that waits for it and
    returns its result or raises its exception here (tests/helpers.py's
    run_in_thread, without pytest: a thread's own exception,
    wrk's SystemExit included, is otherwise only printed, or dropped)."""
    outcome = {}

    def run():
        try:
            outcome["result"] = function(*args)
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()

    def wait():
        thread.join()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]
    return wait


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
    return sum(cpu_split(pid))


def cpu_split(pid):
    """(user, system) CPU seconds process ``pid`` (all its threads) has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) / os.sysconf("SC_CLK_TCK"), int(fields[12]) / os.sysconf("SC_CLK_TCK")


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
        self.stop()
        raise SystemExit("the baseline server did not answer within 10 s")

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


def say(text):
    print(text, file=sys.stderr, flush=True)
