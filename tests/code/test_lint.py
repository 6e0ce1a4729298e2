"""The linter, with the project's settings ([tool.ruff] in pyproject.toml), over the package, tests, benchmarks and
the notebook: unused names, undefined names, likely bugs and over-long lines fail the suite."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_code_passes_the_linter():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", "."],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "All checks passed" in result.stdout
