"""The CLI end to end: train (tiny), evaluate --json, models list / promote."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

MASKWATCH = str(Path(sys.executable).parent / "maskwatch")


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    work = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "MASKWATCH_DATA_DIR": str(data_dir), "MASKWATCH_WORK_DIR": str(work / "artifacts")}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("MASKWATCH_TRACKING_URI", None)
    args = ["--set", "data.max_photos=24", "--set", "train.phase1_epochs=1", "--set", "train.phase2_epochs=1",
            "--set", "evaluate.bootstrap_samples=200"]
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


def test_models_list_and_promote(trained):
    work, env, _, _ = trained
    listed = subprocess.run([MASKWATCH, "models", "list", "--json"], capture_output=True, text=True, env=env, cwd=work)
    rows = json.loads(listed.stdout)
    assert [str(r["version"]) for r in rows] == ["1"] and rows[0]["aliases"] == ["champion"]
    ok = subprocess.run([MASKWATCH, "models", "promote", "1"], capture_output=True, text=True, env=env, cwd=work)
    assert ok.returncode == 0 and "@champion" in ok.stdout
    bad = subprocess.run([MASKWATCH, "models", "promote", "7"], capture_output=True, text=True, env=env, cwd=work)
    assert bad.returncode == 2 and "no version 7" in bad.stderr
