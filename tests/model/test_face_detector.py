"""The trained face detector: network shape, loss, overfitting one batch, ONNX export, and the CLI job."""

import json
import subprocess
import sys
import warnings
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import tooling_warnings

from maskwatch import centernet
from maskwatch.config import DetectorConfig, DetectorTrainConfig, load_settings
from maskwatch.data import split_faces
from maskwatch.train_detector import (build_face_detector, detection_loss, encode_targets, letterboxed_sample,
                                      photos_from_faces)

MASKWATCH = str(Path(sys.executable).parent / "maskwatch")


@pytest.fixture(scope="module")
def two_photos(data_dir):
    settings = load_settings(overrides={"data": {"source_dir": str(data_dir)}}, environ={})
    train, _, _ = split_faces(settings)
    picks = sorted(train.photo_id.unique())[:2]
    photos = photos_from_faces(train[train.photo_id.isin(picks)], progress=False)
    images, targets = [], []
    for image, boxes, labels in zip(photos.images, photos.boxes, photos.labels):
        canvas, scaled = letterboxed_sample(image, boxes, 256)
        images.append(canvas)
        targets.append(encode_targets(scaled, labels, 64, 64))
    return np.stack(images).astype("float32"), np.stack(targets), photos


def test_network_maps_any_multiple_of_32_to_stride_4_heads():
    model = build_face_detector(weights=None)
    out = keras.ops.convert_to_numpy(model(np.zeros((1, 96, 160, 3), "float32")))
    assert out.shape == (1, 24, 40, centernet.OUTPUT_CHANNELS)
    assert (out[..., :4] > 0).all() and (out[..., :4] < 0.2).all()  # heat maps start near "no face"
    assert ((out[..., centernet.OFFSET_CHANNELS] >= 0) & (out[..., centernet.OFFSET_CHANNELS] <= 1)).all()


def test_loss_is_lower_for_the_right_answer(two_photos):
    _, targets, _ = two_photos
    perfect = targets[..., :centernet.OUTPUT_CHANNELS]
    rng = np.random.default_rng(0)
    noisy = perfect.copy()
    noisy[..., :4] = rng.uniform(0.0, 0.3, noisy[..., :4].shape)
    right = keras.ops.convert_to_numpy(detection_loss(targets, perfect))
    wrong = keras.ops.convert_to_numpy(detection_loss(targets, noisy))
    assert right.shape == (2,) and (right < 0.05).all() and (wrong > 10 * right.max() + 1).all()


def test_class_weights_scale_only_their_class_heat_map(two_photos):
    _, targets, _ = two_photos
    wrong_class = targets[..., :centernet.OUTPUT_CHANNELS].copy()
    wrong_class[..., 3] = 0.5  # the incorrect-mask map is wrong everywhere; everything else is right
    plain = keras.ops.convert_to_numpy(detection_loss(targets, wrong_class))
    heavy = keras.ops.convert_to_numpy(detection_loss(targets, wrong_class, class_weights=(1.0, 1.0, 4.0)))
    light = keras.ops.convert_to_numpy(detection_loss(targets, wrong_class, class_weights=(4.0, 4.0, 1.0)))
    np.testing.assert_allclose(heavy, 4 * plain, rtol=0.02)  # nearly all of the loss sits in that map
    np.testing.assert_allclose(light, plain, rtol=0.02)


def test_frozen_backbone_batchnorm_stays_in_inference_mode():
    model = build_face_detector(weights=None, backbone_batchnorm="frozen")
    backbone = model.get_layer("backbone")
    norms = [layer for layer in backbone.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(norms) == 52 and not any(layer.trainable for layer in norms)
    assert model.get_layer("smooth_4_bn").trainable  # the new pyramid's own norms still learn
    assert all(layer.trainable for layer in build_face_detector(weights=None).get_layer("backbone").layers
               if isinstance(layer, keras.layers.BatchNormalization))
    with pytest.raises(ValueError, match="backbone_batchnorm"):
        build_face_detector(weights=None, backbone_batchnorm="sometimes")


@pytest.mark.slow  # 80 s; the classifier's own overfit check (tests/model/test_model.py) stays in the default tier
def test_overfits_one_batch(two_photos):
    """Two real photos, 60 steps: the loss falls by far and the decoded peaks land on the annotated faces."""
    images, targets, photos = two_photos
    keras.utils.set_random_seed(0)
    model = build_face_detector()
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss=detection_loss)
    history = model.fit(images, targets, batch_size=2, epochs=60, verbose=0).history["loss"]
    assert history[-1] < 0.2 * history[0], history[::10]
    # Batch statistics, as in the steps: 60 steps are too few for BatchNormalization's moving averages.
    heads = keras.ops.convert_to_numpy(model(images, training=True))
    from maskwatch.preprocessing import box_iou

    matched = total = 0
    for i, (image, boxes) in enumerate(zip(photos.images, photos.boxes)):
        _, scale = centernet.letterbox(image, 256)
        found, _, _ = centernet.decode(heads[i], scale, score_threshold=0.2)
        total += len(boxes)
        matched += sum(int((box_iou(box, found) >= 0.5).any()) for box in boxes)
    assert matched >= 0.7 * total, (matched, total)


@pytest.fixture(scope="module")
def photos_of_every_class(data_dir):
    """Four training photos between them showing all three classes."""
    settings = load_settings(overrides={"data": {"source_dir": str(data_dir)}}, environ={})
    train, _, _ = split_faces(settings)
    picks = {photo for label in ("mask_weared_incorrect", "without_mask")
             for photo in sorted(train[train.label == label].photo_id.unique())[:2]}
    return photos_from_faces(train[train.photo_id.isin(picks)], progress=False)


class _Replay:
    """A stand-in network for validation_map: the given maps, one per photo in turn, then blank maps for the
    blank canvases that pad a short last batch. It records the shape of each batch it is given."""

    def __init__(self, heads: list[np.ndarray], side: int):
        self.heads, self.side, self.shapes = iter(heads), side, []
        self.blank = np.zeros_like(heads[0])

    def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
        assert images.shape[1:] == (self.side, self.side, 3)
        self.shapes.append(images.shape)
        return np.stack([next(self.heads, self.blank) for _ in range(len(images))])


def _replayed_heads(photos, side: int, scramble_classes: bool = False, true_class_share: float = 1.0,
                    face_scales=None) -> _Replay:
    """A stand-in network that outputs the encoded targets of each val photo in turn (a perfect detector), or
    with the class maps rotated (it finds every face and names every one wrongly). `true_class_share` < 1
    mixes the rotated maps in (each face: its class at that share, the next class at the rest);
    `face_scales` scales each photo's face map (how sure the detector is of that photo's faces)."""
    heads = []
    for i, (image, boxes, labels) in enumerate(zip(photos.images, photos.boxes, photos.labels)):
        _, scaled = letterboxed_sample(image, boxes, side)
        target = encode_targets(scaled, labels, side // centernet.STRIDE, side // centernet.STRIDE)
        head = target[..., :centernet.OUTPUT_CHANNELS].copy()
        true_maps = head[..., centernet.CLASS_CHANNELS]
        rotated = np.roll(true_maps, 1, axis=-1)
        head[..., centernet.CLASS_CHANNELS] = rotated if scramble_classes else (
            true_class_share * true_maps + (1 - true_class_share) * rotated)
        if face_scales is not None:
            head[..., centernet.FACE_CHANNEL] *= face_scales[i]
        heads.append(head)
    return _Replay(heads, side)


def test_validation_map_scores_what_the_network_outputs(photos_of_every_class):
    from maskwatch.train_detector import ValidationScoring, validation_map

    photos = photos_of_every_class
    assert {int(c) for labels in photos.labels for c in labels} == {0, 1, 2}
    scoring = ValidationScoring(score_threshold=0.05)
    replay = _replayed_heads(photos, 640)
    perfect = validation_map(replay, photos, 640, scoring, batch_size=3)
    assert len(photos) % 3 and set(replay.shapes) == {(3, 640, 640, 3)}  # a short last batch too: one shape
    wrong = validation_map(_replayed_heads(photos, 640, scramble_classes=True), photos, 640, scoring, batch_size=3)
    assert perfect > 0.9, perfect  # faces sharing a stride-4 cell are the only ones a perfect map can lose
    assert wrong < 0.5, wrong  # every true class is still there, ranked below all the wrong ones


def test_validation_map_ranks_faces_by_the_face_score_power(photos_of_every_class):
    """Right class at 0.6, the next at 0.4, and face scores of 1 or 0.5 by photo. As face score x probability,
    a wrong class on a sure face (1 x 0.4) outranks the right class on an unsure one (0.5 x 0.6 = 0.3); with the
    square root that serving's detection mAP uses (detector.trained_face_score_power), 0.71 x 0.6 = 0.42 comes
    first. The checkpoint metric must rank as detection mAP does."""
    from maskwatch.train_detector import ValidationScoring, validation_map

    photos = photos_of_every_class
    scales = [1.0 if i % 2 else 0.5 for i in range(len(photos))]

    def val_map(power: float) -> float:
        heads = _replayed_heads(photos, 640, true_class_share=0.6, face_scales=scales)
        return validation_map(heads, photos, 640, ValidationScoring(0.05, power), batch_size=3)

    at_product, at_square_root = val_map(1.0), val_map(0.5)
    assert at_square_root > 0.9, at_square_root  # every right class above every wrong one again
    assert at_product < at_square_root - 0.05, (at_product, at_square_root)


def test_training_batches_are_reproducible_from_the_seed(two_photos):
    from maskwatch.train_detector import batch_sampler

    _, _, photos = two_photos
    config = DetectorTrainConfig(train_canvas=128, input_side=128, batch_size=2, loader_workers=2)

    def batch(seed: int, epoch: int):
        sampler = batch_sampler(photos, config, training=True, seed=seed)
        for _ in range(epoch):
            sampler.on_epoch_end()
        return sampler[0]

    first, again = batch(7, 0), batch(7, 0)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.array_equal(first[0], batch(7, 1)[0])  # each epoch draws afresh
    assert not np.array_equal(first[0], batch(8, 0)[0])


def test_onnx_export_matches_keras(tmp_path):
    from maskwatch.train_detector import export_onnx

    model = build_face_detector(weights=None)
    model.save(tmp_path / "face_detector.keras")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        onnx_file = export_onnx(tmp_path / "face_detector.keras", tmp_path / "face_detector.onnx")
    assert not tooling_warnings(caught)  # Keras' own, printed to users before
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    for shape in ((1, 64, 96, 3), (2, 128, 128, 3)):  # the export keeps a free input size
        x = np.random.default_rng(1).uniform(0, 255, shape).astype("float32")
        np.testing.assert_allclose(session.run(None, {session.get_inputs()[0].name: x})[0],
                                   keras.ops.convert_to_numpy(model(x)), atol=1e-4)


# ----------------------------------------------------------------------------- the CLI job, tiny


@pytest.fixture(scope="module")
def detector_job(tmp_path_factory, data_dir):
    work = tmp_path_factory.mktemp("detjob")
    from conftest import cli_env

    env = cli_env(work, data_dir)
    args = ["--preset", "quick", "--set", "data.max_photos=16", "--set", "detector_train.epochs=2",
            "--set", "detector_train.batch_size=4", "--set", "detector_train.train_canvas=192",
            "--set", "detector_train.input_side=192"]
    out = subprocess.run([MASKWATCH, "train-detector", *args], capture_output=True, text=True, timeout=900,
                         env=env, cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    return work, env, args, out


def test_train_detector_trains_exports_scores_and_logs(detector_job):
    work, _, _, out = detector_job
    assert "face detector job finished" in out.stdout and "mAP@0.5" in out.stdout
    assert "each face scored per class as face score^0.5 x class probability" in out.stdout  # its default power
    assert "detector epoch 2/2" in out.stdout + out.stderr
    # No classifier in this fresh store: detection is scored with the detector's own classes, and it says so.
    assert "not scored with a classifier" in out.stderr
    onnx_files = list((work / "artifacts" / "runs").glob("*/face_detector/face_detector.onnx"))
    assert len(onnx_files) == 1
    run_dir = onnx_files[0].parent
    assert (run_dir / "training_curves.png").is_file()
    history = pd.read_csv(run_dir / "history.csv")
    # val mAP is measured every val_map_every (5) epochs and at the last, and picks the epoch kept.
    assert len(history) == 2 and history["val_map50"].isna().tolist() == [True, False]
    assert "detector epoch 2: val mAP@0.5" in out.stdout
    record = json.loads((run_dir / "train_config.json").read_text())
    assert record["best_epoch"] == 2 and record["epochs_run"] == 2 and record["photos_train"] >= 1
    assert record["detector_train"]["input_side"] == 192 and record["backend"] == "tensorflow"
    # The epoch kept was chosen on val mAP ranked as detection mAP ranks (detector.trained_* settings).
    assert record["val_scoring"] == {"score_threshold": 0.05, "face_score_power": 0.5}

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    run = client.get_run(run_dir.parent.name)
    assert 0.0 <= run.data.metrics["det_alone_map50"] <= 1.0 and "det_alone_recall_under_16" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "detector_loss")] == [1, 2]
    val_map = client.get_metric_history(run.info.run_id, "detector_val_map50")
    assert [m.step for m in val_map] == [2] and val_map[0].value == pytest.approx(history["val_map50"].iloc[1])
    assert run.data.metrics["detector_best_epoch"] == 2
    assert run.data.metrics["detector_kept_val_map50"] == pytest.approx(history["val_map50"].iloc[1])
    assert run.data.params["detector_train.epochs"] == "2"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "face_detector")}
    assert artifacts == {"face_detector/face_detector.keras", "face_detector/face_detector.onnx",
                         "face_detector/train_config.json"}
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"detection_alone_metrics.json", "detection_alone_confusion.png", "detection_alone_confusion.txt"} <= logged
    logged_metrics = mlflow.artifacts.load_dict(f"{run.info.artifact_uri}/detection_alone_metrics.json")
    assert logged_metrics["face_score_power"] == 0.5
    assert 0.0 <= run.data.metrics["det_alone_face_ap50"] <= 1.0 and "det_alone_map50_true_classes" in run.data.metrics


def test_trained_detector_plugs_in_by_configuration(detector_job, data_dir):
    from maskwatch.detect import MaskDetector, create_face_detector
    from maskwatch.preprocessing import read_image

    work, _, _, _ = detector_job
    onnx_file = next((work / "artifacts" / "runs").glob("*/face_detector/face_detector.onnx"))
    config = DetectorConfig(backend="centernet", trained_model_path=onnx_file, trained_input_side=192,
                            trained_score_threshold=0.0)
    detector = create_face_detector(config, num_threads=1)
    image = read_image(data_dir / "images" / "maksssksksss13.jpg")
    faces = detector.detect(image)
    assert faces, "a threshold of 0 keeps every peak"
    for face in faces:
        x0, y0, x1, y1 = face.box
        assert 0 <= x0 < x1 <= image.shape[1] and 0 <= y0 < y1 <= image.shape[0]
        assert face.probabilities.shape == (3,) and face.probabilities.sum() == pytest.approx(1.0, abs=1e-5)
    detections = MaskDetector(None, detector).detect(image)  # no classifier: the detector's own classes
    assert [d.box for d in detections] == [f.box for f in faces]
    assert all(d.label == max(d.probabilities, key=d.probabilities.get) for d in detections)


def test_trained_nms_drops_only_the_overlapping_lower_scored_faces(detector_job, data_dir):
    """detector.trained_nms_iou: the 2-epoch detector at a threshold of 0 gives many overlapping peaks; with
    the setting, no two kept faces overlap by more than it, and each kept face is one the peaks gave."""
    from maskwatch.detect import create_face_detector
    from maskwatch.preprocessing import box_iou, read_image

    work, _, _, _ = detector_job
    onnx_file = next((work / "artifacts" / "runs").glob("*/face_detector/face_detector.onnx"))
    image = read_image(data_dir / "images" / "maksssksksss13.jpg")

    def faces(iou: float):
        config = DetectorConfig(backend="centernet", trained_model_path=onnx_file, trained_input_side=192,
                                trained_score_threshold=0.0, trained_nms_iou=iou)
        return create_face_detector(config, num_threads=1).detect(image)

    def largest_overlap(found) -> float:
        boxes = np.array([f.box for f in found], float)
        return max((box_iou(box, boxes[i + 1:]).max() for i, box in enumerate(boxes[:-1])), default=0.0)

    every_peak, kept = faces(1.0), faces(0.3)
    assert largest_overlap(every_peak) > 0.3, "the untrained peaks overlap, or the test shows nothing"
    assert 0 < len(kept) < len(every_peak)
    assert {(f.box, f.score) for f in kept} <= {(f.box, f.score) for f in every_peak}
    assert largest_overlap(kept) <= 0.3 + 1e-6
    assert kept[0].score == max(f.score for f in every_peak)  # the best face always stays


def test_flip_averaging_sees_a_mirrored_photo_as_the_photo_mirrored(detector_job, data_dir):
    """detector.trained_flip: the network's maps are averaged with the mirrored photo's, so a mirrored photo
    gives the same faces mirrored, whatever the network learnt (it needs a photo whose letterbox pads no
    columns: long side = input side, a multiple of 32)."""
    import cv2

    from maskwatch.detect import create_face_detector
    from maskwatch.preprocessing import read_image

    work, _, _, _ = detector_job
    onnx_file = next((work / "artifacts" / "runs").glob("*/face_detector/face_detector.onnx"))
    photo = read_image(data_dir / "images" / "maksssksksss13.jpg")
    height, width = photo.shape[:2]
    assert width > height
    image = cv2.resize(photo, (192, round(height * 192 / width)), interpolation=cv2.INTER_AREA)
    config = DetectorConfig(backend="centernet", trained_model_path=onnx_file, trained_input_side=192,
                            trained_score_threshold=0.05, min_face_size=1)
    flipping = create_face_detector(config.model_copy(update={"trained_flip": True}), num_threads=1)
    faces, mirrored_faces = flipping.detect(image), flipping.detect(np.ascontiguousarray(image[:, ::-1]))
    assert 0 < len(faces) < 200  # under decode's cap, so ties at the cap cannot pick different peaks
    back = np.array([(192 - x1, y0, 192 - x0, y1, face.score) for face in mirrored_faces
                     for x0, y0, x1, y1 in [face.box]])
    ours = np.array([(*face.box, face.score) for face in faces])
    assert len(back) == len(ours)
    for face in ours:  # each has its mirror image: boxes to the pixel (rounding), the same score
        gaps = np.abs(back - face)
        assert ((gaps[:, :4] <= 1).all(axis=1) & (gaps[:, 4] <= 1e-5)).any(), face
    boxed, _ = centernet.letterbox(image, 192)
    plain = create_face_detector(config, num_threads=1)
    assert not np.allclose(plain.heads(boxed), flipping.heads(boxed), atol=1e-3)  # the setting does something


def test_train_detector_refuses_a_missing_trained_file(detector_job):
    work, env, args, _ = detector_job
    out = subprocess.run([MASKWATCH, "train-detector", "--trained", str(work / "nope.keras"), *args],
                         capture_output=True, text=True, timeout=120, env=env, cwd=work)
    assert out.returncode == 2 and "no trained detector at" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("fusion", [0.0, 0.5, 1.0])
def test_api_serves_the_trained_detector_and_fuses_its_classes(detector_job, tiny_bundle, data_dir, fusion):
    """detector.backend=centernet through the API: faces from the trained detector; class_fusion decides whose
    class opinion the label follows (1.0: the detector's own, 0.0: the classifier's, between: their weighted
    geometric mean)."""
    from maskwatch.detect import Predictor, create_face_detector, fuse_class_probabilities
    from maskwatch.preprocessing import extract_faces, read_image
    from maskwatch.serve import create_app

    work, _, _, _ = detector_job
    onnx_file = next((work / "artifacts" / "runs").glob("*/face_detector/face_detector.onnx"))
    detector_settings = {"backend": "centernet", "trained_model_path": str(onnx_file), "trained_input_side": 192,
                         "trained_score_threshold": 0.0, "class_fusion": fusion}
    settings = load_settings(overrides={"paths": {"work_dir": str(work / "serve")}, "detector": detector_settings,
                                        "serve": {"model_uri": str(tiny_bundle)}}, environ={})
    photo = data_dir / "images" / "maksssksksss13.jpg"
    response = create_app(settings).test_client().post("/v1/predict", data=photo.read_bytes(),
                                                       content_type="image/jpeg")
    assert response.status_code == 200, response.get_json()
    detections = response.get_json()["detections"]
    faces = create_face_detector(settings.detector, num_threads=1).detect(read_image(photo))
    assert [tuple(d["box"]) for d in detections] == [f.box for f in faces] and faces
    predictor = Predictor.from_path(tiny_bundle, settings.serve.runtime)
    classified = predictor.predict_inputs(extract_faces(read_image(photo), [f.box for f in faces], predictor.crop_spec))
    found = np.array([f.probabilities for f in faces])
    expected = {0.0: classified, 1.0: found}.get(fusion)
    if expected is None:
        expected = fuse_class_probabilities(classified, found, fusion)
        assert not np.allclose(expected, classified, atol=1e-3) and not np.allclose(expected, found, atol=1e-3)
    got = [[d["probabilities"][name] for name in ("with_mask", "without_mask", "mask_weared_incorrect")]
           for d in detections]
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_detector_trained_elsewhere_is_exported_scored_and_logged_with_its_history(detector_job):
    """--trained: the .keras from another machine (here: the first job's), with the history.csv beside it. This
    run's split is another (a larger test fraction), so some of its test photos are ones the detector trained on:
    train_config.json lists those photos, and the run says so."""
    work, env, args, _ = detector_job
    first = next((work / "artifacts" / "runs").glob("*/face_detector/face_detector.keras"))
    trained_on = json.loads((first.parent / "train_config.json").read_text())["trained_on_photos"]
    assert len(trained_on) == len(set(trained_on)) > 0
    # This command's detector_train settings differ from the training's: the run must log the training's.
    out = subprocess.run([MASKWATCH, "train-detector", "--trained", str(first), *args,
                          "--set", "detector_train.epochs=7", "--set", "data.test_fraction=0.3"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "detector epoch" not in out.stdout + out.stderr  # nothing was trained
    assert "the detector trained on" in out.stderr and "another split of the data" in out.stderr
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("maskwatch").experiment_id],
                              order_by=["attributes.start_time DESC"], max_results=1)
    run = runs[0]
    assert run.data.tags["trained_elsewhere"] == str(first)
    assert run.data.params["detector_train.epochs"] == "2" and "train_config.json" in run.data.tags[
        "detector_train_params"]
    assert run.data.metrics["detector_best_epoch"] == 2 and "detector_kept_val_map50" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "detector_val_map50")] == [2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "detector_loss")] == [1, 2]
    assert "det_alone_map50" in run.data.metrics
    assert int(run.data.tags["test_photos_the_detector_trained_on"]) > 0
    assert {a.path for a in client.list_artifacts(run.info.run_id, "training")} == {
        "training/history.csv", "training/training_curves.png"}


def test_train_detector_refuses_a_broken_train_config(detector_job, tmp_path):
    """A train_config.json beside --trained that maskwatch did not write: a clear error, and no run is opened."""
    import shutil

    work, env, args, _ = detector_job
    first = next((work / "artifacts" / "runs").glob("*/face_detector/face_detector.keras"))
    shutil.copy2(first, tmp_path / "face_detector.keras")
    (tmp_path / "train_config.json").write_text('{"detector_train": {"epochs": "many"}}')
    runs_before = len(list((work / "artifacts" / "runs").iterdir()))
    out = subprocess.run([MASKWATCH, "train-detector", "--trained", str(tmp_path / "face_detector.keras"), *args],
                         capture_output=True, text=True, timeout=300, env=env, cwd=work)
    assert out.returncode == 2 and "is not a train_config.json that maskwatch wrote" in out.stderr
    assert "Traceback" not in out.stderr and len(list((work / "artifacts" / "runs").iterdir())) == runs_before


def test_train_only_refuses_trained_and_a_folder_with_a_model(detector_job, tmp_path):
    work, env, args, _ = detector_job
    model_file = next((work / "artifacts" / "runs").glob("*/face_detector/face_detector.keras"))
    out = subprocess.run([MASKWATCH, "train-detector", "--train-only", str(tmp_path / "out"), "--trained",
                          str(model_file), *args], capture_output=True, text=True, timeout=300, env=env, cwd=work)
    assert out.returncode == 2 and "give one of them" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "out").exists()

    # A folder that already holds a trained detector is not overwritten.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "face_detector.keras").write_bytes(b"weeks of work")
    out = subprocess.run([MASKWATCH, "train-detector", "--train-only", str(tmp_path / "out"), *args],
                         capture_output=True, text=True, timeout=300, env=env, cwd=work)
    assert out.returncode == 2 and "already holds a trained detector" in out.stderr
    assert (tmp_path / "out" / "face_detector.keras").read_bytes() == b"weeks of work"


def test_train_only_continues_from_an_initial_model(detector_job, tmp_path):
    """detector_train.initial_model: training starts from that detector's weights, not the ImageNet backbone,
    and the photos it was trained on stay listed (evaluation warns by them)."""
    import shutil

    work, env, args, _ = detector_job
    first = next((work / "artifacts" / "runs").glob("*/face_detector/face_detector.keras"))
    start = tmp_path / "start" / "face_detector.keras"
    start.parent.mkdir()
    shutil.copy2(first, start)
    first_record = json.loads((first.parent / "train_config.json").read_text())
    first_record["trained_on_photos"].append("a_photo_of_another_data_set")
    (start.parent / "train_config.json").write_text(json.dumps(first_record))
    out = subprocess.run([MASKWATCH, "train-detector", "--train-only", str(tmp_path / "out"), *args,
                          "--set", f"detector_train.initial_model={start}", "--set", "detector_train.epochs=1",
                          "--set", "detector_train.warmup_epochs=0", "--set", "detector_train.learning_rate=1e-9"],
                         capture_output=True, text=True, timeout=600, env=env, cwd=work)
    assert out.returncode == 0, out.stderr[-3000:]
    # At a learning rate of 1e-9 one epoch leaves the start's convolutions where they were; from a fresh start
    # the heads would hold new random weights.
    started, continued = (keras.saving.load_model(path, compile=False)
                          for path in (start, tmp_path / "out" / "face_detector.keras"))
    for layer in ("heat", "size_conv", "lateral_32"):
        np.testing.assert_allclose(continued.get_layer(layer).get_weights()[0],
                                   started.get_layer(layer).get_weights()[0], atol=1e-6)
    fresh = build_face_detector(weights=None)
    assert not np.allclose(fresh.get_layer("heat").get_weights()[0], started.get_layer("heat").get_weights()[0],
                           atol=1e-3)
    record = json.loads((tmp_path / "out" / "train_config.json").read_text())
    assert record["detector_train"]["initial_model"] == str(start)
    assert "a_photo_of_another_data_set" in record["trained_on_photos"]
    assert set(first_record["trained_on_photos"]) <= set(record["trained_on_photos"])


def test_an_initial_model_that_is_missing_or_no_detector_is_a_clear_error(detector_job, tiny_bundle, tmp_path):
    work, env, args, _ = detector_job
    for initial, message in ((tmp_path / "nowhere.keras", "must be a face_detector.keras file"),
                             (tiny_bundle / "model.keras", "holds no face detector this version can start from")):
        out = subprocess.run([MASKWATCH, "train-detector", "--train-only", str(tmp_path / "out"), *args,
                              "--set", f"detector_train.initial_model={initial}"],
                             capture_output=True, text=True, timeout=600, env=env, cwd=work)
        assert out.returncode == 2 and message in out.stderr, out.stderr[-2000:]
        assert "Traceback" not in out.stderr and "detector epoch" not in out.stdout + out.stderr
        assert not (tmp_path / "out" / "face_detector.keras").exists()


def test_evaluate_warns_about_a_detector_scored_on_photos_it_trained_on(tmp_path, capsys):
    """train_config.json lists the photos a detector trained on; scored on a split that holds some of them, or
    copies of them (one scene), its figures look better than they are."""
    from maskwatch.cli import _warn_if_detector_trained_on
    from maskwatch.config import load_settings
    from maskwatch.pipeline import detector_trained_on

    faces = pd.DataFrame({"photo_id": ["a", "b", "b_copy", "c"], "scene_id": ["a", "b", "b", "c"]})
    test = faces[faces.photo_id.isin(["b_copy", "c"])]
    model_file = tmp_path / "face_detector.onnx"
    model_file.write_bytes(b"")
    assert detector_trained_on(model_file, test, faces) == set()  # no train_config.json: nothing is known
    (tmp_path / "train_config.json").write_text("[]")  # not what maskwatch writes: nothing is known either
    assert detector_trained_on(model_file, test, faces) == set()
    (tmp_path / "train_config.json").write_text(json.dumps({"trained_on_photos": ["a", "b"]}))
    assert detector_trained_on(model_file, test, faces) == {"b_copy"}  # b's copy, never c
    settings = load_settings(overrides={"detector": {"backend": "centernet", "trained_model_path": str(model_file)}},
                             environ={})
    _warn_if_detector_trained_on(settings, faces, test, "test")
    assert "the face detector trained on 1 of the 2 test photos" in capsys.readouterr().err
