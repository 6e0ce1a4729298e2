"""Registry models load through a per-user cache: fetched once, refetched when the stored files change,
never left behind in the temp folder (each load used to leave a 30 MB copy there)."""

import json
import os
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

from conftest import free_port

MASKWATCH = str(Path(sys.executable).parent / "maskwatch")


def register_tiny_bundle(tiny_bundle: Path, settings) -> str:
    """Log the tiny bundle as training does and register it as maskwatch v1 @champion; returns the run id."""
    model = keras.models.load_model(tiny_bundle / "model.keras")
    metadata = {**json.loads((tiny_bundle / "metadata.json").read_text()), "model_version": None}  # as training logs it
    with tracking.training_run(settings, "cache-test") as run_id:
        version = tracking.log_keras_model(model, np.zeros((1, 160, 160, 3), np.float32), metadata, "maskwatch",
                                           extra_files=[tiny_bundle / "model_float.tflite"])
    tracking.promote(settings, version)
    return run_id


@pytest.fixture
def registered(tiny_bundle, settings_factory, tmp_path, monkeypatch):
    """The tiny bundle logged and registered as maskwatch v1 @champion in a fresh SQLite store."""
    monkeypatch.setenv("MASKWATCH_CACHE_DIR", str(tmp_path / "cache"))
    settings = settings_factory()
    return settings, register_tiny_bundle(tiny_bundle, settings), tmp_path / "cache" / "models"


def test_a_registry_model_is_fetched_once_and_leaves_nothing_in_the_temp_folder(registered, tmp_path, monkeypatch,
                                                                                capsys):
    settings, run_id, cache = registered
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))

    first = tracking.resolve_model_uri("models:/maskwatch@champion", settings)
    assert "Downloading artifacts" not in capsys.readouterr().err  # no bar of redraws where stderr is no terminal
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
    champion = tracking.resolve_model_uri("models:/maskwatch@champion", settings)
    tracking.resolve_model_uri(f"runs:/{run_id}/model", settings)  # fetched last
    tracking.resolve_model_uri("models:/maskwatch@champion", settings)  # but used last

    listed = subprocess.run([MASKWATCH, "models", "cache", "--json"], capture_output=True, text=True, timeout=120)
    rows = json.loads(listed.stdout)
    assert [(row["uri"], row["model_version"], row["run_id"]) for row in rows] == [
        ("models:/maskwatch/1", "1", run_id), (f"runs:/{run_id}/model", None, run_id)]  # most recently used first
    assert {row["tracking_uri"] for row in rows} == {settings.tracking_uri} and rows[0]["mb"] > 1
    table = subprocess.run([MASKWATCH, "models", "cache"], capture_output=True, text=True, timeout=120).stdout
    assert "models:/maskwatch/1" in table and settings.tracking_uri in table and str(cache) in table

    kept = subprocess.run([MASKWATCH, "models", "cache", "--keep", "1"], capture_output=True, text=True, timeout=120)
    assert kept.returncode == 0 and f"deleted 1 cached models ({rows[1]['mb']:.1f} MB)" in kept.stdout
    assert visible(cache) == [entry_of(champion)] and hidden(cache) == []
    both = subprocess.run([MASKWATCH, "models", "cache", "--clear", "--keep", "1"], capture_output=True, text=True,
                          timeout=120)
    assert both.returncode == 2 and "give one" in both.stderr and visible(cache) == [entry_of(champion)]

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


def test_a_model_the_store_does_not_hold_is_named_with_what_to_do(registered, settings_factory, tmp_path):
    settings, _, _ = registered
    for uri, missing in [("models:/maskwatch@staging", "alias staging not found"), ("models:/maskwatch/9", "version=9"),
                         ("models:/other@champion", "Registered Model with name=other not found"),
                         (f"runs:/{'0' * 32}/model", f"Run with id={'0' * 32} not found")]:
        with pytest.raises(tracking.ModelNotFoundError, match=f"no model {uri}: .*{missing}.*maskwatch train"):
            tracking.resolve_model_uri(uri, settings)
    # No store there yet: said so, and opening it does not create one.
    nowhere = settings_factory(tracking={"tracking_uri": f"sqlite:///{tmp_path / 'elsewhere' / 'mlflow.db'}"})
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(tracking.ModelNotFoundError, match="there is no tracking store at .*elsewhere"):
        tracking.resolve_model_uri("models:/maskwatch@champion", nowhere)
    assert list((tmp_path / "elsewhere").iterdir()) == []


def test_a_pinned_version_loads_from_the_cache_while_the_tracking_server_is_down(
        tiny_bundle, settings_factory, mlflow_server, tmp_path, monkeypatch, caplog, photo_bytes):
    """A server restarting during an MLflow outage still starts with models:/name/3 it fetched before; an alias,
    which may have moved meanwhile, is refused with the versions the cache holds."""
    from maskwatch.tracking import TrackingUnavailableError

    monkeypatch.setenv("MASKWATCH_CACHE_DIR", str(tmp_path / "cache"))
    settings = settings_factory(tracking={"tracking_uri": mlflow_server.uri})
    run_id = register_tiny_bundle(tiny_bundle, settings)
    pinned = tracking.resolve_model_uri("models:/maskwatch@champion", settings)
    by_run = tracking.resolve_model_uri(f"runs:/{run_id}/model", settings)
    mlflow_server.stop()

    assert tracking.resolve_model_uri("models:/maskwatch/1", settings) == pinned
    assert "loading models:/maskwatch/1 from the model cache" in caplog.text
    assert tracking.resolve_model_uri(f"runs:/{run_id}/model/", settings) == by_run
    with pytest.raises(TrackingUnavailableError, match="holds models:/maskwatch/1 from it, which loads offline; an"):
        tracking.resolve_model_uri("models:/maskwatch@champion", settings)
    with pytest.raises(TrackingUnavailableError, match="not reachable") as never_fetched:
        tracking.resolve_model_uri("models:/maskwatch/2", settings)
    assert "holds" in str(never_fetched.value)  # still says what it could load
    other_server = settings_factory(tracking={"tracking_uri": f"http://127.0.0.1:{free_port()}"})
    with pytest.raises(TrackingUnavailableError) as elsewhere:  # the same name on another server is another model
        tracking.resolve_model_uri("models:/maskwatch/1", other_server)
    assert "holds" not in str(elsewhere.value)

    # Through the command line as a user runs it: a pinned version works, the alias is a clear error.
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(photo_bytes)
    env = {**os.environ, "MASKWATCH_TRACKING_URI": mlflow_server.uri}
    offline = subprocess.run([MASKWATCH, "predict", "--model", "models:/maskwatch/1", "--json", str(photo)],
                             capture_output=True, text=True, timeout=300, env=env)
    assert offline.returncode == 0, offline.stderr[-2000:]
    assert len(json.loads(offline.stdout)[str(photo)]) >= 1, offline.stdout[:500]
    by_alias = subprocess.run([MASKWATCH, "predict", "--model", "models:/maskwatch@champion", str(photo)],
                              capture_output=True, text=True, timeout=300, env=env)
    assert by_alias.returncode == 2 and "Traceback" not in by_alias.stderr
    assert "not reachable" in by_alias.stderr and "models:/maskwatch/1" in by_alias.stderr

    # A damaged copy is not served: there is nothing to fetch it again from.
    with open(pinned / "model.keras", "r+b") as model_file:
        model_file.truncate(1000)
    with pytest.raises(TrackingUnavailableError, match="not reachable"):
        tracking.resolve_model_uri("models:/maskwatch/1", settings)
