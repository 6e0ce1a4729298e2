"""Progress bars redraw on a terminal and write whole lines, a few of them, into a log."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import time

from maskwatch import progress

LOOP = "import time\nfrom maskwatch.progress import progress_bar\nfor _ in progress_bar(range(40), desc='work'): " \
       "time.sleep(0.02)\n"


def test_in_a_log_a_short_loop_writes_its_start_and_end_as_two_lines():
    out = subprocess.run([sys.executable, "-c", LOOP], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stderr.splitlines()
    assert "\r" not in out.stderr and len(lines) == 2, out.stderr
    assert lines[0].startswith("work:   0%") and lines[1].startswith("work: 100%") and "40/40" in lines[1]


def test_in_a_log_a_long_loop_writes_a_line_per_interval(monkeypatch, capsys):
    monkeypatch.setattr(progress, "LOG_INTERVAL_S", 0.1)
    for _ in progress.progress_bar(range(30), desc="long"):
        time.sleep(0.02)
    lines = capsys.readouterr().err.splitlines()
    done = [int(line.split("|")[2].split("/")[0]) for line in lines]
    assert len(lines) >= 3 and done == sorted(done) and done[0] == 0 and done[-1] == 30, lines


def test_on_a_terminal_the_bar_is_redrawn_in_place():
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a new pty is 0 columns wide
    proc = subprocess.Popen([sys.executable, "-c", LOOP], stderr=child, stdout=subprocess.DEVNULL)
    os.close(child)
    written = b""
    while True:
        try:
            chunk = os.read(parent, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        written += chunk
    os.close(parent)
    assert proc.wait(timeout=120) == 0
    text = written.decode(errors="replace")
    assert text.count("\r") >= 2 and "100%" in text and "40/40" in text, text
