"""A trained model travels as a bundle: model.keras + metadata.json (classes, input size, preprocessing).

Inference code reads bundles through this module only; it imports no training code.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from maskwatch import __version__
from maskwatch.config import CLASS_NAMES
from maskwatch.preprocessing import CropSpec

MODEL_FILE = "model.keras"
METADATA_FILE = "metadata.json"
CONFIG_FILE = "config.yaml"  # the settings the model was trained with
RUN_BUNDLE_FOLDER = "model"  # where a training run's folder keeps its bundle
# The photos a model learnt from or was tuned on (train and val): a model must not be scored on them, nor on
# copies of them, when it is compared with another trained on another split.
TRAINED_ON_FILE = "trained_on_photos.json"


@dataclass
class ModelMetadata:
    class_names: list[str] = field(default_factory=lambda: list(CLASS_NAMES))
    input_size: int = 160
    crop: dict = field(default_factory=lambda: CropSpec().to_dict())
    preprocessing: str = ("RGB uint8 face crop (maskwatch.preprocessing.extract_face); "
                          "scaling to [-1,1] inside the model")
    thresholds: dict = field(default_factory=lambda: {"detector_score": 0.5})
    training_config: dict = field(default_factory=dict)
    data_hash: str = ""
    metrics: dict = field(default_factory=dict)
    run_id: str | None = None
    model_version: str | None = None
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    maskwatch_version: str = __version__
    exports: dict = field(default_factory=dict)  # runtime -> file name in the bundle (LiteRT, ONNX)

    @property
    def crop_spec(self) -> CropSpec:
        return CropSpec.from_dict(self.crop)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelMetadata":
        known = {key: values[key] for key in cls.__dataclass_fields__ if key in values}
        return cls(**known)


def apply_class_bias(probabilities, log_bias):
    """Shift class log-probabilities by a per-class bias (decision thresholds tuned on validation data)."""
    import numpy as np

    probabilities = np.asarray(probabilities, dtype=np.float32)
    if log_bias is None or len(probabilities) == 0 or not np.any(log_bias):
        return probabilities
    logits = np.log(np.clip(probabilities, 1e-9, 1.0)) + np.asarray(log_bias, dtype=np.float32)
    logits -= logits.max(axis=1, keepdims=True)
    shifted = np.exp(logits)
    return shifted / shifted.sum(axis=1, keepdims=True)


def bundle_paths(path: str | Path) -> tuple[Path, Path]:
    """(model.keras, metadata.json) for a bundle folder or a .keras file with a metadata sidecar."""
    path = Path(path)
    if path.is_dir():
        return path / MODEL_FILE, path / METADATA_FILE
    return path, path.with_name(METADATA_FILE)


def pin_bundle(bundle_dir: Path, destination: Path) -> Path:
    """A private copy of a bundle folder, made of hard links where the file system allows (no bytes copied): files
    that someone deletes later (the model cache replacing an out-of-date copy) stay readable here."""
    def link_or_copy(source: str, target: str) -> None:
        try:
            os.link(source, target)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(source, target)

    shutil.copytree(bundle_dir, destination, copy_function=link_or_copy)
    return Path(destination)


def save_bundle(model, bundle_dir: Path, metadata: ModelMetadata) -> Path:
    bundle_dir = Path(bundle_dir)
    bundle_dir.mkdir(parents=True, exist_ok=True)
    model.save(bundle_dir / MODEL_FILE)
    write_metadata(bundle_dir, metadata)
    return bundle_dir


def write_metadata(bundle_dir: Path, metadata: ModelMetadata) -> None:
    (Path(bundle_dir) / METADATA_FILE).write_text(metadata.to_json())


def write_trained_on(bundle_dir: Path, photo_ids) -> Path:
    path = Path(bundle_dir) / TRAINED_ON_FILE
    path.write_text(json.dumps({"photo_ids": sorted(set(photo_ids))}))
    return path


def read_trained_on(bundle_dir: str | Path) -> set[str] | None:
    """The photo ids a bundle's model trained on, or None for a model that does not record them (made by a
    maskwatch before 0.2)."""
    path = bundle_paths(bundle_dir)[0].with_name(TRAINED_ON_FILE)
    return set(json.loads(path.read_text())["photo_ids"]) if path.is_file() else None


def read_metadata(path: str | Path) -> ModelMetadata:
    model_file, metadata_file = bundle_paths(path)
    if not model_file.is_file():
        raise FileNotFoundError(f"no model at {model_file}")
    if not metadata_file.is_file():
        raise FileNotFoundError(f"model {model_file} has no {METADATA_FILE} beside it")
    return ModelMetadata.from_dict(json.loads(metadata_file.read_text()))
