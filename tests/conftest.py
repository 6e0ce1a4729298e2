"""Shared fixtures. Tests read the real data set, weights and detector from ../shared (or the paths
named by MASKWATCH_SHARED_DIR / KERAS_HOME / MASKWATCH_DATA_DIR / MASKWATCH_YUNET_PATH)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("MASKWATCH_SHARED_DIR", REPO.parent / "shared")).resolve()
# Where the main job downloads the Kaggle original (RGBA PNGs) on a connected machine.
DOWNLOADED = REPO / "artifacts" / "downloads" / "andrewmvd__face-mask-detection"


def _first_existing(*candidates: Path) -> Path:
    return next((c for c in candidates if c.exists()), candidates[0])


DATA_DIR = Path(os.environ.get("MASKWATCH_DATA_DIR") or _first_existing(SHARED / "data" / "face-mask-detection",
                                                                        DOWNLOADED))
PNG_SAMPLE_DIR = _first_existing(SHARED / "data" / "face-mask-detection-png-sample", DOWNLOADED)
YUNET_PATH = Path(os.environ.get("MASKWATCH_YUNET_PATH") or SHARED / "models" / "face_detection_yunet_2026may.onnx")
if (SHARED / "keras").is_dir():  # otherwise Keras downloads the ImageNet weights itself
    os.environ.setdefault("KERAS_HOME", str(SHARED / "keras"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_configure(config):
    if not DATA_DIR.exists():
        raise pytest.UsageError(
            f"no data set at {DATA_DIR}: run the main job first (it downloads it from Kaggle) or set "
            "MASKWATCH_DATA_DIR / MASKWATCH_SHARED_DIR; see README 'Offline use'."
        )


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return DATA_DIR


@pytest.fixture(scope="session")
def png_sample_dir() -> Path:
    return PNG_SAMPLE_DIR


@pytest.fixture(scope="session")
def yunet_path() -> Path:
    return YUNET_PATH


@pytest.fixture()
def settings_factory(tmp_path):
    """Settings for a small run in a temporary work dir and SQLite store."""
    from maskwatch.config import load_settings

    def make(**sections):
        overrides = {
            "paths": {"work_dir": str(tmp_path / "work")},
            "data": {"source_dir": str(DATA_DIR), "max_photos": 24},
            "tracking": {"tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"},
            "evaluate": {"bootstrap_samples": 200},
        }
        for section, values in sections.items():
            overrides.setdefault(section, {}).update(values)
        return load_settings(None, "full", overrides, environ={})

    return make


@pytest.fixture(scope="session")
def small_prepared(tmp_path_factory):
    """A few dozen real crops (24 photos), prepared once per session."""
    from maskwatch.config import load_settings
    from maskwatch.data import prepare_data

    work = tmp_path_factory.mktemp("small")
    settings = load_settings(None, "full", {
        "paths": {"work_dir": str(work)}, "data": {"source_dir": str(DATA_DIR), "max_photos": 24}}, environ={})
    prepared, _ = prepare_data(settings)
    return prepared
