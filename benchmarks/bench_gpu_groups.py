"""How the GPU list policy pays: lists of mixed lengths encoded by the triton backend at several
per-call costs (AudioEncoder.gpu_call_cost_s, seconds of audio; audioenc.encoder.cheapest_groups
weighs them against the padding and the CUDA-graph buckets). The largest cost runs every list in
as few calls as its size allows: one padded batch, as audioenc did before the policy.

    python benchmarks/bench_gpu_groups.py [--models wavlm-large,wav2vec2-base,whisper-large-v3]
                                          [--repeats 10] [--budget SECONDS]

Without CUDA it prints the groups each cost would choose on a GPU, and no timings. On a GPU every
grouping's frames are checked against the torch float32 reference under DESIGN.md's half-precision
rule before its time is reported (the groups must not change the frames).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import audioenc
from audioenc.backends.triton import graph_samples
from audioenc.encoder import GPU_MAX_BATCH, GPU_SAMPLES_PER_RUN, WHISPER_WINDOWS_PER_RUN, cheapest_groups
from audioenc.verify import speech_like
from common import check_output

SAMPLE_RATE = 16000
CALL_COSTS = [0.0, 5.0, 15.0, 40.0, 1e6]  # 15: the default
LISTS = {  # seconds per item
    "17 x 10 s": [10.0] * 17,
    "5 x 10 s": [10.0] * 5,
    "30 s + 15 x 1 s": [30.0] + [1.0] * 15,
    "12 from 1 to 20 s": [float(s) for s in np.linspace(1, 20, 12)],
    "40 from 2 to 6 s": [float(s) for s in np.linspace(2, 6, 40)],
}
WHISPER_LISTS = {"one 150 s item (5 windows)": [150.0], "one 270 s item (9 windows)": [270.0],
                 "20 x 30 s": [30.0] * 20}


def planned_groups(seconds: list[float], call_cost_s: float, whisper: bool) -> str:
    """The batch sizes the encoder's GPU policy (AudioEncoder._gpu_groups) picks for this list, e.g.
    '16+1'; the lists here are whole 30 s windows for Whisper."""
    if whisper:  # every item is cut into 30 s windows, which all have one length
        lengths = [30 * SAMPLE_RATE] * sum(int(np.ceil(s / 30)) for s in seconds)
        max_batch = WHISPER_WINDOWS_PER_RUN
    else:
        lengths, max_batch = [int(s * SAMPLE_RATE) for s in seconds], GPU_MAX_BATCH
    groups = cheapest_groups(lengths, lambda b, n: graph_samples(b, n, whisper), call_cost_s * SAMPLE_RATE, max_batch,
                             GPU_SAMPLES_PER_RUN)
    return "+".join(str(len(g)) for g in groups)


def valid_frames(enc, waves) -> torch.Tensor:
    """Every item's valid frames, one item after another."""
    out = enc.encode(waves)
    return torch.cat([h[:n] for h, n in zip(out.last_hidden_state, out.lengths)]).float().cpu()


def timed_ms(enc, waves, repeats: int) -> float:
    for _ in range(2):  # captures the graphs (and autotunes new shapes)
        enc.encode(waves)
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        enc.encode(waves)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="wavlm-large,wav2vec2-base,whisper-large-v3")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budget", type=float, default=float("inf"), help="seconds: start no new model after this")
    args = parser.parse_args()
    on_gpu = torch.cuda.is_available()
    print(f"GPU: {torch.cuda.get_device_name() if on_gpu else 'none: the groups each cost picks, no timings'}\n")
    print("| model | list | call cost (s of audio) | groups | ms | vs one padded batch |")
    print("|---|---|---:|---|---:|---:|")
    started = time.perf_counter()
    for name in args.models.split(","):
        if time.perf_counter() - started > args.budget:
            print(f"budget of {args.budget:g} s spent: {name} and later models not run")
            break
        whisper = name.startswith("whisper")
        enc, truth_enc, naive_enc = (
            audioenc.load(f"random:{name}", backend=backend, device="cuda", dtype=dtype) if on_gpu else None
            for backend, dtype in (("triton", "float16"), ("torch", "float32"), ("torch", "float16")))
        rng = np.random.default_rng(0)
        for label, seconds in (WHISPER_LISTS if whisper else LISTS).items():
            waves = [speech_like(int(s * SAMPLE_RATE), rng) for s in seconds]
            truth = naive = None
            if enc is not None:  # one padded batch on the reference: the frames every grouping must give
                truth_enc.gpu_call_cost_s = naive_enc.gpu_call_cost_s = CALL_COSTS[-1]
                truth, naive = valid_frames(truth_enc, waves), valid_frames(naive_enc, waves)
            rows = []
            for cost in CALL_COSTS:
                ms = None
                if enc is not None:
                    enc.gpu_call_cost_s = cost
                    check_output(f"{name}, {label}, call cost {cost:g}", valid_frames(enc, waves), truth, naive)
                    ms = timed_ms(enc, waves, args.repeats)
                rows.append((cost, planned_groups(seconds, cost, whisper), ms))
            one_batch = rows[-1][2]
            for cost, groups, ms in rows:
                timing = "" if ms is None else f"{ms:.2f} | {one_batch / ms:.2f}x"
                shown = "as few calls as fit" if cost == CALL_COSTS[-1] else f"{cost:g}"
                print(f"| {name} | {label} | {shown} | {groups} | {timing or ' | '} |", flush=True)
        del enc, truth_enc, naive_enc
        if on_gpu:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
