"""The face detector: YuNet through onnxruntime finds exactly what cv2.FaceDetectorYN finds."""

import numpy as np
import pytest

from maskwatch.config import DetectorConfig
from maskwatch.detect import create_face_detector, decode_yunet
from maskwatch.preprocessing import read_image


@pytest.fixture(scope="module")
def engines(yunet_path):
    config = DetectorConfig(model_path=yunet_path)
    return {engine: create_face_detector(config.model_copy(update={"engine": engine}), num_threads=1)
            for engine in ("onnxruntime", "opencv")}


@pytest.mark.parametrize("mode", ["off", "upscale"])
def test_onnxruntime_engine_matches_opencv_on_data_set_photos(engines, data_dir, mode):
    photos = sorted((data_dir / "images").glob("*.jpg"))[::25]
    total = 0
    for photo in photos:
        image = read_image(photo)
        found = {}
        for engine, detector in engines.items():
            detector.config = detector.config.model_copy(update={"small_face_mode": mode})
            found[engine] = sorted((face.box, face.score) for face in detector.detect(image))
        assert [box for box, _ in found["onnxruntime"]] == [box for box, _ in found["opencv"]], photo.name
        np.testing.assert_allclose([s for _, s in found["onnxruntime"]], [s for _, s in found["opencv"]], atol=1e-4)
        total += len(found["opencv"])
    assert total > 2 * len(photos)  # the photos do have faces, so the comparison means something


def test_decode_yunet_places_an_anchor_like_opencv():
    """One confident anchor on the stride-16 grid at column 3, row 2 of a 128 x 64 input."""
    outputs = {}
    for stride in (8, 16, 32):
        cells = (128 // stride) * (64 // stride)
        outputs |= {f"cls_{stride}": np.zeros((1, cells, 1), np.float32),
                    f"obj_{stride}": np.zeros((1, cells, 1), np.float32),
                    f"bbox_{stride}": np.zeros((1, cells, 4), np.float32),
                    f"kps_{stride}": np.zeros((1, cells, 10), np.float32)}
    index = 2 * (128 // 16) + 3
    outputs["cls_16"][0, index, 0], outputs["obj_16"][0, index, 0] = 0.81, 1.5  # obj is clipped to 1
    outputs["bbox_16"][0, index] = [0.5, 0.25, np.log(2.0), 0.0]
    outputs["kps_16"][0, index, :2] = [1.0, -1.0]
    faces = decode_yunet(outputs, 128, 0.5)
    assert faces.shape == (1, 15)
    x, y, w, h = faces[0, :4]
    assert (w, h) == (32.0, 16.0) and (x + w / 2, y + h / 2) == ((3 + 0.5) * 16, (2 + 0.25) * 16)
    assert tuple(faces[0, 4:6]) == (64.0, 16.0) and faces[0, 14] == pytest.approx(0.9)
    assert decode_yunet(outputs, 128, 0.95).shape == (0, 15)


def test_adjust_box_shifts_and_scales_about_the_centre():
    from maskwatch.detect import adjust_box

    assert adjust_box((10, 20, 30, 60), (0.0, 0.0, 1.0, 1.0)) == (10, 20, 30, 60)
    # 20 x 40 box centred at (20, 40): centre moves down by 0.25 * 40, height shrinks to 0.5 * 40
    assert adjust_box((10, 20, 30, 60), (0.0, 0.25, 1.0, 0.5)) == (10, 40, 30, 60)
    assert adjust_box((10, 20, 30, 60), (0.5, 0.0, 2.0, 1.0)) == (10, 20, 50, 60)


def test_box_adjustment_fitted_on_training_photos_moves_boxes_onto_the_annotations(yunet_path, data_dir):
    """YuNet boxes include the forehead: the fit moves them down and makes them shorter, and with the fit
    more annotated faces are matched at IoU 0.5 on photos it did not see."""
    from maskwatch.data import scan_dataset
    from maskwatch.evaluate import fit_box_adjustment
    from maskwatch.preprocessing import box_iou

    faces = scan_dataset(data_dir).faces
    photos = sorted(faces["image_path"].unique())
    fit_on, check_on = faces[faces["image_path"].isin(photos[:60])], faces[faces["image_path"].isin(photos[60:120])]
    raw = DetectorConfig(model_path=yunet_path, box_adjust=(0.0, 0.0, 1.0, 1.0))
    fitted = fit_box_adjustment(create_face_detector(raw, num_threads=1), fit_on, progress=False)
    dx, dy, sw, sh = fitted["box_adjust"]
    assert fitted["pairs"] > 100 and dy > 0.05 and sh < 0.97 and abs(dx) < 0.1

    def matched(config):
        detector, hits = create_face_detector(config, num_threads=1), 0
        for path, truth in check_on.groupby("image_path"):
            found = [f.box for f in detector.detect(read_image(path))]
            truth_boxes = truth[["xmin", "ymin", "xmax", "ymax"]].to_numpy()
            hits += sum((box_iou(box, found) >= 0.5).any() for box in truth_boxes)
        return hits

    assert matched(raw.model_copy(update={"box_adjust": tuple(fitted["box_adjust"])})) > matched(raw)


def test_small_photos_are_enlarged_once_and_boxes_come_back_in_photo_pixels(yunet_path, data_dir):
    from maskwatch.detect import detection_scale

    config = DetectorConfig(model_path=yunet_path, min_side=640, max_side=1280, upscale_factor=2.0)
    assert detection_scale(400, config) == 1.6 and detection_scale(640, config) == 1.0
    assert detection_scale(200, config) == 2.0 and detection_scale(2560, config) == 0.5
    assert detection_scale(400, config.model_copy(update={"min_side": 0})) == 1.0

    image = read_image(data_dir / "images" / "maksssksksss35.jpg")  # 400 px wide, three clear faces
    height, width = image.shape[:2]
    native, enlarged = (create_face_detector(config.model_copy(update={"min_side": side}), num_threads=1)
                        for side in (0, 640))
    native_boxes, enlarged_boxes = [sorted(f.box for f in d.detect(image)) for d in (native, enlarged)]
    assert len(enlarged_boxes) >= len(native_boxes) >= 2
    for box in enlarged_boxes:
        assert 0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height
    for box in native_boxes:  # every face found at native size is found again, in the same place
        assert max(_overlap(box, other) for other in enlarged_boxes) > 0.7


def _overlap(a, b) -> float:
    from maskwatch.preprocessing import box_iou

    return float(box_iou(np.array(a, float), np.array([b], float))[0])


def test_trained_detector_without_a_model_file_is_a_clear_error(tmp_path):
    from maskwatch.detect import DetectorModelError

    with pytest.raises(DetectorModelError, match="maskwatch train-detector"):
        create_face_detector(DetectorConfig(backend="centernet", trained_model_path=tmp_path / "missing.onnx"))
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx model")
    with pytest.raises(DetectorModelError, match="not a loadable ONNX face detector"):
        create_face_detector(DetectorConfig(backend="centernet", trained_model_path=corrupt))


def test_detection_is_scored_with_the_low_score_tail_but_served_without_it():
    from maskwatch.detect import for_evaluation

    config = DetectorConfig(backend="centernet", trained_score_threshold=0.3, trained_eval_score_threshold=0.05)
    assert for_evaluation(config).trained_score_threshold == 0.05
    assert for_evaluation(config).model_dump(exclude={"trained_score_threshold"}) == config.model_dump(
        exclude={"trained_score_threshold"})
    assert config.trained_score_threshold == 0.3  # the served settings are untouched
