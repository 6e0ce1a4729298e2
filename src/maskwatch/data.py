"""Data: find the data set, parse and validate it, crop faces, split by photo, report, tf.data.

Two source layouts are read:
- PASCAL VOC: ``images/`` + ``annotations/*.xml`` (the Kaggle "Face Mask Detection" set, as
  re-encoded JPEGs or as the original RGBA PNGs whose XML names the .png);
- folder per class: ``with_mask/``, ``without_mask/``, ``mask_weared_incorrect/`` of face images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import pandas as pd
from maskwatch.progress import progress_bar

from maskwatch.config import CLASS_NAMES, AugmentConfig, DataConfig, Settings
from maskwatch.preprocessing import IMAGE_SUFFIXES, CropSpec, ImageDecodeError, extract_face, read_image

log = logging.getLogger(__name__)

FACE_COLUMNS = ["photo_id", "image_path", "label", "xmin", "ymin", "xmax", "ymax", "photo_width", "photo_height"]
SPLITS = ("train", "val", "test")
# Rarest class first: a photo is stratified by the rarest class it holds.
STRATUM_ORDER = ("mask_weared_incorrect", "without_mask", "with_mask")


class DataError(Exception):
    """The data set cannot be used as it is; the message says which file and why."""


class UnknownLabelError(DataError):
    pass


@dataclass
class DataIssue:
    kind: str  # malformed_xml | missing_image | unreadable_image | size_mismatch | degenerate_box | box_outside
    #          | box_clipped
    file: str
    detail: str


@dataclass
class ScanResult:
    faces: pd.DataFrame
    issues: list[DataIssue] = field(default_factory=list)
    photos_seen: int = 0
    layout: str = "voc"

    def issue_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for issue in self.issues:
            counts[issue.kind] = counts.get(issue.kind, 0) + 1
        return counts


@dataclass
class PreparedData:
    train_df: pd.DataFrame
    val_df: pd.DataFrame
    test_df: pd.DataFrame
    crop_spec: CropSpec
    data_hash: str
    output_dir: Path
    report: dict

    @property
    def all_faces(self) -> pd.DataFrame:
        return pd.concat([self.train_df, self.val_df, self.test_df], ignore_index=True)

    def split(self, name: str) -> pd.DataFrame:
        """The faces of one split by name: train, val or test."""
        frames = {"train": self.train_df, "val": self.val_df, "test": self.test_df}
        if name not in frames:
            raise ValueError(f"unknown split {name!r}: expected one of {', '.join(frames)}")
        return frames[name]


# ----------------------------------------------------------------------------- locating


def locate_dataset(data: DataConfig, work_dir: Path) -> Path:
    """The folder to read: the configured one, an earlier download, or a fresh Kaggle download."""
    if data.source_dir is not None:
        source = Path(data.source_dir).expanduser()
        if not source.is_dir():
            raise DataError(f"data folder {source} does not exist (set data.source_dir or MASKWATCH_DATA_DIR)")
        return source
    downloaded = work_dir / "downloads" / data.kaggle_dataset.replace("/", "__")
    if (downloaded / "annotations").is_dir():
        return downloaded
    return download_from_kaggle(data.kaggle_dataset, downloaded)


def kaggle_credentials_present(environ: dict[str, str] | None = None) -> bool:
    environ = dict(os.environ) if environ is None else environ
    if environ.get("KAGGLE_USERNAME") and environ.get("KAGGLE_KEY"):
        return True
    config_dir = Path(environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (config_dir / "kaggle.json").is_file() or bool(environ.get("KAGGLE_API_TOKEN"))


def download_from_kaggle(dataset: str, destination: Path) -> Path:
    if not kaggle_credentials_present():
        raise DataError(
            "no data set found: set data.source_dir (or MASKWATCH_DATA_DIR) to a folder holding images/ and "
            f"annotations/, or give a Kaggle token (~/.kaggle/kaggle.json or KAGGLE_USERNAME/KAGGLE_KEY) so "
            f"'{dataset}' can be downloaded"
        )
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError as err:
        raise DataError("the Kaggle client is not installed: pip install 'maskwatch[kaggle]'") from err
    log.info("downloading %s from Kaggle to %s", dataset, destination)

    def download(staging: Path) -> None:
        api = KaggleApi()
        api.authenticate()
        api.dataset_download_files(dataset, path=str(staging), unzip=True, quiet=False)
        if not (staging / "annotations").is_dir():
            raise DataError(f"the Kaggle download of {dataset} has no annotations/ folder")

    try:
        return fill_whole(destination, download)
    except DataError:
        raise
    except Exception as err:  # the client's own errors: no network, a refused token, a dataset gone
        raise DataError(f"the Kaggle download of {dataset} failed ({type(err).__name__}: {_brief(err)}). Check the "
                        f"network and the Kaggle token, or download it from https://www.kaggle.com/datasets/"
                        f"{dataset}, unzip it and set MASKWATCH_DATA_DIR to that folder") from err


def _brief(error: Exception, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit] + "..."


def fill_whole(destination: Path, fill: Callable[[Path], None]) -> Path:
    """Let `fill` write into a hidden folder beside `destination`, then rename that into place.

    A download stopped halfway (Ctrl-C, a full disk, a dropped connection) leaves nothing a later run could take
    for the whole data set: `locate_dataset` trusts any download folder that has annotations/.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=destination.parent, prefix=f".{destination.name}-part-"))
    try:
        fill(staging)
        shutil.rmtree(destination, ignore_errors=True)  # what an older version left half filled
        os.rename(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return destination


# ----------------------------------------------------------------------------- parsing


def parse_voc_annotation(xml_path: Path) -> tuple[str, tuple[int, int] | None, list[tuple[str, tuple[float, ...]]]]:
    """(image file name, (width, height) or None, [(label, (xmin, ymin, xmax, ymax)), ...]).

    Raises DataError for malformed XML; the label is returned as written (validated by the caller).
    """
    try:
        root = ET.parse(xml_path).getroot()
    except (ET.ParseError, OSError) as err:
        raise DataError(f"{xml_path.name}: malformed XML ({err})") from err
    filename = (root.findtext("filename") or "").strip()
    size = None
    size_node = root.find("size")
    if size_node is not None:
        try:
            size = (int(size_node.findtext("width")), int(size_node.findtext("height")))
        except (TypeError, ValueError):
            size = None
    objects = []
    for index, obj in enumerate(root.iter("object")):
        label = (obj.findtext("name") or "").strip()
        node = obj.find("bndbox")
        if node is None:
            raise DataError(f"{xml_path.name}: object {index} has no <bndbox>")
        try:
            box = tuple(float((node.findtext(tag) or "").strip()) for tag in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError as err:
            raise DataError(f"{xml_path.name}: object {index} has a non-numeric box ({err})") from err
        if not all(math.isfinite(value) for value in box):  # float() reads "nan" and "inf"; NaN passes every check
            raise DataError(f"{xml_path.name}: object {index} has a non-numeric box {box}")
        objects.append((label, box))
    return filename, size, objects


def _find_image(images_dir: Path, filename: str, xml_path: Path) -> Path | None:
    if filename:
        named = images_dir / Path(filename).name
        if named.is_file():
            return named
    stem = Path(filename).stem if filename else xml_path.stem
    for suffix in IMAGE_SUFFIXES:
        candidate = images_dir / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _validate_box(box, size, xml_name: str, issues: list[DataIssue]):
    """Return the box clipped to the photo, or None if it is unusable (reported)."""
    xmin, ymin, xmax, ymax = box
    if xmax <= xmin or ymax <= ymin:
        issues.append(DataIssue("degenerate_box", xml_name, f"box {box} has no area"))
        return None
    if size is None:
        return box
    width, height = size
    clipped = (max(xmin, 0.0), max(ymin, 0.0), min(xmax, float(width)), min(ymax, float(height)))
    if clipped[2] - clipped[0] < 1 or clipped[3] - clipped[1] < 1:
        issues.append(DataIssue("box_outside", xml_name, f"box {box} lies outside the {width}x{height} photo"))
        return None
    if clipped != tuple(box):
        issues.append(DataIssue("box_clipped", xml_name, f"box {box} clipped to the {width}x{height} photo"))
    return clipped


def scan_voc(root: Path, class_names: Iterable[str] = CLASS_NAMES) -> ScanResult:
    class_names = tuple(class_names)
    annotations_dir, images_dir = root / "annotations", root / "images"
    if not annotations_dir.is_dir() or not images_dir.is_dir():
        raise DataError(f"{root} is not a VOC data set: it needs images/ and annotations/")
    xml_files = sorted(annotations_dir.glob("*.xml"), key=_natural_key)
    if not xml_files:
        raise DataError(f"{annotations_dir} holds no .xml annotations")
    rows, issues = [], []
    annotated_by: dict[Path, str] = {}  # image -> the annotation that claimed it first
    for xml_path in xml_files:
        try:
            filename, size, objects = parse_voc_annotation(xml_path)
        except DataError as err:
            issues.append(DataIssue("malformed_xml", xml_path.name, str(err)))
            continue
        for label, _ in objects:
            if label not in class_names:
                raise UnknownLabelError(f"{xml_path.name}: unknown label {label!r} (known: {', '.join(class_names)})")
        image_path = _find_image(images_dir, filename, xml_path)
        if image_path is None:
            issues.append(DataIssue("missing_image", xml_path.name, f"image {filename!r} not found in {images_dir}"))
            continue
        if image_path in annotated_by:
            # A second annotation of one image would count its faces twice, as two photos that could land in
            # different splits: the same faces in training and in test.
            issues.append(DataIssue("duplicate_annotation", xml_path.name,
                                    f"{image_path.name} is already annotated by {annotated_by[image_path]}"))
            continue
        annotated_by[image_path] = xml_path.name
        for label, box in objects:
            valid = _validate_box(box, size, xml_path.name, issues)
            if valid is None:
                continue
            rows.append({
                "photo_id": xml_path.stem, "image_path": str(image_path), "label": label,
                "xmin": valid[0], "ymin": valid[1], "xmax": valid[2], "ymax": valid[3],
                "photo_width": size[0] if size else -1, "photo_height": size[1] if size else -1,
            })
    return ScanResult(pd.DataFrame(rows, columns=FACE_COLUMNS), issues, len(xml_files), "voc")


# EXIF orientations 5-8 turn the stored picture a quarter: it is shown (and decoded) with width and height swapped.
QUARTER_TURN_ORIENTATIONS = (5, 6, 7, 8)
EXIF_ORIENTATION = 0x0112


def _upright_size(probe) -> tuple[int, int]:
    """(width, height) of an opened PIL image as decode_image returns it: phones store photos sideways with an
    EXIF orientation tag, which OpenCV applies and PIL's size ignores."""
    width, height = probe.size
    if probe.getexif().get(EXIF_ORIENTATION) in QUARTER_TURN_ORIENTATIONS:
        return height, width
    return width, height


def scan_class_folders(root: Path, class_names: Iterable[str] = CLASS_NAMES) -> ScanResult:
    from PIL import Image

    class_names = tuple(class_names)
    subdirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    unknown = [p.name for p in subdirs if p.name not in class_names]
    if unknown:
        raise UnknownLabelError(f"{root}: unknown class folder(s) {unknown} (known: {', '.join(class_names)})")
    rows, issues, seen = [], [], 0
    for class_dir in subdirs:
        for image_path in sorted(class_dir.iterdir(), key=_natural_key):
            if image_path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            seen += 1
            try:
                with Image.open(image_path) as probe:
                    width, height = _upright_size(probe)
            except Exception as err:  # PIL raises many types for bad files
                issues.append(DataIssue("unreadable_image", str(image_path.relative_to(root)), str(err)))
                continue
            rows.append({
                "photo_id": f"{class_dir.name}/{image_path.stem}", "image_path": str(image_path),
                "label": class_dir.name, "xmin": 0.0, "ymin": 0.0, "xmax": float(width), "ymax": float(height),
                "photo_width": width, "photo_height": height,
            })
    return ScanResult(pd.DataFrame(rows, columns=FACE_COLUMNS), issues, seen, "folders")


def scan_dataset(root: Path, class_names: Iterable[str] = CLASS_NAMES) -> ScanResult:
    root = Path(root)
    if (root / "annotations").is_dir():
        return scan_voc(root, class_names)
    if any((root / name).is_dir() for name in class_names):
        return scan_class_folders(root, class_names)
    raise DataError(
        f"{root} is neither a VOC data set (images/ + annotations/) nor a folder per class ({', '.join(class_names)})"
    )


def _natural_key(path: Path):
    digits = "".join(ch for ch in path.stem if ch.isdigit())
    return (path.stem.rstrip("0123456789"), int(digits) if digits else -1, path.name)


# ----------------------------------------------------------------------------- splitting


# The data set holds the same scene more than once: byte-identical copies annotated twice, re-encoded copies
# (one without a watermark) and burst shots of the same people a moment apart. Split apart, those faces would be
# in training and in test. Two photos are one scene when their 64-bit difference hashes are close *and* their grey
# thumbnails correlate: either alone also pairs unrelated photos (benchmarks/similar_photos.py shows every pair).
HASH_SIDE, THUMBNAIL_SIDE = 8, 16


def photo_signature(image_path: str | Path, transpose=None) -> tuple[int, np.ndarray] | None:
    """(64-bit difference hash, unit-length 16x16 grey thumbnail with its mean removed), or None when the file
    cannot be decoded (cropping reports it). `transpose` (a PIL `Image.Transpose`) signs the photo mirrored or
    rotated instead, to look for such copies."""
    from PIL import Image

    try:
        with Image.open(image_path) as image:
            image.draft("L", (8 * THUMBNAIL_SIDE, 8 * THUMBNAIL_SIDE))  # a JPEG decodes at 1/2 to 1/8 size: fast
            grey = image.convert("L") if transpose is None else image.convert("L").transpose(transpose)
            small = np.asarray(grey.resize((HASH_SIDE + 1, HASH_SIDE), Image.BILINEAR), dtype=np.float32)
            thumbnail = np.asarray(grey.resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BILINEAR), dtype=np.float32)
    except Exception:  # PIL raises many types for bad files
        return None
    bits = (small[:, 1:] > small[:, :-1]).ravel()
    centred = thumbnail.ravel() - thumbnail.mean()
    return int(np.packbits(bits).view(">u8")[0]), centred / max(float(np.linalg.norm(centred)), 1e-6)


def photo_signatures(image_paths: list[str], transpose=None) -> tuple[np.ndarray, np.ndarray]:
    """Every photo's hash and thumbnail (see photo_signature), stacked; a photo that cannot be decoded gets 0 and
    a blank thumbnail, which correlates with nothing."""
    signatures = [photo_signature(path, transpose)
                  for path in progress_bar(image_paths, desc="comparing photos", unit="photo")]
    hashes = np.array([sig[0] if sig else 0 for sig in signatures], dtype=np.uint64)
    thumbnails = np.array([sig[1] if sig else np.zeros(THUMBNAIL_SIDE ** 2, np.float32) for sig in signatures])
    return hashes, thumbnails.reshape(len(image_paths), THUMBNAIL_SIDE ** 2)


def similar_photo_groups(image_paths: list[str], max_hash_distance: int, min_correlation: float,
                         block: int = 512) -> list[int]:
    """For each photo, the index of the first photo of its scene (itself when it has no look-alike)."""
    return groups_from_signatures(*photo_signatures(image_paths), max_hash_distance, min_correlation, block)


def signature_distances(hashes_a: np.ndarray, thumbnails_a: np.ndarray, hashes_b: np.ndarray,
                        thumbnails_b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every pair's hash distance in bits and thumbnail correlation (rows: the photos of a, columns: those of b)."""
    return np.bitwise_count(hashes_a[:, None] ^ hashes_b[None, :]), thumbnails_a @ thumbnails_b.T


def groups_from_signatures(hashes: np.ndarray, thumbnails: np.ndarray, max_hash_distance: int,
                           min_correlation: float, block: int = 512) -> list[int]:
    """similar_photo_groups on signatures already computed: two photos are one scene when their hashes differ in
    at most max_hash_distance bits and their thumbnails correlate at min_correlation or more; scenes chain."""
    parent = list(range(len(hashes)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, len(hashes), block):  # blocks keep memory linear in the number of photos
        distances, correlations = signature_distances(hashes[start:start + block], thumbnails[start:start + block],
                                                      hashes, thumbnails)
        for row, col in zip(*np.nonzero((distances <= max_hash_distance) & (correlations >= min_correlation))):
            first, second = sorted((root(start + int(row)), root(int(col))))
            parent[second] = first
    return [root(i) for i in range(len(hashes))]


def with_scene_ids(faces: pd.DataFrame, data: DataConfig) -> pd.DataFrame:
    """The faces with a scene_id column: the photo_id of the first photo of each photo's scene."""
    photos = faces.drop_duplicates("photo_id")[["photo_id", "image_path"]].reset_index(drop=True)
    if data.similar_photo_max_hash_distance is None:
        firsts = list(range(len(photos)))
    else:
        firsts = similar_photo_groups(photos["image_path"].tolist(), data.similar_photo_max_hash_distance,
                                      data.similar_photo_min_correlation)
    scene_of = dict(zip(photos["photo_id"], photos["photo_id"].iloc[firsts]))
    return faces.assign(scene_id=faces["photo_id"].map(scene_of))


def similar_photos(faces: pd.DataFrame) -> list[list[str]]:
    """The scenes that hold more than one photo, as lists of photo ids."""
    if "scene_id" not in faces:
        return []
    photos = faces.drop_duplicates("photo_id")
    groups = photos.groupby("scene_id", sort=False)["photo_id"].agg(list)
    scenes = [sorted(ids, key=lambda name: _natural_key(Path(name))) for ids in groups if len(ids) > 1]
    return sorted(scenes, key=lambda ids: _natural_key(Path(ids[0])))


def _split_unit(faces: pd.DataFrame) -> str:
    """The column whose values go to one split whole: the scene where scenes are known, else the photo."""
    return "scene_id" if "scene_id" in faces else "photo_id"


def photos_trained_on(frame: pd.DataFrame, all_faces: pd.DataFrame, trained_on: set[str]) -> set[str]:
    """The photos of `frame` (a split) that a model trained on, directly or through a copy or burst shot of the
    same scene: a model scored on them looks better than it is."""
    key = _split_unit(all_faces)
    seen_scenes = set(all_faces.loc[all_faces["photo_id"].isin(trained_on), key])
    return set(frame.loc[frame[key].isin(seen_scenes), "photo_id"])


def photo_strata(faces: pd.DataFrame, key: str = "photo_id") -> pd.Series:
    """One stratum per photo (or per scene, with key="scene_id"): the rarest class it holds."""
    rank = {name: i for i, name in enumerate(STRATUM_ORDER)}
    return faces.groupby(key)["label"].agg(lambda labels: min(labels, key=lambda label: rank.get(label, 99)))


def split_by_photo(
    faces: pd.DataFrame, val_fraction: float, test_fraction: float, seed: int
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Split whole photos, stratified by each photo's rarest class; seeded and reproducible. With a scene_id
    column, the photos of one scene (copies, burst shots) go to one split together."""
    rng = np.random.default_rng(seed)
    assignment: dict[str, str] = {}
    key = _split_unit(faces)
    strata = photo_strata(faces, key)
    for _, photos in strata.groupby(strata):
        ids = sorted(photos.index)
        rng.shuffle(ids)
        n = len(ids)
        n_test = int(round(n * test_fraction))
        n_val = int(round(n * val_fraction))
        if n >= 3:  # every split gets at least one photo of each stratum that can spare it
            n_test, n_val = max(n_test, 1), max(n_val, 1)
        for i, group_id in enumerate(ids):
            assignment[group_id] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    split = faces[key].map(assignment)
    frames = []
    for name in SPLITS:
        frame = faces[split == name].copy()
        frame["split"] = name
        frames.append(frame.reset_index(drop=True))
    return frames[0], frames[1], frames[2]


def subsample_photos(faces: pd.DataFrame, max_photos: int, seed: int) -> pd.DataFrame:
    """A seeded subset of photos, stratified so rare classes stay represented."""
    strata = photo_strata(faces)
    if len(strata) <= max_photos:
        return faces
    fraction = max_photos / len(strata)
    rng = np.random.default_rng(seed)
    keep: list[str] = []
    for _, photos in strata.groupby(strata):
        ids = sorted(photos.index)
        rng.shuffle(ids)
        keep.extend(ids[: max(3, int(round(len(ids) * fraction)))])
    return faces[faces["photo_id"].isin(set(keep))].reset_index(drop=True)


# ----------------------------------------------------------------------------- cropping


def crop_spec_from(data: DataConfig) -> CropSpec:
    return CropSpec(data.crop_margin, data.square_crops, data.image_size, data.resize_interpolation)


def write_crops(faces: pd.DataFrame, spec: CropSpec, crops_dir: Path, issues: list[DataIssue]) -> pd.DataFrame:
    """Crop every face with the shared stem and write it as PNG; photos that fail to decode are reported."""
    import cv2

    out_rows = []
    hasher = hashlib.sha256()
    for image_path, photo_faces in progress_bar(faces.groupby("image_path", sort=False), desc="cropping faces",
                                                unit="photo"):
        try:
            image = read_image(image_path)
        except ImageDecodeError as err:
            issues.append(DataIssue("unreadable_image", Path(image_path).name, str(err)))
            continue
        if mismatch := _size_mismatch(photo_faces.iloc[0], image, image_path):
            issues.append(DataIssue("size_mismatch", Path(image_path).name, mismatch))
            continue
        hasher.update(Path(image_path).name.encode())
        hasher.update(hashlib.sha256(image.tobytes()).digest())
        for index, face in enumerate(photo_faces.itertuples(index=False)):
            crop = extract_face(image, (face.xmin, face.ymin, face.xmax, face.ymax), spec)
            target = crops_dir / face.label / f"{_safe(face.photo_id)}_{index:03d}.png"
            target.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(target), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
            row = face._asdict()
            row.update(crop_path=str(target), face_index=index, photo_width=image.shape[1],
                       photo_height=image.shape[0])
            out_rows.append(row)
    cropped = pd.DataFrame(out_rows)
    cropped.attrs["pixels_hash"] = hasher.hexdigest()
    return cropped


def _size_mismatch(face, image: np.ndarray, image_path: str) -> str | None:
    """Why the annotation's photo size disagrees with the decoded photo (its boxes would cut the wrong pixels),
    or None. Annotations without a size (-1) are not checked."""
    annotated = (int(face.photo_width), int(face.photo_height))
    decoded = (image.shape[1], image.shape[0])
    if annotated[0] <= 0 or annotated == decoded:
        return None
    message = f"annotated as {annotated[0]}x{annotated[1]} but the photo decodes as {decoded[0]}x{decoded[1]}"
    if annotated == decoded[::-1]:
        from PIL import Image

        with Image.open(image_path) as probe:
            orientation = probe.getexif().get(EXIF_ORIENTATION)
        if orientation in QUARTER_TURN_ORIENTATIONS:
            message += (f": the file is stored sideways with EXIF orientation {orientation} and was annotated "
                        "sideways; annotate an upright copy")
    return message + "; its faces are left out"


def _safe(photo_id: str) -> str:
    return photo_id.replace("/", "__")


def dataset_fingerprint(faces: pd.DataFrame, spec: CropSpec, data: DataConfig, pixels_hash: str) -> str:
    """A hash of what training sees: boxes, labels, pixels, crop settings and the split."""
    hasher = hashlib.sha256()
    table = faces[["photo_id", "label", "xmin", "ymin", "xmax", "ymax", "split"]].sort_values(
        ["photo_id", "xmin", "ymin", "xmax", "ymax"]
    )
    hasher.update(table.to_csv(index=False).encode())
    hasher.update(json.dumps(spec.to_dict(), sort_keys=True).encode())
    hasher.update(json.dumps([data.val_fraction, data.test_fraction, data.split_seed, data.max_photos]).encode())
    hasher.update(pixels_hash.encode())
    return hasher.hexdigest()[:16]


# ----------------------------------------------------------------------------- report


def class_counts_table(train_df: pd.DataFrame, val_df: pd.DataFrame, test_df: pd.DataFrame) -> pd.DataFrame:
    table = pd.DataFrame(
        {name: frame["label"].value_counts() for name, frame in zip(SPLITS, (train_df, val_df, test_df))}
    ).reindex(list(CLASS_NAMES)).fillna(0).astype(int)
    table["total"] = table.sum(axis=1)
    table.loc["photos"] = [frame["photo_id"].nunique() for frame in (train_df, val_df, test_df)] + [
        sum(frame["photo_id"].nunique() for frame in (train_df, val_df, test_df))
    ]
    return table


def face_sizes(faces: pd.DataFrame) -> pd.Series:
    """The shorter side of each face box in pixels."""
    return np.minimum(faces["xmax"] - faces["xmin"], faces["ymax"] - faces["ymin"])


def write_data_report(prepared: PreparedData, scan: ScanResult, report_dir: Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report_dir.mkdir(parents=True, exist_ok=True)
    faces = prepared.all_faces
    table = class_counts_table(prepared.train_df, prepared.val_df, prepared.test_df)
    sizes = face_sizes(faces)
    report = {
        "layout": scan.layout,
        "photos_seen": scan.photos_seen,
        "faces_kept": int(len(faces)),
        "class_counts": table.to_dict(),
        "face_size_px": {
            "min": float(sizes.min()), "median": float(sizes.median()), "max": float(sizes.max()),
            "under_16": int((sizes < 16).sum()), "16_to_32": int(((sizes >= 16) & (sizes < 32)).sum()),
            "32_and_over": int((sizes >= 32).sum()),
        },
        "issue_counts": scan.issue_counts(),
        "issues": [asdict(issue) for issue in scan.issues],
        "similar_photos": (scenes := similar_photos(faces)),  # each kept in one split
        "data_hash": prepared.data_hash,
        "crop_spec": prepared.crop_spec.to_dict(),
    }
    (report_dir / "data_report.json").write_text(json.dumps(report, indent=2))
    table.to_csv(report_dir / "class_counts.csv")

    fig, ax = plt.subplots(figsize=(7, 4))
    for name in CLASS_NAMES:
        ax.hist(face_sizes(faces[faces["label"] == name]), bins=np.logspace(0, np.log10(max(sizes.max(), 2)), 40),
                alpha=0.6, label=name)
    ax.set_xscale("log")
    ax.axvline(16, color="k", linestyle=":", linewidth=1)
    ax.set_xlabel("face size (shorter box side, px)")
    ax.set_ylabel("faces")
    ax.set_title("Face sizes per class")
    ax.legend()
    fig.tight_layout()
    fig.savefig(report_dir / "face_sizes.png", dpi=100)
    plt.close(fig)

    _sample_grid(faces, report_dir / "sample_crops.png", per_class=8, seed=0)
    _similar_photos_sheet(faces, scenes, report_dir / "similar_photos.png")
    return report


def _similar_photos_sheet(faces: pd.DataFrame, scenes: list[list[str]], path: Path, per_row: int = 5) -> None:
    """A row per scene of several photos, so a person can check at a glance that each really is one scene."""
    import matplotlib.pyplot as plt
    from PIL import Image

    path.unlink(missing_ok=True)  # an older report's sheet would show scenes this data set does not have
    if not scenes:
        return
    image_of = faces.drop_duplicates("photo_id").set_index("photo_id")["image_path"]
    split_of = faces.drop_duplicates("photo_id").set_index("photo_id")["split"] if "split" in faces else None
    fig, axes = plt.subplots(len(scenes), per_row, figsize=(per_row * 1.6, len(scenes) * 1.25), squeeze=False)
    for row, photo_ids in enumerate(scenes):
        for col in range(per_row):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(photo_ids):
                with Image.open(image_of[photo_ids[col]]) as img:
                    img.thumbnail((240, 240))
                    ax.imshow(np.asarray(img.convert("RGB")))
                split = f" ({split_of[photo_ids[col]]})" if split_of is not None else ""
                ax.set_title(f"{photo_ids[col]}{split}", fontsize=6)
    fig.suptitle(f"{len(scenes)} scenes of several photos, each kept in one split", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _sample_grid(faces: pd.DataFrame, path: Path, per_class: int, seed: int) -> None:
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(len(CLASS_NAMES), per_class, figsize=(per_class * 1.3, len(CLASS_NAMES) * 1.5))
    for row, name in enumerate(CLASS_NAMES):
        pool = faces[faces["label"] == name]
        picks = pool.sample(min(per_class, len(pool)), random_state=seed) if len(pool) else pool
        for col in range(per_class):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(picks):
                with Image.open(picks.iloc[col]["crop_path"]) as img:
                    ax.imshow(np.asarray(img.convert("RGB")))
            if col == 0:
                ax.set_title(name, fontsize=8, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ----------------------------------------------------------------------------- the stage


def _usable_faces(settings: Settings, source_dir: Path | None) -> tuple[Path, ScanResult, pd.DataFrame]:
    """Locate and scan the data set; the faces it can use (the seeded subset when max_photos is set)."""
    data = settings.data
    source = Path(source_dir) if source_dir else locate_dataset(data, settings.work_dir)
    scan = scan_dataset(source)
    faces = scan.faces
    if faces.empty:
        raise DataError(f"no usable faces in {source}: {scan.issue_counts()}")
    if data.max_photos:
        faces = subsample_photos(faces, data.max_photos, data.split_seed)
    if scan.layout == "voc":  # in the folder layout every file is a face, not a photo of a scene
        faces = with_scene_ids(faces, data)
    return source, scan, faces


def prepare_data(settings: Settings, source_dir: Path | None = None) -> tuple[PreparedData, ScanResult]:
    """Locate, scan, validate, crop, split and report. Crops are rewritten only when inputs change."""
    data = settings.data
    source, scan, faces = _usable_faces(settings, source_dir)
    spec = crop_spec_from(data)
    crops_dir = settings.work_dir / "crops" / _crops_key(source, spec, data.max_photos, data.split_seed)
    faces = _cached_or_new_crops(faces, spec, crops_dir, scan)
    train_df, val_df, test_df = split_by_photo(faces, data.val_fraction, data.test_fraction, data.split_seed)
    with_split = pd.concat([train_df, val_df, test_df], ignore_index=True)
    data_hash = dataset_fingerprint(with_split, spec, data, faces.attrs.get("pixels_hash", ""))
    prepared = PreparedData(train_df, val_df, test_df, spec, data_hash, crops_dir, {})
    prepared.report = write_data_report(prepared, scan, settings.work_dir / "reports" / "data")
    with_split.to_csv(settings.work_dir / "reports" / "data" / "splits.csv", index=False)
    return prepared, scan


def split_faces(settings: Settings, source_dir: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The face rows of prepare_data's train/val/test photos, without cropping (the detector trains on photos)."""
    data = settings.data
    _, _, faces = _usable_faces(settings, source_dir)
    return split_by_photo(faces, data.val_fraction, data.test_fraction, data.split_seed)


def data_config_for(data: DataConfig, spec: CropSpec) -> DataConfig:
    """The data settings with a model's own crop spec, so a model is always fed crops made the way it was trained."""
    return data.model_copy(update={"crop_margin": spec.margin, "square_crops": spec.square,
                                   "image_size": spec.size, "resize_interpolation": spec.interpolation})


def crops_with_spec(faces: pd.DataFrame, spec: CropSpec, work_dir: Path) -> pd.DataFrame:
    """The same faces (photos, boxes, labels, split) cropped with another crop spec, e.g. a registered model's."""
    key = hashlib.sha256(json.dumps([sorted(faces["image_path"].unique().tolist()), spec.to_dict()],
                                    sort_keys=True).encode()).hexdigest()[:12]
    return _cached_or_new_crops(faces, spec, work_dir / "crops" / f"faces-{key}", ScanResult(faces.iloc[:0]))


def _crops_key(source: Path, spec: CropSpec, max_photos: int | None, seed: int) -> str:
    raw = json.dumps([str(source.resolve()), spec.to_dict(), max_photos, seed], sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def _source_stamp(faces: pd.DataFrame) -> str:
    hasher = hashlib.sha256()
    for path in sorted(faces["image_path"].unique()):
        stat = Path(path).stat()
        hasher.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    hasher.update(faces.to_csv(index=False).encode())
    return hasher.hexdigest()


def _cached_or_new_crops(faces: pd.DataFrame, spec: CropSpec, crops_dir: Path, scan: ScanResult) -> pd.DataFrame:
    manifest, stamp_file = crops_dir / "manifest.csv", crops_dir / "source.stamp"
    stamp = _source_stamp(faces)
    if manifest.is_file() and stamp_file.is_file():
        cached = json.loads(stamp_file.read_text())
        if cached["stamp"] == stamp:
            cropped = pd.read_csv(manifest)
            cropped.attrs["pixels_hash"] = cached["pixels_hash"]
            scan.issues.extend(DataIssue(**issue) for issue in cached["crop_issues"])
            return cropped
    crop_issues: list[DataIssue] = []
    cropped = write_crops(faces, spec, crops_dir, crop_issues)
    scan.issues.extend(crop_issues)
    cropped.to_csv(manifest, index=False)
    stamp_file.write_text(json.dumps({
        "stamp": stamp, "pixels_hash": cropped.attrs["pixels_hash"],
        "crop_issues": [asdict(issue) for issue in crop_issues],
    }))
    return cropped


# ----------------------------------------------------------------------------- tf.data


def label_indices(frame: pd.DataFrame, class_names=CLASS_NAMES) -> np.ndarray:
    """Class indices (position in class_names) of the frame's `label` column."""
    index = {name: i for i, name in enumerate(class_names)}
    return frame["label"].map(index).to_numpy(dtype=np.int32)


def class_weights(train_df: pd.DataFrame, power: float, class_names=CLASS_NAMES) -> dict[int, float]:
    """(n_max / n_class) ** power, normalised so the mean weight per training face is 1."""
    counts = train_df["label"].value_counts().reindex(list(class_names)).fillna(0).to_numpy(dtype=float)
    raw = np.where(counts > 0, (counts.max() / np.maximum(counts, 1)) ** power, 0.0)
    mean_weight = (raw * counts).sum() / counts.sum()
    return {i: float(w / mean_weight) for i, w in enumerate(raw)}


def oversample(train_df: pd.DataFrame, power: float, seed: int) -> pd.DataFrame:
    """Repeat minority faces so class c appears n_c * (n_max / n_c) ** power times."""
    counts = train_df["label"].value_counts()
    rng = np.random.default_rng(seed)
    parts = []
    for _, group in train_df.groupby("label"):
        target = int(round(len(group) * (counts.max() / len(group)) ** power))
        extra = rng.choice(len(group), size=max(target - len(group), 0), replace=True)
        parts.append(pd.concat([group, group.iloc[extra]]))
    return pd.concat(parts).sample(frac=1.0, random_state=seed).reset_index(drop=True)


def build_augmenter(augment: AugmentConfig, seed: int):
    import keras

    layers = []
    if augment.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if augment.rotation:
        layers.append(keras.layers.RandomRotation(augment.rotation, fill_mode="reflect", seed=seed))
    if augment.zoom:
        layers.append(keras.layers.RandomZoom(augment.zoom, fill_mode="reflect", seed=seed))
    if augment.translation:
        layers.append(keras.layers.RandomTranslation(augment.translation, augment.translation,
                                                     fill_mode="reflect", seed=seed))
    if augment.brightness:
        layers.append(keras.layers.RandomBrightness(augment.brightness, value_range=(0.0, 255.0), seed=seed))
    if augment.contrast:
        layers.append(keras.layers.RandomContrast(augment.contrast, value_range=(0.0, 255.0), seed=seed))
    # A Pipeline, not a Sequential: under a non-TensorFlow backend (JAX) only Pipeline runs inside tf.data.
    return keras.layers.Pipeline(layers, name="augmentation")


def make_dataset(
    frame: pd.DataFrame,
    batch_size: int,
    training: bool,
    augment: AugmentConfig | None = None,
    seed: int = 42,
    cache: bool = True,
    class_names=CLASS_NAMES,
):
    """(image float32 0..255, one-hot label) batches from the crops; augmentation on training data only."""
    import tensorflow as tf

    labels = label_indices(frame, class_names)
    dataset = tf.data.Dataset.from_tensor_slices((frame["crop_path"].to_numpy(dtype=str), labels))

    def load(path, label):
        image = tf.io.decode_png(tf.io.read_file(path), channels=3)
        return tf.cast(image, tf.float32), tf.one_hot(label, len(class_names))

    dataset = dataset.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    if cache:
        dataset = dataset.cache()
    if training:
        dataset = dataset.shuffle(len(frame), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.batch(batch_size)
    if training and augment is not None and augment.enabled:
        augmenter = build_augmenter(augment, seed)
        dataset = dataset.map(lambda x, y: (augmenter(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.prefetch(tf.data.AUTOTUNE)
