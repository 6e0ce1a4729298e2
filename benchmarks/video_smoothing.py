"""Do labels flicker in video, and does following faces across frames (realtime.FaceTracker) steady them?

A handheld camera is simulated from the test photos: each photo, letterboxed to 640x480, is held for
--frames-per-photo frames, each frame shaken (a random shift of up to --shift px and zoom of up to --zoom),
with sensor noise (--noise, standard deviation in grey levels) and webcam JPEG compression (--jpeg-quality).
The annotated boxes move with the frame. Detector + classifier run once per frame; then each smoothing setting
replays the same detections through a FaceTracker. The photos follow each other without a break, so a track may
carry over a cut: the first frames after one are reported on their own.

Per setting, over annotated faces found in a frame (IoU >= 0.5): label accuracy, label changes per 100 pairs of
consecutive frames in which the face was found, the share of faces whose label changed at all, the accuracy in
each photo's first two frames, and detection mAP@0.5 over all frames (each frame scored as a photo).

    python benchmarks/video_smoothing.py
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

from common import REPO, default_model, detection_setup, print_table, write_json


def shaken_frames(image: np.ndarray, boxes: np.ndarray, count: int, rng: np.random.Generator, shift: float,
                  zoom: float, noise: float, jpeg_quality: int, size=(640, 480)):
    """`count` frames of an RGB photo held in a shaking hand: (frame, boxes in frame pixels) pairs."""
    width, height = size
    fit = min(width / image.shape[1], height / image.shape[0])
    for _ in range(count):
        scale = fit * rng.uniform(1 - zoom, 1 + zoom)
        dx = (width - image.shape[1] * scale) / 2 + rng.uniform(-shift, shift)
        dy = (height - image.shape[0] * scale) / 2 + rng.uniform(-shift, shift)
        frame = cv2.warpAffine(image, np.float32([[scale, 0, dx], [0, scale, dy]]), size, flags=cv2.INTER_LINEAR)
        frame = np.clip(frame + rng.normal(0, noise, frame.shape), 0, 255).astype(np.uint8)
        _, jpeg = cv2.imencode(".jpg", cv2.cvtColor(frame, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality])
        frame = cv2.cvtColor(cv2.imdecode(jpeg, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        yield frame, boxes * scale + np.array([dx, dy, dx, dy])


def score_setting(frames: list[dict], smoothing: float | None, class_names: list[str]) -> dict:
    """Replay the frames' detections through a FaceTracker (None: as detected) and score the labels."""
    from maskwatch.config import RealtimeConfig
    from maskwatch.evaluate import PhotoDetections, average_precision_50, class_scores
    from maskwatch.preprocessing import match_boxes
    from maskwatch.realtime import FaceTracker

    tracker = FaceTracker(RealtimeConfig(smoothing=smoothing)) if smoothing is not None else None
    labels: dict[tuple[str, int], list[str | None]] = {}
    right = found = first_right = first_found = 0
    scored, seconds = [], 0.0
    for frame in frames:
        started = time.perf_counter()
        detections = tracker.update(frame["detections"]) if tracker else frame["detections"]
        seconds += time.perf_counter() - started
        boxes = np.array([d.box for d in detections], float).reshape(-1, 4)
        matched = match_boxes(frame["truth_boxes"], boxes, min_iou=0.5)
        for face in range(len(frame["truth_boxes"])):
            label = detections[matched[face]].label if face in matched else None
            labels.setdefault((frame["photo"], face), []).append(label)
            if label is not None:
                hit = label == frame["truth_labels"][face]
                right, found = right + hit, found + 1
                if frame["index"] < 2:
                    first_right, first_found = first_right + hit, first_found + 1
        scored.append(PhotoDetections(640, 480, frame["truth_boxes"],
                                      [class_names.index(label) for label in frame["truth_labels"]], boxes,
                                      class_scores(detections, class_names)))
    pairs = changes = flickering = seen_twice = 0
    for sequence in labels.values():
        steps = [(a, b) for a, b in zip(sequence, sequence[1:]) if a is not None and b is not None]
        pairs += len(steps)
        changes += sum(a != b for a, b in steps)
        seen = [label for label in sequence if label is not None]
        if len(seen) >= 2:
            seen_twice += 1
            flickering += len(set(seen)) > 1
    ap = average_precision_50(scored, class_names)
    return {"smoothing": "off (as detected)" if smoothing is None else smoothing, "face_frames": found,
            "accuracy": right / max(found, 1), "changes_per_100": 100 * changes / max(pairs, 1),
            "faces_changing": flickering / max(seen_twice, 1),
            "first_frames_accuracy": first_right / max(first_found, 1),
            "map50": float(np.mean(list(ap.values()))), **{f"ap_{k}": v for k, v in ap.items()},
            "tracker_us_per_frame": 1e6 * seconds / len(frames) if tracker else 0.0}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=default_model(), help="the classifier (registry URI or bundle folder)")
    parser.add_argument("--runtime", default="litert")
    parser.add_argument("--frames-per-photo", type=int, default=10)
    parser.add_argument("--shift", type=float, default=3.0, help="largest shake, px")
    parser.add_argument("--zoom", type=float, default=0.03, help="largest zoom change, as a fraction")
    parser.add_argument("--noise", type=float, default=4.0, help="sensor noise, grey levels (standard deviation)")
    parser.add_argument("--jpeg-quality", type=int, default=75)
    parser.add_argument("--smoothing", type=float, nargs="+", default=[0.0, 0.3, 0.5, 0.7, 0.8],
                        help="realtime.smoothing settings to compare with the raw detections")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "video_smoothing.json")
    args = parser.parse_args(argv)

    from tqdm.auto import tqdm

    from maskwatch.detect import MaskDetector, create_face_detector
    from maskwatch.preprocessing import read_image

    settings, prepared, predictor = detection_setup(args.model, args.runtime)
    mask_detector = MaskDetector(predictor, create_face_detector(settings.detector))
    rng = np.random.default_rng(args.seed)
    frames = []
    photos = list(prepared.test_df.groupby("image_path", sort=True))
    for image_path, truth in tqdm(photos, desc="shaking and detecting", unit="photo"):
        truth_boxes = truth[["xmin", "ymin", "xmax", "ymax"]].to_numpy(float)
        shaken = shaken_frames(read_image(image_path), truth_boxes, args.frames_per_photo, rng, args.shift,
                               args.zoom, args.noise, args.jpeg_quality)
        for index, (frame, boxes) in enumerate(shaken):
            frames.append({"photo": image_path, "index": index, "truth_boxes": boxes,
                           "truth_labels": truth["label"].tolist(), "detections": mask_detector.detect(frame)})
    print(f"{len(photos)} test photos x {args.frames_per_photo} frames = {len(frames)} frames, "
          f"{sum(len(f['truth_boxes']) for f in frames)} annotated face-frames", flush=True)
    rows = [score_setting(frames, smoothing, list(predictor.class_names))
            for smoothing in [None, *args.smoothing]]
    print_table(rows, ["smoothing", "face_frames", "accuracy", "changes_per_100", "faces_changing",
                       "first_frames_accuracy", "map50", "ap_mask_weared_incorrect", "tracker_us_per_frame"], digits=3)
    write_json(args.out, {"model": args.model, "runtime": args.runtime,
                          "video": {k: getattr(args, k) for k in ("frames_per_photo", "shift", "zoom", "noise",
                                                                  "jpeg_quality", "seed")},
                          "photos": len(photos), "frames": len(frames), "rows": rows})


if __name__ == "__main__":
    main()
