"""The val mAP that detector training keeps its best epoch by: memory and time per pass, by batch size, and
whether it agrees with the serving path (the ONNX export behind MaskDetector, scored by evaluate_detection).

Each batch size runs in its own process so its peak memory (max RSS) is its own.

    python benchmarks/detector_validation.py --run artifacts/runs/<run>/face_detector --batches 4 8 16
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from common import REPO, print_table, write_json

CHILD = """
import json, resource, sys, time
from pathlib import Path
import keras
from maskwatch.config import load_settings
from maskwatch.data import split_faces
from maskwatch.train_detector import ValidationScoring, photos_from_faces, validation_map
settings = load_settings()
val = photos_from_faces(split_faces(settings)[1], progress=False)
model = keras.models.load_model(Path(sys.argv[1]) / "face_detector.keras", compile=False)
side, batch = int(sys.argv[2]), int(sys.argv[3])
seconds = []
for _ in range(2):  # the first pass includes TensorFlow's warm-up
    started = time.perf_counter()
    value = validation_map(model, val, side, ValidationScoring.of(settings.detector), batch)
    seconds.append(time.perf_counter() - started)
print(json.dumps({"photos": len(val), "val_map50": value, "first_s": seconds[0], "second_s": seconds[1],
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, required=True,
                        help="a face_detector folder from maskwatch train-detector (.keras and .onnx)")
    parser.add_argument("--batches", nargs="+", type=int, default=[4, 8, 16])
    parser.add_argument("--side", type=int, default=640)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "detector_validation.json")
    args = parser.parse_args(argv)
    if not (args.run / "face_detector.keras").is_file() or not (args.run / "face_detector.onnx").is_file():
        parser.error(f"--run: {args.run} needs face_detector.keras and face_detector.onnx")

    rows = []
    for batch in args.batches:
        done = subprocess.run([sys.executable, "-c", CHILD, str(args.run), str(args.side), str(batch)],
                              capture_output=True, text=True)
        if done.returncode != 0:  # -9: killed, most likely for memory
            rows.append({"path": "training", "batch": batch, "error": f"exit {done.returncode}"})
        else:
            rows.append({"path": "training", "batch": batch, **json.loads(done.stdout.strip().splitlines()[-1])})
        print(rows[-1], flush=True)
    rows.append(serving_row(args.run, args.side))
    print_table(rows, ["path", "batch", "photos", "val_map50", "first_s", "second_s", "peak_rss_gib", "error"])
    write_json(args.out, {"run": str(args.run), "side": args.side, "rows": rows})


def serving_row(run: Path, side: int) -> dict:
    """The same val photos through the serving path: ONNX, the photo's own letterbox, min face size, clipping."""
    import time

    from maskwatch.config import load_settings
    from maskwatch.data import split_faces
    from maskwatch.detect import MaskDetector, create_face_detector, for_evaluation, ranking_face_score_power
    from maskwatch.evaluate import evaluate_detection

    settings = load_settings()
    val_df = split_faces(settings)[1]
    config = for_evaluation(settings.detector.model_copy(update={
        "backend": "centernet", "trained_model_path": run / "face_detector.onnx", "trained_input_side": side}))
    started = time.perf_counter()
    metrics = evaluate_detection(MaskDetector(None, create_face_detector(config)), val_df, progress=False,
                                 face_score_power=ranking_face_score_power(config))
    return {"path": "serving (ONNX)", "photos": metrics["photos"], "val_map50": metrics["map50"],
            "first_s": time.perf_counter() - started}


if __name__ == "__main__":
    main()
