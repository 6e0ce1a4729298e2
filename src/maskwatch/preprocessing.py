"""The preprocessing stem shared by the training data pipeline and every predictor.

Only numpy and OpenCV: serving and real-time code import this, never training code.
A face goes photo -> crop box (margin, square) -> crop -> resize to the model side,
as uint8 RGB. Pixel scaling to [-1, 1] lives inside the model itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import io

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

# Files taken as photos when a folder is read (data set folders, `maskwatch predict <folder>`).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

INTERPOLATIONS = {
    "area": cv2.INTER_AREA,
    "linear": cv2.INTER_LINEAR,
    "cubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image."""


class PixelLimitError(ImageDecodeError):
    """The image's pixel count is over the configured limit (decompression bomb guard)."""


@dataclass(frozen=True)
class CropSpec:
    """How a face box becomes a model input; saved in the model's metadata."""

    margin: float = 0.15
    square: bool = True
    size: int = 160
    interpolation: str = "cubic"

    def to_dict(self) -> dict:
        return {"margin": self.margin, "square": self.square, "size": self.size, "interpolation": self.interpolation}

    @classmethod
    def from_dict(cls, values: dict) -> "CropSpec":
        return cls(**{k: values[k] for k in ("margin", "square", "size", "interpolation")})


def decode_image(data: bytes, max_pixels: int | None = None) -> np.ndarray:
    """Decode image bytes (JPEG, PNG incl. RGBA, BMP, WebP...) into an RGB uint8 array."""
    if not data:
        raise ImageDecodeError("empty image data")
    if data.startswith(PNG_SIGNATURE):
        _check_png_chunks(data)
    buffer = np.frombuffer(data, dtype=np.uint8)
    if max_pixels is not None:
        _check_pixel_count(buffer, max_pixels)
    try:
        image = cv2.imdecode(buffer, cv2.IMREAD_COLOR)  # drops alpha, honours 8-bit colour
    except cv2.error as err:  # OpenCV's own limits, e.g. a BMP 2 million pixels wide (found by fuzzing)
        raise ImageDecodeError(f"OpenCV refused the image: {str(err).strip().splitlines()[-1]}") from err
    if image is None or image.size == 0:
        raise ImageDecodeError("data is not a decodable image (corrupt, truncated or unsupported format)")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def _check_png_chunks(data: bytes) -> None:
    # OpenCV's PNG reader allocates whatever length a chunk header claims: a 49-byte file whose IDAT claims 4 GB
    # took 4 GB and 8 s to refuse (found by fuzzing). A chunk longer than the rest of the file is refused first.
    offset = len(PNG_SIGNATURE)
    while offset + 8 <= len(data):
        length, kind = int.from_bytes(data[offset:offset + 4], "big"), data[offset + 4:offset + 8]
        if offset + 12 + length > len(data):
            raise ImageDecodeError(f"PNG chunk {kind!r} claims {length} bytes, more than the file holds")
        if kind == b"IEND":
            return
        offset += 12 + length


def _check_pixel_count(buffer: np.ndarray, max_pixels: int) -> None:
    # Read the header only, so a decompression bomb is refused before it is decoded.
    try:
        with Image.open(io.BytesIO(buffer.tobytes())) as probe:
            width, height = probe.size
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise ImageDecodeError("data is not a decodable image") from err
    except Image.DecompressionBombError as err:  # PIL's own limit, stricter than ours
        raise PixelLimitError(str(err)) from err
    if width * height > max_pixels:
        raise PixelLimitError(f"image has {width}x{height} = {width * height} pixels, limit is {max_pixels}")


def read_image(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ImageDecodeError(f"cannot read {path}: {err.strerror}") from err
    try:
        return decode_image(data)
    except ImageDecodeError as err:
        raise ImageDecodeError(f"{path}: {err}") from err


def visible_files(folder: str | Path) -> list[Path]:
    """The files under a folder, its subfolders included, in sorted order; hidden files and folders are skipped."""
    folder = Path(folder)
    return sorted(path for path in folder.rglob("*")
                  if path.is_file() and not any(part.startswith(".") for part in path.relative_to(folder).parts))


def is_photo(path: Path) -> bool:
    """Whether a file is read as a photo: by its suffix, in any case."""
    return path.suffix.lower() in IMAGE_SUFFIXES


def images_in(folder: str | Path) -> list[Path]:
    """The photos under a folder (visible_files with a photo's suffix)."""
    return [path for path in visible_files(folder) if is_photo(path)]


def crop_box(
    box: tuple[float, float, float, float], width: int, height: int, margin: float, square: bool
) -> tuple[int, int, int, int]:
    """Grow (xmin, ymin, xmax, ymax) by `margin` of its size per side (and to a square), clip to the photo."""
    xmin, ymin, xmax, ymax = (float(v) for v in box)
    box_w, box_h = max(xmax - xmin, 1.0), max(ymax - ymin, 1.0)
    cx, cy = (xmin + xmax) / 2.0, (ymin + ymax) / 2.0
    half_w, half_h = box_w * (0.5 + margin), box_h * (0.5 + margin)
    if square:
        half_w = half_h = max(half_w, half_h)
    x0 = int(np.floor(max(cx - half_w, 0.0)))
    y0 = int(np.floor(max(cy - half_h, 0.0)))
    x1 = int(np.ceil(min(cx + half_w, float(width))))
    y1 = int(np.ceil(min(cy + half_h, float(height))))
    # Always at least one pixel, even for a box on the photo's edge.
    x1, y1 = max(x1, min(x0 + 1, width)), max(y1, min(y0 + 1, height))
    return x0, y0, x1, y1


def box_iou(box, others: np.ndarray) -> np.ndarray:
    """Intersection over union of one (x0, y0, x1, y1) box with each row of an N x 4 array."""
    others = np.asarray(others, float).reshape(-1, 4)
    x0 = np.maximum(box[0], others[:, 0])
    y0 = np.maximum(box[1], others[:, 1])
    x1 = np.minimum(box[2], others[:, 2])
    y1 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x1 - x0, 0, None) * np.clip(y1 - y0, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def match_boxes(boxes: np.ndarray, others: np.ndarray, min_iou: float) -> dict[int, int]:
    """Pairs of boxes that are the same thing: index in `boxes` -> index in `others`, taken greedily from the
    highest overlap down to `min_iou`, each box in at most one pair."""
    overlaps = np.array([box_iou(box, others) for box in boxes]).reshape(len(boxes), len(others))
    matched: dict[int, int] = {}
    used: set[int] = set()
    for flat in np.argsort(-overlaps, axis=None, kind="stable"):
        index, other = divmod(int(flat), overlaps.shape[1])
        if overlaps[index, other] < min_iou:
            break
        if index not in matched and other not in used:
            matched[index] = other
            used.add(other)
    return matched


def resize_face(face: np.ndarray, spec: CropSpec) -> np.ndarray:
    if face.shape[:2] == (spec.size, spec.size):
        return np.ascontiguousarray(face, dtype=np.uint8)
    return cv2.resize(face, (spec.size, spec.size), interpolation=INTERPOLATIONS[spec.interpolation])


def extract_face(image: np.ndarray, box: tuple[float, float, float, float], spec: CropSpec) -> np.ndarray:
    """The one function that turns a face box on an RGB photo into a model input (uint8, size x size x 3)."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = crop_box(box, width, height, spec.margin, spec.square)
    return resize_face(image[y0:y1, x0:x1], spec)


def extract_faces(image: np.ndarray, boxes: list, spec: CropSpec) -> np.ndarray:
    if not boxes:
        return np.zeros((0, spec.size, spec.size, 3), dtype=np.uint8)
    return np.stack([extract_face(image, box, spec) for box in boxes])
