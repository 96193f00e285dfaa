"""Where the triton backend's GPU time goes, kernel by kernel (torch.profiler), per case.

    python benchmarks/profile_gpu.py [--cases whisper-large-v3:16,wav2vec2-large:16] [--top 15] [--graphs]
    python benchmarks/profile_gpu.py --tiny        # anywhere; automatic without CUDA

The forward runs eagerly after a warm-up call that autotunes and makes the timed path choices, or with
--graphs as users run it: one replay of its CUDA graph (input padded to the backend's length bucket).
The two should hold the same kernels, but in stop 26 they did not seem to: wav2vec2-large's eager
positional conv took 3.5 ms in cuDNN's per-group kernels, more than the graphed forward's measured
time leaves for it. Prints, per case, the
kernels grouped by name with calls, total ms and share of the forward's GPU time: the measured
version of the estimate in BENCHMARKS.md. Without CUDA a tiny case runs in Triton's interpreter and
the table holds CPU operator times, which only show that the script works.
"""
from __future__ import annotations

import argparse
import copy
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench_gpu import REAL_CASES, SAMPLE_RATE, TINY, TINY_CASES, build  # sets TRITON_INTERPRET without CUDA
from audioenc.backends.triton import TritonBackend, kept_paths


def kernel_times(fn, on_gpu: bool) -> dict[str, list]:
    """{name: [calls, microseconds]} of one fn() call: GPU kernels on CUDA, CPU operators otherwise."""
    with profile(activities=[ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]) as prof:
        fn()
        if on_gpu:
            torch.cuda.synchronize()
    totals = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if on_gpu and event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        if not on_gpu and event.cpu_parent is not None:  # top-level operators only
            continue
        entry = totals[event.name]
        entry[0] += 1
        entry[1] += event.time_range.elapsed_us() if on_gpu else event.cpu_time_total
    return dict(totals)


def profile_case(name, family, config, seconds, batch, top, device, dtype, graphs):
    _, _, ref_model, dims = build(family, config)
    gen = torch.Generator().manual_seed(0)
    if family == "whisper":
        inputs, lengths = torch.randn(batch, dims.n_mels, 2 * dims.n_ctx, generator=gen), None
    else:
        inputs = torch.randn(batch, int(seconds * SAMPLE_RATE), generator=gen)
        lengths = torch.full((batch,), inputs.shape[1], dtype=torch.int64)
    backend = TritonBackend(copy.deepcopy(ref_model), torch.device(device), str(dtype).removeprefix("torch."))
    backend.use_graphs = graphs and device == "cuda"
    inputs = inputs.to(device)
    run = lambda: backend.run(inputs, lengths, dims.num_layers, output_hidden_states=False)
    run()  # autotuning, compilation, the timed path choices and the graph's capture happen here
    times = kernel_times(run, device == "cuda")
    total = sum(us for _, us in times.values())
    rows = sorted(times.items(), key=lambda item: -item[1][1])
    kept = kept_paths(backend.model)
    lines = [f"### {name}, {seconds:g} s, batch {batch}: {total / 1000:.2f} ms in "
             f"{'GPU kernels' if device == 'cuda' else 'CPU operators (interpreter)'}"
             f"{', one CUDA-graph replay' if backend.use_graphs else ', eager'}"
             + (f"; kept {kept}" if kept else ""),
             "", "| kernel | calls | ms | share |", "|---|---:|---:|---:|"]
    for kernel, (calls, us) in rows[:top]:
        lines.append(f"| {kernel[:90]} | {calls} | {us / 1000:.3f} | {us / total:.1%} |")
    rest = sum(us for _, (_, us) in rows[top:])
    if rest:
        lines.append(f"| {len(rows) - top} others | | {rest / 1000:.3f} | {rest / total:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny models (automatic without CUDA)")
    parser.add_argument("--cases", default="whisper-large-v3:16,wav2vec2-large:16",
                        help="NAME:BATCH,... from bench_gpu.py's cases")
    parser.add_argument("--top", type=int, default=15, help="kernels listed per case")
    parser.add_argument("--graphs", action="store_true", help="profile a CUDA-graph replay, not an eager forward")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    cases = TINY_CASES[:1] if TINY else [c for c in REAL_CASES if f"{c[0]}:{c[4]}" in args.cases.split(",")]
    if not cases:
        parser.error(f"no case matches {args.cases!r}; choose from "
                     f"{', '.join(f'{c[0]}:{c[4]}' for c in REAL_CASES)}")
    machine = torch.cuda.get_device_name() if device == "cuda" else "no GPU (CPU, Triton interpreter)"
    print(f"{machine}; torch {torch.__version__}\n", flush=True)
    for name, family, config, seconds, batch in cases:
        print(profile_case(name, family, config, seconds, batch, args.top, device, dtype, args.graphs) + "\n",
              flush=True)


if __name__ == "__main__":
    main()
