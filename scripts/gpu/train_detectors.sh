#!/usr/bin/env bash
# On a GPU machine with JAX (no TensorFlow or MLflow needed): trains face detectors side by side on one GPU,
# one per peak learning rate, with the same seed, photo split and time budget, each into OUT_DIR/lr<rate>/.
#
#   bash scripts/gpu/train_detectors.sh PACK_DIR OUT_DIR
#
# PACK_DIR is what scripts/gpu/pack.sh made (its wheels, if any, are installed into a private folder first).
# Settings, as environment variables: RATES ("5e-4 1e-3"), BUDGET (seconds of training each, 480), WORKERS
# (augmenting threads each, 6), PY (python3), EXTRA (more --set options for train-detector).
# Each OUT_DIR/lr<rate>/ keeps face_detector.keras, history.csv, train_config.json and train.log: what
# `maskwatch train-detector --trained OUT_DIR/lr<rate>/face_detector.keras` needs back home.
set -uo pipefail
if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit $(( $# < 2 ))
fi
pack=$(realpath -m "$1")
out=$2
if [[ ! -d $pack/data/images || ! -d $pack/keras/models ]]; then
    echo "error: $pack is not a folder made by scripts/gpu/pack.sh (data/images/, keras/models/)" >&2
    exit 2
fi
repo=$(realpath "$(dirname "$0")/../..")
python=${PY:-python3}
started=$(date +%s)
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
site=$(mktemp -d)
if compgen -G "$pack/wheels/*.whl" >/dev/null; then
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site/packages" \
        "$pack"/wheels/*.whl || { echo "error: installing the wheels failed" >&2; exit 1; }
fi
export PYTHONPATH=$site/packages:$repo/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export KERAS_HOME=$pack/keras MASKWATCH_DATA_DIR=$pack/data KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false \
    MPLBACKEND=Agg
"$python" -c "import jax, keras, maskwatch.cli; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)" \
    || { echo "error: jax, keras or maskwatch cannot be imported" >&2; exit 1; }
echo "ready in $(( $(date +%s) - started )) s"
rates=${RATES:-5e-4 1e-3}  # 2e-3 lost to 1e-3 in both runs that compared them
for rate in $rates; do
    mkdir -p "$out/lr$rate"
    # shellcheck disable=SC2086  # EXTRA holds several options
    MASKWATCH_WORK_DIR=$site/work-$rate "$python" -m maskwatch.cli train-detector --train-only "$out/lr$rate" \
        --set detector_train.epochs=400 --set "detector_train.time_budget_s=${BUDGET:-480}" \
        --set "detector_train.learning_rate=$rate" --set "detector_train.loader_workers=${WORKERS:-6}" ${EXTRA:-} \
        > "$out/lr$rate/train.log" 2>&1 &
done
failed=0
for job in $(jobs -p); do wait "$job" || failed=1; done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=memory.used --format=csv,noheader
for rate in $rates; do
    echo "== lr $rate"
    grep -E "val mAP|^trained |rror" "$out/lr$rate/train.log" | tail -n 6
    # The best epoch's weights are inside face_detector.keras, and --trained redraws the curves from history.csv.
    rm -f "$out/lr$rate"/*.best.weights.h5 "$out/lr$rate/training_curves.png"
done
rm -rf "$site"
echo "done in $(( $(date +%s) - started )) s"
exit $failed
