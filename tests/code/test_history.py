"""The combined history of both phases: one row per epoch, its phase named, history.csv's columns in one order."""

import math
import os
import subprocess
import sys

from maskwatch.train import TrainingHistory

PHASE1 = {"loss": [1.2, 0.9], "accuracy": [0.5, 0.6], "macro_f1": [0.3, 0.4], "val_loss": [1.0, 0.8],
          "val_accuracy": [0.55, 0.65], "val_macro_f1": [0.35, 0.45], "learning_rate": [1e-3, 1e-3]}


def test_two_phases_make_one_history_with_the_boundary_marked():
    history = TrainingHistory()
    history.extend("phase1", PHASE1, [3.0, 2.5])
    history.extend("phase2", {"loss": [0.7], "val_loss": [0.6], "lr_drop": [1.0]}, [9.0])
    frame = history.to_frame()
    assert list(frame["epoch"]) == [1, 2, 3] and list(frame["phase"]) == ["phase1", "phase1", "phase2"]
    assert history.phase_boundaries == [2]
    assert list(frame["loss"]) == [1.2, 0.9, 0.7]
    assert math.isnan(frame["accuracy"][2]) and math.isnan(frame["lr_drop"][0])  # logged in one phase only
    assert history.seconds_per_epoch() == {"phase1": 2.75, "phase2": 9.0}


COLUMNS = ("from maskwatch.train import TrainingHistory; h = TrainingHistory(); "
           f"h.extend('phase1', {PHASE1!r}, [1.0, 1.0]); h.extend('phase2', {{'loss': [0.5], 'extra': [1.0]}}, [1.0]); "
           "print(','.join(h.to_frame().columns))")


def test_history_columns_come_in_keras_order_in_every_process():
    """They came from a set, whose order of strings changes with each process's hash seed: two runs' history.csv
    files had their columns in different orders."""
    orders = {subprocess.run([sys.executable, "-c", COLUMNS], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": str(seed)}).stdout.strip() for seed in range(4)}
    assert orders == {",".join(["epoch", "phase", *PHASE1, "epoch_seconds", "extra"])}
