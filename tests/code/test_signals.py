"""Stop signals: handled while a job runs, restored after, and left ignored where the process was told to ignore
them (nohup, background jobs)."""

import os
import signal

from maskwatch.signals import STOP_SIGNALS, handling_stop_signals


def test_signals_are_handled_inside_and_restored_after():
    received = []
    # As in a terminal: CI may start pytest with SIGINT (a background job) or SIGHUP (nohup) ignored.
    as_in_a_terminal = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL,
                        signal.SIGHUP: signal.SIG_DFL}
    outer = {signum: signal.signal(signum, handler) for signum, handler in as_in_a_terminal.items()}
    try:
        before = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
        with handling_stop_signals(lambda signum, _frame: received.append(signum)) as handled:
            assert set(handled) == {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
        assert received == [signal.SIGTERM, signal.SIGINT]
        assert {signum: signal.getsignal(signum) for signum in STOP_SIGNALS} == before
    finally:
        for signum, handler in outer.items():
            signal.signal(signum, handler)


def test_a_signal_ignored_at_start_stays_ignored():
    """`nohup maskwatch train &`: closing the terminal (SIGHUP) must not stop the job."""
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with handling_stop_signals(lambda *_: None) as handled:
            assert signal.SIGHUP not in handled and signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGHUP)  # ignored: the test process lives on
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)
