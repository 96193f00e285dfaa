"""Streaming and long audio, measured (writes BENCHMARKS.md section "Streaming and long audio").

    python benchmarks/bench_streaming.py context      # agreement with offline vs context length
    python benchmarks/bench_streaming.py latency      # push -> frames time, real-time factor
    python benchmarks/bench_streaming.py memory       # RSS over a 1-hour stream
    python benchmarks/bench_streaming.py long         # time and peak RSS of encode() on a 1-hour array

Each part replaces its own sub-table in benchmarks/results/streaming-<part>.md, and the section is
rebuilt from those files. Models: real-size architectures with random weights (no checkpoints can
be downloaded here), speech from espeak-ng. ``context --models ./checkpoint`` (any source audioenc.load
takes) measures a checkpoint of yours and only prints the table; ``--audio FILE`` uses your speech.
"""
from __future__ import annotations

import argparse
import os
import resource
import time

import numpy as np
import torch

import audioenc
from audioenc.audio import to_waveforms
from audioenc.frontend import pcm_to_float32
from audioenc.presets import ARCHITECTURES
from common import ROOT, machine, versions, write_section
from speech import espeak_speech

RESULTS = os.path.join(ROOT, "benchmarks", "results")
PARTS = ("context", "latency", "memory", "long")


def stream_frames(enc, wave, chunk_s, left_s, right_s, block=320, output_layer=None):
    stream = enc.stream(chunk_s=chunk_s, left_context_s=left_s, right_context_s=right_s, output_layer=output_layer)
    out, times = [], []
    for start in range(0, len(wave), block):
        t0 = time.perf_counter()
        frames = stream.push(wave[start : start + block])
        if len(frames):
            times.append(time.perf_counter() - t0)
            out.append(frames.frames)
    t0 = time.perf_counter()
    frames = stream.flush()
    times.append(time.perf_counter() - t0)
    out.append(frames.frames)
    return torch.cat(out), times


def cosines(a, b):
    n = min(len(a), len(b))
    return torch.nn.functional.cosine_similarity(a[:n].float(), b[:n].float(), dim=-1)


def is_architecture(name: str) -> bool:
    return name in ARCHITECTURES


def load_model(name: str, backend: str):
    """A random-weight architecture by its name (audioenc info lists them), or any checkpoint."""
    return audioenc.load(f"random:{name}" if is_architecture(name) else name, backend=backend, device="cpu")


def speech(args) -> np.ndarray:
    """--audio's file at 16 kHz, or espeak-ng speech."""
    if args.audio is None:
        return espeak_speech(args.seconds, seed=1)
    return pcm_to_float32(to_waveforms(args.audio)[0])[: int(args.seconds * 16000)]


def part_context(args) -> str:
    settings = [tuple(float(x) for x in pair.split("/")) for pair in args.settings]
    rows = []
    models = args.models
    for name in models:
        enc = load_model(name, "torch")
        wave = speech(args)
        offline = enc.encode(wave).last_hidden_state[0]
        for left, right in settings:
            frames, _ = stream_frames(enc, wave, 1.0, left, right, block=16000)
            cos = cosines(frames, offline)
            latency_ms = (1.0 + right) * 1000
            rows.append(f"| {name} | {left:g} | {right:g} | {cos.mean():.4f} | {cos.min():.4f} | {latency_ms:.0f} |")
            print(rows[-1], flush=True)
    return "\n".join([
        f"Final-layer agreement of streamed frames with the offline encode of the same audio ({len(wave) / 16000:g} s of "
        f"{args.audio or 'espeak-ng speech'}; Whisper offline = consecutive 30 s windows, and a Whisper stream's left context stops at "
        "the start of its 30 s window, so left 30 means 'the whole window so far'; a shorter one is silence before "
        "the window, at its place in the 30 s block), chunk 1 s. Latency = chunk + "
        "right context (audio a frame may wait for), before compute.",
        "",
        "| model | left (s) | right (s) | mean cosine | min cosine | latency (ms) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ])


def part_latency(args) -> str:
    rows = []
    for name in ("wav2vec2-base", "whisper-base"):
        enc = load_model(name, args.backend)
        wave = espeak_speech(args.seconds, seed=2)
        for chunk in (0.5, 1.0):
            left, right = (2.0, 0.5)
            stream_frames(enc, wave[:32000], chunk, left, right)  # warm-up
            start = time.perf_counter()
            _, times = stream_frames(enc, wave, chunk, left, right)
            total = time.perf_counter() - start
            ms = np.array(times) * 1000
            rows.append(f"| {name} | {chunk:g} | {left:g} / {right:g} | {np.percentile(ms, 50):.0f} | "
                        f"{np.percentile(ms, 99):.0f} | {total / (len(wave) / 16000):.3f} |")
            print(rows[-1], flush=True)
    return "\n".join([
        f"Push -> frames compute time per emission on {args.seconds:g} s of speech pushed in 20 ms blocks as fast as "
        f"possible, backend {args.backend}, float32, torch threads {torch.get_num_threads()}. RTF = compute / audio "
        "duration (below 1 keeps up with live audio).",
        "",
        "| model | chunk (s) | context left / right (s) | p50 (ms) | p99 (ms) | RTF |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ])


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def part_memory(args) -> str:
    enc = audioenc.load("random:wav2vec2-base", backend=args.backend, device="cpu")
    minute = espeak_speech(60.0, seed=3)
    stream = enc.stream(chunk_s=1.0, left_context_s=0.5, right_context_s=0.2, output_layer=1)
    samples = []
    for m in range(args.minutes):
        for start in range(0, len(minute), 16000):
            stream.push(minute[start : start + 16000])  # frames are dropped, as a live consumer would
        if m % 10 == 0 or m == args.minutes - 1:
            samples.append((m + 1, rss_mb()))
            print(f"stream minute {m + 1}: RSS {samples[-1][1]:.0f} MB", flush=True)
    stream.flush()
    return "\n".join([
        f"A {args.minutes}-minute stream through `enc.stream` (wav2vec2-base, chunk 1 s, context 0.5 / 0.2 s, "
        "output_layer=1 so the hour runs in minutes on 2 cores; the windowing and buffers are the same at any depth):",
        "",
        "| stream minute | " + " | ".join(str(m) for m, _ in samples) + " |",
        "| --- | " + " | ".join("---:" for _ in samples) + " |",
        "| RSS (MB) | " + " | ".join(f"{r:.0f}" for _, r in samples) + " |",
    ])


def part_long(args) -> str:
    enc = audioenc.load("random:wav2vec2-base", backend=args.backend, device="cpu")
    hour = np.tile(espeak_speech(60.0, seed=3), args.minutes)
    before = rss_mb()
    start = time.perf_counter()
    out = enc.encode(hour, output_layer=1)
    took = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    output_mb = out.last_hidden_state.numel() * 4 / 2**20
    return (f"Offline `encode` of {args.minutes} minutes of speech as one array (wav2vec2-base, long-audio windows "
            f"of {enc.long_audio_chunk_s:g} s with {enc.long_audio_left_s:g} / {enc.long_audio_right_s:g} s context, "
            f"output_layer=1 to keep the hour to minutes on 2 cores): {took:.0f} s, RSS before {before:.0f} MB, peak "
            f"RSS of the process {peak:.0f} MB, of which the returned frames are {output_mb:.0f} MB and the input "
            f"array {hour.nbytes / 2**20:.0f} MB.")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("part", choices=PARTS)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--minutes", type=int, default=60)
    parser.add_argument("--backend", default="torch")
    parser.add_argument("--models", nargs="+", default=["wav2vec2-base", "hubert-base", "wavlm-base-plus", "whisper-base"])
    parser.add_argument("--settings", nargs="+", default=["0.5/0.1", "1/0.25", "2/0.5", "4/0.5", "4/1", "4/4"],
                        help="context: LEFT/RIGHT seconds pairs")
    parser.add_argument("--audio", help="context: a speech file of yours instead of espeak-ng's (the first --seconds)")
    parser.add_argument("--tag", default="", help="suffix of the results file, to keep several runs of a part")
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    body = {"context": part_context, "latency": part_latency, "memory": part_memory, "long": part_long}[args.part](args)
    if args.part == "context" and not all(map(is_architecture, args.models)):  # a user's checkpoint: not our table
        print(body)
        return
    os.makedirs(RESULTS, exist_ok=True)
    with open(os.path.join(RESULTS, f"streaming-{args.part}{args.tag}.md"), "w") as f:
        f.write(f"### {args.part}{args.tag}\n\n{body}\n\nMachine: {machine()}. Versions: "
                f"{versions('audioenc', 'torch', 'numpy')}.\n")
    rebuild_section()
    print(body)


def rebuild_section() -> None:
    """BENCHMARKS.md's section from every results file, by part (a part's untagged run first)."""
    names = sorted(os.listdir(RESULTS), key=lambda n: (len(n), n))
    parts = [open(os.path.join(RESULTS, n)).read() for p in PARTS for n in names if n.startswith(f"streaming-{p}")]
    write_section("Streaming and long audio", "`python benchmarks/bench_streaming.py PART` (random weights at "
                  "real sizes; espeak-ng speech).\n\n" + "\n".join(parts))


if __name__ == "__main__":
    main()
