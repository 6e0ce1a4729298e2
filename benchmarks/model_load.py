"""How long loading a registry model takes, and what it leaves on disk: a fresh copy per load (what maskwatch did
before the model cache) against the cache when empty and when filled.

    python benchmarks/model_load.py --model models:/maskwatch@champion --repeats 5

Each repeat runs the three in turn, so the machine's noise falls on all of them alike. Prints a table and writes
benchmarks/results/model_load.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from common import REPO, default_model, print_table, write_json


def folder_mb(path: Path) -> float:
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) / 1e6


def fresh_copy(uri: str) -> tuple[float, float]:
    """The old way: download into a new temp folder (then removed here, which the old code never did)."""
    import mlflow

    folder = Path(tempfile.mkdtemp(prefix="maskwatch-model-"))
    try:
        started = time.perf_counter()
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(folder))
        return time.perf_counter() - started, folder_mb(folder)
    finally:
        shutil.rmtree(folder)


def cached(uri: str, settings, cache: Path) -> tuple[float, float]:
    from maskwatch.tracking import resolve_model_uri

    before = folder_mb(cache) if cache.exists() else 0.0
    started = time.perf_counter()
    resolve_model_uri(uri, settings)
    return time.perf_counter() - started, folder_mb(cache) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model(), help="a models:/ or runs:/ URI")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "model_load.json")
    args = parser.parse_args()
    if not args.model.startswith(("models:/", "runs:/")):
        parser.error("--model must be a registry or run URI (a local bundle is never downloaded)")

    from maskwatch.config import load_settings
    from maskwatch.tracking import configure

    settings = load_settings(None, "full", {})
    configure(settings)
    samples: dict[str, list[tuple[float, float]]] = {"fresh copy per load (before)": [], "cache, empty": [],
                                                      "cache, filled": []}
    with tempfile.TemporaryDirectory(prefix="maskwatch-cache-bench-") as scratch:
        for repeat in range(args.repeats):
            cache = Path(scratch) / f"cache{repeat}"
            os.environ["MASKWATCH_CACHE_DIR"] = str(cache)
            samples["fresh copy per load (before)"].append(fresh_copy(args.model))
            samples["cache, empty"].append(cached(args.model, settings, cache / "models"))
            samples["cache, filled"].append(cached(args.model, settings, cache / "models"))
            shutil.rmtree(cache)
    baseline = statistics.median(seconds for seconds, _ in samples["fresh copy per load (before)"])
    rows = [{"load": name, "median_s": statistics.median(s for s, _ in runs), "min_s": min(s for s, _ in runs),
             "MB_written": statistics.median(mb for _, mb in runs),
             "vs_before": statistics.median(s for s, _ in runs) / baseline} for name, runs in samples.items()]
    print(f"{args.model}, {args.repeats} repeats, tracking {settings.tracking_uri}")
    print_table(rows, ["load", "median_s", "min_s", "MB_written", "vs_before"], digits=3)
    write_json(args.out, {"model": args.model, "tracking_uri": settings.tracking_uri, "repeats": args.repeats,
                          "rows": rows, "samples": samples})


if __name__ == "__main__":
    main()
