"""Export the classifier for fast inference: LiteRT (float, int8) and ONNX, written into the model bundle."""

from __future__ import annotations

import io
import json
import logging
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from maskwatch.bundle import bundle_paths, read_metadata, write_metadata

log = logging.getLogger(__name__)

EXPORT_FILES = {"litert": "model_float.tflite", "litert_int8": "model_int8.tflite", "onnx": "model.onnx"}
# int8: a layer whose output misses float by more than this many quantization steps (RMS) is a candidate to keep
# in float. Plain rounding costs about 0.29 steps (1/sqrt(12)); the last Dense, which absorbs the head's
# BatchNormalization, misses by about 17 in v4, while every other layer stays under 1.4.
INT8_MAX_ERROR_STEPS = 3.0


@dataclass
class Int8Export:
    """What the int8 export measured and kept."""

    float_layers: list[str]  # kept in float: empty = the plain int8 model
    layer_errors: pd.Series | None = None  # RMS error per layer in quantization steps (with selection crops)
    agreement: dict[str, float] = field(default_factory=dict)  # "plain" / "with float layers" on selection crops


@dataclass
class ExportResult:
    runtime: str
    path: Path
    size_bytes: int
    float_layers: list[str] = field(default_factory=list)  # int8: the layers kept in float


def calibration_batches(train_df: pd.DataFrame, count: int = 200, seed: int = 0):
    """Representative data for int8: real training crops, every class included."""
    from maskwatch.preprocessing import read_image

    per_class = max(count // max(train_df["label"].nunique(), 1), 1)
    picks = train_df.groupby("label", group_keys=False).apply(
        lambda g: g.sample(min(len(g), per_class), random_state=seed))
    for path in picks["crop_path"]:
        yield [read_image(path)[None].astype(np.float32)]


def export_model(bundle: Path, formats: list[str], calibration_df: pd.DataFrame | None = None,
                 selection_df: pd.DataFrame | None = None) -> list[ExportResult]:
    """Write the exports into the bundle. int8 is calibrated on `calibration_df` (training crops) and, given
    `selection_df` (validation crops), keeps badly quantized layers in float only where that agrees better with
    Keras there.

    Every format needs TensorFlow (LiteRT's converter, tf2onnx), so under another backend (JAX) the bundle's
    backend-neutral .keras file is exported by a TensorFlow subprocess.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        return _export_model_with_tensorflow(bundle, formats, calibration_df, selection_df)
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
        float_layers: list[str] = []
        if fmt == "litert":
            model.export(str(target), format="litert", input_signature=signature, verbose=False)
        elif fmt == "litert_int8":
            if calibration_df is None or calibration_df.empty:
                raise ValueError("int8 export needs calibration crops from the training split")
            float_layers = export_int8_litert(model, signature, calibration_df, target, selection_df).float_layers
        elif fmt == "onnx":
            export_onnx_file(model, target, signature)
        else:
            raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(EXPORT_FILES)}")
        results.append(ExportResult(fmt, target, target.stat().st_size, float_layers))
    metadata.exports = {**metadata.exports, **{r.runtime: r.path.name for r in results}}
    write_metadata(bundle_dir, metadata)
    return results


# Warnings raised inside Keras' and TensorFlow's own code that say nothing about the model and that a user cannot
# act on, but that `maskwatch export` and `train-detector` printed: Keras' tf2onnx shim probes `np.object` (a
# FutureWarning under numpy 2.4), and TensorFlow's QuantizationDebugger still builds the deprecated
# tf.lite.Interpreter. (category, message pattern) pairs.
TOOLING_WARNINGS = ((FutureWarning, r"In the future `np\.object`"),
                    (UserWarning, r"\s*Warning: tf\.lite\.Interpreter is deprecated"))


@contextmanager
def without_tooling_warnings():
    with warnings.catch_warnings():
        for category, pattern in TOOLING_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern, category=category)
        yield


def export_onnx_file(model, target: Path, input_signature) -> None:
    with without_tooling_warnings():
        model.export(str(target), format="onnx", input_signature=input_signature, verbose=False)


def run_under_tensorflow(code: str, *args: str, what: str) -> None:
    """Runs Python `code` (given `args` as sys.argv[1:]) in a subprocess with the TensorFlow backend."""
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                          env={**os.environ, "KERAS_BACKEND": "tensorflow"})
    if done.returncode != 0:
        raise RuntimeError(f"{what} under TensorFlow failed:\n{done.stderr[-3000:]}")


def _export_model_with_tensorflow(bundle: Path, formats: list[str], calibration_df: pd.DataFrame | None,
                                  selection_df: pd.DataFrame | None) -> list[ExportResult]:
    code = """
import json, sys
from pathlib import Path
import pandas as pd
from maskwatch.export import export_model
folder = sys.argv[2]
frames = [pd.read_csv(f"{folder}/{name}.csv") if name in sys.argv[4:] else None
          for name in ("calibration", "selection")]
results = export_model(Path(sys.argv[1]), json.loads(sys.argv[3]), *frames)
with open(f"{folder}/results.json", "w") as out:
    json.dump([[r.runtime, str(r.path), r.size_bytes, r.float_layers] for r in results], out)
"""
    with tempfile.TemporaryDirectory() as folder:
        given = []
        for name, frame in (("calibration", calibration_df), ("selection", selection_df)):
            if frame is not None:  # only what the export reads: the crops' files and labels
                frame[["crop_path", "label"]].to_csv(Path(folder) / f"{name}.csv", index=False)
                given.append(name)
        run_under_tensorflow(code, str(bundle), folder, json.dumps(formats), *given, what=f"Export of {bundle}")
        rows = json.loads((Path(folder) / "results.json").read_text())
    return [ExportResult(runtime, Path(path), size, float_layers) for runtime, path, size, float_layers in rows]


def export_int8_litert(model, signature, calibration_df: pd.DataFrame, target: Path,
                       selection_df: pd.DataFrame | None = None,
                       max_error_steps: float = INT8_MAX_ERROR_STEPS) -> Int8Export:
    """int8 LiteRT calibrated on training crops; says which layers it kept in float and why.

    TensorFlow's quantization debugger compares the float and int8 models layer by layer on training crops.
    Keeping the layers that miss by more than `max_error_steps` in float helps v4 (test agreement with Keras
    0.909 -> 0.961) but hurts v1 (0.969 -> 0.948): an error can offset another. So both models are built and
    the one that agrees more with Keras on `selection_df` is kept; without it, the plain int8 model.
    """
    import tensorflow as tf

    def debug_crops():
        return calibration_batches(calibration_df, count=60, seed=1)

    with tempfile.TemporaryDirectory() as folder, without_tooling_warnings():
        model.export(folder, format="tf_saved_model", input_signature=signature, verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(folder)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: calibration_batches(calibration_df)
        # The plain model through the debugger too: converter.convert() from the SavedModel quantizes differently
        # (other bytes), and in one CI run its int8 model of the test bundle fell below the parity test's bar.
        debugger = tf.lite.experimental.QuantizationDebugger(converter=converter, debug_dataset=debug_crops)
        candidates = {(): debugger.get_nondebug_quantized_model()}
        errors = _int8_layer_errors(debugger) if selection_df is not None and not selection_df.empty else None
        suspects = () if errors is None else tuple(errors.index[errors > max_error_steps])
        if errors is not None:
            log.info("int8: %d of %d layers miss float by more than %.2g steps (worst %.2g)", len(suspects),
                     len(errors), max_error_steps, errors.max())
        if suspects and len(suspects) < len(errors):  # all of them in float would be a float model
            options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=list(suspects))
            candidates[suspects] = tf.lite.experimental.QuantizationDebugger(
                converter=converter, debug_dataset=debug_crops, debug_options=options).get_nondebug_quantized_model()
    agreement, chosen = {}, ()
    if len(candidates) > 1:
        agreement = _agreement_with_keras(model, candidates, selection_df)
        chosen = max(candidates, key=lambda kept: (agreement[kept], -len(kept)))
        log.info("int8 agreement with Keras on %d selection crops: plain %.4f, %d layer(s) in float %.4f; kept %s",
                 len(selection_df), agreement[()], len(suspects), agreement[suspects],
                 "plain" if not chosen else f"{len(chosen)} in float")
    target.write_bytes(candidates[chosen])
    return Int8Export(list(chosen), errors, {("with float layers" if kept else "plain"): value
                                             for kept, value in agreement.items()})


def _int8_layer_errors(debugger) -> pd.Series:
    debugger.run()
    dump = io.StringIO()
    debugger.layer_statistics_dump(dump)
    dump.seek(0)
    return int8_error_steps(pd.read_csv(dump))


def int8_error_steps(statistics: pd.DataFrame) -> pd.Series:
    """Per quantized tensor of the debugger's layer statistics: its int8 output's RMS error against float, in
    quantization steps (the tensor's scale)."""
    steps = np.sqrt(statistics["mean_squared_error"].to_numpy()) / statistics["scale"].to_numpy()
    return pd.Series(steps, index=statistics["tensor_name"].to_numpy(), name="error_steps")


def _agreement_with_keras(model, candidates: dict, crops_df: pd.DataFrame, batch_size: int = 32) -> dict:
    """Per candidate .tflite model (bytes): the share of crops on which it picks the Keras model's class."""
    import keras

    from maskwatch.detect import litert_runtime
    from maskwatch.preprocessing import read_image

    crops = np.stack([read_image(path) for path in crops_df["crop_path"]])
    batches = [crops[i:i + batch_size].astype(np.float32) for i in range(0, len(crops), batch_size)]
    reference = np.concatenate([keras.ops.convert_to_numpy(model(b, training=False)).argmax(1) for b in batches])
    agreement = {}
    with tempfile.TemporaryDirectory() as folder:
        for index, (key, content) in enumerate(candidates.items()):
            path = Path(folder) / f"candidate{index}.tflite"
            path.write_bytes(content)
            infer = litert_runtime(path, num_threads=1)
            agreement[key] = float((np.concatenate([infer(b).argmax(1) for b in batches]) == reference).mean())
    return agreement


def parity_report(bundle: Path, test_df: pd.DataFrame, runtimes: list[str], batch_size: int = 32) -> dict:
    """Per runtime: class agreement with the Keras model on the test crops, max probability gap, macro-F1."""
    from sklearn.metrics import f1_score

    from maskwatch.detect import Predictor
    from maskwatch.preprocessing import read_image

    crops = np.stack([read_image(p) for p in test_df["crop_path"]])
    truth = test_df["label"].to_numpy()

    def run(runtime: str) -> np.ndarray:
        return Predictor.from_path(bundle, runtime).predict_inputs(crops, batch_size)

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
