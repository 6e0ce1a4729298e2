"""The CLI as a process, without a trained model: a job stopped by a signal, four processes opening one new
store, a job offline without the ImageNet weights, two deterministic runs. Apart from test_cli_job.py, whose
tests share one trained model, so that the two files can run on different test workers."""

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

MASKWATCH = str(Path(sys.executable).parent / "maskwatch")


@pytest.mark.parametrize("command", [["train"], ["train-detector"], ["train-detector", "--train-only", "out"]],
                         ids=" ".join)
def test_without_the_imagenet_weights_offline_a_job_stops_first_with_what_to_do(command, tmp_path, data_dir):
    """An empty KERAS_HOME and no way out (a proxy that refuses): the job used to train until MobileNetV2 was built,
    then died with Keras' traceback and a FAILED MLflow run; now it stops before any work, recording nothing."""
    from conftest import NO_WAY_OUT, TINY_TRAIN_JOB, cli_env

    keras_home = tmp_path / "keras"
    env = {**cli_env(tmp_path, data_dir), "KERAS_HOME": str(keras_home), **NO_WAY_OUT}
    out = subprocess.run([MASKWATCH, *command, *TINY_TRAIN_JOB], capture_output=True, text=True, timeout=300,
                         env=env, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "cannot get MobileNetV2's ImageNet weights (mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_" \
           f"no_top.h5) into {keras_home}/models" in out.stderr and "KERAS_HOME" in out.stderr.split("models:")[-1]
    assert list((keras_home / "models").iterdir()) == []  # nothing half-downloaded
    assert not (tmp_path / "artifacts").exists() and not (tmp_path / "out").exists()  # no crops, no output folder
    if (tmp_path / "mlflow.db").exists():
        with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:
            assert db.execute("SELECT COUNT(*) FROM runs").fetchone() == (0,)


def test_the_imagenet_weights_are_where_keras_keeps_them():
    """Here KERAS_HOME holds them (tests/conftest.py), so nothing is downloaded; the file is the one Keras loads."""
    from maskwatch.model import IMAGENET_NO_TOP_URL, fetch_imagenet_weights

    weights = fetch_imagenet_weights()
    assert weights.is_file() and weights.parent.name == "models" and IMAGENET_NO_TOP_URL.endswith(weights.name)
    if "KERAS_HOME" in os.environ:
        assert weights.resolve().parent.parent == Path(os.environ["KERAS_HOME"]).resolve()  # through any link


def test_processes_opening_one_new_sqlite_store_at_once_all_succeed(tmp_path, data_dir):
    """MLflow creates a new SQLite store's tables without a lock: four processes starting on one new mlflow.db used
    to fail three times in four ("table runs already exists", alembic's "expected to match one row"), and the
    same race failed the signal test below in CI."""
    from conftest import cli_env

    env = cli_env(tmp_path, data_dir)
    # What every command that writes to the store does first (the CLI's logging, then configure), and nothing else.
    opens_the_store = ("from maskwatch import cli, tracking; from maskwatch.config import load_settings; "
                       "cli._quiet_backends(); tracking.configure(load_settings())")
    procs = [subprocess.Popen([sys.executable, "-c", opens_the_store], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path) for _ in range(4)]
    outputs = [(proc.communicate(timeout=300), proc.returncode) for proc in procs]
    for (_stdout, stderr), returncode in outputs:
        assert returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
        assert "Creating initial MLflow database tables" not in stderr  # MLflow's INFO lines stay quiet
    with contextlib.closing(sqlite3.connect(tmp_path / "mlflow.db")) as db:  # the processes have all ended
        experiments = db.execute("SELECT name FROM experiments WHERE name = 'maskwatch'").fetchall()
    assert experiments == [("maskwatch",)]  # created once, by whichever process came first


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_training_stopped_by_a_signal_is_recorded_as_killed(stop_signal, tmp_path, data_dir):
    """A cluster's preemption or a service manager sends SIGTERM: the run used to stay RUNNING in MLflow for ever
    (and Ctrl-C was recorded as FAILED)."""
    from mlflow import MlflowClient

    from conftest import as_from_a_terminal, cli_env, sqlite_run_with_a_logged_epoch

    proc = subprocess.Popen([MASKWATCH, "train", "--set", "data.max_photos=24", "--set", "train.phase1_epochs=40",
                             "--set", "train.early_stopping_patience=null"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(tmp_path, data_dir), cwd=tmp_path,
                            preexec_fn=as_from_a_terminal)
    try:
        run_id = sqlite_run_with_a_logged_epoch(tmp_path / "mlflow.db", still_running=lambda: proc.poll() is None)
        assert run_id is not None, f"no epoch was logged: {proc.returncode=} {proc.communicate()[1][-3000:]}"
        proc.send_signal(stop_signal)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(store, registry_uri=store)  # not a registry another test set for this process
    run = client.get_run(run_id)
    # 128 + the signal's number, as a shell reports a process the signal killed: 143 for SIGTERM, 130 for Ctrl-C
    assert proc.returncode == 128 + stop_signal and "Traceback" not in stderr, stderr[-2000:]
    assert f"MLflow run {run.info.run_id} recorded as KILLED" in stderr
    assert ("stopped by SIGTERM" in stderr) == (stop_signal == signal.SIGTERM)
    ended = client.get_run(run.info.run_id).info
    assert ended.status == "KILLED" and ended.end_time is not None
    assert client.search_registered_models() == []  # nothing half-trained was registered


@pytest.mark.slow
def test_two_deterministic_runs_of_one_seed_train_the_same_model(tmp_path, data_dir):
    """train.deterministic: two jobs with the same settings give the same epochs, test results and weights. Without
    it two such runs differed from the first epoch's loss (1.36 and 1.69: benchmarks/determinism.py measures both)."""
    import keras
    import numpy as np
    import pandas as pd

    from conftest import TINY_TRAIN_JOB, cli_env

    runs = []
    for name in ("first", "second"):
        work = tmp_path / name
        work.mkdir()
        out = subprocess.run([MASKWATCH, "train", *TINY_TRAIN_JOB, "--set", "train.phase1_epochs=2",
                              "--set", "train.deterministic=true", "--set", "train.export_formats=[]"],
                             capture_output=True, text=True, timeout=600, env=cli_env(work, data_dir), cwd=work)
        assert out.returncode == 0, out.stderr[-3000:]
        (run_dir,) = (work / "artifacts" / "runs").iterdir()
        runs.append(run_dir)
    first, second = (pd.read_csv(run / "history.csv").drop(columns="epoch_seconds") for run in runs)
    assert list(first.columns) == list(second.columns) and len(first) == 3
    assert np.array_equal(first.select_dtypes("number").to_numpy(), second.select_dtypes("number").to_numpy())
    evaluations = [json.loads((run / "evaluation.json").read_text()) for run in runs[:2]]
    assert evaluations[0] == evaluations[1]
    weights = [keras.models.load_model(run / "model" / "model.keras").get_weights() for run in runs]
    assert all(np.array_equal(a, b) for a, b in zip(*weights, strict=True))
