#!/usr/bin/env bash
# Quick start, step 2: the test suite (fast tier by default; `bash scripts/test.sh -m slow` for the slow one).
# Two worker processes, each given whole test files (module fixtures such as a trained model are built once):
# most of the time is training and process start-up, which two processes overlap even on 2 cores.
# MASKWATCH_TEST_WORKERS=N changes the count; 0 runs everything in this one process.
set -euo pipefail
cd "$(dirname "$0")/.."
workers="${MASKWATCH_TEST_WORKERS:-2}"
if ! [[ "$workers" =~ ^[0-9]+$ ]]; then  # before setup.sh, which may spend minutes installing
  echo "MASKWATCH_TEST_WORKERS must be a whole number (0 = no worker processes), not '$workers'" >&2
  exit 2
fi
bash scripts/setup.sh
exec .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
