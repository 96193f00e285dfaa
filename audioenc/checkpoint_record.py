"""What audioenc remembers of a checkpoint it has read: the digest of its weights, which keys the
graphs and engines exported from them, and its description (family, config, preprocessor).

Hashing the weights took time at every load (whisper-large-v3: 1.9 s for 2.5 GB), and the onnx and
tensorrt backends run on the weights of their cached graph or engine, so a load that finds a
record reads no tensors at all: the model stays a shell whose weights are read from the checkpoint
only when a graph must be exported (reference_weights.py). Records are kept in ``<cache>/weights/``
under the stat of the checkpoint's files taken before they were read (size, modification and change
times, inode; written only when they are the same after the weights were hashed) and the code that
turns them into a model, so any write to a checkpoint file (but for a rewrite of the same size
within one tick of a coarse file system clock), a new file beside it, or another audioenc reads and
hashes the checkpoint again. A ``random:`` architecture's seeded weights are remembered by its name,
the code and the CPU. A record whose weights no longer hash to its digest is dropped when that is
found (reference_weights.py).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform

import torch
from torch import nn

from audioenc.atomic_file import atomic_write_bytes
from audioenc.cache import WEIGHTS_RECORDS, cache_root
from audioenc.weights import FAMILIES, Checkpoint, file_stats


def weights_digest(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def recorded_weights_digest(model: nn.Module) -> str:
    """The digest of ``model``'s weights: its checkpoint's record's when it was recalled, else
    computed, and recorded when the model was read from a checkpoint on disk that has not changed
    since it was read, or built for a ``random:`` architecture (``model.checkpoint``, set by
    audioenc.loading for a model just built from it)."""
    checkpoint = getattr(model, "checkpoint", None)
    if checkpoint is not None and checkpoint.weights_digest:
        return checkpoint.weights_digest
    digest = weights_digest(model)
    key = _record_key(checkpoint) if checkpoint is not None and _unchanged(checkpoint) else None
    if key is not None:
        record = _record_path(key)
        # the key inside too: a record file copied or moved to another's name is not taken for it
        fields = {"key": key, "digest": digest, "family": checkpoint.family, "format": checkpoint.format,
                  "config": checkpoint.config, "preprocessor": checkpoint.preprocessor, "source": checkpoint.source,
                  "target_lang": checkpoint.target_lang}
        try:
            text = json.dumps(fields)
            if json.loads(text) != fields:  # e.g. tuples in a config: recalled, it would differ
                return digest
            atomic_write_bytes(record, text.encode())
        except (OSError, TypeError, ValueError):  # a read-only cache, or a config JSON cannot hold
            pass
    return digest


def recall(source: str, path: str, target_lang: str | None = None) -> Checkpoint | None:
    """The checkpoint ``source`` (read from ``path``; "" for a ``random:`` architecture) with
    ``target_lang``'s adapter as recorded when it was last read, without tensors (``weights_digest``
    set), or None when there is no record of it in its present state."""
    try:
        stats = file_stats(path) if path else []
    except OSError:
        return None
    probe = Checkpoint("", {}, {}, source=source, path=os.path.abspath(path) if path else "", file_stats=stats,
                       target_lang=target_lang or "")
    key = _record_key(probe)
    if key is None:
        return None
    record = _record_path(key)
    try:
        with open(record) as f:
            fields = json.load(f)
        if fields["key"] != key:
            return None
        checkpoint = dataclasses.replace(probe, family=fields["family"], config=fields["config"],
                                         preprocessor=fields["preprocessor"], format=fields["format"],
                                         weights_digest=fields["digest"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not (checkpoint.family in FAMILIES and isinstance(checkpoint.config, dict)
            and isinstance(checkpoint.preprocessor, dict) and isinstance(checkpoint.weights_digest, str)
            and checkpoint.weights_digest):
        return None
    try:
        os.utime(record)  # its last use, for `audioenc cache --clear --unused-days`
    except OSError:  # a read-only cache
        pass
    return checkpoint


def forget(checkpoint: Checkpoint | None) -> None:
    """Removes the record of ``checkpoint`` (recalled, but its weights no longer hash to it)."""
    key = _record_key(checkpoint) if checkpoint is not None else None
    try:
        if key is not None:
            os.remove(_record_path(key))
    except OSError:  # gone already, or a read-only cache
        pass


def _unchanged(checkpoint: Checkpoint) -> bool:
    """Whether the checkpoint's files are as they were before it was read: a record must not pair
    one version's stat with another's weights."""
    if not checkpoint.path:
        return True
    try:
        return file_stats(checkpoint.path) == checkpoint.file_stats
    except OSError:  # gone since it was read
        return False


def _record_key(checkpoint: Checkpoint) -> str | None:
    if checkpoint.path:
        fields = {"path": checkpoint.path, "files": checkpoint.file_stats}
    elif checkpoint.source.startswith("random:"):
        # random weights may differ in their last bits between CPUs (vectorised sampling)
        fields = {"random": checkpoint.source, "machine": platform.machine(),
                  "cpu": torch.backends.cpu.get_cpu_capability()}
    else:
        return None
    if checkpoint.target_lang:  # another language's adapters: other weights from the same files
        fields["target_lang"] = checkpoint.target_lang
    fields.update(code=_code_digest(), torch=torch.__version__)
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:32]


def _record_path(key: str) -> str:
    return os.path.join(cache_root(), WEIGHTS_RECORDS, key + ".json")


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
