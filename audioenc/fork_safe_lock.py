"""A lock that os.fork() waits for.

A fork copies only the thread that calls it. A lock that another thread holds at that moment stays
held in the child for good, and so does the work it guards: a pre-forking server that forks while a
warm-up thread exports a graph would get children whose first encode hangs on the backend's lock
(and torch's exporter, caught mid-trace in the copy, refuses any export there). So every such lock
is taken before a fork and released on both sides after it: the fork waits until the work is done.
Locks that nest are taken in the order of their ``level`` (the outermost first), as the code nests them.
Work that many threads do at once is run inside ``fork_waits()`` instead: an onnxruntime session's
run holds the session's mutexes, and a child forked meanwhile hangs on them at its first run.
"""
from __future__ import annotations

import contextlib
import os
import threading
import weakref

# Guards _live, and is held by a forking thread from its before hook to its after hook, so that two
# threads forking at once take the locks one fork after the other.
_forking = threading.Lock()
_live: weakref.WeakSet[ForkSafeLock] = weakref.WeakSet()
_taken: list[ForkSafeLock] = []  # by the fork in progress
_runs = threading.Condition()  # guards the two below; held by a forking thread as _forking is
_running = 0  # threads inside fork_waits()
_fork_waiting = False  # a fork waits for them: none may come in


class ForkSafeLock:
    def __init__(self, level: int):
        self.level = level
        self._lock = threading.Lock()
        self._owner: int | None = None  # the thread that holds it
        with _forking:
            _live.add(self)

    def __enter__(self) -> ForkSafeLock:
        self._lock.acquire()
        self._owner = threading.get_ident()
        return self

    def __exit__(self, *exc) -> None:
        self._owner = None
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()


@contextlib.contextmanager
def fork_waits():
    """Inside: work that a fork waits for, which any number of threads may do at once (a fork
    waiting for it holds off new work for the few milliseconds it takes)."""
    global _running
    with _runs:
        _runs.wait_for(lambda: not _fork_waiting)
        _running += 1
    try:
        yield
    finally:
        with _runs:
            _running -= 1
            _runs.notify_all()


def _before_fork() -> None:
    global _fork_waiting
    _forking.acquire()
    me = threading.get_ident()  # a lock the forking thread holds itself is its own to release, in both
    _taken[:] = sorted((lock for lock in _live if lock._owner != me), key=lambda lock: lock.level)
    for lock in _taken:
        lock._lock.acquire()
    # then the runs: no run waits for a lock, while an export holds one for minutes
    _runs.acquire()
    _fork_waiting = True
    _runs.wait_for(lambda: _running == 0)


def _after_fork_in_parent() -> None:
    global _fork_waiting
    _fork_waiting = False
    _runs.notify_all()
    _runs.release()
    _after_fork()


def _after_fork_in_child() -> None:
    global _runs, _fork_waiting
    _fork_waiting = False
    _runs = threading.Condition()  # the threads that waited on the old one are gone
    _after_fork()


def _after_fork() -> None:
    for lock in reversed(_taken):
        lock._lock.release()
    _taken.clear()
    _forking.release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)
