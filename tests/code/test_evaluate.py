import numpy as np
import pytest

from maskwatch.evaluate import bootstrap_recall_interval, evaluate_predictions, format_summary


def one_hot(indices, n=3):
    return np.eye(n)[indices]


def test_metrics_match_hand_count():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 1, 2, 0])
    result = evaluate_predictions(y_true, one_hot(y_pred), photo_ids=np.arange(8).astype(str),
                                  bootstrap_samples=500)
    assert result.accuracy == 6 / 8
    assert result.confusion_matrix == [[3, 1, 0], [0, 2, 0], [1, 0, 1]]
    assert result.per_class["mask_weared_incorrect"]["recall"] == 0.5
    assert np.isclose(result.per_class["without_mask"]["precision"], 2 / 3)
    f1s = [2 * 0.75 * 0.75 / 1.5, 2 * (2 / 3) * 1 / (2 / 3 + 1), 2 * 1 * 0.5 / 1.5]
    assert np.isclose(result.macro_f1, np.mean(f1s))
    assert "mask_weared_incorrect" in format_summary(result)


def test_summary_says_when_macro_f1_counts_a_class_the_split_lacks():
    """A split without incorrect-mask faces (the 20-photo sample has none in test): macro-F1 stays over the
    three classes, and the summary says so and gives the figure over the classes present."""
    y_true = np.array([0, 0, 1, 1])
    result = evaluate_predictions(y_true, one_hot(np.array([0, 0, 1, 0])), photo_ids=np.arange(4).astype(str),
                                  bootstrap_samples=100)
    f1_with, f1_without = 2 * (2 / 3) / (2 / 3 + 1), 2 * 0.5 / 1.5
    assert np.isclose(result.macro_f1, (f1_with + f1_without + 0) / 3)
    summary = format_summary(result)
    assert (f"no mask_weared_incorrect faces in this split: macro-F1 counts its F1 as 0 "
            f"({(f1_with + f1_without) / 2:.3f} over the 2 classes present)") in summary
    every_class = evaluate_predictions(np.array([0, 1, 2]), one_hot(np.array([0, 1, 2])))
    assert "note:" not in format_summary(every_class)


def test_bootstrap_interval_brackets_recall_and_resamples_photos():
    rng = np.random.default_rng(0)
    y_true = np.full(40, 2)
    y_pred = np.where(rng.random(40) < 0.6, 2, 0)
    photos = np.repeat(np.arange(20), 2).astype(str)
    interval = bootstrap_recall_interval(y_true, y_pred, photos, 2, 2000, 0.95, seed=0)
    assert interval["low"] < interval["recall"] < interval["high"]
    assert interval["faces"] == 40 and interval["hits"] == int((y_pred == 2).sum())
    perfect = bootstrap_recall_interval(y_true, y_true, photos, 2, 500, 0.95, seed=0)
    assert perfect["high"] == 1.0 and 0.90 < perfect["low"] < 0.92  # Wilson's 40 of 40, not a collapse to 1.0


def test_recall_interval_of_a_few_faces_all_right_or_all_wrong_is_wilsons_not_a_point():
    """Every resample of 4 right faces is 4 of 4, so the bootstrap alone says [1.00, 1.00]."""
    photos = np.array(["a", "b", "c", "d"])
    all_right = bootstrap_recall_interval(np.zeros(4, int), np.zeros(4, int), photos, 0, 500, 0.95, seed=0)
    assert all_right["recall"] == all_right["high"] == 1.0
    assert all_right["low"] == pytest.approx(0.510, abs=0.001)  # Wilson's score interval for 4 of 4 at 95%
    all_wrong = bootstrap_recall_interval(np.zeros(4, int), np.ones(4, int), photos, 0, 500, 0.95, seed=0)
    assert all_wrong["low"] == 0.0 and all_wrong["high"] == pytest.approx(0.490, abs=0.001)


def test_recall_interval_stays_the_bootstrap_where_faces_of_a_photo_go_together():
    """Photos whose faces are all right or all wrong: the photos, not the faces, are the independent draws,
    so the bootstrap is wider than Wilson's interval over the faces and is what is reported."""
    from scipy.stats import binomtest

    photos = np.repeat(np.arange(10), 10).astype(str)
    y_pred = np.where(np.repeat(np.arange(10), 10) < 6, 1, 0)  # 6 photos all right, 4 all wrong
    interval = bootstrap_recall_interval(np.ones(100, int), y_pred, photos, 1, 2000, 0.95, seed=0)
    wilson = binomtest(60, 100).proportion_ci(0.95, method="wilson")
    assert interval["low"] < wilson.low - 0.1 and interval["high"] > wilson.high + 0.1


def test_class_bias_shifts_decisions_and_is_tuned_on_held_out_data():
    from maskwatch.bundle import apply_class_bias
    from maskwatch.evaluate import tune_class_bias

    probs = np.array([[0.6, 0.1, 0.3], [0.7, 0.2, 0.1], [0.5, 0.45, 0.05]])
    assert np.array_equal(apply_class_bias(probs, None), probs.astype(np.float32))
    shifted = apply_class_bias(probs, [0.0, 0.0, 1.0])
    assert np.allclose(shifted.sum(axis=1), 1.0) and shifted[0].argmax() == 2 and shifted[1].argmax() == 0
    # Minority class under-predicted: tuning raises its bias until macro-F1 is best.
    rng = np.random.default_rng(0)
    y = np.array([0] * 80 + [2] * 20)
    p2 = np.where(y == 2, rng.uniform(0.2, 0.45, 100), rng.uniform(0.0, 0.25, 100))
    probs = np.stack([1 - p2 - 0.01, np.full(100, 0.01), p2], axis=1)
    bias = tune_class_bias(probs, y)
    assert bias[0] == 0.0 and bias[2] > 0
    from sklearn.metrics import f1_score
    before = f1_score(y, probs.argmax(1), average="macro")
    after = f1_score(y, apply_class_bias(probs, bias).argmax(1), average="macro")
    assert after > before


def test_calibration_hand_counts():
    from maskwatch.evaluate import calibration_metrics

    # Ten faces at confidence 0.9 of which 9 are right, and ten at 0.6 of which 3 are right.
    y_true = np.zeros(20, dtype=int)
    probs = np.array([[0.9, 0.05, 0.05]] * 9 + [[0.05, 0.9, 0.05]] + [[0.6, 0.3, 0.1]] * 3 + [[0.1, 0.6, 0.3]] * 7)
    calibration = calibration_metrics(y_true, probs, bins=10)
    assert np.isclose(calibration["ece"], 0.5 * abs(0.9 - 0.9) + 0.5 * abs(0.6 - 0.3))  # 0.15
    brier = (9 * (0.1**2 + 2 * 0.05**2) + (0.95**2 + 0.9**2 + 0.05**2) + 3 * (0.4**2 + 0.3**2 + 0.1**2)
             + 7 * (0.9**2 + 0.6**2 + 0.3**2)) / 20
    assert np.isclose(calibration["brier"], brier)
    log_likelihood = 9 * np.log(0.9) + np.log(0.05) + 3 * np.log(0.6) + 7 * np.log(0.1)
    assert np.isclose(calibration["log_loss"], -log_likelihood / 20)
    filled = {b["low"]: b for b in calibration["bins"] if b["faces"]}
    assert set(filled) == {0.5, 0.8} and filled[0.8]["accuracy"] == 0.9 and filled[0.5]["accuracy"] == 0.3
    assert sum(b["faces"] for b in calibration["bins"]) == 20


def test_calibration_is_zero_for_calibrated_scores_and_flat_metrics_carry_it():
    rng = np.random.default_rng(0)
    confidence = rng.choice([0.55, 0.75, 0.95], size=30000)
    y_true = np.where(rng.random(30000) < confidence, 0, 1)  # right exactly as often as it says
    probs = np.stack([confidence, 1 - confidence, np.zeros_like(confidence)], axis=1)
    result = evaluate_predictions(y_true, probs)
    assert result.calibration["ece"] < 0.01
    overconfident = evaluate_predictions(y_true, one_hot(np.zeros(30000, dtype=int)))
    assert np.isclose(overconfident.calibration["ece"], 1 - (y_true == 0).mean())
    assert {"test_ece", "test_brier", "test_log_loss"} <= set(result.flat_metrics())
    assert "calibration: ECE" in format_summary(result)


def test_reliability_diagram_is_written(tmp_path):
    from maskwatch.evaluate import plot_reliability_diagram

    result = evaluate_predictions(np.array([0, 1, 2, 0]), one_hot([0, 1, 0, 0]) * 0.7 + 0.1)
    path = plot_reliability_diagram(result, tmp_path / "reliability.png")
    assert path.stat().st_size > 10_000


# ----------------------------------------------------------------------------- detection AP (pycocotools)


def _photo(truth, classes, found, scores, size=(200, 100)):
    from maskwatch.evaluate import PhotoDetections

    return PhotoDetections(size[0], size[1], np.array(truth, float), np.array(classes), np.array(found, float),
                           np.array(scores, float))


def test_detection_ap_matches_hand_counts():
    from maskwatch.evaluate import average_precision_50

    names = ["a", "b"]
    faces = [[10, 10, 30, 30], [60, 10, 80, 30]]
    perfect = _photo(faces, [0, 1], faces, [[0.9, 0.1], [0.2, 0.8]])
    assert average_precision_50([perfect], names) == pytest.approx({"a": 1.0, "b": 1.0})
    # Class a, two faces: a false alarm ranked first, then both faces. Interpolated precision is 2/3 everywhere.
    ranked = _photo(faces, [0, 0], [[120, 50, 140, 70], *faces], [[0.9, 0.0], [0.8, 0.0], [0.7, 0.0]])
    assert average_precision_50([ranked], names)["a"] == pytest.approx(2 / 3)
    # One of two faces found: precision 1 up to recall 0.5, i.e. 51 of COCO's 101 recall points.
    half = _photo(faces, [0, 0], [faces[0]], [[0.9, 0.0]])
    assert average_precision_50([half], names)["a"] == pytest.approx(51 / 101)
    # A box that overlaps by IoU < 0.5 is a miss, and nothing found at all is AP 0.
    shifted = _photo(faces[:1], [0], [[20, 10, 40, 30]], [[0.9, 0.0]])
    assert average_precision_50([shifted], names)["a"] == 0.0
    assert average_precision_50([_photo(faces, [0, 1], [], [])], names) == {"a": 0.0, "b": 0.0}


def test_detection_ap_counts_a_low_ranked_second_class_hypothesis():
    """Each found face is one hypothesis per class: a face the classifier doubts still counts for its true class,
    ranked by its (lower) score, as multi-class detectors are scored."""
    from maskwatch.evaluate import average_precision_50

    faces = [[10, 10, 30, 30], [60, 10, 80, 30]]
    doubted = _photo(faces, [0, 1], faces, [[0.9, 0.1], [0.7, 0.3]])  # face 2 is b, but scored mostly a
    ap = average_precision_50([doubted], ["a", "b"])
    assert ap["b"] == pytest.approx(1.0)  # its only b hypothesis above the false one (face 1 at 0.1)
    assert ap["a"] == pytest.approx(1.0)  # a's false alarm (0.7) ranks below its true face (0.9)


def test_face_ap_and_true_class_map_split_what_was_lost():
    """Perfect boxes with swapped classes: faces are all found (face AP 1), the classifier lost half (each true
    hypothesis ranks below a false one: AP 0.5), and with true classes the same boxes score mAP 1."""
    from maskwatch.evaluate import average_precision_50, face_average_precision_50, with_true_classes

    names = ["a", "b"]
    faces = [[10, 10, 30, 30], [60, 10, 80, 30]]
    swapped = _photo(faces, [0, 1], faces, [[0.0, 0.9], [0.8, 0.0]])
    assert average_precision_50([swapped], names) == pytest.approx({"a": 0.5, "b": 0.5})
    assert face_average_precision_50([swapped]) == pytest.approx(1.0)
    corrected = with_true_classes([swapped])
    assert corrected[0].found_scores.tolist() == [[0.9, 0.0], [0.0, 0.8]]  # all of the face score, true class
    assert average_precision_50(corrected, names) == pytest.approx({"a": 1.0, "b": 1.0})
    # A false alarm keeps its scores; a missed face stays missed: face AP and true-class mAP both say so.
    alarm_and_miss = _photo(faces, [0, 1], [faces[0], [120, 50, 140, 70]], [[0.9, 0.0], [0.0, 0.7]])
    assert with_true_classes([alarm_and_miss])[0].found_scores.tolist() == [[0.9, 0.0], [0.0, 0.7]]
    assert face_average_precision_50([alarm_and_miss]) == pytest.approx(51 / 101)


def test_detection_confusion_hand_counts():
    """Rows: annotated a, b, c, no face. Columns: predicted a, b, c, missed. Best face score first, one
    annotated face per found face; below the operating face score a face is not reported."""
    from maskwatch.evaluate import detection_confusion

    faces = [[10, 10, 30, 30], [60, 10, 80, 30], [100, 10, 120, 30]]
    photo = _photo(faces, [0, 1, 2], [
        faces[0],                # a, said a
        faces[1],                # b, said a
        [11, 10, 31, 30],        # a again: its face is taken, so a false alarm
        [150, 50, 170, 70],      # nothing there, said b
        faces[2],                # c, but under the operating score: c is missed
    ], [[0.9, 0.05, 0.05], [0.5, 0.2, 0.1], [0.6, 0.0, 0.0], [0.1, 0.4, 0.0], [0.0, 0.0, 0.2]])
    counts = detection_confusion([photo], 3, min_face_score=0.3)
    assert counts.tolist() == [[1, 0, 0, 0],
                               [1, 0, 0, 0],
                               [0, 0, 0, 1],
                               [1, 1, 0, 0]]
    assert detection_confusion([photo], 3, min_face_score=0.0)[2].tolist() == [0, 0, 1, 0]
    # Every annotated face is counted once, found or missed.
    assert counts[:3].sum() == len(faces)
    # A photo where nothing was found (given as empty lists): every face missed, no false alarm.
    nothing = _photo(faces, [0, 1, 2], [], [])
    assert detection_confusion([nothing], 3)[:, 3].tolist() == [1, 1, 1, 0]
    assert detection_confusion([nothing], 3)[:, :3].sum() == 0


def test_bootstrap_map_interval_resamples_whole_photos():
    from maskwatch.evaluate import average_precision_50, bootstrap_map_interval

    names = ["a", "b"]
    faces = [[10, 10, 30, 30], [60, 10, 80, 30]]
    perfect = _photo(faces, [0, 1], faces, [[0.9, 0.1], [0.2, 0.8]])
    same = bootstrap_map_interval([perfect] * 4, names, samples=50)
    assert same["map50"] == pytest.approx([1.0, 1.0]) and same["samples"] == 50 and same["level"] == 0.95
    # Class b lives in one photo of five. A resample without that photo would have no b at all (AP undefined,
    # scored 0 by pycocotools' empty result); it is drawn again, so b's interval stays at its true 1.0.
    only_a = [_photo(faces[:1], [0], faces[:1], [[0.9, 0.1]]) for _ in range(4)]
    interval = bootstrap_map_interval([perfect, *only_a], names, samples=200)
    assert interval["ap50_per_class"]["b"] == pytest.approx([1.0, 1.0])
    # Photos that disagree give a real spread around the point estimate, and the same seed the same interval.
    missed = [_photo(faces, [0, 1], faces[:1], [[0.9, 0.1]]) for _ in range(3)]
    alarms = [_photo(faces, [0, 1], [[120, 50, 140, 70], *faces], [[0.95, 0.0], [0.5, 0.1], [0.1, 0.6]])] * 3
    photos = [perfect, *missed, *alarms]
    point = np.mean(list(average_precision_50(photos, names).values()))
    spread = bootstrap_map_interval(photos, names, samples=200)
    low, high = spread["map50"]
    assert low < point < high
    assert spread == bootstrap_map_interval(photos, names, samples=200)


def test_face_score_power_reorders_classes_hypotheses_but_not_faces():
    """Per-class score = face score ** power x class probability. A small face the detector is unsure of
    (face 0.09) but the classifier is sure is b outranks a sure face (0.81) that is only 0.2 b at power 0.5,
    not at power 1; faces keep their order either way."""
    from maskwatch.detect import Detection
    from maskwatch.evaluate import average_precision_50, class_scores

    names = ["a", "b"]
    detections = [Detection((10, 10, 30, 30), "a", 0.8, {"a": 0.8, "b": 0.2}, 0.81),
                  Detection((60, 10, 80, 30), "b", 0.9, {"a": 0.1, "b": 0.9}, 0.09)]
    plain, tempered = class_scores(detections, names), class_scores(detections, names, face_score_power=0.5)
    np.testing.assert_allclose(plain, [[0.648, 0.162], [0.009, 0.081]])
    np.testing.assert_allclose(tempered, [[0.72, 0.18], [0.03, 0.27]])
    assert (np.argsort(plain.sum(1)) == np.argsort(tempered.sum(1))).all()
    # The second face is the b face: at power 0.5 it ranks first for b, and b's AP is perfect.
    faces = [[10, 10, 30, 30], [60, 10, 80, 30]]
    assert average_precision_50([_photo(faces, [0, 1], faces, tempered)], names)["b"] == pytest.approx(1.0)
    assert average_precision_50([_photo(faces, [0, 1], faces, plain)], names)["b"] == pytest.approx(0.5, abs=0.01)
