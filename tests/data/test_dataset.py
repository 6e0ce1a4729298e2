"""Data tests on the real shared data set: schema, counts, decoding, leakage, the original PNG format."""

import json

import numpy as np
import pandas as pd
import pytest

from maskwatch.data import FACE_COLUMNS, scan_dataset, split_by_photo
from maskwatch.preprocessing import read_image


@pytest.fixture(scope="module")
def full_scan(data_dir):
    return scan_dataset(data_dir)


def test_schema_and_counts(full_scan):
    faces = full_scan.faces
    assert list(faces.columns) == FACE_COLUMNS
    assert full_scan.photos_seen == 853 and faces.photo_id.nunique() == 853
    assert faces.label.value_counts().to_dict() == {"with_mask": 3232, "without_mask": 717,
                                                     "mask_weared_incorrect": 123}
    assert (faces.xmax > faces.xmin).all() and (faces.ymax > faces.ymin).all()
    assert (faces.xmin >= 0).all() and (faces.xmax <= faces.photo_width).all()
    # Only boxes a pixel past the border are found in this data set; they are clipped and reported.
    assert set(full_scan.issue_counts()) <= {"box_clipped"}


def test_every_image_decodes_with_the_annotated_size(full_scan):
    photos = full_scan.faces.drop_duplicates("image_path")
    for row in photos.itertuples():
        image = read_image(row.image_path)
        assert image.shape == (row.photo_height, row.photo_width, 3), row.image_path


@pytest.fixture(scope="module")
def scene_faces(full_scan):
    from maskwatch.config import DataConfig
    from maskwatch.data import with_scene_ids

    return with_scene_ids(full_scan.faces, DataConfig())


def test_real_split_by_photo(scene_faces):
    train, val, test = split_by_photo(scene_faces, 0.15, 0.15, seed=42)
    for first, second in [(train, test), (train, val), (val, test)]:
        assert not set(first.photo_id) & set(second.photo_id)
        assert not set(first.scene_id) & set(second.scene_id)  # nor copies and burst shots of one scene
    assert [frame.photo_id.nunique() for frame in (train, val, test)] == [597, 126, 130]
    for frame in (val, test):
        assert (frame.label == "mask_weared_incorrect").sum() >= 15


def test_every_copy_of_a_photo_is_found(full_scan, scene_faces):
    """The data set holds five byte-identical pairs of photos, each annotated twice (boxes a pixel apart): the
    scene check must put each pair in one scene. The check also finds re-encoded copies and burst shots
    (similar_photos.png in the data report shows them all)."""
    import hashlib

    from maskwatch.data import similar_photos

    photos = full_scan.faces.drop_duplicates("photo_id")
    by_bytes = photos.groupby(photos["image_path"].map(lambda path: hashlib.md5(open(path, "rb").read()).digest()))
    copies = [sorted(group.photo_id) for _, group in by_bytes if len(group) > 1]
    assert len(copies) == 5
    scene_of = scene_faces.drop_duplicates("photo_id").set_index("photo_id")["scene_id"]
    assert all(scene_of[first] == scene_of[second] for first, second in copies)
    scenes = similar_photos(scene_faces)
    assert max(map(len, scenes)) <= 8  # look-alikes do not chain into one big clump
    assert 5 <= len(scenes) <= 60


def test_original_png_sample_reads_like_the_jpeg_copy(png_sample_dir, data_dir, full_scan):
    scan = scan_dataset(png_sample_dir)
    assert scan.photos_seen >= 20 and not set(scan.issue_counts()) - {"box_clipped"}
    assert scan.faces.image_path.str.endswith(".png").all()
    jpg = full_scan.faces[full_scan.faces.photo_id.isin(scan.faces.photo_id)]
    scan.faces = scan.faces[scan.faces.photo_id.isin(jpg.photo_id)]
    cols = ["photo_id", "label", "xmin", "ymin", "xmax", "ymax"]
    pd.testing.assert_frame_equal(scan.faces[cols].reset_index(drop=True), jpg[cols].reset_index(drop=True))
    png_image = read_image(png_sample_dir / "images" / "maksssksksss10.png")  # RGBA on disk
    jpg_image = read_image(data_dir / "images" / "maksssksksss10.jpg")
    assert png_image.shape == jpg_image.shape and png_image.shape[2] == 3
    assert np.abs(png_image.astype(int) - jpg_image.astype(int)).mean() < 3  # JPEG q95 vs lossless


def test_prepare_writes_crops_report_and_reuses_cache(small_prepared, settings_factory):
    prepared = small_prepared
    faces = prepared.all_faces
    assert len(faces) >= 30
    assert {"crop_path", "label", "photo_id", "xmin", "ymin", "xmax", "ymax", "split"} <= set(faces.columns)
    first = read_image(faces.crop_path.iloc[0])
    assert first.shape == (160, 160, 3)
    report_dir = prepared.output_dir.parents[1] / "reports" / "data"
    report = json.loads((report_dir / "data_report.json").read_text())
    assert report["faces_kept"] == len(faces) and report["data_hash"] == prepared.data_hash
    for name in ("face_sizes.png", "sample_crops.png", "class_counts.csv", "splits.csv"):
        assert (report_dir / name).stat().st_size > 0
    for frame in (prepared.train_df, prepared.val_df, prepared.test_df):
        assert (frame.label == "mask_weared_incorrect").any()
    for name in ("train", "val", "test"):  # by name, as `maskwatch evaluate --split` asks for it
        assert set(prepared.split(name)["split"]) == {name}
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        prepared.split("holdout")


def test_detector_photos_split_exactly_like_the_classifier_crops(small_prepared, data_dir, tmp_path):
    """split_faces (the detector's photos, never cropped) puts every photo where prepare_data put its crops, so
    the detector never trains on a photo whose faces the classifier is tested on."""
    from maskwatch.config import load_settings
    from maskwatch.data import split_faces

    settings = load_settings(None, "full", {"paths": {"work_dir": str(tmp_path)},
                                            "data": {"source_dir": str(data_dir), "max_photos": 24}}, environ={})
    frames = split_faces(settings)
    prepared = (small_prepared.train_df, small_prepared.val_df, small_prepared.test_df)
    for faces, crops in zip(frames, prepared):
        assert set(faces.photo_id) == set(crops.photo_id) and len(faces) == len(crops)


def test_prepare_keeps_a_photo_and_its_copy_in_one_split_and_shows_them(data_dir, tmp_path):
    import shutil

    from maskwatch.config import load_settings
    from maskwatch.data import prepare_data

    source = tmp_path / "voc"
    for folder, suffix in (("images", "jpg"), ("annotations", "xml")):
        (source / folder).mkdir(parents=True)
        for number in (146, 219, 0, 1, 2, 3, 5, 6, 7, 8):  # 146 and 219 are one photo, annotated twice
            shutil.copy(data_dir / folder / f"maksssksksss{number}.{suffix}", source / folder)
    settings = load_settings(None, "full", {"paths": {"work_dir": str(tmp_path / "work")},
                                            "data": {"source_dir": str(source)}}, environ={})
    prepared, _ = prepare_data(settings)
    assert prepared.report["similar_photos"] == [["maksssksksss146", "maksssksksss219"]]
    faces = prepared.all_faces
    assert faces[faces.photo_id.isin(["maksssksksss146", "maksssksksss219"])]["split"].nunique() == 1
    assert (tmp_path / "work" / "reports" / "data" / "similar_photos.png").stat().st_size > 0
