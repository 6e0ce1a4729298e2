"""Hostile input: many requests mixing valid photos and broken inputs against gunicorn.
Reports status counts (target: zero 5xx), worker memory before and after, and each worker's peak.

    python benchmarks/hostile.py --requests 10000 --concurrency 8 --classify-floods 16
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import struct
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import psutil

from common import DATA_DIR, REPO, default_model, gunicorn, letterboxed_photo, print_table, write_json


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width=60000, height=60000) -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + png_chunk(b"IEND", b""))


def png_claiming_4gb() -> bytes:
    """A 32x24 PNG whose IDAT chunk claims 4 GB: OpenCV used to allocate it all (found by fuzzing)."""
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 32, 24, 16, 0, 0, 0, 0))
            + struct.pack(">I", 0xFFFF0421) + b"IDAT" + bytes(8))


def tiff_with_huge_tiles(tile=16000) -> bytes:
    """A 32x24 tiled TIFF whose tiles claim tile x tile pixels: OpenCV allocated 1 GB (found by fuzzing); the API
    now refuses TIFF."""
    tile_offset = 8 + 2 + 12 * 11 + 4 + 6
    entries = [(256, 4, 1, 32), (257, 4, 1, 24), (258, 3, 3, tile_offset - 6), (259, 3, 1, 1), (262, 3, 1, 2),
               (277, 3, 1, 3), (284, 3, 1, 1), (322, 4, 1, tile), (323, 4, 1, tile), (324, 4, 1, tile_offset),
               (325, 4, 1, 64)]
    ifd = b"".join(struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3 and count == 1
                                                             else struct.pack("<I", value))
                   for tag, kind, count, value in entries)
    return (b"II*\x00" + struct.pack("<IH", 8, len(entries)) + ifd + struct.pack("<I", 0)
            + struct.pack("<HHH", 8, 8, 8) + bytes(64))


def bmp_too_wide(width=2_097_184) -> bytes:
    """A BMP header of width x 1 pixels: under the pixel limit, but over OpenCV's width limit (it raised)."""
    return (struct.pack("<2sIHHI", b"BM", 54 + 8, 0, 0, 54)
            + struct.pack("<IiiHHIIiiII", 40, width, 1, 1, 24, 0, 8, 0, 0, 0, 0) + bytes(8))


def multipart(*parts: tuple[str, str, bytes]) -> tuple[bytes, str]:
    """A multipart body of (field name, file name, data) parts, and its Content-Type."""
    boundary = "maskwatchboundary"
    body = b"".join(
        (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
         f"Content-Type: application/octet-stream\r\n\r\n").encode() + data + b"\r\n"
        for field, filename, data in parts)
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def cases(photo: bytes) -> list[tuple[str, bytes, str]]:
    valid_multipart = multipart(("image", "p.jpg", photo))
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
        ("wrong_field", *multipart(("picture", "p.jpg", photo))),
        # werkzeug names the first part None; listing it beside the second's name was a 500
        ("line_break_field_name", *multipart(("a\nb", "p.jpg", photo), ("c", "c.jpg", photo))),
        ("png_claiming_4gb", png_claiming_4gb(), "image/png"),
        ("bmp_too_wide", bmp_too_wide(), "image/bmp"),
        ("tiff_with_huge_tiles", tiff_with_huge_tiles(), "image/tiff"),
        ("text", b"plain text", "text/plain"),
    ]


def megabytes(values: list[int]) -> list[float]:
    return [round(v / 2**20, 1) for v in values]


def worker_rss(server) -> list[int]:
    return [child.memory_info().rss for child in psutil.Process(server.pid).children(recursive=True)]


def worker_peak_rss(server) -> list[int]:
    """Each worker's peak resident memory since it started (VmHWM): a passing spike that sampling would miss."""
    peaks = []
    for child in psutil.Process(server.pid).children(recursive=True):
        status = Path(f"/proc/{child.pid}/status").read_text()
        peaks.append(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) * 1024)
    return peaks


def classify_flood(faces: int = 64, side: int = 6300) -> tuple[bytes, str]:
    """`faces` crops of side x side black pixels (39.7 M each, under serve.max_pixels) as PNG: 7 MB of upload,
    under serve.max_upload_bytes. Decoded side by side they took 7.6 GB; they now share one photo's budget."""
    import cv2
    import numpy as np

    face = cv2.imencode(".png", np.zeros((side, side, 3), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])[1].tobytes()
    return multipart(*(("images", f"{i}.png", face) for i in range(faces)))


def send_all(url: str, server, jobs: list[tuple[str, str, bytes, str]], concurrency: int,
             statuses: Counter, rss_trace: list) -> None:
    """POST every (name, path, body, content type) job from `concurrency` keep-alive connections."""
    host, port = url.removeprefix("http://").split(":")
    lock, next_index = threading.Lock(), iter(range(len(jobs)))

    def connect():
        return http.client.HTTPConnection(host, int(port), timeout=120)

    def worker():
        conn = connect()
        while True:
            with lock:
                index = next(next_index, None)
            if index is None:
                break
            name, path, body, content_type = jobs[index]
            try:
                try:
                    conn.request("POST", path, body=body, headers={"Content-Type": content_type})
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the server answered (413) and closed before reading the whole upload
                response = conn.getresponse()
                response.read()
                key = (name, response.status)
                if response.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = connect()
            except OSError as err:
                key = (name, f"connection error: {type(err).__name__}")
                conn.close()
                conn = connect()
            with lock:
                statuses[key] += 1
                done = sum(statuses.values())
                if done % 2000 == 0:
                    rss_trace.append((done, megabytes(worker_rss(server))))
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(min(concurrency, len(jobs)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--runtime", default="litert")
    parser.add_argument("--requests", type=int, default=10000, help="the mix of valid and broken photos")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--classify-floods", type=int, default=16,
                        help="then this many /v1/classify requests of 64 faces at 39.7 M pixels each")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "hostile.json")
    args = parser.parse_args(argv)
    mix = cases(letterboxed_photo(DATA_DIR / "images" / "maksssksksss35.jpg"))
    jobs = [(name, "/v1/predict", body, content_type) for i in range(args.requests)
            for name, body, content_type in [mix[i % len(mix)]]]
    flood = classify_flood()
    floods = [("classify_flood", "/v1/classify", *flood)] * args.classify_floods
    statuses: Counter = Counter()
    rss_trace: list = []
    with gunicorn(args.model, args.runtime, 2) as (url, server):
        before, started = worker_rss(server), time.perf_counter()
        send_all(url, server, jobs, args.concurrency, statuses, rss_trace)
        after, peak, seconds = worker_rss(server), worker_peak_rss(server), time.perf_counter() - started
        started = time.perf_counter()
        send_all(url, server, floods, args.concurrency, statuses, [])
        flood_peak, flood_seconds = worker_peak_rss(server), time.perf_counter() - started
    rows = [{"case": name, "status": str(status), "count": count} for (name, status), count in sorted(
        statuses.items(), key=lambda item: str(item[0]))]
    print_table(rows, ["case", "status", "count"])
    five_xx = sum(c for (_, s), c in statuses.items() if isinstance(s, int) and s >= 500)
    connection_errors = sum(c for (_, s), c in statuses.items() if not isinstance(s, int))
    summary = {"requests": sum(statuses.values()), "5xx": five_xx, "connection_errors": connection_errors,
               "worker_rss_mb_before": megabytes(before), "worker_rss_mb_after": megabytes(after),
               "rss_mb_every_2000": rss_trace, "worker_peak_rss_mb": megabytes(peak), "seconds": round(seconds, 1),
               "classify_floods": args.classify_floods, "classify_flood_upload_mb": round(len(flood[0]) / 2**20, 2),
               "worker_peak_rss_mb_after_floods": megabytes(flood_peak),
               "classify_flood_seconds": round(flood_seconds, 1)}
    print(json.dumps(summary))
    write_json(args.out, {**summary, "rows": rows})


if __name__ == "__main__":
    main()
