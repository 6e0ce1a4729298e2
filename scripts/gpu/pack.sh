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
