"""Writes sideways_phone.mp4: a phone video stored sideways with a display rotation, as phones record it.

Upright, each frame is 96x64 (width x height): grey, a red block top left, a blue block bottom right. Stored,
the frames are turned a quarter clockwise (64x96), and the container says "turn a quarter anticlockwise to
display". Needs an ffmpeg with -display_rotation (6.0+), e.g. `pip install imageio-ffmpeg`:

    python tests/realtime/assets/make_sideways_video.py
"""

import argparse
import subprocess
import tempfile
from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent


def upright_frame() -> np.ndarray:
    frame = np.full((64, 96, 3), 128, np.uint8)
    frame[4:24, 4:28] = (0, 0, 255)  # red (BGR), top left
    frame[40:60, 68:92] = (255, 0, 0)  # blue, bottom right
    return frame


def main(argv=None) -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    import imageio_ffmpeg

    stored = np.ascontiguousarray(np.rot90(upright_frame(), k=-1))  # a quarter clockwise
    with tempfile.TemporaryDirectory() as folder:
        plain = Path(folder) / "plain.mp4"
        writer = cv2.VideoWriter(str(plain), cv2.VideoWriter_fourcc(*"mp4v"), 10, stored.shape[1::-1])
        for _ in range(5):
            writer.write(stored)
        writer.release()
        subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-loglevel", "error", "-display_rotation", "90",
                        "-i", str(plain), "-c", "copy", str(HERE / "sideways_phone.mp4")], check=True)


if __name__ == "__main__":
    main()
