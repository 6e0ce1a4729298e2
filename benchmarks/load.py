"""HTTP load against gunicorn: throughput and p50/p99 latency at several concurrencies, time split by stage.

    python benchmarks/load.py --runtime litert --concurrency 1 8 32 --seconds 20
    # alternatives in one run, each a label and its settings:
    python benchmarks/load.py --variant "opencv-yunet:detector.engine=opencv" --variant "ort-yunet:"
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np

from common import DATA_DIR, REPO, default_model, gunicorn, letterboxed_photo, print_table, write_json


def hammer(url: str, body: bytes, concurrency: int, seconds: float) -> dict:
    host, port = url.removeprefix("http://").split(":")
    latencies, stages, errors = [], [], {"5xx": 0, "4xx": 0, "connection": 0}
    lock, stop_at = threading.Lock(), time.perf_counter() + seconds

    def worker():
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            try:
                conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": "image/jpeg"})
                response = conn.getresponse()
                payload = response.read()
            except OSError:
                with lock:
                    errors["connection"] += 1
                conn.close()
                conn = http.client.HTTPConnection(host, int(port), timeout=60)
                continue
            elapsed = time.perf_counter() - started
            with lock:
                if response.status >= 500:
                    errors["5xx"] += 1
                elif response.status >= 400:
                    errors["4xx"] += 1
                else:
                    latencies.append(elapsed)
                    stages.append(json.loads(payload)["timings_ms"])
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    ms = np.array(latencies) * 1e3
    return {
        "concurrency": concurrency, "requests": len(latencies), "photos_per_s": len(latencies) / wall,
        "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
        "decode_ms": float(np.mean([s["decode"] for s in stages])),
        "detect_ms": float(np.mean([s["detect"] for s in stages])),
        "classify_ms": float(np.mean([s["classify"] for s in stages])),
        "errors": sum(errors.values()), "error_kinds": errors,
    }


def faces_found(url: str, body: bytes) -> int:
    request = urllib.request.Request(url + "/v1/predict", data=body, headers={"Content-Type": "image/jpeg"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return len(json.loads(response.read())["detections"])


def configurations(runtimes: list[str], variants: list[str]) -> list[tuple[str, str, list[str]]]:
    """(runtime, label, overrides) for each runtime, crossed with each variant when there are any."""
    parsed = []
    for variant in variants or [":"]:
        label, _, settings = variant.partition(":")
        parsed.append((label or "default", [pair for pair in settings.split(",") if pair]))
    return [(runtime, label, overrides) for label, overrides in parsed for runtime in runtimes]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=[default_model()], help="one or more models to compare")
    parser.add_argument("--runtime", nargs="+", default=["litert"])
    parser.add_argument("--variant", action="append", default=[],
                        help="LABEL:section.key=value,... a server configuration to measure (repeatable); "
                             "with variants, --runtime picks the runtime of each")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--photo", type=Path, default=DATA_DIR / "images" / "maksssksksss35.jpg",
                        help="photo letterboxed to 640x480 (default: one where YuNet finds 3 faces)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "load.json")
    args = parser.parse_args(argv)
    body = letterboxed_photo(args.photo)
    rows = []
    for model, (runtime, label, overrides) in itertools.product(args.model,
                                                                configurations(args.runtime, args.variant)):
        with gunicorn(model, runtime, args.workers, overrides=overrides) as (url, _):
            faces = faces_found(url, body)
            hammer(url, body, 2, 3.0)  # warm-up
            for concurrency in args.concurrency:
                rows.append({"model": model, "variant": label, "runtime": runtime, "workers": args.workers,
                             "faces": faces, **hammer(url, body, concurrency, args.seconds)})
    print_table(rows, ["model", "variant", "runtime", "workers", "faces", "concurrency", "requests", "photos_per_s",
                       "p50_ms", "p99_ms", "decode_ms", "detect_ms", "classify_ms", "errors"])
    write_json(args.out, {"photo": str(args.photo.name), "size": "640x480", "rows": rows})


if __name__ == "__main__":
    main()
