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


def test_real_split_by_photo(full_scan):
    train, val, test = split_by_photo(full_scan.faces, 0.15, 0.15, seed=42)
    assert not set(train.photo_id) & set(test.photo_id)
    assert not set(train.photo_id) & set(val.photo_id)
    assert not set(val.photo_id) & set(test.photo_id)
    assert [frame.photo_id.nunique() for frame in (train, val, test)] == [597, 128, 128]
    for frame in (val, test):
        assert (frame.label == "mask_weared_incorrect").sum() >= 15


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
