"""``audioenc bench``: how fast a model runs here, end to end (audio in, frames out), on one or more
backends timed side by side, and peers on the same weights: Hugging Face transformers (``--against
transformers``) and, for Whisper, CTranslate2, faster-whisper's engine (``--against ctranslate2``),
and openai-whisper (``--against openai-whisper``). torch.compile is in benchmarks/."""
from __future__ import annotations

import statistics
import sys
import time

from audioenc.cli import DEFAULT_ARCHITECTURE, TARGET_LANG_HELP, as_flags

DEFAULT_MODEL = f"random:{DEFAULT_ARCHITECTURE}"


def timed_rounds(calls: dict, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Seconds per call of each callable, timed in rounds (one call of each per round), so a machine
    whose speed drifts during the run slows every contender alike."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            call()  # untimed: the previous contender's thread pool stops spinning meanwhile
            start = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - start)
    return times


def transformers_peer(reference, device, dtype: str):
    """(label, call) of transformers with its own feature extractor and default attention."""
    import torch

    from audioenc.peer_transformers import transformers_call

    dtype = torch_dtype_name(device, dtype, "transformers")
    try:
        import transformers
    except ImportError:
        raise ValueError("transformers is not installed (pip install transformers)") from None
    call = transformers_call(reference.backend.model, reference.do_normalize, device, getattr(torch, dtype))
    return f"transformers {transformers.__version__} {dtype} {device}", call


def ctranslate2_peer(reference, device, dtype: str):
    """(label, call) of CTranslate2 at a compute type (default: faster-whisper's)."""
    from audioenc.peer_ctranslate2 import ctranslate2_call, default_compute_type

    compute_type = default_compute_type(device) if dtype == "auto" else dtype
    call = ctranslate2_call(reference.backend.model, device, compute_type)  # says so if not installed
    import ctranslate2

    return f"ctranslate2 {ctranslate2.__version__} {compute_type} {device}", call


def openai_whisper_peer(reference, device, dtype: str):
    """(label, call) of openai-whisper's frontend and encoder."""
    import torch

    from audioenc.peer_openai_whisper import openai_whisper_call

    dtype = torch_dtype_name(device, dtype, "openai-whisper")
    call = openai_whisper_call(reference.backend.model, device, getattr(torch, dtype))  # says so if not installed
    from importlib.metadata import version

    return f"openai-whisper {version('openai-whisper')} {dtype} {device}", call


def torch_dtype_name(device, dtype: str, peer: str) -> str:
    """A torch peer's dtype: auto is float16 on a GPU, float32 on a CPU."""
    if dtype == "auto":
        return "float16" if device.type == "cuda" else "float32"
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype {dtype!r}: {peer} runs float32, float16 or bfloat16")
    return dtype


PEERS = {"transformers": transformers_peer, "ctranslate2": ctranslate2_peer, "openai-whisper": openai_whisper_peer}


def peer_contender(args, peer: str, dtype: str, audio: list):
    """(label, call) of a peer library on the same weights and device."""
    import audioenc
    from audioenc.loading import resolve_device

    reference = audioenc.load(args.model, backend="torch", device="cpu", dtype="float32", target_lang=args.target_lang)
    if reference.family == "whisper" and args.seconds > 30:
        raise ValueError(f"{peer} encodes the first 30 s window of each item (audioenc encodes them all): "
                         "time Whisper against it with --seconds 30 or less")
    label, call = PEERS[peer](reference, resolve_device(args.device), dtype)
    return label, lambda: call(audio)


def audioenc_contender(args, backend: str, dtype: str, audio: list):
    """(label, call) of an audioenc backend; its first call exports graphs, builds engines or autotunes."""
    import audioenc

    enc = audioenc.load(args.model, backend=backend, device=args.device, dtype=dtype, target_lang=args.target_lang)
    label = f"{enc.backend.name} {str(enc.backend.dtype).removeprefix('torch.')} {enc.backend.device}"
    return label, lambda: enc.encode(audio, output_layer=args.layer).last_hidden_state


def relative_error(out, first, frames: int) -> float:
    """||out - first|| / ||first|| over the first ``frames`` frames of every item, in float64."""
    out, first = out[:, :frames].double().cpu(), first[:, :frames].double().cpu()
    return float((out - first).norm() / first.norm())


def cmd_bench(args) -> int:
    import numpy as np
    import torch

    from audioenc.backends import BACKENDS
    from audioenc.backends.onnx import onnx_threads
    from audioenc.cpu import cores_text, cpu_name, vector_isa
    from audioenc.verify import speech_like

    if not 0 < args.seconds <= 3600 or args.batch < 1 or args.repeats < 1 or args.warmup < 0:
        print("error: --seconds must be > 0 and at most 3600, --batch and --repeats >= 1, --warmup >= 0", file=sys.stderr)
        return 2
    if args.seconds * args.batch > 3600:  # generated up front, and encoded in one call per round
        print("error: --batch x --seconds is at most 3600 s of audio", file=sys.stderr)
        return 2
    # BACKEND[:DTYPE] each; --dtype is the first one's
    contenders = [(args.backend, args.dtype)] + [tuple(spec.split(":", 1)) if ":" in spec else (spec, "auto")
                                                 for spec in args.against]
    for backend, _ in contenders:  # before any model loads: a typo should not cost an export
        if backend not in ("auto", *BACKENDS, *PEERS):
            print(f"error: {backend!r} is neither an audioenc backend (auto, {', '.join(BACKENDS)}) nor a peer "
                  f"({', '.join(PEERS)})", file=sys.stderr)
            return 2
        if backend in PEERS and args.layer is not None:
            print(f"error: {backend} runs every layer: time it without --layer", file=sys.stderr)
            return 2
    rng = np.random.default_rng(0)
    audio = [speech_like(int(args.seconds * 16000), rng) for _ in range(args.batch)]
    calls, outputs = {}, {}
    loaded, current = [], ""
    try:  # every contender loads (and says what it cannot do) before any first call exports a graph
        for backend, dtype in contenders:
            current, start = f"{backend} ({dtype})", time.perf_counter()
            contender = peer_contender if backend in PEERS else audioenc_contender
            loaded.append((current, *contender(args, backend, dtype, audio)))
            print(f"{loaded[-1][1]}: loaded in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        for current, label, call in loaded:
            if label in calls:
                continue  # the same backend, dtype and device twice
            start = time.perf_counter()
            output = call()
            if output.is_cuda:  # wait for the GPU the output is on, not the current one
                call = lambda call=call, device=output.device: (call(), torch.cuda.synchronize(device))
            calls[label], outputs[label] = call, output
            print(f"{label}: first call in {time.perf_counter() - start:.1f} s", file=sys.stderr)
    except (ValueError, TypeError, OSError, RuntimeError) as exc:
        print(f"error: {current}: {as_flags(str(exc), {'output_layer': '--layer'})}", file=sys.stderr)
        return 2
    times = timed_rounds(calls, args.repeats, args.warmup)
    audio_s = args.seconds * args.batch
    base = statistics.median(next(iter(times.values())))
    first = next(iter(outputs.values()))
    # Every item has the same length, so all its frames are valid; transformers' Whisper also returns
    # the frames of the padding up to 30 s, which audioenc drops.
    frames = min(output.shape[1] for output in outputs.values())
    # onnxruntime's and CTranslate2's threads follow torch's unless $AUDIOENC_ONNX_THREADS sets them apart
    threads = f"torch threads {torch.get_num_threads()}"
    if any(label.startswith(("onnx ", "ctranslate2 ")) for label in calls):
        threads += f", onnxruntime and CTranslate2 intra-op threads {onnx_threads()}"
    print(f"model {args.model}; batch {args.batch} x {args.seconds:g} s; output layer "
          f"{'last' if args.layer is None else args.layer}; median of {args.repeats} rounds, {threads}")
    on_gpu = next((output.device for output in outputs.values() if output.is_cuda), None)
    gpu = f"; GPU {torch.cuda.get_device_name(on_gpu)}" if on_gpu is not None else ""
    print(f"machine: CPU {cpu_name()} ({vector_isa()}), {cores_text()}{gpu}")
    print(f"{'backend':34s} {'median ms':>10s} {'p90 ms':>9s} {'ms/item':>9s} {'RTF':>8s} {'x real time':>12s} "
          f"{'speed vs 1st':>13s} {'rel. err vs 1st':>16s}")
    for label, t in times.items():
        median = statistics.median(t)
        p90 = float(np.percentile(t, 90))
        print(f"{label:34s} {median * 1e3:10.1f} {p90 * 1e3:9.1f} {median * 1e3 / args.batch:9.1f} "
              f"{median / audio_s:8.4f} {audio_s / median:12.1f} {base / median:12.2f}x "
              f"{relative_error(outputs[label], first, frames):16.1e}")
    return 0


def register(subparsers) -> None:
    bench = subparsers.add_parser("bench", help="time a model end to end here, on one or more backends side by side")
    bench.add_argument("--model", default=DEFAULT_MODEL,
                       help=f"checkpoint dir, .pt file, CTranslate2 dir, hub id or random:NAME (default: {DEFAULT_MODEL})")
    bench.add_argument("--target-lang", help=TARGET_LANG_HELP)
    bench.add_argument("--backend", default="auto", help="the backend timed first (ratios are against it; default auto)")
    bench.add_argument("--dtype", default="auto", help="the first backend's dtype (default auto)")
    bench.add_argument("--against", nargs="*", default=[],
                       help="more BACKEND[:DTYPE] timed in the same rounds, e.g. torch onnx:float32; "
                            "'transformers' is Hugging Face transformers on the same weights, 'ctranslate2' "
                            "(Whisper) CTranslate2 at the compute type given (default: faster-whisper's, "
                            "float32 on a CPU, float16 on a GPU), e.g. ctranslate2:int8; 'openai-whisper' "
                            "(Whisper) its own log-mel and encoder")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    bench.add_argument("--seconds", type=float, default=10.0, help="audio per item, s, generated speech-like audio (default 10)")
    bench.add_argument("--batch", type=int, default=1, help="items per call (default 1)")
    bench.add_argument("--layer", type=int, default=None, help="stop after this layer (default: all)")
    bench.add_argument("--repeats", type=int, default=10, help="timed rounds; the median is reported (default 10)")
    bench.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    bench.set_defaults(func=cmd_bench)
