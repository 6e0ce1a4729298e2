"""Fuzzing of the upload decoder (`serve.decode_upload`) with atheris (libFuzzer for Python).

    python tests/fuzz/decode_fuzz.py --seconds 300 [--work DIR] [--rss-limit-mb 1024]

Seeds: one face from a data-set photo, as JPEG (baseline and progressive), PNG (RGB, RGBA, 16-bit grey), BMP,
TIFF and WebP. libFuzzer mutates them. Each input must either decode to an RGB uint8 image within the pixel limit
or be refused with a 4xx `ApiError`. Anything else is a finding, written to the work folder with a `crash-`, `oom-`
or `timeout-` prefix: another exception, a crash in a codec, more than --rss-limit-mb of memory, or more than
10 s for one input. Exits 0 when the time runs out without a finding. Coverage guides only the Python side:
the codecs inside OpenCV and Pillow are not instrumented, so inside them this is mutation fuzzing.
It found a 49-byte PNG that made OpenCV allocate 4 GB, a BMP that made it raise, and a tiled TIFF whose tiles
made it allocate 1 GB (`tests/conftest.py`: `PNG_CHUNK_BOMB`, `BMP_TOO_WIDE`, `tiff_with_huge_tiles`); the API
now refuses TIFF, and the TIFF seed checks that it does.
`tests/serve/test_decode_fuzz.py` runs it for 60 s in the slow tier.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
from pathlib import Path

MAX_PIXELS = 4_000_000
REPO = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("MASKWATCH_SHARED_DIR", REPO.parent / "shared"))
DATA_DIR = Path(os.environ.get("MASKWATCH_DATA_DIR") or SHARED / "data" / "face-mask-detection")


def write_seeds(folder: Path, photo: Path) -> int:
    import cv2
    import numpy as np

    face = cv2.resize(cv2.imread(str(photo))[50:98, 100:164], (32, 24))  # a face of maksssksksss0.jpg
    seeds = {"face.jpg": (".jpg", face, []), "face_progressive.jpg": (".jpg", face, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]),
             "face.png": (".png", face, []), "face_rgba.png": (".png", cv2.cvtColor(face, cv2.COLOR_BGR2BGRA), []),
             "face_grey16.png": (".png", cv2.cvtColor(face, cv2.COLOR_BGR2GRAY).astype(np.uint16) * 257, []),
             "face.bmp": (".bmp", face, []), "face.tiff": (".tiff", face, []), "face.webp": (".webp", face, [])}
    for name, (suffix, pixels, params) in seeds.items():
        ok, encoded = cv2.imencode(suffix, pixels, params)
        assert ok, name
        (folder / name).write_bytes(encoded.tobytes())
    return len(seeds)


PEAK_LIMIT_KB = [1024 * 1024]  # set from --rss-limit-mb


def one_input(data: bytes) -> None:
    from maskwatch.serve import ApiError, decode_upload

    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        image = decode_upload(data, max_pixels=MAX_PIXELS)
    except ApiError as err:
        assert 400 <= err.status < 500, (err.status, err.code)
        image = None
    # libFuzzer's own memory check samples once a second and blames whatever input runs then; the peak that this
    # input set names the input that really took the memory.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert peak <= PEAK_LIMIT_KB[0] or peak_before > PEAK_LIMIT_KB[0], f"peak memory {peak // 1024} MB"
    if image is not None:
        assert image.ndim == 3 and image.shape[2] == 3 and image.dtype.name == "uint8", (image.shape, image.dtype)
        assert image.shape[0] * image.shape[1] <= MAX_PIXELS, image.shape


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=int, default=300, help="how long to fuzz")
    parser.add_argument("--work", type=Path, help="folder for the corpus and findings (default: a temp folder)")
    parser.add_argument("--rss-limit-mb", type=int, default=1024, help="memory that counts as a finding")
    parser.add_argument("--photo", type=Path, default=DATA_DIR / "images" / "maksssksksss0.jpg")
    parser.add_argument("--seed", type=int, default=0, help="libFuzzer's random seed; 0 = a new one each run")
    args = parser.parse_args(argv)

    import atheris

    work = args.work or Path(tempfile.mkdtemp(prefix="maskwatch-fuzz-"))
    corpus = work / "corpus"
    corpus.mkdir(parents=True, exist_ok=True)
    print(f"{write_seeds(corpus, args.photo)} seeds; corpus and findings in {work}", flush=True)
    with atheris.instrument_imports():
        import maskwatch.preprocessing  # noqa: F401  (instrumented: coverage guides the fuzzer through them)
        import maskwatch.serve  # noqa: F401
    PEAK_LIMIT_KB[0] = args.rss_limit_mb * 1024
    # libFuzzer's limit as a backstop above ours, which names the input precisely
    libfuzzer_args = [sys.argv[0], f"-max_total_time={args.seconds}", f"-rss_limit_mb={4 * args.rss_limit_mb}",
                      f"-seed={args.seed}", "-timeout=10", "-max_len=65536", f"-artifact_prefix={work}/", str(corpus)]
    atheris.Setup(libfuzzer_args, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
