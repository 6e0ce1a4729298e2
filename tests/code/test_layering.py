"""Inference code never imports training code, and importing maskwatch does no work."""

import json
import subprocess
import sys

TRAINING_MODULES = {"maskwatch.train", "maskwatch.train_detector", "maskwatch.pipeline", "maskwatch.model",
                    "maskwatch.data", "maskwatch.evaluate", "keras", "tensorflow", "mlflow"}


def imported_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_serving_and_realtime_import_no_training_code():
    modules = imported_after("import maskwatch.serve, maskwatch.realtime, maskwatch.detect")
    assert not modules & TRAINING_MODULES, modules & TRAINING_MODULES


def test_importing_the_package_and_cli_is_cheap():
    modules = imported_after("import maskwatch, maskwatch.cli, maskwatch.config")
    assert not modules & {"keras", "tensorflow", "mlflow", "cv2"}
