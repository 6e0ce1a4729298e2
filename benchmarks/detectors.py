"""YuNet vs the face detector trained on this data set (maskwatch train-detector), on the val and test photos.

Each row: mAP@0.5, per-class AP, face recall by size and ms per photo (2 CPU threads here). The trained
detector is scored alone (its own class opinion) and with the classifier at several class_fusion weights, and
with its face score raised to several powers in the per-class scores (detector.trained_face_score_power);
its defaults (score threshold, fusion, power) are chosen on the val rows, never on test.

    python benchmarks/detectors.py --detector artifacts/runs/<run>/face_detector/face_detector.onnx
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from common import REPO, add_detection_arguments, detection_row, detection_setup, print_table, write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_detection_arguments(parser)
    parser.add_argument("--fusions", nargs="+", type=float, default=[0.0, 0.3, 0.5, 0.7])
    parser.add_argument("--thresholds", nargs="+", type=float, default=[0.05, 0.2],
                        help="the trained detector's score thresholds")
    parser.add_argument("--face-score-powers", nargs="+", type=float, default=[1.0, 0.5],
                        help="the trained detector's face score power in the per-class scores")
    parser.add_argument("--splits", nargs="+", default=["val", "test"])
    parser.add_argument("--sides", nargs="+", type=int, default=[],
                        help="also run the trained detector at these input sides (first threshold and fusion)")
    parser.add_argument("--timing-only", action="store_true",
                        help="only time the face detectors (median ms per test photo, nothing else running)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default: results/detectors.json, or detectors_timing.json)")
    args = parser.parse_args(argv)
    if not args.detector or not Path(args.detector).is_file():
        parser.error("--detector: no face_detector.onnx given or found (train one with maskwatch train-detector)")

    from maskwatch.detect import MaskDetector, create_face_detector, ranking_face_score_power
    from maskwatch.evaluate import evaluate_detection

    settings, prepared, predictor = detection_setup(args.model, args.runtime)
    results = REPO / "benchmarks" / "results"
    if args.timing_only:
        rows = time_detectors(settings, Path(args.detector), prepared.test_df)
        print_table(rows, list(rows[0]))
        write_json(args.out or results / "detectors_timing.json", {"detector": str(args.detector), "rows": rows})
        return
    frames = {"val": prepared.val_df, "test": prepared.test_df}
    yunet = settings.detector

    def trained_at(threshold: float, **update):
        return yunet.model_copy(update={"backend": "centernet", "trained_model_path": Path(args.detector),
                                        "trained_score_threshold": threshold, **update})

    variants = [("yunet", yunet, True, 0.0),
                ("yunet upscale@0.3", yunet.model_copy(update={"small_face_mode": "upscale", "score_threshold": 0.3}),
                 True, 0.0)]
    for threshold, power in itertools.product(args.thresholds, args.face_score_powers):
        trained = trained_at(threshold, trained_face_score_power=power)
        label = f"trained@{threshold} power {power:g}"
        variants.append((f"{label} alone", trained, False, 0.0))
        variants += [(label, trained, True, fusion) for fusion in args.fusions]
    for side in args.sides:  # a larger input for the small faces: chosen on val like the rest
        variants.append((f"trained@{args.thresholds[0]} side {side}",
                         trained_at(args.thresholds[0], trained_input_side=side,
                                    trained_face_score_power=args.face_score_powers[0]), True, args.fusions[0]))
    rows = []
    for split in args.splits:
        for label, config, with_classifier, fusion in variants:
            detector = MaskDetector(predictor if with_classifier else None, create_face_detector(config), fusion)
            metrics = evaluate_detection(detector, frames[split], progress=False,
                                         face_score_power=ranking_face_score_power(config))
            rows.append({"split": split, "detector": label, "fusion": fusion if with_classifier else None,
                         **detection_row(metrics)})
            print(f"{split} {label} fusion {fusion}: mAP {metrics['map50']:.3f}", flush=True)
    print_table(rows, list(rows[0]))
    write_json(args.out or results / "detectors.json",
               {"detector": str(args.detector), "model": args.model, "runtime": args.runtime, "rows": rows})


def time_detectors(settings, detector_path: Path, faces, repeats: int = 3) -> list[dict]:
    """Face detection alone (no classifier), per test photo: median and p90 ms over all photos and repeats."""
    import time

    import numpy as np

    from maskwatch.detect import create_face_detector
    from maskwatch.preprocessing import read_image

    photos = [read_image(path) for path in sorted(faces["image_path"].unique())]
    configs = {"yunet": settings.detector,
               "trained": settings.detector.model_copy(update={"backend": "centernet",
                                                               "trained_model_path": detector_path})}
    rows = []
    for name, config in configs.items():
        detector = create_face_detector(config)
        detector.detect(photos[0])  # warm-up
        times = []
        for _ in range(repeats):
            for photo in photos:
                started = time.perf_counter()
                detector.detect(photo)
                times.append((time.perf_counter() - started) * 1e3)
        rows.append({"detector": name, "photos": len(photos), "median_ms": float(np.median(times)),
                     "p90_ms": float(np.percentile(times, 90))})
    rows[1]["ratio_to_yunet"] = rows[1]["median_ms"] / rows[0]["median_ms"]
    rows[0]["ratio_to_yunet"] = 1.0
    return rows


if __name__ == "__main__":
    main()
