"""End-to-end: two-phase training on a few dozen real crops leaves a real MLflow run and registry version."""

import json
import tempfile
import time
from importlib import metadata as distributions
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from maskwatch import tracking
from maskwatch.bundle import read_metadata
from maskwatch.detect import Predictor
from maskwatch.evaluate import predict_probabilities
from maskwatch.pipeline import run_job
from maskwatch.preprocessing import read_image
from maskwatch.tracking import TrackingUnavailableError
from maskwatch.train import train_model

from conftest import free_port


def has_distribution(name: str) -> bool:
    try:
        return bool(distributions.version(name))
    except distributions.PackageNotFoundError:
        return False


TINY = {"phase1_epochs": 1, "phase2_epochs": 1, "batch_size": 16, "early_stopping_patience": None,
        "reduce_lr_patience": None}


def test_two_phase_job_leaves_a_complete_mlflow_run(settings_factory, tmp_path, monkeypatch):
    settings = settings_factory(train=TINY)
    result = run_job(settings, run_name="smoke")
    assert result.history.phases == ["phase1", "phase2"]
    client = MlflowClient(settings.tracking_uri)
    run = client.get_run(result.run_id)
    params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
    assert params["train.phase1_learning_rate"] == "0.001" and params["train.phase2_learning_rate"] == "1e-05"
    assert params["train.fine_tune_last_layers"] == "30"
    assert tags["data_hash"] == result.prepared.data_hash and tags["git_commit"]
    for name in ("phase1_loss", "phase1_val_macro_f1", "phase2_loss", "phase2_val_accuracy"):
        assert len(client.get_metric_history(result.run_id, name)) == 1, name
    assert [m.step for m in client.get_metric_history(result.run_id, "val_loss")] == [1, 2]
    assert 0.0 <= metrics["test_macro_f1"] <= 1.0 and "test_mask_weared_incorrect_recall_ci_high" in metrics
    assert 0.0 <= metrics["test_ece"] <= 1.0 and metrics["test_brier"] >= 0.0 and metrics["test_log_loss"] > 0.0
    artifacts = {a.path for path in ("", "training", "evaluation", "model", "model/data", "data_report")
                 for a in client.list_artifacts(result.run_id, path)}
    for expected in ("training/training_curves.png", "training/history.csv", "evaluation/confusion_matrix.png",
                     "evaluation/reliability_diagram.png", "evaluation/classification_report.txt", "model/MLmodel",
                     "data_report/sample_crops.png", "data_report/face_sizes.png", "config.yaml", "promotion.json",
                     "model/data/model_float.tflite"):
        assert expected in artifacts, expected
    # get_model_info leaves a temp folder with the MLmodel file behind (mlflow issue 12140): keep it in tmp_path.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model_info = mlflow.models.get_model_info(f"runs:/{result.run_id}/model")
    assert model_info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 160, 160, 3)
    assert model_info.metadata["class_names"] == ["with_mask", "without_mask", "mask_weared_incorrect"]
    # Pinned as MLflow's inference would pin them (it loaded the model again in a subprocess to find them).
    requirements = Path(mlflow.artifacts.download_artifacts(f"runs:/{result.run_id}/model/requirements.txt",
                                                            dst_path=str(tmp_path))).read_text().split()
    installed = {name: distributions.version(name) for name in ("mlflow", "keras", "numpy")}
    backend = next(f"{name}=={distributions.version(name)}" for name in ("tensorflow", "tensorflow-cpu")
                   if has_distribution(name))
    assert sorted(requirements) == sorted([f"{n}=={v}" for n, v in installed.items()] + [backend])
    version = client.get_model_version_by_alias("maskwatch", "champion")
    assert str(version.version) == "1" and version.run_id == result.run_id
    bundle_meta = json.loads((result.bundle_dir / "metadata.json").read_text())
    assert bundle_meta["model_version"] == "1" and bundle_meta["crop"]["size"] == 160
    assert bundle_meta["exports"] == {"litert": "model_float.tflite"}

    # The registered champion serves straight from the registry, with the LiteRT export logged beside it.
    predictor = Predictor.from_uri("models:/maskwatch@champion", settings, runtime="litert")
    crops = np.stack([read_image(p) for p in result.prepared.test_df.crop_path[:4]])
    np.testing.assert_allclose(predictor.predict_inputs(crops), predict_probabilities(
        keras.models.load_model(result.bundle_dir / "model.keras"), result.prepared.test_df.head(4)), atol=1e-4)

    # A second model is compared with the champion on the same test split before any promotion.
    second = run_job(settings, run_name="challenger")
    decision = second.decision
    assert decision.version == "2" and decision.champion_version == "1"
    assert decision.champion_value == pytest.approx(result.evaluation.macro_f1, abs=1e-6)
    champion = str(client.get_model_version_by_alias("maskwatch", "champion").version)
    assert champion == ("2" if decision.challenger_value > decision.champion_value else "1")
    assert "champion_test_macro_f1" in client.get_run(second.run_id).data.metrics
    assert client.get_model_version("maskwatch", "2").tags["promotion"] == decision.reason


def test_single_phase_training_returns_history_and_model(small_prepared, settings_factory, tmp_path):
    settings = settings_factory(train={"batch_size": 16, "early_stopping_patience": None})
    history, model = train_model(small_prepared.train_df, small_prepared.val_df, use_two_phase=False, epochs=2,
                                 settings=settings, model_path=tmp_path / "single.keras")
    assert history.phases == ["single", "single"] and len(history.history["loss"]) == 2
    assert (tmp_path / "single.keras").is_file() and model.output_shape == (None, 3)


def test_unreachable_tracking_server_fails_fast_before_any_work(settings_factory):
    port = free_port()
    settings = settings_factory(tracking={"tracking_uri": f"http://127.0.0.1:{port}"})
    started = time.perf_counter()
    with pytest.raises(TrackingUnavailableError, match=f"127.0.0.1:{port} is not reachable"):
        run_job(settings)
    assert time.perf_counter() - started < 10
    assert not (settings.work_dir / "crops").exists()  # failed before preparing or training anything


@pytest.mark.slow
def test_job_against_a_real_mlflow_server(settings_factory, mlflow_server):
    settings = settings_factory(train=TINY, tracking={"tracking_uri": mlflow_server.uri})
    result = run_job(settings, run_name="server")
    client = MlflowClient(mlflow_server.uri)
    assert client.get_run(result.run_id).data.metrics["test_accuracy"] == result.evaluation.accuracy
    assert client.get_model_version_by_alias("maskwatch", "champion").run_id == result.run_id
    assert "model/MLmodel" in {a.path for a in client.list_artifacts(result.run_id, "model")}
    # Loaded back over HTTP (mlflow-artifacts:/ URIs) through the model cache, then from the cache.
    bundle = tracking.resolve_model_uri("models:/maskwatch@champion", settings)
    assert read_metadata(bundle).model_version == "1" and (bundle / "model_float.tflite").is_file()
    assert tracking.resolve_model_uri("models:/maskwatch@champion", settings) == bundle
