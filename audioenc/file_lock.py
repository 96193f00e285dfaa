"""A lock that processes sharing a cache take around work only one of them should do (exporting the
same graph, building the same TensorRT engine): an flock on a file beside the work, removed by its
last holder. The kernel drops it when its holder dies (SIGKILL included), so a killed export never
leaves the others waiting. Where there is no flock (Windows), or the folder cannot be written (a
read-only cache, where the work itself fails and says why), there is no lock: each process goes on
as if it were alone. A process that has to wait says so on stderr, once: a wait of minutes must not
look like a hang."""
from __future__ import annotations

import contextlib
import os
import sys

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


@contextlib.contextmanager
def file_lock(path: str, work: str, wait: bool = True):
    """Inside: this thread holds ``path``'s lock, against other processes and other threads alike.
    ``work`` (what the holder builds, e.g. a cache entry's path) names it in the waiting line. With
    ``wait=False`` it does not wait: where another holds the lock, it yields False and holds nothing
    (True otherwise)."""
    held_elsewhere = False
    try:
        fd = _acquire(path, work, wait) if fcntl is not None else None
    except BlockingIOError:  # wait=False, and another holds it
        fd, held_elsewhere = None, True
    except OSError:
        fd = None
    try:
        yield not held_elsewhere
    finally:
        if fd is not None:
            try:
                with contextlib.suppress(FileNotFoundError):  # the cache removed by hand meanwhile
                    os.remove(path)  # while held: a waiter finds it gone and opens a new one
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)  # explicitly: a child forked meanwhile holds a copy of fd
                os.close(fd)


def _acquire(path: str, work: str, wait: bool = True) -> int:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    said = False
    while True:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o666)  # flock needs no write access
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:  # held by the process building it
                if not wait:
                    raise
                if not said:
                    _say_waiting(work)
                    said = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            # the holder before us removed the file as it left: ours is the lock only if it is still there
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


def _say_waiting(work: str) -> None:
    """One line on stderr, in a service's log too: a worker that waits minutes for another's build
    must not look hung. Nothing where there is no stderr (a service started with it closed, pythonw)."""
    if sys.stderr is not None:
        with contextlib.suppress(OSError, ValueError):  # ValueError: a closed stderr
            print(f"audioenc: waiting for another process building {work}", file=sys.stderr, flush=True)
