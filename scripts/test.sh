#!/usr/bin/env bash
# Quick start, step 2: the test suite (fast tier by default; `bash scripts/test.sh -m slow` for the slow one).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
