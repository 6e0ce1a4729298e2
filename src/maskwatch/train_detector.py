"""Train the face-mask detector on this data set's photos: network, targets, augmentation, loss and fit.

YuNet was trained on WIDER FACE: it misses half of this data set's faces under 16 px and masked faces, and its
boxes follow another annotation style. This detector learns the data set's own boxes from its training photos
(never the val/test photos of the classifier's split). Keras 3 with backend-neutral ops, so the same code trains
on TensorFlow here and on JAX where a GPU is at hand; serving runs its ONNX export (maskwatch.centernet).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from maskwatch.centernet import (
    CLASS_CHANNELS,
    FACE_CHANNEL,
    NUM_CLASSES,
    OFFSET_CHANNELS,
    OUTPUT_CHANNELS,
    PAD_VALUE,
    SIZE_CHANNELS,
    STRIDE,
    letterbox,
)
from maskwatch.config import CLASS_NAMES, DetectorConfig, DetectorTrainConfig
from maskwatch.preprocessing import read_image

BACKBONE_FEATURES = ("block_2_add", "block_5_add", "block_12_add", "out_relu")  # strides 4, 8, 16, 32
MASK_CHANNEL = OUTPUT_CHANNELS  # targets carry one more channel: 1 at each face's centre cell
HEAT_PRIOR_BIAS = -2.19  # sigmoid(-2.19) = 0.1: the heat maps start near "no face" (CenterNet, RetinaNet)
GAUSSIAN_ALPHA = 0.54  # the target peak covers about half the face (TTFNet)
# Photos per forward pass when measuring val mAP: at 640 px, eager TF on CPU peaks at 3.8 / 6.6 / 12.4 GiB for
# 4 / 8 / 16 photos, and 32 was killed on a 24 GiB machine (benchmarks/detector_validation.py); time per pass
# does not depend on it.
VAL_MAP_BATCH = 8


# ----------------------------------------------------------------------------- photos


@dataclass
class DetectionPhotos:
    """Decoded photos with their boxes (photo pixels) and class indices, in memory for fast augmentation."""

    images: list[np.ndarray]
    boxes: list[np.ndarray]
    labels: list[np.ndarray]
    photo_ids: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def face_count(self) -> int:
        return int(sum(len(b) for b in self.boxes))


def photos_from_faces(faces: pd.DataFrame, class_names=CLASS_NAMES, progress: bool = True) -> DetectionPhotos:
    """Group a split's face rows by photo and decode each photo once."""
    from maskwatch.progress import progress_bar

    index = {name: i for i, name in enumerate(class_names)}
    photos = DetectionPhotos([], [], [], [])
    for image_path, rows in progress_bar(list(faces.groupby("image_path", sort=True)), desc="loading photos",
                                         unit="photo", disable=not progress):
        photos.images.append(read_image(image_path))
        photos.boxes.append(rows[["xmin", "ymin", "xmax", "ymax"]].to_numpy(np.float32))
        photos.labels.append(rows["label"].map(index).to_numpy(np.int64))
        photos.photo_ids.append(str(rows["photo_id"].iloc[0]))
    return photos


# ----------------------------------------------------------------------------- targets


def _gaussian(radius_x: int, radius_y: int) -> np.ndarray:
    sigma_x, sigma_y = (2 * radius_x + 1) / 6, (2 * radius_y + 1) / 6
    xs = np.arange(-radius_x, radius_x + 1, dtype=np.float32)
    ys = np.arange(-radius_y, radius_y + 1, dtype=np.float32)
    return np.exp(-(xs[None, :] ** 2) / (2 * sigma_x ** 2) - (ys[:, None] ** 2) / (2 * sigma_y ** 2))


def encode_targets(boxes: np.ndarray, labels: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Boxes (network pixels) and class indices -> out_h x out_w x 9 training targets.

    Channels: face heat, 3 class heats (Gaussian peaks of exactly 1 at each centre cell), log size, centre
    offset within the cell, and the centre mask. Larger faces are drawn first so a small face sharing a
    cell keeps its regression values.
    """
    target = np.zeros((out_h, out_w, OUTPUT_CHANNELS + 1), np.float32)
    order = np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])) if len(boxes) else []
    for i in order:
        x0, y0, x1, y1 = boxes[i] / STRIDE
        w, h = x1 - x0, y1 - y0
        if w <= 0 or h <= 0:
            continue
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        ix, iy = min(max(int(cx), 0), out_w - 1), min(max(int(cy), 0), out_h - 1)
        rx, ry = int(w / 2 * GAUSSIAN_ALPHA), int(h / 2 * GAUSSIAN_ALPHA)
        peak = _gaussian(rx, ry)
        top, bottom = max(iy - ry, 0), min(iy + ry + 1, out_h)
        left, right = max(ix - rx, 0), min(ix + rx + 1, out_w)
        window = peak[top - (iy - ry):bottom - (iy - ry), left - (ix - rx):right - (ix - rx)]
        for channel in (FACE_CHANNEL, CLASS_CHANNELS.start + int(labels[i])):
            np.maximum(target[top:bottom, left:right, channel], window, out=target[top:bottom, left:right, channel])
        target[iy, ix, SIZE_CHANNELS] = np.log(np.maximum([w, h], 0.25))
        target[iy, ix, OFFSET_CHANNELS] = np.clip([cx - ix, cy - iy], 0.0, 1.0)
        target[iy, ix, MASK_CHANNEL] = 1.0
    return target


# ----------------------------------------------------------------------------- augmentation


def _jitter_colour(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Saturation, contrast and brightness jitter in OpenCV's saturating uint8 ops (fast, and they free the GIL)."""
    grey = cv2.cvtColor(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
    saturation = rng.uniform(0.6, 1.4)
    image = cv2.addWeighted(image, saturation, grey, 1.0 - saturation, 0.0)
    return cv2.convertScaleAbs(image, alpha=rng.uniform(0.75, 1.25), beta=rng.uniform(-25, 25))


def augment(image: np.ndarray, boxes: np.ndarray, labels: np.ndarray, config: DetectorTrainConfig,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random scale around the inference size, random crop/placement on a square canvas, flip, colour.

    Faces cut to less than half their area by the crop are dropped; the rest are clipped to the canvas.
    """
    canvas_side = config.train_canvas
    scale = rng.uniform(*config.scale_range) * config.input_side / max(image.shape[:2])
    resized = cv2.resize(image, None, fx=scale, fy=scale,
                         interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    height, width = resized.shape[:2]
    off_x = int(rng.integers(min(0, canvas_side - width), max(0, canvas_side - width) + 1))
    off_y = int(rng.integers(min(0, canvas_side - height), max(0, canvas_side - height) + 1))
    canvas = np.full((canvas_side, canvas_side, 3), PAD_VALUE, np.uint8)
    src_x, src_y = max(-off_x, 0), max(-off_y, 0)
    dst_x, dst_y = max(off_x, 0), max(off_y, 0)
    copy_w, copy_h = min(width - src_x, canvas_side - dst_x), min(height - src_y, canvas_side - dst_y)
    canvas[dst_y:dst_y + copy_h, dst_x:dst_x + copy_w] = resized[src_y:src_y + copy_h, src_x:src_x + copy_w]
    moved = boxes * scale + np.array([off_x, off_y, off_x, off_y], np.float32)
    clipped = np.clip(moved, 0, canvas_side)
    area = lambda b: np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # noqa: E731
    keep = (area(clipped) >= 0.5 * np.maximum(area(moved), 1e-6)) & (area(clipped) > 0)
    clipped, kept_labels = clipped[keep], labels[keep]
    if rng.random() < 0.5:
        canvas = canvas[:, ::-1]
        clipped = np.stack([canvas_side - clipped[:, 2], clipped[:, 1], canvas_side - clipped[:, 0],
                            clipped[:, 3]], axis=1) if len(clipped) else clipped
    return _jitter_colour(np.ascontiguousarray(canvas), rng), clipped.astype(np.float32), kept_labels


def letterboxed_sample(image: np.ndarray, boxes: np.ndarray, side: int) -> tuple[np.ndarray, np.ndarray]:
    """Validation input: the inference letterbox, padded to a fixed side x side square (static shapes)."""
    boxed, scale = letterbox(image, side)
    canvas = np.full((side, side, 3), PAD_VALUE, np.uint8)
    canvas[:boxed.shape[0], :boxed.shape[1]] = boxed[:side, :side]
    return canvas, boxes * scale


def batch_sampler(photos: DetectionPhotos, config: DetectorTrainConfig, training: bool, seed: int):
    """A keras.utils.PyDataset of (images, targets) batches; training batches are augmented afresh each epoch."""
    import keras

    class DetectionBatches(keras.utils.PyDataset):
        def __init__(self):
            # Threads, not processes: OpenCV frees the GIL, and forking after JAX or TF started is unsafe.
            super().__init__(workers=config.loader_workers, use_multiprocessing=False)
            self.epoch = 0

        def __len__(self):
            if training:
                return max(len(photos) // config.batch_size, 1)
            return math.ceil(len(photos) / config.batch_size)

        def on_epoch_end(self):
            self.epoch += 1

        def __getitem__(self, index):
            if training:  # drawn from (seed, epoch, batch): reproducible whichever thread builds the batch
                rng = np.random.default_rng([seed, self.epoch, index])
                picks = rng.choice(len(photos), size=min(config.batch_size, len(photos)), replace=False)
            else:
                rng = None
                picks = range(index * config.batch_size, min((index + 1) * config.batch_size, len(photos)))
            images, targets = [], []
            for i in picks:
                if training:
                    image, boxes, labels = augment(photos.images[i], photos.boxes[i], photos.labels[i], config, rng)
                else:
                    image, boxes = letterboxed_sample(photos.images[i], photos.boxes[i], config.input_side)
                    labels = photos.labels[i]
                side = image.shape[0]
                images.append(image)
                targets.append(encode_targets(boxes, labels, side // STRIDE, side // STRIDE))
            return np.stack(images).astype(np.float32), np.stack(targets)

    return DetectionBatches()


# ----------------------------------------------------------------------------- network and loss


def build_face_detector(weights: str | None = "imagenet", fpn_channels: int = 96, head_channels: int = 64,
                        backbone_batchnorm: str = "train"):
    """MobileNetV2 (ImageNet) + a top-down feature pyramid to stride 4 + heat / size / offset heads.

    Takes raw 0..255 RGB of any size divisible by 32; outputs H/4 x W/4 x 8 (see maskwatch.centernet).
    backbone_batchnorm="frozen" keeps the backbone's BatchNormalization layers in inference mode (in Keras 3
    only trainable=False does that inside fit).
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=(None, None, 3), name="image")
    scaled = layers.Rescaling(1.0 / 127.5, offset=-1.0, name="scale_pixels")(inputs)
    with warnings.catch_warnings():  # the 224 px ImageNet weights serve any input size
        warnings.filterwarnings("ignore", message=".*will be loaded as the default")
        warnings.filterwarnings("ignore", message=".*input_shape.*")
        base = keras.applications.MobileNetV2(include_top=False, weights=weights, input_shape=(None, None, 3))
    backbone = keras.Model(base.inputs, [base.get_layer(name).output for name in BACKBONE_FEATURES],
                           name="backbone")
    if backbone_batchnorm not in ("train", "frozen"):
        raise ValueError(f"backbone_batchnorm must be 'train' or 'frozen', not {backbone_batchnorm!r}")
    if backbone_batchnorm == "frozen":
        for layer in backbone.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.trainable = False
    features = backbone(scaled)
    merged = layers.Conv2D(fpn_channels, 1, name="lateral_32")(features[-1])
    for feature, stride in zip(reversed(features[:-1]), (16, 8, 4)):
        lateral = layers.Conv2D(fpn_channels, 1, name=f"lateral_{stride}")(feature)
        merged = layers.Add(name=f"merge_{stride}")([layers.UpSampling2D(2, name=f"up_{stride}")(merged), lateral])
        merged = layers.SeparableConv2D(fpn_channels, 3, padding="same", use_bias=False,
                                        name=f"smooth_{stride}")(merged)
        merged = layers.BatchNormalization(name=f"smooth_{stride}_bn")(merged)
        merged = layers.ReLU(name=f"smooth_{stride}_relu")(merged)

    def branch(name: str, channels: int, activation, bias=None):
        hidden = layers.Conv2D(head_channels, 3, padding="same", activation="relu", name=f"{name}_conv")(merged)
        initial_bias = keras.initializers.Constant(bias) if bias is not None else "zeros"
        return layers.Conv2D(channels, 1, activation=activation, name=name, bias_initializer=initial_bias)(hidden)

    heat = branch("heat", 1 + NUM_CLASSES, "sigmoid", HEAT_PRIOR_BIAS)
    size = branch("size", 2, None)
    offset = branch("offset", 2, "sigmoid")
    outputs = layers.Concatenate(name="heads")([heat, size, offset])
    return keras.Model(inputs, outputs, name="maskwatch_face_detector")


def detection_loss(y_true, y_pred, class_weights=(1.0, 1.0, 1.0)):
    """Per photo: focal loss on the four heat maps + L1 on log size and offset at face centres, per face.

    class_weights scale the three class heat maps' focal loss (the face map keeps weight 1), so a rare class
    can count for more.
    """
    from keras import ops

    heat_true = y_true[..., :1 + NUM_CLASSES]
    heat_pred = ops.clip(y_pred[..., :1 + NUM_CLASSES], 1e-4, 1.0 - 1e-4)
    positive = ops.cast(ops.greater_equal(heat_true, 1.0), "float32")
    positive_loss = -ops.log(heat_pred) * ops.square(1.0 - heat_pred) * positive
    negative_loss = (-ops.log(1.0 - heat_pred) * ops.square(heat_pred)
                     * ops.power(1.0 - heat_true, 4.0) * (1.0 - positive))
    channel_weights = ops.convert_to_tensor([1.0, *(float(w) for w in class_weights)], dtype="float32")
    centres = y_true[..., MASK_CHANNEL:MASK_CHANNEL + 1]
    faces = ops.maximum(ops.sum(centres, axis=(1, 2, 3)), 1.0)
    heat_loss = ops.sum((positive_loss + negative_loss) * channel_weights, axis=(1, 2, 3))
    regression = ops.abs(y_pred[..., SIZE_CHANNELS.start:OFFSET_CHANNELS.stop]
                         - y_true[..., SIZE_CHANNELS.start:OFFSET_CHANNELS.stop]) * centres
    return (heat_loss + ops.sum(regression, axis=(1, 2, 3))) / faces


# ----------------------------------------------------------------------------- fit


@dataclass
class DetectorHistory:
    epochs: list[dict[str, float]] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    stopped_by_budget: bool = False

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.epochs)
        frame.insert(0, "epoch", range(1, len(frame) + 1))
        frame["seconds"] = self.epoch_seconds
        return frame

    @classmethod
    def from_frame(cls, frame: pd.DataFrame) -> "DetectorHistory":
        """Back from history.csv (to_frame's layout), e.g. one written beside a model trained elsewhere."""
        metrics = frame.drop(columns=["epoch", "seconds"], errors="ignore")
        records = [{k: v for k, v in record.items() if pd.notna(v)}  # val_map50 is measured every few epochs
                   for record in metrics.to_dict("records")]
        return cls(records, frame.get("seconds", pd.Series(0.0, index=frame.index)).tolist())


def learning_rate_at(progress: float, epoch: int, config: DetectorTrainConfig) -> float:
    """Linear warm-up over the first epochs, then cosine decay to 1% by the end of training (progress 0..1)."""
    if epoch < config.warmup_epochs:
        return config.learning_rate * (epoch + 1) / (config.warmup_epochs + 1)
    floor = 0.01 * config.learning_rate
    return floor + 0.5 * (config.learning_rate - floor) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class BudgetClock:
    """Where a time-boxed run stands, counted in epochs: epochs done / (epochs done + the epochs the time left
    holds at the recent pace). Counted in seconds instead, compiling (136 s for the first epoch and 75 s for the
    first val mAP on an H200 running two trainings, against 1.4 s an epoch) used 45% of a 480 s budget's
    learning-rate schedule before the sixth epoch; counted in epochs, it costs epochs but no schedule. A pace is
    the time from one epoch's start to the next's, so val mAP's share is in it; intervals over 4x the median
    (compiling) are left out."""

    def __init__(self, budget_s: float | None, window: int = 10):
        self.budget_s, self.window = budget_s, window
        self.started: float | None = None
        self.epoch_starts: list[float] = []
        self.epoch_ends: list[float] = []

    def start(self, now: float) -> None:
        self.started, self.epoch_starts, self.epoch_ends = now, [], []

    def epoch_began(self, now: float) -> None:
        self.epoch_starts.append(now)

    def epoch_ended(self, now: float) -> None:
        """Before the epoch's val mAP, which runs after the stop decision (a last epoch is always measured)."""
        self.epoch_ends.append(now)

    def val_reserve(self, pace: float) -> float:
        """The time of the latest val mAP measurement (a gap from an epoch's end to the next's start over 5% of
        an epoch), from the second on: the first compiles (75 s on the H200, against about 4 s after). Until
        then none is kept, so a run that ends before its second can overrun by an epoch and two val mAPs."""
        gaps = [begin - end for end, begin in zip(self.epoch_ends, self.epoch_starts[1:])]
        measurements = [gap for gap in gaps if gap > 0.05 * pace]
        return measurements[-1] if len(measurements) > 1 else 0.0

    def seconds_left(self, now: float) -> float:
        return self.budget_s - (now - self.started)

    def pace(self) -> float | None:
        """Seconds an epoch takes now (its val mAP share included), or None before one has run compiled."""
        intervals = np.diff(self.epoch_starts)[1:]  # the first epoch compiles
        if not len(intervals):
            return None
        steady = intervals[intervals <= 4 * np.median(intervals)]
        return float(np.mean(steady[-self.window:]))

    def progress(self, epochs_done: int, now: float) -> float:
        left, pace = self.seconds_left(now), self.pace()
        if left <= 0:
            return 1.0
        if pace is None:  # only the compiling epoch has run (warm-up epochs ignore progress)
            return 0.0
        return epochs_done / (epochs_done + left / pace)

    def another_epoch_fits(self, now: float, val_due: bool = False) -> bool:
        """Whether the time left holds one more epoch at the recent pace and the val mAP that ends the run, and
        the one this epoch is due (`val_due`), which runs after this decision. Before there is a pace, any time
        left will do: the first epoch's time is mostly compiling (on an H200 it took 104 s of a 195 s budget,
        and taken as the pace it ended the run after that one epoch)."""
        pace, left = self.pace(), self.seconds_left(now)
        if pace is None:
            return left > 0
        return left >= pace + (2 if val_due else 1) * self.val_reserve(pace)


def _callbacks(config: DetectorTrainConfig, model_path: Path, history: DetectorHistory, extra: list,
               val: DetectionPhotos, val_scoring: ValidationScoring):
    import keras

    class Schedule(keras.callbacks.Callback):
        """Sets the learning rate each epoch, keeps the history and ends a time-boxed run (see BudgetClock)."""

        def on_train_begin(self, logs=None):
            self.clock = BudgetClock(config.time_budget_s, window=max(10, 2 * config.val_map_every))
            self.clock.start(time.perf_counter())

        def progress(self, epoch: int) -> float:
            by_epochs = epoch / config.epochs
            if not config.time_budget_s:
                return by_epochs
            return max(by_epochs, self.clock.progress(epoch, time.perf_counter()))

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch_started = time.perf_counter()
            self.clock.epoch_began(self.epoch_started)
            self.model.optimizer.learning_rate = learning_rate_at(self.progress(epoch), epoch, config)

        def on_epoch_end(self, epoch, logs=None):
            record = {k: float(v) for k, v in (logs or {}).items() if k != "learning_rate"}
            record["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            history.epochs.append(record)
            history.epoch_seconds.append(time.perf_counter() - self.epoch_started)
            self.clock.epoch_ended(time.perf_counter())
            elapsed = time.perf_counter() - self.clock.started
            print(f"detector epoch {epoch + 1}/{config.epochs}  "
                  + "  ".join(f"{k} {v:.4g}" for k, v in record.items())
                  + f"  {history.epoch_seconds[-1]:.1f}s  (elapsed {elapsed:.0f}s)", flush=True)
            if (config.time_budget_s and epoch + 1 < config.epochs
                    and not self.clock.another_epoch_fits(time.perf_counter(),
                                                          val_due=(epoch + 1) % config.val_map_every == 0)):
                history.stopped_by_budget = True
                self.model.stop_training = True

    # Weights only: a full checkpoint carries AdamW's two moments, three times the model's size.
    if config.checkpoint_metric == "val_loss":
        checkpoint = keras.callbacks.ModelCheckpoint(str(best_weights_path(model_path)), monitor="val_loss",
                                                     mode="min", save_best_only=True, save_weights_only=True)
    else:
        checkpoint = validation_map_callback(val, config, best_weights_path(model_path), history, val_scoring)
    # In this order: the average swapped in first; the mAP joins the epoch's record before MLflow's.
    return [*weight_average_callbacks(config), Schedule(), checkpoint, *extra]


@dataclass(frozen=True)
class ValidationScoring:
    """How val mAP ranks the detector's faces, as detection mAP does: peaks from `score_threshold`
    (detector.trained_eval_score_threshold), each class scored face score ** `face_score_power` x class
    probability (detector.trained_face_score_power)."""

    score_threshold: float = 0.05
    face_score_power: float = 1.0

    @classmethod
    def of(cls, detector: DetectorConfig) -> "ValidationScoring":
        """The scoring that detection mAP applies to this detector's faces (its detector.trained_* settings)."""
        return cls(detector.trained_eval_score_threshold, detector.trained_face_score_power)


def validation_map(model, photos: DetectionPhotos, side: int, scoring: ValidationScoring, batch_size: int,
                   class_names=CLASS_NAMES) -> float:
    """The detector alone on the val photos, as serving runs it: letterboxed to `side`, peaks and per-class
    scores as `scoring` says (evaluate.face_class_scores, one hypothesis per face and class); mAP@0.5.

    Batches go through the model's compiled predict step (`predict_on_batch`), all of one shape (a short last
    batch is padded with blank canvases), so it is compiled once. Calling the model eagerly instead took 1.6x as
    long a pass under TensorFlow and 1.4x under JAX on CPU, with 3-5x the memory, for the same mAP
    (benchmarks/results/detector_validation_predict_step.txt); JAX compiles an eager call op by op per shape."""
    from maskwatch.centernet import decode
    from maskwatch.evaluate import PhotoDetections, average_precision_50, face_class_scores

    scored = []
    for start in range(0, len(photos), batch_size):
        chunk = range(start, min(start + batch_size, len(photos)))
        canvases = np.full((batch_size, side, side, 3), PAD_VALUE, np.float32)
        for slot, i in enumerate(chunk):
            canvases[slot] = letterboxed_sample(photos.images[i], photos.boxes[i], side)[0]
        heads = np.asarray(model.predict_on_batch(canvases))
        for i, out in zip(chunk, heads):
            height, width = photos.images[i].shape[:2]
            boxes, scores, probabilities = decode(out, side / max(height, width), scoring.score_threshold)
            boxes = np.clip(boxes, 0, [width, height, width, height])
            scored.append(PhotoDetections(width, height, photos.boxes[i], photos.labels[i], boxes,
                                          face_class_scores(scores, probabilities, scoring.face_score_power)))
    return float(np.mean(list(average_precision_50(scored, class_names).values())))


def validation_map_callback(val: DetectionPhotos, config: DetectorTrainConfig, weights_file: Path,
                            history: DetectorHistory, scoring: ValidationScoring):
    """Every config.val_map_every epochs and at the last: val mAP@0.5 into the epoch's logs and record, and the
    weights saved when it is the best so far."""
    import keras

    class ValidationMAP(keras.callbacks.Callback):
        best = -1.0

        def on_epoch_end(self, epoch, logs=None):
            last = epoch + 1 == config.epochs or self.model.stop_training  # a time budget ends it early
            if (epoch + 1) % config.val_map_every and not last:
                return
            value = validation_map(self.model, val, config.input_side, scoring,
                                   min(config.batch_size, VAL_MAP_BATCH))
            if logs is not None:
                logs["val_map50"] = value
            history.epochs[-1]["val_map50"] = value
            improved = value > self.best
            if improved:
                self.best = value
                self.model.save_weights(weights_file)
            print(f"detector epoch {epoch + 1}: val mAP@0.5 {value:.4f}" + ("  (best: kept)" if improved else ""),
                  flush=True)

    return ValidationMAP()


def best_weights_path(model_path: Path) -> Path:
    return Path(model_path).with_suffix(".best.weights.h5")


def save_inference_model(weights_file: Path, model_path: Path):
    """A fresh, uncompiled detector with the given weights, saved as .keras (no optimizer state inside)."""
    model = build_face_detector(weights=None)
    model.load_weights(weights_file)
    model.save(model_path)
    return model


def check_initial_model(initial_model: Path) -> Path:
    """detector_train.initial_model as a file to load, or a clear error before any photo is read."""
    initial_model = Path(initial_model)
    if initial_model.suffix != ".keras" or not initial_model.is_file():
        raise FileNotFoundError(f"detector_train.initial_model must be a face_detector.keras file: {initial_model}")
    return initial_model


def detector_optimizer(config: DetectorTrainConfig):
    """AdamW, with a moving average of the weights when detector_train.ema_momentum is set."""
    import keras

    use_ema = config.ema_momentum is not None
    return keras.optimizers.AdamW(config.learning_rate, weight_decay=config.weight_decay, clipnorm=10.0,
                                  use_ema=use_ema, ema_momentum=config.ema_momentum if use_ema else 0.99)


def weight_average_callbacks(config: DetectorTrainConfig) -> list:
    """With a weight average: the average sits in the model during validation and from each epoch's end (val
    mAP, the checkpoint) to the next epoch's start, so these callbacks must come before those.

    Not keras.callbacks.SwapEMAWeights(swap_on_epoch=True): under JAX, after its last-epoch step a weight and
    its average share one array, which the next predict_on_batch donates, and saving the weights then fails
    ("Array has been deleted"). Copies through NumPy never share."""
    import keras

    class SwapInWeightAverage(keras.callbacks.Callback):
        averaged_in = False

        def swap(self):
            optimizer = self.model.optimizer
            for weight, average in zip(optimizer._trainable_variables, optimizer._model_variables_moving_average):
                raw = keras.ops.convert_to_numpy(weight)
                weight.assign(keras.ops.convert_to_numpy(average))
                average.assign(raw)
            self.averaged_in = not self.averaged_in

        def average_in(self, *_args, **_kwargs):  # hooks with (logs) and (epoch, logs)
            if not self.averaged_in:
                self.swap()

        def raw_in(self, *_args, **_kwargs):
            if self.averaged_in:
                self.swap()

        on_test_begin = on_epoch_end = average_in
        on_test_end = on_epoch_begin = raw_in

    return [SwapInWeightAverage()] if config.ema_momentum is not None else []


def load_initial_weights(model, initial_model: Path) -> None:
    """The weights of a saved face_detector.keras, into a freshly built detector of the same shape."""
    import zipfile

    from maskwatch.detect import DetectorModelError

    try:
        with warnings.catch_warnings():  # Keras warns of each layer it skips before it raises: the error says it
            warnings.simplefilter("ignore")
            model.load_weights(check_initial_model(initial_model))
    except (ValueError, OSError, KeyError, zipfile.BadZipFile) as error:  # another network, or no Keras file
        raise DetectorModelError(f"{initial_model} holds no face detector this version can start from: "
                                 f"{error}") from error


def recorded_training_photos(model_file: Path) -> set[str]:
    """The photos the train_config.json beside a detector says it was trained on. A record that is missing or
    not maskwatch's (or from before maskwatch 0.2) gives none: evaluation then has nothing to warn by, and a
    training that starts from that detector must not fail after its epochs for it."""
    import json

    try:
        record = json.loads((Path(model_file).parent / TRAIN_RECORD).read_text())
    except (OSError, ValueError):
        return set()
    photos = record.get("trained_on_photos") if isinstance(record, dict) else None
    return {str(photo) for photo in photos} if isinstance(photos, list) else set()


def initial_model_photos(config: DetectorTrainConfig) -> set[str]:
    """The photos the starting model was trained on, so that evaluation still warns when a test photo shaped
    the weights through it."""
    return recorded_training_photos(config.initial_model) if config.initial_model is not None else set()


def train_face_detector(train: DetectionPhotos, val: DetectionPhotos, model_path: Path,
                        config: DetectorTrainConfig, weights: str | None = "imagenet",
                        extra_callbacks: list = (), val_scoring: ValidationScoring = ValidationScoring()
                        ) -> tuple[DetectorHistory, dict]:
    """Fit the detector; model_path gets the best epoch by config.checkpoint_metric (weights beside it as .h5),
    and train_config.json beside it says how it was trained (maskwatch train-detector --trained reads it).
    Returns the epochs' history and that record."""
    import keras

    keras.utils.set_random_seed(config.seed)
    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    starting = config.initial_model  # its weights replace ImageNet's, so those are not fetched
    model = build_face_detector(weights=None if starting else weights, backbone_batchnorm=config.backbone_batchnorm)
    if starting is not None:
        load_initial_weights(model, starting)

    def loss(y_true, y_pred):
        return detection_loss(y_true, y_pred, config.class_weights)

    model.compile(optimizer=detector_optimizer(config), loss=loss, jit_compile="auto")
    history = DetectorHistory()
    model.fit(batch_sampler(train, config, training=True, seed=config.seed),
              validation_data=batch_sampler(val, config, training=False, seed=config.seed),
              epochs=config.epochs, verbose=0,
              callbacks=_callbacks(config, model_path, history, list(extra_callbacks), val, val_scoring))
    best = best_weights_path(model_path)
    if not best.is_file():  # no epoch finished with a finite validation loss
        model.save_weights(best)
    record = write_train_record(model_path, config, history, train, val, val_scoring)
    save_inference_model(best, model_path)
    return history, record


TRAIN_RECORD = "train_config.json"


def best_epoch(history: DetectorHistory, metric: str) -> int | None:
    """1-based epoch the checkpoint kept, by the metric it was chosen on (None if no epoch has it)."""
    values = [record.get(metric) for record in history.epochs]
    scored = [(v, i) for i, v in enumerate(values, start=1) if v is not None and np.isfinite(v)]
    if not scored:
        return None
    sign = 1.0 if metric == "val_map50" else -1.0  # mAP: higher is better; loss: lower; ties: the first
    return max(scored, key=lambda pair: (sign * pair[0], -pair[1]))[1]


def kept_epoch_metrics(history: DetectorHistory | None, epoch: int | None) -> dict[str, float]:
    """The validation metrics of the epoch the checkpoint kept, as `detector_kept_<metric>`: what a run is
    compared by, since a metric's last logged value is the last epoch's, which may score below the one kept.
    Empty without a history (a detector trained elsewhere may come without its history.csv)."""
    if history is None or epoch is None or not 1 <= epoch <= len(history.epochs):
        return {}
    record = history.epochs[epoch - 1]
    return {f"detector_kept_{name}": float(record[name]) for name in ("val_map50", "val_loss") if name in record}


def write_train_record(model_path: Path, config: DetectorTrainConfig, history: DetectorHistory,
                       train: DetectionPhotos, val: DetectionPhotos,
                       val_scoring: ValidationScoring = ValidationScoring()) -> dict:
    """train_config.json beside the model: the settings, backend and photos it was trained with, and the epoch
    kept (with how val mAP scored it), so a model carried to another machine still says how it was made."""
    import json
    from dataclasses import asdict

    import keras

    record = {"detector_train": config.model_dump(mode="json"), "backend": keras.backend.backend(),
              "keras_version": keras.__version__, "photos_train": len(train), "photos_val": len(val),
              "faces_train": train.face_count, "epochs_run": len(history.epochs),
              "stopped_by_budget": history.stopped_by_budget,
              "best_epoch": best_epoch(history, config.checkpoint_metric), "val_scoring": asdict(val_scoring),
              # what it must not be scored on: evaluation warns when a split's test photos are among them
              "trained_on_photos": sorted(set(train.photo_ids) | set(val.photo_ids) | initial_model_photos(config))}
    (Path(model_path).parent / TRAIN_RECORD).write_text(json.dumps(record, indent=2))
    return record


def export_onnx(model_file: Path, target: Path) -> Path:
    """The trained detector as ONNX with a free input size (N x H x W x 3, H and W divisible by 32).

    Always through TensorFlow (tf2onnx): Keras' JAX export needs jax2onnx and fixed spatial sizes, so under
    another backend the backend-neutral .keras file is exported by a TensorFlow subprocess.
    """
    import keras

    if keras.backend.backend() != "tensorflow":
        return _export_onnx_with_tensorflow(model_file, target)
    import tensorflow as tf

    from maskwatch.export import export_onnx_file

    model = keras.models.load_model(model_file, compile=False)
    export_onnx_file(model, target, [tf.TensorSpec([None, None, None, 3], tf.float32, name="image")])
    return target


def _export_onnx_with_tensorflow(model_file: Path, target: Path) -> Path:
    from maskwatch.export import run_under_tensorflow

    code = "import sys; from maskwatch.train_detector import export_onnx; export_onnx(sys.argv[1], sys.argv[2])"
    run_under_tensorflow(code, str(model_file), str(target), what=f"ONNX export of {model_file}")
    return Path(target)


def plot_history(history: DetectorHistory, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    frame = history.to_frame()
    fig, ax = plt.subplots(figsize=(7, 4))
    for column in ("loss", "val_loss"):
        if column in frame:
            ax.plot(frame["epoch"], frame[column], label=column)
    ax.set_xlabel("epoch")
    ax.set_ylabel("detection loss (per face)")
    ax.set_yscale("log")
    ax.set_title("face detector training")
    handles, labels = ax.get_legend_handles_labels()
    if "val_map50" in frame and frame["val_map50"].notna().any():  # measured every few epochs
        measured = frame.dropna(subset=["val_map50"])
        right = ax.twinx()
        handles += right.plot(measured["epoch"], measured["val_map50"], "o-", color="tab:green", label="val mAP@0.5")
        labels.append("val mAP@0.5")
        right.set_ylabel("val mAP@0.5")
        right.set_ylim(0, 1)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)  # below: the curves fill the box
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
