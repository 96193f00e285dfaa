"""Every attention config, and a variant that loads keys and values by TMA, timed one by one.

    python benchmarks/sweep_attention.py            # CUDA machine
    python benchmarks/sweep_attention.py --quick    # whisper-large-v3's shape and the tuned list only
    python benchmarks/sweep_attention.py --tiny     # anywhere (interpreter): proves it runs

The autotuner keeps one config per shape class and says nothing about the others; this shows how
far apart they are, whether configs outside the tuned list would win, and what loading the steady
key blocks with Hopper's tensor memory accelerator (host TensorDescriptors) gives (stop 17, H200:
nothing; BENCHMARKS.md), and the same with the key loop warp-specialized (not yet run on a GPU). Shapes are the
backend's: q, k, v are views of one fused (B, T, 3, H, D) projection. Each way's output is checked
against attention_ref's float32 truth (DESIGN.md's half-precision rule) before it is timed: a
mismatch stops the sweep. ms per call from a CUDA graph of 20 calls.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from bench_gpu import TINY, graph_timed  # sets TRITON_INTERPRET without CUDA, before triton loads
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from audioenc.kernels.attention import (  # noqa: E402
    LOG2E, TUNED_CONFIGS, _attend_keys, _attention_fwd_kernel, attention, attention_ref)
from common import check_output  # noqa: E402

# (BLOCK_M, BLOCK_N, warps, stages): the tuned list, then configs outside it
CONFIGS = TUNED_CONFIGS + [(128, 128, 8, 2), (128, 128, 8, 4), (128, 64, 8, 2), (256, 64, 8, 3), (256, 64, 8, 2),
                           (256, 128, 8, 2), (128, 128, 4, 2), (64, 128, 4, 3)]


@triton.jit
def _attention_tma_kernel(
    Q, K, V, Out, Lengths, desc_k, desc_v,
    stride_qb, stride_qt, stride_qh, stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh, stride_ob, stride_ot, stride_oh,
    num_heads, seq_len, qk_scale,
    HEAD_DIM: tl.constexpr, HAS_LENGTHS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    """The tuned kernel with its steady key loop on TMA loads (rows b * T + n of a (B * T, H * D)
    view), optionally warp-specialized (producer warps load while consumer warps compute, as
    FlashAttention-3 does); the partial last block keeps masked pointer loads."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < seq_len
    hi = seq_len
    if HAS_LENGTHS:
        hi = tl.minimum(tl.load(Lengths + b).to(tl.int32), seq_len)
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                mask=mask_m[:, None], other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    full = (hi // BLOCK_N) * BLOCK_N
    row0 = b * seq_len
    for start_n in tl.range(0, full, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = desc_k.load([row0 + start_n, h * HEAD_DIM])
        s = tl.dot(q, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = desc_v.load([row0 + start_n, h * HEAD_DIM])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    k_base = K + b * stride_kb + h * stride_kh + offs_d[None, :]
    v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :]
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, None, None, qk_scale,
                                 full, hi, hi, offs_n, mask_m, offs_d < HEAD_DIM, True, False, False, True, BLOCK_N)
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mask_m[:, None])


def launch(config, q, k, v, lengths, tma: bool, warp_specialize: bool = False):
    """One forward with a fixed config, through the tuned kernel or the TMA variant."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, warps, stages = config
    b, t, h, d = q.shape
    out = torch.empty(b, t, h, d, dtype=q.dtype, device=q.device)
    grid = (triton.cdiv(t, bm), b * h)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2))
    lens = lengths if lengths is not None else out
    if tma:
        desc = lambda x: TensorDescriptor(x, [b * t, h * d], [x.stride(1), 1], [bn, d])
        _attention_tma_kernel[grid](q, k, v, out, lens, desc(k), desc(v), *strides, h, t, d ** -0.5 * LOG2E,
                                    HEAD_DIM=d, HAS_LENGTHS=lengths is not None, BLOCK_M=bm, BLOCK_N=bn,
                                    WARP_SPECIALIZE=warp_specialize, num_warps=warps, num_stages=stages)
    else:
        _attention_fwd_kernel.fn[grid](q, k, v, out, lens, out, out, *strides, 0, 0, 0, h, t, d ** -0.5 * LOG2E,
                                       0, 0, HEAD_DIM=d, BLOCK_D=d, HAS_LENGTHS=lengths is not None,
                                       HAS_BIAS=False, IEEE=False, BLOCK_M=bm, BLOCK_N=bn,
                                       num_warps=warps, num_stages=stages)
    return out


def sweep(b, t, h, d, masked, repeats, device, dtype, configs):
    gen = torch.Generator(device=device).manual_seed(0)
    qkv = torch.randn(b, t, 3, h, d, device=device, dtype=dtype, generator=gen)
    q, k, v = qkv.unbind(2)
    lengths = torch.randint(t // 2, t + 1, (b,), device=device, generator=gen) if masked else None
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    mask = None if lengths is None else (torch.arange(t, device=device)[None, :] < lengths[:, None])[:, None, None, :]
    sdpa = lambda: F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask)
    truth = attention_ref(q.float(), k.float(), v.float(), lengths)
    naive = attention_ref(q, k, v, lengths, compute_dtype=dtype) if dtype != torch.float32 else None
    flops = 4 * b * h * t * t * d
    title = f"B={b} T={t} H={h} D={d}{', key mask' if masked else ''}"
    print(f"\n### {title}\n\n| way | BLOCK_M, BLOCK_N, warps, stages | ms | TFLOP/s | vs SDPA | rel. error vs fp32 |\n"
          "|---|---|---:|---:|---:|---:|", flush=True)
    t_sdpa = graph_timed(sdpa, repeats)
    print(f"| torch SDPA | | {1000 * t_sdpa:.3f} | {flops / t_sdpa / 1e12:.0f} | 1.00x | |", flush=True)
    ways = [("autotuned", None, lambda: attention(q, k, v, lengths))]
    variants = (("pointer", False, False), ("tma", True, False), ("tma, warp-specialized", True, True))
    ways += [(name, c, (lambda c=c, tma=tma, ws=ws: launch(c, q, k, v, lengths, tma, ws)))
             for c in configs for name, tma, ws in variants
             if not ws or c[2] == 8]  # warp specialization splits 8 warps into producers and consumers
    for name, config, fn in ways:
        try:  # a wrong output raises WrongOutput, no Exception: it stops the sweep
            error = check_output(f"attention ({name}{f', {config}' if config else ''}) at {title}", fn(), truth, naive)
            seconds = graph_timed(fn, repeats)
        except Exception as exc:  # noqa: BLE001 - a config that does not fit this GPU's shared memory
            print(f"| {name} | {config} | failed: {str(exc).splitlines()[0][:80]} | | | |", flush=True)
            continue
        print(f"| {name} | {'' if config is None else ', '.join(map(str, config))} | {1000 * seconds:.3f} | "
              f"{flops / seconds / 1e12:.0f} | {t_sdpa / seconds:.2f}x | {error:.1e} |", flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--quick", action="store_true", help="whisper-large-v3's shape and the tuned list only")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    shapes = [(16, 1500, 20, 64, False), (16, 499, 16, 64, False), (16, 499, 16, 64, True), (64, 499, 12, 64, False)]
    configs = CONFIGS[:1] if TINY else TUNED_CONFIGS if args.quick else CONFIGS
    if TINY:
        shapes = [(2, 97, 2, 64, False), (2, 97, 2, 64, True)]
    for shape in shapes[:1] if args.quick and not TINY else shapes:
        sweep(*shape, args.repeats, device, dtype, configs)


if __name__ == "__main__":
    main()
