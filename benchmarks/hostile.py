"""Hostile input: many requests mixing valid photos and broken inputs against gunicorn.
Reports status counts (target: zero 5xx) and worker memory before and after.

    python benchmarks/hostile.py --requests 10000 --concurrency 8
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import struct
import threading
import zlib
from collections import Counter
from pathlib import Path

import psutil

from common import DATA_DIR, REPO, default_model, gunicorn, letterboxed_photo, print_table, write_json


def bomb_png(width=60000, height=60000) -> bytes:
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))


def multipart(field: str, filename: str, data: bytes) -> tuple[bytes, str]:
    boundary = "maskwatchboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


def cases(photo: bytes) -> list[tuple[str, bytes, str]]:
    valid_multipart = multipart("image", "p.jpg", photo)
    return [
        ("valid_raw", photo, "image/jpeg"),
        ("valid_multipart", *valid_multipart),
        ("valid_base64", json.dumps({"image": base64.b64encode(photo).decode()}).encode(), "application/json"),
        ("empty", b"", "image/jpeg"),
        ("junk", b"hello world" * 10, "image/jpeg"),
        ("truncated", photo[: len(photo) // 3], "image/jpeg"),
        ("corrupt", photo[:20] + bytes(len(photo) - 20), "image/jpeg"),
        ("gif", b"GIF89a" + b"\x00" * 100, "image/gif"),
        ("bomb", bomb_png(), "image/png"),
        ("oversize", b"\xff\xd8\xff" + b"\x00" * (11 * 1024 * 1024), "image/jpeg"),
        ("bad_base64", b'{"image": "%%%"}', "application/json"),
        ("bad_json", b"{nope", "application/json"),
        ("wrong_field", *multipart("picture", "p.jpg", photo)),
        ("text", b"plain text", "text/plain"),
    ]


def worker_rss(server) -> list[int]:
    return [child.memory_info().rss for child in psutil.Process(server.pid).children(recursive=True)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--runtime", default="litert")
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "hostile.json")
    args = parser.parse_args(argv)
    mix = cases(letterboxed_photo(DATA_DIR / "images" / "maksssksksss35.jpg"))
    statuses: Counter = Counter()
    lock, next_index = threading.Lock(), iter(range(args.requests))
    with gunicorn(args.model, args.runtime, 2) as (url, server):
        host, port = url.removeprefix("http://").split(":")
        before = worker_rss(server)
        rss_trace: list = []

        def worker():
            conn = http.client.HTTPConnection(host, int(port), timeout=60)
            while True:
                with lock:
                    index = next(next_index, None)
                if index is None:
                    break
                name, body, content_type = mix[index % len(mix)]
                try:
                    try:
                        conn.request("POST", "/v1/predict", body=body, headers={"Content-Type": content_type})
                    except (BrokenPipeError, ConnectionResetError):
                        pass  # the server answered (413) and closed before reading the whole upload
                    response = conn.getresponse()
                    response.read()
                    key = (name, response.status)
                    if response.getheader("Connection", "").lower() == "close":
                        conn.close()
                        conn = http.client.HTTPConnection(host, int(port), timeout=60)
                except OSError as err:
                    key = (name, f"connection error: {type(err).__name__}")
                    conn.close()
                    conn = http.client.HTTPConnection(host, int(port), timeout=60)
                with lock:
                    statuses[key] += 1
                    done = sum(statuses.values())
                    if done % 2000 == 0:
                        rss_trace.append((done, [round(r / 2**20, 1) for r in worker_rss(server)]))
            conn.close()

        threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        after = worker_rss(server)
    rows = [{"case": name, "status": str(status), "count": count} for (name, status), count in sorted(
        statuses.items(), key=lambda item: str(item[0]))]
    print_table(rows, ["case", "status", "count"])
    five_xx = sum(c for (_, s), c in statuses.items() if isinstance(s, int) and s >= 500)
    connection_errors = sum(c for (_, s), c in statuses.items() if not isinstance(s, int))
    summary = {"requests": sum(statuses.values()), "5xx": five_xx, "connection_errors": connection_errors,
               "worker_rss_mb_before": [round(r / 2**20, 1) for r in before],
               "worker_rss_mb_after": [round(r / 2**20, 1) for r in after], "rss_mb_every_2000": rss_trace}
    print(json.dumps(summary))
    write_json(args.out, {**summary, "rows": rows})


if __name__ == "__main__":
    main()
