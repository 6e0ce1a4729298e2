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


def test_the_photos_of_one_scene_go_to_one_split():
    """Copies and burst shots of one scene (scene_id) must not straddle splits, or test faces are seen in
    training; without scene ids the same photos do land in different splits."""
    faces = synthetic_faces(300)
    faces["scene_id"] = faces["photo_id"].map(lambda photo_id: f"s{int(photo_id[1:]) // 3}")  # 3 photos a scene
    frames = split_by_photo(faces, 0.15, 0.15, seed=1)
    scenes = [set(frame.scene_id) for frame in frames]
    assert not (scenes[0] & scenes[1]) and not (scenes[0] & scenes[2]) and not (scenes[1] & scenes[2])
    assert sum(len(frame) for frame in frames) == len(faces) and all(len(frame) for frame in frames)
    by_photo = split_by_photo(faces.drop(columns="scene_id"), 0.15, 0.15, seed=1)
    split_of = {photo_id: i for i, frame in enumerate(by_photo) for photo_id in frame.photo_id}
    assert faces.groupby("scene_id")["photo_id"].agg(lambda ids: len({split_of[i] for i in ids})).max() > 1


def smooth_picture(seed: int, size=(240, 320)) -> np.ndarray:
    """A photo-like picture: smooth random shapes, not noise (a hash of noise says nothing about photos)."""
    from PIL import Image

    coarse = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize(size[::-1], Image.BICUBIC))


def test_copies_and_near_copies_of_a_photo_are_one_scene(tmp_path):
    from PIL import Image

    from maskwatch.data import similar_photo_groups

    scene, other = smooth_picture(0), smooth_picture(1)
    paths = [tmp_path / name for name in ("a.png", "a_copy.jpg", "a_moved.png", "b.png", "broken.jpg")]
    Image.fromarray(scene).save(paths[0])
    Image.fromarray(scene).save(paths[1], quality=60)  # re-encoded
    Image.fromarray(np.roll(scene, (3, 4), axis=(0, 1))).save(paths[2])  # the camera moved a little
    Image.fromarray(other).save(paths[3])
    paths[4].write_bytes(b"\xff\xd8 not a photo")
    assert similar_photo_groups([str(path) for path in paths], 12, 0.8) == [0, 0, 0, 3, 4]
    assert similar_photo_groups([str(path) for path in paths], 0, 1.01) == [0, 1, 2, 3, 4]  # thresholds hold


def test_a_mirrored_copy_is_found_only_by_signing_it_mirrored(tmp_path):
    """The scene check compares photos as they are; `benchmarks/similar_photos.py` looks for mirrored and rotated
    copies by signing each photo turned. The turned signature must be the turned file's own."""
    from PIL import Image

    from maskwatch.data import photo_signature, similar_photo_groups

    picture = smooth_picture(2)
    paths = [tmp_path / "a.png", tmp_path / "a_mirrored.png", tmp_path / "a_rotated.png"]
    Image.fromarray(picture).save(paths[0])
    Image.fromarray(picture[:, ::-1]).save(paths[1])
    Image.fromarray(np.rot90(picture)).save(paths[2])  # numpy turns counter-clockwise, as PIL's ROTATE_90
    assert similar_photo_groups([str(path) for path in paths], 16, 0.8) == [0, 1, 2]
    for path, transpose in [(paths[1], Image.Transpose.FLIP_LEFT_RIGHT), (paths[2], Image.Transpose.ROTATE_90)]:
        turned_hash, turned_thumbnail = photo_signature(paths[0], transpose)
        file_hash, file_thumbnail = photo_signature(path)
        assert turned_hash == file_hash
        np.testing.assert_allclose(turned_thumbnail, file_thumbnail, atol=1e-5)
