"""The `maskwatch` command line. Every command has --help; results go to stdout, progress to stderr."""

from __future__ import annotations

import json
import logging
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from maskwatch.config import PRESETS, Settings, load_settings, parse_dotted_overrides

app = typer.Typer(help="maskwatch: face-mask detection you can train, track, serve and run in real time.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
data_app = typer.Typer(help="Prepare and inspect the data set.", no_args_is_help=True)
models_app = typer.Typer(help="The MLflow model registry: list versions, promote one; the local model cache.",
                         no_args_is_help=True)
config_app = typer.Typer(help="Show the effective configuration.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")

ConfigOpt = Annotated[Optional[Path], typer.Option("--config", "-c", help="YAML file with config overrides.")]
PresetOpt = Annotated[str, typer.Option(help=f"Recipe preset: {', '.join(PRESETS)} (quick = minutes, not an hour).")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override one setting: section.key=value.")]
DataDirOpt = Annotated[Optional[Path], typer.Option(help="Data set folder (VOC or folder per class).")]
TrackingOpt = Annotated[Optional[str], typer.Option(help="MLflow tracking URI (default: SQLite mlflow.db here).")]
WorkDirOpt = Annotated[Optional[Path], typer.Option(help="Where crops, models and reports go (default ./artifacts).")]

def err(message: str) -> None:
    typer.echo(message, err=True)


class Runtime(str, Enum):
    keras = "keras"
    litert = "litert"
    litert_int8 = "litert_int8"
    onnx = "onnx"


class Split(str, Enum):
    test = "test"
    val = "val"


SplitOpt = Annotated[Split, typer.Option(
    help="The split to score: test (what results report) or val (what settings are chosen on).")]
ModelOpt = Annotated[Optional[str], typer.Option(
    help="Bundle folder, .keras file or models:/name@alias (default: the champion).")]
RuntimeOpt = Annotated[Optional[Runtime], typer.Option(help="Classifier runtime (exports: `maskwatch export`).")]


def _quiet_backends() -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # MLflow sets its logger's level from this when it is imported, after the setLevel below.
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("tensorflow", "absl", "mlflow", "alembic", "urllib3", "matplotlib", "PIL", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _settings(config: Path | None, preset: str, overrides: list[str] | None, data_dir: Path | None = None,
              tracking_uri: str | None = None, work_dir: Path | None = None) -> Settings:
    try:
        nested = parse_dotted_overrides(overrides or [])
        if data_dir:
            nested.setdefault("data", {})["source_dir"] = str(data_dir)
        if tracking_uri:
            nested.setdefault("tracking", {})["tracking_uri"] = tracking_uri
        if work_dir:
            nested.setdefault("paths", {})["work_dir"] = str(work_dir)
        return load_settings(config, preset, nested)
    except (ValueError, FileNotFoundError) as error:
        raise typer.BadParameter(str(error)) from error


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def _known_errors():
    from maskwatch.data import DataError
    from maskwatch.model import WeightsUnavailableError
    from maskwatch.tracking import TrackingUnavailableError

    return (DataError, TrackingUnavailableError, WeightsUnavailableError, FileNotFoundError)


@app.callback()
def main() -> None:
    """maskwatch: face-mask detection you can train, track, serve and run in real time."""
    _quiet_backends()


@data_app.command("prepare")
def data_prepare(config: ConfigOpt = None, preset: PresetOpt = "full", set_: SetOpt = None,
                 data_dir: DataDirOpt = None, work_dir: WorkDirOpt = None) -> None:
    """Parse, validate, crop and split the data set (a scene's copies and burst shots stay in one split); write
    the data report (counts, sizes, sample grid, similar photos)."""
    from maskwatch.data import class_counts_table, prepare_data

    settings = _settings(config, preset, set_, data_dir, work_dir=work_dir)
    try:
        prepared, scan = prepare_data(settings)
    except _known_errors() as error:
        _fail(str(error))
    typer.echo(class_counts_table(prepared.train_df, prepared.val_df, prepared.test_df).to_string())
    typer.echo(f"issues: {scan.issue_counts() or 'none'}")
    if scenes := prepared.report["similar_photos"]:
        typer.echo(f"similar photos: {sum(map(len, scenes))} photos in {len(scenes)} scenes (copies, burst shots), "
                   "each scene kept in one split: similar_photos.png")
    typer.echo(f"data hash: {prepared.data_hash}")
    typer.echo(f"crops: {prepared.output_dir}")
    typer.echo(f"report: {settings.work_dir / 'reports' / 'data'}")


@app.command()
def train(config: ConfigOpt = None, preset: PresetOpt = "full", set_: SetOpt = None, data_dir: DataDirOpt = None,
          tracking_uri: TrackingOpt = None, work_dir: WorkDirOpt = None,
          single_phase: Annotated[bool, typer.Option(help="One phase of 30 epochs instead of two.")] = False,
          run_name: Annotated[Optional[str], typer.Option(help="MLflow run name.")] = None) -> None:
    """The main job: prepare data, train (two phases), evaluate, log to MLflow, register, promote if better."""
    from maskwatch.pipeline import run_job, summary_text

    settings = _settings(config, preset, set_, data_dir, tracking_uri, work_dir)
    if single_phase:
        settings.train.two_phase = False
    try:
        result = run_job(settings, run_name)
    except _known_errors() as error:
        _fail(str(error))
    typer.echo(summary_text(result, settings))


@app.command("train-detector")
def train_detector_command(
        config: ConfigOpt = None, preset: PresetOpt = "full", set_: SetOpt = None, data_dir: DataDirOpt = None,
        tracking_uri: TrackingOpt = None, work_dir: WorkDirOpt = None,
        trained: Annotated[Optional[Path], typer.Option(
            help="Skip training: export and score this face_detector.keras (e.g. trained on a GPU machine); "
                 "history.csv and train_config.json beside it are logged too.")] = None,
        model: ModelOpt = None,
        run_name: Annotated[Optional[str], typer.Option(help="MLflow run name.")] = None,
        train_only: Annotated[Optional[Path], typer.Option(
            "--train-only", help="Only train, into this folder (face_detector.keras, history.csv, train_config.json): "
                                 "no MLflow run, ONNX export or scoring, so neither MLflow nor TensorFlow is needed "
                                 "(KERAS_BACKEND=jax on a GPU machine). Bring the model back with --trained.")] = None,
) -> None:
    """Train the face-mask detector on the data set's photos, export it to ONNX, score detection, log to MLflow.

    Use it with --set detector.backend=centernet --set detector.trained_model_path=.../face_detector.onnx.
    About 7 minutes on one H100 (194 epochs); hours on 2 CPU cores: there --preset quick is a smoke run, and
    --set detector_train.time_budget_s=N ends a run in N seconds with its learning rate fully decayed.
    """
    from maskwatch.detect import DetectorModelError
    from maskwatch.pipeline import detector_summary_text, run_detector_job

    settings = _settings(config, preset, set_, data_dir, tracking_uri, work_dir)
    if trained is not None and not trained.is_file():
        _fail(f"no trained detector at {trained}")
    if trained is None and settings.detector_train.initial_model is not None:
        from maskwatch.train_detector import check_initial_model

        try:
            check_initial_model(settings.detector_train.initial_model)
        except FileNotFoundError as error:
            _fail(str(error))
    if train_only is not None:
        if trained is not None:
            _fail("--train-only trains a detector and --trained takes one trained elsewhere: give one of them")
        if (train_only / "face_detector.keras").exists():  # hours of GPU time are not overwritten silently
            _fail(f"{train_only} already holds a trained detector (face_detector.keras): give another folder "
                  "or move it away first")
        _train_detector_only(settings, train_only)
        return
    try:
        result = run_detector_job(settings, trained=trained, classifier_uri=model, run_name=run_name)
    except (DetectorModelError, *_known_errors()) as error:
        _fail(str(error))
    typer.echo(detector_summary_text(result))


def _train_detector_only(settings: Settings, output_dir: Path) -> None:
    from maskwatch.detect import DetectorModelError
    from maskwatch.pipeline import train_detector_only

    try:
        history, record, model_file = train_detector_only(settings, output_dir)
    except (DetectorModelError, *_known_errors()) as error:
        _fail(str(error))
    typer.echo(f"trained {len(history.epochs)} epochs ({record['backend']} backend), kept epoch "
               f"{record['best_epoch']}: {model_file}\nexport, score and log it where MLflow and TensorFlow are "
               f"installed: maskwatch train-detector --trained {model_file}")


@app.command()
def evaluate(model: ModelOpt = None,
             as_json: Annotated[bool, typer.Option("--json", help="Print metrics as JSON on stdout.")] = False,
             detection: Annotated[bool, typer.Option(
                 "--detection", help="Face detector + classifier on the split's photos: AP@0.5, mAP, recall by size, "
                              "face AP, mAP with true classes and a confusion table (missed faces, false alarms).")]
             = False,
             split: SplitOpt = Split.test,
             config: ConfigOpt = None, preset: PresetOpt = "full", set_: SetOpt = None, data_dir: DataDirOpt = None,
             tracking_uri: TrackingOpt = None, work_dir: WorkDirOpt = None) -> None:
    """Evaluate a model on the test split (or --split val): accuracy, per-class metrics, macro-F1, recall
    intervals; with --detection, detector + classifier on the split's photos."""
    import keras

    from maskwatch.bundle import bundle_paths, read_metadata
    from maskwatch.evaluate import evaluate_model, format_summary

    settings = _settings(config, preset, set_, data_dir, tracking_uri, work_dir)
    uri = model or settings.champion_uri
    bundle, prepared = _model_and_data(settings, uri)
    model_file, _ = bundle_paths(bundle)
    faces = prepared.split(split.value)
    _warn_if_trained_on(bundle, prepared.all_faces, faces, split.value)
    if detection:
        _warn_if_detector_trained_on(settings, prepared.all_faces, faces, split.value)
        _evaluate_detection(settings, bundle, uri, prepared, faces, split.value, as_json)
        return
    result, _ = evaluate_model(keras.models.load_model(model_file), faces,
                               bootstrap_samples=settings.evaluate.bootstrap_samples,
                               confidence_level=settings.evaluate.confidence_level,
                               class_log_bias=read_metadata(bundle).thresholds.get("class_log_bias"))
    if as_json:
        sys.stdout.write(json.dumps({"model": uri, "split": split.value, "data_hash": prepared.data_hash,
                                     **result.to_dict()}, indent=2) + "\n")
    else:
        typer.echo(format_summary(result, split=split.value))


def _warn_if_trained_on(bundle: Path, all_faces, faces, split: str) -> None:
    """A model trained on another split of the data (another seed, fractions or data set version) may have
    learnt some of this split's photos: its figures here would look better than they are."""
    from maskwatch.bundle import read_trained_on
    from maskwatch.data import photos_trained_on

    trained_on = read_trained_on(bundle)
    if trained_on is None:
        return
    if seen := photos_trained_on(faces, all_faces, trained_on):
        typer.secho(f"warning: {len(seen)} of the {faces['photo_id'].nunique()} {split} photos are photos this "
                    "model trained on, or copies and burst shots of them: its figures here are optimistic. It was "
                    "trained on another split of the data (the seed, the fractions or the data set differ)",
                    fg="yellow", err=True)


def _warn_if_detector_trained_on(settings: Settings, all_faces, faces, split: str) -> None:
    """The same for a trained face detector, whose train_config.json lists the photos it trained on."""
    if settings.detector.backend != "centernet" or settings.detector.trained_model_path is None:
        return
    from maskwatch.pipeline import detector_trained_on

    if seen := detector_trained_on(settings.detector.trained_model_path, faces, all_faces):
        typer.secho(f"warning: the face detector trained on {len(seen)} of the {faces['photo_id'].nunique()} "
                    f"{split} photos, or on copies of them: its figures here are optimistic", fg="yellow", err=True)


def _evaluate_detection(settings: Settings, bundle: Path, uri: str, prepared, faces, split: str,
                        as_json: bool) -> None:
    from maskwatch import tracking
    from maskwatch.detect import DetectorModelError, MaskDetector, Predictor, create_face_detector, for_evaluation
    from maskwatch.evaluate import evaluate_detection, format_detection_summary
    from maskwatch.pipeline import detection_scoring, log_detection_evaluation

    try:
        mask_detector = MaskDetector(Predictor.from_path(bundle, settings.serve.runtime),
                                     create_face_detector(for_evaluation(settings.detector)),
                                     settings.detector.class_fusion)
    except DetectorModelError as error:
        _fail(str(error))
    metrics = evaluate_detection(mask_detector, faces, **detection_scoring(settings, settings.detector))
    metrics.update(model=uri, split=split, data_hash=prepared.data_hash,
                   detector=settings.detector.model_dump(mode="json"))
    try:  # logged to MLflow beside the classification metrics, as its own run
        with tracking.evaluation_run(settings, "detection",
                                     {"data_hash": prepared.data_hash, "model": uri, "split": split}):
            log_detection_evaluation(metrics)
    except tracking.TrackingUnavailableError as error:
        typer.secho(f"warning: metrics not logged: {error}", fg="yellow", err=True)
    if as_json:
        sys.stdout.write(json.dumps(metrics, indent=2) + "\n")
    else:
        typer.echo(format_detection_summary(metrics))


@app.command()
def predict(images: Annotated[list[Path], typer.Argument(
                help="Photos to analyse, or folders: every photo in them and their subfolders (files with other "
                     "suffixes are named and skipped).")],
            model: ModelOpt = None,
            as_json: Annotated[bool, typer.Option("--json", help="Print detections as JSON.")] = False,
            output: Annotated[Optional[Path], typer.Option(
                help="Write annotated images: a file (one input) or a folder (a folder's photos keep their "
                     "subfolders).")] = None,
            runtime: RuntimeOpt = None,
            config: ConfigOpt = None, set_: SetOpt = None, tracking_uri: TrackingOpt = None) -> None:
    """Find faces in photos and classify each: boxes, labels, scores, and the faces counted by label."""
    from collections import Counter

    from tqdm.auto import tqdm

    from maskwatch.detect import draw_detections
    from maskwatch.preprocessing import ImageDecodeError, read_image

    photos = _photos_to_predict(images)
    mask_detector = _mask_detector(_settings(config, "full", set_, tracking_uri=tracking_uri), model, runtime)
    report, labels, failed = {}, Counter(), 0
    # A bar on a terminal only: in a log its redraws would interleave with the per-photo lines.
    progress = tqdm(photos, desc="photos", unit="photo", disable=len(photos) < 2 or not sys.stderr.isatty())
    for path, name in progress:
        try:
            image = read_image(path)
        except ImageDecodeError as error:
            with tqdm.external_write_mode(file=sys.stderr):  # above the progress bar, coloured on a terminal
                typer.secho(f"error: {error}", fg="red", err=True)
            failed += 1
            continue
        detections = mask_detector.detect(image)
        report[str(path)] = [d.to_dict() for d in detections]
        labels.update(d.label for d in detections)
        if output is not None:
            _write_annotated(draw_detections(image, detections), name, output, len(photos))
        if not as_json:
            progress.write(f"{path}: {len(detections)} face(s)")
            for d in detections:
                progress.write(f"  {d.label:<22} {d.score:.3f}  box={list(d.box)}  face={d.face_score:.2f}")
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    elif len(photos) > 1:
        counts = ", ".join(f"{label} {labels[label]}" for label in mask_detector.class_names)
        typer.echo(f"{len(report)} photo(s), {sum(labels.values())} face(s): {counts}"
                   + (f"; {failed} unreadable" if failed else ""))
    if failed:
        raise typer.Exit(1)


def _photos_to_predict(paths: list[Path]) -> list[tuple[Path, Path]]:
    """(photo, the name of its annotated copy) for each input: a file by its name, and a folder's photos by their
    path inside it. Names that would still clash (a/photo.jpg and b/photo.jpg given one by one) become the
    paths below the folder the clashing photos share, so that no annotated copy overwrites another."""
    from collections import defaultdict

    from maskwatch.preprocessing import IMAGE_SUFFIXES, is_photo, visible_files

    photos = []
    for path in paths:
        if not path.exists():  # before the model loads: seconds spent on a typo
            _fail(f"{path}: no such file or folder")
        if not path.is_dir():
            photos.append((path, Path(path.name)))
            continue
        files = visible_files(path)  # one walk: the photos (images_in's), and the rest to name as skipped
        found = [file for file in files if is_photo(file)]
        if not found:
            _fail(f"{path}: no photos in this folder (looked for {', '.join(IMAGE_SUFFIXES)})")
        _note_skipped(path, [file for file in files if not is_photo(file)])
        photos += [(photo, photo.relative_to(path)) for photo in found]
    resolved = [photo.resolve() for photo, _ in photos]
    by_name = defaultdict(set)
    for (_, name), real in zip(photos, resolved):
        by_name[name].add(real)
    renamed = {}
    for clashing in by_name.values():
        if len(clashing) > 1:
            shared = Path(os.path.commonpath(clashing))
            renamed.update({real: real.relative_to(shared) for real in clashing})
    return [(photo, renamed.get(real, name)) for (photo, name), real in zip(photos, resolved)]


def _note_skipped(folder: Path, others: list[Path]) -> None:
    """Says which files of a folder are not read for their suffix, so that a .gif or .heic is not lost unseen."""
    from maskwatch.preprocessing import IMAGE_SUFFIXES

    skipped = [path.relative_to(folder).as_posix() for path in others]
    if skipped:
        shown = ", ".join(skipped[:3]) + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        err(f"{folder}: skipped {len(skipped)} file(s) that are not photos by their suffix ({shown}); "
            f"photos are {', '.join(IMAGE_SUFFIXES)}")


def _mask_detector(settings: Settings, model: str | None, runtime: Runtime | None):
    """Face detector + classifier for inference commands, with every loading failure as a clear error."""
    from maskwatch.detect import DetectorModelError, MaskDetector

    if runtime:
        settings.serve.runtime = runtime.value
    try:
        return MaskDetector.from_settings(settings, model)
    except (DetectorModelError, *_known_errors()) as error:
        _fail(str(error))
    except Exception as error:  # MLflow's own errors for an unknown model or alias
        _fail(f"cannot load model: {error}")


def _write_annotated(image, name: Path, output: Path, count: int) -> None:
    import cv2

    target = output / name.parent / f"{name.stem}_annotated.jpg" if (count > 1 or output.is_dir()) else output
    target.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(target), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


@app.command()
def serve(model: ModelOpt = None,
          host: Annotated[Optional[str], typer.Option(help="Address to bind (default 127.0.0.1).")] = None,
          port: Annotated[Optional[int], typer.Option(help="Port (default 8000).")] = None,
          workers: Annotated[Optional[int], typer.Option(help="gunicorn worker processes.")] = None,
          dev: Annotated[bool, typer.Option("--dev", help="Flask's development server instead of gunicorn.")] = False,
          runtime: RuntimeOpt = None,
          config: ConfigOpt = None, set_: SetOpt = None, tracking_uri: TrackingOpt = None) -> None:
    """Serve the API and web page with gunicorn (one model per worker)."""
    import tempfile

    from maskwatch.bundle import pin_bundle
    from maskwatch.serve import create_app, gunicorn_command, run_server, serve_environment

    settings = _settings(config, "full", set_, tracking_uri=tracking_uri)
    if runtime:
        settings.serve.runtime = runtime.value
    bind_host, bind_port = host or settings.serve.host, port or settings.serve.port
    if dev:
        create_app(settings, model_uri=model).run(host=bind_host, port=bind_port, threaded=True)
        return
    # Resolved once here, not by every worker: workers load a local bundle and never race on the registry.
    model_uri = model or settings.serve.model_uri or settings.champion_uri
    bundle = _resolve_bundle(settings, model_uri)
    _check_servable(settings, bundle)
    with tempfile.TemporaryDirectory(prefix="maskwatch-serve-") as run_dir:
        if model_uri.startswith(("models:/", "runs:/")):
            # gunicorn loads the bundle again for every worker it restarts, so it must outlive the model cache's
            # copy, which a later fetch with new files (maskwatch export) deletes.
            bundle = pin_bundle(bundle, Path(run_dir) / "model")
        settings.serve.workers = workers or settings.serve.workers  # workers size their thread slice from it
        control_socket = Path(run_dir) / "gunicorn.ctl"  # in this server's private folder: its own
        command = gunicorn_command(f"{bind_host}:{bind_port}", settings.serve.workers, settings.serve.worker_class,
                                   str(control_socket))
        err(f"serving {bundle} on http://{bind_host}:{bind_port} with {' '.join(command[2:])}")
        err(f"manage its workers with: gunicornc -s {control_socket}")
        metrics_dir = Path(run_dir) / "metrics"
        metrics_dir.mkdir()
        status = run_server(command, serve_environment(settings, str(bundle), str(metrics_dir)))
    raise typer.Exit(status)


def _check_servable(settings: Settings, bundle: Path) -> None:
    """The files every worker loads, checked once before gunicorn starts: workers that cannot load their model or
    face detector leave a server that answers /health and 503 for ever (a missing or damaged export, model.keras,
    YuNet or bundle)."""
    from maskwatch.bundle import bundle_paths, read_metadata
    from maskwatch.detect import ClassifierModelError, DetectorModelError, check_classifier_file, create_face_detector

    try:
        metadata = read_metadata(bundle)
        check_classifier_file(bundle_paths(bundle)[0], settings.serve.runtime, metadata.input_size)
        create_face_detector(settings.detector, num_threads=1)
    except (ClassifierModelError, DetectorModelError, ValueError, *_known_errors()) as error:
        _fail(str(error))


def _resolve_bundle(settings: Settings, uri: str) -> Path:
    """A local bundle folder for a path or registry URI; any failure is a clear error, never a traceback."""
    from maskwatch import tracking

    try:
        return tracking.resolve_model_uri(uri, settings)
    except _known_errors() as error:
        _fail(str(error))
    except Exception as error:  # MLflow's own errors for an unknown model or alias
        _fail(f"cannot load model {uri}: {error}")


def _model_and_data(settings: Settings, uri: str):
    """(bundle, prepared data) with the data cropped the way that model was trained (settings.data follows it)."""
    from maskwatch.bundle import read_metadata
    from maskwatch.data import data_config_for, prepare_data

    bundle = _resolve_bundle(settings, uri)
    try:  # read_metadata also refuses a folder without model.keras ("no model at ...")
        settings.data = data_config_for(settings.data, read_metadata(bundle).crop_spec)
        prepared, _ = prepare_data(settings)
    except _known_errors() as error:
        _fail(str(error))
    return bundle, prepared


@app.command()
def webcam(source: Annotated[str, typer.Option(help="Camera index (0), video file, or stream URL.")] = "0",
           model: ModelOpt = None,
           display: Annotated[bool, typer.Option(help="Show a window (needs OpenCV with GUI support).")] = True,
           output: Annotated[Optional[Path], typer.Option(help="Write the annotated video (.mp4).")] = None,
           json_out: Annotated[Optional[Path], typer.Option(
               "--json", help="Write per-frame detections as JSON lines.")] = None,
           max_frames: Annotated[Optional[int], typer.Option(help="Stop after this many frames.")] = None,
           runtime: RuntimeOpt = None,
           config: ConfigOpt = None, set_: SetOpt = None, tracking_uri: TrackingOpt = None) -> None:
    """Detect masks live in a camera, video file or stream; q or Ctrl-C stops. Prints FPS and stage timings.

    Faces are followed from frame to frame (track_id in --json) and their labels steadied over frames:
    --set realtime.smoothing=0 judges every frame alone."""
    from maskwatch.realtime import FaceTracker, VideoSourceError, parse_source, run_video

    settings = _settings(config, "full", set_, tracking_uri=tracking_uri)
    mask_detector = _mask_detector(settings, model, runtime)
    try:
        summary = run_video(mask_detector, parse_source(source), display=display, output=output, json_path=json_out,
                            max_frames=max_frames, tracker=FaceTracker(settings.realtime),
                            stream_timeout_s=settings.realtime.stream_timeout_s)
    except VideoSourceError as error:
        _fail(str(error))
    err(summary.to_text())


@app.command("export")
def export_command(
        model: Annotated[Optional[str], typer.Option(
            help="Bundle folder or models:/name@alias (default: the champion).")] = None,
        formats: Annotated[Optional[list[str]], typer.Option(
            "--format", help="litert (float), litert_int8 (calibrated on training crops) or onnx; repeatable. "
                             "Default: all three.")] = None,
        check: Annotated[bool, typer.Option(help="Parity with Keras on the test crops.")] = True,
        config: ConfigOpt = None, set_: SetOpt = None, data_dir: DataDirOpt = None, tracking_uri: TrackingOpt = None,
        work_dir: WorkDirOpt = None) -> None:
    """Export the classifier for fast inference (LiteRT float/int8, ONNX) into the model bundle."""
    from maskwatch import tracking
    from maskwatch.export import EXPORT_FILES, export_model, parity_report

    formats = formats or list(EXPORT_FILES)
    unknown = [f for f in formats if f not in EXPORT_FILES]
    if unknown:
        _fail(f"unknown format(s) {unknown}; choose from {', '.join(EXPORT_FILES)}")
    settings = _settings(config, "full", set_, data_dir, tracking_uri, work_dir)
    uri = model or settings.champion_uri
    bundle, prepared = _model_and_data(settings, uri)
    results = export_model(bundle, formats, prepared.train_df, prepared.val_df)
    for result in results:
        kept = f"  ({len(result.float_layers)} layer(s) kept in float)" if result.float_layers else ""
        typer.echo(f"{result.runtime:<12} {result.size_bytes / 1e6:6.1f} MB  {result.path}{kept}")
    if uri.startswith(("models:/", "runs:/")):
        run_id = tracking.attach_to_registered_model(uri, settings, [r.path for r in results])
        typer.echo(f"attached to {uri} (run {run_id}): serve it with --runtime {results[0].runtime}")
    if check:
        report = parity_report(bundle, prepared.test_df, formats)
        typer.echo(f"parity on {len(prepared.test_df)} test crops (agreement with Keras, max |p - p_keras|, macro-F1):")
        for runtime, values in report.items():
            typer.echo(f"  {runtime:<12} {values['agreement']:.4f}  {values['max_abs_diff']:.5f}  "
                       f"{values['macro_f1']:.4f}")
        (bundle / "export_parity.json").write_text(json.dumps(report, indent=2))


@models_app.command("list")
def models_list(config: ConfigOpt = None, tracking_uri: TrackingOpt = None,
                as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """List registered versions with their aliases and test metrics."""
    from maskwatch import tracking

    settings = _settings(config, "full", None, tracking_uri=tracking_uri)
    if (store := tracking.missing_store(settings)) and not as_json:
        typer.echo(f"no tracking store at {store} yet: run `maskwatch train`, or point --tracking-uri at one")
        return
    try:
        rows = [] if store else tracking.list_versions(settings)
    except _known_errors() as error:
        _fail(str(error))
    def line(row: dict) -> str:
        f1 = f"{row['test_macro_f1']:.4f}" if row["test_macro_f1"] is not None else "-"
        acc = f"{row['test_accuracy']:.4f}" if row["test_accuracy"] is not None else "-"
        return f"{row['version']:>8}  {','.join(row['aliases']) or '-':<12}{f1:>14}{acc:>14}  {row['run_id']}"

    _echo_rows(rows, as_json, f"no versions of '{settings.tracking.registered_model_name}' yet: run `maskwatch train`",
               f"{'version':>8}  {'aliases':<12}{'test_macro_f1':>14}{'test_accuracy':>14}  run_id", line)


def _echo_rows(rows: list[dict], as_json: bool, when_empty: str, header: str, line) -> None:
    """A listing command's output: the rows as JSON with --json, else `when_empty` or a header and a line each."""
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
    elif not rows:
        typer.echo(when_empty)
    else:
        typer.echo(header)
        for row in rows:
            typer.echo(line(row))


@models_app.command("promote")
def models_promote(version: Annotated[str, typer.Argument(help="Registered version to give the champion alias.")],
                   config: ConfigOpt = None, tracking_uri: TrackingOpt = None) -> None:
    """Give VERSION the champion alias by hand."""
    from maskwatch import tracking

    settings = _settings(config, "full", None, tracking_uri=tracking_uri)
    if store := tracking.missing_store(settings):
        _fail(f"there is no tracking store at {store}, so no version {version} to promote: point --tracking-uri "
              "at the store that holds it")
    try:
        tracking.configure(settings)
    except _known_errors() as error:
        _fail(str(error))
    if not tracking.version_exists(settings, version):
        _fail(f"'{settings.tracking.registered_model_name}' has no version {version}")
    tracking.promote(settings, version)
    name, alias = settings.tracking.registered_model_name, settings.tracking.champion_alias
    typer.echo(f"{name} version {version} is now @{alias}")


@models_app.command("register")
def models_register(
        run_folder: Annotated[Path, typer.Argument(
            help="A training run's folder (artifacts/runs/<run id>) whose tracking server was gone when it ended.")],
        config: Annotated[Optional[Path], typer.Option(
            "--config", "-c", help="YAML settings (default: the run's own, model/config.yaml).")] = None,
        set_: SetOpt = None, tracking_uri: TrackingOpt = None) -> None:
    """Record a training job its tracking server missed: its run folder's files and model go to its MLflow run,
    and the model is registered, compared with the champion and promoted if better, as the job would have."""
    from maskwatch.bundle import CONFIG_FILE, RUN_BUNDLE_FOLDER
    from maskwatch.pipeline import record_run_folder

    own_config = run_folder / RUN_BUNDLE_FOLDER / CONFIG_FILE
    settings = _settings(config or (own_config if own_config.is_file() else None), "full", set_,
                         tracking_uri=tracking_uri)
    try:
        run_id, decision = record_run_folder(settings, run_folder)
    except (*_known_errors(), ValueError) as error:
        _fail(str(error))
    typer.echo(f"MLflow run {run_id} recorded; {settings.tracking.registered_model_name} version {decision.version}, "
               f"promoted={decision.promoted} ({decision.reason})")


@models_app.command("cache")
def models_cache(clear: Annotated[bool, typer.Option("--clear", help="Delete every cached model.")] = False,
                 keep: Annotated[Optional[int], typer.Option(
                     min=0, help="Delete all but this many, the most recently used.")] = None,
                 as_json: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False) -> None:
    """List the registry models fetched into the cache (~/.cache/maskwatch/models, MASKWATCH_CACHE_DIR), most
    recently used first, or delete them; a deleted model is fetched again when next loaded. A pinned version in
    the cache (models:/maskwatch/3) still loads while its tracking server is down."""
    from maskwatch import tracking
    from maskwatch.config import cache_dir

    if clear and keep is not None:
        _fail("--clear deletes every model and --keep all but some: give one")
    if clear or keep is not None:
        entries, megabytes = tracking.clear_model_cache(keep or 0)
        typer.echo(f"deleted {entries} cached models ({megabytes:.1f} MB) from {cache_dir() / 'models'}")
        return

    def line(row: dict) -> str:
        model_uri, store = row["uri"] or f"run {row['run_id'] or '-'}", row["tracking_uri"] or "-"
        return f"{model_uri:<28}  {row['mb']:>6.1f}  {row['last_used']:<16}  {store:<28}  {row['entry']}"

    _echo_rows(tracking.cached_models(), as_json, f"no models cached in {cache_dir() / 'models'}",
               f"{'model':<28}  {'MB':>6}  {'last used':<16}  {'from':<28}  entry", line)


@config_app.command("show")
def config_show(config: ConfigOpt = None, preset: PresetOpt = "full", set_: SetOpt = None) -> None:
    """Print the effective configuration as YAML (defaults < preset < file < environment < --set)."""
    typer.echo(_settings(config, preset, set_).to_yaml())


if __name__ == "__main__":
    app()
