"""Issue 32: webhooks.

  20. commit-to-receipt latency, ms, p50 and p99, at --processes 1 (target: p99 at most
      500 ms) and at --processes 2: the time from a PUT's 200 (its change committed) to
      the delivery's arrival at a receiver on the same machine (127.0.0.1), PUTs one at a
      time, 40 ms apart, each delivery answered 200 at once.
  21. deliveries of a 5,000-event backlog, events/s, with MaxEvents 1 and with MaxEvents
      100, each against the feed's own read rate in the same run: GET /events through
      Next with limit=1 and limit=100 from the same server (the work a delivery does
      besides its POST and its record: read the page after the Position).

The receiver is a ThreadingHTTPServer in this process. ``python bench/webhooks.py
[--events N] [--samples N]`` runs it alone; ``make bench`` runs it after issue 31's.
"""

import argparse
import base64
import http.client
import json
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (bench/common.py: Server, percentile)

TARGETS = {"20. commit-to-receipt p99, 1 process (ms)": ("<=", 500.0)}


class Receiver:
    """Records when each delivered event arrived (by EventId), answers 200 at once."""

    def __init__(self):
        self.arrived, self.deliveries = {}, 0
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                now = time.perf_counter()
                events = json.loads(body)["data"]["Events"]
                with receiver.lock:
                    receiver.deliveries += 1
                    for event in events:
                        receiver.arrived.setdefault(event["EventId"], now)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def request(port, method, path, key, body=None):
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    headers = {"Authorization": "Basic " + base64.b64encode(f"admin:{key}".encode()).decode()}
    if body is not None:
        headers["Content-Type"] = "application/json"
    try:
        connection.request(method, path, json.dumps(body) if body is not None else None, headers)
        response = connection.getresponse()
        data = response.read()
        assert 200 <= response.status < 300, (response.status, data[:300])
        return json.loads(data) if data else None
    finally:
        connection.close()


def wait_for(predicate, seconds, what):
    deadline = time.monotonic() + seconds
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {seconds} s: {what}")
        time.sleep(0.002)


def latency(folder, processes, samples):
    """Figure 20 at ``processes``: [ms from each PUT's 200 to its delivery's arrival]."""
    receiver = Receiver()
    server = common.Server(folder / f"latency{processes}.db", "--no-access-log", processes=processes)
    try:
        key = server.admin_key
        server.register("FOO")
        request(server.port, "PUT", "/subscriptions/lms", key, {"Webhook": {"Url": receiver.url}, "StartFrom": "now"})
        committed = {}
        for n in range(samples + 10):
            event_id = f"FOO-l{n}"
            request(server.port, "PUT", f"/events/{event_id}", key, common.event_body(n))
            committed[event_id] = time.perf_counter()
            time.sleep(0.04)
        wait_for(lambda: len(receiver.arrived) >= len(committed), 60, "every change delivered")
        return sorted(max(0.0, receiver.arrived[e] - t) * 1000 for e, t in list(committed.items())[10:])
    finally:
        server.stop()
        receiver.close()


def throughput(folder, events):
    """Figure 21: {max_events: (delivered events/s, the feed's own events/s at limit=max_events)}."""
    server = common.Server(folder / "throughput.db", "--no-access-log", processes=1)
    results = {}
    try:
        key = server.admin_key
        server.register("FOO")
        for start in range(0, events, 1000):
            request(server.port, "POST", "/events", key, {"Events": [
                dict(common.event_body(n), EventId=f"FOO-t{n}") for n in range(start, min(events, start + 1000))]})
        for max_events in (1, 100):
            receiver = Receiver()
            try:
                started = time.perf_counter()
                request(server.port, "PUT", f"/subscriptions/all{max_events}", key,
                        {"Webhook": {"Url": receiver.url, "MaxEvents": max_events}})
                wait_for(lambda: len(receiver.arrived) >= events, 600, "the backlog delivered")
                delivered = events / (time.perf_counter() - started)
            finally:
                receiver.close()
            request(server.port, "DELETE", f"/subscriptions/all{max_events}", key)
            connection = http.client.HTTPConnection("127.0.0.1", server.port)
            auth = {"Authorization": "Basic " + base64.b64encode(f"admin:{key}".encode()).decode()}
            path, read, started = f"/events?ProgramId=FOO&limit={max_events}&after=0", 0, time.perf_counter()
            while read < events:
                connection.request("GET", path, headers=auth)
                page = json.loads(connection.getresponse().read())
                read += len(page["Events"])
                path = page["Next"]
            connection.close()
            results[max_events] = (delivered, read / (time.perf_counter() - started))
    finally:
        server.stop()
    return results


def main(events=5000, samples=200):
    folder = Path(tempfile.mkdtemp(prefix="eventstore-bench-webhooks-"))
    common.say("20-21: webhooks: commit-to-receipt latency, deliveries of a backlog ...")
    latencies = {processes: latency(folder, processes, samples) for processes in (1, 2)}
    rates = throughput(folder, events)
    print(f"\nissue 32, webhooks (20: {samples} PUTs 40 ms apart, a receiver on 127.0.0.1; 21: a {events:,}-event "
          f"backlog delivered, against GET /events through Next with the same limit)")
    for processes, values in latencies.items():
        p50, p99 = common.percentile(values, 50), common.percentile(values, 99)
        line = f"20. commit-to-receipt, {processes} process{'es' if processes > 1 else ''}: p50 {p50:6.1f} ms, " \
               f"p99 {p99:6.1f} ms"
        if processes == 1:
            op, bound = TARGETS["20. commit-to-receipt p99, 1 process (ms)"]
            line += f"  (p99 {op} {bound:g}: {'met' if p99 <= bound else 'NOT MET'})"
        print(line)
    for max_events, (delivered, feed) in rates.items():
        print(f"21. MaxEvents {max_events:3}: {delivered:8,.0f} events/s delivered; the feed at limit={max_events}: "
              f"{feed:8,.0f} events/s; ratio {delivered / feed:.2f}")
    return latencies, rates


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=5000, help="the backlog of figure 21 (default 5,000)")
    parser.add_argument("--samples", type=int, default=200, help="PUTs timed for figure 20 (default 200)")
    options = parser.parse_args()
    main(options.events, options.samples)
