"""/health under slow and silent clients (issue 29 item 12): serve.py with its
defaults, attacked from one address (127.0.0.2) while /health is probed from
another (127.0.0.1), against the same probes with no attack in the same run.

    python bench/slow_clients.py [--seconds 20] [--connections 300] [--processes N]

Attacks: "silent" opens --connections connections that send nothing and keeps
them open; "reconnecting" does the same but opens a new one as soon as the
server closes one; "trickling" sends a request one byte a second.
"""

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # eventstore's modules, and tests/ as a package

from tests.server import Server  # noqa: E402


def probe_health(port, seconds, interval=0.25):
    """-> the /health latencies (s) over ``seconds``; a probe without an answer of
    200 in 10 s (none, a 503, a closed connection) counts as 10 s."""
    latencies, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                answer = b""
                while chunk := sock.recv(65536):
                    answer += chunk
            latencies.append(time.monotonic() - started if answer.startswith(b"HTTP/1.1 200 ") else 10.0)
        except OSError:
            latencies.append(10.0)
        time.sleep(interval)
    return latencies


def attack(port, kind, connections, stop):
    held = []

    def connect():
        sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=("127.0.0.2", 0))
        sock.setblocking(False)
        return sock

    def keep_open():
        while not stop.is_set():
            for sock in list(held):  # reconnect those the server closed
                try:
                    if sock.recv(1, socket.MSG_PEEK) == b"":
                        raise ConnectionError
                except BlockingIOError:
                    continue
                except OSError:
                    pass
                held.remove(sock)
                sock.close()
                if kind == "reconnecting":
                    try:
                        held.append(connect())
                    except OSError:  # refused for now: tried again next turn
                        pass
            if kind == "trickling":
                for sock in held:
                    try:
                        sock.send(b"G")
                    except OSError:
                        pass
            stop.wait(0.05 if kind == "reconnecting" else 1.0)

    for _ in range(connections):
        try:
            held.append(connect())
        except OSError:
            break
    keeper = threading.Thread(target=keep_open, daemon=True)
    keeper.start()
    return held, keeper


def summary(name, latencies):
    latencies = sorted(latencies)
    return (f"{name:>13}: /health median {statistics.median(latencies) * 1000:7.1f} ms, "
            f"max {latencies[-1] * 1000:7.1f} ms, {len(latencies)} probes")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        server = Server(Path(folder) / "slow.db", "--no-access-log", processes=args.processes)
        try:
            print(summary("no attack", probe_health(server.port, args.seconds)), flush=True)
            for kind in ("silent", "reconnecting", "trickling"):
                stop = threading.Event()
                held, keeper = attack(server.port, kind, args.connections, stop)
                print(f"{kind:>13}: {len(held)} of {args.connections} connections open", flush=True)
                try:
                    print(summary(kind, probe_health(server.port, args.seconds)), flush=True)
                finally:
                    stop.set()
                    keeper.join(5)
                    for sock in held:
                        sock.close()
                time.sleep(1)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
