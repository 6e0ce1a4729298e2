"""Detector + classifier on the test photos with each small-face mode: mAP@0.5, per-class AP, recall by size.

    python benchmarks/small_faces.py --modes off upscale tile
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from common import REPO, default_model, detection_row, detection_setup, print_table, write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--runtime", default="litert")
    parser.add_argument("--modes", nargs="+", default=["off", "upscale", "tile"])
    parser.add_argument("--score-thresholds", nargs="+", type=float, default=[0.5, 0.3])
    parser.add_argument("--min-sides", nargs="+", type=int, default=None,
                        help="detector.min_side values: small photos enlarged to this long side, one pass "
                             "(default: the configured one)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "small_faces.json")
    args = parser.parse_args(argv)

    from maskwatch.detect import MaskDetector, create_face_detector
    from maskwatch.evaluate import evaluate_detection

    settings, prepared, predictor = detection_setup(args.model, args.runtime)
    rows = []
    min_sides = args.min_sides or [settings.detector.min_side]
    for mode, threshold, min_side in itertools.product(args.modes, args.score_thresholds, min_sides):
        detector_config = settings.detector.model_copy(update={"small_face_mode": mode, "score_threshold": threshold,
                                                               "min_side": min_side})
        metrics = evaluate_detection(MaskDetector(predictor, create_face_detector(detector_config)), prepared.test_df)
        rows.append({"mode": mode, "score_threshold": threshold, "min_side": min_side, **detection_row(metrics)})
    print_table(rows, list(rows[0]))
    write_json(args.out, {"model": args.model, "runtime": args.runtime, "rows": rows})


if __name__ == "__main__":
    main()
