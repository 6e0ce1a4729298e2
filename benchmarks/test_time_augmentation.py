"""Does a second look help? Horizontal-flip test-time augmentation and detector ensembles, on val and test.

Ways to run the trained detector + classifier (class_fusion from the settings, the serving defaults
otherwise), each scored by evaluate_detection (mAP@0.5, face AP, mAP with true classes):
  plain            one pass of each network (what serving does)
  detector flip    the detector also sees the mirrored photo; its maps are mirrored back and averaged
  classifier flip  the classifier also sees each mirrored crop; probabilities averaged
  both             the two together
  ensemble         with --ensemble: more trained detectors see the photo; all their maps are averaged
  ensemble + flip  the ensemble, each member also on the mirrored photo
ms per photo is measured in the same run; ratios are to plain.

    python benchmarks/test_time_augmentation.py --detector artifacts/runs/<run>/face_detector/face_detector.onnx
    python benchmarks/test_time_augmentation.py --detector <onnx> --ensemble <other onnx> ... --variants ensemble
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import numpy as np

from common import REPO, add_detection_arguments, detection_row, detection_setup, print_table, write_json

SINGLE_VARIANTS = ("plain", "detector flip", "classifier flip", "both")
ENSEMBLE_VARIANTS = ("ensemble", "ensemble + flip")  # with --ensemble only


def with_heads(detector, heads):
    """A copy of a trained detector that decodes `heads` instead of its own (it shares the loaded model)."""
    variant = copy.copy(detector)
    variant.heads = heads
    return variant


def averaged_heads(detectors):
    """The heads of several trained detectors for the same image, averaged: an ensemble with one decoding."""

    def heads(boxed: np.ndarray) -> np.ndarray:
        return np.mean([detector.heads(boxed) for detector in detectors], axis=0)

    return heads


class FlipAveragedPredictor:
    """A Predictor whose probabilities are averaged over each crop and its mirror image."""

    def __init__(self, predictor):
        self.predictor, self.class_names, self.crop_spec = predictor, predictor.class_names, predictor.crop_spec

    def predict_inputs(self, faces: np.ndarray) -> np.ndarray:
        if len(faces) == 0:
            return self.predictor.predict_inputs(faces)
        return 0.5 * (self.predictor.predict_inputs(faces) + self.predictor.predict_inputs(faces[:, :, ::-1].copy()))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_detection_arguments(parser)
    parser.add_argument("--splits", nargs="+", default=["val", "test"])
    parser.add_argument("--ensemble", nargs="+", type=Path, default=[],
                        help="more face_detector.onnx files, averaged with --detector's maps")
    parser.add_argument("--variants", nargs="+", default=None, choices=SINGLE_VARIANTS + ENSEMBLE_VARIANTS,
                        help="run only these (plain is always run; the ensembles need --ensemble)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "test_time_augmentation.json")
    args = parser.parse_args(argv)
    if not args.detector or not Path(args.detector).is_file():
        parser.error("--detector: no face_detector.onnx given or found (train one with maskwatch train-detector)")
    if missing := [str(path) for path in args.ensemble if not path.is_file()]:
        parser.error(f"--ensemble: not a file: {', '.join(missing)}")
    if not args.ensemble and (asked := set(args.variants or []) & set(ENSEMBLE_VARIANTS)):
        parser.error(f"--variants: {sorted(asked)} need --ensemble")

    from maskwatch.centernet import flip_averaged
    from maskwatch.detect import MaskDetector, create_face_detector, for_evaluation, ranking_face_score_power
    from maskwatch.evaluate import evaluate_detection

    settings, prepared, predictor = detection_setup(args.model, args.runtime)
    config = for_evaluation(settings.detector.model_copy(update={"backend": "centernet", "trained_flip": False,
                                                                 "trained_model_path": args.detector}))
    plain_detector = create_face_detector(config)
    flip_detector = with_heads(plain_detector, flip_averaged(plain_detector.heads))
    flip_predictor = FlipAveragedPredictor(predictor)
    variants = dict(zip(SINGLE_VARIANTS, [(plain_detector, predictor), (flip_detector, predictor),
                                          (plain_detector, flip_predictor), (flip_detector, flip_predictor)]))
    if args.ensemble:
        members = [plain_detector] + [create_face_detector(config.model_copy(update={"trained_model_path": path}))
                                      for path in args.ensemble]
        averaged = averaged_heads(members)
        ensemble = with_heads(plain_detector, averaged)
        ensemble_flip = with_heads(plain_detector, flip_averaged(averaged))
        variants.update(zip(ENSEMBLE_VARIANTS, [(ensemble, predictor), (ensemble_flip, predictor)]))
    if args.variants:
        variants = {name: pair for name, pair in variants.items() if name == "plain" or name in args.variants}
    frames = {"val": prepared.val_df, "test": prepared.test_df}
    rows = []
    for split in args.splits:
        for name, (face_detector, classifier) in variants.items():
            metrics = evaluate_detection(MaskDetector(classifier, face_detector, config.class_fusion), frames[split],
                                         progress=False, face_score_power=ranking_face_score_power(config))
            rows.append({"split": split, "variant": name, **detection_row(metrics)})
            print(f"{split} {name}: mAP {metrics['map50']:.3f}", flush=True)
        plain = next(r for r in rows if r["split"] == split and r["variant"] == "plain")
        for row in rows:
            if row["split"] == split:
                row["map50_gain"] = row["map50"] - plain["map50"]
                row["time_ratio"] = row["ms_per_photo"] / plain["ms_per_photo"]
    print_table(rows, ["split", "variant", "map50", "map50_gain", "ap_with_mask", "ap_without_mask",
                       "ap_mask_weared_incorrect", "face_ap50", "map50_true_classes", "ms_per_photo", "time_ratio"])
    write_json(args.out, {"detector": str(args.detector), "ensemble": [str(path) for path in args.ensemble],
                          "model": args.model, "runtime": args.runtime,
                          "class_fusion": config.class_fusion, "rows": rows})


if __name__ == "__main__":
    main()
