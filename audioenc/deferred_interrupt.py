"""Ctrl-C held back while state changes in several steps, then raised as usual.

Python raises KeyboardInterrupt between any two bytecodes of the main thread: one that lands between
two updates that belong together (samples handed to the chunker, and the note that they were)
leaves a stream's state half changed. Inside ``interrupt_deferred()`` a SIGINT is only recorded;
it is delivered to the handler that was installed before once the block ends.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


@contextmanager
def interrupt_deferred():
    """Off the main thread, which never receives signals, and where SIGINT's handler was not set
    from Python (getsignal gives None: it could not be put back), it defers nothing."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is None:
        yield
        return
    pending: list = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pending:
            if callable(previous):  # Python's default raises KeyboardInterrupt; a program's own runs
                previous(signal.SIGINT, pending[0])
            else:  # SIG_DFL or SIG_IGN: the signal again, now that they apply
                signal.raise_signal(signal.SIGINT)


class InterruptSafeLock:
    """A lock for ``with`` that a Ctrl-C cannot leave held for good. CPython can raise
    KeyboardInterrupt after ``with`` took a lock and before its body's cleanup covers it (gh-74174):
    the lock stays held, and the thread's next ``with`` waited forever. Here the thread that holds
    it and enters again takes it over; other threads wait until that thread's next exit."""

    def __init__(self):
        self._lock = threading.Lock()
        self._holder: int | None = None

    def __enter__(self):
        me = threading.get_ident()
        while self._holder != me:  # else: left held by this thread's interrupted call, now ours again
            with interrupt_deferred():  # Ctrl-C comes between tries, never between taking it and noting so
                if self._lock.acquire(timeout=0.05):
                    self._holder = me
        return self

    def __exit__(self, *exc) -> None:
        with interrupt_deferred():
            self._holder = None
            self._lock.release()
