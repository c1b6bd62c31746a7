"""Issue 35: what a request costs the server in CPU, against doing nothing.

  C1. PUT /events/{id} (new ids, 16 connections, authenticated, durable): CPU
      microseconds of the serving process (utime + stime of all its threads,
      from /proc, over each measured run only) per request, against the
      do-nothing WSGI app's (bench/baseline_server.py: reads the body, answers
      200, the same waitress settings); the ratio (target <= 2.5) and the split
      into user and kernel time.
  C2. GET /events/{id}: the same (target <= 1.5).
  Beside C1 and C2, the floor (bench/floor_server.py): the cheapest durable PUT
      and GET by id this stack can answer (waitress, Python, SQLite with
      eventstore's schema, fsynced group commits; no authentication, validation,
      metrics or anything else), against the same do-nothing app, and once more
      with its group committed by a request thread (leader/follower, the
      alternative writer design); eventstore against the floor. Where the floor
      is past a target, no design of eventstore in this stack meets it.
  C3. POST /events, 1,000 events a request: CPU microseconds per event.
  C4. pulling the feed through Next, limit=1000: CPU microseconds per event.
  C5. PUT and GET on a server with this round's features in use (metrics
      counted, 100 subscriptions, webhooks where the server has them, a schema
      on another type) against one with them off or unused (--no-metrics, none
      of them set up), for requests that use none of them: the ratio of CPU per
      request (target <= 1.05). Both write text log lines: the log is written
      either way, and its format is no feature a request uses; what JSON lines
      cost against text is printed beside it (the default server with
      --log-format json against without; no target).

Every server is one process pinned to one CPU (serve.py's default; the
baseline the same way) and wrk is pinned to another (taskset). Each round
starts every server afresh (one process's memory layout can make it a few per
cent faster or slower than another running the same code, for its whole
life), fills it with the 10,000 events the GETs read, warms it, and measures
each in turn, the order reversed every other round; a figure is the median of
the rounds (a ratio: the median of the rounds' ratios). CPU time per request
moves far less with what else the machine runs than throughput does, but it
moves: this file's README section gives the spread.

``python bench/cost.py [--seconds S] [--rounds N]`` runs it alone; ``make bench``
runs it after bench/run.py's own figures.
"""

import argparse
import base64
import collections
import http.client
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (bench/common.py)

TARGETS = {"C1": 2.5, "C2": 1.5, "C5": 1.05}
GET_EVENTS = 10_000
SUBSCRIPTIONS = 100
ROUNDS = 5
SCHEMA = {"type": "object", "required": ["p0"],
          "properties": {f"p{n}": {"type": "integer"} if n % 2 else {"type": "string"} for n in range(20)}}


def cpus():
    """(the CPU serve.py pins a single process to, the CPU wrk is kept to)."""
    allowed = sorted(os.sched_getaffinity(0))
    return allowed[0], allowed[-1] if len(allowed) > 1 else None


def auth_of(key):
    return "Basic " + base64.b64encode(f"admin:{key}".encode()).decode()


def fill(server, count=GET_EVENTS):
    """``count`` events FOO-g-1.. for the GETs, in batches."""
    for start in range(1, count + 1, 1000):
        body = json.dumps({"Events": [{"EventId": f"FOO-g-{n}", **common.event_body(n)}
                                      for n in range(start, min(count + 1, start + 1000))]}).encode()
        assert server.request("POST", "/events", body, user="admin", key=server.admin_key,
                              headers={"Content-Type": "application/json"})[0] == 200


def use_features(server):
    """Set up this round's features on ``server`` where requests to program FOO do
    not use them: a schema on another type, 100 subscriptions (of program BAR, or
    of a type FOO's events do not have), a webhook on every tenth where the server
    has webhooks. -> what was set up, for the report."""
    key = server.admin_key
    assert server.request("PUT", "/programs/BAR", {"Name": "Bar"}, user="admin", key=key)[0] == 200
    assert server.request("PUT", "/event-types/Checked", {"Description": "Checked.", "Schema": SCHEMA},
                          user="admin", key=key)[0] == 200
    webhooks = 0
    for n in range(SUBSCRIPTIONS):
        body = {"Filter": {"ProgramId": ["BAR"]} if n % 2 else {"EventType": ["Checked"]}}
        if n % 10 == 0:
            status = server.request("PUT", f"/subscriptions/s{n}", {**body, "Webhook": {
                "Url": f"http://127.0.0.1:9/hook{n}"}}, user="admin", key=key)[0]
            if status in (200, 201):
                webhooks += 1
                continue
        assert server.request("PUT", f"/subscriptions/s{n}", body, user="admin", key=key)[0] in (200, 201), n
    return ["a 20-property schema on type Checked",
            f"{SUBSCRIPTIONS} subscriptions ({webhooks} with a webhook{'' if webhooks else ': this server has none'})"]


class Servers:
    """One round's servers: the do-nothing app, eventstore as serve.py runs it by
    default, and (for C5) one with the features off and one with them in use."""

    SERVE_ARGS = {"default": (), "plain": ("--no-metrics",), "featured": (), "json": ("--log-format", "json"),
                  "floor": (), "leader": ("--leader-commits",)}
    FLOOR = (sys.executable, "-u", str(common.ROOT / "bench" / "floor_server.py"))

    def __init__(self, folder, names):
        self.folder, self.servers, self.features = folder, {}, []
        try:
            for name in names:
                self.servers[name] = common.Baseline() if name == "base" else self._eventstore(name)
        except BaseException:
            self.stop()
            raise
        key = next(server.admin_key for server in self.servers.values() if hasattr(server, "admin_key"))
        self.lua = {}
        for name, server in self.servers.items():
            auth = auth_of(getattr(server, "admin_key", key))
            self.lua[name] = {"put": common.PUT_LUA % {"auth": auth, "body": json.dumps(common.event_body(1))},
                              "get": common.GET_LUA % {"auth": auth, "count": GET_EVENTS}}

    def _eventstore(self, name):
        program = {"program": self.FLOOR} if name in ("floor", "leader") else {}
        server = common.Server(Path(tempfile.mkdtemp(dir=self.folder)) / f"{name}.db", *self.SERVE_ARGS[name], **program)
        server.register("FOO")
        fill(server)
        if name == "featured":
            self.features = use_features(server)
        return server

    def stop(self):
        for server in self.servers.values():
            server.stop()


def cpu_per_request(pid, run):
    """Run ``run()`` (a wrk run) -> (user us, kernel us) of process ``pid`` per request."""
    user0, system0 = common.cpu_split(pid)
    requests = max(run()[3], 1)
    user1, system1 = common.cpu_split(pid)
    return (user1 - user0) * 1e6 / requests, (system1 - system0) * 1e6 / requests


def measure_rounds(folder, names, kinds, seconds, rounds, wrk_cpu, between=None):
    """{(kind, name): [(user us, kernel us) per request, a round each]}; ``between(servers)``
    runs at the end of each round (the batch and pull figures), its results listed."""
    results, extra = collections.defaultdict(list), []
    features = []
    for round_number in range(rounds):
        common.say(f"   round {round_number + 1} of {rounds} ...")
        servers = Servers(folder, names)
        try:
            features = servers.features or features
            for name, server in servers.servers.items():  # warm
                for kind in kinds:
                    common.wrk(server.port, servers.lua[name][kind], 1, args=[f"warm{round_number}"], cpu=wrk_cpu)
            order = [(kind, name) for kind in kinds for name in names]
            for kind, name in order if round_number % 2 == 0 else order[::-1]:
                server = servers.servers[name]
                results[kind, name].append(cpu_per_request(server.process.pid, lambda: common.wrk(
                    server.port, servers.lua[name][kind], seconds, args=[f"{name}{round_number}"], cpu=wrk_cpu)))
            if between is not None:
                extra.append(between(servers.servers))
        finally:
            servers.stop()
    return results, extra, features


def batch_and_pull(servers, batches=20):
    """C3 and C4 on the default server: CPU us per event of POSTing ``batches``
    batches of 1,000 new events on one connection, then of pulling everything
    (those and the 10,000 GET events) through Next."""
    server = servers["default"]
    connection = http.client.HTTPConnection("127.0.0.1", server.port)
    headers = {"Authorization": auth_of(server.admin_key), "Content-Type": "application/json"}
    bodies = [json.dumps({"Events": [{"EventId": f"FOO-b-{n}", **common.event_body(n)}
                                     for n in range(start, start + 1000)]}).encode()
              for start in range(0, batches * 1000, 1000)]
    before = common.cpu_seconds(server.process.pid)
    for body in bodies:
        connection.request("POST", "/events", body, headers)
        response = connection.getresponse()
        response.read()
        assert response.status == 200, response.status
    post = (common.cpu_seconds(server.process.pid) - before) * 1e6 / (batches * 1000)
    connection.close()
    before = common.cpu_seconds(server.process.pid)
    pulled = common.pull_through_next(server.port, "admin", server.admin_key)[0]
    pull = (common.cpu_seconds(server.process.pid) - before) * 1e6 / pulled
    return post, pull


def total(sample):
    return sample[0] + sample[1]


def median_sample(samples):
    """The (user, kernel) sample whose total is the median."""
    return sorted(samples, key=total)[len(samples) // 2]


def median_ratio(ours, base):
    return statistics.median(total(a) / total(b) for a, b in zip(ours, base, strict=True))


def main(seconds=6, rounds=ROUNDS):
    folder = Path(tempfile.mkdtemp(prefix="eventstore-bench-cost-"))
    server_cpu, wrk_cpu = cpus()
    common.say(f"C1-C5: CPU per request (servers on CPU {server_cpu}, wrk on CPU {wrk_cpu}), {rounds} rounds ...")
    names = ("base", "default", "plain", "featured", "json", "floor", "leader")
    results, extra, features = measure_rounds(folder, names, ("put", "get"), seconds, rounds, wrk_cpu,
                                              between=batch_and_pull)
    lines = [f"\nissue 35, CPU per request (bench/cost.py): each server one process on CPU {server_cpu}, wrk -t1 -c16 "
             f"-d{seconds}s on CPU {wrk_cpu}; medians of {rounds} rounds, each on servers started afresh",
             f"{'figure':44} {'us':>6} {'user':>6} {'kernel':>6} {'vs us':>6} {'ratio':>6}  target"]
    for figure, kind, ours, base, target in (
            ("C1. PUT vs the do-nothing app", "put", "default", "base", "C1"),
            ("   the floor (PUT) vs the do-nothing app", "put", "floor", "base", "C1"),
            ("   the floor, leader/follower commits", "put", "leader", "base", "C1"),
            ("   PUT vs the floor", "put", "default", "floor", None),
            ("C2. GET vs the do-nothing app", "get", "default", "base", "C2"),
            ("   the floor (GET) vs the do-nothing app", "get", "floor", "base", "C2"),
            ("   GET vs the floor", "get", "default", "floor", None),
            ("C5. PUT, features in use vs not", "put", "featured", "plain", "C5"),
            ("C5. GET, features in use vs not", "get", "featured", "plain", "C5"),
            ("PUT, JSON log lines vs text", "put", "json", "default", None),
            ("GET, JSON log lines vs text", "get", "json", "default", None)):
        ratio = median_ratio(results[kind, ours], results[kind, base])
        user, kernel = median_sample(results[kind, ours])
        bound = TARGETS.get(target)
        if ours in ("floor", "leader") and bound:  # what the target leaves any design in this stack
            room = bound * total(median_sample(results[kind, base])) - user - kernel
            verdict = (f"<= {bound}: leaves {room:.0f} us for all eventstore does besides" if room > 0
                       else f"<= {bound}: past it, out of reach in this stack")
        else:
            verdict = f"<= {bound} {'met' if ratio <= bound else 'NOT MET'}" if bound else "none"
        lines.append(f"{figure:44} {user + kernel:6.0f} {user:6.0f} {kernel:6.0f} "
                     f"{total(median_sample(results[kind, base])):6.0f} {ratio:6.2f}  {verdict}")
    lines.append(f"{'C3. POST /events, 1,000 a request, per event':44} {statistics.median(e[0] for e in extra):6.1f}")
    lines.append(f"{'C4. the pull through Next, per event':44} {statistics.median(e[1] for e in extra):6.1f}")
    lines.append("rounds (us per request): " + "; ".join(
        f"{kind} {name} " + " ".join(f"{total(sample):.0f}" for sample in samples)
        for (kind, name), samples in sorted(results.items())))
    lines.append("C5 in use: metrics counted, " + ", ".join(features)
                 + "; not: --no-metrics, nothing set up; both text log lines. The default server counts metrics and "
                   "writes text log lines.")
    print("\n".join(lines))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=6, help="length of each wrk run (default 6)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help=f"rounds (default {ROUNDS})")
    options = parser.parse_args()
    main(options.seconds, options.rounds)
