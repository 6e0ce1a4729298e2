"""Stop signals, handled alike by training runs, the server and the video loop.

Ctrl-C (SIGINT), `kill` / a service manager / a cluster's preemption (SIGTERM) and a closed terminal (SIGHUP)
get a handler while a long job runs, so it can end cleanly. A signal this process was started with ignored
(`nohup`, a background job) stays ignored: `nohup maskwatch train &` must outlive its terminal.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator

STOP_SIGNALS: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM,
                                 *((signal.SIGHUP,) if hasattr(signal, "SIGHUP") else ()))


@contextlib.contextmanager
def handling_stop_signals(handler: Callable[[int, object], None],
                          signals: tuple[int, ...] = STOP_SIGNALS) -> Iterator[tuple[int, ...]]:
    """Call handler(signum, frame) for each of `signals` not ignored at entry; yields those handled. Python only
    delivers signals to the main thread, so elsewhere nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield ()
        return
    previous = {signum: signal.signal(signum, handler) for signum in signals
                if signal.getsignal(signum) is not signal.SIG_IGN}
    try:
        yield tuple(previous)
    finally:
        for signum, old_handler in previous.items():
            signal.signal(signum, old_handler)
