"""Evaluation on the test split: scikit-learn metrics, a bootstrap interval by photo, plots."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score, recall_score

from maskwatch.config import CLASS_NAMES

MINORITY_CLASS = "mask_weared_incorrect"


@dataclass
class EvaluationResult:
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]
    confusion_matrix: list[list[int]]
    report_text: str
    recall_interval: dict[str, dict[str, float]] = field(default_factory=dict)
    n_faces: int = 0

    def flat_metrics(self, prefix: str = "test_") -> dict[str, float]:
        flat = {f"{prefix}accuracy": self.accuracy, f"{prefix}macro_f1": self.macro_f1}
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

    dataset = make_dataset(frame, batch_size, training=False, cache=False).map(lambda x, y: x)
    return model.predict(dataset, verbose=0)


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
    )


def bootstrap_recall_interval(y_true, y_pred, photo_ids, class_index: int, samples: int, level: float,
                              seed: int) -> dict[str, float]:
    """Percentile interval of one class's recall, resampling whole photos (faces of a photo are correlated)."""
    rng = np.random.default_rng(seed)
    mask = y_true == class_index
    frame = pd.DataFrame({"photo": photo_ids[mask], "hit": (y_pred[mask] == class_index).astype(int)})
    per_photo = frame.groupby("photo")["hit"].agg(["sum", "count"]).to_numpy()
    draws = rng.integers(0, len(per_photo), size=(samples, len(per_photo)))
    hits, counts = per_photo[draws, 0].sum(axis=1), per_photo[draws, 1].sum(axis=1)
    recalls = hits / counts
    alpha = (1.0 - level) / 2.0
    return {
        "recall": float(recall_score(y_true, y_pred, labels=[class_index], average="macro", zero_division=0)),
        "low": float(np.quantile(recalls, alpha)),
        "high": float(np.quantile(recalls, 1.0 - alpha)),
        "hits": int(frame["hit"].sum()),
        "faces": int(mask.sum()),
        "level": level,
    }


def evaluate_model(model, test_df: pd.DataFrame, class_names=CLASS_NAMES, bootstrap_samples: int = 2000,
                   confidence_level: float = 0.95) -> tuple[EvaluationResult, np.ndarray]:
    index = {name: i for i, name in enumerate(class_names)}
    probabilities = predict_probabilities(model, test_df)
    y_true = test_df["label"].map(index).to_numpy()
    result = evaluate_predictions(y_true, probabilities, test_df["photo_id"].to_numpy(), class_names,
                                  bootstrap_samples, confidence_level)
    return result, probabilities


def plot_confusion_matrix(result: EvaluationResult, path: Path, class_names=CLASS_NAMES, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    matrix = np.array(result.confusion_matrix)
    fig, ax = plt.subplots(figsize=(6, 5))
    ConfusionMatrixDisplay(matrix, display_labels=list(class_names)).plot(ax=ax, cmap="Blues", colorbar=False)
    ax.set_title(title or f"Test: accuracy {result.accuracy:.3f}, macro-F1 {result.macro_f1:.3f}")
    plt.setp(ax.get_xticklabels(), rotation=20, ha="right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def format_summary(result: EvaluationResult, class_names=CLASS_NAMES) -> str:
    lines = [f"test faces: {result.n_faces}   accuracy: {result.accuracy:.3f}   macro-F1: {result.macro_f1:.3f}",
             f"{'class':<24}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}   recall 95% CI"]
    for name in class_names:
        values = result.per_class[name]
        interval = result.recall_interval.get(name)
        ci = f"[{interval['low']:.2f}, {interval['high']:.2f}]" if interval else ""
        lines.append(f"{name:<24}{values['precision']:>10.3f}{values['recall']:>10.3f}{values['f1-score']:>10.3f}"
                     f"{int(values['support']):>9}   {ci}")
    lines.append("confusion matrix (rows true, columns predicted): " + str(result.confusion_matrix))
    return "\n".join(lines)
