"""The HTTP API (Flask app factory, served by gunicorn) and the web pages. Imports no training code.

gunicorn: gunicorn 'maskwatch.serve:create_app()'  (the model loads once per worker)
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from importlib import resources

import cv2
import numpy as np
from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from maskwatch.config import Settings, load_settings
from maskwatch.detect import MaskDetector, draw_detections
from maskwatch.preprocessing import PNG_SIGNATURE, ImageDecodeError, PixelLimitError, decode_image

log = logging.getLogger(__name__)

# Magic bytes: decodable formats, and image formats we recognise but do not take (415). TIFF is refused: a
# 216-byte tiled TIFF whose tiles claim 16000 x 16000 pixels made OpenCV allocate 1 GB (found by fuzzing).
SUPPORTED_SIGNATURES = {b"\xff\xd8\xff": "jpeg", PNG_SIGNATURE: "png", b"BM": "bmp"}
UNSUPPORTED_SIGNATURES = {b"GIF87a": "gif", b"GIF89a": "gif", b"%PDF": "pdf", b"<svg": "svg", b"<?xml": "xml",
                          b"II*\x00": "tiff", b"MM\x00*": "tiff"}
MAX_FACES_PER_CLASSIFY = 64


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def sniff_format(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    for signature, name in SUPPORTED_SIGNATURES.items():
        if data.startswith(signature):
            return name
    stripped = data[:64].lstrip()
    for signature, name in UNSUPPORTED_SIGNATURES.items():
        if stripped.startswith(signature):
            raise ApiError(415, "unsupported_media_type", f"{name} images are not supported; send JPEG, PNG, BMP "
                                                          "or WebP")
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        raise ApiError(415, "unsupported_media_type", "HEIC/AVIF images are not supported; send JPEG or PNG")
    return None


def decode_upload(data: bytes, max_pixels: int) -> np.ndarray:
    if not data:
        raise ApiError(400, "empty_image", "the image is empty")
    if sniff_format(data) is None:
        raise ApiError(400, "not_an_image", "the data is not an image (JPEG, PNG, BMP or WebP expected)")
    try:
        return decode_image(data, max_pixels=max_pixels)
    except PixelLimitError as err:
        raise ApiError(413, "too_many_pixels", str(err)) from err
    except ImageDecodeError as err:
        raise ApiError(400, "corrupt_image", "the image is corrupt or truncated and cannot be decoded") from err


def decode_crops(images: list[bytes], max_pixels: int) -> Iterator[np.ndarray]:
    """Decode the faces of one request one at a time, all of them within one photo's pixel budget: 64 crops of
    40 M pixels each, 7 MB as PNG, took 7.6 GB and 40 s when they were decoded side by side at 40 M each."""
    left = max_pixels
    for index, data in enumerate(images):
        try:
            crop = decode_upload(data, left)
        except ApiError as err:
            if err.code == "too_many_pixels" and left < max_pixels:
                raise ApiError(413, "too_many_pixels", f"face {index} takes the faces of this request over "
                                                       f"{max_pixels} pixels together") from err
            raise
        left -= crop.shape[0] * crop.shape[1]
        yield crop


def _b64(payload: str) -> bytes:
    if payload.startswith("data:") and "," in payload:  # data URLs from browsers
        payload = payload.split(",", 1)[1]
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ApiError(400, "malformed_base64", "the 'image' field is not valid base64") from err


def images_from_request(field_names: tuple[str, ...], json_key: str) -> list[bytes]:
    """Raw image bytes from multipart files, a JSON body with base64, or a raw image body."""
    content_type = (request.mimetype or "").lower()
    if content_type == "multipart/form-data":
        files = [f for name in field_names for f in request.files.getlist(name)]
        if not files:
            # A part whose name werkzeug cannot parse (a line break in it) comes back as None.
            sent = sorted(str(name) for name in set(request.files) | set(request.form))
            raise ApiError(400, "missing_field", f"send the image in a multipart field named "
                                                 f"{' or '.join(repr(n) for n in field_names)} (got {sent or 'none'})")
        return [f.read() for f in files]
    if content_type == "application/json":
        body = request.get_json(silent=True)
        if not isinstance(body, dict):
            raise ApiError(400, "malformed_json", "the body is not a JSON object")
        values = body.get(json_key)
        if values is None:
            raise ApiError(400, "missing_field", f"the JSON body needs a {json_key!r} field with base64 image data "
                                                 f"(got {sorted(body)})")
        values = values if isinstance(values, list) else [values]
        if not values or not all(isinstance(v, str) for v in values):
            raise ApiError(400, "malformed_field", f"{json_key!r} must be a base64 string or a list of them")
        return [_b64(v) for v in values]
    if content_type.startswith("image/"):
        return [request.get_data()]
    if not request.content_length:
        raise ApiError(400, "empty_body", "the request has no body; send an image (multipart, JSON base64 or raw)")
    raise ApiError(415, "unsupported_media_type",
                   f"Content-Type {content_type or 'none'} is not accepted; use multipart/form-data, "
                   "application/json or image/*")


class Metrics:
    """Prometheus metrics; gunicorn workers share them through PROMETHEUS_MULTIPROC_DIR when it is set."""

    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("maskwatch_requests_total", "HTTP requests", ["route", "status"],
                                registry=self.registry)
        self.latency = Histogram("maskwatch_request_seconds", "Request latency", ["route"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1, 2, 5))
        self.predictions = Counter("maskwatch_predictions_total", "Faces classified per class", ["label"],
                                   registry=self.registry)
        self.errors = Counter("maskwatch_errors_total", "Error responses per code", ["code"], registry=self.registry)

    def exposition(self) -> bytes:
        from prometheus_client import CollectorRegistry, generate_latest, multiprocess

        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def create_app(settings: Settings | None = None, mask_detector: MaskDetector | None = None,
               model_uri: str | None = None) -> Flask:
    """App factory. The model and detector load once here (once per gunicorn worker)."""
    settings = settings or load_settings()
    app = Flask(__name__, static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.serve.max_upload_bytes
    app.json.sort_keys = False
    state: dict = {"detector": mask_detector, "error": None}
    metrics = Metrics()
    # All cores per worker by default: lowest latency per request (benchmarks/load.py); 1 thread per worker
    # trades that for a little throughput when every worker is busy.
    threads = settings.serve.inference_threads or os.cpu_count() or 1
    cv2.setNumThreads(threads)
    load_lock = threading.Lock()

    def detector() -> MaskDetector:
        if state["detector"] is None:
            with load_lock:
                if state["detector"] is None:
                    try:
                        state["detector"] = MaskDetector.from_settings(settings, model_uri, num_threads=threads)
                    except Exception as err:  # reported by /ready and as 503, never a crash
                        state["error"] = f"{type(err).__name__}: {err}"
                        log.exception("model or detector failed to load")
                        raise ApiError(503, "not_ready", f"model not loaded: {state['error']}") from err
        return state["detector"]

    if mask_detector is None and os.environ.get("MASKWATCH_LAZY_LOAD") != "1":
        try:
            detector()
        except ApiError:
            pass  # the app still starts: /health answers, /ready says why not

    def require_key() -> None:
        key = settings.serve.api_key
        if not key:
            return
        # As bytes: compare_digest raises on non-ASCII text, and a client may send any header bytes.
        sent = request.headers.get("X-API-Key", "").encode("utf-8", "surrogatepass")
        if not hmac.compare_digest(sent, key.encode("ascii")):
            raise ApiError(401, "unauthorized", "missing or wrong X-API-Key header")

    @app.before_request
    def _start_timer():
        request.environ["maskwatch.started"] = time.perf_counter()

    @app.after_request
    def _record(response: Response):
        route = request.url_rule.rule if request.url_rule else "unmatched"
        metrics.requests.labels(route, str(response.status_code)).inc()
        metrics.latency.labels(route).observe(time.perf_counter() - request.environ.get("maskwatch.started", 0))
        return response

    @app.errorhandler(ApiError)
    def _api_error(err: ApiError):
        metrics.errors.labels(err.code).inc()
        return jsonify(error={"code": err.code, "message": err.message}), err.status

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(err):
        return _api_error(ApiError(413, "payload_too_large",
                                   f"the upload is larger than {settings.serve.max_upload_bytes} bytes"))

    @app.errorhandler(HTTPException)
    def _http_error(err: HTTPException):
        return _api_error(ApiError(err.code or 500, err.name.lower().replace(" ", "_"), err.description or err.name))

    @app.errorhandler(Exception)
    def _unexpected(err: Exception):
        log.exception("unhandled error")
        return _api_error(ApiError(500, "internal_error", "internal error; see the server log"))

    @app.get("/health")
    def health():
        return jsonify(status="ok")

    @app.get("/ready")
    def ready():
        if state["detector"] is None:
            return jsonify(ready=False, reason=state["error"] or "model not loaded yet"), 503
        return jsonify(ready=True)

    @app.get("/v1/model")
    def model_info():
        predictor = detector().predictor
        meta = predictor.metadata
        return jsonify(name=settings.tracking.registered_model_name, version=meta.model_version, run_id=meta.run_id,
                       classes=predictor.class_names, input_size=meta.input_size, crop=meta.crop,
                       runtime=predictor.runtime, data_hash=meta.data_hash, test_metrics=meta.metrics,
                       face_detector=settings.detector.backend)

    @app.get("/metrics")
    def prometheus():
        return Response(metrics.exposition(), mimetype="text/plain; version=0.0.4")

    @app.post("/v1/predict")
    def predict():
        require_key()
        images = images_from_request(("image", "file"), "image")
        if len(images) != 1:
            raise ApiError(400, "one_image", f"send exactly one image to /v1/predict (got {len(images)})")
        mask_detector = detector()
        started = time.perf_counter()
        image = decode_upload(images[0], settings.serve.max_pixels)
        decoded = time.perf_counter()
        detections = mask_detector.detect(image)
        for det in detections:
            metrics.predictions.labels(det.label).inc()
        timings = mask_detector.last_timings
        body = {
            "detections": [d.to_dict() for d in detections],
            "image": {"width": int(image.shape[1]), "height": int(image.shape[0])},
            "timings_ms": {"decode": round((decoded - started) * 1e3, 2), "detect": round(timings.detect_ms, 2),
                           "classify": round(timings.classify_ms, 2)},
        }
        if _truthy(request.args.get("annotate") or request.form.get("annotate")):
            annotated = cv2.cvtColor(draw_detections(image, detections), cv2.COLOR_RGB2BGR)
            ok, jpeg = cv2.imencode(".jpg", annotated, [cv2.IMWRITE_JPEG_QUALITY, 90])
            body["annotated_image"] = "data:image/jpeg;base64," + base64.b64encode(jpeg.tobytes()).decode()
        return jsonify(body)

    @app.post("/v1/classify")
    def classify():
        require_key()
        images = images_from_request(("image", "images", "file"), "images")
        if len(images) > MAX_FACES_PER_CLASSIFY:
            raise ApiError(413, "too_many_images", f"at most {MAX_FACES_PER_CLASSIFY} faces per request")
        predictor = detector().predictor
        probabilities = predictor.classify_crops(decode_crops(images, settings.serve.max_pixels))
        results = []
        for p in probabilities:
            label = predictor.class_names[int(np.argmax(p))]
            metrics.predictions.labels(label).inc()
            results.append({"label": label, "score": float(np.max(p)),
                            "probabilities": {n: float(v) for n, v in zip(predictor.class_names, p)}})
        return jsonify(results=results)

    @app.get("/")
    def index():
        return Response(_page("index.html"), mimetype="text/html")

    @app.get("/openapi.json")
    def openapi():
        return Response(_openapi_json(), mimetype="application/json")

    @app.get("/live")
    def live():
        page = _page("live.html").replace("__REALTIME__", json.dumps(settings.realtime.model_dump()))
        return Response(page, mimetype="text/html")

    return app


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("1", "true", "yes", "on")


def _page(name: str) -> str:
    return resources.files("maskwatch").joinpath("web", name).read_text()


def openapi_spec() -> dict:
    """The API's OpenAPI 3.1 description (web/openapi.yaml), at this package's version."""
    import yaml

    from maskwatch import __version__

    spec = yaml.safe_load(_page("openapi.yaml"))
    spec["info"]["version"] = __version__
    return spec


@functools.cache
def _openapi_json() -> str:
    # Parsed once per process: parsing the YAML took 20 ms, on every request.
    return json.dumps(openapi_spec())


def gunicorn_command(bind: str, workers: int, worker_class: str, control_socket: str) -> list[str]:
    import sys

    app_spec = "maskwatch.serve:create_app()"
    # gevent without keep-alive: a kept-alive connection stays with one worker and its next request, already
    # there, is served before the other connections' (p99 935 ms with it, 137 ms without at 8 clients; load.py).
    keep_alive = ["--keep-alive", "0"] if worker_class == "gevent" else []
    # gunicorn's control socket (for gunicornc) defaults to one path per user, ~/.gunicorn/gunicorn.ctl: a second
    # server took it over, and the first of them to stop deleted it. So each server gets its own.
    return [sys.executable, "-m", "gunicorn", "--bind", bind, "--workers", str(workers), "--worker-class",
            worker_class, *keep_alive, "--timeout", "120", "--graceful-timeout", "10", "--access-logfile", "-",
            "--control-socket", control_socket, app_spec]


def run_server(command: list[str], env: dict[str, str]) -> int:
    """Run gunicorn as a child until it exits; returns its exit status.

    A stop signal sent to this process alone (`kill`, `docker stop`, a service manager) is passed on, so gunicorn
    stops its workers gracefully and this process lives to remove its temporary folder; before, SIGTERM killed
    it at once, leaving gunicorn running orphaned or the folder behind.
    """
    import subprocess

    from maskwatch.signals import handling_stop_signals

    server = subprocess.Popen(command, env=env)

    def forward(signum, _frame) -> None:
        if server.poll() is None:
            server.send_signal(signum)

    # SIGHUP too: to gunicorn it means "reload the workers", which is what a HUP to the server should do.
    with handling_stop_signals(forward):
        return server.wait()


def serve_environment(settings: Settings, model_uri: str | None, metrics_dir: str) -> dict[str, str]:
    """Settings travel to gunicorn workers as environment variables and a config file."""
    env = dict(os.environ)
    env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    config_path = os.path.join(metrics_dir, "maskwatch-serve.yaml")
    with open(config_path, "w") as handle:
        handle.write(settings.to_yaml())
    env["MASKWATCH_CONFIG"] = config_path
    if model_uri:
        env["MASKWATCH_MODEL"] = model_uri
    return env


