"""A tracking server that stops answering mid-run: training goes on, the run waits for the server after
training, and when it does not come back the error says where the run's files are. Before, the first epoch
logged into the outage ended the job with a traceback."""

import threading
import time

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from maskwatch import tracking
from maskwatch.pipeline import run_job
from maskwatch.tracking import TrackingUnavailableError

from conftest import free_port

EPOCHS = {"phase1_epochs": 16, "phase2_epochs": 2, "batch_size": 16, "early_stopping_patience": None,
          "reduce_lr_patience": None, "export_formats": []}


def stop_after_first_epoch(server, restart: bool) -> tuple[threading.Thread, list]:
    """A thread that stops the server once the run has logged an epoch, and starts it again if asked."""
    errors: list = []

    def watch():
        try:
            client, deadline = MlflowClient(server.uri, registry_uri=server.uri), time.time() + 600
            while time.time() < deadline:
                experiment = client.get_experiment_by_name("maskwatch")
                runs = client.search_runs([experiment.experiment_id]) if experiment else []
                if runs and client.get_metric_history(runs[0].info.run_id, "phase1_loss"):
                    break
                time.sleep(0.3)
            server.stop()
            if restart:
                server.start()
        except Exception as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.slow
def test_training_goes_on_through_an_outage_and_logs_every_epoch(settings_factory, mlflow_server, caplog):
    settings = settings_factory(train=EPOCHS, tracking={"tracking_uri": mlflow_server.uri})
    watcher, errors = stop_after_first_epoch(mlflow_server, restart=True)
    result = run_job(settings, run_name="outage")
    watcher.join(timeout=120)
    assert errors == [] and "training goes on" in caplog.text

    client = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED" and "test_macro_f1" in run.data.metrics
    assert [m.step for m in client.get_metric_history(result.run_id, "phase1_loss")] == list(range(1, 17))
    assert [m.step for m in client.get_metric_history(result.run_id, "val_loss")] == list(range(1, 19))
    assert client.get_model_version_by_alias("maskwatch", "champion").run_id == result.run_id


@pytest.mark.slow
def test_a_server_that_does_not_come_back_is_a_clear_error_that_keeps_the_run(settings_factory, mlflow_server):
    settings = settings_factory(train=EPOCHS, tracking={"tracking_uri": mlflow_server.uri, "outage_wait_s": 3})
    watcher, errors = stop_after_first_epoch(mlflow_server, restart=False)
    with pytest.raises(TrackingUnavailableError, match="did not answer again within 3 s") as gave_up:
        run_job(settings, run_name="outage")
    watcher.join(timeout=60)
    assert errors == []
    run_dir = settings.work_dir / "runs"
    (kept,) = run_dir.iterdir()
    assert f"local files are in {kept}" in str(gave_up.value)
    assert (kept / "checkpoint" / "best.keras").is_file()  # the trained model is not lost

    mlflow_server.start()  # the run was left as the server last knew it, never recorded FINISHED
    client = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    assert client.get_run(kept.name).info.status == "RUNNING"
    assert client.search_registered_models() == []


def test_unreachable_is_told_apart_from_an_error_the_server_answered(settings_factory, tmp_path):
    """Only a server that does not answer is waited for; its real answers (an unknown run) fail at once."""
    down = MlflowClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(MlflowException) as refused:
        down.get_run("0" * 32)
    assert tracking._is_unreachable(refused.value)

    store = f"sqlite:///{tmp_path / 'store.db'}"
    with pytest.raises(MlflowException) as unknown:
        MlflowClient(store).get_run("0" * 32)
    assert not tracking._is_unreachable(unknown.value)
    assert not tracking._is_unreachable(ValueError("no"))
