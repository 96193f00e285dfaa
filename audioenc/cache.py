"""The on-disk cache of exported ONNX graphs and TensorRT engines: where it is, what it holds, and
removing entries (``audioenc cache``).

Layout: ``<root>/<kind>/<key>/`` with a meta.json (kind: onnx, tensorrt), where the root is
$AUDIOENC_CACHE, else $XDG_CACHE_HOME/audioenc, else ~/.cache/audioenc. Keys include the weights and audioenc's code, so entries of
deleted checkpoints or older versions are never used again: this is how they get removed.
An entry's meta.json is touched each time the entry is used, so its mtime is the last use.
Directories named ``.tmp-*`` are exports in progress, or left behind by a killed process; a file
``<key>.lock`` is the lock of an export or engine build in progress (file_lock.py), gone when it ends;
``--clear`` leaves the entries whose lock is held. Any other directory there is not audioenc's (a shared
cache folder): it is never listed or removed.
``<root>/weights/`` holds small records of the checkpoints audioenc has read (checkpoint_record.py),
which ``audioenc cache --clear`` removes with the entries.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import time
from dataclasses import dataclass

from audioenc.atomic_file import TMP_PREFIX
from audioenc.file_lock import file_lock

KINDS = ("onnx", "tensorrt")
WEIGHTS_RECORDS = "weights"
META_FILE = "meta.json"
KEY_NAME = re.compile(r"[0-9a-f]{32}")  # the entries' names: export.cache_key, tensorrt.engine_key
RECORD_NAME = re.compile(r"[0-9a-f]{32}\.json")  # checkpoint records' (checkpoint_record._record_path)
# An unfinished export untouched this long belongs to a process that died (a whisper-large export
# takes minutes, not hours).
STALE_TMP_S = 6 * 3600


def cache_root() -> str:
    if os.environ.get("AUDIOENC_CACHE"):
        return _absolute(os.environ["AUDIOENC_CACHE"])
    user_caches = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return _absolute(os.path.join(user_caches, "audioenc"))


def cache_root_problem() -> str | None:
    """Why the cache directory cannot be one (a file is in its place), for ``audioenc info|cache``."""
    root = cache_root()
    if os.path.exists(root) and not os.path.isdir(root):
        return f"the cache {root} is a file, not a directory (set AUDIOENC_CACHE to a directory)"
    return None


@functools.lru_cache(maxsize=None)
def _absolute(path: str) -> str:
    """``~`` expanded, and a relative path taken from the directory the process was in when it first
    used it: a later os.chdir must not move the cache."""
    return os.path.abspath(os.path.expanduser(path))


def mark_used(entry: str) -> None:
    """Records a use of the entry directory ``entry`` (its meta.json's mtime)."""
    try:
        os.utime(os.path.join(entry, META_FILE))
    except OSError:  # a read-only cache still works; its last-use times just stay put
        pass


@dataclass(frozen=True)
class CacheEntry:
    kind: str          # onnx | tensorrt
    path: str
    size: int          # bytes
    last_used: float   # seconds since the epoch
    what: str          # e.g. "whisper, ExportSpec(num_layers=32, ...) (from openai/whisper-large-v3)";
                       # "unfinished export" for .tmp-*

    @property
    def unfinished(self) -> bool:
        return os.path.basename(self.path).startswith(".tmp-")


def _size(path: str) -> int:
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.path.getsize(os.path.join(folder, name))
            except OSError:  # removed while we walked
                pass
    return total


def _describe(entry: str) -> tuple[str, float]:
    meta_path = os.path.join(entry, META_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        last_used = os.path.getmtime(meta_path)
    except (OSError, ValueError):
        with file_lock(entry + ".lock", entry, wait=False) as free:  # a TensorRT build runs minutes without one
            what = "no readable meta.json (rebuilt at its next use)" if free else \
                "being exported or built by another process now"
        return what, os.path.getmtime(entry)
    if not isinstance(meta, dict):
        return "meta.json is not an audioenc cache record (rebuilt at its next use)", last_used
    fields = [meta.get(name) for name in ("family", "spec", "dtype", "profile", "gpu")]
    # The checkpoint the entry was first built from (the key is the weights', so another copy of them
    # shares it); entries written before audioenc recorded it have none.
    source = f" (from {meta['source']})" if meta.get("source") else ""
    return ", ".join(str(f) for f in fields if f) + source, last_used


def list_entries() -> list[CacheEntry]:
    """Every entry under the cache root, least recently used first."""
    root = cache_root()
    entries = []
    for kind in KINDS:
        folder = os.path.join(root, kind)
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            path = os.path.join(folder, name)
            if not os.path.isdir(path) or not (KEY_NAME.fullmatch(name) or name.startswith(".tmp-")):
                continue  # TensorRT's timing caches (small, shared by every engine), or not audioenc's
            try:
                if name.startswith(".tmp-"):
                    what, last_used = "unfinished export", os.path.getmtime(path)
                else:
                    what, last_used = _describe(path)
                entries.append(CacheEntry(kind, path, _size(path), last_used, what))
            except OSError:  # removed while we looked
                continue
    return sorted(entries, key=lambda e: e.last_used)


def removable(entries: list[CacheEntry], unused_days: float | None = None,
              unfinished_too: bool = False) -> list[CacheEntry]:
    """The entries to remove: all of them, or those unused for ``unused_days``; unfinished exports
    only once they are STALE_TMP_S old (a younger one may be running now), unless ``unfinished_too``."""
    now = time.time()
    age_limit = 0.0 if unused_days is None else unused_days * 86400

    def old_enough(entry: CacheEntry) -> bool:
        limit = max(age_limit, STALE_TMP_S if entry.unfinished and not unfinished_too else 0.0)
        # no limit takes all: a last use in the future too (a cache copied from, or shared with, a clock ahead)
        return limit == 0 or now - entry.last_used >= limit

    return [e for e in entries if old_enough(e)]


def remove(entries: list[CacheEntry]) -> tuple[int, list[str], list[CacheEntry]]:
    """Deletes the entries' directories, but those whose export or engine build holds their lock now
    (a TensorRT entry's folder exists during its build: removed, the build's files could go under its
    feet); returns the bytes freed, per entry that could not be removed (whole or in part) why, and
    the entries kept as being built."""
    freed, failed, building = 0, [], []
    for entry in entries:
        # Held while the entry goes, so an export or build of it that starts meanwhile waits for that.
        # (An unfinished export's folder has no lock of its own: removable() spares the young ones.)
        lock = file_lock(entry.path + ".lock", entry.path, wait=False)
        with contextlib.nullcontext(True) if entry.unfinished else lock as free:
            if not free:
                building.append(entry)
                continue
            try:
                shutil.rmtree(entry.path)
                freed += entry.size
            except OSError as exc:  # e.g. a read-only cache; a part may be gone: its next use rebuilds it
                failed.append(f"{entry.path} ({exc})")
    return freed, failed, building


def remove_weights_records(unused_days: float | None = None) -> None:
    """Deletes the checkpoint records (all, or those unused for ``unused_days``); a missing one only
    means that the next load reads and hashes its checkpoint again. Only files named as records
    (or as their unfinished writes, once stale) go: a cache may be a folder users keep files in too."""
    folder = os.path.join(cache_root(), WEIGHTS_RECORDS)
    now = time.time()
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        path = os.path.join(folder, name)
        if name.startswith(TMP_PREFIX):
            age_limit = max((unused_days or 0.0) * 86400, STALE_TMP_S)  # a younger one may be being written
        elif RECORD_NAME.fullmatch(name):
            age_limit = (unused_days or 0.0) * 86400
        else:
            continue
        try:
            if os.path.isfile(path) and (age_limit == 0 or now - os.path.getmtime(path) >= age_limit):
                os.remove(path)
        except OSError:  # removed meanwhile, or a read-only cache
            pass
