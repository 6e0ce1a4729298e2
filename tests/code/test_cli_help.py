import os
import subprocess
import sys
from pathlib import Path

import pytest

MASKWATCH = str(Path(sys.executable).parent / "maskwatch")
COMMANDS = [[], ["data"], ["data", "prepare"], ["train"], ["train-detector"], ["evaluate"], ["predict"], ["serve"],
            ["webcam"],
            ["export"], ["models"], ["models", "list"], ["models", "promote"],
            ["models", "register"], ["config"], ["config", "show"]]
BENCHMARK_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
BENCHMARKS = sorted(p for p in BENCHMARK_DIR.glob("*.py") if p.name != "common.py")
FUZZERS = sorted((BENCHMARK_DIR.parent / "tests" / "fuzz").glob("*.py"))


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "maskwatch")
def test_every_command_has_help(command):
    out = subprocess.run([MASKWATCH, *command, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Usage: maskwatch" in out.stdout


@pytest.mark.parametrize("script", BENCHMARKS + FUZZERS, ids=lambda p: p.name)
def test_every_benchmark_and_fuzzer_has_help(script):
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60,
                         cwd=BENCHMARK_DIR.parent)
    assert out.returncode == 0, out.stderr
    example = f"python {script.relative_to(BENCHMARK_DIR.parent)}"
    assert out.stdout.startswith("usage:") and example in out.stdout  # the docstring's example


def test_config_show_applies_overrides():
    out = subprocess.run([MASKWATCH, "config", "show", "--preset", "quick", "--set", "train.batch_size=8"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "batch_size: 8" in out.stdout and "max_photos: 200" in out.stdout


@pytest.mark.parametrize(("args", "named"), [
    (["--set", "train.imbalance=smote"], "imbalance"), (["--set", "foo"], "section.key=value"),
    (["--set", "train.phase1_epochs=["], "not valid YAML"), (["--set", "train.phase1_epoch=3"], "did you mean"),
    (["--config", "broken.yaml"], "is not valid YAML")], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_override_or_config_file_is_a_clear_error(args, named, tmp_path):
    (tmp_path / "broken.yaml").write_text("train: [\n")
    out = subprocess.run([MASKWATCH, "config", "show", *args], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path)
    assert out.returncode == 2 and named in " ".join(out.stderr.replace("│", " ").split())
    assert "Traceback" not in out.stderr


def test_predict_names_a_missing_photo_or_model_and_leaves_no_store_behind(tmp_path):
    """A typo in a photo's name is reported before any model loads; with no tracking store in this folder, the
    default champion is a clear error with what to do, and no empty mlflow.db is left here."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MASKWATCH_TRACKING_URI")}
    typo = subprocess.run([MASKWATCH, "predict", "phtoo.jpg"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert typo.returncode == 2 and "phtoo.jpg: no such file or folder" in typo.stderr
    (tmp_path / "photo.jpg").write_bytes(b"not yet a photo")
    no_store = subprocess.run([MASKWATCH, "predict", "photo.jpg"], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path, env=env)
    assert no_store.returncode == 2 and "Traceback" not in no_store.stderr
    assert f"no model models:/maskwatch@champion: there is no tracking store at {tmp_path / 'mlflow.db'}" in \
        no_store.stderr and "maskwatch train" in no_store.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.jpg"]


def test_the_registry_commands_leave_no_store_where_there_is_none(tmp_path):
    """`models list` in the wrong folder used to create an empty mlflow.db there and say "no versions yet";
    `models promote 3` created one and said "'maskwatch' has no version 3"."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MASKWATCH_TRACKING_URI")}
    store = tmp_path / "mlflow.db"
    listed = subprocess.run([MASKWATCH, "models", "list"], capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env=env)
    assert listed.returncode == 0 and listed.stdout.startswith(f"no tracking store at {store} yet")
    as_json = subprocess.run([MASKWATCH, "models", "list", "--json"], capture_output=True, text=True, timeout=120,
                             cwd=tmp_path, env=env)
    assert as_json.returncode == 0 and as_json.stdout.strip() == "[]"
    promoted = subprocess.run([MASKWATCH, "models", "promote", "3"], capture_output=True, text=True, timeout=120,
                              cwd=tmp_path, env=env)
    assert promoted.returncode == 2 and f"there is no tracking store at {store}" in promoted.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_data_folder_is_a_clear_error(tmp_path):
    out = subprocess.run([MASKWATCH, "data", "prepare", "--data-dir", str(tmp_path / "nowhere"), "--work-dir",
                          str(tmp_path / "w")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_no_data_and_no_kaggle_token_says_what_to_do(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "KAGGLE_CONFIG_DIR": str(tmp_path / "k")}
    out = subprocess.run([MASKWATCH, "data", "prepare", "--work-dir", str(tmp_path / "w")], capture_output=True,
                         text=True, timeout=60, env=env, cwd=tmp_path)
    assert out.returncode == 2
    assert "MASKWATCH_DATA_DIR" in out.stderr and "Kaggle token" in out.stderr
