"""Classifier latency per runtime (batch 1 and 8) and end-to-end FPS on 640x480 video with 1, 3 and 10 faces.

    python benchmarks/runtimes.py --model models:/maskwatch@champion
    python benchmarks/runtimes.py --model models:/maskwatch/1 models:/maskwatch/4   # two models in one run
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from common import DATA_DIR, REPO, default_model, print_table, write_json

RUNTIMES = ["keras", "litert", "litert_int8", "onnx"]


def per_face_latency(predictor, batch: int, calls: int) -> float:
    size = predictor.metadata.input_size
    faces = np.random.default_rng(0).integers(0, 255, (batch, size, size, 3), dtype=np.uint8)
    for _ in range(5):
        predictor.predict_inputs(faces)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        predictor.predict_inputs(faces)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def keras_predict_latency(model_file: Path, batch: int, calls: int) -> float:
    """The reference the serving path avoids: Keras model.predict per call."""
    import keras

    model = keras.models.load_model(model_file, compile=False)
    faces = np.random.default_rng(0).integers(0, 255, (batch, *model.input_shape[1:])).astype(np.float32)
    for _ in range(3):
        model.predict(faces, verbose=0)
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        model.predict(faces, verbose=0)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e3


def photos_with_faces(face_detector, counts: list[int], limit: int = 853) -> dict[int, Path]:
    """For each wanted count, a data-set photo in which YuNet finds exactly that many faces at 640x480."""
    from maskwatch.preprocessing import read_image
    from maskwatch.realtime import letterbox

    found: dict[int, Path] = {}
    for index in range(limit):
        path = DATA_DIR / "images" / f"maksssksksss{index}.jpg"
        n = len(face_detector.detect(letterbox(read_image(path))))
        if n in counts and n not in found:
            found[n] = path
        if len(found) == len(counts):
            break
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=[default_model()])
    parser.add_argument("--runtimes", nargs="+", default=RUNTIMES)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--frames", type=int, default=90)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "runtimes.json")
    args = parser.parse_args(argv)

    from maskwatch.bundle import bundle_paths
    from maskwatch.config import load_settings
    from maskwatch.detect import MaskDetector, Predictor, create_face_detector
    from maskwatch.realtime import make_test_video, run_video
    from maskwatch.tracking import resolve_model_uri

    settings = load_settings()
    latency_rows, predictors = [], {}
    for uri in args.model:
        bundle = resolve_model_uri(uri, settings)
        for batch in (1, 8):
            ms = keras_predict_latency(bundle_paths(bundle)[0], batch, 20)
            latency_rows.append({"model": uri, "runtime": "keras model.predict", "batch": batch, "ms_per_call": ms,
                                 "ms_per_face": ms / batch})
        for runtime in args.runtimes:
            predictor = predictors[uri, runtime] = Predictor.from_path(bundle, runtime)
            for batch in (1, 8):
                ms = per_face_latency(predictor, batch, args.calls)
                latency_rows.append({"model": uri, "input": predictor.metadata.input_size, "runtime": runtime,
                                     "batch": batch, "ms_per_call": ms, "ms_per_face": ms / batch})
    print_table(latency_rows, ["model", "input", "runtime", "batch", "ms_per_call", "ms_per_face"])

    face_detector = create_face_detector(settings.detector)
    photos = photos_with_faces(face_detector, [1, 3, 10])
    fps_rows = []
    for faces, photo in sorted(photos.items()):
        video = make_test_video([photo], REPO / "benchmarks" / "results" / f"video_{faces}_faces.mp4",
                                frames_per_photo=args.frames)
        for (uri, runtime), predictor in predictors.items():
            summary = run_video(MaskDetector(predictor, face_detector), str(video), display=False)
            fps_rows.append({"faces": faces, "photo": photo.name, "model": uri, "runtime": runtime,
                             "fps": summary.fps, **{f"{k}_ms": v for k, v in summary.stage_ms.items()}})
        video.unlink()
    print_table(fps_rows, ["faces", "photo", "model", "runtime", "fps", "capture_ms", "detect_ms", "classify_ms",
                           "draw_ms"])
    write_json(args.out, {"models": args.model, "latency": latency_rows, "fps": fps_rows})


if __name__ == "__main__":
    main()
