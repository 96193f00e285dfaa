"""A lock that os.fork() waits for.

A fork copies only the thread that calls it. A lock that another thread holds at that moment stays
held in the child for good, and so does the work it guards: a pre-forking server that forks while a
warm-up thread exports a graph would get children whose first encode hangs on the backend's lock
(and torch's exporter, caught mid-trace in the copy, refuses any export there). So every such lock
is taken before a fork and released on both sides after it: the fork waits until the work is done.
Locks that nest are taken in the order of their ``level`` (the outermost first), as the code nests them.
"""
from __future__ import annotations

import os
import threading
import weakref

# Guards _live, and is held by a forking thread from its before hook to its after hook, so that two
# threads forking at once take the locks one fork after the other.
_forking = threading.Lock()
_live: weakref.WeakSet[ForkSafeLock] = weakref.WeakSet()
_taken: list[ForkSafeLock] = []  # by the fork in progress


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


def _before_fork() -> None:
    _forking.acquire()
    me = threading.get_ident()  # a lock the forking thread holds itself is its own to release, in both
    _taken[:] = sorted((lock for lock in _live if lock._owner != me), key=lambda lock: lock.level)
    for lock in _taken:
        lock._lock.acquire()


def _after_fork() -> None:
    for lock in reversed(_taken):
        lock._lock.release()
    _taken.clear()
    _forking.release()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork, after_in_child=_after_fork)
