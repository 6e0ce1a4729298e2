"""Real time: detect and classify faces in a camera, video file or stream. Imports no training code.

Frames are read on their own thread. For cameras and streams only the newest frame is kept, so a slow
model never works on stale frames; for files every frame is processed, so the output matches the input.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from pathlib import Path

import cv2
import numpy as np

from maskwatch.config import RealtimeConfig
from maskwatch.detect import Detection, MaskDetector, draw_detections
from maskwatch.preprocessing import match_boxes
from maskwatch.signals import handling_stop_signals


class VideoSourceError(RuntimeError):
    """The camera, file or stream cannot be opened or read."""


def parse_source(source: str) -> int | str:
    return int(source) if source.isdigit() else source


def is_stream(source: int | str) -> bool:
    return isinstance(source, str) and "://" in source


class FrameReader:
    """Reads frames on a background thread; `latest_only` drops frames the consumer had no time for.

    A stream URL waits at most `stream_timeout_s` to open and for each frame (OpenCV's own limit is 30 s: a
    server that accepts and never answers would hold `webcam` that long before its error).
    """

    def __init__(self, source: int | str, latest_only: bool | None = None, stream_timeout_s: float = 10.0):
        self.source, self.stream_timeout_s = source, stream_timeout_s
        if isinstance(source, str) and not is_stream(source) and not Path(source).is_file():
            raise VideoSourceError(f"video file {source} does not exist")
        if is_stream(source):
            limit_ms = round(stream_timeout_s * 1000)
            self.capture = cv2.VideoCapture(source, cv2.CAP_ANY, [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, limit_ms,
                                                                  cv2.CAP_PROP_READ_TIMEOUT_MSEC, limit_ms])
        else:
            self.capture = cv2.VideoCapture(source)
        if not self.capture.isOpened():
            what = f"camera {source}" if isinstance(source, int) else f"video source {source}"
            hint = (f"is it reachable, and does it answer within {stream_timeout_s:g} s "
                    "(realtime.stream_timeout_s)?" if is_stream(source) else "is it connected, readable and a video?")
            raise VideoSourceError(f"cannot open {what} ({hint})")
        ok, first = self.capture.read()
        if not ok or first is None:
            self.capture.release()
            raise VideoSourceError(f"cannot read a frame from {source}")
        self.fps = float(self.capture.get(cv2.CAP_PROP_FPS) or 0.0) or 30.0
        self.latest_only = isinstance(source, int) or is_stream(source) if latest_only is None else latest_only
        self.frames: queue.Queue = queue.Queue(maxsize=1 if self.latest_only else 8)
        self.frames.put(first)
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="frame-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            ok, frame = self.capture.read()
            if not ok:
                break
            if self.latest_only:
                try:
                    self.frames.get_nowait()  # replace the stale frame
                    self.dropped += 1
                except queue.Empty:
                    pass
                self.frames.put(frame)
            else:
                while not self._stop.is_set():
                    try:
                        self.frames.put(frame, timeout=0.1)
                        break
                    except queue.Full:
                        continue
        self.frames.put(None)  # end of stream

    def read(self, timeout: float | None = None) -> np.ndarray | None:
        """The next BGR frame, or None at the end of the stream. Waits `timeout` seconds: by default 10, and for a
        stream 5 more than its own timeout, so that a stall ends the stream here rather than racing it."""
        if timeout is None:
            timeout = max(10.0, self.stream_timeout_s + 5.0) if is_stream(self.source) else 10.0
        try:
            return self.frames.get(timeout=timeout)
        except queue.Empty as err:
            raise VideoSourceError(f"no frame from {self.source} for {timeout:.0f} s") from err

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.capture.release()


@dataclass
class _Track:
    track_id: int
    box: tuple[int, int, int, int]
    probabilities: np.ndarray
    missed: int = 0


class FaceTracker:
    """Follows faces from frame to frame and steadies their labels.

    A small face's class can change with a pixel of camera shake; the person's mask does not. Each face is matched
    to a face of the frames before by box overlap (greedy, highest IoU first, at least `track_min_iou`), and its
    class probabilities become a moving average: p = smoothing * p_before + (1 - smoothing) * p_frame. A face
    with no match starts a track; a track unseen for more than `track_max_missed` frames ends.
    """

    def __init__(self, config: RealtimeConfig):
        self.config = config
        self.tracks: list[_Track] = []
        self._next_id = 0

    def update(self, detections: list[Detection]) -> list[Detection]:
        """One frame's detections -> the same faces with track ids and smoothed probabilities, label and score."""
        pairs = match_boxes([d.box for d in detections], [t.box for t in self.tracks], self.config.track_min_iou)
        track_of = {index: self.tracks[track] for index, track in pairs.items()}
        smoothing = self.config.smoothing
        started, updated = [], []
        for index, detection in enumerate(detections):
            names, frame_probabilities = list(detection.probabilities), np.array(list(detection.probabilities.values()))
            track = track_of.get(index)
            if track is None:
                track = _Track(self._next_id, detection.box, frame_probabilities)
                self._next_id += 1
                started.append(track)
            else:
                track.box, track.missed = detection.box, 0
                track.probabilities = smoothing * track.probabilities + (1.0 - smoothing) * frame_probabilities
            best = int(np.argmax(track.probabilities))
            updated.append(replace(detection, label=names[best], score=float(track.probabilities[best]),
                                   probabilities={n: float(p) for n, p in zip(names, track.probabilities)},
                                   track_id=track.track_id))
        matched_tracks = set(pairs.values())
        for index, track in enumerate(self.tracks):
            track.missed += index not in matched_tracks
        self.tracks = [t for t in self.tracks if t.missed <= self.config.track_max_missed] + started
        return updated


@dataclass
class StageTimes:
    capture: list[float] = field(default_factory=list)
    detect: list[float] = field(default_factory=list)
    classify: list[float] = field(default_factory=list)
    draw: list[float] = field(default_factory=list)
    output: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {name: float(np.mean(values)) if values else 0.0 for name, values in self.__dict__.items()}


@dataclass
class RunSummary:
    frames: int
    seconds: float
    fps: float
    faces: int
    dropped: int
    stage_ms: dict[str, float]
    tracks_by_label: dict[str, int] | None = None  # followed faces by their last label (with a tracker)
    source_stopped: str | None = None  # a camera or stream that ended the run by itself: a file's end is no news

    def to_text(self) -> str:
        stages = "  ".join(f"{k} {v:.1f} ms" for k, v in self.stage_ms.items())
        text = (f"{self.frames} frames in {self.seconds:.1f} s = {self.fps:.1f} FPS, {self.faces} faces, "
                f"{self.dropped} stale frames skipped\nper frame: {stages}")
        if self.tracks_by_label is not None:
            labels = ", ".join(f"{label} {count}" for label, count in self.tracks_by_label.items())
            text += f"\nfaces followed: {sum(self.tracks_by_label.values())} ({labels or 'none'})"
        if self.source_stopped:
            text += f"\n{self.source_stopped}"
        return text


def open_display(window: str) -> None:
    try:
        cv2.namedWindow(window, cv2.WINDOW_NORMAL)
    except cv2.error as err:
        raise VideoSourceError(
            "this OpenCV has no GUI support (opencv-python-headless): run with --no-display --output out.mp4, "
            "or replace it with the GUI build: pip uninstall -y opencv-python-headless && pip install opencv-python"
        ) from err


def run_video(mask_detector: MaskDetector, source: int | str, display: bool = True, output: Path | None = None,
              json_path: Path | None = None, max_frames: int | None = None, latest_only: bool | None = None,
              window: str = "maskwatch", tracker: FaceTracker | None = None,
              stream_timeout_s: float = 10.0) -> RunSummary:
    """The loop: read, detect + classify (and, with a tracker, follow faces and steady their labels), draw with
    FPS, show / write. `q`, Ctrl-C or SIGTERM stops and releases."""
    if display:
        open_display(window)
    reader = FrameReader(source, latest_only, stream_timeout_s)
    writer, json_file = None, None
    times, recent = StageTimes(), deque(maxlen=30)
    last_label: dict[int, str] = {}  # each followed face's latest label
    frames = faces = 0
    source_stopped = None
    stop = threading.Event()
    started = time.perf_counter()
    # Ctrl-C, `kill`, a service manager's stop or a closed terminal end the loop like `q`: the video file gets
    # its index (an .mp4 killed mid-write does not play) and the summary is printed.
    with handling_stop_signals(lambda *_: stop.set()):
        try:
            if json_path:
                json_path.parent.mkdir(parents=True, exist_ok=True)
                json_file = open(json_path, "w")
            while not stop.is_set() and (max_frames is None or frames < max_frames):
                t0 = time.perf_counter()
                frame = reader.read()
                if frame is None:
                    if isinstance(source, int):
                        source_stopped = f"camera {source} stopped sending frames"
                    elif is_stream(source):  # OpenCV does not say whether it ended or stalled
                        source_stopped = f"the stream ended or sent nothing for {stream_timeout_s:g} s"
                    break
                t1 = time.perf_counter()
                rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                detections = mask_detector.detect(rgb)
                if tracker is not None:
                    detections = tracker.update(detections)
                    last_label.update((d.track_id, d.label) for d in detections)
                t2 = time.perf_counter()
                recent.append(t2)
                fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 1 else 0.0
                annotated = cv2.cvtColor(draw_detections(rgb, detections, fps=fps), cv2.COLOR_RGB2BGR)
                t3 = time.perf_counter()
                if output is not None:
                    if writer is None:
                        writer = _open_writer(output, annotated.shape, reader.fps)
                    writer.write(annotated)
                if json_file:
                    json_file.write(json.dumps({"frame": frames, "time_s": round(t2 - started, 4),
                                                "detections": [d.to_dict() for d in detections]}) + "\n")
                if display:
                    cv2.imshow(window, annotated)
                    if cv2.waitKey(1) & 0xFF == ord("q"):
                        stop.set()
                t4 = time.perf_counter()
                timings = mask_detector.last_timings
                times.capture.append((t1 - t0) * 1e3)
                times.detect.append(timings.detect_ms)
                times.classify.append(timings.classify_ms)
                times.draw.append((t3 - t2) * 1e3)
                times.output.append((t4 - t3) * 1e3)
                frames += 1
                faces += len(detections)
        finally:
            reader.close()
            if writer is not None:
                writer.release()
            if json_file:
                json_file.close()
            if display:
                cv2.destroyAllWindows()
    seconds = time.perf_counter() - started
    tracks_by_label = dict(Counter(last_label.values()).most_common()) if tracker is not None else None
    return RunSummary(frames, seconds, frames / seconds if seconds else 0.0, faces, reader.dropped, times.summary(),
                      tracks_by_label, source_stopped)


def _open_writer(path: Path, shape, fps: float):
    path.parent.mkdir(parents=True, exist_ok=True)
    height, width = shape[:2]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    if not writer.isOpened():
        raise VideoSourceError(f"cannot write video {path} (use an .mp4 or .avi name)")
    return writer


def make_test_video(photos: list[Path], path: Path, size=(640, 480), frames_per_photo: int = 5, fps: float = 15.0,
                    y4m: bool = False) -> Path:
    """A short video from still photos (letterboxed): for tests, benchmarks and a fake browser camera."""
    from maskwatch.preprocessing import read_image

    width, height = size
    frames = []
    for photo in photos:
        frames += [letterbox(read_image(photo), size)] * frames_per_photo
    path.parent.mkdir(parents=True, exist_ok=True)
    if y4m:
        _write_y4m(frames, path, fps)
    else:
        writer = _open_writer(path, (height, width), fps)
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
    return path


def letterbox(image: np.ndarray, size=(640, 480)) -> np.ndarray:
    """Scale to fit `size` (width, height) and pad with black, keeping the aspect ratio."""
    width, height = size
    scale = min(width / image.shape[1], height / image.shape[0])
    resized = cv2.resize(image, (int(image.shape[1] * scale), int(image.shape[0] * scale)))
    canvas = np.zeros((height, width, 3), np.uint8)
    y0, x0 = (height - resized.shape[0]) // 2, (width - resized.shape[1]) // 2
    canvas[y0:y0 + resized.shape[0], x0:x0 + resized.shape[1]] = resized
    return canvas


def _write_y4m(frames: list[np.ndarray], path: Path, fps: float) -> None:
    """YUV4MPEG2 (4:2:0): what Chromium's fake camera reads."""
    height, width = frames[0].shape[:2]
    with open(path, "wb") as handle:
        handle.write(f"YUV4MPEG2 W{width} H{height} F{int(fps)}:1 Ip A1:1 C420jpeg\n".encode())
        for frame in frames:
            yuv = cv2.cvtColor(frame, cv2.COLOR_RGB2YUV_I420)
            handle.write(b"FRAME\n" + yuv.tobytes())
