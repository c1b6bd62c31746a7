"""How the app answers under each host the README names, with idle followers:
``/health`` and PUT latency, the followers' polls a second, and how long each
host takes to stop with a long poll waiting. The target (issue 29): /health and
a PUT within 100 ms with 8 idle followers, and an idle follower sending at most
a few requests a second.

    python bench/hosts.py                     # this repository's code
    python bench/hosts.py --code DIR          # another copy (git worktree, archive), e.g. before a change

The hosts come from the tests (tests/hosts.py: the README's command lines); the
followers are ``eventstore_client.Client.follow()`` of the code measured.
"""

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests/ as a package

from tests.hosts import HOSTS, Host, basic  # noqa: E402
from tests.server import event  # noqa: E402

TARGET_MS = 100


def load_client(code):
    spec = importlib.util.spec_from_file_location("measured_client", Path(code) / "eventstore_client.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def new_database(code, folder):
    """A database made by ``code``'s command line, with an admin and programs FOO and BAR -> (path, admin key)."""
    db = str(Path(folder) / "hosts.db")
    admin = [sys.executable, str(Path(code) / "eventstore.py"), "--db", db]
    key = subprocess.run([*admin, "--create", "user", "add", "admin", "--system"], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    for program in ("FOO", "BAR"):
        subprocess.run([*admin, "program", "add", program], check=True, capture_output=True)
    return db, key


def timed(host, method, path, body=None, headers=None, timeout=15):
    """-> milliseconds to the answer (a 2xx), or None without one within ``timeout``."""
    started = time.perf_counter()
    try:
        status = host.request(method, path, body, headers, timeout=timeout)[0]
    except OSError:
        return None
    return (time.perf_counter() - started) * 1000 if status < 300 else None


def followers(client_module, port, key, count, stop):
    """``count`` threads following program FOO with Client.follow() -> (a list of
    [feed requests sent] counters, the threads). They end at the first event after
    ``stop`` is set."""
    counts, threads = [], []

    class Counting(client_module.Client):
        def _send(self, method, path, *args, **kwargs):
            if path.startswith("/events?"):
                self.sent[0] += 1
            return super()._send(method, path, *args, **kwargs)

    def follow(client):
        for _ in client.follow(ProgramId="FOO"):
            if stop.is_set():
                return

    for _ in range(count):
        client = Counting(f"http://127.0.0.1:{port}", "admin", key)
        client.sent = [0]
        counts.append(client.sent)
        threads.append(threading.Thread(target=follow, args=(client,), daemon=True))
        threads[-1].start()
    return counts, threads


def check_following(counts, threads):
    """Fail unless every follower has asked for the feed and still follows (one
    that died on an error is only printed by its thread: the figures would be
    taken with fewer idle followers, or none)."""
    following = sum(1 for c, thread in zip(counts, threads) if c[0] and thread.is_alive())
    if following < len(threads):
        raise SystemExit(f"only {following} of {len(threads)} followers are following")


def summary(values):
    answered = [v for v in values if v is not None]
    if len(answered) < len(values):
        return f"{len(values) - len(answered)} of {len(values)} unanswered in 15 s"
    return f"{statistics.median(answered):6.1f} / {max(answered):6.1f}"


def measure_host(name, code, client_module, args):
    command, options = HOSTS[name]
    with tempfile.TemporaryDirectory(prefix="eventstore-hosts-") as folder:
        db, key = new_database(code, folder)
        host = Host(folder, db, command, options, code=code)
        try:
            stop = threading.Event()
            counts, threads = followers(client_module, host.port, key, args.followers, stop)
            deadline = time.monotonic() + 10
            while not all(c[0] for c in counts) and time.monotonic() < deadline:
                time.sleep(0.02)
            check_following(counts, threads)
            time.sleep(1.0)  # idle
            before = sum(c[0] for c in counts)
            time.sleep(args.idle)
            polls_per_second = (sum(c[0] for c in counts) - before) / args.idle
            health, puts = [], []
            for n in range(args.probes):
                health.append(timed(host, "GET", "/health"))
                puts.append(timed(host, "PUT", f"/events/BAR-probe{n}", event(n, program="BAR"),
                                  basic("admin", key)))  # not what they follow: they stay idle
                if health[-1] is None or puts[-1] is None:
                    break  # starved: one probe says so
                time.sleep(0.05)
            check_following(counts, threads)
            stop.set()
            host.request("PUT", "/events/FOO-stop", event(), basic("admin", key), timeout=60)  # ends them
        finally:
            host.stop()
    worst = max([v for v in health + puts if v is not None] or [float("inf")])
    met = all(v is not None for v in health + puts) and worst <= TARGET_MS
    print(f"{name:18} {summary(health):>34} {summary(puts):>34} {polls_per_second:10.1f}   "
          f"{'yes' if met else 'NO'}", flush=True)


def measure_stop(name, command, options, code, wrapped):
    """Seconds from SIGTERM to the host's exit with one long poll waiting, and what the poll got."""
    with tempfile.TemporaryDirectory(prefix="eventstore-hosts-") as folder:
        db, key = new_database(code, folder)
        host = Host(folder, db, command, options, wrapped=wrapped, code=code)
        answer = {}

        def poll():
            try:
                status, headers, _ = host.request("GET", "/events?wait=30", headers=basic("admin", key), timeout=60)
                answer["got"] = f"{status}" + (" with Eventstore-Poll-After" if "Eventstore-Poll-After" in headers
                                               else "")
            except OSError as exc:
                answer["got"] = f"cut ({type(exc).__name__})"

        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if json.loads(host.request("GET", "/health")[2]).get("longPolls"):
                break
            time.sleep(0.05)
        else:
            answer["note"] = "(no poll held)"
        took = host.stop(timeout=60)
        thread.join(10)
        errors = "AttributeError in the log" if "AttributeError" in host.log() else ""
        if took is None:
            errors += "\n" + host.log()[-2000:]
    print(f"{name:52} {'> 60 s' if took is None else f'{took:5.2f} s':>8}   poll: {answer.get('got', '?')} "
          f"{answer.get('note', '')} {errors}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--code", default=str(ROOT), help="the eventstore copy to measure (default: this one)")
    parser.add_argument("--followers", type=int, default=8)
    parser.add_argument("--probes", type=int, default=20, help="/health and PUT requests per host")
    parser.add_argument("--idle", type=float, default=3.0, help="seconds the followers' polls are counted")
    parser.add_argument("--hosts", nargs="*", default=list(HOSTS), choices=list(HOSTS))
    args = parser.parse_args()
    code = Path(args.code).resolve()
    client_module = load_client(code)
    print(f"code: {code}; {args.followers} idle followers; {args.probes} probes each")
    print(f"{'host':18} {'/health ms (median / max)':>34} {'PUT ms (median / max)':>34} {'polls/s':>10}   "
          f"within {TARGET_MS} ms")
    for name in args.hosts:
        try:
            measure_host(name, code, client_module, args)
        except RuntimeError as exc:
            print(f"{name:18} could not start: {str(exc).splitlines()[0]}")
    print("\nstopping on SIGTERM with one long poll waiting:")
    gthread = "gunicorn -k gthread -w 1 --threads 4 -c gunicorn.conf.py app:application"
    measure_stop("gunicorn gthread, README hook, app behind middleware", gthread, {"max_waiting": 2}, code, True)
    measure_stop("gunicorn gthread, README hook", gthread, {"max_waiting": 2}, code, False)
    measure_stop("uWSGI --die-on-term (README)", HOSTS["uWSGI"][0], {}, code, False)


if __name__ == "__main__":
    main()
