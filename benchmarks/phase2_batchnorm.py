"""Phase 2 with the unfrozen block's BatchNormalization frozen (default) or training, from the same weights.

Starts from a trained model (default: the champion), runs a few phase-2 epochs (last 30 base layers
unfrozen, Adam 1e-5, class weights as configured) in each mode, and reports validation and test metrics and
how far the base's moving statistics moved.

    python benchmarks/phase2_batchnorm.py --epochs 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from common import REPO, default_model, print_table, write_json


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model())
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "phase2_batchnorm.json")
    args = parser.parse_args(argv)

    import keras

    from maskwatch.bundle import bundle_paths
    from maskwatch.config import load_settings
    from maskwatch.data import prepare_data
    from maskwatch.evaluate import evaluate_model
    from maskwatch.model import compile_model, unfreeze_top_layers
    from maskwatch.tracking import resolve_model_uri
    from maskwatch.train import build_datasets, set_seeds

    settings = load_settings()
    prepared, _ = prepare_data(settings)
    model_file, _ = bundle_paths(resolve_model_uri(args.model, settings))
    train_data, val_data, weights = build_datasets(prepared.train_df, prepared.val_df, settings)
    rows = []
    for mode in ("frozen", "train"):
        set_seeds(settings.train.seed)
        model = keras.models.load_model(model_file, compile=False)
        base = next(layer for layer in model.layers if layer.name.startswith("mobilenetv2"))
        stats_before = [w.numpy().copy() for w in base.weights if "moving" in w.path]
        unfreeze_top_layers(base, settings.train.fine_tune_last_layers, mode)
        compile_model(model, settings.train.phase2_learning_rate)
        history = model.fit(train_data, validation_data=val_data, epochs=args.epochs, class_weight=weights,
                            verbose=0, shuffle=False)
        stats_after = [w.numpy() for w in base.weights if "moving" in w.path]
        moved = float(np.mean([np.abs(a - b).mean() for a, b in zip(stats_after, stats_before)]))
        result, _ = evaluate_model(model, prepared.test_df, bootstrap_samples=500)
        rows.append({"batchnorm": mode, "epochs": args.epochs,
                     "val_macro_f1": float(history.history["val_macro_f1"][-1]),
                     "val_loss": float(history.history["val_loss"][-1]),
                     "test_macro_f1": result.macro_f1, "test_accuracy": result.accuracy,
                     "test_incorrect_recall": result.per_class["mask_weared_incorrect"]["recall"],
                     "moving_stat_change": moved})
        keras.backend.clear_session()
    print_table(rows, list(rows[0]))
    write_json(args.out, {"model": args.model, "rows": rows})


if __name__ == "__main__":
    main()
