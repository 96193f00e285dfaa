"""CUDA log-mel frontend: audioenc's kernels vs openai-whisper's log_mel_spectrogram on CUDA
(torch.stft) for 30 s clips at batch 1 and 64, 80 bins. CUDA-event timing after warm-up, median of
several runs, fresh random input, checked against openai-whisper item by item before it is timed
(DESIGN.md's float32 rule: a mismatch stops the run). Run on a CUDA machine:

    python benchmarks/bench_frontend_gpu.py [--runs 50]

Targets: >= 10x faster than openai-whisper and >= 100,000x real time on an H100.
"""
import argparse

import numpy as np
import torch

import audioenc.frontend as fe
from common import check_output


def median_ms(fn, runs):
    for _ in range(3):
        fn()
    times = []
    for _ in range(runs):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return float(np.median(times))


def checked_diff(x, whisper) -> float:
    """Max abs difference of audioenc's batched log-mel from openai-whisper's, which takes one max over
    the batch: compared item by item (the first 4). Raises WrongOutput past DESIGN.md's rule."""
    out = fe.log_mel_spectrogram(x)
    diff = 0.0
    for b in range(min(len(x), 4)):
        ref = whisper.log_mel_spectrogram(x[b])
        check_output(f"audioenc log-mel, item {b} of a batch of {len(x)}", out[b], ref)
        diff = max(diff, (out[b] - ref).abs().max().item())
    return diff


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()
    import whisper

    assert torch.cuda.is_available(), "needs a CUDA GPU"
    assert fe._C is not None and fe._C.cuda_compiled, "audioenc was built without the CUDA kernels"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, openai-whisper {whisper.__version__}\n")
    print("| batch | openai-whisper (ms) | audioenc (ms) | speed-up | audioenc x real time | max abs diff |")
    print("|---:|---:|---:|---:|---:|---:|")
    for batch in (1, 64):
        x = 0.1 * torch.randn(batch, 480_000, device="cuda")
        diff = checked_diff(x, whisper)
        ref_ms = median_ms(lambda: whisper.log_mel_spectrogram(x), args.runs)
        ours_ms = median_ms(lambda: fe.log_mel_spectrogram(x), args.runs)
        realtime = batch * 30.0 / (ours_ms / 1e3)
        print(f"| {batch} | {ref_ms:.3f} | {ours_ms:.3f} | {ref_ms / ours_ms:.1f}x | {realtime:,.0f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
