import json
import os
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
