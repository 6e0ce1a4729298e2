"""The README's commands are the real ones: scripts exist, and every maskwatch command it names has --help."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
README = (REPO / "README.md").read_text()
MASKWATCH = str(Path(sys.executable).parent / "maskwatch")
KNOWN_GROUPS = {"data", "models", "config"}


def readme_commands() -> list[tuple[str, ...]]:
    code = "\n".join(re.findall(r"```(?:bash)?\n(.*?)```", README, re.S) + re.findall(r"`([^`\n]+)`", README))
    found = set()
    for match in re.finditer(r"maskwatch((?: [a-z][a-z-]*)+)", code):
        words = match.group(1).split()
        command = tuple(words[:2]) if words[0] in KNOWN_GROUPS else tuple(words[:1])
        if command[0] not in ("serve:create_app",):
            found.add(command)
    return sorted(found)


def test_quick_start_names_the_scripts_ci_runs():
    assert "bash scripts/run.sh" in README and "bash scripts/test.sh" in README
    assert (REPO / "scripts" / "run.sh").is_file() and (REPO / "scripts" / "test.sh").is_file()
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()


@pytest.mark.parametrize("workers, status", [("two", 2), ("0", 0)])
def test_the_test_script_takes_a_whole_number_of_workers(workers, status):
    out = subprocess.run(["bash", str(REPO / "scripts" / "test.sh"), "--co", "-q", "tests/code/test_readme.py"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "MASKWATCH_TEST_WORKERS": workers})
    assert out.returncode == status, out.stderr[-2000:]
    if status:  # refused before pytest started
        assert "must be a whole number (0 = no worker processes), not 'two'" in out.stderr and out.stdout == ""
    else:
        assert "test_the_test_script_takes_a_whole_number_of_workers[two-2]" in out.stdout


def test_readme_names_commands():
    assert {("train",), ("evaluate",), ("serve",), ("data", "prepare"), ("models", "promote")} <= set(
        readme_commands())


@pytest.mark.parametrize("command", readme_commands(), ids=" ".join)
def test_each_readme_command_answers_help(command):
    out = subprocess.run([MASKWATCH, *command, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"`maskwatch {' '.join(command)} --help` failed: {out.stderr[-500:]}"


def test_offline_settings_are_the_ones_the_code_reads():
    from maskwatch.config import ENV_OVERRIDES

    for variable in ("MASKWATCH_DATA_DIR", "MASKWATCH_YUNET_PATH", "MASKWATCH_TRACKING_URI"):
        assert variable in README and variable in ENV_OVERRIDES
    assert "KERAS_HOME" in README


def test_every_environment_variable_the_readme_names_is_read_somewhere():
    """A renamed or dropped variable must not live on in the README (MASKWATCH_SHARED_DIR is the tests',
    MASKWATCH_TEST_WORKERS scripts/test.sh's)."""
    readers = "".join(path.read_text() for path in [*(REPO / "src" / "maskwatch").glob("*.py"),
                                                     REPO / "tests" / "conftest.py"])
    shell_readers = "".join(path.read_text() for path in (REPO / "scripts").glob("*.sh"))
    named = set(re.findall(r"MASKWATCH_[A-Z_]+", README))
    assert {"MASKWATCH_CACHE_DIR", "MASKWATCH_DATA_DIR", "MASKWATCH_API_KEY", "MASKWATCH_TEST_WORKERS"} <= named
    assert [name for name in sorted(named) if f'"{name}"' not in readers and "${" + name not in shell_readers] == []
