"""Shared fixtures. Tests read the real data set, weights and detector from ../shared (or the paths
named by MASKWATCH_SHARED_DIR / KERAS_HOME / MASKWATCH_DATA_DIR / MASKWATCH_YUNET_PATH)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MASKWATCH_SHARED_DIR", REPO.parent / "shared")).resolve()
# Where the main job downloads the Kaggle original (RGBA PNGs) on a connected machine.
DOWNLOADED = REPO / "artifacts" / "downloads" / "andrewmvd__face-mask-detection"


def _first_existing(*candidates: Path) -> Path:
    return next((c for c in candidates if c.exists()), candidates[0])


DATA_DIR = Path(os.environ.get("MASKWATCH_DATA_DIR") or _first_existing(SHARED / "data" / "face-mask-detection",
                                                                        DOWNLOADED))
PNG_SAMPLE_DIR = _first_existing(SHARED / "data" / "face-mask-detection-png-sample", DOWNLOADED)
YUNET_PATH = Path(os.environ.get("MASKWATCH_YUNET_PATH") or SHARED / "models" / "face_detection_yunet_2026may.onnx")
if (SHARED / "keras").is_dir():  # otherwise Keras downloads the ImageNet weights itself
    os.environ.setdefault("KERAS_HOME", str(SHARED / "keras"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")  # tests that load onnxruntime themselves send nothing either


def pytest_configure(config):
    if not DATA_DIR.exists():
        raise pytest.UsageError(
            f"no data set at {DATA_DIR}: run the main job first (it downloads it from Kaggle) or set "
            "MASKWATCH_DATA_DIR / MASKWATCH_SHARED_DIR; see README 'Offline use'."
        )


# What a test run may add to the checkout: pytest's and Hypothesis' own caches and Python's bytecode.
_RUN_CACHES = (".pytest_cache/", ".hypothesis/", "__pycache__/")
_checkout_before = pytest.StashKey["set[str] | None"]()


def _left_in_checkout() -> set[str] | None:
    """The checkout's untracked and ignored paths as git lists them (folders whole); None outside a git checkout."""
    try:
        listed = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--ignored"], capture_output=True,
                                text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if listed.returncode != 0:
        return None
    return {line[3:] for line in listed.stdout.splitlines()
            if line[:2] in ("??", "!!") and not line[3:].endswith(_RUN_CACHES)}


def pytest_sessionstart(session):
    if not hasattr(session.config, "workerinput"):  # the one process that sees the whole run, with or without xdist
        session.config.stash[_checkout_before] = _left_in_checkout()


def pytest_sessionfinish(session, exitstatus):
    """Tests write into temp folders, never into the checkout (a test once left an MLflow ./mlruns there)."""
    before = session.config.stash.get(_checkout_before, None)
    after = _left_in_checkout() if before is not None else None
    if after is None or not (added := sorted(after - before)):
        return
    sys.stderr.write(f"\nthe tests left these in the checkout {REPO}: {', '.join(added)}\n")
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_collection_modifyitems(items):
    """The notebook first: it is the longest test file, and scripts/test.sh's two workers take whole files in
    collection order, so collected last (as its name sorts) it would run alone while the other worker idles."""
    items.sort(key=lambda item: item.path.name != "test_notebook.py")  # stable: the rest keep their order


@pytest.fixture(autouse=True)
def tracking_uri_kept_to_its_test():
    """mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI in os.environ, which maskwatch reads: without this, a
    CLI that a later test starts would use an earlier test's store (a stopped server, a deleted SQLite file)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory):
    """Registry models that tests load are cached here (and seen by the CLIs they start), not in ~/.cache."""
    os.environ["MASKWATCH_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def png_sample_dir() -> Path:
    return PNG_SAMPLE_DIR


@pytest.fixture(scope="session")
def yunet_path() -> Path:
    return YUNET_PATH


@pytest.fixture()
def settings_factory(tmp_path):
    """Settings for a small run in a temporary work dir and SQLite store."""
    from maskwatch.config import load_settings

    def make(**sections):
        overrides = {
            "paths": {"work_dir": str(tmp_path / "work")},
            "data": {"source_dir": str(DATA_DIR), "max_photos": 24},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            "evaluate": {"bootstrap_samples": 200},
        }
        for section, values in sections.items():
            overrides.setdefault(section, {}).update(values)
        return load_settings(None, "full", overrides, environ={})

    return make


@pytest.fixture(scope="session")
def small_prepared(tmp_path_factory):
    """A few dozen real crops (24 photos), prepared once per session."""
    from maskwatch.config import load_settings
    from maskwatch.data import prepare_data

    work = tmp_path_factory.mktemp("small")
    settings = load_settings(None, "full", {
        "paths": {"work_dir": str(work)}, "data": {"source_dir": str(DATA_DIR), "max_photos": 24}}, environ={})
    prepared, _ = prepare_data(settings)
    return prepared


@pytest.fixture(scope="session")
def tiny_bundle(small_prepared, tmp_path_factory):
    """A real (briefly trained) model bundle for inference tests: model.keras + metadata.json."""
    from maskwatch.bundle import ModelMetadata, save_bundle
    from maskwatch.config import load_settings
    from maskwatch.train import train_model

    work = tmp_path_factory.mktemp("bundle")
    settings = load_settings(None, "full", {"paths": {"work_dir": str(work)}, "train": {
        "phase1_epochs": 2, "phase2_epochs": 0, "batch_size": 16, "early_stopping_patience": None,
        "reduce_lr_patience": None}}, environ={})
    _, model = train_model(small_prepared.train_df, small_prepared.val_df, settings=settings,
                           model_path=work / "ckpt" / "best.keras")
    from maskwatch.export import export_model

    metadata = ModelMetadata(crop=small_prepared.crop_spec.to_dict(), data_hash=small_prepared.data_hash,
                             model_version="test", metrics={"test_macro_f1": 0.5})
    bundle = save_bundle(model, work / "bundle", metadata)
    export_model(bundle, ["litert"])  # the default serving runtime
    return bundle


@pytest.fixture(scope="session")
def serve_settings(tiny_bundle, tmp_path_factory):
    from maskwatch.config import load_settings

    return load_settings(None, "full", {
        "paths": {"work_dir": str(tmp_path_factory.mktemp("serve"))},
        "detector": {"model_path": str(YUNET_PATH)},
        "serve": {"model_uri": str(tiny_bundle), "max_upload_bytes": 2_000_000, "max_pixels": 8_000_000},
    }, environ={})


@pytest.fixture(scope="session")
def mask_detector(serve_settings):
    from maskwatch.detect import MaskDetector

    return MaskDetector.from_settings(serve_settings)


@pytest.fixture(scope="module")
def client(serve_settings, mask_detector):
    """The Flask app in a test client (real model and YuNet; no server)."""
    from maskwatch.serve import create_app

    return create_app(serve_settings, mask_detector=mask_detector).test_client()


@pytest.fixture(scope="module")
def photo_bytes(data_dir):
    """A data-set photo with three annotated faces, as its file's bytes."""
    return (data_dir / "images" / "maksssksksss0.jpg").read_bytes()


# The classifier's job small enough for a test: 24 photos, one epoch per phase.
TINY_TRAIN_JOB = ["--set", "data.max_photos=24", "--set", "train.phase1_epochs=1", "--set", "train.phase2_epochs=1",
                  "--set", "evaluate.bootstrap_samples=200"]


# For a CLI that must find no way out to the internet whether or not this machine has one: a proxy that refuses.
NO_WAY_OUT = {"https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", "no_proxy": "", "NO_PROXY": ""}


def tooling_warnings(caught: list) -> list[str]:
    """The caught warnings that maskwatch.export keeps from users, found by their own words (not by its patterns,
    which could miss them): Keras' tf2onnx shim's about np.object, TensorFlow's deprecated tf.lite.Interpreter."""
    return [str(w.message) for w in caught
            if "np.object" in str(w.message) or "tf.lite.Interpreter is deprecated" in str(w.message)]


def cli_env(work: Path, data_dir: Path) -> dict:
    """Environment for a CLI run in `work`: the real data set, artifacts and the SQLite store kept inside it."""
    env = {**os.environ, "MASKWATCH_DATA_DIR": str(data_dir), "MASKWATCH_WORK_DIR": str(work / "artifacts")}
    env.pop("MLFLOW_TRACKING_URI", None)  # the default store: mlflow.db in the working folder
    env.pop("MASKWATCH_TRACKING_URI", None)
    return env


# 49 bytes: a 32x24 PNG whose IDAT chunk claims 4 GB. OpenCV allocated it all (8 s, 4 GB) before giving up; found
# by fuzzing decode_upload (tests/fuzz/decode_fuzz.py).
PNG_CHUNK_BOMB = (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00 \x00\x00\x00\x18\x10\x00\x00\x00\x00\xee\xa8|\xab"
                  b"\xff\xff\x04!IDAT8\x1e'\xb3\xe2\x00`\x82")
# 55 bytes: a BMP 2,097,184 x 1 pixels (under the pixel limit) that OpenCV refuses by raising, which was a 500;
# found by the same fuzzing.
BMP_TOO_WIDE = (b"BM6\t\x00\x01\x00\xaa\x00\x006\x00\x00\x00(\x00\x00\x00 \x00 \x00\x01\x00\x00\x00\x00\x00"
                b"\x18\x00\x00\x00\x00\x007\x00\x00\x00\x00\x003Po\xa0a\xc6\xa3JT\x8a*s\xd7\xa5\xc6")


def tiff_with_huge_tiles(tile: int = 16000) -> bytes:
    """A 216-byte 32x24 tiled TIFF whose tiles claim tile x tile pixels. OpenCV allocated 1 GB for it (found by
    fuzzing in CI), so the API refuses TIFF."""
    import struct

    tile_offset, tile_bytes = 8 + 2 + 12 * 11 + 4 + 6, 64
    entries = [(256, 4, 1, 32), (257, 4, 1, 24), (258, 3, 3, tile_offset - 6), (259, 3, 1, 1), (262, 3, 1, 2),
               (277, 3, 1, 3), (284, 3, 1, 1), (322, 4, 1, tile), (323, 4, 1, tile), (324, 4, 1, tile_offset),
               (325, 4, 1, tile_bytes)]  # size, 8-bit RGB, uncompressed, one tile of tile x tile
    ifd = b"".join(struct.pack("<HHI", tag, kind, count) + (struct.pack("<HH", value, 0) if kind == 3 and count == 1
                                                             else struct.pack("<I", value))
                   for tag, kind, count, value in entries)
    return (b"II*\x00" + struct.pack("<IH", 8, len(entries)) + ifd + struct.pack("<I", 0)
            + struct.pack("<HHH", 8, 8, 8) + bytes(tile_bytes))


def phone_jpeg(pixels) -> bytes:
    """A PIL image as a phone stores a photo taken sideways: the pixels as they are, in a JPEG tagged with EXIF
    orientation 6 ("rotate 90 degrees clockwise to display")."""
    import io

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    pixels.convert("RGB").save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_maskwatch_serve(args: list[str], log: Path, env: dict | None = None, cwd: Path | None = None):
    """`maskwatch serve ARGS --port P` (gunicorn, 2 workers), waited on until both workers answer /ready.

    Returns (url, process); the caller stops it with stop_server.
    """
    import time
    import urllib.request

    port = free_port()
    env = {**os.environ, "MASKWATCH_YUNET_PATH": str(YUNET_PATH), **(env or {})}
    with open(log, "w") as handle:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "maskwatch"), "serve", *args, "--port", str(port),
                                 "--workers", "2"], stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                start_new_session=True, preexec_fn=as_from_a_terminal)
    url = f"http://127.0.0.1:{port}"
    deadline, ready_answers = time.time() + 180, 0
    while time.time() < deadline and ready_answers < 6:  # both workers have loaded the model
        try:
            with urllib.request.urlopen(url + "/ready", timeout=5) as response:
                ready_answers += response.status == 200
        except OSError:
            time.sleep(0.5)
        if proc.poll() is not None:
            break
    if ready_answers < 6:
        stop_server(proc)
        pytest.fail(f"gunicorn did not become ready:\n{log.read_text()[-3000:]}")
    return url, proc


def as_from_a_terminal() -> None:
    """preexec_fn for CLI processes whose Ctrl-C handling is tested: a shell running jobs in the background (as CI
    may) starts them with SIGINT ignored, which maskwatch then rightly keeps ignoring; a terminal does not."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop_server(proc) -> None:
    """SIGTERM to the server's whole process group: gunicorn too, even where the CLI itself has already exited."""
    try:
        os.killpg(proc.pid, 15)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


@dataclass
class MlflowServer:
    """A real `mlflow server` (SQLite store, proxied artifacts) on a free localhost port; stop() and start() it
    again on the same port and store to play an outage."""
    folder: Path
    port: int
    process: "subprocess.Popen | None" = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        import time
        import urllib.request

        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--backend-store-uri", f"sqlite:///{self.folder / 'server.db'}", "--artifacts-destination",
             str(self.folder / "server-artifacts"), "--workers", "1"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # freeze() stops its group
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.uri + "/health", timeout=1)
                return
            except OSError:
                time.sleep(0.5)
        self.process.kill()
        pytest.fail("mlflow server did not start")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.thaw()
            self.process.terminate()
            self.process.wait(timeout=30)

    def freeze(self) -> None:
        """SIGSTOP the server and its workers: a server that hangs, whose port still takes connections."""
        os.killpg(self.process.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        os.killpg(self.process.pid, signal.SIGCONT)


def sqlite_run_with_a_logged_epoch(db_path: Path, still_running=lambda: True, timeout: float = 300,
                                   every: float = 1) -> str | None:
    """Poll a job's SQLite store, read-only and without MLflow, until a run has logged a training epoch; returns
    its run id, or None if `still_running()` turned false or `timeout` passed first. MLflow here would create the
    store's tables if it found them missing or half made, racing the job's own creation of them."""
    import sqlite3
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and still_running():
        try:
            with contextlib.closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)) as db:
                row = db.execute("SELECT run_uuid FROM metrics WHERE key = 'phase1_loss' LIMIT 1").fetchone()
        except sqlite3.OperationalError:  # no file yet, or no metrics table yet
            row = None
        if row:
            return row[0]
        time.sleep(every)
    return None


def first_run_with_a_logged_epoch(client, timeout: float = 600, every: float = 0.3):
    """Poll a tracking server until a run of the "maskwatch" experiment has logged a training epoch (mid-training);
    returns that run, or None if `timeout` passed first."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        experiment = client.get_experiment_by_name("maskwatch")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        if runs and client.get_metric_history(runs[0].info.run_id, "phase1_loss"):
            return runs[0]
        time.sleep(every)
    return None


@pytest.fixture()
def mlflow_server(tmp_path):
    server = MlflowServer(tmp_path, free_port())
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gunicorn_server(tiny_bundle, tmp_path_factory):
    """`maskwatch serve` (gunicorn, 2 workers) on a free localhost port."""
    url, proc = start_maskwatch_serve(["--model", str(tiny_bundle)], tmp_path_factory.mktemp("gunicorn") / "server.log")
    yield url
    stop_server(proc)


CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="session")
def playwright_session():
    """One Playwright per test session (its sync API allows only one at a time)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        yield playwright


@pytest.fixture(scope="session")
def browser(playwright_session):
    """Debian's Chromium driven by Playwright (never a downloaded browser)."""
    launched = playwright_session.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
    yield launched
    launched.close()
