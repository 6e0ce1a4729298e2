"""Box overlap, box matching, and the face tracker that steadies labels in video."""

import numpy as np
import pytest

from maskwatch.config import RealtimeConfig
from maskwatch.detect import Detection
from maskwatch.preprocessing import box_iou, match_boxes
from maskwatch.realtime import FaceTracker

NAMES = ("with_mask", "without_mask", "mask_weared_incorrect")


def face(box, probabilities) -> Detection:
    best = int(np.argmax(probabilities))
    return Detection(box, NAMES[best], probabilities[best], dict(zip(NAMES, probabilities)), 0.9)


def test_box_iou_by_hand():
    others = np.array([[0, 0, 10, 10], [5, 0, 15, 10], [20, 20, 30, 30]])
    np.testing.assert_allclose(box_iou((0, 0, 10, 10), others), [1.0, 50 / 150, 0.0])
    assert box_iou((0, 0, 10, 10), []).shape == (0,)


def test_match_boxes_takes_the_best_overlaps_first_and_each_box_once():
    boxes = [(0, 0, 10, 10), (4, 0, 14, 10), (100, 100, 110, 110)]
    others = [(5, 0, 15, 10), (0, 0, 10, 10)]
    # Box 1 overlaps other 0 best (9/11); box 0 then gets other 1 (exact). Box 2 overlaps nothing.
    assert match_boxes(boxes, others, min_iou=0.3) == {0: 1, 1: 0}
    # Box 0 and box 1 both want other 0 only: the higher overlap wins, the other stays unmatched.
    assert match_boxes(boxes[:2], others[:1], min_iou=0.3) == {1: 0}
    assert match_boxes(boxes, others, min_iou=1.0) == {0: 1}
    assert match_boxes([], others, 0.3) == {} and match_boxes(boxes, [], 0.3) == {}


def test_a_face_keeps_its_track_and_its_label_through_a_one_frame_flip():
    tracker = FaceTracker(RealtimeConfig(smoothing=0.5))
    first = tracker.update([face((10, 10, 50, 50), (0.9, 0.1, 0.0)), face((200, 10, 240, 50), (0.2, 0.8, 0.0))])
    assert [d.track_id for d in first] == [0, 1] and [d.label for d in first] == ["with_mask", "without_mask"]
    # The first face, moved a little, looks unmasked for one frame: the average keeps it masked.
    flipped = tracker.update([face((12, 11, 52, 51), (0.3, 0.7, 0.0))])[0]
    assert flipped.track_id == 0 and flipped.label == "with_mask"
    assert flipped.probabilities == pytest.approx({"with_mask": 0.6, "without_mask": 0.4, "mask_weared_incorrect": 0})
    assert flipped.score == pytest.approx(0.6) and flipped.box == (12, 11, 52, 51) and flipped.face_score == 0.9
    # A lasting change wins on its second frame: 0.5 x 0.6 + 0.5 x 0.3 = 0.45 against 0.55.
    changed = tracker.update([face((12, 11, 52, 51), (0.3, 0.7, 0.0))])[0]
    assert changed.label == "without_mask" and changed.score == pytest.approx(0.55)
    assert sum(changed.probabilities.values()) == pytest.approx(1.0)


def test_without_smoothing_every_frame_stands_alone_but_faces_are_still_tracked():
    tracker = FaceTracker(RealtimeConfig(smoothing=0.0))
    tracker.update([face((10, 10, 50, 50), (0.9, 0.1, 0.0))])
    alone = tracker.update([face((10, 10, 50, 50), (0.3, 0.7, 0.0))])[0]
    assert alone.label == "without_mask" and alone.score == pytest.approx(0.7) and alone.track_id == 0


def test_a_track_ends_after_max_missed_frames_unseen():
    tracker = FaceTracker(RealtimeConfig(track_max_missed=2))
    box = (10, 10, 50, 50)
    assert tracker.update([face(box, (0.9, 0.1, 0.0))])[0].track_id == 0
    tracker.update([]), tracker.update([])
    assert tracker.update([face(box, (0.9, 0.1, 0.0))])[0].track_id == 0  # unseen for 2 frames: the same face
    tracker.update([]), tracker.update([]), tracker.update([])
    assert tracker.update([face(box, (0.9, 0.1, 0.0))])[0].track_id == 1  # unseen for 3: a new track


def test_a_face_that_moved_too_far_is_a_new_track():
    tracker = FaceTracker(RealtimeConfig(track_min_iou=0.3))
    tracker.update([face((10, 10, 50, 50), (0.9, 0.1, 0.0))])
    moved = tracker.update([face((40, 10, 80, 50), (0.1, 0.9, 0.0))])[0]  # IoU 10/70 with the box before
    assert moved.track_id == 1 and moved.label == "without_mask" and moved.score == pytest.approx(0.9)
