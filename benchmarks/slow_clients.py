"""Slow clients: can a few connections that send their headers slowly take the API down?

    python benchmarks/slow_clients.py --slow 0 2 8 64 --requests 20

For each gunicorn worker class (serve.worker_class), `maskwatch serve` with 2 workers; then, for each number of
slow clients, that many connections send a request line and one header line a second, never finishing, while a
normal client sends --requests photos one after another (5 s timeout each). Reports how many were answered and
their latency.
"""

from __future__ import annotations

import argparse
import http.client
import socket
import threading
import time
from pathlib import Path

import numpy as np

from common import DATA_DIR, REPO, default_model, gunicorn, letterboxed_photo, print_table, write_json


class SlowClients:
    """`count` connections that trickle header lines and never end their request."""

    def __init__(self, host: str, port: int, count: int):
        self.sockets = [socket.create_connection((host, port)) for _ in range(count)]
        for sock in self.sockets:
            sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: maskwatch\r\n")
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._trickle, daemon=True)
        self.thread.start()

    def _trickle(self):
        while not self.stop.wait(1.0):
            for sock in self.sockets:
                try:
                    sock.sendall(b"X-Slow: 1\r\n")
                except OSError:
                    pass  # the server gave up on it

    def close(self):
        self.stop.set()
        self.thread.join()
        for sock in self.sockets:
            sock.close()


def normal_client(host: str, port: int, photo: bytes, requests: int) -> tuple[int, list[float]]:
    answered, latencies = 0, []
    for _ in range(requests):
        started = time.perf_counter()
        conn = http.client.HTTPConnection(host, port, timeout=5)
        try:
            conn.request("POST", "/v1/predict", body=photo, headers={"Content-Type": "image/jpeg"})
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                answered += 1
                latencies.append((time.perf_counter() - started) * 1000)
        except OSError:
            pass  # timed out behind the slow clients
        finally:
            conn.close()
    return answered, latencies


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--runtime", default="litert")
    parser.add_argument("--worker-classes", nargs="+", default=["gevent", "sync"])
    parser.add_argument("--slow", type=int, nargs="+", default=[0, 2, 8, 64], help="numbers of slow clients")
    parser.add_argument("--requests", type=int, default=20, help="normal requests sent while they are held")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "slow_clients.json")
    args = parser.parse_args(argv)
    photo = letterboxed_photo(DATA_DIR / "images" / "maksssksksss35.jpg")
    rows = []
    for worker_class in args.worker_classes:
        with gunicorn(args.model, args.runtime, 2, overrides=[f"serve.worker_class={worker_class}"]) as (url, _):
            host, port = url.removeprefix("http://").split(":")
            for count in args.slow:
                slow = SlowClients(host, int(port), count)
                started = time.perf_counter()
                answered, latencies = normal_client(host, int(port), photo, args.requests)
                seconds = time.perf_counter() - started
                slow.close()
                rows.append({"worker_class": worker_class, "slow_clients": count, "requests": args.requests,
                             "answered": answered, "p50_ms": float(np.median(latencies)) if latencies else None,
                             "max_ms": max(latencies) if latencies else None, "seconds": round(seconds, 1)})
                print(rows[-1], flush=True)
                time.sleep(2)  # let the server drop the slow connections before the next round
    print_table(rows, ["worker_class", "slow_clients", "requests", "answered", "p50_ms", "max_ms", "seconds"])
    write_json(args.out, {"rows": rows})


if __name__ == "__main__":
    main()
