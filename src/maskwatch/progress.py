"""Progress bars for long loops: redrawn live on a terminal, and kept short in a log.

tqdm redraws a bar up to ten times a second with a carriage return. On a terminal (or in Jupyter) that is the
bar; in a log file, CI output or a pipe the redraws pile up into one line of bars (about 75 for cropping the
data set). There a bar is written when it starts, at most every `LOG_INTERVAL_S` and when it ends, each on
its own line.
"""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

Item = TypeVar("Item")
LOG_INTERVAL_S = 30.0


class _LinesNotRedraws:
    """A stream for tqdm that ends each bar with a newline instead of starting it with a carriage return."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        text = text.replace("\r", "").replace("\x1b[A", "")  # tqdm's redraw and its cursor-up for nested bars
        return self.stream.write(f"{text}\n" if text.strip() else "")

    def flush(self) -> None:
        self.stream.flush()


def redraws_in_place() -> bool:
    """Whether standard error shows a carriage-return redraw as one bar: a terminal, or Jupyter's output area."""
    return sys.stderr.isatty() or type(sys.stderr).__module__.startswith("ipykernel")


def progress_bar(iterable: Iterable[Item], **options) -> Iterable[Item]:
    """tqdm over `iterable` on standard error; `options` go to tqdm (desc, unit, total, disable)."""
    from tqdm.auto import tqdm

    if not redraws_in_place():
        options = {"mininterval": LOG_INTERVAL_S, "maxinterval": LOG_INTERVAL_S,
                   "file": _LinesNotRedraws(sys.stderr), **options}
    return tqdm(iterable, **options)
