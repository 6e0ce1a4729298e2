"""The face detector under KERAS_BACKEND=jax, the route a GPU machine takes: built, exported and trained through
maskwatch's own code on this CPU (each in a subprocess, since a process's Keras backend is fixed at import)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("jax", reason="jax is in the dev extra for Python >= 3.11")

MASKWATCH = str(Path(sys.executable).parent / "maskwatch")
# A detector job small enough for 2 CPU cores: 16 photos, 2 epochs at 192 px.
TINY_DETECTOR_JOB = ["--preset", "quick", "--set", "data.max_photos=16", "--set", "detector_train.epochs=2",
                     "--set", "detector_train.batch_size=4", "--set", "detector_train.train_canvas=192",
                     "--set", "detector_train.input_side=192"]


def jax_env(base: dict | None = None) -> dict:
    return {**(base or os.environ), "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}


@pytest.mark.slow  # 70 s, most of it tf2onnx; the TensorFlow-built detector's export is in the default tier
def test_a_detector_built_under_jax_exports_to_onnx_with_the_same_outputs(tmp_path):
    """Keras' own JAX export cannot give a free input size; export_onnx hands the .keras file to TensorFlow."""
    script = f"""
import keras, numpy as np, onnxruntime as ort
from maskwatch.train_detector import build_face_detector, export_onnx
assert keras.backend.backend() == "jax"
keras.utils.set_random_seed(3)
model = build_face_detector(weights=None)
model.save("{tmp_path}/face_detector.keras")
onnx_file = export_onnx("{tmp_path}/face_detector.keras", "{tmp_path}/face_detector.onnx")
session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
worst = 0.0
for shape in ((1, 64, 96, 3), (2, 128, 128, 3)):
    x = np.random.default_rng(1).uniform(0, 255, shape).astype("float32")
    got = session.run(None, {{session.get_inputs()[0].name: x}})[0]
    worst = max(worst, float(np.abs(got - keras.ops.convert_to_numpy(model(x))).max()))
print("max difference", worst)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=jax_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.split("max difference")[1]) < 1e-4, out.stdout


def test_augmentation_runs_in_tf_data_under_jax_and_draws_what_tensorflow_draws(tmp_path):
    """The classifier's augmenter runs inside tf.data; under JAX only a keras.layers.Pipeline may (a Sequential
    failed there), and with the same seed it makes the same batches as under TensorFlow."""
    script = """
import sys, numpy as np, keras, tensorflow as tf
from maskwatch.config import AugmentConfig
from maskwatch.data import build_augmenter
x = np.random.default_rng(0).uniform(0, 255, (4, 48, 48, 3)).astype("float32")
augmenter = build_augmenter(AugmentConfig(), seed=42)
batches = tf.data.Dataset.from_tensor_slices(x).batch(2).map(lambda b: augmenter(b, training=True))
np.save(sys.argv[1], np.concatenate([b.numpy() for b in batches]))
"""
    made = {}
    for backend in ("jax", "tensorflow"):
        made[backend] = tmp_path / f"{backend}.npy"
        env = {**jax_env(), "KERAS_BACKEND": backend}
        out = subprocess.run([sys.executable, "-c", script, str(made[backend])], capture_output=True, text=True,
                             timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
    import numpy as np

    under_jax, under_tensorflow = np.load(made["jax"]), np.load(made["tensorflow"])
    assert under_jax.shape == (4, 48, 48, 3) and np.abs(under_jax - under_tensorflow).max() == 0.0
    source = np.random.default_rng(0).uniform(0, 255, (4, 48, 48, 3)).astype("float32")
    assert np.abs(under_jax - source).mean() > 1.0  # augmented, not passed through


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_the_compiled_predict_step_sees_each_epochs_weights_as_an_eager_call_does(backend):
    """validation_map runs inside fit through predict_on_batch: at each epoch's end it must give what calling
    the model gives, with that epoch's weights (under JAX, fit keeps its own copy of the state while it runs)."""
    script = """
import json, keras, numpy as np
from maskwatch.centernet import OUTPUT_CHANNELS
from maskwatch.train_detector import build_face_detector
model = build_face_detector(weights=None)
model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
rng = np.random.default_rng(0)
x = rng.uniform(0, 255, (8, 64, 64, 3)).astype("float32")
y = rng.uniform(0, 1, (8, 16, 16, OUTPUT_CHANNELS)).astype("float32")
outputs = []
class Compare(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        compiled = np.asarray(self.model.predict_on_batch(x[:4]))
        eager = keras.ops.convert_to_numpy(self.model(x[:4], training=False))
        outputs.append((compiled, float(np.abs(compiled - eager).max())))
model.fit(x, y, batch_size=4, epochs=2, verbose=0, callbacks=[Compare()])
print(json.dumps({"backend": keras.backend.backend(), "gaps": [gap for _, gap in outputs],
                  "moved": float(np.abs(outputs[0][0] - outputs[1][0]).max())}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**jax_env(), "KERAS_BACKEND": backend})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["backend"] == backend and len(seen["gaps"]) == 2 and max(seen["gaps"]) < 1e-5, seen
    assert seen["moved"] > 1e-3, seen  # the weights did move between the two epochs


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_the_weight_average_is_what_each_epochs_end_sees_and_training_goes_on_from_the_raw_weights(backend):
    """detector_train.ema_momentum: one step an epoch, so the raw weights after each step come from a run without
    the average; at each epoch's end the callbacks after weight_average_callbacks must see the average of those,
    and the next step must start from the raw weights, not the average (under JAX, fit keeps its own state)."""
    script = """
import json, keras, numpy as np, tempfile
from maskwatch.config import DetectorTrainConfig
from maskwatch.train_detector import detector_optimizer, weight_average_callbacks
x, y = np.ones((1, 1), "float32"), np.zeros((1, 1), "float32")
def weights_at_epoch_ends(config):
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
    model.compile(optimizer=detector_optimizer(config), loss="mse")
    seen = []
    class Record(keras.callbacks.Callback):  # as the val mAP callback does: predict, then save the weights
        def on_epoch_end(self, epoch, logs=None):
            predicted = float(np.asarray(self.model.predict_on_batch(x))[0, 0])
            self.model.save_weights(f"{tempfile.mkdtemp()}/kept.weights.h5")
            seen.append(predicted)
    model.fit(x, y, batch_size=1, epochs=6, verbose=0, validation_data=(x, y),
              callbacks=[*weight_average_callbacks(config), Record()])
    return seen
raw = weights_at_epoch_ends(DetectorTrainConfig(learning_rate=0.1))
averaged = weights_at_epoch_ends(DetectorTrainConfig(learning_rate=0.1, ema_momentum=0.5))
print(json.dumps({"backend": keras.backend.backend(), "raw": raw, "averaged": averaged}))
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         env={**jax_env(), "KERAS_BACKEND": backend})
    assert out.returncode == 0, out.stderr[-3000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["backend"] == backend
    expected, average = [], None
    for weight in seen["raw"]:  # Keras' rule: the first step's weights, then 0.5 x average + 0.5 x weights
        average = weight if average is None else 0.5 * average + 0.5 * weight
        expected.append(average)
    assert seen["raw"][-1] < seen["raw"][0] - 0.3  # the weight moved, so the average lags it
    np.testing.assert_allclose(seen["averaged"], expected, atol=1e-5)


@pytest.mark.slow
def test_train_job_runs_under_jax_and_its_model_serves_under_either_backend(tmp_path, data_dir):
    """The classifier's whole job under JAX: training, the LiteRT export (a TensorFlow subprocess), MLflow with
    the JAX packages pinned, the registry. The registered model then predicts the same under JAX's Keras runtime,
    TensorFlow's and LiteRT."""
    from importlib import metadata as distributions

    import mlflow
    import numpy as np

    from conftest import TINY_TRAIN_JOB, cli_env
    from maskwatch.detect import Predictor

    env = jax_env(cli_env(tmp_path, data_dir))
    out = subprocess.run([MASKWATCH, "train", *TINY_TRAIN_JOB], capture_output=True, text=True, timeout=900, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "promoted=True" in out.stdout and "[phase2] epoch 1/1" in out.stderr

    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    version = client.get_model_version_by_alias("maskwatch", "champion")
    mlflow.set_tracking_uri(tracking_uri)
    requirements = Path(mlflow.artifacts.download_artifacts(f"runs:/{version.run_id}/model/requirements.txt",
                                                            dst_path=str(tmp_path / "logged"))).read_text().split()
    assert {f"{name}=={distributions.version(name)}" for name in ("jax", "jaxlib", "keras")} <= set(requirements)
    assert not [line for line in requirements if line.startswith("tensorflow")], requirements

    bundle = next((tmp_path / "artifacts" / "runs").glob("*/model"))
    assert (bundle / "model_float.tflite").stat().st_size > 1_000_000
    script = """
import sys, numpy as np
from maskwatch.detect import Predictor
faces = np.random.default_rng(5).uniform(0, 255, (3, 160, 160, 3)).astype("float32")
np.save(sys.argv[2], Predictor.from_path(sys.argv[1], "keras").predict_inputs(faces))
"""
    under_jax = subprocess.run([sys.executable, "-c", script, str(bundle), str(tmp_path / "jax.npy")],
                               capture_output=True, text=True, timeout=300, env=env)
    assert under_jax.returncode == 0, under_jax.stderr[-3000:]
    faces = np.random.default_rng(5).uniform(0, 255, (3, 160, 160, 3)).astype("float32")
    reference = np.load(tmp_path / "jax.npy")
    assert reference.shape == (3, 3)
    for runtime in ("keras", "litert"):  # this process: the TensorFlow backend
        np.testing.assert_allclose(Predictor.from_path(bundle, runtime).predict_inputs(faces), reference, atol=1e-4)


@pytest.mark.slow
def test_train_detector_job_runs_under_jax(tmp_path, data_dir):
    from conftest import cli_env

    args = TINY_DETECTOR_JOB
    out = subprocess.run([MASKWATCH, "train-detector", *args], capture_output=True, text=True, timeout=900,
                         env=jax_env(cli_env(tmp_path, data_dir)), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "detector epoch 2: val mAP@0.5" in out.stdout and "face detector job finished" in out.stdout
    model_dir = next((tmp_path / "artifacts" / "runs").glob("*/face_detector"))
    record = json.loads((model_dir / "train_config.json").read_text())
    assert record["backend"] == "jax" and record["best_epoch"] == 2
    assert (model_dir / "face_detector.onnx").stat().st_size > 1_000_000

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.get_run(model_dir.parent.name)
    assert run.info.status == "FINISHED" and 0.0 <= run.data.metrics["det_alone_map50"] <= 1.0


# Makes TensorFlow and MLflow unimportable, as on a GPU machine that has only JAX: any import of them fails as if
# they were not installed (keras' own optional-TensorFlow probes take that as "absent").
WITHOUT_TENSORFLOW_AND_MLFLOW = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("tensorflow", "mlflow", "tf2onnx"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Absent())
"""


@pytest.mark.slow
def test_gpu_route_needs_neither_tensorflow_nor_mlflow_and_comes_back_with_trained(tmp_path, data_dir):
    """The GPU route as scripts/gpu/ runs it: pack.sh (without wheels: they need the network), then
    train_detectors.sh with TensorFlow and MLflow unimportable, as on a machine that has only JAX; back home,
    --trained exports, scores and logs the model with that machine's record."""
    from conftest import cli_env

    args = TINY_DETECTOR_JOB
    repo = Path(__file__).resolve().parents[2]
    pack, out_dir = tmp_path / "pack", tmp_path / "gpu-machine" / "lr1e-3"
    packed = subprocess.run(["bash", str(repo / "scripts" / "gpu" / "pack.sh"), str(pack), "--no-wheels"],
                            capture_output=True, text=True, timeout=300,
                            env={**cli_env(tmp_path, data_dir), "PYTHON": sys.executable})
    assert packed.returncode == 0, packed.stderr[-3000:]
    originals = sorted((data_dir / "images").iterdir())
    packed_photos = [pack / "data" / "images" / original.name for original in originals]
    assert all(photo.is_file() for photo in packed_photos)
    for original, photo in list(zip(originals, packed_photos))[::40]:  # re-encoded or copied: the same pixels
        assert np.array_equal(cv2.imread(str(original)), cv2.imread(str(photo))), photo.name
    if shutil.which("jpegtran"):
        assert "losslessly" in packed.stdout
        assert sum(p.stat().st_size for p in packed_photos) < 0.95 * sum(p.stat().st_size for p in originals)
    blocker = tmp_path / "jax-only"  # sitecustomize runs in every Python the script starts
    blocker.mkdir()
    started = tmp_path / "pythons-started"  # shows the blocker was loaded, not left off PYTHONPATH by the script
    (blocker / "sitecustomize.py").write_text(WITHOUT_TENSORFLOW_AND_MLFLOW
                                              + f"open({str(started)!r}, 'a').write('started\\n')\n")
    env = {**jax_env(cli_env(tmp_path, data_dir)), "PYTHONPATH": str(blocker), "PY": sys.executable,
           "RATES": "1e-3 1e-3_ema", "BUDGET": "900", "WORKERS": "1", "EXTRA": " ".join(args)}
    out = subprocess.run(["bash", str(repo / "scripts" / "gpu" / "train_detectors.sh"), str(pack),
                          str(tmp_path / "gpu-machine")], capture_output=True, text=True, timeout=900, env=env,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    log = (out_dir / "train.log").read_text()
    assert "detector epoch 2: val mAP@0.5" in out.stdout and "--trained " + str(out_dir) in log
    assert started.read_text().count("started") >= 2  # the import check and the training, both JAX-only
    record = json.loads((out_dir / "train_config.json").read_text())
    assert record["backend"] == "jax" and record["epochs_run"] == 2 and record["best_epoch"] == 2
    assert record["detector_train"]["learning_rate"] == 1e-3 and record["detector_train"]["ema_momentum"] is None
    averaged = json.loads((out_dir.parent / "lr1e-3_ema" / "train_config.json").read_text())
    assert averaged["detector_train"]["ema_momentum"] == 0.99 and averaged["epochs_run"] == 2
    assert averaged["detector_train"]["learning_rate"] == 1e-3
    assert {p.name for p in out_dir.iterdir()} == {"face_detector.keras", "history.csv", "train_config.json",
                                                   "train.log"}  # what comes back; the rest is left there
    assert not (tmp_path / "mlflow.db").exists()

    # Back home (TensorFlow backend, MLflow): exported, scored and logged with the other machine's record.
    back = subprocess.run([MASKWATCH, "train-detector", *args, "--trained", str(out_dir / "face_detector.keras")],
                          capture_output=True, text=True, timeout=900, env=cli_env(tmp_path, data_dir), cwd=tmp_path)
    assert back.returncode == 0, back.stderr[-3000:]
    assert "face detector job finished" in back.stdout

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs(client.search_experiments()[0].experiment_id)[0]
    assert run.data.params["detector_train.epochs"] == "2" and run.data.metrics["detector_best_epoch"] == 2
    assert len(client.get_metric_history(run.info.run_id, "detector_loss")) == 2  # the other machine's epochs
