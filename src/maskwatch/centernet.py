"""The face-mask detector trained on this data set: its head layout, input letterbox and output decoding.

A CenterNet-style network: each face is a peak on a stride-4 heat map, with its size and sub-cell offset read
at the peak. Channel 0 is "a face of any kind", channels 1-3 are the three classes, so the detector both
finds faces and gives its own class opinion. Only numpy and OpenCV here: serving imports this module; the
network itself and its training live in maskwatch.train_detector.
"""

from __future__ import annotations

import cv2
import numpy as np

STRIDE = 4  # output cell = 4x4 input pixels: faces of 5 px still get their own cell
INPUT_MULTIPLE = 32  # the backbone halves the resolution five times
NUM_CLASSES = 3
FACE_CHANNEL = 0
CLASS_CHANNELS = slice(1, 1 + NUM_CLASSES)
SIZE_CHANNELS = slice(1 + NUM_CLASSES, 3 + NUM_CLASSES)  # log(width / STRIDE), log(height / STRIDE)
OFFSET_CHANNELS = slice(3 + NUM_CLASSES, 5 + NUM_CLASSES)  # centre within its cell, 0..1
OUTPUT_CHANNELS = 5 + NUM_CLASSES
PAD_VALUE = 114  # neutral grey for letterbox padding, as in training


def letterbox(image: np.ndarray, long_side: int) -> tuple[np.ndarray, float]:
    """Resize an RGB photo so its longer side is `long_side`, pad right/bottom to a multiple of 32.

    Returns the padded uint8 image and the scale (network pixels per photo pixel).
    """
    height, width = image.shape[:2]
    scale = long_side / max(height, width)
    new_w, new_h = max(int(round(width * scale)), 1), max(int(round(height * scale)), 1)
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    resized = cv2.resize(image, (new_w, new_h), interpolation=interpolation) if scale != 1.0 else image
    pad_h = -new_h % INPUT_MULTIPLE
    pad_w = -new_w % INPUT_MULTIPLE
    if pad_h or pad_w:
        resized = cv2.copyMakeBorder(resized, 0, pad_h, 0, pad_w, cv2.BORDER_CONSTANT,
                                     value=(PAD_VALUE, PAD_VALUE, PAD_VALUE))
    return np.ascontiguousarray(resized, dtype=np.uint8), scale


def mirrored_heads(heads: np.ndarray) -> np.ndarray:
    """Output maps of a mirrored image, mirrored back: what they say about the image itself (a centre at
    offset x within its cell sits at 1 - x in the mirrored cell)."""
    mirrored = heads[:, ::-1].copy()
    mirrored[..., OFFSET_CHANNELS.start] = 1.0 - mirrored[..., OFFSET_CHANNELS.start]
    return mirrored


def flip_averaged(heads_of):
    """A heads function (letterboxed image -> output maps) that also looks at the mirrored image and averages
    the two maps: horizontal-flip test-time augmentation, one decoding."""

    def heads(boxed: np.ndarray) -> np.ndarray:
        return 0.5 * (heads_of(boxed) + mirrored_heads(heads_of(np.ascontiguousarray(boxed[:, ::-1]))))

    return heads


def find_peaks(heat: np.ndarray, score_threshold: float, max_peaks: int) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima (3x3) of a heat map at or above the threshold, best first: (rows, cols)."""
    local_max = cv2.dilate(heat, np.ones((3, 3), np.uint8))
    rows, cols = np.nonzero((heat >= local_max) & (heat >= score_threshold))
    order = np.argsort(-heat[rows, cols], kind="stable")[:max_peaks]
    return rows[order], cols[order]


def decode(heads: np.ndarray, scale: float, score_threshold: float, max_faces: int = 200
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One image's network output (H/4 x W/4 x 8) -> boxes (N x 4, photo pixels), face scores (N), class probs (N x 3).

    Class probabilities are the class heat maps at the face's peak, normalised to sum to one.
    """
    heat = np.ascontiguousarray(heads[..., FACE_CHANNEL], dtype=np.float32)
    rows, cols = find_peaks(heat, score_threshold, max_faces)
    cells = heads[rows, cols]
    size = np.exp(cells[:, SIZE_CHANNELS]) * STRIDE
    centre = (np.stack([cols, rows], axis=1) + cells[:, OFFSET_CHANNELS]) * STRIDE
    boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1) / scale
    return boxes.astype(np.float32), heat[rows, cols], class_probabilities(cells[:, CLASS_CHANNELS])


def class_probabilities(class_heat: np.ndarray) -> np.ndarray:
    """Class heat at faces' peaks (N x 3) -> class probabilities: each row normalised to sum to one."""
    class_heat = np.clip(class_heat, 1e-6, None)
    return (class_heat / class_heat.sum(axis=1, keepdims=True)).astype(np.float32)
