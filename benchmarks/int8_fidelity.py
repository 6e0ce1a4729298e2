"""How far does an int8 export drift from Keras, and how far does a badly calibrated one? The bars of
tests/realtime/test_video.py::test_exports_agree_with_keras come from this.

For each seed it trains the test suite's bundle (24 photos, 2 epochs of phase 1: the model CI trains, which
differs from run to run on CPU) and exports int8 three ways: calibrated on the training crops (what
`maskwatch export` does), on those crops darkened to 20% (a preprocessing mistake), and on uniform noise.
Each export is compared with Keras on the val and test crops (neither trains the model nor calibrates int8;
the test judges on the same ones): mean |Δp| over all probabilities, agreement on every crop, and agreement on
the crops where Keras' top class leads by 0.5 or more.

    python benchmarks/int8_fidelity.py --seeds 42 1 2 3 4 5 6 7
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from common import REPO, print_table, write_json

CLEAR_MARGIN = 0.5


def corrupted_calibration(train_df, folder: Path, kind: str):
    """A copy of train_df whose crops are darkened or replaced by noise: what a calibration mistake looks like."""
    import cv2

    from maskwatch.preprocessing import read_image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, path in enumerate(train_df["crop_path"]):
        crop = read_image(path)
        changed = (crop * 0.2) if kind == "dark" else rng.uniform(0, 255, crop.shape)
        target = folder / f"{index}.png"
        cv2.imwrite(str(target), cv2.cvtColor(changed.astype(np.uint8), cv2.COLOR_RGB2BGR))
        paths.append(str(target))
    return train_df.assign(crop_path=paths)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2, 3, 4, 5, 6, 7])
    parser.add_argument("--photos", type=int, default=24, help="Photos in the data subset (the tests use 24).")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "int8_fidelity.json")
    args = parser.parse_args(argv)

    from maskwatch.bundle import ModelMetadata, save_bundle
    from maskwatch.config import load_settings
    from maskwatch.data import prepare_data
    from maskwatch.detect import Predictor
    from maskwatch.export import export_model
    from maskwatch.preprocessing import read_image
    from maskwatch.train import train_model

    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        settings = load_settings(None, "full", {"paths": {"work_dir": str(work / "data")},
                                                "data": {"max_photos": args.photos}})
        prepared, _ = prepare_data(settings)
        held_out = pd.concat([prepared.val_df, prepared.test_df])  # as the test: enough clear crops per seed
        crops = np.stack([read_image(path) for path in held_out["crop_path"]])
        calibrations = {"training crops": prepared.train_df,
                        **{kind: corrupted_calibration(prepared.train_df, work / kind, kind)
                           for kind in ("dark", "noise")}}
        for seed in args.seeds:
            seed_dir = work / f"seed{seed}"
            train_settings = load_settings(None, "full", {"paths": {"work_dir": str(seed_dir)}, "train": {
                "phase1_epochs": 2, "phase2_epochs": 0, "batch_size": 16, "early_stopping_patience": None,
                "reduce_lr_patience": None, "seed": seed}})
            _, model = train_model(prepared.train_df, prepared.val_df, settings=train_settings,
                                   model_path=seed_dir / "ckpt" / "best.keras")
            metadata = ModelMetadata(crop=prepared.crop_spec.to_dict(), data_hash=prepared.data_hash,
                                     model_version=f"seed{seed}")
            trained = save_bundle(model, seed_dir / "bundle", metadata)
            reference = Predictor.from_path(trained, "keras").predict_inputs(crops)
            top_two = np.sort(reference, axis=1)[:, -2:]
            clear = top_two[:, 1] - top_two[:, 0] >= CLEAR_MARGIN
            for name, calibration_df in calibrations.items():
                bundle = Path(shutil.copytree(trained, seed_dir / name.replace(" ", "_")))
                export_model(bundle, ["litert_int8"], calibration_df)
                quantized = Predictor.from_path(bundle, "litert_int8").predict_inputs(crops)
                agrees = quantized.argmax(1) == reference.argmax(1)
                rows.append({"seed": seed, "calibration": name,
                             "mean_abs_diff": float(np.abs(quantized - reference).mean()),
                             "agreement": float(agrees.mean()), "clear_crops": int(clear.sum()),
                             "clear_agreement": float(agrees[clear].mean()) if clear.any() else None})
                print(f"seed {seed}, {name}: mean |dp| {rows[-1]['mean_abs_diff']:.3f}", flush=True)

    print(f"\n{len(crops)} val and test crops; clear = Keras' top class leads by {CLEAR_MARGIN} or more")
    print_table(rows, list(rows[0]))
    for name in calibrations:
        picked = [r for r in rows if r["calibration"] == name]
        print(f"{name}: mean |dp| {min(r['mean_abs_diff'] for r in picked):.3f}-"
              f"{max(r['mean_abs_diff'] for r in picked):.3f}, clear agreement "
              f"{min(r['clear_agreement'] for r in picked):.2f}-{max(r['clear_agreement'] for r in picked):.2f}")
    write_json(args.out, {"val_and_test_crops": len(crops), "clear_margin": CLEAR_MARGIN, "rows": rows})


if __name__ == "__main__":
    main()
