#!/usr/bin/env bash
# Quick start, step 1: set everything up, then run the main job (prepare, train, evaluate, track, register).
# Arguments go to `maskwatch train`, e.g. `bash scripts/run.sh --preset quick`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/maskwatch train "$@"
