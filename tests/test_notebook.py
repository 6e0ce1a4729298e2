"""The guide notebook runs end to end from a clean kernel (papermill, tiny settings, real data)."""

import json
from pathlib import Path

import papermill

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "Complete_MLOps_Setup_Guide.ipynb"


def test_committed_notebook_is_light():
    notebook = json.loads(NOTEBOOK.read_text())
    assert NOTEBOOK.stat().st_size < 200_000
    assert all(not cell.get("outputs") for cell in notebook["cells"] if cell["cell_type"] == "code")
    assert "parameters" in notebook["cells"][1]["metadata"]["tags"]


def test_notebook_executes(tmp_path, data_dir, yunet_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # its mlflow.db and artifacts stay in the temporary folder
    output = tmp_path / "guide.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOK), str(output), kernel_name="python3", cwd=str(tmp_path), progress_bar=False,
        parameters={"MAX_PHOTOS": 24, "PHASE1_EPOCHS": 1, "PHASE2_EPOCHS": 1, "WORK_DIR": str(tmp_path / "work"),
                    "DATA_DIR": str(data_dir), "YUNET_PATH": str(yunet_path),
                    "TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "DETECTOR_EPOCHS": 1,
                    "DETECTOR_TIME_BUDGET_S": None, "DETECTOR_INPUT_SIDE": 192})
    executed = json.loads(output.read_text())
    text = json.dumps(executed)
    assert "promotion" in text and "FPS" in text and "phase 2 trainable parameters" in text
    assert "calibration:" in text and "ECE" in text and "tracked faces" in text
    assert "face detector job finished" in text and "with the classifier" in text
    images = sum(1 for cell in executed["cells"] for out in cell.get("outputs", [])
                 if "image/png" in out.get("data", {}) or "image/jpeg" in out.get("data", {}))
    assert images >= 8  # the reliability diagram and the detector's training curves too
