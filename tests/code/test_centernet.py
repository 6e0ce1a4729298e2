"""The trained face detector's numpy parts: letterbox, target encoding, peak decoding, augmentation, schedule."""

import numpy as np
import pytest

from maskwatch import centernet
from maskwatch.config import DetectorTrainConfig
from maskwatch.train_detector import MASK_CHANNEL, augment, encode_targets, learning_rate_at


def test_letterbox_scales_the_long_side_and_pads_to_a_multiple_of_32():
    image = np.full((300, 400, 3), 7, np.uint8)
    boxed, scale = centernet.letterbox(image, 640)
    assert scale == pytest.approx(1.6)
    assert boxed.shape == (480, 640, 3)
    boxed, scale = centernet.letterbox(np.full((301, 400, 3), 7, np.uint8), 640)
    assert boxed.shape == (512, 640, 3)  # 482 rows padded up to 512
    assert (boxed[:481] == 7).all() and (boxed[482:] == centernet.PAD_VALUE).all()


def perfect_heads(targets: np.ndarray) -> np.ndarray:
    """What a perfect network would output for these targets: the encoding read back as a prediction."""
    return targets[..., :centernet.OUTPUT_CHANNELS].copy()


def test_decoding_perfect_heads_gives_back_the_boxes_and_classes():
    boxes = np.array([[10.0, 12.0, 22.0, 27.0],  # a 12 x 15 px face
                      [100.0, 40.0, 160.0, 110.0],
                      [30.0, 90.0, 35.5, 96.0]], np.float32)  # 5.5 x 6 px: smaller than two cells
    labels = np.array([0, 2, 1])
    targets = encode_targets(boxes, labels, 128 // centernet.STRIDE, 192 // centernet.STRIDE)
    assert targets[..., MASK_CHANNEL].sum() == 3
    scale = 0.5  # network pixels per photo pixel
    found, scores, probabilities = centernet.decode(perfect_heads(targets), scale, score_threshold=0.5)
    order = np.argsort(found[:, 0])
    expected_order = np.argsort(boxes[:, 0])
    np.testing.assert_allclose(found[order], boxes[expected_order] / scale, atol=1e-3)
    assert (scores == 1.0).all()
    np.testing.assert_array_equal(probabilities[order].argmax(axis=1), labels[expected_order])


def test_flip_averaging_a_perfect_network_gives_back_its_boxes():
    """A network that sees the same faces in the mirrored photo, where they are, is averaged with itself: the
    mirrored maps must be mirrored back with each centre's offset within its cell mirrored too."""
    width, height = 192, 128
    boxes = np.array([[10.0, 12.0, 23.0, 27.0], [101.0, 40.0, 160.0, 110.0], [150.5, 90.0, 156.5, 96.0]],
                     np.float32)  # centres at 16.5, 130.5 and 153.5 px: offsets 0.125, 0.625, 0.375 of a cell
    labels = np.array([0, 2, 1])
    mirrored_boxes = np.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], axis=1)

    def network(image: np.ndarray) -> np.ndarray:  # the marker pixel says which way round the photo is
        seen = boxes if image[0, 0, 0] == 255 else mirrored_boxes
        return perfect_heads(encode_targets(seen, labels, height // centernet.STRIDE, width // centernet.STRIDE))

    image = np.zeros((height, width, 3), np.uint8)
    image[0, 0] = 255
    averaged = centernet.flip_averaged(network)(image)
    maps = slice(0, centernet.OFFSET_CHANNELS.start)  # offsets matter only at the centres: decoding checks them
    np.testing.assert_allclose(averaged[..., maps], network(image)[..., maps], atol=1e-6)
    found, _, probabilities = centernet.decode(averaged, 1.0, score_threshold=0.5)
    order = np.argsort(found[:, 0])
    np.testing.assert_allclose(found[order], boxes, atol=1e-3)
    np.testing.assert_array_equal(probabilities[order].argmax(axis=1), labels)


def test_find_peaks_keeps_local_maxima_above_the_threshold_best_first():
    heat = np.zeros((8, 8), np.float32)
    heat[2, 2], heat[2, 3] = 0.9, 0.8  # 0.8 sits beside a higher neighbour: not a peak
    heat[6, 6], heat[0, 7] = 0.6, 0.2
    rows, cols = centernet.find_peaks(heat, 0.3, max_peaks=10)
    assert list(zip(rows, cols)) == [(2, 2), (6, 6)]
    rows, _ = centernet.find_peaks(heat, 0.3, max_peaks=1)
    assert len(rows) == 1


def test_encode_targets_marks_each_centre_and_keeps_the_small_face_in_a_shared_cell():
    boxes = np.array([[0.0, 0.0, 64.0, 64.0], [28.0, 28.0, 36.0, 36.0]], np.float32)  # same centre cell
    targets = encode_targets(boxes, np.array([0, 2]), 16, 16)
    assert targets[8, 8, MASK_CHANNEL] == 1.0 and targets[..., MASK_CHANNEL].sum() == 1
    assert np.exp(targets[8, 8, centernet.SIZE_CHANNELS]) * centernet.STRIDE == pytest.approx([8.0, 8.0])
    assert targets[8, 8, centernet.CLASS_CHANNELS.start + 2] == 1.0  # the small face's class peak
    assert targets[..., 0].max() == 1.0 and (targets[..., :4] >= 0).all() and (targets[..., :4] <= 1).all()


def test_augment_moves_boxes_with_the_pixels():
    rng = np.random.default_rng(0)
    config = DetectorTrainConfig(input_side=256, train_canvas=256)
    image = np.zeros((200, 300, 3), np.uint8)
    box = np.array([[120.0, 60.0, 180.0, 130.0]], np.float32)
    image[60:130, 120:180] = 255
    for _ in range(20):
        canvas, boxes, labels = augment(image, box, np.array([1]), config, rng)
        assert canvas.shape == (256, 256, 3) and canvas.dtype == np.uint8
        assert len(boxes) == len(labels) <= 1
        if len(boxes):
            x0, y0, x1, y1 = np.round(boxes[0]).astype(int)
            assert 0 <= x0 < x1 <= 256 and 0 <= y0 < y1 <= 256
            inside = canvas[y0 + 2:y1 - 2, x0 + 2:x1 - 2].mean()
            assert inside > 150 > canvas.mean()  # the white face is where its box says


def test_learning_rate_warms_up_then_decays_to_one_percent():
    config = DetectorTrainConfig(learning_rate=1e-3, warmup_epochs=3)
    warm = [learning_rate_at(0.0, epoch, config) for epoch in range(3)]
    assert warm == sorted(warm) and warm[-1] < 1e-3
    assert learning_rate_at(3 / 100, 3, config) == pytest.approx(1e-3, rel=0.01)
    assert learning_rate_at(0.5, 50, config) == pytest.approx(0.505e-3)
    assert learning_rate_at(1.0, 99, config) == pytest.approx(1e-5)


def simulated_budget_run(budget_s: float, first_epoch_s: float, epoch_s: float, val_every: int, val_s: float,
                         first_val_s: float) -> tuple[list[float], float]:
    """Runs a BudgetClock through a time-boxed training whose clock is advanced by the given costs, in the
    callbacks' order (the stop decision, then val mAP, which a last epoch always gets): (the progress each epoch
    started with, the seconds the run took)."""
    from maskwatch.train_detector import BudgetClock

    clock, now, progresses, epoch, measured = BudgetClock(budget_s, window=2 * val_every), 0.0, [], 0, False
    clock.start(now)
    while True:
        clock.epoch_began(now)
        progresses.append(clock.progress(epoch, now))
        now += first_epoch_s if epoch == 0 else epoch_s
        epoch += 1
        clock.epoch_ended(now)
        last = not clock.another_epoch_fits(now, val_due=epoch % val_every == 0)
        if epoch % val_every == 0 or last:
            now += val_s if measured else first_val_s
            measured = True
        if last:
            return progresses, now


def test_a_time_budget_spends_its_schedule_on_epochs_not_on_compiling():
    # The H200 run's costs: 136 s to compile the first epoch, 75 s the first val mAP, then 1.4 s an epoch.
    progresses, seconds = simulated_budget_run(480, first_epoch_s=136, epoch_s=1.4, val_every=5, val_s=4,
                                               first_val_s=75)
    epochs = len(progresses)
    assert abs(epochs - (1 + (480 - 136 - 75) / 2.2)) <= 2 and seconds <= 480  # 2.2 s: an epoch and 1/5 val
    assert progresses[6] < 0.06  # counted in seconds it was 218 / 480 = 0.45 here
    assert progresses[epochs // 2] == pytest.approx(0.5, abs=0.05)
    assert progresses[-1] > 0.97 and all(b >= a for a, b in zip(progresses, progresses[1:]))


@pytest.mark.parametrize("budget_s, first_epoch_s, epoch_s, val_s, first_val_s, least_epochs, over_s", [
    # The second H200 run: one training alone, compiling for half the budget. It ends before its second val
    # mAP, the first that shows what one costs without compiling, so it may run over by an epoch and two.
    (195, 104.5, 1.3, 4, 75, 10, 1.3 + 2 * 4),
    (480, 136, 1.4, 4, 75, 120, 0),  # the first: two side by side (it ran 127 epochs, 4-5 s each val mAP)
    (3600, 81, 60, 30, 30, 50, 0),  # 2 CPU cores: no compiling to speak of, val mAP half an epoch
])
def test_a_time_budget_ends_within_it_with_the_schedule_run_out(budget_s, first_epoch_s, epoch_s, val_s,
                                                                  first_val_s, least_epochs, over_s):
    progresses, seconds = simulated_budget_run(budget_s, first_epoch_s, epoch_s, 5, val_s, first_val_s)
    assert len(progresses) >= least_epochs and budget_s - 2 * (epoch_s + val_s) <= seconds <= budget_s + over_s
    assert progresses[-1] > 0.8 and all(b >= a for a, b in zip(progresses, progresses[1:]))


def test_a_budget_clock_without_a_pace_waits_and_stops_before_overrunning():
    from maskwatch.train_detector import BudgetClock

    clock = BudgetClock(100)
    clock.start(0.0)
    clock.epoch_began(0.0)
    assert clock.pace() is None and clock.progress(1, 55.0) == 0.0  # compiling is no progress
    assert clock.another_epoch_fits(55.0) and not clock.another_epoch_fits(100.0)  # the first epoch is no pace
    clock.epoch_began(55.0)
    clock.epoch_began(65.0)
    assert clock.pace() == pytest.approx(10.0) and clock.progress(2, 65.0) == pytest.approx(2 / (2 + 3.5))
    assert clock.progress(3, 120.0) == 1.0 and not clock.another_epoch_fits(95.0)


def test_best_epoch_follows_the_checkpoint_metric():
    from maskwatch.train_detector import DetectorHistory, best_epoch

    history = DetectorHistory([{"val_loss": 3.0}, {"val_loss": 2.0, "val_map50": 0.4},
                               {"val_loss": 2.0}, {"val_loss": 2.5, "val_map50": 0.6}])
    assert best_epoch(history, "val_loss") == 2  # ties keep the first, as the checkpoint does
    assert best_epoch(history, "val_map50") == 4  # only measured epochs count
    assert best_epoch(DetectorHistory([{"val_loss": float("nan")}]), "val_loss") is None


def test_a_run_is_summarised_by_the_epoch_kept_not_the_last():
    from maskwatch.train_detector import DetectorHistory, best_epoch, kept_epoch_metrics

    # As in a real H100 run: val mAP 0.639 at epoch 135 (kept), 0.636 at the last, 137.
    history = DetectorHistory([{"val_loss": 2.9, "val_map50": 0.639}, {"val_loss": 2.8},
                               {"val_loss": 2.85, "val_map50": 0.636}])
    kept = best_epoch(history, "val_map50")
    assert kept == 1
    assert kept_epoch_metrics(history, kept) == {"detector_kept_val_map50": 0.639, "detector_kept_val_loss": 2.9}
    assert kept_epoch_metrics(history, 2) == {"detector_kept_val_loss": 2.8}  # val mAP not measured that epoch
    assert kept_epoch_metrics(history, None) == {} and kept_epoch_metrics(history, 4) == {}
    assert kept_epoch_metrics(None, kept) == {}  # trained elsewhere without its history.csv


def test_class_fusion_is_a_weighted_geometric_mean():
    from maskwatch.detect import fuse_class_probabilities

    classifier = np.array([[0.6, 0.3, 0.1], [0.98, 0.01, 0.01]])
    detector = np.array([[0.2, 0.7, 0.1], [0.0, 0.5, 0.5]])  # an exact zero, as int8 may give
    np.testing.assert_allclose(fuse_class_probabilities(classifier, detector, 1.0), detector)
    fused = fuse_class_probabilities(classifier, detector, 0.5)
    expected = np.sqrt(classifier[0] * detector[0])
    np.testing.assert_allclose(fused[0], expected / expected.sum(), rtol=1e-5)
    np.testing.assert_allclose(fused.sum(axis=1), 1.0, rtol=1e-6)
    # Where one opinion rules a class out, the fused probability of that class stays low.
    assert fused[1].argmax() != 0 and np.isfinite(fused).all()
    weighted = fuse_class_probabilities(classifier, detector, 0.25)
    expected = classifier[0] ** 0.75 * detector[0] ** 0.25
    np.testing.assert_allclose(weighted[0], expected / expected.sum(), rtol=1e-5)


def test_a_starting_models_photos_come_from_its_record_and_a_bad_record_gives_none(tmp_path):
    """Read after training, so a record that is missing or not maskwatch's must not fail the run."""
    import json

    from maskwatch.train_detector import initial_model_photos

    start = tmp_path / "face_detector.keras"
    config = DetectorTrainConfig(initial_model=start)
    assert initial_model_photos(DetectorTrainConfig()) == set()
    assert initial_model_photos(config) == set()  # no train_config.json beside it
    record = tmp_path / "train_config.json"
    record.write_text(json.dumps({"trained_on_photos": ["maksssksksss1", "maksssksksss7"]}))
    assert initial_model_photos(config) == {"maksssksksss1", "maksssksksss7"}
    for broken in ("[]", "{not json", '{"trained_on_photos": "maksssksksss1"}', "null"):
        record.write_text(broken)
        assert initial_model_photos(config) == set(), broken
