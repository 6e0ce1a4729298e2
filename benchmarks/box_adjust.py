"""Fit detector.box_adjust on the training photos, then measure it on the test photos: mAP@0.5, AP, recall.

YuNet's boxes include the forehead; the data set's annotations sit lower and are shorter, so many found faces
overlap their annotation by less than IoU 0.5 and count as misses. The fit is the median shift and scale over
matched training faces; the test split never takes part in it.

    python benchmarks/box_adjust.py --modes off upscale --min-sides 0 640
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from common import REPO, default_model, detection_row, detection_setup, print_table, write_json

RAW = (0.0, 0.0, 1.0, 1.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--runtime", default="litert")
    parser.add_argument("--modes", nargs="+", default=["off", "upscale"])
    parser.add_argument("--min-sides", nargs="+", type=int, default=None,
                        help="detector.min_side values to evaluate (default: the configured one)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "box_adjust.json")
    args = parser.parse_args(argv)

    from maskwatch.detect import MaskDetector, create_face_detector
    from maskwatch.evaluate import evaluate_detection, fit_box_adjustment

    settings, prepared, predictor = detection_setup(args.model, args.runtime)
    raw_detector = settings.detector.model_copy(update={"box_adjust": RAW, "small_face_mode": "off"})
    fitted = fit_box_adjustment(create_face_detector(raw_detector), prepared.train_df)
    print(f"fitted on {fitted['pairs']} training faces: box_adjust = {fitted['box_adjust']} "
          f"(configured default {list(settings.detector.box_adjust)})")
    rows = []
    for mode, min_side in itertools.product(args.modes, args.min_sides or [settings.detector.min_side]):
        for label, adjust in (("raw", RAW), ("fitted", tuple(fitted["box_adjust"])),
                              ("default", settings.detector.box_adjust)):
            config = settings.detector.model_copy(update={"small_face_mode": mode, "box_adjust": adjust,
                                                          "min_side": min_side})
            metrics = evaluate_detection(MaskDetector(predictor, create_face_detector(config)), prepared.test_df)
            rows.append({"mode": mode, "min_side": min_side, "boxes": label, **detection_row(metrics)})
    print_table(rows, list(rows[0]))
    write_json(args.out, {"model": args.model, "runtime": args.runtime, "fit": fitted, "rows": rows})


if __name__ == "__main__":
    main()
