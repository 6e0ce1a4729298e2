"""The main job: prepare -> train (two phases) -> evaluate -> log -> register -> compare and promote.

Also the face detector's job: train it on the photos, export it, evaluate detection, log it (run_detector_job).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd

from maskwatch import tracking
from maskwatch.bundle import (CONFIG_FILE, MODEL_FILE, RUN_BUNDLE_FOLDER, TRAINED_ON_FILE, ModelMetadata,
                              read_metadata, read_trained_on, save_bundle, write_metadata, write_trained_on)
from maskwatch.config import CLASS_NAMES, DetectorConfig, DetectorTrainConfig, Settings
from maskwatch.data import (DataError, PreparedData, class_counts_table, crops_with_spec, label_indices,
                            photos_trained_on, prepare_data)
from maskwatch.export import export_model
from maskwatch.model import fetch_imagenet_weights
from maskwatch.evaluate import (EvaluationResult, detection_metric_values, evaluate_model, format_confusion,
                                format_summary, plot_confusion_matrix, plot_detection_confusion,
                                plot_reliability_diagram, predict_probabilities, tune_class_bias)
from maskwatch.train import TrainingHistory, plot_history, seconds_per_epoch, train_model
from maskwatch.train_detector import TRAIN_RECORD, recorded_training_photos

if TYPE_CHECKING:
    from maskwatch.train_detector import DetectorHistory

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    run_id: str
    bundle_dir: Path
    evaluation: EvaluationResult
    history: TrainingHistory
    decision: tracking.PromotionDecision
    prepared: PreparedData
    wall_seconds: float


def champion_metrics_on(prepared: PreparedData, settings: Settings, challenger,
                        challenger_bias: list[float] | None) -> Callable[[str], tracking.HeadToHead]:
    """Score a registered version on *this* test split, so the comparison is like for like: on the test photos it
    never trained on, the challenger too when that leaves out any (it was trained on another split)."""
    import keras

    def test_metrics(model, metadata: ModelMetadata | None, bias, test_df: pd.DataFrame) -> dict[str, float]:
        # The same test faces, cropped the way *that* model was trained (its size or margin may differ).
        if metadata is not None and metadata.crop_spec != prepared.crop_spec:
            test_df = crops_with_spec(test_df, metadata.crop_spec, settings.work_dir)
        result, _ = evaluate_model(model, test_df, bootstrap_samples=settings.evaluate.bootstrap_samples,
                                   class_log_bias=bias)
        return {"macro_f1": result.macro_f1, "accuracy": result.accuracy, **result.flat_metrics(prefix="")}

    def metrics_for(version: str) -> tracking.HeadToHead:
        bundle = tracking.download_model(f"models:/{settings.tracking.registered_model_name}/{version}")
        trained_on = read_trained_on(bundle)
        if trained_on is None:
            raise tracking.NotComparableError(
                "it does not record the photos it trained on (made by maskwatch before 0.2), so on this test split "
                "it could be scored on photos it learnt from")
        test = prepared.test_df
        unseen = test[~test["photo_id"].isin(photos_trained_on(test, prepared.all_faces, trained_on))]
        if unseen.empty:
            raise tracking.NotComparableError(f"it trained on all {test['photo_id'].nunique()} test photos of "
                                              "this split (or on copies of them): no fair comparison is possible")
        metadata = read_metadata(bundle)
        champion = test_metrics(keras.models.load_model(bundle / MODEL_FILE), metadata,
                                metadata.thresholds.get("class_log_bias"), unseen)
        if len(unseen) == len(test):
            return tracking.HeadToHead(champion)
        log.info("v%s trained on %d of this split's test photos: both are compared on the others", version,
                 test["photo_id"].nunique() - unseen["photo_id"].nunique())
        return tracking.HeadToHead(champion, test_metrics(challenger, None, challenger_bias, unseen),
                                   f"on the {unseen['photo_id'].nunique()} of {test['photo_id'].nunique()} test "
                                   "photos it never trained on")

    return metrics_for


def run_job(settings: Settings, run_name: str | None = None) -> JobResult:
    started = time.perf_counter()
    tracking.configure(settings)  # fail before any work if the tracking store is unreachable
    fetch_imagenet_weights()  # or if the base model's weights cannot be had
    prepared, scan = prepare_data(settings)
    counts = class_counts_table(prepared.train_df, prepared.val_df, prepared.test_df)
    log.info("faces per class and split:\n%s", counts.to_string())
    reports = settings.work_dir / "reports"
    with tracking.training_run(settings, run_name, tags={"data_hash": prepared.data_hash}) as run_id:
        tracking.log_artifact(reports / "data", "data_report")
        tracking.log_metrics({f"faces_{split}_{label}": int(counts.loc[label, split])
                              for split in ("train", "val", "test") for label in CLASS_NAMES})
        run_dir = settings.work_dir / "runs" / run_id
        history, model = train_model(
            prepared.train_df, prepared.val_df, use_two_phase=settings.train.two_phase, settings=settings,
            model_path=run_dir / "checkpoint" / "best.keras", extra_callbacks=tracking.epoch_logger_factory())
        bundle_dir, evaluation = _finish_locally(model, history, prepared, settings, run_dir, run_id)
        challenger_bias = read_metadata(bundle_dir).thresholds.get("class_log_bias")
        decision = _send_results(settings, run_dir, model, champion_metrics_on(prepared, settings, model,
                                                                               challenger_bias))
        wall = time.perf_counter() - started
        tracking.log_metrics({"wall_seconds": wall})
    return JobResult(run_id, bundle_dir, evaluation, history, decision, prepared, wall)


def _finish_locally(model, history: TrainingHistory, prepared: PreparedData, settings: Settings, run_dir: Path,
                    run_id: str) -> tuple[Path, EvaluationResult]:
    """Everything after training that needs no tracking server: curves, evaluation, the bundle and its exports.
    Done before anything is sent, so a server gone by then cannot keep the run folder from holding a model ready
    for --model, and `maskwatch models register` can record it later."""
    _write_history(history, run_dir)
    class_log_bias = _decision_bias(model, prepared, settings)
    evaluation, _ = evaluate_model(model, prepared.test_df, bootstrap_samples=settings.evaluate.bootstrap_samples,
                                   confidence_level=settings.evaluate.confidence_level, class_log_bias=class_log_bias)
    _write_evaluation(evaluation, run_dir)
    metadata = ModelMetadata(
        class_names=list(CLASS_NAMES), input_size=settings.data.image_size, crop=prepared.crop_spec.to_dict(),
        thresholds={"detector_score": settings.detector.score_threshold, "class_log_bias": class_log_bias},
        training_config=json.loads(settings.model_dump_json()), data_hash=prepared.data_hash,
        metrics=evaluation.flat_metrics(), run_id=run_id)
    bundle_dir = save_bundle(model, run_dir / RUN_BUNDLE_FOLDER, metadata)
    write_trained_on(bundle_dir, pd.concat([prepared.train_df, prepared.val_df])["photo_id"])
    export_model(bundle_dir, list(settings.train.export_formats), prepared.train_df, prepared.val_df)
    (bundle_dir / CONFIG_FILE).write_text(settings.to_yaml())
    return bundle_dir, evaluation


def _send_results(settings: Settings, run_dir: Path, model,
                  champion_metrics_for: Callable[[str], tracking.HeadToHead]) -> tracking.PromotionDecision:
    """Log a run folder's files and model to the active run, register the model, compare it with the champion and
    promote it if it wins; the version is written into the bundle's metadata."""
    bundle_dir = run_dir / RUN_BUNDLE_FOLDER
    metadata = read_metadata(bundle_dir)
    _log_history(run_dir)
    if metadata.thresholds.get("class_log_bias") is not None:
        tracking.log_params({"tuned_class_log_bias": metadata.thresholds["class_log_bias"]})
    tracking.log_metrics(metadata.metrics)
    for name in EVALUATION_FILES:
        tracking.log_artifact(run_dir / name, "evaluation")
    tracking.log_artifact(bundle_dir / CONFIG_FILE)
    side = metadata.input_size
    registered_name = settings.tracking.registered_model_name if settings.tracking.register_model else None
    version = tracking.log_keras_model(model, np.zeros((1, side, side, 3), dtype=np.float32),
                                       json.loads(metadata.to_json()), registered_name,
                                       extra_files=[bundle_dir / name for name in metadata.exports.values()]
                                       + [path for path in [bundle_dir / TRAINED_ON_FILE] if path.is_file()])
    challenger = {name.removeprefix("test_"): value for name, value in metadata.metrics.items()}
    decision = tracking.decide_promotion(settings, version, challenger, champion_metrics_for)
    tracking.log_dict(decision.to_dict(), "promotion.json")
    tracking.set_tags({"promoted": decision.promoted, "model_version": version})
    if decision.champion_value is not None:
        tracking.log_metrics({f"champion_test_{decision.metric}": decision.champion_value})
    metadata.model_version = version
    write_metadata(bundle_dir, metadata)
    return decision


def record_run_folder(settings: Settings, run_dir: Path) -> tuple[str, tracking.PromotionDecision]:
    """Record a training job whose tracking server was gone when it ended: its run folder's files and model go to
    its MLflow run, which ends FINISHED, then the model is registered, compared and promoted as the job would have.
    -> (run id, promotion decision)."""
    run_dir = Path(run_dir).resolve()
    bundle_dir = run_dir / RUN_BUNDLE_FOLDER
    needed = [run_dir / name for name in (*HISTORY_FILES, *EVALUATION_FILES)] + [bundle_dir / CONFIG_FILE]
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run folder at {run_dir}: give a training run's folder, artifacts/runs/<run id>")
    if (run_dir / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} is a model bundle, not a training run's folder: give the run folder "
                                f"that holds it in {RUN_BUNDLE_FOLDER}/ (artifacts/runs/<run id>)")
    if not (bundle_dir / MODEL_FILE).is_file():
        raise FileNotFoundError(f"{run_dir} holds no model bundle ({RUN_BUNDLE_FOLDER}/{MODEL_FILE}): the job ended "
                                "before it was saved, so there is nothing to register; train again")
    if missing := [str(path.relative_to(run_dir)) for path in needed if not path.is_file()]:
        raise FileNotFoundError(f"{run_dir} is missing {', '.join(missing)}: not a whole training run folder")
    metadata = read_metadata(bundle_dir)
    if metadata.model_version:
        raise ValueError(f"run {metadata.run_id}'s model is already version {metadata.model_version} of the "
                         "registry: nothing to record")
    import keras

    model = keras.models.load_model(bundle_dir / MODEL_FILE)

    def champion_metrics_for(version: str) -> tracking.HeadToHead:
        prepared, _ = prepare_data(settings)
        if prepared.data_hash != metadata.data_hash:
            raise DataError(f"the data set now ({prepared.data_hash}) is not the one run {metadata.run_id} was "
                            f"tested on ({metadata.data_hash}): its comparison with the champion would not be like "
                            "for like")
        bias = metadata.thresholds.get("class_log_bias")
        return champion_metrics_on(prepared, settings, model, bias)(version)

    with tracking.resumed_training_run(settings, metadata.run_id, run_dir):
        decision = _send_results(settings, run_dir, model, champion_metrics_for)
    return metadata.run_id, decision


def _decision_bias(model, prepared: PreparedData, settings: Settings) -> list[float] | None:
    """Tune the per-class decision bias on the validation split (never on test), if configured."""
    if settings.train.decision_bias == "none":
        return None
    return tune_class_bias(predict_probabilities(model, prepared.val_df), label_indices(prepared.val_df))


HISTORY_FILES = ("history.csv", "training_curves.png")
EVALUATION_FILES = ("confusion_matrix.png", "reliability_diagram.png", "evaluation.json", "classification_report.txt")


def _write_history(history: TrainingHistory, run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    history.to_frame().to_csv(run_dir / "history.csv", index=False)
    plot_history(history, run_dir / "training_curves.png")


def _log_history(run_dir: Path) -> None:
    for name in HISTORY_FILES:
        tracking.log_artifact(run_dir / name, "training")
    seconds = seconds_per_epoch(pd.read_csv(run_dir / "history.csv"))
    tracking.log_metrics({f"seconds_per_epoch_{phase}": value for phase, value in seconds.items()})


def _write_evaluation(evaluation: EvaluationResult, run_dir: Path) -> None:
    plot_confusion_matrix(evaluation, run_dir / "confusion_matrix.png")
    plot_reliability_diagram(evaluation, run_dir / "reliability_diagram.png")
    (run_dir / "evaluation.json").write_text(json.dumps(evaluation.to_dict(), indent=2))
    (run_dir / "classification_report.txt").write_text(evaluation.report_text)


def summary_text(result: JobResult, settings: Settings) -> str:
    counts = class_counts_table(result.prepared.train_df, result.prepared.val_df, result.prepared.test_df)
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in result.history.seconds_per_epoch().items())
    lines = [
        "", "=== maskwatch: training job finished ===",
        f"run id: {result.run_id}   wall time: {result.wall_seconds / 60:.1f} min   seconds per epoch: {seconds}",
        "faces per class and split:", counts.to_string(), "",
        format_summary(result.evaluation), "",
        f"model bundle: {result.bundle_dir}",
        f"registry: version {result.decision.version}, promoted={result.decision.promoted} ({result.decision.reason})",
        f"MLflow UI: mlflow ui --backend-store-uri {settings.tracking_uri}   (then open http://127.0.0.1:5000)",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- the face detector's job


@dataclass
class DetectorJobResult:
    run_id: str
    model_dir: Path  # face_detector.keras and face_detector.onnx
    history: DetectorHistory | None  # None for a model trained elsewhere without its history.csv
    metrics_alone: dict  # the detector's own class opinion
    metrics_with_classifier: dict | None  # with the classifier (and class_fusion); None if none could be loaded
    classifier_uri: str
    wall_seconds: float
    input_side: int  # photos' longer side it was trained around and scored at


def run_detector_job(settings: Settings, trained: Path | None = None, classifier_uri: str | None = None,
                     run_name: str | None = None) -> DetectorJobResult:
    """Train the face detector on the training photos (or take one trained elsewhere, e.g. on a GPU machine),
    export it to ONNX, and score detection on the test photos, alone and with the classifier; one MLflow run."""
    from maskwatch.data import split_faces
    from maskwatch.detect import MaskDetector, Predictor, create_face_detector, for_evaluation
    from maskwatch.evaluate import evaluate_detection
    from maskwatch.train_detector import DetectorHistory, export_onnx, kept_epoch_metrics

    started = time.perf_counter()
    tracking.configure(settings)
    if trained is None:
        fetch_imagenet_weights()
    train_df, val_df, test_df = split_faces(settings)
    classifier_uri = classifier_uri or settings.serve.model_uri or settings.champion_uri
    trained_record, trained_config = _trained_elsewhere_record(trained)
    if trained_config:  # the run's detector_train params are the ones the model was trained with
        settings = settings.model_copy(update={"detector_train": trained_config})
    detector_tags = {"maskwatch.model": "face_detector"}
    with tracking.training_run(settings, run_name or "face-detector", tags=detector_tags) as run_id:
        model_dir = settings.work_dir / "runs" / run_id / "face_detector"
        model_dir.mkdir(parents=True, exist_ok=True)
        model_file, history = model_dir / "face_detector.keras", None
        tracking.log_metrics({f"photos_{name}": frame["image_path"].nunique()
                              for name, frame in (("train", train_df), ("val", val_df), ("test", test_df))})
        if trained:
            shutil.copy2(trained, model_file)
            tracking.set_tags({"trained_elsewhere": str(trained),
                               "detector_train_params": "train_config.json beside the model" if trained_record
                               else "this command's settings (no train_config.json beside the model)"})
            if trained_record:
                shutil.copy2(Path(trained).parent / TRAIN_RECORD, model_dir / TRAIN_RECORD)
            train_record = trained_record
            if (Path(trained).parent / "history.csv").is_file():  # the other machine's epochs, if it kept them
                history = DetectorHistory.from_frame(pd.read_csv(Path(trained).parent / "history.csv"))
                _write_detector_history(history, model_dir)
                _log_detector_history(history, model_dir)
                for step, record in enumerate(history.epochs, start=1):
                    tracking.log_epoch("detector", step, record)
        else:
            history, train_record = _fit_detector(settings, train_df, val_df, model_file,
                                                  tracking.epoch_logger_factory()("detector", 0))
            _log_detector_history(history, model_dir)
        if train_record:
            tracking.log_artifact(model_dir / TRAIN_RECORD, "face_detector")
            if train_record.get("best_epoch"):
                tracking.log_metrics({"detector_best_epoch": train_record["best_epoch"],
                                      **kept_epoch_metrics(history, train_record["best_epoch"])})
        if seen := detector_trained_on(model_file, test_df, pd.concat([train_df, val_df, test_df])):
            log.warning("the detector trained on %d of the %d test photos (or on copies of them): it was trained on "
                        "another split of the data, and its test figures here are optimistic", len(seen),
                        test_df["photo_id"].nunique())
            tracking.set_tags({"test_photos_the_detector_trained_on": len(seen)})
        onnx_file = export_onnx(model_file, model_dir / "face_detector.onnx")
        tracking.log_artifact(model_file, "face_detector")
        tracking.log_artifact(onnx_file, "face_detector")
        # Scored at the side it was trained around, whatever detector.trained_input_side says.
        input_side = settings.detector_train.input_side
        detector_config = for_evaluation(settings.detector.model_copy(update={
            "backend": "centernet", "trained_model_path": onnx_file, "trained_input_side": input_side}))
        face_detector = create_face_detector(detector_config)
        scoring = detection_scoring(settings, detector_config)
        alone = evaluate_detection(MaskDetector(None, face_detector), test_df, **scoring)
        log_detection_evaluation(alone, prefix="det_alone_", name="detection_alone")
        with_classifier = None
        try:
            predictor = Predictor.from_path(tracking.resolve_model_uri(classifier_uri, settings),
                                            settings.serve.runtime)
        except Exception as error:  # no champion yet, unknown alias, store down: the detector alone still counts
            log.warning("detection not scored with a classifier (%s): %s", classifier_uri, error)
        else:
            with_classifier = evaluate_detection(
                MaskDetector(predictor, face_detector, detector_config.class_fusion), test_df, **scoring)
            log_detection_evaluation(with_classifier)
        wall = time.perf_counter() - started
        tracking.log_metrics({"wall_seconds": wall})
    return DetectorJobResult(run_id, model_dir, history, alone, with_classifier, classifier_uri, wall, input_side)


def detector_trained_on(model_file: Path, split: pd.DataFrame, all_faces: pd.DataFrame) -> set[str]:
    """The photos of `split` that the detector beside its train_config.json trained on, through any copy of them;
    empty when it does not record its photos (trained before maskwatch 0.2)."""
    trained_on = recorded_training_photos(model_file)
    return photos_trained_on(split, all_faces, trained_on) if trained_on else set()


def _trained_elsewhere_record(trained: Path | None) -> tuple[dict | None, DetectorTrainConfig | None]:
    """train_config.json beside a detector trained elsewhere (train_face_detector writes it) and the training
    settings in it; (None, None) if there is none."""
    if not trained or not (Path(trained).parent / TRAIN_RECORD).is_file():
        return None, None
    path = Path(trained).parent / TRAIN_RECORD
    try:
        record = json.loads(path.read_text())
        return record, DetectorTrainConfig.model_validate(record["detector_train"])
    except (ValueError, KeyError, TypeError) as error:  # json and pydantic errors are ValueErrors
        from maskwatch.detect import DetectorModelError

        raise DetectorModelError(f"{path} is not a train_config.json that maskwatch wrote: {error}") from error


def detection_scoring(settings: Settings, detector_config: DetectorConfig) -> dict:
    """evaluate_detection's scoring arguments for one detector: the face score serving reports from (the
    confusion table's operating point), the face score's power in the per-class scores, and the interval."""
    from maskwatch.detect import ranking_face_score_power, reported_face_score

    return {"operating_face_score": reported_face_score(detector_config),
            "face_score_power": ranking_face_score_power(detector_config),
            "bootstrap_samples": settings.evaluate.detection_bootstrap_samples,
            "confidence_level": settings.evaluate.confidence_level}


def log_detection_evaluation(metrics: dict, prefix: str = "det_", name: str = "detection") -> None:
    """evaluate_detection's figures into the active run: flat metrics, the whole dict, the confusion table as a
    picture and as text."""
    tracking.log_metrics(detection_metric_values(metrics, prefix=prefix))
    tracking.log_dict(metrics, f"{name}_metrics.json")
    tracking.log_text(format_confusion(metrics["confusion"]), f"{name}_confusion.txt")
    with tempfile.TemporaryDirectory() as folder:
        tracking.log_artifact(plot_detection_confusion(metrics["confusion"], Path(folder) / f"{name}_confusion.png"))


def train_detector_only(settings: Settings, output_dir: Path) -> tuple[DetectorHistory, dict, Path]:
    """Train the face detector into output_dir and do nothing else: face_detector.keras, history.csv,
    training_curves.png and train_config.json, but no MLflow run, ONNX export or scoring. So it needs neither
    MLflow nor TensorFlow, and runs on a GPU machine with only Keras and JAX; `train-detector --trained` then
    exports, scores and logs the model where the rest is installed. Returns (history, train record, model file)."""
    from maskwatch.data import split_faces

    fetch_imagenet_weights()
    train_df, val_df, _ = split_faces(settings)  # the test photos stay unseen, as in run_detector_job
    model_file = Path(output_dir) / "face_detector.keras"
    history, record = _fit_detector(settings, train_df, val_df, model_file)
    return history, record, model_file


def _fit_detector(settings: Settings, train_df: pd.DataFrame, val_df: pd.DataFrame, model_file: Path,
                  extra_callbacks: list = ()) -> tuple[DetectorHistory, dict]:
    """train_face_detector on the split's photos, with history.csv and the curves written beside the model."""
    from maskwatch.train_detector import ValidationScoring, photos_from_faces, train_face_detector

    history, record = train_face_detector(photos_from_faces(train_df), photos_from_faces(val_df), model_file,
                                          settings.detector_train, extra_callbacks=extra_callbacks,
                                          val_scoring=ValidationScoring.of(settings.detector))
    _write_detector_history(history, model_file.parent)
    return history, record


def _write_detector_history(history: DetectorHistory, model_dir: Path) -> None:
    from maskwatch.train_detector import plot_history as plot_detector_history

    history.to_frame().to_csv(model_dir / "history.csv", index=False)
    plot_detector_history(history, model_dir / "training_curves.png")


def _log_detector_history(history, model_dir: Path) -> None:
    """Logs what _write_detector_history wrote into model_dir."""
    tracking.log_artifact(model_dir / "history.csv", "training")
    tracking.log_artifact(model_dir / "training_curves.png", "training")
    tracking.log_metrics({"seconds_per_epoch_detector": float(np.mean(history.epoch_seconds))})


def detector_summary_text(result: DetectorJobResult) -> str:
    from maskwatch.evaluate import format_detection_summary

    lines = ["", "=== maskwatch: face detector job finished ===",
             f"run id: {result.run_id}   wall time: {result.wall_seconds / 60:.1f} min",
             f"model: {result.model_dir / 'face_detector.onnx'}", "",
             "detector alone (its own class opinion), test photos:", format_detection_summary(result.metrics_alone)]
    if result.metrics_with_classifier:
        lines += ["", f"with the classifier {result.classifier_uri}:",
                  format_detection_summary(result.metrics_with_classifier)]
    lines += ["", "use it: --set detector.backend=centernet --set "
                  f"detector.trained_model_path={result.model_dir / 'face_detector.onnx'}"
                  f" (or MASKWATCH_DETECTOR_PATH) --set detector.trained_input_side={result.input_side}"]
    return "\n".join(lines)
