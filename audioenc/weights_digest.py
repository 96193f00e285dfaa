"""The digest of a model's weights, which keys its exported graphs and engines in the cache.

Hashing the weights takes time at every load (whisper-large-v3: 1.9 s for 2.5 GB), so the digest of a
checkpoint read from disk is remembered in ``<cache>/weights/``, under the stat of its files (size,
modification and change times, inode) and the code that turns them into the model. Any write to
a checkpoint file, a new file beside it, or another audioenc computes the digest again. A
``random:`` architecture's seeded weights are remembered by its name and the code.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading

import torch
from torch import nn

from audioenc.cache import WEIGHTS_RECORDS, cache_root


def weights_digest(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def checkpoint_weights_digest(model: nn.Module) -> str:
    """weights_digest(model), remembered for a model read from a checkpoint on disk
    (``model.checkpoint_path``: a file, or a directory's files) or built for a ``random:``
    architecture (seeded: the same weights every time); computed afresh for any other."""
    try:
        key = _record_key(model)
    except OSError:  # the checkpoint vanished since it was read: nothing to remember it by
        key = None
    if key is None:
        return weights_digest(model)
    record = os.path.join(cache_root(), WEIGHTS_RECORDS, key + ".json")
    try:
        with open(record) as f:
            digest = json.load(f)["digest"]
    except (OSError, ValueError, KeyError, TypeError):
        digest = None
    if isinstance(digest, str):
        try:
            os.utime(record)  # its last use, for `audioenc cache --clear --unused-days`
        except OSError:  # a read-only cache
            pass
        return digest
    digest = weights_digest(model)
    try:
        os.makedirs(os.path.dirname(record), exist_ok=True)
        tmp = f"{record}.{os.getpid()}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            json.dump({"digest": digest, "checkpoint": getattr(model, "checkpoint_source", "")}, f)
        os.replace(tmp, record)
    except OSError:  # a read-only cache: the digest is computed at every load
        pass
    return digest


def _record_key(model: nn.Module) -> str | None:
    path, source = getattr(model, "checkpoint_path", ""), getattr(model, "checkpoint_source", "")
    if path:
        fields = {"path": path, "files": _file_stats(path)}
    elif source.startswith("random:"):
        fields = {"random": source}
    else:
        return None
    fields.update(code=_code_digest(), torch=torch.__version__)
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:32]


def _file_stats(path: str) -> list[list]:
    """Name, size, modification and change times, inode and device of the checkpoint file, or of
    each file in the checkpoint directory (a hub snapshot's links: their blobs)."""
    names = sorted(os.listdir(path)) if os.path.isdir(path) else [""]
    stats = []
    for name in names:
        file = os.path.join(path, name) if name else path
        if name and not os.path.isfile(file):
            continue  # subdirectories: no loader reads them
        st = os.stat(file)
        stats.append([name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev])
    return stats


def _code_digest() -> str:
    """audioenc's Python sources: any of them may change how a checkpoint becomes a model."""
    package = os.path.dirname(os.path.abspath(__file__))
    h = hashlib.blake2b(digest_size=16)
    for folder, _, files in sorted(os.walk(package)):
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(folder, name), "rb") as f:
                    h.update(os.path.relpath(f.name, package).encode() + b"\0" + f.read())
    return h.hexdigest()
