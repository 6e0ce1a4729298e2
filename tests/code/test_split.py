import numpy as np
import pandas as pd

from maskwatch.data import class_weights, oversample, split_by_photo, subsample_photos


def synthetic_faces(n_photos=200, seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_photos):
        labels = rng.choice(["with_mask", "without_mask", "mask_weared_incorrect"], size=rng.integers(1, 6),
                            p=[0.8, 0.17, 0.03])
        rows += [{"photo_id": f"p{p}", "label": label, "xmin": i, "ymin": 0, "xmax": i + 10, "ymax": 10}
                 for i, label in enumerate(labels)]
    return pd.DataFrame(rows)


def test_split_has_no_photo_leakage_and_all_classes():
    faces = synthetic_faces()
    train, val, test = split_by_photo(faces, 0.15, 0.15, seed=1)
    photos = [set(frame.photo_id) for frame in (train, val, test)]
    assert not (photos[0] & photos[1]) and not (photos[0] & photos[2]) and not (photos[1] & photos[2])
    assert len(train) + len(val) + len(test) == len(faces)
    for frame in (train, val, test):
        assert set(frame.label) == {"with_mask", "without_mask", "mask_weared_incorrect"}


def test_split_is_seeded():
    faces = synthetic_faces()
    first = split_by_photo(faces, 0.15, 0.15, seed=3)[2]
    again = split_by_photo(faces, 0.15, 0.15, seed=3)[2]
    other = split_by_photo(faces, 0.15, 0.15, seed=4)[2]
    assert list(first.photo_id) == list(again.photo_id)
    assert set(first.photo_id) != set(other.photo_id)


def test_subsample_keeps_rare_classes():
    faces = synthetic_faces(400)
    small = subsample_photos(faces, 40, seed=0)
    assert 35 <= small.photo_id.nunique() <= 50
    assert (small.label == "mask_weared_incorrect").any()


def test_class_weights_and_oversampling():
    train = pd.DataFrame({"label": ["with_mask"] * 100 + ["without_mask"] * 25 + ["mask_weared_incorrect"] * 4})
    balanced = class_weights(train, power=1.0)
    assert np.isclose(balanced[2] / balanced[0], 25.0) and np.isclose(balanced[1] / balanced[0], 4.0)
    counts = np.array([100, 25, 4])
    assert np.isclose(sum(balanced[i] * counts[i] for i in range(3)) / counts.sum(), 1.0)
    assert class_weights(train, power=0.0) == {0: 1.0, 1: 1.0, 2: 1.0}
    grown = oversample(train, power=0.5, seed=0).label.value_counts()
    assert grown["with_mask"] == 100 and grown["without_mask"] == 50 and grown["mask_weared_incorrect"] == 20


def test_label_indices_follow_class_order():
    from maskwatch.data import label_indices

    frame = pd.DataFrame({"label": ["without_mask", "mask_weared_incorrect", "with_mask"]})
    assert label_indices(frame).tolist() == [1, 2, 0]
