"""The real download code, exercised through file:// URLs (no network here)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from maskwatch.config import DetectorConfig
from maskwatch.detect import YUNET_SHA256, YUNET_URL, DetectorModelError, fetch_verified, sha256_of, yunet_model_path


def test_pinned_yunet_url_and_hash():
    assert "47534e27c9851bb1128ccc0102f1145e27f23f98" in YUNET_URL and YUNET_URL.endswith(
        "face_detection_yunet_2026may.onnx")
    assert len(YUNET_SHA256) == 64


def test_download_verifies_and_caches(yunet_path, tmp_path, monkeypatch):
    monkeypatch.setenv("MASKWATCH_CACHE_DIR", str(tmp_path / "cache"))
    path = yunet_model_path(DetectorConfig(model_path=None), url=yunet_path.as_uri())
    assert path == tmp_path / "cache" / "face_detection_yunet_2026may.onnx"
    assert sha256_of(path) == YUNET_SHA256
    # Cached: a second call does not fetch again (the URL is now unusable and still works).
    assert yunet_model_path(DetectorConfig(model_path=None), url="file:///nonexistent") == path


def test_download_with_wrong_hash_keeps_nothing(tmp_path):
    source = tmp_path / "fake.onnx"
    source.write_bytes(b"tampered")
    target = tmp_path / "cache" / "model.onnx"
    with pytest.raises(DetectorModelError, match="expected"):
        fetch_verified(source.as_uri(), YUNET_SHA256, target)
    assert not target.exists() and not list(target.parent.glob("*.part"))


def test_an_interrupted_download_keeps_nothing(yunet_path, tmp_path, monkeypatch):
    """Ctrl-C halfway through the copy: neither the target nor a .part file may be left."""
    from maskwatch import detect

    def copy_half_then_interrupt(source, target):
        target.write(source.read(1000))
        raise KeyboardInterrupt

    monkeypatch.setattr(detect.shutil, "copyfileobj", copy_half_then_interrupt)
    target = tmp_path / "cache" / "model.onnx"
    with pytest.raises(KeyboardInterrupt):
        fetch_verified(yunet_path.as_uri(), YUNET_SHA256, target)
    assert list(target.parent.iterdir()) == []
    monkeypatch.undo()
    assert sha256_of(fetch_verified(yunet_path.as_uri(), YUNET_SHA256, target)) == YUNET_SHA256


def test_unreachable_download_says_how_to_work_offline(tmp_path):
    with pytest.raises(DetectorModelError, match="MASKWATCH_YUNET_PATH"):
        fetch_verified((tmp_path / "missing.onnx").as_uri(), YUNET_SHA256, tmp_path / "c" / "m.onnx")


def test_kaggle_credentials_detection(tmp_path):
    from maskwatch.data import kaggle_credentials_present

    assert not kaggle_credentials_present({"KAGGLE_CONFIG_DIR": str(tmp_path)})
    assert kaggle_credentials_present({"KAGGLE_USERNAME": "u", "KAGGLE_KEY": "k"})
    (tmp_path / "kaggle.json").write_text("{}")
    assert kaggle_credentials_present({"KAGGLE_CONFIG_DIR": str(tmp_path)})


def test_a_data_set_download_stopped_halfway_leaves_nothing_to_mistake_for_the_whole(tmp_path):
    """locate_dataset trusts any download folder with annotations/: a half-unzipped one must never be left."""
    from maskwatch.data import fill_whole

    destination = tmp_path / "downloads" / "andrewmvd__face-mask-detection"

    def unzip_then_interrupt(staging):
        (staging / "annotations").mkdir()
        (staging / "annotations" / "maksssksksss0.xml").write_text("<annotation/>")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fill_whole(destination, unzip_then_interrupt)
    assert list(destination.parent.iterdir()) == []

    destination.mkdir()  # what the old code left after an interrupted download: no annotations/
    (destination / "images").mkdir()

    def unzip(staging):
        for folder in ("annotations", "images"):
            (staging / folder).mkdir()
            (staging / folder / "photo0").write_text(folder)

    assert fill_whole(destination, unzip) == destination
    assert sorted(p.name for p in destination.iterdir()) == ["annotations", "images"]
    assert (destination / "images" / "photo0").read_text() == "images"
    assert [p.name for p in destination.parent.iterdir()] == [destination.name]


def test_a_kaggle_download_that_fails_is_a_clear_error_and_leaves_nothing(tmp_path):
    """With a token but no way through (a proxy that refuses), the Kaggle client's ConnectionError was a traceback."""
    from conftest import NO_WAY_OUT

    env = {k: v for k, v in os.environ.items() if k not in ("MASKWATCH_DATA_DIR", "KAGGLE_CONFIG_DIR")}
    env.update(HOME=str(tmp_path), KAGGLE_USERNAME="someone", KAGGLE_KEY="0" * 32, **NO_WAY_OUT)
    out = subprocess.run([str(Path(sys.executable).parent / "maskwatch"), "data", "prepare", "--work-dir",
                          str(tmp_path / "work")], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert "the Kaggle download of andrewmvd/face-mask-detection failed" in out.stderr
    assert "set MASKWATCH_DATA_DIR" in out.stderr
    assert list((tmp_path / "work" / "downloads").iterdir()) == []
