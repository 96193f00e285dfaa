"""The file work of ``audioenc embed``: outputs that mirror the inputs, atomic writes, batches of
similar length, and decoding on background threads while the encoder runs."""
from __future__ import annotations

import math
import os
import re
import sys
import warnings

from audioenc.atomic_file import TMP_PREFIX, PathTaken, atomic_write, atomic_write_bytes
from audioenc.ogg_pages import links as ogg_links

SETTINGS_FILE = ".audioenc-embed.json"  # in --out: what its outputs were made with


def output_paths(inputs: list[str], out_dir: str, suffix: str, unlisted: dict[str, str]) -> dict[str, str]:
    """Input file -> output file: files under a directory argument keep their relative path. Folders
    that cannot be listed go to ``unlisted`` (see find_audio_files)."""
    from audioenc.audio import find_audio_files

    mapping, writer, seen, stems = {}, {}, set(), {}
    for arg in inputs:
        named = not os.path.isdir(arg)  # a file named directly, not found under a directory
        root = os.path.dirname(arg) if named else arg
        for path in find_audio_files([arg], unlisted):
            if os.path.realpath(path) in seen:  # named again (by another argument): one output, where first put
                continue
            seen.add(os.path.realpath(path))
            rel = os.path.splitext(os.path.relpath(path, root))[0] + suffix
            target = os.path.join(out_dir, rel)
            if target in writer:
                raise ValueError(f"{writer[target]} and {path} would both write {target}; rename one, or embed "
                                 "them into different --out directories")
            twin = _twin(path, stems) if named and os.path.lexists(target) else None
            if twin:  # a.flac named alone after a.wav's run: a.npy may be a.wav's embedding
                raise ValueError(f"{target} exists, and {twin} beside {path} writes that name too: it may be that "
                                 "file's embedding. Rename one, or embed them into different --out directories")
            mapping[path], writer[target] = target, path
    return mapping


def _twin(path: str, stems: dict) -> str | None:
    """Another audio file beside path with the same name but for its extension (its output's name).
    ``stems`` caches each folder's audio files by name without extension."""
    from audioenc.audio import AUDIO_EXTENSIONS

    folder, name = os.path.split(path)
    if folder not in stems:
        try:
            names = sorted(os.listdir(folder or "."))
        except OSError:  # a folder we may read files in but not list: no twin we could know of
            names = []
        stems[folder] = {}
        for other in names:
            if other.lower().endswith(AUDIO_EXTENSIONS):
                stems[folder].setdefault(os.path.splitext(other)[0], []).append(other)
    twins = [other for other in stems[folder].get(os.path.splitext(name)[0], []) if other != name]
    return os.path.join(folder, twins[0]) if twins else None


MIXED = {"mixed": True}  # the record of an --out whose outputs may come from more than one setting


def outputs_in(out_dir: str) -> set[str]:
    """The embedding files under out_dir (what ``embed`` writes)."""
    return {os.path.join(root, name) for root, _, files in os.walk(out_dir) for name in files
            if name.endswith((".npy", ".safetensors")) and not name.startswith(TMP_PREFIX)}


def _read_record(directory: str) -> dict | None:
    """The record in directory; None where there is none (a new --out, or one from before records);
    MIXED where one is there but unreadable (nothing can be told of its outputs)."""
    import json

    path = os.path.join(directory, SETTINGS_FILE)
    if not os.path.lexists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return MIXED
    return record if isinstance(record, dict) else MIXED


def _directories_below_with_records(out_dir: str):
    for root, _, files in os.walk(out_dir):
        if SETTINGS_FILE in files and inside(root, out_dir):
            yield root


def inside(directory: str, out_dir: str) -> bool:
    """Whether directory is below out_dir (links resolved)."""
    return os.path.realpath(directory).startswith(os.path.realpath(out_dir) + os.sep)


def records_around(out_dir: str) -> list[tuple[str, dict]]:
    """The records that describe the outputs already under out_dir: the nearest at or above it (an
    earlier run's --out may hold this one), and those of directories below it (earlier runs' --outs
    inside this one). Links are resolved: a linked --out is the directory it leads to."""
    found, directory = [], os.path.realpath(out_dir)
    while True:
        record = _read_record(directory)
        if record is not None:
            found.append((directory, record))
            break
        parent = os.path.dirname(directory)
        if parent == directory:
            break
        directory = parent
    return found + [(root, _read_record(root)) for root in _directories_below_with_records(out_dir)]


def settings_conflicts(out_dir: str, settings: dict, last_layer: int) -> list[tuple[str, str]]:
    """(directory, why) for each record around out_dir that describes outputs under out_dir which
    must not be kept beside new ones: made with other settings, or mixed (an --overwrite run with new
    ones replaced only some), so that a rerun would silently mix two kinds of embedding. A setting a
    record lacks (it predates the setting) does not conflict, except an MMS model's target_lang,
    which was then always the weights' own (None); a layer recorded by number that is the last
    (before it was spelled "last") is "last"."""
    conflicts, records = [], records_around(out_dir)
    below = [os.path.realpath(d) + os.sep for d, _ in records if inside(d, out_dir)]
    for directory, previous in records:
        if previous == MIXED:
            why = "may hold embeddings of more than one setting (an --overwrite run with new ones did not replace them all)"
        else:
            if previous.get("layer") == str(last_layer):
                previous = {**previous, "layer": "last"}
            if "target_lang" in settings:  # an MMS record from before --target-lang: the weights' own adapters
                previous = {"target_lang": None, **previous}
            differs = [f"{key} {previous[key]!r} (now {value!r})" for key, value in settings.items()
                       if key in previous and previous[key] != value]
            if not differs:
                continue
            why = f"holds embeddings made with {', '.join(differs)}"
        if inside(directory, out_dir):  # an earlier --out inside this one
            described = outputs_in(directory)
        else:  # the record at or above out_dir: the outputs under out_dir that no record below describes
            described = {path for path in outputs_in(out_dir)
                         if not any(os.path.realpath(path).startswith(inner) for inner in below)}
        if described:
            conflicts.append((directory, why))
    return conflicts


def remove_records_below(out_dir: str) -> None:
    """The records of directories inside out_dir, once out_dir's own record speaks for all of them."""
    for root in list(_directories_below_with_records(out_dir)):
        os.remove(os.path.join(root, SETTINGS_FILE))


def record_settings(out_dir: str, settings: dict) -> None:
    import json

    os.makedirs(out_dir, exist_ok=True)
    atomic_write_bytes(os.path.join(out_dir, SETTINGS_FILE), json.dumps(settings).encode())


STALE_TMP_S = 3600  # a temporary lives for one write; older ones belong to a killed run


def remove_stale_temporaries(out_dir: str) -> None:
    """Temporaries left by a killed run (ours only: they carry TMP_PREFIX; not a running job's)."""
    import time

    for root, _, files in os.walk(out_dir):
        for name in files:
            path = os.path.join(root, name)
            try:
                if name.startswith(TMP_PREFIX) and time.time() - os.path.getmtime(path) > STALE_TMP_S:
                    os.remove(path)
            except OSError:  # gone meanwhile: its job finished it
                pass


def write_output(out, row: int, target: str, pool: str, all_layers: bool, replace: bool = True) -> None:
    """Writes one item's output atomically; with ``replace=False`` a file (or link) that is at
    ``target`` by then is kept: PathTaken."""
    import numpy as np

    from audioenc.encoder import pool_frames

    lengths = out.lengths[row : row + 1]

    def reduce(x):
        x = x[row : row + 1].float()
        return (pool_frames(x, lengths, pool)[0] if pool != "none" else x[0, : int(lengths[0])]).cpu().numpy()

    if all_layers:
        from safetensors.numpy import save_file

        tensors = {f"hidden_states.{i}": np.ascontiguousarray(reduce(h)) for i, h in enumerate(out.hidden_states)}
        tensors["last_hidden_state"] = np.ascontiguousarray(reduce(out.last_hidden_state))
        atomic_write(target, lambda tmp: save_file(tensors, tmp), replace=replace)
    else:
        array = reduce(out.last_hidden_state)
        atomic_write(target, lambda tmp: np.save(tmp, array), replace=replace)


def duration_s(path: str) -> float:
    """Duration from the header (soundfile, else PyAV); inf when unknown, so the file runs alone
    and a long one never joins a batch (the error report deals with unreadable ones)."""
    import soundfile as sf

    if not os.path.isfile(path):  # a broken link or a pipe: decoding reports it, unopened
        return math.inf
    try:
        # a chained Ogg: its header gives the first link's length only (its pages are checked as it is decoded)
        if len(ogg_links(path, verify=False) or ()) > 1:
            return math.inf
        return sf.info(path).duration
    except Exception:  # not a format soundfile reads
        pass
    try:
        import av

        with av.open(path) as container:
            if container.duration is not None:
                return container.duration / av.time_base
    except Exception:  # PyAV missing, or no header it can read
        pass
    return math.inf


def length_batches(jobs: list[tuple[str, str]], batch_size: int, max_audio_s: float):
    """Jobs sorted by duration and grouped so padding wastes little and a batch stays bounded."""
    timed = sorted((duration_s(path), (path, target)) for path, target in jobs)
    batch, longest = [], 0.0
    for d, job in timed:
        if batch and (len(batch) == batch_size or max(longest, d) * (len(batch) + 1) > max_audio_s):
            yield batch
            batch, longest = [], 0.0
        batch.append(job)
        longest = max(longest, d)
    if batch:
        yield batch


def failure(path: str, exc: Exception) -> str:
    """``path: why``; the file's name replaces the name encode gave its samples (audio[0])."""
    message = re.sub(r"^audio(\[\d+\])?: ", "", str(exc))
    return message if message.startswith(path) else f"{path}: {message}"


def decode(path: str):
    """A file's samples at 16 kHz, or the ValueError/TypeError that says why it cannot be read."""
    from audioenc.audio import to_waveforms

    try:
        return to_waveforms(path)[0]
    except (ValueError, TypeError) as exc:
        return exc


def decoded_batches(batches, workers: int):
    """(path, target, samples or error) per file, batch by batch: files are decoded on ``workers``
    threads, the next batch while the caller encodes this one (decoders release the GIL), or in the
    caller's thread with ``workers=0``."""
    from concurrent.futures import ThreadPoolExecutor

    if workers == 0:
        for batch in batches:
            yield [(path, target, decode(path)) for path, target in batch]
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="audioenc-decode")
    submit = lambda batch: [(path, target, pool.submit(decode, path)) for path, target in batch]
    try:
        ahead = None
        for batch in batches:
            current, ahead = ahead, submit(batch)
            if current is not None:
                yield [(path, target, future.result()) for path, target, future in current]
        if ahead is not None:
            yield [(path, target, future.result()) for path, target, future in ahead]
    finally:  # Ctrl-C or an error: drop the files not yet decoded
        pool.shutdown(wait=True, cancel_futures=True)


def embed_batch(enc, batch, args, failed: list[str], written: set[str]) -> float:
    """Encodes and writes one decoded batch; bad files go to ``failed``, the outputs written to
    ``written``. Returns the seconds of audio written."""
    decoded = []
    for path, target, wave in batch:
        if isinstance(wave, Exception):
            failed.append(failure(path, wave))
        else:
            decoded.append((path, target, wave))
    all_layers = args.layer == "all"
    layer = None if all_layers or args.layer is None else int(args.layer)
    groups, samples = [decoded], 0
    while groups:
        group = groups.pop()
        if not group:
            continue
        try:
            # The encoder's warnings name an item by its place in this group, which tells the user nothing
            with warnings.catch_warnings(record=True) as caught:
                # A bar per long file (past enc.long_audio_threshold_s), where stderr shows the job's bar
                out = enc.encode([w for _, _, w in group], output_hidden_states=all_layers, output_layer=layer,
                                 progress=sys.stderr is not None and sys.stderr.isatty())
        except (ValueError, TypeError) as exc:
            if len(group) > 1:  # find the item that fails: encode each alone (which warns again)
                groups += [[item] for item in group]
            else:
                failed.append(failure(group[0][0], exc))
            continue
        for w in caught:  # "audio item 2" becomes the file's path
            message = re.sub(r"audio item (\d+)", lambda m: group[int(m.group(1))][0], str(w.message), count=1)
            warnings.warn(message, w.category, stacklevel=2)
        for row, (path, target, wave) in enumerate(group):
            try:
                # without --overwrite, what is at target now (it appeared while the job ran) is kept
                write_output(out, row, target, args.pool, all_layers, replace=args.overwrite)
            except PathTaken:
                failed.append(f"{path}: {target} appeared while this job ran and was kept (use --overwrite to "
                              "replace it)")
                continue
            except (FileExistsError, NotADirectoryError, IsADirectoryError) as exc:
                # this output's path is taken (a file of the user's where its folder must go); a full
                # disk or a read-only folder is the machine's, not this file's, and stops the job
                failed.append(f"{path}: cannot write {target} ({exc.strerror}: {exc.filename})")
                continue
            written.add(target)
            samples += len(wave)
    return samples / enc.sample_rate
