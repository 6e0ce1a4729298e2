"""Typed configuration: defaults equal the recipe, overridable by YAML, env and CLI.

Precedence (lowest to highest): defaults < preset < YAML file < environment < CLI.
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

CLASS_NAMES: tuple[str, ...] = ("with_mask", "without_mask", "mask_weared_incorrect")

# Environment variables that point at local data, weights and detector (air-gapped use).
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "MASKWATCH_DATA_DIR": ("data", "source_dir"),
    "MASKWATCH_WORK_DIR": ("paths", "work_dir"),
    "MASKWATCH_TRACKING_URI": ("tracking", "tracking_uri"),
    "MLFLOW_TRACKING_URI": ("tracking", "tracking_uri"),
    "MASKWATCH_YUNET_PATH": ("detector", "model_path"),
    "MASKWATCH_DETECTOR_PATH": ("detector", "trained_model_path"),
    "MASKWATCH_MODEL": ("serve", "model_uri"),
    "MASKWATCH_API_KEY": ("serve", "api_key"),
}


def cache_dir() -> Path:
    """Per-user downloads kept between runs (the YuNet file, registry models); MASKWATCH_CACHE_DIR moves it."""
    return Path(os.environ.get("MASKWATCH_CACHE_DIR") or Path.home() / ".cache" / "maskwatch").expanduser()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class PathsConfig(_Section):
    work_dir: Path = Field(Path("artifacts"), description="Where crops, models, reports and caches go.")


class DataConfig(_Section):
    source_dir: Path | None = Field(
        None, description="VOC folder (images/ + annotations/) or folder-per-class; None = download from Kaggle."
    )
    kaggle_dataset: str = "andrewmvd/face-mask-detection"
    crop_margin: float = Field(0.15, ge=0.0, le=1.0, description="Box growth on each side, as a fraction of box size.")
    square_crops: bool = Field(True, description="Grow the box to a square so faces are not distorted by resizing.")
    image_size: int = Field(
        160, ge=32, description="Model input side. 160 beats 224 on these small faces at half the cost "
                                "(benchmarks/head_ablation.py); the 224 ImageNet weights serve any size.")
    resize_interpolation: Literal["area", "linear", "cubic", "lanczos"] = "cubic"
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    split_seed: int = 42
    max_photos: int | None = Field(None, ge=3, description="Use a seeded subset of photos (quick runs and tests).")
    similar_photo_max_hash_distance: int | None = Field(
        16, ge=0, le=64, description="Photos whose 64-bit difference hashes differ in at most this many bits, and "
                                     "whose thumbnails correlate (below), are one scene and go to one split; "
                                     "None splits every photo on its own.")
    similar_photo_min_correlation: float = Field(
        0.8, ge=-1.0, le=1.0, description="The least correlation of two photos' 16x16 grey thumbnails that makes "
                                          "them one scene (with the hash distance above).")


class AugmentConfig(_Section):
    enabled: bool = True
    horizontal_flip: bool = True
    rotation: float = Field(0.05, ge=0.0, le=0.5, description="Fraction of a full turn.")
    zoom: float = Field(0.1, ge=0.0, le=0.5)
    translation: float = Field(0.1, ge=0.0, le=0.5)
    brightness: float = Field(0.15, ge=0.0, le=1.0)
    contrast: float = Field(0.15, ge=0.0, le=1.0)


class TrainConfig(_Section):
    two_phase: bool = True
    phase1_epochs: int = Field(20, ge=0)
    phase1_learning_rate: float = 1e-3
    phase2_epochs: int = Field(10, ge=0)
    phase2_learning_rate: float = 1e-5
    fine_tune_last_layers: int = Field(30, ge=1, description="Base layers unfrozen in phase 2.")
    phase2_batchnorm: Literal["frozen", "train"] = Field(
        "frozen", description="frozen: unfrozen block's BatchNormalization stays in inference mode."
    )
    single_phase_epochs: int = Field(30, ge=1)
    single_phase_learning_rate: float = 1e-3
    batch_size: int = Field(32, ge=1)
    dense_units: int = 512
    dropout: float = 0.5
    imbalance: Literal["none", "class_weight", "oversample"] = "class_weight"
    class_weight_power: float = Field(
        0.5, ge=0.0, le=1.0, description="Class weight = (n_max / n_class) ** power; 1 = fully balanced."
    )
    monitor: str = Field("val_macro_f1", description="Metric for checkpoint, early stopping and LR reduction.")
    early_stopping_patience: int | None = Field(6, ge=1)
    reduce_lr_patience: int | None = Field(3, ge=1)
    seed: int = 42
    deterministic: bool = Field(False, description=(
        "TensorFlow's deterministic ops: the same seed then gives the same model, run after run (without them two "
        "runs differ from the first epoch). Costs speed (benchmarks/determinism.py); GPU ops lacking a "
        "deterministic kernel raise."))
    cache_in_memory: bool = True
    decision_bias: Literal["none", "val_macro_f1"] = Field(
        "none", description="val_macro_f1: per-class log-prior bias tuned on the validation split, kept in metadata.")
    export_formats: list[Literal["litert", "litert_int8", "onnx"]] = Field(
        default_factory=lambda: ["litert"], description="Exports written into the bundle and the registered model.")


class EvalConfig(_Section):
    bootstrap_samples: int = Field(2000, ge=100)
    confidence_level: float = Field(0.95, gt=0.5, lt=1.0)
    detection_bootstrap_samples: int = Field(
        200, ge=0, description="Photo resamples for the detection mAP interval (each is one pycocotools run, about "
                               "0.1 s on the test split); 0 = no interval.")


class TrackingConfig(_Section):
    tracking_uri: str | None = Field(None, description="None = SQLite store mlflow.db in the project folder.")
    experiment_name: str = "maskwatch"
    registered_model_name: str = "maskwatch"
    champion_alias: str = "champion"
    promotion_metric: str = "macro_f1"
    min_improvement: float = Field(0.0, ge=0.0, description="Challenger must beat champion by more than this.")
    register_model: bool = True
    outage_wait_s: float = Field(600.0, ge=0.0, description=(
        "How long a run waits for a tracking server that stopped answering before it gives up (training itself "
        "goes on meanwhile; its epoch metrics are sent once the server answers)."))


class DetectorConfig(_Section):
    backend: str = Field("yunet", description="Name of a registered face detector.")
    model_path: Path | None = Field(None,
                                    description="YuNet .onnx; None = download once to the cache (pinned, sha256).")
    engine: Literal["onnxruntime", "opencv"] = Field(
        "onnxruntime", description="Runs YuNet: onnxruntime (faster, measured) or cv2.FaceDetectorYN (reference).")
    score_threshold: float = Field(0.5, ge=0.0, le=1.0)
    nms_threshold: float = Field(0.3, ge=0.0, le=1.0)
    min_face_size: int = Field(8, ge=1, description="Faces smaller than this (px, shorter side) are ignored.")
    small_face_mode: Literal["off", "upscale", "tile"] = "off"
    upscale_factor: float = Field(2.0, ge=1.0, le=4.0)
    max_side: int = Field(1280, ge=64, description="Photos are shrunk to this side before detection.")
    min_side: int = Field(640, ge=0, description="Photos whose longer side is shorter are enlarged to it before "
                                               "detection (by at most upscale_factor); 0 = never.")
    box_adjust: tuple[float, float, float, float] = Field(
        (0.022, 0.132, 1.04, 0.90),
        description="YuNet box -> annotation-style box: centre shift (dx, dy, as fractions of box width/height) "
                    "and scale (sw, sh). YuNet boxes take in the forehead; the data set's boxes sit lower and are "
                    "shorter. Fitted on the training photos by benchmarks/box_adjust.py; (0, 0, 1, 1) = raw boxes.")
    trained_model_path: Path | None = Field(
        None, description="backend 'centernet': the face_detector.onnx that `maskwatch train-detector` wrote.")
    trained_input_side: int = Field(640, ge=64, description="backend 'centernet': photos' longer side for it.")
    trained_score_threshold: float = Field(
        0.3, ge=0.0, le=1.0, description="backend 'centernet': faces it reports (predict, serve, video).")
    trained_eval_score_threshold: float = Field(
        0.05, ge=0.0, le=1.0,
        description="backend 'centernet': the threshold detection mAP is measured at (evaluate --detection, "
                    "train-detector); average precision needs the low-score tail. Chosen on the val photos.")
    class_fusion: float = Field(
        0.5, ge=0.0, le=1.0,
        description="backend 'centernet': weight of its own class probabilities against the classifier's in "
                    "their weighted geometric mean (chosen on the val photos; YuNet gives none).")
    trained_flip: bool = Field(
        False, description="backend 'centernet': also run it on the mirrored photo and average the two maps "
                           "(twice the detector's time). Helps some models and not others: check on val with "
                           "benchmarks/test_time_augmentation.py.")
    trained_nms_iou: float = Field(
        1.0, gt=0.0, le=1.0,
        description="backend 'centernet': also drop a found face that overlaps a higher-scored one by more than "
                    "this IoU (1 = off: the heat map's 3x3 peak rule alone, as CenterNet decodes).")
    trained_face_score_power: float = Field(
        0.5, gt=0.0, le=4.0,
        description="backend 'centernet': in detection mAP a found face scores face score ** power x class "
                    "probability for each class; its heat-map peaks are low on small faces (chosen on the val "
                    "photos; YuNet's faces use 1).")


class DetectorTrainConfig(_Section):
    """The face-mask detector trained on this data set (maskwatch train-detector)."""

    input_side: int = Field(640, ge=64, multiple_of=32,
                            description="Photos' longer side at inference; training scales around it.")
    train_canvas: int = Field(512, ge=64, multiple_of=32, description="Square training crop.")
    scale_range: tuple[float, float] = Field((0.6, 1.4), description="Random scale around input_side in training.")
    epochs: int = Field(140, ge=1)
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(1e-3, gt=0.0, description="Peak, after warm-up. 1e-3 beat 2e-3 at equal length "
                                                           "on an H100 (val mAP, detector alone: 0.728 vs 0.659).")
    weight_decay: float = Field(1e-4, ge=0.0)
    warmup_epochs: int = Field(3, ge=0, description="Linear warm-up, then cosine decay to 1%.")
    loader_workers: int = Field(1, ge=1, description="Threads that augment batches (more on many-core machines).")
    backbone_batchnorm: Literal["train", "frozen"] = Field(
        "train", description="frozen: the backbone's BatchNormalization layers keep their ImageNet statistics.")
    class_weights: tuple[float, float, float] = Field(
        (1.0, 1.0, 1.0), description="Loss weight of each class's heat map (with, without, incorrect).")
    time_budget_s: float | None = Field(
        None, gt=0, description="Also end (learning rate fully decayed) after this many seconds; best epoch kept.")
    checkpoint_metric: Literal["val_map50", "val_loss"] = Field(
        "val_map50", description="The epoch kept: best detection mAP@0.5 on the val photos (what serving is judged "
                                 "by), or lowest val loss.")
    val_map_every: int = Field(5, ge=1, description="Measure val mAP every this many epochs, and at the last one.")
    seed: int = Field(42, description="Weights and augmentation: the same seed draws the same batches.")
    ema_momentum: float | None = Field(
        None, gt=0.0, lt=1.0,
        description="Also keep an exponential moving average of the weights (this momentum per step; 0.99 spans "
                    "about 100 steps, 5 epochs of 597 photos at batch 32): val mAP, the epoch kept and the saved "
                    "model use the average, training goes on from the raw weights. Off: not yet tried on a GPU.")
    initial_model: Path | None = Field(
        None, description="Start from this face_detector.keras instead of the ImageNet backbone: continue a run "
                          "with a low learning_rate and warmup_epochs=0, or fine-tune on new photos.")


class ServeConfig(_Section):
    model_uri: str | None = Field(None, description=".keras path, bundle dir or models:/name@alias")
    runtime: Literal["keras", "litert", "litert_int8", "onnx"] = Field(
        "litert", description="Classifier runtime; float LiteRT is the fastest measured (benchmarks/runtimes.py).")
    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    api_key: str | None = Field(None, pattern=r"^[!-~]*$", description=(
        "X-API-Key for the prediction routes: printable ASCII without spaces (a header value); empty = none."))
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = 2
    worker_class: Literal["sync", "gevent"] = Field("gevent", description=(
        "gunicorn workers. gevent: slow clients wait without holding a worker. sync needs a buffering proxy "
        "(nginx) in front: two clients that send their headers slowly held both sync workers."))
    inference_threads: int | None = Field(
        None, ge=1, description="Threads per worker for OpenCV and the classifier; None = all cores.")


class RealtimeConfig(_Section):
    smoothing: float = Field(
        0.5, ge=0.0, lt=1.0, description="Share of a tracked face's class probabilities carried to the next video "
                                         "frame (a moving average that steadies labels); 0 = every frame alone.")
    track_min_iou: float = Field(0.3, gt=0.0, le=1.0, description="Box overlap that makes a face the one before.")
    track_max_missed: int = Field(5, ge=0, description="Frames a face may go unseen before its track ends.")
    stream_timeout_s: float = Field(10.0, gt=0.0, description="A stream URL's wait to open and for each frame "
                                                             "(OpenCV's own is 30 s).")


class Settings(_Section):
    paths: PathsConfig = PathsConfig()
    data: DataConfig = DataConfig()
    augment: AugmentConfig = AugmentConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvalConfig = EvalConfig()
    tracking: TrackingConfig = TrackingConfig()
    detector: DetectorConfig = DetectorConfig()
    detector_train: DetectorTrainConfig = DetectorTrainConfig()
    serve: ServeConfig = ServeConfig()
    realtime: RealtimeConfig = RealtimeConfig()

    # Derived locations: one place decides where things live.
    @property
    def champion_uri(self) -> str:
        """The registry URI of the served model when none is named: models:/<name>@<alias>."""
        return f"models:/{self.tracking.registered_model_name}@{self.tracking.champion_alias}"

    @property
    def work_dir(self) -> Path:
        return Path(self.paths.work_dir).expanduser().resolve()

    @property
    def tracking_uri(self) -> str:
        if self.tracking.tracking_uri:
            return self.tracking.tracking_uri
        return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"

    def to_flat_dict(self) -> dict[str, Any]:
        return flatten(json.loads(self.model_dump_json()))

    def to_yaml(self) -> str:
        return yaml.safe_dump(json.loads(self.model_dump_json()), sort_keys=False)


PRESETS: dict[str, dict[str, Any]] = {
    "full": {},
    # A first result in a few minutes on 2 CPU cores: a seeded subset of photos, few epochs.
    "quick": {
        "data": {"max_photos": 200},
        "train": {"phase1_epochs": 3, "phase2_epochs": 1, "single_phase_epochs": 4,
                  "early_stopping_patience": None, "reduce_lr_patience": None},
        "evaluate": {"bootstrap_samples": 500},
        "detector_train": {"epochs": 3, "train_canvas": 320, "input_side": 320},
    },
}


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in nested.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


class ConfigError(ValueError):
    """Settings that cannot be used; the message names each offending setting or override."""


def parse_dotted_overrides(pairs: list[str]) -> dict[str, Any]:
    """Turn ["train.phase1_epochs=2", ...] into a nested dict; values are parsed as YAML scalars."""
    nested: dict[str, Any] = {}
    for pair in pairs:
        dotted, equals, raw = pair.partition("=")
        keys = dotted.strip().split(".")
        if not equals or len(keys) < 2 or not all(keys):
            raise ConfigError(f"override {pair!r} is not of the form section.key=value")
        node = nested
        for depth, key in enumerate(keys[:-1]):
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {pair!r} conflicts with the override that sets "
                                  f"{'.'.join(keys[:depth + 1])} itself")
        try:
            node[keys[-1]] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError as error:
            raise ConfigError(f"override {pair!r}: the value is not valid YAML ({_first_line(error)}); "
                              "quote it if it is a string") from error
    return nested


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0]


def _explained(error: ValidationError) -> str:
    """pydantic's report as one line per setting, with the nearest known name for a misspelt one."""
    lines = []
    for problem in error.errors():
        where = ".".join(str(part) for part in problem["loc"])
        if problem["type"] == "extra_forbidden":
            known = _known_names(problem["loc"][:-1])
            section = "".join(f"{part}." for part in problem["loc"][:-1])
            close = difflib.get_close_matches(str(problem["loc"][-1]), known, n=2)
            hint = f"did you mean {' or '.join(section + name for name in close)}?" if close else \
                f"known: {', '.join(known)}"
            lines.append(f"  {where}: no such setting ({hint})")
        else:
            lines.append(f"  {where}: {problem['msg']} (got {problem['input']!r})")
    return "invalid settings:\n" + "\n".join(lines)


def _known_names(section_path: tuple) -> list[str]:
    model: type[BaseModel] = Settings
    for name in section_path:
        field = model.model_fields.get(str(name))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return list(model.model_fields)


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for var, (section, key) in ENV_OVERRIDES.items():
        if environ.get(var):
            nested.setdefault(section, {})[key] = environ[var]
    return nested


def load_settings(
    config_file: Path | str | None = None,
    preset: str = "full",
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    environ = dict(os.environ) if environ is None else environ
    merged: dict[str, Any] = deep_merge({}, PRESETS[preset])
    config_file = config_file or environ.get("MASKWATCH_CONFIG")
    if config_file:
        path = Path(config_file)
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(error).split())}") from error
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        merged = deep_merge(merged, loaded)
    merged = deep_merge(merged, _env_overrides(environ))
    merged = deep_merge(merged, overrides or {})
    try:
        return Settings.model_validate(merged)
    except ValidationError as error:
        raise ConfigError(_explained(error)) from error
