"""Refit the trained detector's class head on CPU, with the rest of the network frozen: does it lift detection mAP?

The plan for the incorrect-mask class was to train the detector's class heat maps longer with class weights
(1, 2, 4), which needs a GPU end to end. This script tries the part that fits on 2 CPU cores: the backbone and
feature pyramid stay as trained, their stride-4 features are computed once around every annotated face centre
(`--copies` augmented views of each training photo, the detector's own augmentation), and only a new class
branch (3x3 conv, 1x1 conv, softmax; started from the trained one) is fitted there, with class-weighted cross
entropy. The face, size and offset heads are untouched, so the same faces are found with the same boxes.

It prints two tables and writes one JSON:
- class AP at the annotated face centres (the detector's class opinion alone, one class against the rest);
- detection mAP@0.5 with the classifier, as `maskwatch evaluate --detection` scores it, for the trained
  detector and for the refitted one at several class_fusion weights. Judge on val, then look at test.

    python benchmarks/detector_class_head.py --detector artifacts/runs/<run>/face_detector/face_detector.onnx
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from common import REPO, add_detection_arguments, detection_row, detection_setup, print_table, write_json

PATCH_RADIUS = 2  # 5x5 feature cells around each centre: the 3x3 conv's window, shifted by up to one cell


def centre_patches(features: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """5x5 feature patches (zero-padded at the border, as the conv pads) at each box's centre cell."""
    from maskwatch.centernet import STRIDE

    height, width = features.shape[:2]
    padded = np.pad(features, ((PATCH_RADIUS + 1,) * 2, (PATCH_RADIUS + 1,) * 2, (0, 0)))
    patches = []
    for x0, y0, x1, y1 in boxes / STRIDE:  # the same centre cell as train_detector.encode_targets
        col = min(max(int((x0 + x1) / 2), 0), width - 1)
        row = min(max(int((y0 + y1) / 2), 0), height - 1)
        side = 2 * PATCH_RADIUS + 1
        # a copy, not a view: a view would keep the whole feature map alive
        patches.append(padded[row + 1:row + 1 + side, col + 1:col + 1 + side].astype(np.float16))
    return np.stack(patches) if patches else np.zeros((0, 5, 5, features.shape[-1]), np.float16)


def face_features(feature_model, photos, config, copies: int, seed: int, desc: str):
    """(patches, labels) of every face: `copies` augmented views of each photo, or its inference letterbox (0)."""
    from tqdm.auto import tqdm

    from maskwatch.train_detector import VAL_MAP_BATCH, augment, letterboxed_sample

    rng = np.random.default_rng(seed)
    views = [(i, copy) for copy in range(max(copies, 1)) for i in range(len(photos))]
    patches, labels = [], []
    for start in tqdm(range(0, len(views), VAL_MAP_BATCH), desc=desc, unit="batch"):
        images, targets = [], []
        for i, _ in views[start:start + VAL_MAP_BATCH]:
            if copies:
                image, boxes, classes = augment(photos.images[i], photos.boxes[i], photos.labels[i], config, rng)
            else:
                image, boxes = letterboxed_sample(photos.images[i], photos.boxes[i], config.input_side)
                classes = photos.labels[i]
            images.append(image)
            targets.append((boxes, classes))
        features = np.asarray(feature_model.predict_on_batch(np.stack(images).astype(np.float32)))
        for feature_map, (boxes, classes) in zip(features, targets):
            patches.append(centre_patches(feature_map, boxes))
            labels.append(np.asarray(classes, np.int64))
    return np.concatenate(patches), np.concatenate(labels)


def current_class_probabilities(detector, patches: np.ndarray) -> np.ndarray:
    """The trained detector's class opinion at the centre cells, as centernet.decode normalises it."""
    from maskwatch.centernet import class_probabilities

    conv_kernel, conv_bias = detector.get_layer("heat_conv").get_weights()
    heat_kernel, heat_bias = detector.get_layer("heat").get_weights()
    centre = patches[:, 1:4, 1:4].astype(np.float32)
    hidden = np.maximum(np.einsum("nijc,ijcd->nd", centre, conv_kernel) + conv_bias, 0.0)
    return class_probabilities(1.0 / (1.0 + np.exp(-(hidden @ heat_kernel[0, 0] + heat_bias)[:, 1:])))


def fit_class_head(detector, patches, labels, class_weights, epochs: int, learning_rate: float, dropout: float,
                   seed: int):
    """A 3x3 conv + softmax on 3x3 centre patches, started from the detector's class branch; returns the Keras model."""
    import keras
    from keras import layers
    from tqdm.auto import tqdm

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((3, 3, patches.shape[-1]))
    hidden = layers.Flatten()(layers.Conv2D(64, 3, activation="relu", name="class_conv")(inputs))
    outputs = layers.Dense(3, activation="softmax", name="class_probs")(layers.Dropout(dropout)(hidden))
    head = keras.Model(inputs, outputs)
    head.get_layer("class_conv").set_weights(detector.get_layer("heat_conv").get_weights())
    heat_kernel, heat_bias = detector.get_layer("heat").get_weights()
    head.get_layer("class_probs").set_weights([heat_kernel[0, 0][:, 1:], heat_bias[1:]])
    head.compile(optimizer=keras.optimizers.AdamW(learning_rate, weight_decay=1e-4),
                 loss="sparse_categorical_crossentropy")
    rng, weights = np.random.default_rng(seed), np.asarray(class_weights, np.float32)
    for _ in tqdm(range(epochs), desc="class head", unit="epoch"):
        order = rng.permutation(len(patches))
        for start in range(0, len(order), 256):
            batch = order[start:start + 256]
            # The peak the decoder reads may sit one cell off the centre: train on such shifts too (30%).
            shift = np.where(rng.random((len(batch), 2)) < 0.3, rng.integers(-1, 2, (len(batch), 2)), 0)
            windows = np.stack([patches[j, 1 + dy:4 + dy, 1 + dx:4 + dx] for j, (dy, dx) in zip(batch, shift)])
            head.train_on_batch(windows.astype(np.float32), labels[batch], sample_weight=weights[labels[batch]])
    return head


def with_class_head(detector, head):
    """The full detector with its class channels from `head` (softmax) and everything else unchanged."""
    import keras
    from keras import layers

    hidden = detector.get_layer("heat_conv").output
    face = layers.Conv2D(1, 1, activation="sigmoid", name="face_heat")(hidden)
    class_hidden = layers.Conv2D(64, 3, padding="same", activation="relu", name="class_conv")(
        detector.get_layer("smooth_4_relu").output)
    classes = layers.Conv2D(3, 1, activation="softmax", name="class_probs")(class_hidden)
    heads = layers.Concatenate(name="heads")([face, classes, detector.get_layer("size").output,
                                              detector.get_layer("offset").output])
    model = keras.Model(detector.input, heads, name="maskwatch_face_detector")
    heat_kernel, heat_bias = detector.get_layer("heat").get_weights()
    model.get_layer("face_heat").set_weights([heat_kernel[..., :1], heat_bias[:1]])
    model.get_layer("class_conv").set_weights(head.get_layer("class_conv").get_weights())
    kernel, bias = head.get_layer("class_probs").get_weights()
    model.get_layer("class_probs").set_weights([kernel[None, None], bias])
    return model


def class_ap_row(name: str, split: str, probabilities: np.ndarray, labels: np.ndarray, class_names) -> dict:
    from sklearn.metrics import average_precision_score

    aps = {f"ap_{c}": float(average_precision_score(labels == k, probabilities[:, k]))
           for k, c in enumerate(class_names)}
    return {"split": split, "class head": name, "mean_ap": float(np.mean(list(aps.values()))), **aps,
            "accuracy": float((probabilities.argmax(1) == labels).mean())}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_detection_arguments(parser)
    parser.add_argument("--copies", type=int, default=6, help="augmented views of each training photo")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--class-weights", nargs=3, type=float, default=[1.0, 2.0, 4.0])
    parser.add_argument("--fusions", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--splits", nargs="+", default=["val", "test"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "detector_class_head.json")
    args = parser.parse_args(argv)
    keras_file = Path(args.detector).with_suffix(".keras") if args.detector else None
    if not keras_file or not keras_file.is_file():
        parser.error("--detector: needs face_detector.onnx with its face_detector.keras beside it "
                     "(maskwatch train-detector writes both)")

    import keras

    from maskwatch.detect import MaskDetector, create_face_detector, for_evaluation, ranking_face_score_power
    from maskwatch.evaluate import evaluate_detection
    from maskwatch.train_detector import export_onnx, photos_from_faces

    settings, prepared, predictor = detection_setup(args.model, args.runtime)
    class_names = list(predictor.class_names)
    detector = keras.models.load_model(keras_file, compile=False)
    feature_model = keras.Model(detector.input, detector.get_layer("smooth_4_relu").output)
    config = settings.detector_train
    frames = {"val": prepared.val_df, "test": prepared.test_df}
    train_patches, train_labels = face_features(feature_model, photos_from_faces(prepared.train_df), config,
                                                args.copies, args.seed, "training features")
    print(f"{len(train_labels)} training faces x views: {np.bincount(train_labels, minlength=3).tolist()}")
    head = fit_class_head(detector, train_patches, train_labels, args.class_weights, args.epochs,
                          args.learning_rate, args.dropout, args.seed)

    centre_rows = []
    for split in args.splits:
        patches, labels = face_features(feature_model, photos_from_faces(frames[split]), config, 0, 0,
                                        f"{split} features")
        centre_rows.append(class_ap_row("trained", split, current_class_probabilities(detector, patches), labels,
                                        class_names))
        refit = head.predict(patches[:, 1:4, 1:4].astype(np.float32), verbose=0)
        centre_rows.append(class_ap_row("refitted", split, refit, labels, class_names))
    print_table(centre_rows, list(centre_rows[0]))

    detection_rows = []
    with tempfile.TemporaryDirectory() as scratch:
        refit_keras = Path(scratch) / "face_detector.keras"
        with_class_head(detector, head).save(refit_keras)
        refit_onnx = export_onnx(refit_keras, Path(scratch) / "face_detector.onnx")
        base = for_evaluation(settings.detector.model_copy(update={"backend": "centernet"}))
        for split in args.splits:
            for name, onnx in (("trained", Path(args.detector)), ("refitted", refit_onnx)):
                for fusion in args.fusions:
                    detector_config = base.model_copy(update={"trained_model_path": onnx, "class_fusion": fusion})
                    metrics = evaluate_detection(MaskDetector(predictor, create_face_detector(detector_config), fusion),
                                                 frames[split], progress=False,
                                                 face_score_power=ranking_face_score_power(detector_config))
                    detection_rows.append({"split": split, "class head": name, "fusion": fusion,
                                           **detection_row(metrics)})
                    print(f"{split} {name} fusion {fusion}: mAP {metrics['map50']:.3f}", flush=True)
    print_table(detection_rows, ["split", "class head", "fusion", "map50",
                                 *(f"ap_{c}" for c in class_names), "map50_true_classes"])
    write_json(args.out, {"detector": str(args.detector), "model": args.model, "runtime": args.runtime,
                          "recipe": {k: v for k, v in vars(args).items() if k not in ("detector", "model", "out")},
                          "class_ap_at_face_centres": centre_rows, "detection": detection_rows})


if __name__ == "__main__":
    main()
