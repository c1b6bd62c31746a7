"""The alternative that eventstore_metrics.py was measured against (docs/DESIGN.md,
"Metrics across processes"): the same recorder on prometheus_client's
multiprocess mode (a folder of per-process files, summed at each scrape).

    python bench/metrics_prototype.py            # prints the figures

It serves the app with the prototype in place of eventstore_metrics.Metrics
(serve.py in one process, the app's own recorder swapped by this module), and
measures, in the same run: GET /events/{id} throughput with the prototype
against --no-metrics and against eventstore's own shared counters, and the
scrape's time with the files of 2 live and 8 dead processes (restarts) in the
folder. Not part of make bench: it is the record of a choice.
"""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVE_WITH_PROTOTYPE = """
import os, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
os.environ["PROMETHEUS_MULTIPROC_DIR"] = {folder!r}
import eventstore, metrics_prototype, serve
eventstore.Metrics = metrics_prototype.PrometheusMetrics
sys.exit(serve.main(sys.argv[1:]))
"""


class PrometheusMetrics:
    """eventstore_metrics.Metrics's interface over prometheus_client (multiprocess
    mode: PROMETHEUS_MULTIPROC_DIR must be set before it is imported)."""

    enabled = True

    def __init__(self, path=None):
        import prometheus_client as p
        from eventstore_metrics import DURATION, GROUP_SECONDS, GROUP_SIZE, METHODS
        self.methods = METHODS
        self.registry = p.CollectorRegistry()
        from prometheus_client import multiprocess
        multiprocess.MultiProcessCollector(self.registry)
        self.requests = p.Counter("eventstore_http_requests", "", ["route", "method", "status"])
        self.duration = p.Histogram("eventstore_http_request_duration_seconds", "", ["route"],
                                    buckets=DURATION.buckets)
        self.writes = p.Counter("eventstore_writes_committed", "")
        self.size = p.Histogram("eventstore_group_commit_size", "", buckets=GROUP_SIZE.buckets)
        self.seconds = p.Histogram("eventstore_group_commit_seconds", "", buckets=GROUP_SECONDS.buckets)
        self.polls = p.Gauge("eventstore_long_polls_waiting", "", multiprocess_mode="livesum")
        self.webhooks = p.Counter("eventstore_webhook_deliveries", "", ["subscription", "outcome"])
        self.failures = p.Counter("eventstore_auth_failures", "")
        self.generate = p.generate_latest

    def request(self, route, method, status, seconds):
        self.requests.labels(route, method if method in self.methods else "other", str(status)).inc()
        self.duration.labels(route).observe(seconds)

    def write_committed(self):
        self.writes.inc()

    def group_commit(self, changes, seconds):
        self.size.observe(changes)
        self.seconds.observe(seconds)

    def long_polls(self, change):
        self.polls.inc(change)

    def auth_failure(self):
        self.failures.inc()

    def webhook_delivery(self, subscription, outcome):
        self.webhooks.labels(subscription, outcome).inc()

    def exposition(self, database):
        return self.generate(self.registry) + b"".join(
            f"{family.key(labels)} {value}\n".encode() for family, series in database.items() for labels, value in series)

    def after_fork(self):
        pass

    def close(self):
        pass


def scrape_seconds(folder, scrapes=50):
    """The multiprocess collector's time over the files in ``folder``."""
    code = ("import os, sys, time; os.environ['PROMETHEUS_MULTIPROC_DIR'] = sys.argv[1];"
            "import prometheus_client as p; from prometheus_client import multiprocess;"
            "r = p.CollectorRegistry(); multiprocess.MultiProcessCollector(r); times = []\n"
            "for _ in range(int(sys.argv[2])):\n"
            "    t = time.perf_counter(); p.generate_latest(r); times.append(time.perf_counter() - t)\n"
            "times.sort(); print(times[len(times) // 2], times[-1])")
    out = subprocess.run([sys.executable, "-c", code, str(folder), str(scrapes)], capture_output=True, text=True,
                         check=True).stdout.split()
    return float(out[0]), float(out[1])


def main():
    sys.path.insert(0, str(ROOT / "bench"))
    from common import GET_LUA, alternating, median_pair, say, wrk
    import base64
    import json
    from common import Server, event_body
    workdir = Path(tempfile.mkdtemp(prefix="eventstore-metrics-prototype-"))
    folder = workdir / "prometheus"
    folder.mkdir()

    def server(name, *args, program=None):
        extra = {} if program is None else {"program": program}
        started = Server(workdir / f"{name}.db", *args, **extra)
        started.register("FOO")
        auth = "Basic " + base64.b64encode(f"admin:{started.admin_key}".encode()).decode()
        for start in range(1, 10_001, 1000):
            body = json.dumps({"Events": [{"EventId": f"FOO-g-{n}", **event_body(n)}
                                          for n in range(start, start + 1000)]}).encode()
            assert started.request("POST", "/events", body, user="admin", key=started.admin_key,
                                   headers={"Content-Type": "application/json"})[0] == 200
        return started, GET_LUA % {"auth": auth, "count": 10_000}

    script = workdir / "serve_with_prototype.py"
    script.write_text(SERVE_WITH_PROTOTYPE.format(root=str(ROOT), bench=str(ROOT / "bench"), folder=str(folder)))
    ours, ours_lua = server("ours")
    off, off_lua = server("off", "--no-metrics")
    prom, prom_lua = server("prom", program=(sys.executable, "-u", str(script)))
    seconds = 10
    say("GET with prometheus_client, with eventstore's own counters, without metrics ...")
    runs = alternating({"prom": lambda r: wrk(prom.port, prom_lua, seconds),
                        "ours": lambda r: wrk(ours.port, ours_lua, seconds),
                        "off": lambda r: wrk(off.port, off_lua, seconds)})
    if not any(folder.glob("*.db")):  # prometheus_client writes its counters there: else the swap did not happen
        raise SystemExit("the prototype server wrote no prometheus_client files: it did not count with it")
    for name in ("prom", "ours"):
        rate, base = median_pair(runs, name, "off")
        print(f"GET {name} vs no metrics: {rate / base:.3f} ({rate:,.0f} vs {base:,.0f} req/s)")
    for started in (ours, off, prom):
        started.stop()
    files = sorted(folder.glob("*.db"))
    for n in range(8):  # what 8 worker restarts leave behind: files of dead pids, kept for the counters
        for path in files:
            shutil.copy(path, folder / path.name.replace(".db", f"_{100000 + n}.db"))
    p50, worst = scrape_seconds(folder)
    print(f"prometheus_client scrape with {len(list(folder.glob('*.db')))} files (2 live and 8 dead "
          f"processes' worth): p50 {p50 * 1000:.1f} ms, max {worst * 1000:.1f} ms")
    shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
