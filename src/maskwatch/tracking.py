"""Every MLflow call of maskwatch lives here: runs, metrics, artifacts, model logging, the registry.

Nothing happens at import time; mlflow itself is imported lazily.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from maskwatch.bundle import MODEL_FILE, RUN_BUNDLE_FOLDER
from maskwatch.config import Settings, cache_dir
from maskwatch.signals import STOP_SIGNALS, handling_stop_signals


MODEL_ARTIFACT = "model"
log = logging.getLogger(__name__)


class TrackingUnavailableError(RuntimeError):
    """The tracking server cannot be reached; nothing was logged."""


class ModelNotFoundError(FileNotFoundError):
    """A models:/ or runs:/ URI names nothing in the tracking store (or there is no store yet)."""

    def __init__(self, uri: str, why: str):
        super().__init__(f"no model {uri}: {why}. Train one with `maskwatch train`, point --tracking-uri (or "
                         "MASKWATCH_TRACKING_URI) at the store that holds it, or give --model a bundle folder or "
                         ".keras file")


class NotComparableError(Exception):
    """The champion cannot be scored fairly on this test split (it trained on its photos, or does not say which
    photos it trained on): the gate keeps it and says why."""


@dataclass
class HeadToHead:
    """The champion's test metrics, and the challenger's when they were measured on fewer faces than its own test
    split (the test photos the champion never trained on); `basis` says which faces those were."""
    champion: dict[str, float]
    challenger: dict[str, float] | None = None
    basis: str = ""


@dataclass
class PromotionDecision:
    """`challenger_value` is the new model's figure on its whole test split; `compared_challenger_value` and
    `champion_value` are the two figures the gate compared, on the faces named by `comparison_basis` ("" for the
    whole test split)."""
    version: str | None
    promoted: bool
    metric: str
    challenger_value: float
    champion_version: str | None = None
    champion_value: float | None = None
    compared_challenger_value: float | None = None
    comparison_basis: str = ""
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _mlflow():
    # Fail fast instead of MLflow's default minutes of retries when a server is down.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from maskwatch.progress import redraws_in_place

    if not redraws_in_place():  # MLflow's download bar in a log: a line of bars per model fetched
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
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
    if uri.startswith("sqlite:"):
        _create_sqlite_tables_once(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    name = settings.tracking.experiment_name
    if mlflow.get_experiment_by_name(name) is None:
        artifact_location = None
        if uri.startswith("sqlite:"):  # keep artifacts beside the SQLite file, not in the cwd's ./mlruns
            db_path = Path(uri.removeprefix("sqlite:///"))
            artifact_location = (db_path.parent / "mlartifacts").resolve().as_uri()
        from mlflow.exceptions import MlflowException

        try:
            mlflow.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as error:  # another process created it since we looked: use theirs
            if error.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    mlflow.set_experiment(name)
    return uri


def _create_sqlite_tables_once(uri: str) -> None:
    """MLflow's tracking store creates a new SQLite file's tables without a lock, so processes opening one new store
    at once break each other ("table runs already exists", alembic's "expected to match one row"): two jobs of a
    sweep, or a job and `maskwatch models list`. The first creates them here while holding a lock on the store's
    folder; the others wait, then find them. A lock on the folder itself leaves no lock file anywhere (MLflow's
    own helper for this leaves one in the temp folder per database)."""
    path = _sqlite_file(uri)
    if os.name == "nt" or path is None or not path.resolve().parent.is_dir():
        return  # no flock on Windows; nothing shared in memory; a missing folder fails in MLflow as it would anyway
    folder = path.resolve().parent
    import fcntl

    import sqlalchemy
    from mlflow.store.db import utils as db_utils  # mlflow is pinned; tests/model/test_cli_job.py covers this

    folder_fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(folder_fd, fcntl.LOCK_EX)
        engine = sqlalchemy.create_engine(uri)
        try:
            if not db_utils._all_tables_exist(engine):
                db_utils._initialize_tables(engine)
        finally:
            engine.dispose()
    finally:
        os.close(folder_fd)  # releases the lock


def missing_store(settings: Settings) -> Path | None:
    """The file of a local SQLite tracking store that does not exist yet, else None. Opening it would create an
    empty store, in whatever folder a command that only reads happened to run."""
    store = _sqlite_file(settings.tracking_uri)
    return store if store is not None and not store.exists() else None


def _sqlite_file(uri: str) -> Path | None:
    """The file behind a sqlite:/// tracking URI; None for any other store and for SQLite's in-memory one."""
    path = uri.removeprefix("sqlite:///")
    return None if path == uri or path in ("", ":memory:") else Path(path)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, timeout=5).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


class RunStopped(SystemExit):
    """A stop signal (SIGTERM, SIGHUP) arrived during a run. It unwinds through the run, so the run is closed, and
    then ends the process with 128 + the signal's number (143 for SIGTERM), the status a shell and a service
    manager give a process that signal killed. Ctrl-C stays a KeyboardInterrupt (exit 130)."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name

    def __str__(self) -> str:
        return f"stopped by {self.signal_name}"


def _raise_run_stopped(signum: int, _frame) -> None:
    # By default SIGTERM (a service manager, a cluster's preemption, `kill`) ends Python at once, and the MLflow
    # run stays RUNNING for ever; raised as an exception it unwinds through the run like Ctrl-C.
    raise RunStopped(signum)


EPOCH_LOG_TIMEOUT_S = 5  # a batch of epoch metrics takes milliseconds; longer is a server that hangs
PROBE_EVERY_S = 10  # while the server does not answer, epochs ending sooner after a probe do not probe again


@dataclass
class _Outage:
    """What a run needs to ride out a tracking server that stops answering mid-run."""
    wait_s: float = 600.0
    run_dir: Path | None = None  # where the run's local files are, named when it gives up
    # (metrics, step, timestamp in ms): the timestamp is fixed when the epoch ends, so sending it again after a
    # timed-out try the server did record is an exact duplicate, which MLflow's store drops
    unsent_epochs: list[tuple[dict[str, float], int, int]] = field(default_factory=list)
    warned: bool = False
    next_probe_at: float = 0.0  # time.monotonic(); a hung server costs each /health probe its whole timeout


_outage = _Outage()


def _is_unreachable(error: BaseException) -> bool:
    """Did a tracking call fail because the server did not answer (refused, reset, timed out), rather than
    because it answered with an error? MLflow wraps the requests error, so its causes are searched."""
    import requests

    seen: BaseException | None = error
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, (requests.exceptions.ConnectionError, requests.exceptions.Timeout, ConnectionError,
                             TimeoutError, TrackingUnavailableError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _answers_now(timeout: float = 2.0) -> bool:
    try:
        check_tracking_reachable(_mlflow().get_tracking_uri(), timeout=timeout)
        return True
    except TrackingUnavailableError:
        return False


def _wait_for_server(error: BaseException) -> None:
    """Poll the server's /health until it answers or `tracking.outage_wait_s` has passed, then give up with an
    error that says where the run's local files are."""
    uri, started = _mlflow().get_tracking_uri(), time.monotonic()
    log.warning("the tracking server at %s stopped answering (%s); waiting up to %.0f s for it", uri,
                str(error).splitlines()[0][:200], _outage.wait_s)
    while time.monotonic() - started < _outage.wait_s:
        if _answers_now(timeout=min(3.0, _outage.wait_s)):
            log.warning("the tracking server at %s answers again after %.0f s", uri, time.monotonic() - started)
            return
        time.sleep(min(5.0, max(0.0, _outage.wait_s - (time.monotonic() - started))))
    kept = ""
    if _outage.run_dir and _outage.run_dir.is_dir():
        kept = f"; nothing is deleted: the run's local files are in {_outage.run_dir}"
        if (_outage.run_dir / RUN_BUNDLE_FOLDER / MODEL_FILE).is_file():
            kept += (f", its model is ready for --model {_outage.run_dir / RUN_BUNDLE_FOLDER}, and `maskwatch models "
                     f"register {_outage.run_dir}` records the run and registers the model once the server is back")
    raise TrackingUnavailableError(f"the tracking server at {uri} stopped answering during the run and did not "
                                   f"answer again within {_outage.wait_s:.0f} s (tracking.outage_wait_s){kept}") \
        from error


def _send(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """A tracking call that survives the server going away for a while: epoch metrics held back during training
    go first, and a call the server did not answer is retried once it answers again."""
    for attempt in range(3):
        try:
            _send_unsent_epochs()
            return call(*args, **kwargs)
        except Exception as error:
            if not _is_unreachable(error) or attempt == 2:
                raise
            _wait_for_server(error)


def _send_epochs(epochs: list, run_id: str | None = None) -> None:
    """Send held-back epochs in order (to the active run unless `run_id`), each dropped once the server has it."""
    while epochs:
        metrics, step, timestamp_ms = epochs[0]
        _mlflow().log_metrics(metrics, step=step, timestamp=timestamp_ms, run_id=run_id)
        epochs.pop(0)


def _send_unsent_epochs() -> None:
    _send_epochs(_outage.unsent_epochs)


@contextlib.contextmanager
def _one_brief_try(timeout_s: int = EPOCH_LOG_TIMEOUT_S) -> Iterator[None]:
    """MLflow's HTTP calls within get one try of at most `timeout_s`. MLflow reads both settings per request; its
    usual 30 s x 3 tries would hold training that long on a server that hangs rather than refuses."""
    names = ("MLFLOW_HTTP_REQUEST_TIMEOUT", "MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update({"MLFLOW_HTTP_REQUEST_TIMEOUT": str(timeout_s), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _log_epoch_without_stalling(metrics: dict[str, float], step: int) -> None:
    """Send an epoch's metrics, or keep them for later while the server does not answer: training goes on."""
    _outage.unsent_epochs.append((metrics, step, int(time.time() * 1000)))
    if len(_outage.unsent_epochs) > 1:  # the server did not take the last epoch: is it back?
        if time.monotonic() < _outage.next_probe_at or not _answers_now():
            _outage.next_probe_at = max(_outage.next_probe_at, time.monotonic() + PROBE_EVERY_S)
            return
    try:
        with _one_brief_try():
            _send_unsent_epochs()
    except Exception as error:
        if not _is_unreachable(error):
            raise
        if not _outage.warned:
            log.warning("the tracking server at %s is not answering: training goes on, and its epoch metrics are "
                        "sent once the server answers again", _mlflow().get_tracking_uri())
            _outage.warned = True


def _end_run(run_id: str, status: str, wait: bool) -> None:
    """mlflow.end_run; with the server down, wait for it (a finished run) or leave the run as the server has it."""
    try:
        _mlflow().end_run(status=status)  # takes the run off MLflow's stack before it calls the server
    except Exception as error:
        if not _is_unreachable(error):
            raise
        if not wait:
            _remember_end(run_id, status)
            log.warning("MLflow run %s could not be recorded as %s: the tracking server is not answering; the next "
                        "run started against it records that, with any epoch metrics it did not take", run_id, status)
            return
        _send(_client().set_terminated, run_id, status)


def _unrecorded_ends() -> Path:
    return cache_dir() / "unrecorded-run-ends"


def _remember_end(run_id: str, status: str) -> None:
    """Keep how a run ended, and its epochs the server did not take, for the next run on that server to record:
    otherwise the run shows RUNNING there for ever."""
    folder = _unrecorded_ends()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{run_id}.json").write_text(json.dumps({
            "run_id": run_id, "status": status, "tracking_uri": _mlflow().get_tracking_uri(),
            "end_time_ms": int(time.time() * 1000), "unsent_epochs": _outage.unsent_epochs}))
    except OSError as error:  # called while another error unwinds: that one is what the user must see
        log.warning("how MLflow run %s ended could not be kept in %s (%s)", run_id, folder, error)


def _record_remembered_ends(reopening: str | None = None) -> None:
    """Record the ends (and held-back epochs) of earlier runs whose server was not answering when they ended; of
    the run being reopened (`reopening`), only the epochs: it is about to be ended anew."""
    uri, folder, client = _mlflow().get_tracking_uri(), _unrecorded_ends(), _client()
    for kept in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            end = json.loads(kept.read_text())
            if end["tracking_uri"] != uri:
                continue
            if client.get_run(end["run_id"]).info.status == "RUNNING":  # nobody has ended it meanwhile
                held = len(end["unsent_epochs"])
                _send_epochs(end["unsent_epochs"], end["run_id"])
                if end["run_id"] != reopening:
                    client.set_terminated(end["run_id"], end["status"], end_time=end["end_time_ms"])
                    log.warning("MLflow run %s recorded as %s now, with %d held-back epochs: its tracking server was "
                                "not answering when it ended", end["run_id"], end["status"], held)
        except Exception as error:
            if _is_unreachable(error):
                return  # kept for the next run
            log.warning("the end of MLflow run %s could not be recorded (%s); not trying again", kept.stem,
                        str(error).splitlines()[0][:200] if str(error) else type(error).__name__)
        kept.unlink(missing_ok=True)


@contextlib.contextmanager
def _closed_run(settings: Settings, run_name: str | None, local_dir_of: Callable[[str], Path] | None = None,
                run_id: str | None = None) -> Iterator[Any]:
    """mlflow.start_run that records how the run ended: FINISHED, FAILED on an error, and KILLED on Ctrl-C or a
    stop signal (MLflow itself calls Ctrl-C FAILED, and SIGTERM left the run RUNNING).

    A server that stops answering mid-run is waited for (`tracking.outage_wait_s`) instead of ending the run at
    its first failed call; training does not even wait (`_log_epoch_without_stalling`).
    """
    global _outage
    mlflow = _mlflow()
    stop_signals = tuple(signum for signum in STOP_SIGNALS if signum != signal.SIGINT)  # SIGINT raises already
    with handling_stop_signals(_raise_run_stopped, stop_signals):
        _record_remembered_ends(reopening=run_id)
        run = mlflow.start_run(run_id=run_id, run_name=run_name)  # a run_id reopens that run
        _outage = _Outage(settings.tracking.outage_wait_s, local_dir_of and local_dir_of(run.info.run_id))
        try:
            yield run
        except (KeyboardInterrupt, RunStopped) as stop:
            _end_run(run.info.run_id, "KILLED", wait=False)
            log.warning("%s: MLflow run %s recorded as KILLED; nothing was registered",
                        str(stop) or "stopped by Ctrl-C", run.info.run_id)
            raise
        except BaseException as error:
            _end_run(run.info.run_id, "FAILED", wait=False)
            if _is_unreachable(error) and not isinstance(error, TrackingUnavailableError):
                raise TrackingUnavailableError(f"the tracking server at {mlflow.get_tracking_uri()} did not answer: "
                                               f"{str(error).splitlines()[0][:300]}") from error
            raise
        else:
            try:
                _send(_send_unsent_epochs)  # epochs held back in an outage go before the run is closed
                _end_run(run.info.run_id, "FINISHED", wait=True)
            except TrackingUnavailableError:  # gave up waiting: the end (and the epochs) go with the next run
                _remember_end(run.info.run_id, "FINISHED")
                raise
        finally:
            _outage = _Outage()


@contextlib.contextmanager
def training_run(settings: Settings, run_name: str | None = None, tags: dict[str, str] | None = None) -> Iterator[str]:
    """One explicit MLflow run around the whole job (both phases); yields the run id."""
    configure(settings)
    with _closed_run(settings, run_name, lambda run_id: settings.work_dir / "runs" / run_id) as run:
        set_tags({"git_commit": git_commit(), "maskwatch.stage": "train", **(tags or {})})
        log_params(settings.to_flat_dict())
        yield run.info.run_id


@contextlib.contextmanager
def resumed_training_run(settings: Settings, run_id: str, run_dir: Path) -> Iterator[str]:
    """Reopen a training run whose tracking server was gone when it ended, to record what it left in its local
    folder (`run_dir`); it ends FINISHED like any run that got that far."""
    mlflow = _mlflow()
    uri = configure(settings)
    try:
        run_info = _client().get_run(run_id).info
    except Exception as error:
        if _is_unreachable(error):
            raise TrackingUnavailableError(f"the tracking server at {uri} did not answer: "
                                           f"{str(error).splitlines()[0][:300]}") from error
        raise ValueError(f"MLflow run {run_id} is not in the tracking store at {uri}: record it in the store it was "
                         "started in (--tracking-uri)") from error
    if run_info.status == "FINISHED":  # only a run that got all its files and model on the server ends so
        raise ValueError(f"MLflow run {run_id} is already FINISHED at {uri}: its files and model were recorded when "
                         "it ended, so there is nothing to record")
    mlflow.set_experiment(experiment_id=run_info.experiment_id)  # its own, whatever the settings name
    with _closed_run(settings, None, lambda _: run_dir, run_id=run_id) as run:  # named as it is now
        set_tags({"maskwatch.recorded_late": True})
        yield run.info.run_id


@contextlib.contextmanager
def evaluation_run(settings: Settings, kind: str, tags: dict[str, str]) -> Iterator[str]:
    """A separate run for an evaluation of an existing model (e.g. detection metrics)."""
    configure(settings)
    with _closed_run(settings, f"evaluate-{kind}") as run:
        set_tags({"git_commit": git_commit(), "maskwatch.stage": f"evaluate-{kind}", **tags})
        log_params({f"detector.{k}": v for k, v in settings.detector.model_dump(mode="json").items()})
        yield run.info.run_id


def log_params(params: dict[str, Any]) -> None:
    # MLflow caps a param value at 6000 characters and a batch at 100 params.
    items = [(k, "None" if v is None else str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        _send(_mlflow().log_params, dict(items[start:start + 100]))


def set_tags(tags: dict[str, Any]) -> None:
    _send(_mlflow().set_tags, {k: str(v) for k, v in tags.items()})


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and v == v}  # drop NaN


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    _send(_mlflow().log_metrics, _finite(metrics), step=step)


def log_artifact(path: Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    if path.is_dir():
        _send(_mlflow().log_artifacts, str(path), artifact_path=artifact_path)
    else:
        _send(_mlflow().log_artifact, str(path), artifact_path=artifact_path)


def log_dict(values: dict, artifact_file: str) -> None:
    _send(_mlflow().log_dict, values, artifact_file)


def log_text(text: str, artifact_file: str) -> None:
    _send(_mlflow().log_text, text, artifact_file)


def log_epoch(phase: str, step: int, logs: dict[str, float]) -> None:
    """One epoch's metrics as `<phase>_<metric>` and as `<metric>` (one continuous curve), at a global step; held
    back, without stalling training, while the tracking server does not answer."""
    _log_epoch_without_stalling(_finite({**{f"{phase}_{k}": v for k, v in logs.items()}, **logs}), step)


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

    import keras

    output = keras.ops.convert_to_numpy(model(input_example, training=False))  # any backend's tensor
    signature = infer_signature(input_example, output)
    with tempfile.TemporaryDirectory(prefix="maskwatch-mlflow-") as tmp:
        local = Path(tmp) / MODEL_ARTIFACT
        local.mkdir()
        mlflow.keras.save_model(model, str(local), signature=signature, input_example=input_example,
                                metadata=metadata, pip_requirements=model_requirements())
        for extra in extra_files:  # exports sit beside model.keras, where the Predictor looks
            shutil.copy2(extra, local / "data" / Path(extra).name)
        _send(mlflow.log_artifacts, str(local), artifact_path=MODEL_ARTIFACT)
    if not registered_model_name:
        return None
    return _send(_register_once, mlflow.active_run().info.run_id, registered_model_name)


# The packages a logged model needs, per Keras backend: the first one of each group that is installed.
_BACKEND_DISTRIBUTIONS = {"tensorflow": [("tensorflow", "tensorflow-cpu")], "jax": [("jax",), ("jaxlib",)],
                          "torch": [("torch",)]}


def model_requirements() -> list[str]:
    """The logged model's requirements, pinned to this environment: the list MLflow infers (keras, numpy and the
    backend; MLflow adds itself) without its inference, which loads the model again in a subprocess for about
    14 s a model."""
    from importlib.metadata import PackageNotFoundError, version

    import keras

    def installed(names: tuple[str, ...]) -> str | None:
        for name in names:
            try:
                return f"{name}=={version(name)}"
            except PackageNotFoundError:
                continue
        return None

    groups = [("keras",), ("numpy",), *_BACKEND_DISTRIBUTIONS.get(keras.backend.backend(), [])]
    return [pinned for group in groups if (pinned := installed(group))]


def _register_once(run_id: str, name: str) -> str:
    """mlflow.register_model for the run's model, unless the run already has a version of it: a server that hangs
    can record a try whose answer never came, and the retry would add a second version of the same model."""
    made = [v for v in _client().search_model_versions(f"run_id='{run_id}'") if v.name == name]
    if made:
        log.warning("version %s of %s was registered by a try the tracking server did not answer; not registering "
                    "it again", made[0].version, name)
        return str(made[0].version)
    return str(_mlflow().register_model(f"runs:/{run_id}/{MODEL_ARTIFACT}", name).version)


def _client():
    return _mlflow().MlflowClient()


def _models_uri_parts(uri: str) -> tuple[str, str | None, str]:
    """models:/name/3, models:/name/latest, models:/name@alias -> (name, alias or None, version or "")."""
    name, _, version = uri.removeprefix("models:/").partition("/")
    name, _, alias = name.partition("@")
    return name, alias or None, version


def _runs_uri_parts(uri: str) -> tuple[str, str]:
    """runs:/<run id>/path/in/run -> (run id, path without outer slashes)."""
    run_id, _, path = uri.removeprefix("runs:/").partition("/")
    return run_id, path.strip("/")


def registry_model_version(uri: str):
    """The registry's ModelVersion that models:/name/3, models:/name/latest or models:/name@alias names now."""
    from mlflow.exceptions import MlflowException

    name, alias, version = _models_uri_parts(uri)
    if alias:
        return _client().get_model_version_by_alias(name, alias)
    if version.isdigit():
        return _client().get_model_version(name, version)
    if version.lower() != "latest":  # MLflow's stages (Production, ...) are deprecated: aliases replace them
        raise MlflowException(f"{uri}: name a version as a number, 'latest' or @alias (e.g. models:/{name}@champion)")
    versions = _client().search_model_versions(f"name = '{name}'")
    if not versions:
        raise MlflowException(f"registered model '{name}' has no versions")
    return max(versions, key=lambda found: int(found.version))


def champion_version(name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return _client().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def download_model(uri: str) -> Path:
    """A local folder holding `model.keras` and `metadata.json` for a models:/ or runs:/ URI.

    The files go to the model cache (`cache_dir()/models`) and are reused while the store lists the same files
    with the same sizes: a second load downloads nothing, and loads leave no copy behind in the temp folder (each
    used to leave 30 MB there).
    """
    return _cached_bundle(_pinned(uri))


@dataclass(frozen=True)
class _PinnedModel:
    """A model URI resolved once, so the files fetched and the version written beside them cannot come from two
    different versions (an alias can move meanwhile)."""
    uri: str  # as asked for
    source: str  # an artifact URI that cannot move
    version: str | None  # the registry version, for models:/ URIs
    run_id: str | None
    pinned_uri: str | None = None  # models:/name/3 or runs:/id/path: what names these files for good


def _pinned_form(uri: str) -> str | None:
    """models:/name/3 and runs:/id/path (normalised) name the same files for good; aliases and `latest` move."""
    if uri.startswith("runs:/"):
        run_id, path = _runs_uri_parts(uri)
        return f"runs:/{run_id}/{path}"
    _, alias, version = _models_uri_parts(uri)
    return uri if uri.startswith("models:/") and not alias and version.isdigit() else None


def _pinned(uri: str) -> _PinnedModel:
    if uri.startswith("runs:/"):
        run_id, path = _runs_uri_parts(uri)
        source = f"{_client().get_run(run_id).info.artifact_uri.rstrip('/')}/{path}".rstrip("/")
        return _PinnedModel(uri, source, None, run_id, _pinned_form(uri))
    if not uri.startswith("models:/"):
        return _PinnedModel(uri, uri, None, None)
    version = registry_model_version(uri)
    return _PinnedModel(uri, _client().get_model_version_download_uri(version.name, version.version),
                        str(version.version), version.run_id, f"models:/{version.name}/{version.version}")


def _fetch_bundle(model: _PinnedModel, target: Path) -> tuple[Path, Path]:
    """Download the model into `target`; returns (the downloaded folder, the folder with model.keras and a
    written metadata.json)."""
    from mlflow.models import Model

    target.mkdir(parents=True, exist_ok=True)
    local = Path(_mlflow().artifacts.download_artifacts(artifact_uri=model.source, dst_path=str(target)))
    keras_files = sorted(local.rglob("*.keras"))
    if not keras_files:
        raise FileNotFoundError(f"{model.uri} holds no .keras model")
    bundle_dir = keras_files[0].parent
    if keras_files[0].name != "model.keras":  # a link, so the files stay as the store lists them
        try:
            os.link(keras_files[0], bundle_dir / "model.keras")
        except OSError:
            shutil.copy2(keras_files[0], bundle_dir / "model.keras")
    mlmodel = Model.load(str(local))
    metadata = dict(mlmodel.metadata or {})
    metadata["run_id"] = metadata.get("run_id") or mlmodel.run_id or model.run_id
    # The version is only known after logging, so the logged metadata lacks it: the registry said which it is.
    if model.version is not None:
        metadata["model_version"] = model.version
    (bundle_dir / "metadata.json").write_text(json.dumps(metadata, indent=2, default=str))
    return local, bundle_dir


def artifact_manifest(source: str) -> dict[str, int]:
    """{relative path: size} of every file under an artifact URI, as the store lists them."""
    artifacts = _mlflow().artifacts
    files: dict[str, int] = {}

    def walk(relative: str) -> None:
        # FileInfo.path is relative to different roots for different URI kinds: only its last part is used.
        for info in artifacts.list_artifacts(artifact_uri=f"{source.rstrip('/')}/{relative}" if relative else source):
            child = f"{relative}/{info.path.rstrip('/').rsplit('/', 1)[-1]}".lstrip("/")
            if info.is_dir:
                walk(child)
            else:
                files[child] = int(info.file_size or 0)

    walk("")
    return files


def _digest(value: Any, length: int) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:length]


def _cached_bundle(model: _PinnedModel) -> Path:
    """The cache entry for these files; entries are never changed once published, so readers need no lock.

    The entry's name holds a digest of the store's file list: files attached later (`maskwatch export`) give a new
    entry, and the out-of-date ones of the same model are deleted.
    """
    models = cache_dir() / "models"
    manifest = artifact_manifest(model.source)
    model_key = _digest([model.source, model.version], 16)
    entry = models / f"{model_key}-{_digest(manifest, 12)}"
    bundle_dir = _whole_entry(entry, manifest)
    if bundle_dir is None:
        bundle_dir = _publish(model, manifest, entry)
        _remove_stale_entries(models, model_key, entry, model.source)
    else:
        _mark_used(entry)
    return bundle_dir


def _mark_used(entry: Path) -> None:
    # The entry folder's mtime says when it was last loaded (its files never change): `models cache --keep`
    # keeps the most recently used.
    with contextlib.suppress(OSError):
        os.utime(entry)


def _entry_layout(entry: Path) -> dict[str, Any] | None:
    """An entry's layout.json: where its files and bundle are, its file list, and which store and URI it came
    from (entries written before those were recorded lack them); None if unreadable."""
    try:
        layout = json.loads((entry / "layout.json").read_text())
        return layout if isinstance(layout, dict) and {"root", "bundle"} <= layout.keys() else None
    except (OSError, ValueError):
        return None


def _whole_entry(entry: Path, manifest: dict[str, int] | None = None) -> Path | None:
    """The bundle folder of a published entry holding every listed file at its listed size, else None. The list
    is the server's, or (offline) the one the entry recorded when it was fetched."""
    layout = _entry_layout(entry)
    try:
        root = entry / layout["root"]
        manifest = layout.get("manifest", {}) if manifest is None else manifest
        if all((root / name).stat().st_size == size for name, size in manifest.items()):
            return entry / layout["bundle"]
    except (OSError, KeyError, TypeError, AttributeError):  # AttributeError: a recorded list that is not a dict
        pass
    return None


def _publish(model: _PinnedModel, manifest: dict[str, int], entry: Path) -> Path:
    """Download into a hidden folder beside `entry`, then rename it into place: an entry is whole or absent."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}-part-"))
    try:
        root, bundle_dir = _fetch_bundle(model, staging / "files")
        (staging / "layout.json").write_text(json.dumps({
            "root": str(root.relative_to(staging)), "bundle": str(bundle_dir.relative_to(staging)),
            "manifest": manifest, "pinned_uri": model.pinned_uri,
            "tracking_uri": _mlflow().get_tracking_uri().rstrip("/"), "fetched_at": time.time()}))
        for attempt in range(2):
            try:
                os.rename(staging, entry)
                break
            except OSError:
                published = _whole_entry(entry, manifest)
                if published is not None:  # another process published it first: theirs is as good
                    return published
                if attempt:
                    raise
                _retire(entry)  # a broken copy (a damaged disk, edited files) is replaced
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return entry / bundle_dir.relative_to(staging)


def _retire(entry: Path) -> None:
    """Move a folder aside, then delete it: a process still reading its files keeps them."""
    retired = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}-old-"))
    with contextlib.suppress(FileNotFoundError):
        os.rename(entry, retired / "entry")
    shutil.rmtree(retired, ignore_errors=True)


def cached_models() -> list[dict[str, Any]]:
    """The model cache's entries: folder, the URI that names them for good and its store, run id, registry version,
    MB on disk, when fetched and last used (most recently used first)."""
    models = cache_dir() / "models"
    timed_rows = []
    for entry in models.glob("[!.]*") if models.is_dir() else []:
        layout = _entry_layout(entry) or {}
        try:
            metadata = json.loads((entry / layout["bundle"] / "metadata.json").read_text())
        except (OSError, ValueError, KeyError, TypeError):
            metadata = {}
        try:
            used, size = entry.stat().st_mtime, sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        except FileNotFoundError:  # replaced by a concurrent load meanwhile
            continue
        fetched = layout.get("fetched_at") if isinstance(layout.get("fetched_at"), (int, float)) else used
        timed_rows.append((used, {
            "entry": str(entry), "uri": layout.get("pinned_uri"), "tracking_uri": layout.get("tracking_uri"),
            "run_id": metadata.get("run_id"), "model_version": metadata.get("model_version"),
            "mb": round(size / 1e6, 1), "fetched": time.strftime("%Y-%m-%d %H:%M", time.localtime(fetched)),
            "last_used": time.strftime("%Y-%m-%d %H:%M", time.localtime(used))}))
    return [row for _, row in sorted(timed_rows, key=lambda pair: pair[0], reverse=True)]


def _offline_bundle(uri: str, tracking_uri: str, down: TrackingUnavailableError) -> Path:
    """The cached copy of models:/name/3 or runs:/id/path fetched from this tracking server, while it is down.

    Those URIs name the same files for good, so the copy is what the server would give, less any files attached
    since it was fetched. An alias or `latest` may have moved meanwhile: it is not guessed, and the error names
    the versions the cache holds instead.
    """
    wanted, store = _pinned_form(uri), tracking_uri.rstrip("/")
    from_store = [row for row in cached_models() if row["tracking_uri"] == store and row["uri"]]
    for row in from_store:  # newest first
        if row["uri"] != wanted:
            continue
        bundle_dir = _whole_entry(Path(row["entry"]))
        if bundle_dir is not None:  # a damaged copy is passed over: the error below is clearer than a bad load
            _mark_used(Path(row["entry"]))
            log.warning("%s; loading %s from the model cache (fetched %s), without any file attached since",
                        down, wanted, row["fetched"])
            return bundle_dir
    name = _models_uri_parts(uri)[0]
    held = sorted({row["uri"] for row in from_store if row["uri"].startswith(f"models:/{name}/")},
                  key=lambda held_uri: -int(held_uri.rsplit("/", 1)[1]))
    if uri.startswith("models:/") and held:
        moves = "" if wanted else "; an alias or 'latest' is not guessed, as it may have moved since"
        raise TrackingUnavailableError(f"{down}. The model cache holds {', '.join(held)} from it, which "
                                       f"load{'s' if len(held) == 1 else ''} offline{moves}") from down
    raise down


def clear_model_cache(keep: int = 0) -> tuple[int, float]:
    """Delete every cached model but the `keep` most recently used; returns (entries, MB) freed. Loads fetch a
    deleted model again. Clearing all also removes half-done downloads."""
    models = cache_dir() / "models"
    removed = cached_models()[keep:]
    for row in removed:
        _retire(Path(row["entry"]))  # a process still reading its files keeps them
    if keep == 0 and models.is_dir():
        for leftover in models.iterdir():
            shutil.rmtree(leftover, ignore_errors=True)
    return len(removed), sum(row["mb"] for row in removed)


def _remove_stale_entries(models: Path, model_key: str, current: Path, source: str) -> None:
    """Delete the other copies of this model, but only if the store still lists `current`'s files (a load that
    raced with an export must not delete the newer copy), and downloads left half done over an hour ago."""
    if current.name != f"{model_key}-{_digest(artifact_manifest(source), 12)}":
        return
    for stale in models.glob(f"{model_key}-*"):
        if stale != current:
            shutil.rmtree(stale, ignore_errors=True)
    for part in models.glob(f".{model_key}-*-part-*"):
        with contextlib.suppress(FileNotFoundError):  # another load may finish and remove its own meanwhile
            if time.time() - part.stat().st_mtime > 3600:
                shutil.rmtree(part, ignore_errors=True)


def attach_to_registered_model(uri: str, settings: Settings, files: list[Path]) -> str:
    """Upload files (e.g. exports) beside the model of a models:/ or runs:/ URI; returns the run id."""
    configure(settings)
    if uri.startswith("runs:/"):
        run_id = _runs_uri_parts(uri)[0]
    else:
        run_id = registry_model_version(uri).run_id
    for path in files:
        _client().log_artifact(run_id, str(path), artifact_path=f"{MODEL_ARTIFACT}/data")
    return run_id


def resolve_model_uri(uri: str, settings: Settings) -> Path:
    """models:/name@alias, models:/name/3, runs:/id/model -> local bundle folder; paths pass through."""
    if not uri.startswith(("models:/", "runs:/")):
        return Path(uri)
    if store := missing_store(settings):
        raise ModelNotFoundError(uri, f"there is no tracking store at {store}")
    try:
        configure(settings)
    except TrackingUnavailableError as down:  # a pinned version already fetched still loads
        return _offline_bundle(uri, settings.tracking_uri, down)
    from mlflow.exceptions import MlflowException

    try:
        return download_model(uri)
    except MlflowException as error:
        # MLflow reports an unknown alias as an invalid parameter, and an unknown model, version or run as missing.
        if error.error_code == "RESOURCE_DOES_NOT_EXIST" or ("alias" in str(error) and "not found" in str(error)):
            raise ModelNotFoundError(uri, f"{str(error).rstrip('.')} in {settings.tracking_uri}") from error
        raise


def decide_promotion(settings: Settings, version: str | None, challenger_metrics: dict[str, float],
                     champion_metrics_for: Callable[[str], HeadToHead]) -> PromotionDecision:
    """Compare the new version with the alias holder on the same test faces; move the alias if it wins."""
    tracking = settings.tracking
    metric = tracking.promotion_metric
    challenger_value = float(challenger_metrics[metric])
    decision = PromotionDecision(version, False, metric, challenger_value)
    if version is None:
        decision.reason = "model was not registered"
        return decision
    current = _champion_number(settings)
    while True:
        _judge(decision, current, str(version), champion_metrics_for, tracking.min_improvement)
        if not decision.promoted:
            break
        # Jobs of a sweep finish together: one may have promoted its model while this one was scoring the old
        # champion. Promote only over the champion this one was compared with; otherwise compare with the new one.
        latest = _champion_number(settings)
        if latest == current:
            promote(settings, version)
            break
        log.info("the champion changed from v%s to v%s during the comparison: comparing with v%s", current,
                 latest, latest)
        current = latest
    _client().set_model_version_tag(tracking.registered_model_name, version, "promotion", decision.reason)
    return decision


def _champion_number(settings: Settings) -> str | None:
    current = champion_version(settings.tracking.registered_model_name, settings.tracking.champion_alias)
    return None if current is None else str(current.version)


def _judge(decision: PromotionDecision, champion: str | None, version: str,
           champion_metrics_for: Callable[[str], HeadToHead], min_improvement: float) -> None:
    """Fill in whether `decision`'s challenger beats `champion` (a version number, or None when there is none)."""
    decision.champion_version = decision.champion_value = decision.compared_challenger_value = None
    decision.comparison_basis = ""
    if champion is None:
        decision.promoted, decision.reason = True, "no champion yet"
    elif champion == version:
        decision.promoted, decision.reason = True, "already champion"
    else:
        metric = decision.metric
        decision.champion_version = champion
        try:
            scores = champion_metrics_for(champion)
        except NotComparableError as why:
            decision.promoted = False
            decision.reason = (f"not compared with champion v{champion}: {why}. To serve v{version} anyway: "
                               f"`maskwatch models promote {version}`")
            return
        challenger_value = decision.challenger_value if scores.challenger is None else scores.challenger[metric]
        decision.champion_value = float(scores.champion[metric])
        decision.compared_challenger_value, decision.comparison_basis = float(challenger_value), scores.basis
        margin = challenger_value - decision.champion_value
        decision.promoted = margin > min_improvement
        basis = f" {scores.basis}" if scores.basis else ""
        decision.reason = (f"{metric} {challenger_value:.4f} vs champion v{champion} {decision.champion_value:.4f}"
                           f"{basis} (margin {margin:+.4f}, needed > {min_improvement})")


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
