"""Can the classifier's scores be read as probabilities, and would temperature scaling fix them if not?

For one classifier (the champion by default) on the val and test crops: expected calibration error of the top
class, multiclass Brier score and log loss, accuracy and macro-F1, as served (class bias included) and after
temperature scaling (p ** (1/T), renormalised) with T fitted on val by log loss. Accuracy and macro-F1 cannot
change (the order of a face's classes stays), but the scores do, and detection mAP ranks faces across photos by
them: --detection also scores YuNet + classifier on the val and test photos with either.

    python benchmarks/calibration.py --detection
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from common import REPO, default_model, detection_setup, print_table, write_json


def tempered(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """Probabilities at another temperature: softmax(log p / T)."""
    logits = np.log(np.clip(probabilities, 1e-7, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def fit_temperature(probabilities: np.ndarray, y_true: np.ndarray) -> float:
    """The temperature that minimises log loss (on held-out faces), searched over log T in [1/8, 8]."""
    from scipy.optimize import minimize_scalar
    from sklearn.metrics import log_loss

    labels = range(probabilities.shape[1])
    found = minimize_scalar(lambda log_t: log_loss(y_true, tempered(probabilities, np.exp(log_t)), labels=labels),
                            bounds=(np.log(1 / 8), np.log(8)), method="bounded")
    return float(np.exp(found.x))


class TemperedPredictor:
    """A Predictor whose probabilities are rescaled by a temperature (what serving would return with it)."""

    def __init__(self, predictor, temperature: float):
        self.predictor, self.temperature = predictor, temperature
        self.class_names, self.crop_spec = predictor.class_names, predictor.crop_spec

    def predict_inputs(self, faces: np.ndarray) -> np.ndarray:
        probabilities = self.predictor.predict_inputs(faces)
        return tempered(probabilities, self.temperature) if len(probabilities) else probabilities


def crop_probabilities(predictor, frame, batch_size: int = 64) -> np.ndarray:
    from maskwatch.preprocessing import read_image

    return predictor.predict_inputs(np.stack([read_image(path) for path in frame["crop_path"]]), batch_size)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model(), help="the classifier (registry URI or bundle folder)")
    parser.add_argument("--runtime", default="litert")
    parser.add_argument("--bins", type=int, default=10, help="confidence bins of the calibration error")
    parser.add_argument("--detection", action="store_true", help="also detection mAP with YuNet, with either score")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "calibration.json")
    args = parser.parse_args(argv)

    from maskwatch.data import label_indices
    from maskwatch.detect import MaskDetector, create_face_detector
    from maskwatch.evaluate import calibration_metrics, evaluate_detection
    from sklearn.metrics import accuracy_score, f1_score

    settings, prepared, predictor = detection_setup(args.model, args.runtime)
    frames = {"val": prepared.val_df, "test": prepared.test_df}
    truth = {split: label_indices(frame) for split, frame in frames.items()}
    served = {split: crop_probabilities(predictor, frame) for split, frame in frames.items()}
    temperature = fit_temperature(served["val"], truth["val"])
    print(f"temperature fitted on {len(truth['val'])} val faces: {temperature:.3f}")
    scalings = {"as served": (1.0, predictor), f"temperature {temperature:.2f}":
                (temperature, TemperedPredictor(predictor, temperature))}
    face_detector = create_face_detector(settings.detector) if args.detection else None
    rows, bins = [], {}
    for split, frame in frames.items():
        for name, (value, scorer) in scalings.items():
            probabilities = tempered(served[split], value)
            calibration = calibration_metrics(truth[split], probabilities, args.bins)
            bins[f"{split} {name}"] = calibration["bins"]
            predicted = probabilities.argmax(1)
            row = {"split": split, "scores": name, "faces": len(predicted),
                   "accuracy": accuracy_score(truth[split], predicted),
                   "macro_f1": f1_score(truth[split], predicted, average="macro"),
                   **{key: calibration[key] for key in ("ece", "brier", "log_loss", "mean_confidence")}}
            if face_detector is not None:
                row["detection_map50"] = evaluate_detection(MaskDetector(scorer, face_detector), frame,
                                                            progress=False)["map50"]
            rows.append(row)
            print(f"{split} {name}: ECE {row['ece']:.4f}", flush=True)
    columns = ["split", "scores", "faces", "accuracy", "macro_f1", "ece", "brier", "log_loss", "mean_confidence"] + (
        ["detection_map50"] if args.detection else [])
    print_table(rows, columns, digits=3)
    print("\nreliability as served (faces, accuracy and mean confidence per bin of top-class confidence):")
    print_table([{"split": split, "bin": f"{b['low']:.1f}-{b['high']:.1f}", "faces": b["faces"],
                  "accuracy": b["accuracy"], "mean_confidence": b["mean_confidence"]}
                 for split in frames for b in bins[f"{split} as served"] if b["faces"]],
                ["split", "bin", "faces", "accuracy", "mean_confidence"], digits=3)
    write_json(args.out, {"model": args.model, "runtime": args.runtime, "temperature": temperature,
                          "bins_per_row": args.bins, "rows": rows, "bins": bins})


if __name__ == "__main__":
    main()
