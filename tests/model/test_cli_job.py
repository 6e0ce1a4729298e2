"""The CLI end to end: train (tiny), evaluate --json, models list / promote."""

import contextlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

MASKWATCH = str(Path(sys.executable).parent / "maskwatch")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    work = tmp_path_factory.mktemp("cli")
    from conftest import TINY_TRAIN_JOB, cli_env

    env = cli_env(work, data_dir)
    args = TINY_TRAIN_JOB
    out = subprocess.run([MASKWATCH, "train", *args], capture_output=True, text=True, timeout=600, env=env, cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    return work, env, args, out


def test_train_prints_summary_and_uses_sqlite_store_in_cwd(trained):
    work, _, _, out = trained
    assert "macro-F1" in out.stdout and "promoted=True" in out.stdout
    assert f"mlflow ui --backend-store-uri sqlite:///{work}" in out.stdout
    assert (work / "mlflow.db").is_file() and (work / "mlartifacts").is_dir()
    assert "[phase1] epoch 1/1" in out.stderr and "ETA" in out.stderr


def test_evaluate_json_on_stdout(trained):
    work, env, args, _ = trained
    out = subprocess.run([MASKWATCH, "evaluate", "--json", *args], capture_output=True, text=True, timeout=300,
                         env=env, cwd=work)
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads(out.stdout)  # nothing but JSON on stdout
    assert metrics["model"] == "models:/maskwatch@champion"
    assert set(metrics["per_class"]) == {"with_mask", "without_mask", "mask_weared_incorrect"}
    assert 0 <= metrics["macro_f1"] <= 1 and len(metrics["confusion_matrix"]) == 3


def test_evaluate_scores_the_split_it_is_asked_for(trained, data_dir, yunet_path):
    """--split val scores the validation faces (settings are chosen there), the default the test faces; the
    JSON, the printed header and the MLflow run say which."""
    import mlflow

    from maskwatch.config import load_settings
    from maskwatch.data import split_faces

    work, env, args, _ = trained
    env = {**env, "MASKWATCH_YUNET_PATH": str(yunet_path)}
    _, val_faces, test_faces = split_faces(load_settings(
        overrides={"data": {"source_dir": str(data_dir), "max_photos": 24}}, environ={}))
    assert len(val_faces) != len(test_faces)  # so the counts below tell the splits apart
    scored = {}
    for split in ("val", "test"):
        out = subprocess.run([MASKWATCH, "evaluate", "--json", "--split", split, *args], capture_output=True,
                             text=True, timeout=300, env=env, cwd=work)
        assert out.returncode == 0, out.stderr[-2000:]
        scored[split] = json.loads(out.stdout)
        assert scored[split]["split"] == split
    assert scored["val"]["n_faces"] == len(val_faces) and scored["test"]["n_faces"] == len(test_faces)

    out = subprocess.run([MASKWATCH, "evaluate", "--detection", "--split", "val", *args], capture_output=True,
                         text=True, timeout=300, env=env, cwd=work)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith(f"val photos: {val_faces['photo_id'].nunique()}   faces: {len(val_faces)}")
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("maskwatch").experiment_id],
                              "tags.mlflow.runName = 'evaluate-detection' and tags.split = 'val'")
    assert len(runs) == 1

    bad = subprocess.run([MASKWATCH, "evaluate", "--split", "train", *args], capture_output=True, text=True,
                         timeout=120, env=env, cwd=work)
    assert bad.returncode == 2 and "'train' is not one of" in bad.stderr


def test_evaluate_detection_reports_where_map_is_lost_and_logs_it(trained, yunet_path):
    """evaluate --detection: YuNet + the champion on the test photos, mAP beside face AP and true-class mAP, and
    a confusion table in which every annotated face is counted once; all logged to an MLflow run."""
    import mlflow

    work, env, args, _ = trained
    env = {**env, "MASKWATCH_YUNET_PATH": str(yunet_path)}
    out = subprocess.run([MASKWATCH, "evaluate", "--detection", "--json", *args], capture_output=True, text=True,
                         timeout=300, env=env, cwd=work)
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads(out.stdout)
    assert metrics["photos"] >= 1 and metrics["faces"] >= metrics["photos"]
    assert set(metrics["ap50_per_class"]) == set(metrics["ap50_per_class_true_classes"])
    for key in ("map50", "face_ap50", "map50_true_classes"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["face_ap50"] > 0.0  # YuNet finds faces in data-set photos
    interval = metrics["interval"]  # photos resampled: evaluate.detection_bootstrap_samples (200)
    assert interval["samples"] == 200 and 0.0 <= interval["map50"][0] <= interval["map50"][1] <= 1.0
    confusion = metrics["confusion"]
    counts = confusion["counts"]
    assert confusion["rows"][-1] == "no face" and confusion["columns"][-1] == "missed"
    assert confusion["operating_face_score"] == 0.5  # YuNet's own score threshold: what serving reports
    assert metrics["face_score_power"] == 1.0  # YuNet's faces score face score x class probability
    assert sum(map(sum, counts[:-1])) == metrics["faces"]  # each annotated face once: found or missed
    assert sum(row[-1] for row in counts[:-1]) == round(metrics["faces"] * (1 - metrics["face_recall"]))

    text = subprocess.run([MASKWATCH, "evaluate", "--detection", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=work)
    assert text.returncode == 0 and "where mAP is lost" in text.stdout and "no face" in text.stdout
    assert "interval over resampled photos" in text.stdout and "face score^" not in text.stdout
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("maskwatch").experiment_id],
                              "tags.mlflow.runName = 'evaluate-detection' and tags.split = 'test'")
    assert len(runs) == 2
    assert runs[0].data.metrics["det_face_ap50"] == pytest.approx(metrics["face_ap50"])
    assert runs[0].data.metrics["det_map50_true_classes"] == pytest.approx(metrics["map50_true_classes"])
    assert runs[0].data.metrics["det_map50_ci_low"] == pytest.approx(interval["map50"][0])
    logged = {a.path for a in client.list_artifacts(runs[0].info.run_id)}
    assert {"detection_metrics.json", "detection_confusion.png", "detection_confusion.txt"} <= logged


def test_models_list_and_promote(trained):
    work, env, _, _ = trained
    listed = subprocess.run([MASKWATCH, "models", "list", "--json"], capture_output=True, text=True, env=env, cwd=work)
    rows = json.loads(listed.stdout)
    assert [str(r["version"]) for r in rows] == ["1"] and rows[0]["aliases"] == ["champion"]
    ok = subprocess.run([MASKWATCH, "models", "promote", "1"], capture_output=True, text=True, env=env, cwd=work)
    assert ok.returncode == 0 and "@champion" in ok.stdout
    bad = subprocess.run([MASKWATCH, "models", "promote", "7"], capture_output=True, text=True, env=env, cwd=work)
    assert bad.returncode == 2 and "no version 7" in bad.stderr


def test_models_register_refuses_what_it_cannot_record(trained, tmp_path):
    """Recording a run later needs the run folder's bundle, and only a model not yet registered."""
    work, env, _, _ = trained
    (run_dir,) = (work / "artifacts" / "runs").iterdir()
    again = subprocess.run([MASKWATCH, "models", "register", str(run_dir)], capture_output=True, text=True, env=env,
                           cwd=work)
    assert again.returncode == 2 and "already version 1 of the registry" in again.stderr
    assert "Traceback" not in again.stderr
    # With tracking.register_model=false the bundle names no version, but its run ended FINISHED: all recorded.
    unregistered = tmp_path / "copied"
    shutil.copytree(run_dir, unregistered)
    metadata = unregistered / "model" / "metadata.json"
    metadata.write_text(json.dumps({**json.loads(metadata.read_text()), "model_version": None}))
    twice = subprocess.run([MASKWATCH, "models", "register", str(unregistered)], capture_output=True, text=True,
                           env=env, cwd=work)
    assert twice.returncode == 2 and "is already FINISHED" in twice.stderr and "Traceback" not in twice.stderr
    (tmp_path / "checkpoint").mkdir()  # a job stopped during training leaves only its checkpoint
    empty = subprocess.run([MASKWATCH, "models", "register", str(tmp_path)], capture_output=True, text=True, env=env,
                           cwd=work)
    assert empty.returncode == 2 and "holds no model bundle (model/model.keras)" in empty.stderr


def test_serve_loads_the_champion_from_the_registry_once(trained):
    """Two gunicorn workers serve models:/maskwatch@champion; the registry is read once, before they start."""
    import urllib.request

    from conftest import start_maskwatch_serve, stop_server

    work, env, _, _ = trained
    url, proc = start_maskwatch_serve([], work / "serve.log", env=env, cwd=work)
    try:
        with urllib.request.urlopen(url + "/v1/model", timeout=10) as response:
            info = json.loads(response.read())
    finally:
        stop_server(proc)
    assert info["version"] == "1" and info["name"] == "maskwatch" and len(info["run_id"]) == 32
    log = (work / "serve.log").read_text()
    assert "Traceback" not in log and "serving /" in log, log[-2000:]  # workers got a local bundle


def test_serve_with_an_unknown_model_fails_before_starting(trained):
    work, env, _, _ = trained
    out = subprocess.run([MASKWATCH, "serve", "--model", "models:/maskwatch@nobody", "--port", "9"],
                         capture_output=True, text=True, env=env, cwd=work, timeout=120)
    assert out.returncode == 2 and "models:/maskwatch@nobody" in out.stderr and "Traceback" not in out.stderr


def test_gate_compares_models_trained_at_different_input_sizes(trained):
    """A challenger trained at 96 px is compared with the 160 px champion on the same test faces, each model
    fed crops made its own way; evaluate and export also follow the model's crop spec, not the settings."""
    work, env, args, _ = trained
    small = [*args, "--set", "data.image_size=96"]
    out = subprocess.run([MASKWATCH, "train", *small], capture_output=True, text=True, timeout=600, env=env, cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "registry: version 2" in out.stdout and "vs champion v1" in out.stdout, out.stdout[-1500:]
    for version, extra in (("1", small), ("2", args)):  # the settings name the other model's input size
        ev = subprocess.run([MASKWATCH, "evaluate", "--json", "--model", f"models:/maskwatch/{version}", *extra],
                            capture_output=True, text=True, timeout=300, env=env, cwd=work)
        assert ev.returncode == 0, ev.stderr[-2000:]
        assert 0 <= json.loads(ev.stdout)["macro_f1"] <= 1


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
    procs = [subprocess.Popen([MASKWATCH, "models", "list", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=tmp_path) for _ in range(4)]
    outputs = [(proc.communicate(timeout=300), proc.returncode) for proc in procs]
    for (stdout, stderr), returncode in outputs:
        assert returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
        assert json.loads(stdout) == []
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


def test_restarted_workers_still_find_the_model_after_the_cache_dropped_it(trained):
    """gunicorn restarts a worker that dies, and the new one loads the model from disk again: the served copy must
    not be the model cache's, which the next fetch with new files (maskwatch export) deletes."""
    import os
    import time
    import urllib.request

    from conftest import start_maskwatch_serve, stop_server

    work, env, _, _ = trained
    url, proc = start_maskwatch_serve([], work / "restart.log", env=env, cwd=work)
    try:
        shutil.rmtree(Path(os.environ["MASKWATCH_CACHE_DIR"]) / "models")
        master = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()[0]
        first_workers = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        for worker in first_workers:
            os.kill(int(worker), signal.SIGKILL)
        deadline, answer = time.time() + 120, None
        while time.time() < deadline and answer is None:  # only the workers that replace them can answer
            try:
                with urllib.request.urlopen(url + "/ready", timeout=5) as response:
                    answer = response.status, json.loads(response.read())
            except OSError:
                time.sleep(0.5)
        new_workers = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    finally:
        stop_server(proc)
    assert answer is not None and answer[0] == 200, (work / "restart.log").read_text()[-2000:]
    assert len(new_workers) == 2 and not set(new_workers) & set(first_workers)


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
    assert json.loads((runs[0] / "evaluation.json").read_text()) == json.loads((runs[1] / "evaluation.json").read_text())
    weights = [keras.models.load_model(run / "model" / "model.keras").get_weights() for run in runs]
    assert all(np.array_equal(a, b) for a, b in zip(*weights, strict=True))
