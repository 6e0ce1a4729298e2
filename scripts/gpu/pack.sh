#!/usr/bin/env bash
# Packs what training the face detector needs on a GPU machine without internet (a rented box, a cluster node)
# into one folder: the data set, MobileNetV2's ImageNet weights and the wheels a JAX-only Python lacks.
# Copy the repository and that folder there, then run scripts/gpu/train_detectors.sh (README, "The detector
# trained on this data set").
#
#   bash scripts/gpu/pack.sh PACK_DIR [--no-wheels]
#
# Reads MASKWATCH_DATA_DIR (the data set: images/ and annotations/) and KERAS_HOME (the weights are fetched
# into it first if missing). GPU_PYTHON (default 3.12) and GPU_PLATFORMS name the GPU machine's Python and
# manylinux platforms; the wheels are this checkout's keras, pydantic and pycocotools versions, without their
# dependencies (numpy, h5py, ... are the GPU machine's own: a second numpy would shadow the one jaxlib needs).
set -euo pipefail
if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit $(( $# < 1 ))
fi
pack=$(realpath -m "$1")
with_wheels=1
[[ ${2:-} == --no-wheels ]] && with_wheels=0
data=$(realpath -m "${MASKWATCH_DATA_DIR:?set MASKWATCH_DATA_DIR to the data set folder (images/ and annotations/)}")
cd "$(dirname "$0")/../.."  # paths given are resolved above, from where the script was called
python=${PYTHON:-.venv/bin/python}
[[ -d $data/images && -d $data/annotations ]] || { echo "error: $data has no images/ and annotations/" >&2; exit 2; }
if [[ -e $pack ]]; then echo "error: $pack exists; give a new folder" >&2; exit 2; fi

mkdir -p "$pack/data" "$pack/keras/models"
cp -r "$data/images" "$data/annotations" "$pack/data/"
chmod -R u+w "$pack/data"
if command -v jpegtran >/dev/null; then
    # Lossless: the same DCT coefficients with better Huffman tables, progressive (about 9% smaller), so the
    # pack fits a 64 MiB carry limit. A photo is replaced only when it decodes to the same pixels and the same
    # signature (which groups similar photos into one split) as before.
    "$python" - "$pack/data/images" <<'PY'
import subprocess, sys, tempfile
from pathlib import Path

import cv2
import numpy as np

from maskwatch.data import photo_signature
from maskwatch.progress import progress_bar

photos = sorted(p for p in Path(sys.argv[1]).iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
before = after = replaced = 0
with tempfile.TemporaryDirectory() as scratch:
    for photo in progress_bar(photos, desc="re-encoding photos losslessly", unit="photo"):
        smaller = Path(scratch) / photo.name
        done = subprocess.run(["jpegtran", "-optimize", "-progressive", "-copy", "all", "-outfile", str(smaller),
                               str(photo)], capture_output=True)
        size = photo.stat().st_size
        before += size
        old, new = cv2.imread(str(photo)), cv2.imread(str(smaller)) if done.returncode == 0 else None
        same = (new is not None and old is not None and np.array_equal(old, new)
                and smaller.stat().st_size < size)
        if same:
            old_sig, new_sig = photo_signature(photo), photo_signature(smaller)
            same = bool(old_sig and new_sig and old_sig[0] == new_sig[0]
                        and np.array_equal(old_sig[1], new_sig[1]))
        if same:
            smaller.replace(photo)
            replaced += 1
        after += photo.stat().st_size
print(f"re-encoded {replaced} of {len(photos)} JPEG photos losslessly: {before / 2**20:.1f} -> "
      f"{after / 2**20:.1f} MiB, the same pixels")
PY
else
    echo "note: jpegtran not found (Debian: libjpeg-turbo-progs); the photos are copied as they are, about 9% larger"
fi
weights=$("$python" -c "from maskwatch.model import fetch_imagenet_weights; print(fetch_imagenet_weights())")
cp "$weights" "$pack/keras/models/"
if (( with_wheels )); then
    pins=$("$python" - <<'PY'
from importlib.metadata import version
names = ["keras", "pydantic", "pydantic-core", "annotated-types", "typing-inspection", "typing-extensions",
         "pycocotools", "optree", "namex"]
print(" ".join(f"{name}=={version(name)}" for name in names))
PY
)
    platforms=()
    for platform in ${GPU_PLATFORMS:-manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64}; do
        platforms+=(--platform "$platform")
    done
    # shellcheck disable=SC2086  # $pins is a list of requirements
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version "${GPU_PYTHON:-3.12}" \
        --implementation cp "${platforms[@]}" -d "$pack/wheels" $pins
fi
echo "packed $(ls "$pack/data/images" | wc -l) photos, the ImageNet weights$( (( with_wheels )) && echo " and $(ls "$pack/wheels" | wc -l) wheels") into $pack ($(du -sh "$pack" | cut -f1))"
