"""Measure the data-side options of the recipe on frozen MobileNetV2 features (a phase-1 proxy).

With the base frozen, phase 1 trains only the head on fixed features, so each option can be compared over
several seeds in minutes: crop margin, resize interpolation, imbalance handling, and a class-prior
adjustment tuned on the validation split. No augmentation here (features are computed once per crop), so
absolute numbers sit below the full recipe's; the ratios between options are what this measures.

--low-resolution-copies N adds N degraded copies of each training crop (shrunk to 12-40 px, then enlarged
back as serving enlarges a small face) beside the plain training crops, at class weights 0.5: does showing the
head large faces as small ones help it on the small faces of the test split (accuracy under 16 px)?

    python benchmarks/head_ablation.py --seeds 3 --out benchmarks/results/head_ablation.json
    python benchmarks/head_ablation.py --seeds 3 --crops margin0.15_cubic --low-resolution-copies 2 \
        --out benchmarks/results/head_ablation_low_resolution.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The margin and interpolation variants use the configured input size (data.image_size, 160 px by default), so
# margin0.15_cubic is the 160 px row of the input-size comparison too.
CROP_VARIANTS = {
    "margin0.15_cubic": {"crop_margin": 0.15, "resize_interpolation": "cubic"},
    "margin0.0_cubic": {"crop_margin": 0.0, "resize_interpolation": "cubic"},
    "margin0.3_cubic": {"crop_margin": 0.3, "resize_interpolation": "cubic"},
    "margin0.15_area": {"crop_margin": 0.15, "resize_interpolation": "area"},
    "margin0.15_linear": {"crop_margin": 0.15, "resize_interpolation": "linear"},
    # Model input side: faces are mostly under 32 px, so a smaller input may lose nothing and costs half or less.
    "size128_margin0.15_cubic": {"crop_margin": 0.15, "resize_interpolation": "cubic", "image_size": 128},
    "size224_margin0.15_cubic": {"crop_margin": 0.15, "resize_interpolation": "cubic", "image_size": 224},
}
IMBALANCE_VARIANTS = {
    "none": ("none", 0.0),
    "class_weight_0.5": ("class_weight", 0.5),
    "class_weight_1.0": ("class_weight", 1.0),
    "oversample_0.5": ("oversample", 0.5),
}


def features_for(settings, base, frame, flip=False):
    import tensorflow as tf

    from maskwatch.data import make_dataset

    dataset = make_dataset(frame, 64, training=False, cache=False).map(lambda x, y: x)
    if flip:
        dataset = dataset.map(lambda x: tf.image.flip_left_right(x))

    def scale(x):
        return x / 127.5 - 1.0  # the model's own Rescaling layer

    pooled = [tf.reduce_mean(base(scale(batch), training=False), axis=[1, 2]).numpy() for batch in dataset]
    return np.concatenate(pooled)


def features_of_images(base, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    import tensorflow as tf

    pooled = [tf.reduce_mean(base(tf.constant(images[i:i + batch_size], tf.float32) / 127.5 - 1.0, training=False),
                             axis=[1, 2]).numpy() for i in range(0, len(images), batch_size)]
    return np.concatenate(pooled)


def low_resolution_copies(frame, copies: int, spec, seed: int, sides=(12, 40)) -> tuple[np.ndarray, np.ndarray]:
    """Training crops shrunk to a random side in `sides` and enlarged back with the crop spec's interpolation;
    only crops whose face was larger than that side (a small face is not shrunk further). Returns (images, rows)."""
    import cv2

    from maskwatch.preprocessing import INTERPOLATIONS

    rng = np.random.default_rng(seed)
    crop_sides = (np.minimum(frame.xmax - frame.xmin, frame.ymax - frame.ymin) * (1 + 2 * spec.margin)).to_numpy()
    crops = [cv2.cvtColor(cv2.imread(path), cv2.COLOR_BGR2RGB) for path in frame["crop_path"]]
    images, rows = [], []
    for _ in range(copies):
        for row, (crop, crop_side) in enumerate(zip(crops, crop_sides)):
            side = int(rng.integers(sides[0], sides[1] + 1))
            if crop_side > 1.2 * side:
                small = cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA)
                images.append(cv2.resize(small, (spec.size, spec.size),
                                         interpolation=INTERPOLATIONS[spec.interpolation]))
                rows.append(row)
    return np.stack(images), np.array(rows)


def train_head(train_x, train_y, val_x, val_y, weights, seed, epochs=20):
    import keras

    from maskwatch.model import compile_model

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((train_x.shape[1],))
    hidden = keras.layers.Dense(512, activation="relu")(inputs)
    hidden = keras.layers.BatchNormalization()(hidden)
    hidden = keras.layers.Dropout(0.5)(hidden)
    head = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(hidden))
    compile_model(head, 1e-3)
    stop = keras.callbacks.EarlyStopping(monitor="val_macro_f1", mode="max", patience=6, restore_best_weights=True)
    head.fit(train_x, keras.utils.to_categorical(train_y, 3), validation_data=(val_x, keras.utils.to_categorical(
        val_y, 3)), epochs=epochs, batch_size=32, class_weight=weights, callbacks=[stop], verbose=0)
    return head


def scores(y, probs, small=None):
    from sklearn.metrics import f1_score, recall_score

    pred = probs.argmax(1)
    recalls = recall_score(y, pred, labels=[0, 1, 2], average=None, zero_division=0)
    return {"macro_f1": float(f1_score(y, pred, average="macro")), "accuracy": float((pred == y).mean()),
            "recall_without": float(recalls[1]), "recall_incorrect": float(recalls[2]),
            **({"accuracy_under_16": float((pred == y)[small].mean())} if small is not None else {})}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--crops", nargs="*", default=list(CROP_VARIANTS), choices=list(CROP_VARIANTS))
    parser.add_argument("--low-resolution-copies", type=int, default=0,
                        help="also train with this many degraded copies of each training crop (class weights 0.5)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/head_ablation.json"))
    args = parser.parse_args(argv)

    import keras

    from maskwatch.bundle import apply_class_bias
    from maskwatch.config import load_settings
    from maskwatch.data import class_weights, oversample, prepare_data
    from maskwatch.evaluate import tune_class_bias
    from maskwatch.model import MaskDetectionModel

    _, base = MaskDetectionModel().build_model()
    index = {"with_mask": 0, "without_mask": 1, "mask_weared_incorrect": 2}
    rows = []
    for crop_name in args.crops:
        settings = load_settings(overrides={"data": CROP_VARIANTS[crop_name]})
        prepared, _ = prepare_data(settings)
        started = time.perf_counter()
        feats = {name: features_for(settings, base, frame) for name, frame in
                 (("train", prepared.train_df), ("val", prepared.val_df), ("test", prepared.test_df))}
        flipped_test = features_for(settings, base, prepared.test_df, flip=True)
        print(f"{crop_name}: features in {time.perf_counter() - started:.0f}s", file=sys.stderr, flush=True)
        labels = {name: frame["label"].map(index).to_numpy() for name, frame in
                  (("train", prepared.train_df), ("val", prepared.val_df), ("test", prepared.test_df))}
        test = prepared.test_df
        small_test = (np.minimum(test.xmax - test.xmin, test.ymax - test.ymin) < 16).to_numpy()
        if args.low_resolution_copies:
            images, rows_copied = low_resolution_copies(prepared.train_df, args.low_resolution_copies,
                                                        prepared.crop_spec, seed=0)
            degraded = (features_of_images(base, images), labels["train"][rows_copied])
            print(f"{crop_name}: {len(images)} low-resolution copies", file=sys.stderr, flush=True)
        variants = dict(IMBALANCE_VARIANTS)
        if args.low_resolution_copies:
            variants = {"class_weight_0.5": variants["class_weight_0.5"],
                        f"class_weight_0.5+low_res_x{args.low_resolution_copies}": ("class_weight", 0.5)}
        for imb_name, (mode, power) in variants.items():
            if crop_name != "margin0.15_cubic" and imb_name not in ("class_weight_0.5",):
                continue  # crop variants are compared at the default imbalance setting
            for seed in range(args.seeds):
                train_x, train_y, weights = feats["train"], labels["train"], None
                if mode == "class_weight":
                    weights = class_weights(prepared.train_df, power)
                elif mode == "oversample":
                    frame = prepared.train_df.assign(_row=np.arange(len(prepared.train_df)))
                    grown = oversample(frame, power, seed)
                    train_x, train_y = feats["train"][grown["_row"].to_numpy()], grown["label"].map(index).to_numpy()
                if "low_res" in imb_name:
                    train_x, train_y = np.concatenate([train_x, degraded[0]]), np.concatenate([train_y, degraded[1]])
                head = train_head(train_x, train_y, feats["val"], labels["val"], weights, seed)
                test_probs = head.predict(feats["test"], verbose=0)
                val_probs = head.predict(feats["val"], verbose=0)
                tta_probs = (test_probs + head.predict(flipped_test, verbose=0)) / 2
                adjusted = apply_class_bias(test_probs, tune_class_bias(val_probs, labels["val"]))
                for variant, probs in (("argmax", test_probs), ("flip_tta", tta_probs), ("val_prior_bias", adjusted)):
                    rows.append({"crop": crop_name, "imbalance": imb_name, "decision": variant, "seed": seed,
                                 **scores(labels["test"], probs, small_test)})
                keras.backend.clear_session()
    _report(rows, args.out)


def _report(rows, out: Path):
    import pandas as pd

    frame = pd.DataFrame(rows)
    table = frame.groupby(["crop", "imbalance", "decision"])[
        [c for c in ("macro_f1", "accuracy", "recall_without", "recall_incorrect", "accuracy_under_16")
         if c in frame]].agg(["mean", "std"]).round(3)
    print(table.to_string())
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "summary": json.loads(table.to_json(orient="index"))}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
