"""A tracking server that stops answering mid-run: training goes on, the run waits for the server after
training, and when it does not come back the error says where the run's files are. Before, the first epoch
logged into the outage ended the job with a traceback."""

import threading
import time

import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from maskwatch import tracking
from maskwatch.bundle import read_metadata
from maskwatch.pipeline import record_run_folder, run_job
from maskwatch.tracking import TrackingUnavailableError

from conftest import first_run_with_a_logged_epoch, free_port

EPOCHS = {"phase1_epochs": 16, "phase2_epochs": 2, "batch_size": 16, "early_stopping_patience": None,
          "reduce_lr_patience": None, "export_formats": []}


def after_first_epoch(server, outage) -> tuple[threading.Thread, list]:
    """A thread that calls `outage(server)` once the run has logged an epoch."""
    errors: list = []

    def watch():
        try:
            first_run_with_a_logged_epoch(MlflowClient(server.uri, registry_uri=server.uri))
            outage(server)
        except Exception as error:  # noqa: BLE001 - reported by the test
            errors.append(error)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread, errors


@pytest.mark.slow
def test_training_goes_on_through_an_outage_and_logs_every_epoch(settings_factory, mlflow_server, caplog):
    settings = settings_factory(train=EPOCHS, tracking={"tracking_uri": mlflow_server.uri})
    watcher, errors = after_first_epoch(mlflow_server, lambda server: (server.stop(), server.start()))
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
def test_a_server_that_hangs_holds_training_only_seconds_and_nothing_is_logged_twice(settings_factory, mlflow_server,
                                                                                      caplog):
    """A frozen server takes connections and never answers. Training used to wait on the first epoch log for as
    long as the freeze (up to 30 s x 3 tries); now epochs end while it is frozen, and the sends that it recorded
    late, whose answers never came, are not recorded twice."""
    settings = settings_factory(train=EPOCHS, tracking={"tracking_uri": mlflow_server.uri})
    frozen: dict[str, float] = {}

    def freeze_for_a_while(server):
        frozen["from"] = time.time()
        server.freeze()
        time.sleep(25)
        frozen["until"] = time.time()
        server.thaw()

    watcher, errors = after_first_epoch(mlflow_server, freeze_for_a_while)
    result = run_job(settings, run_name="hang")
    watcher.join(timeout=120)
    assert errors == [] and "training goes on" in caplog.text

    client = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    history = client.get_metric_history(result.run_id, "phase1_loss")
    assert sorted(m.step for m in history) == list(range(1, 17))  # each epoch once
    ended_while_frozen = [m.step for m in history if frozen["from"] * 1000 < m.timestamp < frozen["until"] * 1000]
    assert ended_while_frozen, "training waited for the frozen server"
    assert [v.version for v in client.search_model_versions("name='maskwatch'")] == ["1"]
    assert client.get_run(result.run_id).info.status == "FINISHED"


@pytest.mark.slow
def test_a_server_that_does_not_come_back_is_a_clear_error_that_keeps_the_run(settings_factory, mlflow_server,
                                                                              caplog):
    settings = settings_factory(train=EPOCHS, tracking={"tracking_uri": mlflow_server.uri, "outage_wait_s": 3})
    watcher, errors = after_first_epoch(mlflow_server, lambda server: server.stop())
    with pytest.raises(TrackingUnavailableError, match="did not answer again within 3 s") as gave_up:
        run_job(settings, run_name="outage")
    watcher.join(timeout=60)
    assert errors == []
    run_dir = settings.work_dir / "runs"
    (kept,) = run_dir.iterdir()
    assert f"local files are in {kept}, its model is ready for --model {kept / 'model'}" in str(gave_up.value)
    assert (kept / "checkpoint" / "best.keras").is_file()  # the trained model is not lost
    assert read_metadata(kept / "model").model_version is None  # evaluated and bundled, never registered

    mlflow_server.start()  # the run was left as the server last knew it, never recorded FINISHED
    client = MlflowClient(mlflow_server.uri, registry_uri=mlflow_server.uri)
    assert client.get_run(kept.name).info.status == "RUNNING"
    assert client.search_registered_models() == []

    with tracking.evaluation_run(settings, "next", {}):  # the next run started on that server records the end
        pass
    assert client.get_run(kept.name).info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(kept.name, "phase1_loss")] == list(range(1, 17))
    assert f"MLflow run {kept.name} recorded as FAILED now" in caplog.text

    run_id, decision = record_run_folder(settings, kept)  # `maskwatch models register <folder>`
    run = client.get_run(run_id)
    assert run_id == kept.name and run.info.status == "FINISHED" and run.data.tags["maskwatch.recorded_late"] == "True"
    assert decision.version == "1" and decision.promoted
    assert client.get_model_version_by_alias("maskwatch", "champion").run_id == run_id
    assert run.data.metrics["test_macro_f1"] == read_metadata(kept / "model").metrics["test_macro_f1"]
    logged = {a.path for folder in ("training", "evaluation", "model")
              for a in client.list_artifacts(run_id, folder)}
    assert {"training/history.csv", "evaluation/evaluation.json", "model/MLmodel"} <= logged
    assert read_metadata(kept / "model").model_version == "1"
    with pytest.raises(ValueError, match="already version 1"):
        record_run_folder(settings, kept)


def test_unreachable_is_told_apart_from_an_error_the_server_answered(settings_factory, tmp_path, monkeypatch):
    """Only a server that does not answer is waited for; its real answers (an unknown run) fail at once."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's default retries a refusal for minutes
    down = MlflowClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(MlflowException) as refused:
        down.get_run("0" * 32)
    assert tracking._is_unreachable(refused.value)

    store = f"sqlite:///{tmp_path / 'store.db'}"
    with pytest.raises(MlflowException) as unknown:
        MlflowClient(store).get_run("0" * 32)
    assert not tracking._is_unreachable(unknown.value)
    assert not tracking._is_unreachable(ValueError("no"))


def test_a_retry_of_what_the_server_recorded_records_nothing_twice(tmp_path, caplog):
    """After a hang, a send whose answer never came may have been recorded: sending its epoch again, or
    registering again, must not add a second point or a second version."""
    import mlflow

    store = f"sqlite:///{tmp_path / 'store.db'}"
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    # Not the experiment an earlier test made active in its own store; its artifacts in tmp_path, not ./mlruns.
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("retry", (tmp_path / "artifacts").as_uri()))
    with mlflow.start_run() as run:
        tracking._log_epoch_without_stalling({"loss": 0.5}, step=1)
        (sent,) = mlflow.MlflowClient().get_metric_history(run.info.run_id, "loss")
        time.sleep(0.01)  # a later send: a fresh timestamp would make it a second point
        tracking._outage.unsent_epochs.append(({"loss": 0.5}, 1, sent.timestamp))  # as after a timed-out try
        tracking._send_unsent_epochs()
        mlflow.log_text("artifact_path: model\n", "model/MLmodel")
        first = tracking._register_once(run.info.run_id, "maskwatch")
        again = tracking._register_once(run.info.run_id, "maskwatch")
    client = mlflow.MlflowClient(store, registry_uri=store)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(1, 0.5)]
    assert first == again == "1" and len(client.search_model_versions("name='maskwatch'")) == 1
    assert "not registering it again" in caplog.text


def test_a_reopened_run_takes_its_held_epochs_and_ends_finished(settings_factory, caplog):
    """`maskwatch models register` reopens a run whose server was gone when it ended: the epochs that run still
    held are sent to it, and it ends FINISHED, not first FAILED as the next ordinary run would record it."""
    settings = settings_factory()
    tracking.configure(settings)
    with tracking._closed_run(settings, "gone") as run:
        run_id = run.info.run_id
    tracking._outage.unsent_epochs.extend([({"loss": 0.4}, 2, 2000), ({"loss": 0.3}, 3, 3000)])
    tracking._remember_end(run_id, "FAILED")  # as when the server was gone at its end
    tracking._outage.unsent_epochs.clear()
    client = MlflowClient(settings.tracking_uri)
    client.update_run(run_id, status="RUNNING")  # the server never learnt that it ended

    renamed = settings.work_dir / "kept-from-the-outage"  # a run folder needs not keep its run id as its name
    with tracking.resumed_training_run(settings, run_id, renamed) as reopened:
        assert reopened == run_id and client.get_run(run_id).info.status == "RUNNING"
        assert tracking._outage.run_dir == renamed  # what a give-up during the upload names
    assert client.get_run(run_id).info.status == "FINISHED"
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(2, 0.4), (3, 0.3)]
    assert not (tracking._unrecorded_ends() / f"{run_id}.json").exists() and "recorded as FAILED" not in caplog.text
    with pytest.raises(ValueError, match="already FINISHED"):  # recorded whole: its files would go up twice
        with tracking.resumed_training_run(settings, run_id, renamed):
            pass
    with pytest.raises(ValueError, match="not in the tracking store"):
        with tracking.resumed_training_run(settings, "0" * 32, settings.work_dir):
            pass
