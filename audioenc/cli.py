"""Command line: ``audioenc info|embed|stream|export|verify|bench|cache`` (also ``python -m audioenc``)."""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import re
import sys
import warnings

from audioenc import __version__
from audioenc.atomic_file import PathTaken, atomic_write
from audioenc.embed_files import (MIXED, decoded_batches, embed_batch, inside, length_batches, output_paths,
                                  outputs_in, record_settings, remove_records_below, remove_stale_temporaries,
                                  settings_conflicts)

DEFAULT_ARCHITECTURE = "wav2vec2-base"
STREAM_FLAGS = {"chunk_s": "--chunk-s", "left_context_s": "--left-context-s", "right_context_s": "--right-context-s"}
TARGET_LANG_HELP = ("MMS checkpoints (e.g. facebook/mms-1b-all): the language whose adapter file "
                    "adapter.<lang>.safetensors replaces the adapters in the weights, e.g. fra (default: the "
                    "weights' own, English for mms-1b-all)")


def as_flags(message: str, flags: dict[str, str]) -> str:
    """An error of the Python API, which checks the values the flags set, as the command line says it:
    each argument name in ``flags`` becomes the flag the user typed."""
    return re.sub(r"\b(" + "|".join(flags) + r")\b", lambda m: flags[m[0]], message)


def cmd_info(args) -> int:
    import platform

    import torch

    import audioenc
    from audioenc import _native
    from audioenc.backends import BACKENDS, availability
    from audioenc.cache import cache_root, cache_root_problem, list_entries
    from audioenc.cpu import cores_text, cpu_name, vector_isa
    from audioenc.presets import ARCHITECTURES

    print(f"audioenc {audioenc.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    if _native._C is None:
        print(f"native core: {_native.import_error}; using the Python paths")
    else:
        print(f"native core: built (audioenc._C), CUDA kernels compiled: {'yes' if _native._C.cuda_compiled else 'no'}")
    print(f"CPU: {cpu_name()}, {cores_text()}, {vector_isa()}")
    cuda = torch.cuda.is_available()
    print(f"CUDA GPU: {torch.cuda.get_device_name(0) if cuda else 'none'}")
    for name in BACKENDS:
        reason = availability(name)
        print(f"backend {name:9s} {'available' if reason is None else reason}")
    print("families: wav2vec2, hubert, wavlm, whisper")
    print("random-weight architectures (random:NAME): " + ", ".join(ARCHITECTURES))
    entries, problem = list_entries(), cache_root_problem()
    print(f"cache: {problem}" if problem else
          f"cache: {cache_root()}, {len(entries)} entries, {sum(e.size for e in entries) / 2**30:.2f} GiB "
          "(audioenc cache lists them)")
    return 0


def cmd_cache(args) -> int:
    import time

    from audioenc.cache import cache_root, cache_root_problem, list_entries, remove, removable, remove_weights_records

    if args.unused_days is not None and (not args.clear or not args.unused_days >= 0):  # NaN fails too
        print("error: --unused-days takes a number of days >= 0, and goes with --clear", file=sys.stderr)
        return 2
    problem = cache_root_problem()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    entries = list_entries()
    gib = lambda size: f"{size / 2**30:.2f} GiB"
    if not args.clear:
        now = time.time()
        for e in entries:
            age = now - e.last_used
            ago = f"{age / 86400:.1f} days" if age >= 86400 else f"{age / 3600:.1f} hours"
            print(f"{gib(e.size):>10}  used {ago:>10} ago  {e.kind:8s} {os.path.basename(e.path)}  {e.what}")
        print(f"{len(entries)} entries, {gib(sum(e.size for e in entries))} in {cache_root()}"
              + ("; remove them with --clear (--unused-days N keeps recent ones)" if entries else ""))
        return 0
    doomed = removable(entries, args.unused_days)
    freed, failed, building = remove(doomed)
    remove_weights_records(args.unused_days)
    print(f"removed {len(doomed) - len(failed) - len(building)} of {len(entries)} entries, {gib(freed)} freed "
          f"from {cache_root()}")
    kept = [e for e in entries if e not in doomed]
    if kept or building:
        running = len(removable(kept, args.unused_days, unfinished_too=True))  # kept only as they may be running
        print(f"kept {len(kept) + len(building)}: " + ", ".join(filter(None, (
            f"{len(kept) - running} used within --unused-days" if len(kept) > running else "",
            f"{running} unfinished export(s) under 6 hours old (one may be running now)" if running else "",
            f"{len(building)} being exported or built by another process now" if building else ""))))
    for line in failed:
        print(f"error: could not remove {line}", file=sys.stderr)
    return 1 if failed else 0


def load_from_args(args):
    """The encoder that --model, --backend, --device and --dtype name (no --model: random weights)."""
    import audioenc

    # only a missing --model means random weights: an empty one (an unset shell variable) is an error
    model = f"random:{DEFAULT_ARCHITECTURE}" if args.model is None else args.model
    preprocessor = None if args.do_normalize is None else {"do_normalize": args.do_normalize == "true"}
    enc = audioenc.load(model, backend=args.backend, device=args.device, dtype=args.dtype, preprocessor=preprocessor,
                        target_lang=args.target_lang)
    if enc.family == "whisper" and preprocessor is not None:
        raise ValueError("--do-normalize is for the wav2vec2 family: Whisper's log-mel has no such setting")
    return enc


def add_model_arguments(parser, model_help: str) -> None:
    """--model and the settings that go with it, as embed and stream take them."""
    parser.add_argument("--model", help=model_help)
    parser.add_argument("--do-normalize", choices=["true", "false"], default=None,
                        help="wav2vec2 family: whether the waveform is normalised, replacing the checkpoint's "
                             "preprocessor_config.json (default: the checkpoint's; without one, true, with a warning)")
    parser.add_argument("--target-lang", help=TARGET_LANG_HELP)


def print_load_notes(enc, args, file=None) -> None:
    """What a user should know about the model the command loaded: random weights, a slower backend."""
    from audioenc.backends import auto_note

    if enc.random_weights:
        print(f"NOTE: {'no --model given, so ' if args.model is None else ''}using the {enc.source[len('random:'):]} "
              "architecture with RANDOM weights: the embeddings show the pipeline works but mean nothing. "
              "Pass --model with a checkpoint dir, .pt file or hub id for real embeddings.", file=file)
    note = auto_note(enc.backend.name, enc.backend.device.type) if args.backend == "auto" else None
    if note:
        print(f"NOTE: {note}", file=file)


def cmd_embed(args) -> int:
    from tqdm import tqdm

    from audioenc.cpu import usable_cores

    usage = None
    if args.layer not in (None, "all") and not args.layer.isdecimal():
        usage = f"--layer must be a layer number (0 or more) or 'all', got {args.layer!r}"
    elif not args.batch_size >= 1 or not args.max_batch_seconds > 0:  # NaN fails too
        usage = "--batch-size must be at least 1 and --max-batch-seconds above 0"
    elif not args.out:
        usage = "--out must name a directory, got ''"
    elif os.path.exists(args.out) and not os.path.isdir(args.out):
        usage = f"--out {args.out} is a file; it must be a directory"
    elif os.path.isdir(args.out) and not os.access(args.out, os.W_OK | os.X_OK):
        usage = f"--out {args.out} is not a directory this user may write to"
    if usage:
        print(f"error: {usage}", file=sys.stderr)
        return 2
    try:
        # the inputs before the model: a mistyped path must not wait for a load (or a hub download)
        unlisted: dict[str, str] = {}  # folders whose files could not be found (permissions)
        jobs = output_paths(args.inputs, args.out, ".safetensors" if args.layer == "all" else ".npy", unlisted)
        for line in unlisted.values():
            print(f"failed: {line}", file=sys.stderr)
        if not jobs:
            raise ValueError("no audio files found in the given inputs")
        enc = load_from_args(args)
        if args.layer not in (None, "all") and int(args.layer) > enc.num_layers:  # here, not once per file
            raise ValueError(f"--layer must be between 0 and {enc.num_layers} for this model, got {args.layer}")
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_load_notes(enc, args)
    print(enc)
    if os.path.isdir(args.out):
        remove_stale_temporaries(args.out)
    # Spelled one way per setting: a checkpoint by its real path, a layer by its number ("last" for
    # the last, which gives the same frames), the precision as it resolved.
    model = os.path.realpath(enc.source) if os.path.exists(enc.source) else enc.source
    layer = args.layer if args.layer == "all" else "last" if args.layer is None or int(args.layer) == enc.num_layers \
        else str(int(args.layer))
    settings = {"model": model, "pool": args.pool, "layer": layer,
                "dtype": str(enc.backend.dtype).removeprefix("torch.")}
    if enc.family != "whisper":
        settings["do_normalize"] = enc.do_normalize
    if getattr(enc.dims, "adapter_attn_dim", None) is not None:  # MMS: each language gives other embeddings
        settings["target_lang"] = enc.target_lang
    conflicts = settings_conflicts(args.out, settings, enc.num_layers)
    if conflicts and not args.overwrite:
        print("error: " + "; ".join(f"{d} {why}" for d, why in conflicts) + ": use another --out, or --overwrite "
              "to replace them", file=sys.stderr)
        return 2
    try:  # replacing outputs of other settings: mixed until every one is replaced (checked at the end)
        for directory, _ in conflicts:  # an earlier --out inside this one, whose outputs this run replaces
            if inside(directory, args.out):
                record_settings(directory, MIXED)
        record_settings(args.out, MIXED if conflicts else settings)
    except OSError as exc:
        print(f"error: --out {args.out}: {exc}", file=sys.stderr)
        return 2
    failed = [f"{p}: its output {t} is a directory" for p, t in jobs.items() if os.path.isdir(t)]
    # a link at an output's path is the user's too, even one that leads nowhere
    pending = [(p, t) for p, t in jobs.items() if not os.path.isdir(t) and (args.overwrite or not os.path.lexists(t))]
    skipped = len(jobs) - len(pending) - len(failed)
    audio_s, written = 0.0, set()
    # no bar without a stderr (started with it closed): tqdm would write to None
    with tqdm(total=len(pending), desc="embed", unit="file", file=sys.stderr, disable=sys.stderr is None) as bar:
        # Beside a CPU backend a decoder thread gains nothing (it shares the cores the backend uses:
        # 48 FLAC files, 2 cores, 11.2-11.5 s with one against 11.3-12.0 s inline), so decode inline.
        workers = 0 if enc.backend.device.type == "cpu" else min(4, usable_cores())
        for batch in decoded_batches(length_batches(pending, args.batch_size, args.max_batch_seconds), workers):
            audio_s += embed_batch(enc, batch, args, failed, written)
            elapsed = bar.format_dict["elapsed"] or 1e-9
            bar.set_postfix(audio=f"{audio_s / elapsed:.1f}s/s", refresh=False)  # shown by the update below
            bar.update(len(batch))
    if conflicts and outputs_in(args.out) <= written:  # every output there is this run's
        try:
            record_settings(args.out, settings)
            remove_records_below(args.out)
        except OSError as exc:  # the outputs are written; the directory stays marked mixed
            print(f"warning: --out {args.out}: could not record its settings ({exc})", file=sys.stderr)
    print(f"wrote {len(jobs) - skipped - len(failed)} file(s) to {args.out} ({audio_s:.1f} s of audio)")
    if skipped:
        print(f"skipped {skipped} existing output(s) (use --overwrite to replace them)")
    for line in failed:
        print(f"failed: {line}", file=sys.stderr)
    if failed:
        print(f"{len(failed)} of {len(jobs)} file(s) failed; their outputs were not written", file=sys.stderr)
    if unlisted:
        print(f"{len(unlisted)} folder(s) could not be listed: their files were not embedded", file=sys.stderr)
    return 1 if failed or unlisted else 0


PCM_FORMATS = {"s16le": "<i2", "s32le": "<i4", "f32le": "<f4"}
MAX_BLOCK_MS = 10_000.0  # one read of stdin


class AudioFileOnStdin(ValueError):
    """stdin carries an audio file (`audioenc stream < talk.wav`): read as raw PCM, its header would be
    samples and a file of another rate, format or channel count garbage frames, with no error."""


def audio_file_kind(head: bytes) -> str | None:
    """The kind of audio file that starts with ``head`` (stdin's first 12 bytes), or None."""
    if head[:4] in (b"RIFF", b"RF64") and head[8:12] == b"WAVE":
        return "WAV"
    if head[:4] == b"FORM" and head[8:12] in (b"AIFF", b"AIFC"):
        return "AIFF"
    kinds = {b"fLaC": "FLAC", b"OggS": "Ogg", b"ID3": "MP3", b".snd": "AU"}
    return next((kind for magic, kind in kinds.items() if head.startswith(magic)), None)


def stream_usage_error(args) -> str | None:
    """What is wrong with cmd_stream's arguments, before any model loads."""
    if args.file is None and args.realtime:
        return "--realtime paces a --file; stdin arrives at its own pace"
    if args.file is None and sys.stdin is None:  # started with stdin closed (`<&-`): Python has no sys.stdin
        return "stdin is closed; pipe raw PCM to it or give --file"
    if args.file is not None and (args.rate is not None or args.format is not None or args.channels is not None):
        return "--rate, --format and --channels describe stdin; a --file carries its own"
    from audioenc.audio import MAX_CHANNELS

    if args.channels is not None and not 1 <= args.channels <= MAX_CHANNELS:  # as the stream API takes them
        return f"--channels must be between 1 and {MAX_CHANNELS}, got {args.channels}"
    if args.out == "":
        return "--out must name a .npy file, got ''"
    if args.overwrite and not args.out:
        return "--overwrite replaces an --out file; there is none"
    if not 0 < args.block_ms <= MAX_BLOCK_MS:  # NaN fails too
        return f"--block-ms must be above 0 and at most {MAX_BLOCK_MS:g}, got {args.block_ms}"
    if args.out:
        if os.path.isdir(args.out):
            return f"--out {args.out} is a directory; it must be a .npy file"
        if args.out == "-":
            return "--out - would name a file '-': stdout carries the emission lines; give a .npy file name"
        if os.path.lexists(args.out) and not args.overwrite:  # a link to nothing is taken too
            return f"{args.out} exists (use --overwrite)"
        parent = os.path.dirname(os.path.abspath(args.out))
        while not os.path.isdir(parent):  # atomic_write creates the missing directories
            if os.path.lexists(parent):
                return f"--out {args.out}: {parent} is not a directory"
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK):
            return f"--out {args.out}: {parent} is not writable"
    return None


def save_frames(path: str, array, overwrite: bool) -> str:
    """Saves a stream's frames as .npy at ``path``; where a file appeared there during the stream (an
    hour, maybe) and ``overwrite`` is off, or a folder did, at path-1, path-2, ... instead. Returns where."""
    import numpy as np

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would add ".npy" to a name without it
            np.save(f, array)

    stem, suffix = os.path.splitext(path)
    for taken in itertools.count():
        target = path if taken == 0 else f"{stem}-{taken}{suffix}"
        try:
            atomic_write(target, save, replace=overwrite and taken == 0)  # --overwrite names path alone
            return target
        except (PathTaken, IsADirectoryError):  # a folder made there is taken even with overwrite
            continue


def cmd_stream(args) -> int:
    """Raw PCM from stdin (or a file played at real-time pace) -> frames as they become final.
    Ctrl-C ends the stream like the end of input: the frames so far are flushed and saved."""
    import time

    import numpy as np

    from audioenc.audio import load_audio

    usage = stream_usage_error(args)  # before the stream, not after it
    if usage:
        print(f"error: {usage}", file=sys.stderr)
        return 2
    try:
        if args.file:  # before the model: a mistyped path must not wait for a load (or a hub download)
            audio, rate = load_audio(args.file)
        else:
            rate = 16000 if args.rate is None else args.rate
        enc = load_from_args(args)
        if args.layer is not None and not 0 <= args.layer <= enc.num_layers:  # the flag's name, not the API's
            raise ValueError(f"--layer must be between 0 and {enc.num_layers} for this model, got {args.layer}")
        try:
            stream = enc.stream(sample_rate=rate, chunk_s=args.chunk_s, left_context_s=args.left_context_s,
                                right_context_s=args.right_context_s, output_layer=args.layer)
        except (ValueError, TypeError) as exc:
            rate_is = f"{args.file}'s sample rate" if args.file else "--rate"
            raise ValueError(as_flags(str(exc), {**STREAM_FLAGS, "sample_rate": rate_is})) from None
    except (ValueError, TypeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print_load_notes(enc, args, file=sys.stderr)
    print(f"{enc}; chunk {stream.chunk / 16000:g} s, left {stream.left / 16000:g} s, right {stream.right / 16000:g} s, "
          f"frames wait at most {stream.latency_s * 1000:.0f} ms of audio"
          + ("" if rate == 16000 else f", plus the resampler's delay from {rate} Hz"), file=sys.stderr)
    block = max(1, int(rate * args.block_ms / 1000))
    dtype = np.dtype(PCM_FORMATS[args.format or "s16le"])
    channels = args.channels or 1

    def blocks():  # lazily: a live source's blocks are encoded as they arrive
        if args.file:
            started = time.perf_counter()
            for start in range(0, len(audio), block):
                if args.realtime:  # pace the file like a live source
                    time.sleep(max(0.0, started + start / rate - time.perf_counter()))
                yield audio[start : start + block]
            return
        # read1: what has arrived, up to a block, so a Ctrl-C while a block fills loses none of it
        frame_bytes = dtype.itemsize * channels  # one sample of every channel, interleaved
        head = b""  # the input's first samples, looked at for an audio file's header
        while len(head) < 12 and (data := sys.stdin.buffer.read1(12 - len(head))):
            head += data
        kind = audio_file_kind(head)
        if kind:
            raise AudioFileOnStdin(f"stdin starts with a {kind} file's header, but audioenc stream reads raw PCM "
                                   "there: give the file with --file, or send raw samples (arecord -t raw, "
                                   "sox ... -t raw -, ffmpeg ... -f s16le -)")
        size, carry = block * frame_bytes, b""
        while data := head or sys.stdin.buffer.read1(size):
            head, data = b"", carry + data
            whole = len(data) - len(data) % frame_bytes
            carry = data[whole:]  # a sample (or a frame of channels) split between reads
            if whole:
                pcm = np.frombuffer(data[:whole], dtype).astype(dtype.newbyteorder("="))
                yield pcm.reshape(-1, channels) if channels > 1 else pcm  # the stream mixes channels to mono
        if carry:  # the input ended inside a sample (or a frame of channels)
            print(f"warning: stdin ended with {len(carry)} byte(s) of an incomplete {frame_bytes}-byte sample "
                  f"frame ({args.format or 's16le'}, {channels} channel(s)); they were ignored", file=sys.stderr)

    collected, compute_ms = [], []
    stdout_open = True

    def emit(step) -> None:
        nonlocal stdout_open
        t0 = time.perf_counter()
        frames = step()
        if len(frames):
            compute_ms.append((time.perf_counter() - t0) * 1000)
            collected.append(frames.frames.numpy())
            if stdout_open:
                try:
                    end = frames.times[-1] + 1 / enc.frame_rate
                    print(f"{frames.times[0]:8.2f}-{end:8.2f} s  {len(frames):4d} frames  "
                          f"compute {compute_ms[-1]:6.1f} ms  mean|x| {float(np.abs(collected[-1]).mean()):.4f}",
                          flush=True)
                except BrokenPipeError:  # e.g. `| head -1`: these frames are kept, the stream ends
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                    stdout_open = False
                    raise

    ended = None  # why the input stopped early: Ctrl-C, a closed stdout, or a block the stream refused (NaN)
    received = 0  # samples before the current block: where in the input a refused block starts
    try:
        for piece in blocks():
            emit(lambda: stream.push(piece))
            received += len(piece)
    except KeyboardInterrupt:
        ended = "interrupted"
    except BrokenPipeError:
        ended = "stdout was closed"
    except AudioFileOnStdin as exc:  # before any sample: nothing to flush or save
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # a bad block, or audio before it that overflowed the model once it had context
        ended = f"stopped at the block from sample {received} ({received / rate:.3f} s) of the input: {exc}"
    try:
        emit(stream.flush)
    except BrokenPipeError:
        ended = ended or "stdout was closed"
    except KeyboardInterrupt:  # a second Ctrl-C: save what was emitted
        ended = "interrupted"
    except ValueError as exc:  # the stream failed while flushing: flushed again, it returns what it finished
        ended = ended or f"error: {exc}"
        with contextlib.suppress(BrokenPipeError, ValueError):
            emit(stream.flush)
    if compute_ms:
        print(f"{sum(len(c) for c in collected)} frames; compute per emission p50 {np.percentile(compute_ms, 50):.1f} ms, "
              f"p99 {np.percentile(compute_ms, 99):.1f} ms", file=sys.stderr)
    if args.out:
        array = np.concatenate(collected) if collected else np.zeros((0, enc.hidden_size), np.float32)
        try:
            saved_to = save_frames(args.out, array, args.overwrite)
        except OSError as exc:  # e.g. a full disk, or a folder of the path made a file meanwhile
            print(f"error: could not save the frames to {args.out}: {exc}", file=sys.stderr)
            return 1
        if saved_to != args.out:
            print(f"warning: {args.out} appeared during the stream and was kept; the frames were saved to {saved_to}",
                  file=sys.stderr)
    if ended:
        print(f"{ended}; the frames before it were flushed{' and saved' if args.out else ''}", file=sys.stderr)
        return {"interrupted": 130, "stdout was closed": 141}.get(ended, 1)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="audioenc", description="Fast inference for pre-trained audio encoders.")
    parser.add_argument("--version", action="version", version=f"audioenc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="what is built and available here")
    info.set_defaults(func=cmd_info)
    embed = sub.add_parser("embed", help="embed audio files into .npy / .safetensors files")
    embed.add_argument("inputs", nargs="+", help="audio files or directories (searched recursively)")
    add_model_arguments(embed, "checkpoint dir, .pt file, CTranslate2 dir, hub id or random:NAME "
                               f"(default: random:{DEFAULT_ARCHITECTURE}, random weights)")
    embed.add_argument("--out", required=True, help="output directory (mirrors the input tree)")
    embed.add_argument("--pool", choices=["mean", "max", "none"], default="mean",
                       help="mean/max over frames -> (dim,), none -> (frames, dim) (default mean)")
    embed.add_argument("--layer", default=None, help="layer number (0 = input of layer 1) or 'all' "
                                                     "(all hidden states into one .safetensors per file; default: the last layer)")
    embed.add_argument("--backend", default="auto", help="auto, torch, onnx, triton or tensorrt (default auto)")
    embed.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    embed.add_argument("--dtype", default="auto", help="the backend's compute dtype, e.g. float32, float16, int8 "
                       "(default auto: float32 on the CPU, float16 on a GPU)")
    embed.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    embed.add_argument("--batch-size", type=int, default=8, help="files encoded together, sorted by length (default 8)")
    embed.add_argument("--max-batch-seconds", type=float, default=240.0,
                       help="cap on padded audio per batch, s: longest item x batch size (default 240)")
    embed.set_defaults(func=cmd_embed)
    stream = sub.add_parser("stream", help="encode live raw PCM from stdin (or a file at real-time pace)")
    add_model_arguments(stream, f"as for embed (default: random:{DEFAULT_ARCHITECTURE})")
    stream.add_argument("--file", help="read this audio file instead of stdin")
    stream.add_argument("--realtime", action="store_true", help="with --file: feed it at real-time pace")
    stream.add_argument("--rate", type=int, default=None, help="stdin sample rate (Hz; default 16000)")
    stream.add_argument("--format", choices=sorted(PCM_FORMATS), default=None,
                        help="stdin sample format (default s16le)")
    stream.add_argument("--channels", type=int, default=None,
                        help="stdin channels, interleaved; mixed to mono (default 1)")
    stream.add_argument("--block-ms", type=float, default=20.0, help="audio read per push, ms (default 20)")
    stream.add_argument("--chunk-s", type=float, default=None,
                        help="audio per window centre, s (default per family: 1; rounded to whole frames, "
                             "20 ms for most models)")
    stream.add_argument("--left-context-s", type=float, default=None,
                        help="context before each chunk, s (default: wav2vec2/HuBERT 2, WavLM 4, Whisper its 30 s window)")
    stream.add_argument("--right-context-s", type=float, default=None,
                        help="context after each chunk, s: frames wait for it (default: 1, WavLM 4, Whisper 0.1)")
    stream.add_argument("--layer", type=int, default=None, help="emit this layer's output (0 = input of layer 1; default: the last layer)")
    stream.add_argument("--out", help="also save all frames to this .npy")
    stream.add_argument("--overwrite", action="store_true", help="with --out: replace an existing file")
    stream.add_argument("--backend", default="auto", help="auto, torch, onnx, triton or tensorrt (default auto)")
    stream.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    stream.add_argument("--dtype", default="auto", help="the backend's compute dtype (default auto)")
    stream.set_defaults(func=cmd_stream)
    cache = sub.add_parser("cache", help="list the cached ONNX graphs and TensorRT engines, or remove them")
    cache.add_argument("--clear", action="store_true", help="remove entries (all, or see --unused-days); "
                                                            "they are rebuilt when needed")
    cache.add_argument("--unused-days", type=float, default=None, help="with --clear: only entries unused this long")
    cache.set_defaults(func=cmd_cache)
    from audioenc import cli_bench, cli_deploy

    cli_deploy.register(sub)  # export, verify
    cli_bench.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    import logging

    args = build_parser().parse_args(argv)
    # Library progress notes (e.g. a first-use ONNX export) go to stderr for command-line users.
    logger = logging.getLogger("audioenc")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. `audioenc info | head -1`: the reader has gone, and so do we
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:  # the machine's, not the input's: e.g. a full disk, a read-only directory
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # outputs are written atomically: a rerun resumes where this stopped
        print("interrupted", file=sys.stderr)
        return 130


def console_main() -> int:
    """The ``audioenc`` command: main() with the library's warnings as plain ``warning: ...`` lines, not
    ``file:line: UserWarning`` and a source line (main() itself leaves the warnings machinery to its
    caller, e.g. a test that records them)."""
    warnings.showwarning = lambda message, category, *rest: print(f"warning: {message}", file=sys.stderr)
    return main()


if __name__ == "__main__":
    sys.exit(console_main())
