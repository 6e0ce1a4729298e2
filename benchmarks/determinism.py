"""What `train.deterministic` (TensorFlow's deterministic ops) costs and buys: the same `maskwatch train` job run
twice with it off and twice with it on, interleaved (off, on, off, on) so the machine's noise falls on both.

    python benchmarks/determinism.py --photos 60 --phase1-epochs 3 --phase2-epochs 1

For each mode: seconds per epoch of each phase (medians over the runs, from history.csv), the job's wall time,
each run's test macro-F1, and how far the two runs' per-epoch training losses lie apart (0 = the same model).
Each job runs in its own folder and SQLite store. Prints a table and writes benchmarks/results/determinism.json.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import DATA_DIR, REPO, print_table, write_json

MASKWATCH = str(Path(sys.executable).parent / "maskwatch")


def run_job(folder: Path, deterministic: bool, args) -> dict:
    """One `maskwatch train` in `folder`; -> its wall time, history and test metrics."""
    import json

    import pandas as pd

    folder.mkdir(parents=True)
    env = {**os.environ, "MASKWATCH_DATA_DIR": str(DATA_DIR), "MASKWATCH_WORK_DIR": str(folder / "artifacts"),
           "MASKWATCH_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"}
    command = [MASKWATCH, "train", "--set", f"data.max_photos={args.photos}",
               "--set", f"train.phase1_epochs={args.phase1_epochs}",
               "--set", f"train.phase2_epochs={args.phase2_epochs}",
               "--set", "train.early_stopping_patience=null", "--set", "train.export_formats=[]",
               "--set", f"train.deterministic={str(deterministic).lower()}"]
    started = time.perf_counter()
    subprocess.run(command, env=env, cwd=folder, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wall = time.perf_counter() - started
    (run_dir,) = (folder / "artifacts" / "runs").iterdir()
    history = pd.read_csv(run_dir / "history.csv")
    evaluation = json.loads((run_dir / "evaluation.json").read_text())
    return {"wall_s": wall, "history": history, "macro_f1": evaluation["macro_f1"]}


def summary(mode: str, runs: list[dict]) -> dict:
    seconds = {phase: statistics.median(float(s) for run in runs
                                        for s in run["history"].loc[run["history"]["phase"] == phase, "epoch_seconds"])
               for phase in ("phase1", "phase2")}
    losses = [run["history"]["loss"].to_numpy() for run in runs]
    return {"mode": mode, "phase1_s_per_epoch": seconds["phase1"], "phase2_s_per_epoch": seconds["phase2"],
            "job_wall_s": statistics.median(run["wall_s"] for run in runs),
            "test_macro_f1": " / ".join(f"{run['macro_f1']:.4f}" for run in runs),
            "max_loss_gap": float(abs(losses[0] - losses[1]).max()),
            "first_epoch_losses": " / ".join(f"{loss[0]:.4f}" for loss in losses)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=60, help="data.max_photos of each job")
    parser.add_argument("--phase1-epochs", type=int, default=3)
    parser.add_argument("--phase2-epochs", type=int, default=1)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "determinism.json")
    args = parser.parse_args(argv)

    results: dict[bool, list[dict]] = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="maskwatch-determinism-") as folder:
        for repeat in range(2):
            for deterministic in (False, True):
                print(f"run {repeat + 1}, deterministic={deterministic} ...", file=sys.stderr, flush=True)
                results[deterministic].append(run_job(Path(folder) / f"{deterministic}-{repeat}", deterministic, args))
    rows = [summary("off (default)", results[False]), summary("on", results[True])]
    print_table(rows, ["mode", "phase1_s_per_epoch", "phase2_s_per_epoch", "job_wall_s", "test_macro_f1",
                       "max_loss_gap", "first_epoch_losses"], digits=4)
    ratios = {key: rows[1][key] / rows[0][key] for key in ("phase1_s_per_epoch", "phase2_s_per_epoch", "job_wall_s")}
    print("on / off: " + ", ".join(f"{key} {value:.2f}" for key, value in ratios.items()))
    write_json(args.out, {"settings": vars(args) | {"out": str(args.out)}, "rows": rows, "ratios_on_over_off": ratios})


if __name__ == "__main__":
    main()
