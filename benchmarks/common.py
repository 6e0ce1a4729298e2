"""Helpers shared by the benchmark scripts: model location, a gunicorn server, tables and JSON."""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MASKWATCH_SHARED_DIR", REPO.parent / "shared"))
DATA_DIR = Path(os.environ.get("MASKWATCH_DATA_DIR", SHARED / "data" / "face-mask-detection"))
os.environ.setdefault("MASKWATCH_YUNET_PATH", str(SHARED / "models" / "face_detection_yunet_2026may.onnx"))
os.environ.setdefault("KERAS_HOME", str(SHARED / "keras"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}


def print_table(rows: list[dict], columns: list[str], digits: int = 2) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c), digits)) for r in rows)) for c in columns}
    print("  ".join(c.rjust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c), digits).rjust(widths[c]) for c in columns))


def _fmt(value, digits: int = 2) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"machine": machine(), **payload}, indent=2))
    print(f"wrote {path}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def letterboxed_photo(photo: Path, size=(640, 480)) -> bytes:
    """A data-set photo letterboxed to 640x480, as JPEG bytes."""
    import cv2

    from maskwatch.preprocessing import read_image
    from maskwatch.realtime import letterbox

    canvas = letterbox(read_image(photo), size)
    ok, jpeg = cv2.imencode(".jpg", cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return jpeg.tobytes()


@contextmanager
def gunicorn(model: str, runtime: str, workers: int, extra_env: dict | None = None,
             overrides: list[str] | None = None):
    """`maskwatch serve` on a free port (`overrides`: section.key=value settings); yields (url, server process)."""
    port = free_port()
    env = {**os.environ, **(extra_env or {})}
    log = open(REPO / "benchmarks" / "results" / f"server-{port}.log", "w")
    proc = subprocess.Popen([str(Path(sys.executable).parent / "maskwatch"), "serve", "--model", model, "--runtime",
                             runtime, "--port", str(port), "--workers", str(workers),
                             *(arg for pair in overrides or [] for arg in ("--set", pair))], stdout=log,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    ready, deadline = 0, time.time() + 240
    while ready < 3 * workers and time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/ready", timeout=5) as response:
                ready += response.status == 200
        except OSError:
            time.sleep(0.5)
    if ready < 3 * workers:
        os.killpg(proc.pid, signal.SIGTERM)
        raise RuntimeError(f"server did not become ready; see {log.name}")
    try:
        yield url, proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()
        Path(log.name).unlink(missing_ok=True)


def default_model() -> str:
    return os.environ.get("MASKWATCH_MODEL", "models:/maskwatch@champion")


def add_detection_arguments(parser) -> None:
    """--detector, --model, --runtime: the trained face detector and the classifier a detection benchmark runs."""
    parser.add_argument("--detector", type=Path, default=os.environ.get("MASKWATCH_DETECTOR_PATH"),
                        help="face_detector.onnx from maskwatch train-detector (default: $MASKWATCH_DETECTOR_PATH)")
    parser.add_argument("--model", default=default_model(), help="the classifier")
    parser.add_argument("--runtime", default="litert")


def detection_setup(model: str, runtime: str):
    """(settings, prepared data, predictor) for the detection benchmarks: the test photos and one classifier."""
    from maskwatch.config import load_settings
    from maskwatch.data import prepare_data
    from maskwatch.detect import Predictor
    from maskwatch.tracking import resolve_model_uri

    settings = load_settings()
    prepared, _ = prepare_data(settings)
    return settings, prepared, Predictor.from_path(resolve_model_uri(model, settings), runtime)


def detection_row(metrics: dict) -> dict:
    """evaluate_detection's result as one flat table row."""
    return {"map50": metrics["map50"], **{f"ap_{k}": v for k, v in metrics["ap50_per_class"].items()},
            "face_ap50": metrics["face_ap50"], "map50_true_classes": metrics["map50_true_classes"],
            "recall": metrics["face_recall"],
            **{f"recall_{k}": v for k, v in metrics["face_recall_by_size"].items()},
            "ms_per_photo": metrics["ms_per_photo"]}
