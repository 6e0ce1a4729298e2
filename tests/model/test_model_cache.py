"""Registry models load through a per-user cache: fetched once, refetched when the stored files change,
never left behind in the temp folder (each load used to leave a 30 MB copy there)."""

import json
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import keras
import numpy as np
import pytest

from maskwatch import tracking
from maskwatch.detect import Predictor

MASKWATCH = str(Path(sys.executable).parent / "maskwatch")


@pytest.fixture
def registered(tiny_bundle, settings_factory, tmp_path, monkeypatch):
    """The tiny bundle logged and registered as maskwatch v1 @champion in a fresh SQLite store."""
    monkeypatch.setenv("MASKWATCH_CACHE_DIR", str(tmp_path / "cache"))
    settings = settings_factory()
    model = keras.models.load_model(tiny_bundle / "model.keras")
    metadata = {**json.loads((tiny_bundle / "metadata.json").read_text()), "model_version": None}  # as training logs it
    with tracking.training_run(settings, "cache-test") as run_id:
        version = tracking.log_keras_model(model, np.zeros((1, 160, 160, 3), np.float32), metadata, "maskwatch",
                                           extra_files=[tiny_bundle / "model_float.tflite"])
    tracking.promote(settings, version)
    return settings, run_id, tmp_path / "cache" / "models"


def test_a_registry_model_is_fetched_once_and_leaves_nothing_in_the_temp_folder(registered, tmp_path, monkeypatch):
    settings, run_id, cache = registered
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    first = tracking.resolve_model_uri("models:/maskwatch@champion", settings)
    again = tracking.resolve_model_uri("models:/maskwatch/1", settings)
    assert tracking.resolve_model_uri("models:/maskwatch/latest", settings) == first
    by_run = tracking.resolve_model_uri(f"runs:/{run_id}/model", settings)

    assert list(temp.iterdir()) == []
    assert first == again and first.is_relative_to(cache)
    assert (first / "model.keras").stat().st_ino == (again / "model.keras").stat().st_ino  # not fetched again
    # The registry version is part of what a models:/ URI gives, so the runs:/ URI has its own copy.
    assert json.loads((first / "metadata.json").read_text())["model_version"] == "1"
    assert json.loads((by_run / "metadata.json").read_text())["model_version"] is None
    assert len(visible(cache)) == 2 and hidden(cache) == []
    predictor = Predictor.from_uri("models:/maskwatch@champion", settings, runtime="litert")
    assert predictor.metadata.model_version == "1"
    assert predictor.predict_inputs(np.zeros((2, 160, 160, 3), np.uint8)).shape == (2, 3)


def test_files_attached_after_the_first_fetch_are_fetched(registered, tmp_path):
    """`maskwatch export` attaches files to a registered model: a stale cached copy would lack them."""
    settings, _, cache = registered
    before = tracking.resolve_model_uri("models:/maskwatch@champion", settings)
    assert not (before / "notes.txt").exists()
    extra = tmp_path / "notes.txt"
    extra.write_text("exported later")
    tracking.attach_to_registered_model("models:/maskwatch@champion", settings, [extra])

    after = tracking.resolve_model_uri("models:/maskwatch@champion", settings)
    assert (after / "notes.txt").read_text() == "exported later"
    assert visible(cache) == [entry_of(after)] and hidden(cache) == []  # the old copy is gone
    assert not before.exists()


def test_loads_racing_on_an_empty_cache_all_get_a_whole_bundle(registered):
    settings, _, cache = registered
    bundles, errors = [], []

    def load():
        try:
            bundles.append(tracking.resolve_model_uri("models:/maskwatch@champion", settings))
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=load) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(set(bundles)) == 1
    assert keras.models.load_model(bundles[0] / "model.keras").output_shape == (None, 3)
    assert len(visible(cache)) == 1 and hidden(cache) == []


def test_a_damaged_cached_copy_is_fetched_again(registered):
    settings, _, cache = registered
    bundle = tracking.resolve_model_uri("models:/maskwatch@champion", settings)
    good_size = (bundle / "model.keras").stat().st_size
    with open(bundle / "model.keras", "r+b") as model_file:
        model_file.truncate(1000)
    again = tracking.resolve_model_uri("models:/maskwatch@champion", settings)
    assert again == bundle and (again / "model.keras").stat().st_size == good_size
    assert len(visible(cache)) == 1 and hidden(cache) == []


def entry_of(bundle: Path) -> Path:
    return bundle.parents[2]  # <entry>/files/model/data


def visible(cache: Path) -> list[Path]:
    return sorted(path for path in cache.iterdir() if not path.name.startswith("."))


def hidden(cache: Path) -> list[Path]:
    """Half-done downloads and retired copies: none may be left."""
    return sorted(path for path in cache.iterdir() if path.name.startswith("."))


def test_the_cache_is_listed_and_cleared_from_the_command_line(registered):
    settings, run_id, cache = registered
    tracking.resolve_model_uri("models:/maskwatch@champion", settings)
    listed = subprocess.run([MASKWATCH, "models", "cache", "--json"], capture_output=True, text=True, timeout=120)
    rows = json.loads(listed.stdout)
    assert [(row["model_version"], row["run_id"]) for row in rows] == [("1", run_id)] and rows[0]["mb"] > 1
    table = subprocess.run([MASKWATCH, "models", "cache"], capture_output=True, text=True, timeout=120).stdout
    assert run_id in table and str(cache) in table
    cleared = subprocess.run([MASKWATCH, "models", "cache", "--clear"], capture_output=True, text=True, timeout=120)
    assert cleared.returncode == 0 and f"deleted 1 cached models ({rows[0]['mb']:.1f} MB)" in cleared.stdout
    assert list(cache.iterdir()) == []
    assert "no models cached" in subprocess.run([MASKWATCH, "models", "cache"], capture_output=True, text=True,
                                                timeout=120).stdout
    assert (tracking.resolve_model_uri("models:/maskwatch@champion", settings) / "model.keras").is_file()


def test_a_version_named_some_other_way_is_a_clear_error(registered):
    from mlflow.exceptions import MlflowException

    settings, _, _ = registered
    with pytest.raises(MlflowException, match="a number, 'latest' or @alias"):
        tracking.resolve_model_uri("models:/maskwatch/Production", settings)
