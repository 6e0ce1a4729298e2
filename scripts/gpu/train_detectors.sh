#!/usr/bin/env bash
# On a GPU machine with JAX (no TensorFlow or MLflow needed): trains face detectors side by side on one GPU,
# one per variant, with the same seed, photo split and time budget, each into OUT_DIR/lr<variant>/.
#
#   bash scripts/gpu/train_detectors.sh PACK_DIR OUT_DIR
#
# PACK_DIR is what scripts/gpu/pack.sh made (its wheels, if any, are installed into a private folder first).
# Settings, as environment variables: RATES, the variants ("1e-3 1e-3_ema": a peak learning rate, _ema adds a
# weight average of momentum EMA, 0.99), BUDGET (seconds of training each, 480), WORKERS (augmenting threads
# each, 6), PY (python3), EXTRA (more --set options for train-detector, for every variant).
# Each OUT_DIR/lr<variant>/ keeps face_detector.keras, history.csv, train_config.json and train.log: what
# `maskwatch train-detector --trained OUT_DIR/lr<variant>/face_detector.keras` needs back home.
set -uo pipefail
if [[ $# -lt 2 || $1 == -h || $1 == --help ]]; then
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
    exit $(( $# < 2 ))
fi
pack=$(realpath -m "$1")
out=$2
if [[ ! -d $pack/data/images || ! -d $pack/keras/models ]]; then
    echo "error: $pack is not a folder made by scripts/gpu/pack.sh (data/images/, keras/models/)" >&2
    exit 2
fi
# 2e-3 lost to 1e-3 in both runs that compared them; val mAP followed the learning rate down in every run,
# which a weight average may smooth out.
rates=${RATES:-1e-3 1e-3_ema}
for variant in $rates; do
    rate=${variant%_ema}
    if [[ ! $rate =~ ^[0-9.]+(e-?[0-9]+)?$ ]]; then
        echo "error: RATES holds $variant: give a learning rate, optionally with _ema (1e-3_ema)" >&2
        exit 2
    fi
done
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
for variant in $rates; do
    rate=${variant%_ema}
    average=()
    [[ $variant == *_ema ]] && average=(--set "detector_train.ema_momentum=${EMA:-0.99}")
    mkdir -p "$out/lr$variant"
    # shellcheck disable=SC2086  # EXTRA holds several options
    MASKWATCH_WORK_DIR=$site/work-$variant "$python" -m maskwatch.cli train-detector --train-only "$out/lr$variant" \
        --set detector_train.epochs=400 --set "detector_train.time_budget_s=${BUDGET:-480}" \
        --set "detector_train.learning_rate=$rate" --set "detector_train.loader_workers=${WORKERS:-6}" \
        "${average[@]}" ${EXTRA:-} > "$out/lr$variant/train.log" 2>&1 &
done
failed=0
for job in $(jobs -p); do wait "$job" || failed=1; done
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=memory.used --format=csv,noheader
for variant in $rates; do
    echo "== lr $variant"
    grep -E "val mAP|^trained |rror" "$out/lr$variant/train.log" | tail -n 6
    # The best epoch's weights are inside face_detector.keras, and --trained redraws the curves from history.csv.
    rm -f "$out/lr$variant"/*.best.weights.h5 "$out/lr$variant/training_curves.png"
done
rm -rf "$site"
echo "done in $(( $(date +%s) - started )) s"
exit $failed
