"""The CLI end to end on one tiny trained model: train, evaluate --json, models list / promote / register, serve,
the promotion gate (test_cli_process.py has the CLI tests that need no trained model)."""

import json
import os
import shutil
import signal
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
    for wrong, said in ((run_dir / "model", "is a model bundle, not a training run's folder"),
                        (tmp_path / "nowhere", "no run folder at")):
        out = subprocess.run([MASKWATCH, "models", "register", str(wrong)], capture_output=True, text=True, env=env,
                             cwd=work)
        assert out.returncode == 2 and said in out.stderr and "Traceback" not in out.stderr


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


def test_gate_compares_models_trained_at_different_input_sizes_and_splits(trained):
    """A challenger trained at 96 px is compared with the 160 px champion on the same test faces, each model
    fed crops made its own way; evaluate and export also follow the model's crop spec, not the settings.
    The challenger's split is another (a larger test fraction), so its test photos include some the champion
    trained on: the two are compared on the others, and evaluate warns about a model scored on its own photos."""
    work, env, args, _ = trained
    small = [*args, "--set", "data.image_size=96", "--set", "data.test_fraction=0.3"]
    out = subprocess.run([MASKWATCH, "train", *small], capture_output=True, text=True, timeout=600, env=env, cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "registry: version 2" in out.stdout and "vs champion v1" in out.stdout, out.stdout[-1500:]
    assert "test photos it never trained on" in out.stdout, out.stdout[-1500:]
    for version, extra, warned in (("1", small, True), ("2", args, False)):  # each on the other's split: v2's
        # test photos include v1's training photos; v1's test photos are all in v2's test split, never trained on
        ev = subprocess.run([MASKWATCH, "evaluate", "--json", "--model", f"models:/maskwatch/{version}", *extra],
                            capture_output=True, text=True, timeout=300, env=env, cwd=work)
        assert ev.returncode == 0, ev.stderr[-2000:]
        assert 0 <= json.loads(ev.stdout)["macro_f1"] <= 1
        assert ("photos this model trained on" in ev.stderr) == warned, ev.stderr[-2000:]


def test_restarted_workers_still_find_the_model_after_the_cache_dropped_it(trained):
    """gunicorn restarts a worker that dies, and the new one loads the model from disk again: the served copy must
    not be the model cache's, which the next fetch with new files (maskwatch export) deletes."""
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
