"""How long saving the model for MLflow takes with the requirements MLflow infers (it loads the model again in a
subprocess to see what it imports; what maskwatch did before) against the pinned list maskwatch now writes
(`tracking.model_requirements`), and whether the two lists agree.

    python benchmarks/model_logging.py --repeats 3

The model is maskwatch's classifier as training builds it (ImageNet weights, the head untrained), or a bundle's
`model.keras` with --model. Each repeat saves both ways in turn, so the machine's noise falls on both alike.
Prints a table and writes benchmarks/results/model_logging.json.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path

from common import REPO, print_table, write_json


def child_peak_mb() -> float:
    """The largest resident set of any child process so far (the inference's subprocess), in MB."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def save_seconds(model, signature, example, **requirements) -> tuple[float, list[str]]:
    import mlflow

    with tempfile.TemporaryDirectory(prefix="maskwatch-logging-bench-") as folder:
        local = Path(folder) / "model"
        local.mkdir()  # MLflow 3.17 writes the input example before making the folder (see log_keras_model)
        started = time.perf_counter()
        mlflow.keras.save_model(model, str(local), signature=signature, input_example=example, **requirements)
        seconds = time.perf_counter() - started
        return seconds, sorted((local / "requirements.txt").read_text().split())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None, help="a bundle folder holding model.keras")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "model_logging.json")
    args = parser.parse_args(argv)

    import keras
    import numpy as np
    from mlflow.models import infer_signature

    from maskwatch.model import MaskDetectionModel
    from maskwatch.tracking import model_requirements

    if args.model:
        model = keras.models.load_model(args.model / "model.keras")
    else:
        model, _ = MaskDetectionModel().build_model()
    side = model.input_shape[1]
    example = np.zeros((1, side, side, 3), np.float32)
    signature = infer_signature(example, keras.ops.convert_to_numpy(model(example, training=False)))
    samples: dict[str, list[float]] = {"inferred (before)": [], "pinned": []}
    lists: dict[str, list[str]] = {}
    peak_before = child_peak_mb()
    for _ in range(args.repeats):
        seconds, lists["inferred (before)"] = save_seconds(model, signature, example)
        samples["inferred (before)"].append(seconds)
        seconds, lists["pinned"] = save_seconds(model, signature, example, pip_requirements=model_requirements())
        samples["pinned"].append(seconds)
    baseline = statistics.median(samples["inferred (before)"])
    rows = [{"requirements": name, "median_s": statistics.median(runs), "min_s": min(runs),
             "vs_before": statistics.median(runs) / baseline, "requirements.txt": " ".join(lists[name])}
            for name, runs in samples.items()]
    print(f"{args.model or 'the classifier as built for training'}, {args.repeats} repeats")
    print_table(rows, ["requirements", "median_s", "min_s", "vs_before", "requirements.txt"], digits=3)
    same = lists["inferred (before)"] == lists["pinned"]
    print(f"same requirements: {same}; the inference's subprocess peaked at {child_peak_mb():.0f} MB "
          f"(children before: {peak_before:.0f} MB)")
    write_json(args.out, {"model": str(args.model or "built"), "repeats": args.repeats, "rows": rows,
                          "samples": samples, "same_requirements": same, "inference_child_peak_mb": child_peak_mb()})


if __name__ == "__main__":
    main()
