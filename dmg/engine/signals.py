"""SIGTERM, what schedulers send at a time limit or on preemption, stops a run the way Ctrl-C does."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from dmg.errors import Terminated

_received: list[int] = []
_ending: list[bool] = []  # non-empty inside not_interrupted()


def stop_requested() -> bool:
    """Whether this process was asked to stop (SIGTERM or Ctrl-C) inside :func:`sigterm_raises`."""
    return bool(_received)


def _raise_terminated(signum, frame) -> None:
    _received.append(signum)
    if not _ending:
        raise Terminated(f"received signal {signal.Signals(signum).name}")


def _raise_keyboard_interrupt(signum, frame) -> None:
    _received.append(signum)
    if not _ending:
        raise KeyboardInterrupt


@contextmanager
def not_interrupted() -> Iterator[None]:
    """Run the block to its end even if SIGTERM or Ctrl-C arrives meanwhile: the signal is recorded
    (:func:`stop_requested`, :func:`reraise_stop`) but raises nothing. For the bookkeeping of a process already on its
    way out with an error (marking its run ended), which a signal must not cut short: torchrun sends SIGTERM to the
    other ranks just as they fail on a dead rank's connection."""
    _ending.append(True)
    try:
        yield
    finally:
        _ending.pop()


def reraise_stop(error: BaseException) -> None:
    """Raise the stop (:class:`Terminated` or ``KeyboardInterrupt``) that ``error`` stands for, if a signal asked
    this process to stop: a signal handler's exception can surface wrapped in another (Python 3.11 turns one raised
    during ``__set_name__``, say in an import, into a RuntimeError), and a stop must not pass for a crash."""
    if _received:
        stop = KeyboardInterrupt() if _received[-1] == signal.SIGINT else Terminated("received signal SIGTERM")
        raise stop from error


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within this block SIGTERM raises :class:`Terminated` in the main thread, so runs end KILLED, not RUNNING.

    Handlers someone else installed (submitit's, which requeues a preempted SLURM job) are left in place.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    handlers = {signal.SIGTERM: (signal.SIG_DFL, _raise_terminated)}
    handlers[signal.SIGINT] = (signal.default_int_handler, _raise_keyboard_interrupt)
    previous = {}
    for signum, (default, ours) in handlers.items():
        if signal.getsignal(signum) == default:
            previous[signum] = signal.signal(signum, ours)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
