"""Linear layer with its bias and exact GELU in the epilogue: gelu(x @ weight.T + bias).

Without the GELU it is the triton backend's float32 Linear: cuBLAS takes float32 matmuls in TF32
whenever the process allows it (torch.set_float32_matmul_precision("high"), about 1e-3 off), and
a CUDA graph keeps what its capture ran; this kernel's float32 product is IEEE whatever the setting.

The feed-forward's first matmul writes its (rows, 4 * dim) output once, already activated. With
cuBLAS the same layer writes that output, then a GELU kernel reads and rewrites it: 4 extra bytes
per half-precision element, about 5 ms of whisper-large-v3's 80 ms per batch of 16 on an H100.
That only pays while this kernel's matmul keeps up with cuBLAS, which depends on the GPU and the
shape, so the triton backend times both ways once per shape and keeps the faster (and keeps cuBLAS
where the two disagree).

kernel -> launcher (``linear_gelu``) -> reference (``linear_gelu_ref``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from audioenc.kernels.autotune import autotune, choose_configs
from audioenc.kernels.gelu import gelu


def _configs():
    # From Triton's matmul tutorial: large tiles for Hopper's tensor cores, smaller ones so that a
    # batch of one (a few hundred rows) still spreads over every SM. Each config compiles for seconds
    # on first use, so the list stays short. The first, the default, does not spill on sm_90 (the
    # 128 x 256 tile does, a little, with the GELU epilogue). float32's 4-byte tiles need more shared
    # memory than some GPUs have (the default about 256 KB; an H100 has 227 KB, an A10 or L4 99 KB):
    # the autotuner drops configs that do not fit, and the last (about 48 KB) is the fallback of
    # AUDIOENC_AUTOTUNE=0.
    tuned = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
             for bm, bn, bk, w, s in [(128, 128, 64, 8, 4), (128, 256, 64, 8, 3), (128, 128, 64, 4, 4),
                                      (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
                                      (64, 64, 32, 4, 3)]]
    return choose_configs(tuned, fallback=tuned[-1],
                          interpreted=triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8},
                                                    num_warps=4))


@triton.jit
def _dot(acc, x, w, IEEE: tl.constexpr):
    """acc + x @ w.T; float32 inputs in true float32 (not TF32), so they meet the 1e-4 rule."""
    if IEEE:
        return tl.dot(x, tl.trans(w), acc, input_precision="ieee")
    return tl.dot(x, tl.trans(w), acc)


@autotune(configs=_configs(), key=["N", "K", "LOG2_M"])
@triton.jit
def _linear_gelu_kernel(
    X, W, Bias, Out,
    M, N, K,
    stride_xm, stride_wn, stride_om,
    LOG2_M,  # autotune key only: tune once per power-of-two row count, not per length
    HAS_BIAS: tl.constexpr, APPLY_GELU: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # Programs run in groups of GROUP_M row blocks that sweep the columns together, so each weight
    # tile is read from L2 by the whole group rather than from memory by each program.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    group_width = GROUP_M * num_n
    first_m = (pid // group_width) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_width) % group_rows
    pid_n = (pid % group_width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge wrap around instead of being masked: they load real memory,
    # keep the loads unmasked, and are never stored.
    rows = (offs_m % M).to(tl.int64)
    cols = (offs_n % N).to(tl.int64)
    x_ptrs = X + rows[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = W + cols[:, None] * stride_wn + offs_k[None, :]  # (BLOCK_N, BLOCK_K) tiles of the (N, K) weight

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    # A steady loop with no masks (it pipelines), then the partial block of K if there is one.
    k_full = (K // BLOCK_K) * BLOCK_K
    for _ in range(0, k_full, BLOCK_K):
        acc = _dot(acc, tl.load(x_ptrs), tl.load(w_ptrs), IEEE)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if k_full < K:
        mask_k = offs_k < K - k_full
        acc = _dot(acc, tl.load(x_ptrs, mask=mask_k[None, :], other=0.0),
                   tl.load(w_ptrs, mask=mask_k[None, :], other=0.0), IEEE)

    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y = gelu(acc) if APPLY_GELU else acc
    out_ptrs = Out + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(Out.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                apply_gelu: bool = True) -> torch.Tensor:
    """gelu(x @ weight.T + bias) with float32 accumulation and the exact erf GELU (apply_gelu=False:
    x @ weight.T + bias).

    x: (..., K), contiguous in its last dim; weight: (N, K) as nn.Linear keeps it, contiguous in K;
    bias: (N,) or None. All three share one dtype of float16, bfloat16, float32. Returns (..., N)
    in that dtype.
    """
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_gelu: x (..., K) and weight (N, K) do not match: {tuple(x.shape)}, "
                         f"{tuple(weight.shape)}")
    n, k = weight.shape
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"linear_gelu: bias must have shape ({n},), got {tuple(bias.shape)}")
    tensors = [x, weight] + ([bias] if bias is not None else [])
    if x.dtype not in SUPPORTED_DTYPES or any(t.dtype != x.dtype for t in tensors):
        raise ValueError(f"linear_gelu: x, weight and bias must share one dtype of float16, bfloat16, float32; "
                         f"got {', '.join(str(t.dtype) for t in tensors)}")
    if any(t.device != x.device for t in tensors):
        raise ValueError("linear_gelu: x, weight and bias must be on one device")
    if k == 0:
        raise ValueError("linear_gelu: the input dimension K must not be 0")
    x2 = x.reshape(-1, k)  # a view whenever rows are evenly strided
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None:
        bias = bias.contiguous()  # read at Bias + column
    out = torch.empty(x.shape[:-1] + (n,), dtype=x.dtype, device=x.device)
    m = x2.shape[0]
    if m == 0 or n == 0:
        return out
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)
    _linear_gelu_kernel[grid](
        x2, weight, bias if bias is not None else weight, out,
        m, n, k,
        x2.stride(0), weight.stride(0), n,
        max(m - 1, 1).bit_length(),
        HAS_BIAS=bias is not None, APPLY_GELU=apply_gelu, IEEE=x.dtype == torch.float32,
    )
    return out


def linear_gelu_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    compute_dtype: torch.dtype = torch.float32, apply_gelu: bool = True) -> torch.Tensor:
    """The same in ``compute_dtype`` with torch (float32: the truth; a half dtype: the naive
    low-precision error the tests scale by). Returns x's dtype."""
    b = bias.to(compute_dtype) if bias is not None else None
    y = F.linear(x.to(compute_dtype), weight.to(compute_dtype), b)
    return (F.gelu(y) if apply_gelu else y).to(x.dtype)
