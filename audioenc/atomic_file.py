"""Files written whole or not at all: written under a temporary name in the same directory, then
renamed into place, so an interrupted writer never leaves a half-written file under the final name.
Used for embeddings, cache metadata, checkpoint records and TensorRT engines."""
from __future__ import annotations

import os
import uuid

TMP_PREFIX = ".audioenc-tmp-"


def atomic_write(path: str, write) -> None:
    """``write(tmp)`` writes the file at ``tmp`` (same directory and suffix as ``path``), which then
    replaces ``path``. Missing directories are created. The file gets the umask's permissions, as
    open makes them (mkstemp's 0600 would keep a shared cache's other users out)."""
    folder = os.path.dirname(path) or "."
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f"{TMP_PREFIX}{uuid.uuid4().hex}{os.path.splitext(path)[1]}")
    try:
        open(tmp, "xb").close()
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_bytes(path: str, data) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    atomic_write(path, write)
