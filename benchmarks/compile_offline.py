"""Compiles every Triton kernel of audioenc for a GPU that is not here (sm_90 by default), at the
shapes the triton backend runs, with every autotune config: a session without a GPU can catch a
compile error, or a config over the GPU's shared memory, before a short GPU lease spends time on it.

    python benchmarks/compile_offline.py [--arch 90] [--only attention]

Each launcher is called with CPU tensors of real sizes; the call is stopped where Triton would
launch, and what it would have compiled (the arguments' types, Triton's specialisation of pointers
and of integers divisible by 16, each config's constants, warps and stages) is compiled with
triton.compile for the target. Nothing runs. A config over the shared memory limit is reported, not
failed: the autotuner drops it on the GPU (each kernel keeps a config that fits). With no cache,
all of them take about 7 minutes on 2 CPU cores. Each combination of a kernel's flags compiles
apart: the cases are those the backend launches (and the experiments bench_gpu.py times).
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

SHARED_MEMORY = {80: 166912, 86: 101376, 89: 101376, 90: 232448}  # bytes per block, opt-in maximum
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


def cases():
    """(label, call) at the real sizes of the backend: float16 and float32 compute."""
    from audioenc.kernels.attention import attention
    from audioenc.kernels.conv_feature import conv0_group_norm_gelu, conv1d_gelu
    from audioenc.kernels.layer_norm import add_layer_norm
    from audioenc.kernels.linear_gelu import linear_gelu
    from audioenc.kernels.pos_conv import grouped_conv1d_gelu
    from audioenc.kernels.wavlm_gate import wavlm_gate

    rand = torch.randn
    for dt in (torch.float16, torch.float32):
        name = str(dt).replace("torch.", "")
        for heads in (20, 16, 12):  # whisper-large-v3, wav2vec2-large, base models; head dim 64
            q = rand(2, 1500, heads, 64, dtype=dt)
            yield f"attention {heads} heads {name}", lambda q=q: attention(q, q, q, torch.tensor([1500, 1000]))
        q = rand(2, 499, 16, 64, dtype=dt)
        yield f"attention with WavLM's bias {name}", lambda q=q: attention(
            q, q, q, torch.tensor([499, 300]), rand(16, 997), rand(2, 16, 499))
        yield f"wavlm_gate {name}", lambda dt=dt: wavlm_gate(rand(2, 499, 1024, dtype=dt), 16, rand(2, 64), rand(2),
                                                             rand(16))
        yield f"conv0_group_norm_gelu {name}", lambda dt=dt: conv0_group_norm_gelu(
            rand(2, 160000), torch.tensor([31999, 20000]), rand(512, 1, 10), None, rand(512), rand(512), 5,
            out_dtype=dt)
        yield f"conv1d_gelu k3 s2 {name}", lambda dt=dt: conv1d_gelu(rand(2, 3199, 512, dtype=dt),
                                                                      rand(512, 512, 3, dtype=dt), None, 2)
        yield f"conv1d_gelu + LayerNorm {name}", lambda dt=dt: conv1d_gelu(
            rand(2, 3199, 512, dtype=dt), rand(512, 512, 3, dtype=dt), rand(512, dtype=dt), 2, 0, rand(512), rand(512))
        for channels in (768, 1024):
            yield f"grouped_conv1d_gelu {channels} {name}", lambda dt=dt, c=channels: grouped_conv1d_gelu(
                rand(2, 499, c, dtype=dt), rand(c, c // 16, 128, dtype=dt), rand(c, dtype=dt), 16)
        # Each combination of the kernels' flags compiles apart: those the backend launches.
        yield f"conv1d_gelu Whisper's stem {name}", lambda dt=dt: conv1d_gelu(
            rand(2, 3000, 1280, dtype=dt), rand(1280, 1280, 3, dtype=dt), rand(1280, dtype=dt), 2, 1,
            add=rand(1500, 1280), out_dtype=torch.float32)
        yield f"add_layer_norm residual + sum {name}", lambda dt=dt: add_layer_norm(
            rand(2, 1500, 1280, dtype=dt), rand(2, 1500, 1280), rand(1280), rand(1280), sum_dtype=torch.float32)
        yield f"add_layer_norm shift {name}", lambda dt=dt: add_layer_norm(
            rand(2, 1500, 1280), None, rand(1280), rand(1280), out_dtype=dt, shift=rand(1280))
        yield f"add_layer_norm gelu {name}", lambda dt=dt: add_layer_norm(
            rand(2, 3199, 512), None, rand(512), rand(512), out_dtype=dt, apply_gelu=True)
        yield f"linear_gelu {name}", lambda dt=dt: linear_gelu(rand(998, 1024, dtype=dt), rand(4096, 1024, dtype=dt),
                                                               rand(4096, dtype=dt))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    parser.add_argument("--only", default="", help="cases whose label contains this")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("TRITON_INTERPRET=1 runs kernels in the interpreter: unset it to compile them")
    limit = SHARED_MEMORY.get(args.arch)
    failures = 0
    print(f"triton {triton.__version__}, sm_{args.arch}")
    for label, call in cases():
        if args.only not in label:
            continue
        launch = launch_of(call)
        for config in launch.configs:
            what = f"{label}: {config if config is not None else 'no autotuning'}"
            try:
                kernel = compile_launch(launch, config, args.arch)
            except Exception as exc:  # noqa: BLE001 - every config is reported
                failures += 1
                print(f"FAIL {what}: {type(exc).__name__}: {str(exc)[:500]}", flush=True)
                continue
            shared = kernel.metadata.shared
            over = f" (over sm_{args.arch}'s {limit}: dropped there)" if limit and shared > limit else ""
            print(f"ok   {what}: {shared} B shared{over}", flush=True)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
