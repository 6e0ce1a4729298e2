import shutil

import numpy as np
import pytest
from conftest import phone_jpeg
from PIL import Image

from maskwatch.data import DataError, UnknownLabelError, parse_voc_annotation, scan_dataset, write_crops
from maskwatch.preprocessing import CropSpec, extract_face, read_image

VOC = """<annotation><filename>{filename}</filename><size><width>{w}</width><height>{h}</height><depth>3</depth></size>
{objects}</annotation>"""
OBJ = ("<object><name>{label}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
       "<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>")


def make_voc(root, data_dir, entries):
    """entries: {stem: (xml text or None, copy_image: bool)} using a real photo as the image."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for stem, (xml, copy_image) in entries.items():
        if xml is not None:
            (root / "annotations" / f"{stem}.xml").write_text(xml)
        if copy_image:
            shutil.copy(data_dir / "images" / "maksssksksss0.jpg", root / "images" / f"{stem}.jpg")
    return root


def voc(stem, objects, w=512, h=366):
    return VOC.format(filename=f"{stem}.jpg", w=w, h=h,
                      objects="".join(OBJ.format(label=label, b=box) for label, box in objects))


def test_parse_real_annotation(data_dir):
    filename, size, objects = parse_voc_annotation(data_dir / "annotations" / "maksssksksss0.xml")
    assert filename == "maksssksksss0.jpg" and size == (512, 366)
    assert objects[0] == ("without_mask", (79.0, 105.0, 109.0, 142.0))
    assert [label for label, _ in objects] == ["without_mask", "with_mask", "without_mask"]


def test_bad_entries_are_reported_not_dropped_silently(tmp_path, data_dir):
    root = make_voc(tmp_path / "voc", data_dir, {
        "good": (voc("good", [("with_mask", (10, 10, 50, 50))]), True),
        "broken": ("<annotation><filename>broken.jpg</filen", True),
        "nobox": ("<annotation><object><name>with_mask</name></object></annotation>", True),
        "noimage": (voc("noimage", [("with_mask", (10, 10, 50, 50))]), False),
        "degenerate": (voc("degenerate", [("with_mask", (50, 10, 50, 40)), ("without_mask", (1, 1, 30, 30))]), True),
        "outside": (voc("outside", [("with_mask", (600, 10, 700, 50))]), True),
        "clipped": (voc("clipped", [("without_mask", (490, 300, 520, 370))]), True),
    })
    scan = scan_dataset(root)
    assert scan.issue_counts() == {"malformed_xml": 2, "missing_image": 1, "degenerate_box": 1,
                                   "box_outside": 1, "box_clipped": 1}
    files = {issue.kind: issue.file for issue in scan.issues}
    assert files["missing_image"] == "noimage.xml" and files["box_outside"] == "outside.xml"
    assert sorted(scan.faces["photo_id"]) == ["clipped", "degenerate", "good"]
    clipped = scan.faces[scan.faces.photo_id == "clipped"].iloc[0]
    assert (clipped.xmax, clipped.ymax) == (512.0, 366.0)


def test_unknown_label_is_an_error_naming_file_and_label(tmp_path, data_dir):
    root = make_voc(tmp_path / "voc", data_dir, {"x": (voc("x", [("mask_on_chin", (1, 1, 20, 20))]), True)})
    with pytest.raises(UnknownLabelError, match=r"x\.xml: unknown label 'mask_on_chin'"):
        scan_dataset(root)


def test_non_numeric_box_is_malformed(tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text(voc("a", [("with_mask", ("ten", 1, 20, 20))]))
    with pytest.raises(DataError, match="non-numeric box"):
        parse_voc_annotation(xml)
    for box in [("nan", 1, 20, 20), (1, 1, "inf", 20), (1, "-Infinity", 20, 20)]:
        xml.write_text(voc("a", [("with_mask", box)]))
        with pytest.raises(DataError, match="non-numeric box"):
            parse_voc_annotation(xml)


def test_unknown_layout_is_a_clear_error(tmp_path):
    (tmp_path / "random").mkdir()
    with pytest.raises(DataError, match="neither a VOC data set"):
        scan_dataset(tmp_path)


def test_folder_per_class_layout(tmp_path, data_dir):
    for label in ("with_mask", "without_mask"):
        (tmp_path / label).mkdir()
        shutil.copy(data_dir / "images" / "maksssksksss1.jpg", tmp_path / label / "a.jpg")
    (tmp_path / "without_mask" / "bad.png").write_bytes(b"nope")
    scan = scan_dataset(tmp_path)
    assert scan.layout == "folders"
    assert sorted(scan.faces["label"]) == ["with_mask", "without_mask"]
    assert scan.issue_counts() == {"unreadable_image": 1}
    row = scan.faces.iloc[0]
    assert (row.xmin, row.ymin) == (0.0, 0.0) and row.xmax == row.photo_width
    (tmp_path / "chin_mask").mkdir()
    with pytest.raises(UnknownLabelError, match="chin_mask"):
        scan_dataset(tmp_path)


def test_folder_layout_crops_a_sideways_phone_photo_whole(tmp_path, data_dir):
    (tmp_path / "with_mask").mkdir()
    photo = tmp_path / "with_mask" / "selfie.jpg"
    photo.write_bytes(phone_jpeg(Image.open(data_dir / "images" / "maksssksksss1.jpg")))
    scan = scan_dataset(tmp_path)
    upright = read_image(photo)
    face = scan.faces.iloc[0]
    assert (face.xmax, face.ymax) == (upright.shape[1], upright.shape[0])  # the whole upright photo
    spec = CropSpec(margin=0.0, square=False, size=64)
    cropped = write_crops(scan.faces, spec, tmp_path / "crops", issues := [])
    assert issues == []
    np.testing.assert_array_equal(read_image(cropped.iloc[0].crop_path),
                                  extract_face(upright, (0, 0, upright.shape[1], upright.shape[0]), spec))


def test_photo_that_does_not_match_its_annotated_size_is_reported_and_left_out(tmp_path, data_dir):
    root = make_voc(tmp_path / "voc", data_dir, {
        "good": (voc("good", [("with_mask", (10, 10, 50, 50))]), True),
        "wrong": (voc("wrong", [("with_mask", (10, 10, 50, 50))], w=640, h=480), True),
        "sideways": (voc("sideways", [("with_mask", (10, 10, 50, 50)), ("without_mask", (60, 10, 90, 50))]), False),
    })
    (root / "images" / "sideways.jpg").write_bytes(phone_jpeg(Image.open(data_dir / "images" / "maksssksksss0.jpg")))
    scan = scan_dataset(root)
    assert scan.issue_counts() == {} and len(scan.faces) == 4
    issues = []
    cropped = write_crops(scan.faces, CropSpec(), tmp_path / "crops", issues)
    assert list(cropped["photo_id"]) == ["good"]
    reasons = {issue.file: issue.detail for issue in issues if issue.kind == "size_mismatch"}
    assert reasons["wrong.jpg"] == ("annotated as 640x480 but the photo decodes as 512x366; "
                                    "its faces are left out")
    assert reasons["sideways.jpg"].startswith("annotated as 512x366 but the photo decodes as 366x512: the file "
                                              "is stored sideways with EXIF orientation 6")
    assert len(issues) == 2


def test_a_second_annotation_of_one_photo_is_reported_and_left_out(tmp_path, data_dir):
    """Two XML files naming one image used to be two photos: its faces counted twice, and free to land in
    training and in test."""
    root = make_voc(tmp_path / "voc", data_dir, {"a": (voc("a", [("with_mask", (10, 10, 50, 50))]), True)})
    (root / "annotations" / "b.xml").write_text(voc("a", [("without_mask", (12, 10, 52, 50))]))  # names a.jpg
    scan = scan_dataset(root)
    assert scan.faces["photo_id"].tolist() == ["a"] and scan.faces["label"].tolist() == ["with_mask"]
    assert [(issue.kind, issue.file, issue.detail) for issue in scan.issues] == [
        ("duplicate_annotation", "b.xml", "a.jpg is already annotated by a.xml")]
