"""Every MLflow call of maskwatch lives here: runs, metrics, artifacts, model logging, the registry.

Nothing happens at import time; mlflow itself is imported lazily.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from maskwatch.config import Settings


MODEL_ARTIFACT = "model"


class TrackingUnavailableError(RuntimeError):
    """The tracking server cannot be reached; nothing was logged."""


@dataclass
class PromotionDecision:
    version: str | None
    promoted: bool
    metric: str
    challenger_value: float
    champion_version: str | None = None
    champion_value: float | None = None
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _mlflow():
    # Fail fast instead of MLflow's default minutes of retries when a server is down.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    import mlflow

    return mlflow


def check_tracking_reachable(uri: str, timeout: float = 3.0) -> None:
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as response:
            if response.status != 200:
                raise TrackingUnavailableError(f"MLflow server at {uri} answered {response.status} on /health")
    except (urllib.error.URLError, OSError) as err:
        raise TrackingUnavailableError(
            f"the MLflow tracking server at {uri} is not reachable ({getattr(err, 'reason', err)}); start it "
            "(mlflow server ...) or point tracking.tracking_uri / MASKWATCH_TRACKING_URI elsewhere"
        ) from err


def configure(settings: Settings) -> str:
    """Point MLflow at the configured store and experiment; returns the tracking URI."""
    mlflow = _mlflow()
    uri = settings.tracking_uri
    check_tracking_reachable(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.get_experiment_by_name(settings.tracking.experiment_name)
    if experiment is None:
        artifact_location = None
        if uri.startswith("sqlite:"):  # keep artifacts beside the SQLite file, not in the cwd's ./mlruns
            db_path = Path(uri.removeprefix("sqlite:///"))
            artifact_location = (db_path.parent / "mlartifacts").resolve().as_uri()
        mlflow.create_experiment(settings.tracking.experiment_name, artifact_location=artifact_location)
    mlflow.set_experiment(settings.tracking.experiment_name)
    return uri


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@contextlib.contextmanager
def training_run(settings: Settings, run_name: str | None = None, tags: dict[str, str] | None = None) -> Iterator[str]:
    """One explicit MLflow run around the whole job (both phases); yields the run id."""
    mlflow = _mlflow()
    configure(settings)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.set_tags({"git_commit": git_commit(), "maskwatch.stage": "train", **(tags or {})})
        log_params(settings.to_flat_dict())
        yield run.info.run_id


@contextlib.contextmanager
def evaluation_run(settings: Settings, kind: str, tags: dict[str, str]) -> Iterator[str]:
    """A separate run for an evaluation of an existing model (e.g. detection metrics)."""
    mlflow = _mlflow()
    configure(settings)
    with mlflow.start_run(run_name=f"evaluate-{kind}") as run:
        mlflow.set_tags({"git_commit": git_commit(), "maskwatch.stage": f"evaluate-{kind}", **tags})
        log_params({f"detector.{k}": v for k, v in settings.detector.model_dump(mode="json").items()})
        yield run.info.run_id


def log_params(params: dict[str, Any]) -> None:
    mlflow = _mlflow()
    # MLflow caps a param value at 6000 characters and a batch at 100 params.
    items = [(k, "None" if v is None else str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        mlflow.log_params(dict(items[start:start + 100]))


def set_tags(tags: dict[str, Any]) -> None:
    _mlflow().set_tags({k: str(v) for k, v in tags.items()})


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    clean = {k: float(v) for k, v in metrics.items() if v is not None and v == v}  # drop NaN
    _mlflow().log_metrics(clean, step=step)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    if path.is_dir():
        _mlflow().log_artifacts(str(path), artifact_path=artifact_path)
    else:
        _mlflow().log_artifact(str(path), artifact_path=artifact_path)


def log_dict(values: dict, artifact_file: str) -> None:
    _mlflow().log_dict(values, artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    _mlflow().log_text(text, artifact_file)


def log_epoch(phase: str, step: int, logs: dict[str, float]) -> None:
    """One epoch's metrics as `<phase>_<metric>` and as `<metric>` (one continuous curve), at a global step."""
    log_metrics({**{f"{phase}_{k}": v for k, v in logs.items()}, **logs}, step=step)


def epoch_logger_factory() -> Callable[[str, int], list]:
    """Keras callbacks that log each epoch's metrics as `<phase>_<metric>` (step = global epoch)."""
    import keras

    class EpochMetricsLogger(keras.callbacks.Callback):
        def __init__(self, phase: str, epoch_offset: int):
            super().__init__()
            self.phase, self.epoch_offset = phase, epoch_offset

        def on_epoch_end(self, epoch, logs=None):
            log_epoch(self.phase, self.epoch_offset + epoch + 1, logs or {})

    return lambda phase, offset: [EpochMetricsLogger(phase, offset)]


def log_keras_model(model, input_example, metadata: dict, registered_model_name: str | None,
                    extra_files: list[Path] = ()) -> str | None:
    """Log the model (signature, input example, metadata) under the run's `model/`; returns the new version.

    mlflow.keras.log_model in MLflow 3.17 writes the input example before creating its folder
    (FileNotFoundError), so the model is saved into a folder made here and logged as artifacts.
    """
    mlflow = _mlflow()
    from mlflow.models import infer_signature

    signature = infer_signature(input_example, model(input_example, training=False).numpy())
    with tempfile.TemporaryDirectory(prefix="maskwatch-mlflow-") as tmp:
        local = Path(tmp) / MODEL_ARTIFACT
        local.mkdir()
        mlflow.keras.save_model(model, str(local), signature=signature, input_example=input_example,
                                metadata=metadata)
        for extra in extra_files:  # exports sit beside model.keras, where the Predictor looks
            shutil.copy2(extra, local / "data" / Path(extra).name)
        mlflow.log_artifacts(str(local), artifact_path=MODEL_ARTIFACT)
    if not registered_model_name:
        return None
    run_id = mlflow.active_run().info.run_id
    version = mlflow.register_model(f"runs:/{run_id}/{MODEL_ARTIFACT}", registered_model_name)
    return str(version.version)


def _client():
    return _mlflow().MlflowClient()


def registry_version(uri: str) -> str:
    """models:/name/3 -> "3"; models:/name@alias -> the version that holds the alias now."""
    name, _, version = uri.removeprefix("models:/").partition("/")
    if "@" in name:
        name, alias = name.split("@", 1)
        return str(_client().get_model_version_by_alias(name, alias).version)
    return version


def champion_version(name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def download_model(uri: str, destination: Path | None = None) -> Path:
    """A local folder holding `model.keras` and `metadata.json` for a models:/ or runs:/ URI."""
    mlflow = _mlflow()
    target = Path(destination or tempfile.mkdtemp(prefix="maskwatch-model-"))
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target)))
    from mlflow.models import Model

    mlmodel = Model.load(str(local))
    keras_files = sorted(local.rglob("*.keras"))
    if not keras_files:
        raise FileNotFoundError(f"{uri} holds no .keras model")
    bundle_dir = keras_files[0].parent
    if keras_files[0].name != "model.keras":
        keras_files[0].rename(bundle_dir / "model.keras")
    metadata = dict(mlmodel.metadata or {})
    metadata.setdefault("run_id", mlmodel.run_id)
    # The version is only known after logging, so the logged metadata lacks it: ask the registry.
    if uri.startswith("models:/"):
        metadata["model_version"] = registry_version(uri)
    (bundle_dir / "metadata.json").write_text(json.dumps(metadata, indent=2, default=str))
    return bundle_dir


def attach_to_registered_model(uri: str, settings: Settings, files: list[Path]) -> str:
    """Upload files (e.g. exports) beside the model of a models:/ or runs:/ URI; returns the run id."""
    configure(settings)
    if uri.startswith("runs:/"):
        run_id = uri.removeprefix("runs:/").split("/")[0]
    else:
        name, _, ref = uri.removeprefix("models:/").partition("@")
        client = _client()
        version = (client.get_model_version_by_alias(name, ref) if ref
                   else client.get_model_version(*uri.removeprefix("models:/").split("/")[:2]))
        run_id = version.run_id
    for path in files:
        _client().log_artifact(run_id, str(path), artifact_path=f"{MODEL_ARTIFACT}/data")
    return run_id


def resolve_model_uri(uri: str, settings: Settings, destination: Path | None = None) -> Path:
    """models:/name@alias, models:/name/3, runs:/id/model -> local bundle folder; paths pass through."""
    if uri.startswith(("models:/", "runs:/")):
        configure(settings)
        return download_model(uri, destination)
    return Path(uri)


def decide_promotion(settings: Settings, version: str | None, challenger_metrics: dict[str, float],
                     champion_metrics_for: Callable[[str], dict[str, float]]) -> PromotionDecision:
    """Compare the new version with the alias holder on the same test split; move the alias if it wins."""
    tracking = settings.tracking
    metric = tracking.promotion_metric
    challenger_value = float(challenger_metrics[metric])
    decision = PromotionDecision(version, False, metric, challenger_value)
    if version is None:
        decision.reason = "model was not registered"
        return decision
    current = champion_version(tracking.registered_model_name, tracking.champion_alias)
    if current is None:
        decision.promoted, decision.reason = True, "no champion yet"
    elif str(current.version) == str(version):
        decision.promoted, decision.reason = True, "already champion"
    else:
        decision.champion_version = str(current.version)
        decision.champion_value = float(champion_metrics_for(str(current.version))[metric])
        margin = challenger_value - decision.champion_value
        decision.promoted = margin > tracking.min_improvement
        decision.reason = (f"{metric} {challenger_value:.4f} vs champion v{current.version} "
                           f"{decision.champion_value:.4f} (margin {margin:+.4f}, needed > {tracking.min_improvement})")
    if decision.promoted:
        promote(settings, version)
    _client().set_model_version_tag(tracking.registered_model_name, version, "promotion", decision.reason)
    return decision


def promote(settings: Settings, version: str) -> None:
    tracking = settings.tracking
    _client().set_registered_model_alias(tracking.registered_model_name, tracking.champion_alias, str(version))


def list_versions(settings: Settings) -> list[dict[str, Any]]:
    configure(settings)
    client = _client()
    name = settings.tracking.registered_model_name
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        return []
    # Search results carry no aliases; the registered model holds them.
    aliases_by_version: dict[str, list[str]] = {}
    for alias, number in (client.get_registered_model(name).aliases or {}).items() if versions else []:
        aliases_by_version.setdefault(str(number), []).append(alias)
    rows = []
    for version in sorted(versions, key=lambda v: int(v.version)):
        run = client.get_run(version.run_id) if version.run_id else None
        metrics = run.data.metrics if run else {}
        rows.append({
            "version": version.version,
            "aliases": aliases_by_version.get(str(version.version), []),
            "run_id": version.run_id,
            "test_macro_f1": metrics.get("test_macro_f1"),
            "test_accuracy": metrics.get("test_accuracy"),
            "created": version.creation_timestamp,
        })
    return rows


def version_exists(settings: Settings, version: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        _client().get_model_version(settings.tracking.registered_model_name, str(version))
        return True
    except MlflowException:
        return False


def run_metrics(run_id: str) -> dict[str, float]:
    return dict(_client().get_run(run_id).data.metrics)
