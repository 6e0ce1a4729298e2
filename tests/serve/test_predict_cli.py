import json
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2

MASKWATCH = str(Path(sys.executable).parent / "maskwatch")


def test_predict_prints_json_and_writes_annotated_image(tiny_bundle, data_dir, yunet_path, tmp_path):
    env = {**os.environ, "MASKWATCH_YUNET_PATH": str(yunet_path)}
    photos = [str(data_dir / "images" / "maksssksksss0.jpg"), str(data_dir / "images" / "maksssksksss1.jpg")]
    out = subprocess.run([MASKWATCH, "predict", *photos, "--model", str(tiny_bundle), "--json", "--output",
                          str(tmp_path / "annotated")], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert list(report) == photos and len(report[photos[0]]) >= 3
    written = cv2.imread(str(tmp_path / "annotated" / "maksssksksss0_annotated.jpg"))
    assert written.shape == (366, 512, 3)


def test_predict_reports_unreadable_files(tiny_bundle, yunet_path, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    env = {**os.environ, "MASKWATCH_YUNET_PATH": str(yunet_path)}
    out = subprocess.run([MASKWATCH, "predict", str(bad), "--model", str(tiny_bundle)], capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 1 and "bad.jpg" in out.stderr and "Traceback" not in out.stderr


def test_predict_takes_folders_and_counts_faces_by_label(tiny_bundle, data_dir, yunet_path, tmp_path):
    """A folder of photos, subfolders included; same-named photos in two subfolders keep their own annotated
    copies; other files are skipped; one unreadable photo is reported and the rest still answered."""
    import shutil

    folder = tmp_path / "photos"
    for sub, source in (("a", "maksssksksss0.jpg"), ("b", "maksssksksss1.jpg")):
        (folder / sub).mkdir(parents=True)
        shutil.copy(data_dir / "images" / source, folder / sub / "photo.jpg")
    (folder / "notes.txt").write_text("not a photo")
    (folder / ".hidden.jpg").write_bytes(b"skipped")
    (folder / "broken.png").write_bytes(b"nope")
    env = {**os.environ, "MASKWATCH_YUNET_PATH": str(yunet_path)}
    command = [MASKWATCH, "predict", str(folder), "--model", str(tiny_bundle)]
    out = subprocess.run([*command, "--output", str(tmp_path / "annotated")], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 1, out.stderr[-2000:]  # one photo could not be read
    assert "broken.png" in out.stderr and "Traceback" not in out.stderr
    assert f"{folder}: skipped 1 file(s) that are not photos by their suffix (notes.txt)" in out.stderr
    faces = {line.split(": ")[0]: int(line.split(": ")[1].split()[0]) for line in out.stdout.splitlines()
             if line.endswith("face(s)")}
    assert set(faces) == {str(folder / "a" / "photo.jpg"), str(folder / "b" / "photo.jpg")}
    summary = out.stdout.strip().splitlines()[-1]  # "2 photo(s), 9 face(s): with_mask 7, ...; 1 unreadable"
    assert summary.startswith(f"2 photo(s), {sum(faces.values())} face(s): ") and summary.endswith("; 1 unreadable")
    counted = {label: int(n) for label, n in re.findall(r"(\w+) (\d+)", summary.split(": ", 1)[1])}
    assert sum(counted.values()) == sum(faces.values()) >= 4
    assert set(counted) == {"with_mask", "without_mask", "mask_weared_incorrect"}
    assert cv2.imread(str(tmp_path / "annotated" / "a" / "photo_annotated.jpg")).shape == (366, 512, 3)
    assert cv2.imread(str(tmp_path / "annotated" / "b" / "photo_annotated.jpg")).shape[:2] == cv2.imread(
        str(data_dir / "images" / "maksssksksss1.jpg")).shape[:2]

    as_json = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=300, env=env)
    assert sorted(json.loads(as_json.stdout)) == sorted(faces)
    assert {k: len(v) for k, v in json.loads(as_json.stdout).items()} == faces

    # The same two photos given one by one: their annotated copies still do not overwrite each other.
    one_by_one = subprocess.run([MASKWATCH, "predict", str(folder / "a" / "photo.jpg"), str(folder / "b" / "photo.jpg"),
                                 "--model", str(tiny_bundle), "--output", str(tmp_path / "each")],
                                capture_output=True, text=True, timeout=300, env=env)
    assert one_by_one.returncode == 0, one_by_one.stderr[-2000:]
    assert sorted(p.relative_to(tmp_path / "each").as_posix() for p in (tmp_path / "each").rglob("*.jpg")) == [
        "a/photo_annotated.jpg", "b/photo_annotated.jpg"]

    (tmp_path / "empty").mkdir()
    empty = subprocess.run([MASKWATCH, "predict", str(tmp_path / "empty"), "--model", str(tiny_bundle)],
                           capture_output=True, text=True, timeout=300, env=env)
    assert empty.returncode == 2 and "no photos in this folder" in empty.stderr


# ORT keeps telemetry off by itself where one of these CI markers is set (CI=true in this project's CI run, where
# the checks below would otherwise pass whatever maskwatch did); the list is from the library's own strings.
ORT_TELEMETRY_SWITCHES = {"ORT_DISABLE_TELEMETRY", "CI", "GITHUB_ACTIONS", "GITLAB_CI", "TF_BUILD", "TRAVIS",
                          "CIRCLECI", "BUILDKITE", "JENKINS_URL", "TEAMCITY_VERSION", "CODEBUILD_BUILD_ID",
                          "SYSTEM_TEAMFOUNDATIONCOLLECTIONURI"}


def test_onnx_runtime_telemetry_stays_off_unless_the_user_turns_it_on(tiny_bundle, data_dir, yunet_path, tmp_path):
    """ONNX Runtime 1.32 on Linux starts usage telemetry when it loads: its offline store is a `.ses` file in
    TMPDIR, and DNS lookups of Microsoft's collector follow every few seconds. `maskwatch predict` (YuNet runs in
    onnxruntime) starts none; a user's own ORT_DISABLE_TELEMETRY=0 is obeyed (a load that
    ends before any upload, which also shows that the probe sees telemetry when it runs)."""
    def temp_files_after(command: list[str], name: str, **chosen) -> set[str]:
        tmpdir = tmp_path / name
        tmpdir.mkdir()
        env = {key: value for key, value in os.environ.items() if key not in ORT_TELEMETRY_SWITCHES}
        env.update(MASKWATCH_YUNET_PATH=str(yunet_path), TMPDIR=str(tmpdir), **chosen)
        out = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        return {path.name for path in tmpdir.iterdir()}

    photo = str(data_dir / "images" / "maksssksksss0.jpg")
    assert ".ses" not in temp_files_after([MASKWATCH, "predict", photo, "--model", str(tiny_bundle)], "predict")
    load_through_maskwatch = "from maskwatch.detect import onnxruntime_without_telemetry as o; o()"
    assert ".ses" not in temp_files_after([sys.executable, "-c", load_through_maskwatch], "default")
    assert ".ses" in temp_files_after([sys.executable, "-c", load_through_maskwatch], "user-on",
                                      ORT_DISABLE_TELEMETRY="0")
