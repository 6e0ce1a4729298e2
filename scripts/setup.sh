#!/usr/bin/env bash
# Create .venv and install maskwatch with its dev and export extras. Idempotent: re-running is cheap.
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  for candidate in python3.11 python3.12 python3.10 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(not ((3, 10) <= sys.version_info[:2] <= (3, 12)))'; then
      echo "$candidate"; return 0
    fi
  done
  echo "maskwatch needs Python 3.10-3.12 (TensorFlow 2.21); none found on PATH" >&2
  return 1
}

stamp=.venv/.maskwatch-installed
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ]; then
  exit 0
fi
python_bin=$(pick_python)
[ -x .venv/bin/python ] || "$python_bin" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
echo "installing maskwatch and its dependencies into .venv (TensorFlow is large: a few minutes)..." >&2
.venv/bin/python -m pip install --quiet -e ".[dev,export,kaggle]"
touch "$stamp"
