"""Files written whole or not at all: written under a temporary name in the same directory, then
renamed into place, so an interrupted writer never leaves a half-written file under the final name.
Used for embeddings, exports, cache metadata, checkpoint records and TensorRT engines."""
from __future__ import annotations

import os
import stat
import uuid

TMP_PREFIX = ".audioenc-tmp-"


def atomic_write(path: str, write, replace: bool = True) -> None:
    """``write(tmp)`` writes the file at ``tmp`` (same directory and suffix as ``path``), which then
    replaces ``path``, or with ``replace=False`` takes its place only if it is still free
    (PathTaken otherwise). Missing directories are created. The file gets the umask's
    permissions, as open makes them (mkstemp's 0600 would keep a shared cache's other users out)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex}{os.path.splitext(path)[1]}")
    try:
        open(tmp, "xb").close()
        mode = stat.S_IMODE(os.stat(tmp).st_mode)  # the umask's, as open made it
        write(tmp)
        if stat.S_IMODE(os.stat(tmp).st_mode) != mode:  # a writer that replaced the file with a private one of
            os.chmod(tmp, mode)                         # its own (safetensors >= 0.8's save_file makes it 0600)
        move_into_place(tmp, path, replace)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class PathTaken(FileExistsError):
    """A file appeared at the path since the caller checked it was free (another process's)."""

    def __init__(self, path: str):
        super().__init__(f"{path} appeared while this file was written (another process?); it was kept")


def move_into_place(tmp: str, path: str, replace: bool) -> None:
    """Renames ``tmp`` to ``path`` (same file system). With ``replace=False`` a file that appeared at
    ``path`` since the caller checked (another process's, written meanwhile) is kept: PathTaken."""
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if path exists: a rename that never replaces
    except FileExistsError:
        raise PathTaken(path) from None
    except OSError:  # a file system without hard links: check, then rename (a narrow race remains)
        if os.path.lexists(path):
            raise PathTaken(path) from None
        os.replace(tmp, path)
        return
    os.remove(tmp)


def atomic_write_bytes(path: str, data, replace: bool = True) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write, replace)
