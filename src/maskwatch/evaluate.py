"""Evaluation on the test split: scikit-learn metrics, a bootstrap interval by photo, plots."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score, recall_score

from maskwatch.config import CLASS_NAMES
from maskwatch.preprocessing import box_iou, read_image

MINORITY_CLASS = "mask_weared_incorrect"
CALIBRATION_METRICS = ("ece", "brier", "log_loss")


@dataclass
class EvaluationResult:
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]
    confusion_matrix: list[list[int]]
    report_text: str
    recall_interval: dict[str, dict[str, float]] = field(default_factory=dict)
    n_faces: int = 0
    calibration: dict = field(default_factory=dict)  # calibration_metrics(): ECE, Brier, log loss, bins

    def flat_metrics(self, prefix: str = "test_") -> dict[str, float]:
        flat = {f"{prefix}accuracy": self.accuracy, f"{prefix}macro_f1": self.macro_f1}
        flat.update({f"{prefix}{name}": self.calibration[name] for name in CALIBRATION_METRICS
                     if name in self.calibration})
        for name, values in self.per_class.items():
            for metric in ("precision", "recall", "f1-score"):
                flat[f"{prefix}{name}_{metric.replace('-score', '')}"] = values[metric]
        for name, interval in self.recall_interval.items():
            flat[f"{prefix}{name}_recall_ci_low"] = interval["low"]
            flat[f"{prefix}{name}_recall_ci_high"] = interval["high"]
        return flat

    def to_dict(self) -> dict:
        return asdict(self)


def predict_probabilities(model, frame: pd.DataFrame, batch_size: int = 64) -> np.ndarray:
    from maskwatch.data import make_dataset

    dataset = make_dataset(frame, batch_size, training=False, cache=False).map(_images_only)
    return model.predict(dataset, verbose=0)


def _images_only(images, labels):
    return images


def evaluate_predictions(y_true: np.ndarray, probabilities: np.ndarray, photo_ids: np.ndarray | None = None,
                         class_names=CLASS_NAMES, bootstrap_samples: int = 2000, confidence_level: float = 0.95,
                         seed: int = 0) -> EvaluationResult:
    class_names = list(class_names)
    labels = list(range(len(class_names)))
    y_pred = probabilities.argmax(axis=1)
    report = classification_report(y_true, y_pred, labels=labels, target_names=class_names, output_dict=True,
                                   zero_division=0)
    per_class = {name: {k: float(v) for k, v in report[name].items()} for name in class_names}
    intervals = {}
    if photo_ids is not None:
        for index, name in enumerate(class_names):
            if (y_true == index).any():
                intervals[name] = bootstrap_recall_interval(
                    y_true, y_pred, photo_ids, index, bootstrap_samples, confidence_level, seed)
    return EvaluationResult(
        accuracy=float(accuracy_score(y_true, y_pred)),
        macro_f1=float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        per_class=per_class,
        confusion_matrix=confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        report_text=classification_report(y_true, y_pred, labels=labels, target_names=class_names, digits=3,
                                          zero_division=0),
        recall_interval=intervals,
        n_faces=int(len(y_true)),
        calibration=calibration_metrics(y_true, probabilities) if len(y_true) else {},
    )


def calibration_metrics(y_true: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> dict:
    """How far the scores can be read as probabilities: expected calibration error of the top class (equal-width
    confidence bins, each weighted by its share of faces), multiclass Brier score and log loss (scikit-learn),
    and the bins themselves for a reliability diagram."""
    from sklearn.metrics import log_loss

    y_true = np.asarray(y_true)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == y_true).astype(float)
    # Bin i holds confidences in (i/bins, (i+1)/bins]; the top class of k classes is never below 1/k.
    index = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    with np.errstate(invalid="ignore"):
        accuracy = np.bincount(index, weights=correct, minlength=bins) / counts
        mean_confidence = np.bincount(index, weights=confidence, minlength=bins) / counts
    gaps = np.abs(accuracy - mean_confidence)
    one_hot = np.eye(probabilities.shape[1])[y_true]
    clipped = np.clip(probabilities, 1e-7, 1.0)  # a hard 0 on the true class would make log loss infinite
    return {
        "ece": float(np.nansum(gaps * counts) / len(y_true)),
        "brier": float(((probabilities - one_hot) ** 2).sum(axis=1).mean()),
        "log_loss": float(log_loss(y_true, clipped / clipped.sum(axis=1, keepdims=True),
                                   labels=range(probabilities.shape[1]))),
        "mean_confidence": float(confidence.mean()),
        "bins": [{"low": i / bins, "high": (i + 1) / bins, "faces": int(counts[i]),
                  "accuracy": None if counts[i] == 0 else float(accuracy[i]),
                  "mean_confidence": None if counts[i] == 0 else float(mean_confidence[i])} for i in range(bins)],
    }


def bootstrap_recall_interval(y_true, y_pred, photo_ids, class_index: int, samples: int, level: float,
                              seed: int) -> dict[str, float]:
    """Interval of one class's recall: the percentile interval over resampled whole photos (faces of a photo
    are correlated), widened where needed to the Wilson score interval of the face counts. Where every face of
    the class is right (or every one wrong) no resample differs and the bootstrap alone would say [1.00, 1.00]
    for 4 of 4; Wilson gives about [0.51, 1.00]."""
    from scipy.stats import binomtest

    rng = np.random.default_rng(seed)
    mask = y_true == class_index
    frame = pd.DataFrame({"photo": photo_ids[mask], "hit": (y_pred[mask] == class_index).astype(int)})
    per_photo = frame.groupby("photo")["hit"].agg(["sum", "count"]).to_numpy()
    draws = rng.integers(0, len(per_photo), size=(samples, len(per_photo)))
    hits, counts = per_photo[draws, 0].sum(axis=1), per_photo[draws, 1].sum(axis=1)
    recalls = hits / counts
    alpha = (1.0 - level) / 2.0
    wilson = binomtest(int(frame["hit"].sum()), int(mask.sum())).proportion_ci(level, method="wilson")
    return {
        "recall": float(recall_score(y_true, y_pred, labels=[class_index], average="macro", zero_division=0)),
        "low": float(min(np.quantile(recalls, alpha), wilson.low)),
        "high": float(max(np.quantile(recalls, 1.0 - alpha), wilson.high)),
        "hits": int(frame["hit"].sum()),
        "faces": int(mask.sum()),
        "level": level,
    }


def tune_class_bias(probabilities: np.ndarray, y_true: np.ndarray, grid: np.ndarray | None = None) -> list[float]:
    """Per-class log-bias (first class fixed at 0) maximising macro-F1 on held-out data; ties keep smaller shifts."""
    grid = np.linspace(-1.0, 3.0, 17) if grid is None else grid
    log_p = np.log(np.clip(probabilities, 1e-9, 1.0))
    labels = list(range(probabilities.shape[1]))
    best, best_f1 = np.zeros(probabilities.shape[1]), f1_score(y_true, log_p.argmax(1), labels=labels,
                                                               average="macro", zero_division=0)
    for b1 in grid:
        for b2 in grid:
            bias = np.array([0.0, b1, b2])
            score = f1_score(y_true, (log_p + bias).argmax(1), labels=labels, average="macro", zero_division=0)
            if score > best_f1 + 1e-9 or (abs(score - best_f1) <= 1e-9 and np.abs(bias).sum() < np.abs(best).sum()):
                best, best_f1 = bias, score
    return [float(v) for v in best]


def evaluate_model(model, test_df: pd.DataFrame, class_names=CLASS_NAMES, bootstrap_samples: int = 2000,
                   confidence_level: float = 0.95, class_log_bias=None) -> tuple[EvaluationResult, np.ndarray]:
    from maskwatch.bundle import apply_class_bias

    from maskwatch.data import label_indices

    probabilities = apply_class_bias(predict_probabilities(model, test_df), class_log_bias)
    y_true = label_indices(test_df, class_names)
    result = evaluate_predictions(y_true, probabilities, test_df["photo_id"].to_numpy(), class_names,
                                  bootstrap_samples, confidence_level)
    return result, probabilities


def plot_confusion_matrix(result: EvaluationResult, path: Path, class_names=CLASS_NAMES, title: str = "") -> Path:
    return _confusion_figure(np.array(result.confusion_matrix), list(class_names), path,
                             title or f"Test: accuracy {result.accuracy:.3f}, macro-F1 {result.macro_f1:.3f}")


def plot_reliability_diagram(result: EvaluationResult, path: Path, title: str = "") -> Path:
    """Accuracy against confidence of the top class per bin (the diagonal is perfect calibration), with the
    faces per bin below: a bar under the diagonal is overconfidence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    filled = [b for b in result.calibration["bins"] if b["faces"]]
    width = filled[0]["high"] - filled[0]["low"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.5, 6), sharex=True, height_ratios=(3, 1))
    top.bar([b["low"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
            edgecolor="black", label="accuracy")
    top.bar([b["low"] for b in filled], [b["mean_confidence"] - b["accuracy"] for b in filled], width=width,
            bottom=[b["accuracy"] for b in filled], align="edge", color="tab:red", alpha=0.35,
            label="gap to mean confidence")
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    calibration = result.calibration
    top.set(ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
            title=title or f"Reliability: ECE {calibration['ece']:.3f}, Brier {calibration['brier']:.3f}")
    top.legend(loc="upper left")
    bottom.bar([b["low"] for b in filled], [b["faces"] for b in filled], width=width, align="edge",
               edgecolor="black", color="grey")
    bottom.set(xlabel="confidence of the top class", ylabel="faces", yscale="log")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _confusion_figure(counts: np.ndarray, column_labels: list[str], path: Path, title: str,
                      row_labels: list[str] | None = None, axis_labels: tuple[str, str] | None = None,
                      figsize: tuple[float, float] = (6, 5)) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=figsize)
    ConfusionMatrixDisplay(counts, display_labels=column_labels).plot(ax=ax, cmap="Blues", colorbar=False)
    if row_labels:
        ax.set_yticks(range(len(row_labels)), row_labels)
    if axis_labels:
        ax.set_xlabel(axis_labels[0])
        ax.set_ylabel(axis_labels[1])
    ax.set_title(title)
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_summary(result: EvaluationResult, class_names=CLASS_NAMES, split: str = "test") -> str:
    lines = [f"{split} faces: {result.n_faces}   accuracy: {result.accuracy:.3f}   macro-F1: {result.macro_f1:.3f}",
             f"{'class':<24}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}   recall 95% CI"]
    for name in class_names:
        values = result.per_class[name]
        interval = result.recall_interval.get(name)
        ci = f"[{interval['low']:.2f}, {interval['high']:.2f}]" if interval else ""
        lines.append(f"{name:<24}{values['precision']:>10.3f}{values['recall']:>10.3f}{values['f1-score']:>10.3f}"
                     f"{int(values['support']):>9}   {ci}")
    absent = [name for name in class_names if result.per_class[name]["support"] == 0]
    if absent and len(absent) < len(class_names):
        # The figure stays over every class, so two models are compared alike; this says what it holds.
        present = [result.per_class[name]["f1-score"] for name in class_names if name not in absent]
        lines.append(f"note: no {', '.join(absent)} faces in this split: macro-F1 counts "
                     f"{'its' if len(absent) == 1 else 'their'} F1 as 0 ({float(np.mean(present)):.3f} over the "
                     f"{len(present)} classes present)")
    lines.append("confusion matrix (rows true, columns predicted): " + str(result.confusion_matrix))
    if result.calibration:
        lines.append(f"calibration: ECE {result.calibration['ece']:.3f}, Brier {result.calibration['brier']:.3f}, "
                     f"log loss {result.calibration['log_loss']:.3f}, mean confidence "
                     f"{result.calibration['mean_confidence']:.3f} (reliability diagram: bins by confidence)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- detection (detector + classifier)

SIZE_BUCKETS = (("under_16", 0, 16), ("16_to_32", 16, 32), ("32_and_over", 32, float("inf")))


@dataclass
class PhotoDetections:
    """One photo for average precision: its annotated faces and what was found, in photo pixels."""

    width: int
    height: int
    truth_boxes: np.ndarray  # N x 4 (x0, y0, x1, y1)
    truth_classes: np.ndarray  # N class indices
    found_boxes: np.ndarray  # M x 4
    found_scores: np.ndarray  # M x classes: each found face is one hypothesis per class

    def __post_init__(self):  # one layout for every consumer, whatever sequences it was given
        self.truth_boxes = np.asarray(self.truth_boxes, float).reshape(-1, 4)
        self.truth_classes = np.asarray(self.truth_classes, int).reshape(-1)
        self.found_boxes = np.asarray(self.found_boxes, float).reshape(-1, 4)
        scores = np.asarray(self.found_scores, float)
        self.found_scores = scores.reshape(len(self.found_boxes), -1 if scores.size else 0)

    @property
    def classes_present(self) -> set[int]:
        return set(self.truth_classes.tolist())

    @property
    def face_scores(self) -> np.ndarray:
        """Each found face's score: the sum of its per-class hypotheses (class probabilities sum to one)."""
        return self.found_scores.sum(axis=1)


def average_precision_50(photos: list[PhotoDetections], class_names, iou_threshold: float = 0.5) -> dict[str, float]:
    """Per-class AP at one IoU threshold, computed by pycocotools (all face sizes, up to 100 faces a photo)."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    class_names = list(class_names)
    images, annotations, results = [], [], []
    for image_id, photo in enumerate(photos, start=1):
        images.append({"id": image_id, "width": int(photo.width), "height": int(photo.height)})
        for box, cls in zip(photo.truth_boxes, photo.truth_classes):
            w, h = box[2] - box[0], box[3] - box[1]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, "area": float(w * h),
                                "bbox": [float(box[0]), float(box[1]), float(w), float(h)],
                                "category_id": int(cls) + 1})
        for box, scores in zip(photo.found_boxes, photo.found_scores):
            x0, y0, x1, y1 = (float(v) for v in box)
            results += [{"image_id": image_id, "category_id": index + 1, "bbox": [x0, y0, x1 - x0, y1 - y0],
                         "score": float(score)} for index, score in enumerate(scores)]
    per_class_ap = {name: 0.0 for name in class_names}
    if not results:
        return per_class_ap
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its own progress and tables
        ground_truth = COCO()
        ground_truth.dataset = {"images": images, "annotations": annotations,
                                "categories": [{"id": i + 1, "name": n} for i, n in enumerate(class_names)]}
        ground_truth.createIndex()
        evaluator = COCOeval(ground_truth, ground_truth.loadRes(results), iouType="bbox")
        evaluator.params.iouThrs = np.array([iou_threshold])
        evaluator.params.maxDets = [1, 10, 100]
        evaluator.params.areaRng = [[0, 1e10]]
        evaluator.params.areaRngLbl = ["all"]
        evaluator.evaluate()
        evaluator.accumulate()
    precision = evaluator.eval["precision"]  # [iou, recall, class, area, maxdets]
    for index, name in enumerate(class_names):
        values = precision[0, :, index, 0, -1]
        values = values[values > -1]
        per_class_ap[name] = float(values.mean()) if values.size else 0.0
    return per_class_ap


def bootstrap_map_interval(photos: list[PhotoDetections], class_names, samples: int, level: float = 0.95,
                           iou_threshold: float = 0.5, seed: int = 0) -> dict:
    """Percentile interval of mAP@0.5 and of each class's AP, resampling whole photos (faces of a photo are
    correlated; a few photos hold most of a rare class). Each resample is scored by pycocotools as it stands; one
    that lost every face of a class the photos have is drawn again, so no class's AP is undefined."""
    class_names = list(class_names)
    rng = np.random.default_rng(seed)
    classes_of = [photo.classes_present for photo in photos]
    present = set().union(*classes_of)
    maps, per_class = [], {name: [] for name in class_names}
    for _ in range(samples):
        for _attempt in range(100):
            picks = rng.integers(0, len(photos), len(photos))
            if set().union(*(classes_of[i] for i in picks)) >= present:
                break
        drawn = [photos[i] for i in picks]
        ap = average_precision_50(drawn, class_names, iou_threshold)
        maps.append(np.mean(list(ap.values())))
        for name, value in ap.items():
            per_class[name].append(value)
    tails = [50 * (1 - level), 50 * (1 + level)]
    return {"level": level, "samples": samples, "map50": [float(v) for v in np.percentile(maps, tails)],
            "ap50_per_class": {name: [float(v) for v in np.percentile(values, tails)]
                               for name, values in per_class.items()}}


def face_average_precision_50(photos: list[PhotoDetections], iou_threshold: float = 0.5) -> float:
    """Class-agnostic AP: how well faces are found, whatever class they are given.

    A found face's score is its face score (PhotoDetections.face_scores).
    """
    as_faces = [replace(photo, truth_classes=np.zeros(len(photo.truth_classes), int),
                        found_scores=photo.face_scores[:, None]) for photo in photos]
    return average_precision_50(as_faces, ["face"], iou_threshold)["face"]


def with_true_classes(photos: list[PhotoDetections], iou_threshold: float = 0.5) -> list[PhotoDetections]:
    """The same detections, but every found face that overlaps an annotated one (IoU >= threshold) gets that
    face's class with all of its face score: what a perfect classifier would make of these boxes."""
    corrected = []
    for photo in photos:
        scores = photo.found_scores.copy()
        for index, (box, face_score) in enumerate(zip(photo.found_boxes, photo.face_scores)):
            overlaps = box_iou(box, photo.truth_boxes)
            if overlaps.size and overlaps.max() >= iou_threshold:
                scores[index] = 0.0
                scores[index, photo.truth_classes[int(overlaps.argmax())]] = face_score
        corrected.append(replace(photo, found_scores=scores))
    return corrected


def detection_confusion(photos: list[PhotoDetections], num_classes: int, min_face_score: float = 0.0,
                        iou_threshold: float = 0.5) -> np.ndarray:
    """(classes + 1) x (classes + 1) counts at one operating point: rows are the annotated class and a last
    "no face" row (false alarms), columns the predicted class and a last "missed" column.

    Found faces at or above min_face_score, best first, each take the free annotated face they overlap most
    (IoU >= threshold), as average precision pairs them; the predicted class is the most probable one.
    """
    counts = np.zeros((num_classes + 1, num_classes + 1), int)
    for photo in photos:
        free = np.ones(len(photo.truth_boxes), bool)
        face_scores = photo.face_scores
        for index in np.argsort(-face_scores, kind="stable"):
            if face_scores[index] < min_face_score:
                break
            predicted = int(photo.found_scores[index].argmax())
            overlaps = np.where(free, box_iou(photo.found_boxes[index], photo.truth_boxes), -1.0)
            if overlaps.size and overlaps.max() >= iou_threshold:
                match = int(overlaps.argmax())
                free[match] = False
                counts[photo.truth_classes[match], predicted] += 1
            else:
                counts[num_classes, predicted] += 1
        for match in np.flatnonzero(free):
            counts[photo.truth_classes[match], num_classes] += 1
    return counts


def evaluate_detection(mask_detector, faces: pd.DataFrame, class_names=CLASS_NAMES, iou_threshold: float = 0.5,
                       progress: bool = True, operating_face_score: float = 0.0, bootstrap_samples: int = 0,
                       confidence_level: float = 0.95, face_score_power: float = 1.0) -> dict:
    """Run detector + classifier on every photo of `faces` (ground-truth boxes) and score it with pycocotools.

    Each found face is scored once per class (face score ** face_score_power x class probability), as
    multi-class detectors are.
    Beside mAP: class-agnostic face AP and the mAP these boxes would get with true classes (where mAP is lost:
    finding faces or classifying them), and a confusion table of the faces reported at operating_face_score
    (what serving shows; AP itself uses every face the detector gave). With bootstrap_samples, an interval for
    mAP and each AP over resampled photos.
    """
    from maskwatch.progress import progress_bar

    class_names = list(class_names)
    scored: list[PhotoDetections] = []
    matched_by_size = {name: [0, 0] for name, _, _ in SIZE_BUCKETS}
    milliseconds = []
    photos = list(faces.groupby("image_path", sort=True))
    for image_path, truth in progress_bar(photos, desc="detecting", unit="photo", disable=not progress):
        image = read_image(image_path)
        started = time.perf_counter()
        detections = mask_detector.detect(image)
        milliseconds.append((time.perf_counter() - started) * 1e3)
        truth_boxes = truth[["xmin", "ymin", "xmax", "ymax"]].to_numpy(dtype=float)
        found = np.array([d.box for d in detections], dtype=float).reshape(-1, 4)
        for box in truth_boxes:  # class-agnostic recall by face size
            size = min(box[2] - box[0], box[3] - box[1])
            bucket = next(name for name, low, high in SIZE_BUCKETS if low <= size < high)
            matched_by_size[bucket][1] += 1
            matched_by_size[bucket][0] += int((box_iou(box, found) >= iou_threshold).any())
        scored.append(PhotoDetections(image.shape[1], image.shape[0], truth_boxes,
                                      truth["label"].map(class_names.index).to_numpy(), found,
                                      class_scores(detections, class_names, face_score_power)))
    per_class_ap = average_precision_50(scored, class_names, iou_threshold)
    true_class_ap = average_precision_50(with_true_classes(scored, iou_threshold), class_names, iou_threshold)
    # A face's scores sum to face score ** power, which orders faces as the face score does.
    confusion = detection_confusion(scored, len(class_names), operating_face_score ** face_score_power,
                                    iou_threshold)
    recall_by_size = {name: (hit / total if total else None) for name, (hit, total) in matched_by_size.items()}
    hits = sum(h for h, _ in matched_by_size.values())
    total = sum(t for _, t in matched_by_size.values())
    return {
        "photos": len(photos), "faces": total, "iou_threshold": iou_threshold,
        "face_score_power": face_score_power,
        "ap50_per_class": per_class_ap, "map50": float(np.mean(list(per_class_ap.values()))),
        "face_ap50": face_average_precision_50(scored, iou_threshold),
        "ap50_per_class_true_classes": true_class_ap,
        "map50_true_classes": float(np.mean(list(true_class_ap.values()))),
        "face_recall": hits / total if total else None, "face_recall_by_size": recall_by_size,
        "faces_by_size": {name: t for name, (_, t) in matched_by_size.items()},
        "confusion": {"operating_face_score": operating_face_score, "iou_threshold": iou_threshold,
                      "rows": [*class_names, "no face"], "columns": [*class_names, "missed"],
                      "counts": confusion.tolist()},
        "ms_per_photo": float(np.mean(milliseconds)) if milliseconds else None,
        "interval": (bootstrap_map_interval(scored, class_names, bootstrap_samples, confidence_level, iou_threshold)
                     if bootstrap_samples and scored else None),
    }


def face_class_scores(face_scores, probabilities, face_score_power: float = 1.0) -> np.ndarray:
    """Found faces x classes: face score ** face_score_power x class probability. The power ranks faces the
    detector is less sure of (small ones) against the classes' probabilities; at 1 it is the usual product.
    Detection mAP and the detector's checkpoint metric (train_detector.validation_map) both rank by it."""
    probabilities = np.asarray(probabilities, dtype=float)
    return np.asarray(face_scores, dtype=float).reshape(-1, 1) ** face_score_power * probabilities


def class_scores(detections, class_names, face_score_power: float = 1.0) -> np.ndarray:
    """face_class_scores of Detection objects, columns in class_names order."""
    probabilities = np.array([[d.probabilities[name] for name in class_names] for d in detections], dtype=float)
    return face_class_scores([d.face_score for d in detections], probabilities.reshape(-1, len(class_names)),
                             face_score_power)


def fit_box_adjustment(face_detector, faces: pd.DataFrame, min_iou: float = 0.3,
                       progress: bool = True) -> dict:
    """How a detector's boxes differ from the annotated ones: median centre shift and scale over matched faces.

    Run the detector with raw boxes (box_adjust = (0, 0, 1, 1)) on the photos of `faces` (the training split),
    pair each annotated face with its best-overlapping detection (IoU > min_iou), and return the medians as
    detector.box_adjust values (dx, dy, sw, sh) with the number of pairs they rest on.
    """
    from maskwatch.progress import progress_bar

    truth_boxes, found_boxes = [], []
    for image_path, truth in progress_bar(list(faces.groupby("image_path", sort=True)), desc="fitting boxes",
                                          unit="photo", disable=not progress):
        found = np.array([face.box for face in face_detector.detect(read_image(image_path))], float).reshape(-1, 4)
        for box in truth[["xmin", "ymin", "xmax", "ymax"]].to_numpy(dtype=float):
            overlaps = box_iou(box, found)
            if overlaps.size and overlaps.max() > min_iou:
                truth_boxes.append(box)
                found_boxes.append(found[int(overlaps.argmax())])
    if not truth_boxes:
        raise ValueError("no annotated face overlaps a detection: nothing to fit")
    truth, found = np.array(truth_boxes), np.array(found_boxes)
    found_w, found_h = found[:, 2] - found[:, 0], found[:, 3] - found[:, 1]
    dx = ((truth[:, 0] + truth[:, 2]) - (found[:, 0] + found[:, 2])) / 2 / found_w
    dy = ((truth[:, 1] + truth[:, 3]) - (found[:, 1] + found[:, 3])) / 2 / found_h
    sw, sh = (truth[:, 2] - truth[:, 0]) / found_w, (truth[:, 3] - truth[:, 1]) / found_h
    return {"box_adjust": [round(float(np.median(v)), 3) for v in (dx, dy, sw, sh)], "pairs": len(truth)}


def detection_metric_values(metrics: dict, prefix: str = "det_") -> dict[str, float]:
    """evaluate_detection's figures as flat MLflow metrics: <prefix>ap50_<class>, map50, recall by size..."""
    values = {f"{prefix}ap50_{k}": v for k, v in metrics["ap50_per_class"].items()}
    values |= {f"{prefix}map50": metrics["map50"], f"{prefix}face_recall": metrics["face_recall"],
               f"{prefix}ms_per_photo": metrics["ms_per_photo"]}
    values |= {f"{prefix}{key}": metrics[key] for key in ("face_ap50", "map50_true_classes")}
    if metrics.get("interval"):
        values |= {f"{prefix}map50_ci_low": metrics["interval"]["map50"][0],
                   f"{prefix}map50_ci_high": metrics["interval"]["map50"][1]}
    return values | {f"{prefix}recall_{k}": v for k, v in metrics["face_recall_by_size"].items() if v is not None}


def format_detection_summary(metrics: dict) -> str:
    lines = [f"{metrics.get('split', 'test')} photos: {metrics['photos']}   faces: {metrics['faces']}   "
             f"mAP@{metrics['iou_threshold']}: {metrics['map50']:.3f}   face recall: {metrics['face_recall']:.3f}   "
             f"{metrics['ms_per_photo']:.1f} ms/photo"]
    if metrics.get("face_score_power", 1.0) != 1.0:
        lines.append(f"  each face scored per class as face score^{metrics['face_score_power']:g} x class probability")
    interval = metrics.get("interval")
    if interval:
        low, high = interval["map50"]
        lines.append(f"  mAP {interval['level']:.0%} interval over resampled photos: {low:.3f}-{high:.3f} "
                     f"({interval['samples']} resamples)")
    lines += [f"  AP {name:<24}{value:.3f}" + (f"   ({interval['ap50_per_class'][name][0]:.3f}-"
                                               f"{interval['ap50_per_class'][name][1]:.3f})" if interval else "")
              for name, value in metrics["ap50_per_class"].items()]
    lines += [f"  recall faces {name:<12}{value if value is None else round(value, 3)}"
              f" ({metrics['faces_by_size'][name]} faces)" for name, value in metrics["face_recall_by_size"].items()]
    lines += [f"  where mAP is lost: finding faces (class-agnostic AP {metrics['face_ap50']:.3f}); classifying them "
              f"(mAP with true classes {metrics['map50_true_classes']:.3f} vs {metrics['map50']:.3f})"]
    return "\n".join(lines + ["", format_confusion(metrics["confusion"])])


def format_confusion(confusion: dict) -> str:
    """The detection confusion table as text: annotated class down, predicted class (or missed) across."""
    width = max(len(name) for name in confusion["rows"] + confusion["columns"]) + 2
    lines = [f"faces reported at face score >= {confusion['operating_face_score']:g}, matched at IoU >= "
             f"{confusion['iou_threshold']:g} "
             "(rows: annotated, columns: predicted)",
             " " * width + "".join(f"{name:>{width}}" for name in confusion["columns"])]
    lines += [f"{row:<{width}}" + "".join(f"{count:>{width}}" for count in counts)
              for row, counts in zip(confusion["rows"], confusion["counts"])]
    return "\n".join(lines)


def plot_detection_confusion(confusion: dict, path: Path, title: str = "") -> Path:
    """The detection confusion table as a picture: which faces were missed, mislabelled or invented."""
    return _confusion_figure(
        np.array(confusion["counts"]), confusion["columns"], path,
        title or f"faces at face score >= {confusion['operating_face_score']:g}, IoU >= {confusion['iou_threshold']:g}",
        row_labels=confusion["rows"], axis_labels=("predicted (or missed)", "annotated (or no face: a false alarm)"),
        figsize=(6.8, 5.6))
