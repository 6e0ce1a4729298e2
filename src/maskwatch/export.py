"""Export the classifier for fast inference: LiteRT (float, int8) and ONNX, written into the model bundle."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from maskwatch.bundle import bundle_paths, read_metadata, write_metadata

log = logging.getLogger(__name__)

EXPORT_FILES = {"litert": "model_float.tflite", "litert_int8": "model_int8.tflite", "onnx": "model.onnx"}


@dataclass
class ExportResult:
    runtime: str
    path: Path
    size_bytes: int


def calibration_batches(train_df: pd.DataFrame, count: int = 200, seed: int = 0):
    """Representative data for int8: real training crops, every class included."""
    from maskwatch.preprocessing import read_image

    per_class = max(count // max(train_df["label"].nunique(), 1), 1)
    picks = train_df.groupby("label", group_keys=False).apply(
        lambda g: g.sample(min(len(g), per_class), random_state=seed))
    for path in picks["crop_path"]:
        yield [read_image(path)[None].astype(np.float32)]


def export_model(bundle: Path, formats: list[str], calibration_df: pd.DataFrame | None = None) -> list[ExportResult]:
    import keras
    import tensorflow as tf

    model_file, _ = bundle_paths(bundle)
    bundle_dir = model_file.parent
    metadata = read_metadata(bundle)
    model = keras.models.load_model(model_file, compile=False)
    size = metadata.input_size
    signature = [tf.TensorSpec([None, size, size, 3], tf.float32, name="image")]
    results = []
    for fmt in formats:
        log.info("exporting %s", fmt)
        target = bundle_dir / EXPORT_FILES[fmt]
        if fmt == "litert":
            model.export(str(target), format="litert", input_signature=signature, verbose=False)
        elif fmt == "litert_int8":
            if calibration_df is None or calibration_df.empty:
                raise ValueError("int8 export needs calibration crops from the training split")
            model.export(str(target), format="litert", input_signature=signature, verbose=False,
                         optimizations=[tf.lite.Optimize.DEFAULT],
                         representative_dataset=lambda: calibration_batches(calibration_df))
        elif fmt == "onnx":
            model.export(str(target), format="onnx", input_signature=signature, verbose=False)
        else:
            raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(EXPORT_FILES)}")
        results.append(ExportResult(fmt, target, target.stat().st_size))
    metadata.exports = {**metadata.exports, **{r.runtime: r.path.name for r in results}}
    write_metadata(bundle_dir, metadata)
    return results


def parity_report(bundle: Path, test_df: pd.DataFrame, runtimes: list[str], batch_size: int = 32) -> dict:
    """Per runtime: class agreement with the Keras model on the test crops, max probability gap, macro-F1."""
    from sklearn.metrics import f1_score

    from maskwatch.detect import Predictor
    from maskwatch.preprocessing import read_image

    crops = np.stack([read_image(p) for p in test_df["crop_path"]])
    truth = test_df["label"].to_numpy()

    def run(runtime: str) -> np.ndarray:
        predictor = Predictor.from_path(bundle, runtime)
        return np.concatenate([predictor.predict_inputs(crops[i:i + batch_size])
                               for i in range(0, len(crops), batch_size)])

    reference = run("keras")
    names = np.array(read_metadata(bundle).class_names)
    report = {"keras": {"agreement": 1.0, "max_abs_diff": 0.0,
                        "macro_f1": float(f1_score(truth, names[reference.argmax(1)], average="macro"))}}
    for runtime in runtimes:
        probs = run(runtime)
        report[runtime] = {
            "agreement": float((probs.argmax(1) == reference.argmax(1)).mean()),
            "max_abs_diff": float(np.abs(probs - reference).max()),
            "macro_f1": float(f1_score(truth, names[probs.argmax(1)], average="macro")),
        }
    return report
