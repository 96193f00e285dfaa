"""Compiles every Triton kernel of audioenc for GPUs that are not here, at the shapes and argument
layouts the triton backend launches, with every autotune config: a session without a GPU can catch a
compile error, or a kernel with no config that fits a GPU's shared memory, before a short GPU lease
spends time on it.

    python benchmarks/compile_offline.py [--arch 90,86] [--kernel attention]

Each launcher is called with CPU tensors of real sizes; the call is stopped where Triton would
launch, and what it would have compiled (the arguments' types, Triton's specialisation of pointers
and of integers divisible by 16, each config's constants, warps and stages) is compiled with
triton.compile for each target. Nothing runs. A config over a GPU's shared memory is reported, not
failed: the autotuner drops it there. A case fails (exit 1) where it has no config that fits a GPU
class the backend runs on (compute capability 7.0 and up), or where the configs AUDIOENC_AUTOTUNE=0
keeps (the first and the kernel's fallback; with it set, only those compile) have none. Each
combination of a kernel's flags compiles apart: the cases are those the backend launches (and the
experiments bench_gpu.py times). Every case for every GPU class takes hours on 2 CPU cores:
--kernel and --arch pick a subset.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction

# compute capability x 10 -> (GPUs, shared memory per block in bytes: the opt-in maximum). The
# triton backend runs on 7.0 and up (MIN_CAPABILITY).
GPUS = {90: ("H100/H200", 232448), 89: ("L4, RTX 40", 101376), 86: ("A10, RTX 30", 101376), 80: ("A100", 166912),
        75: ("T4", 65536), 70: ("V100", 98304)}
POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32",
                 torch.int32: "*i32", torch.int64: "*i64"}


class _Launch(Exception):
    """Raised where Triton would launch: carries the kernel, its configs and its arguments."""

    def __init__(self, fn, configs, args, kwargs):
        super().__init__()
        self.fn, self.configs, self.args, self.kwargs = fn, configs, args, kwargs


def _stop_autotuned(self, *args, **kwargs):
    raise _Launch(self.fn, list(self.configs), args, kwargs)


def _stop_plain(self, *args, grid=None, warmup=False, **kwargs):
    raise _Launch(self, [None], args, kwargs)


def launch_of(call) -> _Launch:
    """What call() would launch (its first kernel)."""
    saved = Autotuner.run, JITFunction.run
    Autotuner.run, JITFunction.run = _stop_autotuned, _stop_plain
    try:
        call()
    except _Launch as launch:
        return launch
    finally:
        Autotuner.run, JITFunction.run = saved
    raise RuntimeError("the call launched no Triton kernel")


def compile_launch(launch: _Launch, config, arch: int):
    """triton.compile of one config of a stopped launch, for sm_<arch>."""
    values = dict(zip(launch.fn.arg_names, launch.args), **launch.kwargs)
    options = {}
    if config is not None:
        values.update(config.kwargs)
        options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    for key in ("num_warps", "num_stages"):
        if key in values:
            options[key] = values.pop(key)
    signature, constants, attrs = {}, {}, {}
    for i, param in enumerate(launch.fn.params):
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constants[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):  # the GPU's allocations are 16-byte aligned
            signature[param.name], attrs[(i,)] = POINTER_TYPES[value.dtype], [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i64" if abs(value) >= 2**31 else "i32"
            if value == 1 and not param.do_not_specialize:  # Triton makes 1 a constant
                signature[param.name], constants[param.name] = "constexpr", 1
            elif value % 16 == 0 and value != 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{launch.fn.__name__}: argument {param.name} of type {type(value).__name__}")
    source = ASTSource(launch.fn, signature, constants, attrs)
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


def taps_first(weight: torch.Tensor) -> torch.Tensor:
    """A conv weight (C_out, C_in, K) in (K, C_in, C_out) memory, as the triton backend keeps them."""
    return weight.permute(2, 1, 0).contiguous().permute(2, 1, 0)


def cases():
    """(label, call) at the real sizes and argument layouts of the backend, in each compute dtype."""
    from torch import nn

    from audioenc.backends.triton import _Linear, _LinearGelu, _PositionalConv
    from audioenc.kernels.attention import attention
    from audioenc.kernels.conv_feature import conv0_group_norm_gelu, conv1d_gelu
    from audioenc.kernels.layer_norm import add_layer_norm
    from audioenc.kernels.wavlm_gate import wavlm_gate

    rand, cpu = torch.randn, torch.device("cpu")
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        name = str(dt).replace("torch.", "")
        # Attention reads q, k, v as views of the fused QKV projection's (B, T, 3, H, D) output.
        # (heads, head dim): whisper-large (20, 64), -medium and wav2vec2-large (16, 64), base models
        # (12, 64), XLS-R 1B / MMS-1B / HuBERT-xlarge (16, 80), XLS-R 2B (16, 120).
        qkv = lambda frames, heads, dim, dt=dt: rand(2, frames, 3, heads, dim, dtype=dt).unbind(2)
        yield f"attention Whisper 20x64 {name}", lambda: attention(*qkv(1500, 20, 64))  # no key mask
        for heads, dim in ((16, 64), (12, 64), (16, 80), (16, 120)):
            yield f"attention {heads}x{dim} {name}", lambda h=heads, d=dim: attention(
                *qkv(1499, h, d), torch.tensor([1499, 1000]))
        for heads in (16, 12):  # wavlm-large, wavlm-base(-plus)
            yield f"attention WavLM's bias {heads}x64 {name}", lambda h=heads: attention(
                *qkv(499, h, 64), torch.tensor([499, 300]), rand(h, 997), rand(2, h, 499))
        yield f"wavlm_gate {name}", lambda dt=dt: wavlm_gate(rand(2, 499, 1024, dtype=dt), 16, rand(2, 64), rand(2),
                                                             rand(16))
        # Conv feature layers: group-norm models (no conv bias), layer-norm models (bias, LayerNorm
        # fused or split), Whisper's stem; weights in the backend's taps-first layout.
        yield f"conv0_group_norm_gelu {name}", lambda dt=dt: conv0_group_norm_gelu(
            rand(2, 160000), torch.tensor([31999, 20000]), taps_first(rand(512, 1, 10)), None, rand(512), rand(512), 5,
            out_dtype=dt)
        yield f"conv1d_gelu k3 s2 {name}", lambda dt=dt: conv1d_gelu(
            rand(2, 3199, 512, dtype=dt), taps_first(rand(512, 512, 3, dtype=dt)), None, 2, 0, None, None, 1e-5,
            out_dtype=dt)
        yield f"conv1d_gelu k2 s2 {name}", lambda dt=dt: conv1d_gelu(  # the feature encoder's last layers
            rand(2, 799, 512, dtype=dt), taps_first(rand(512, 512, 2, dtype=dt)), None, 2, 0, None, None, 1e-5,
            out_dtype=dt)
        yield f"conv1d_gelu k2 s2 + LayerNorm {name}", lambda dt=dt: conv1d_gelu(
            rand(2, 799, 512, dtype=dt), taps_first(rand(512, 512, 2, dtype=dt)), rand(512, dtype=dt), 2, 0,
            rand(512), rand(512), 1e-5, out_dtype=dt)
        yield f"conv1d_gelu LayerNorm layer 0 {name}", lambda dt=dt: conv1d_gelu(
            rand(2, 160000)[:, :, None], taps_first(rand(512, 1, 10)), rand(512), 5, 0, rand(512), rand(512), 1e-5,
            out_dtype=dt)
        yield f"conv1d_gelu + LayerNorm {name}", lambda dt=dt: conv1d_gelu(
            rand(2, 3199, 512, dtype=dt), taps_first(rand(512, 512, 3, dtype=dt)), rand(512, dtype=dt), 2, 0,
            rand(512), rand(512), 1e-5, out_dtype=dt)
        yield f"conv1d_gelu no GELU (LayerNorm split) {name}", lambda dt=dt: conv1d_gelu(
            rand(2, 3199, 512, dtype=dt), taps_first(rand(512, 512, 3, dtype=dt)), rand(512, dtype=dt), 2, 0,
            apply_gelu=False, out_dtype=torch.float32)
        yield f"conv1d_gelu Whisper's conv1 {name}", lambda dt=dt: conv1d_gelu(
            rand(2, 128, 3000).to(dt).transpose(1, 2), taps_first(rand(1280, 128, 3, dtype=dt)), rand(1280, dtype=dt),
            stride=1, padding=1)
        yield f"conv1d_gelu Whisper's conv2 {name}", lambda dt=dt: conv1d_gelu(
            rand(2, 3000, 1280, dtype=dt), taps_first(rand(1280, 1280, 3, dtype=dt)), rand(1280, dtype=dt), stride=2,
            padding=1, add=rand(1500, 1280), out_dtype=torch.float32)
        # The positional conv as the backend holds it (768, 1024, 1280 channels: 48, 64, 80 per group).
        for channels in (768, 1024, 1280):
            conv = nn.Conv1d(channels, channels, 128, padding=64, groups=16)
            yield f"pos_conv {channels} {name}", lambda c=channels, p=_PositionalConv(conv, dt, cpu): p.triton(
                rand(2, 499, c, dtype=dt))
        yield f"add_layer_norm residual + sum {name}", lambda dt=dt: add_layer_norm(
            rand(2, 1500, 1280, dtype=dt), rand(2, 1500, 1280), rand(1280), rand(1280), sum_dtype=torch.float32)
        yield f"add_layer_norm post-LN {name}", lambda dt=dt: add_layer_norm(
            rand(2, 499, 768, dtype=dt), rand(2, 499, 768, dtype=dt), rand(768), rand(768))
        yield f"add_layer_norm shift {name}", lambda dt=dt: add_layer_norm(
            rand(2, 1500, 1280), None, rand(1280), rand(1280), out_dtype=dt, shift=rand(1280))
        yield f"add_layer_norm gelu {name}", lambda dt=dt: add_layer_norm(
            rand(2, 3199, 512), None, rand(512), rand(512), out_dtype=dt, apply_gelu=True)
        # fc1 + GELU in our kernel (float32 always; half precision where it beats cuBLAS), and
        # every other float32 Linear (no GELU).
        fc1 = _LinearGelu(nn.Linear(1024, 4096), dt, cpu, {})
        yield f"linear_gelu fc1 {name}", lambda f=fc1, dt=dt: f.fused(rand(2, 499, 1024, dtype=dt))
        if dt == torch.float32:
            linear = _Linear([nn.Linear(1024, 1024)] * 3, dt, cpu)  # a fused QKV projection
            yield "linear_gelu no GELU float32", lambda: linear(rand(2, 499, 1024))
            # no bias either: out_proj and fc2 adding into the residual (_run_blocks_in_cublas)
            yield "linear_gelu no GELU, no bias float32", lambda: linear.accumulate(rand(998, 3072), rand(2, 499, 1024))
            adapter_in = _Linear([nn.Linear(1280, 16)], dt, cpu)  # MMS's adapters: 16 wide
            yield "linear_gelu MMS adapter float32", lambda: adapter_in(rand(2, 499, 1280))


def problem(shared: list, limit: int, untuned: list) -> str | None:
    """Why a kernel cannot run on a GPU with `limit` bytes of shared memory (None when it can):
    shared[i] is config i's need (None where it did not compile); untuned: the indices of the
    configs AUDIOENC_AUTOTUNE=0 keeps."""
    fits = [need is not None and need <= limit for need in shared]
    if not any(fits):
        return "no config fits"
    if not any(fits[i] for i in untuned):
        return "no config AUDIOENC_AUTOTUNE=0 keeps fits"
    return None


def untuned_indices(configs: list) -> list:
    """The indices of the configs AUDIOENC_AUTOTUNE=0 keeps: the first, and the kernel's fallback."""
    from audioenc.kernels.autotune import FALLBACKS

    return [i for i, config in enumerate(configs) if i == 0 or any(config is f for f in FALLBACKS)]


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default=",".join(map(str, GPUS)),
                        help=f"compute capabilities x 10, comma-separated (default all: {', '.join(map(str, GPUS))})")
    parser.add_argument("--kernel", "--only", default="", help="cases whose label contains this (e.g. 'pos_conv')")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 runs kernels in the interpreter: unset it to compile them")
    archs = [int(a) for a in args.arch.split(",")]
    unknown = [a for a in archs if a not in GPUS]
    if unknown:
        parser.error(f"--arch {unknown[0]}: not a GPU class listed here ({', '.join(map(str, GPUS))})")
    failures, rows = 0, []
    print(f"triton {triton.__version__}")
    for label, call in cases():
        if args.kernel not in label:
            continue
        launch = launch_of(call)
        untuned = untuned_indices(launch.configs)
        cells = []
        for arch in archs:
            gpus, limit = GPUS[arch]
            shared = []
            for config in launch.configs:
                what = f"{label} sm_{arch}: {config if config is not None else 'no autotuning'}"
                try:
                    need = compile_launch(launch, config, arch).metadata.shared
                except Exception as exc:  # noqa: BLE001 - every config is reported
                    failures += 1
                    shared.append(None)
                    print(f"FAIL {what}: {type(exc).__name__}: {str(exc)[:500]}", flush=True)
                    continue
                shared.append(need)
                fit = "fits" if need <= limit else "OVER: dropped there"
                print(f"ok   {what}: {need} B shared, {fit} ({gpus}: {limit})", flush=True)
            why = problem(shared, limit, untuned)
            if why is not None:
                failures += 1
                print(f"FAIL {label} sm_{arch} ({gpus}): {why}", flush=True)
            compiled = [need for need in shared if need is not None]
            fitting = sum(need <= limit for need in compiled)
            sizes = f" ({min(compiled)}-{max(compiled)} B)" if compiled else ""
            cells.append(f"{fitting}/{len(shared)} fit{sizes}" + (f": {why.upper()}" if why else ""))
        rows.append((label, cells))
    print(f"\n| case | {' | '.join(f'sm_{a} {GPUS[a][0]} ({GPUS[a][1]} B)' for a in archs)} |")
    print(f"|---|{'---|' * len(archs)}")
    for label, cells in rows:
        print(f"| {label} | {' | '.join(cells)} |")
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
