"""Residual add fused with LayerNorm: one read of each input, statistics in float32.

Post-LN layers use it as LN(x + branch); pre-LN layers as (r + branch, LN(r + branch)) where the
sum is the residual stream (kept in float32 by the triton backend so large activations of
wav2vec2-large / WavLM-large cannot overflow float16) and the normalised output feeds the next matmul.
``shift``, a vector added to every row, is for a residual stream that cuBLAS accumulates in its
epilogue without the biases (the backend carries their sum apart and adds it here).
With apply_gelu it is gelu(LN(x)): the norm and activation of a conv layer computed by a separate
conv kernel (the triton backend's split path for layer-norm models' conv layers).

kernel -> launcher (``add_layer_norm``) -> reference (``add_layer_norm_ref``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from audioenc.kernels.gelu import gelu


@triton.jit
def _add_layer_norm_kernel(
    X, Res, Shift, W, B, Out, Sum,
    stride_x, stride_r, stride_o, stride_s,
    num_rows, N, eps,
    HAS_RES: tl.constexpr, HAS_SHIFT: tl.constexpr, STORE_SUM: tl.constexpr, GELU: tl.constexpr,
    BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # BLOCK_ROWS rows per program: narrow rows would leave most lanes idle one row at a time.
    rows = (tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask_n = cols < N
    mask = (rows < num_rows)[:, None] & mask_n[None, :]
    x = tl.load(X + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        x += tl.load(Res + rows[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        x += tl.load(Shift + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if STORE_SUM:
        tl.store(Sum + rows[:, None] * stride_s + cols[None, :], x.to(Sum.dtype.element_ty), mask=mask)
    mean = tl.sum(x, 1) / N
    diff = tl.where(mask_n[None, :], x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 1) / N + eps)
    w = tl.load(W + cols, mask=mask_n, other=0.0).to(tl.float32)
    b = tl.load(B + cols, mask=mask_n, other=0.0).to(tl.float32)
    y = diff * rstd[:, None] * w[None, :] + b[None, :]
    if GELU:
        y = gelu(y)
    tl.store(Out + rows[:, None] * stride_o + cols[None, :], y.to(Out.dtype.element_ty), mask=mask)


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _rows(t: torch.Tensor, name: str, n: int) -> torch.Tensor:
    if t.shape[-1] != n:
        raise ValueError(f"add_layer_norm: {name} must end in dimension {n}, got {tuple(t.shape)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"add_layer_norm: {name} must be float16, bfloat16 or float32, got {t.dtype}")
    rows = t.reshape(-1, n)  # a view whenever rows are evenly strided, as for any (B, T, N) tensor
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def add_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor,
                   eps: float = 1e-5, out_dtype: torch.dtype | None = None,
                   sum_dtype: torch.dtype | None = None, apply_gelu: bool = False,
                   shift: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(LN(x + residual + shift), x + residual + shift) over the last dimension, statistics in float32.

    residual may be None (plain LayerNorm), shift None or a vector of the last dimension's size. The
    sum is returned only when sum_dtype is given (else None). out_dtype defaults to x's dtype.
    apply_gelu: gelu(LN(...)) instead, computed before the output's rounding.
    """
    n = weight.shape[0]
    if weight.shape != (n,) or bias is None or bias.shape != (n,):
        raise ValueError(f"add_layer_norm: weight and bias must both be 1-D of the same size, got "
                         f"{tuple(weight.shape)}, {None if bias is None else tuple(bias.shape)}")
    x2 = _rows(x, "x", n)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"add_layer_norm: residual shape {tuple(residual.shape)} differs from x's {tuple(x.shape)}")
        res2 = _rows(residual, "residual", n)
    if shift is not None and (shift.shape != (n,) or shift.dtype not in SUPPORTED_DTYPES):
        raise ValueError(f"add_layer_norm: shift must be a float vector of size {n}, got {shift.dtype} {tuple(shift.shape)}")
    for t in (residual, shift, weight, bias):
        if t is not None and t.device != x.device:
            raise ValueError(f"add_layer_norm: all tensors must be on {x.device}")
    weight, bias = weight.contiguous(), bias.contiguous()  # read at W + column
    out_dtype = out_dtype or x.dtype
    for d in (out_dtype, sum_dtype):
        if d is not None and d not in SUPPORTED_DTYPES:
            raise ValueError(f"add_layer_norm: output dtypes must be float16, bfloat16 or float32, got {d}")
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    summed = torch.empty(x.shape, dtype=sum_dtype, device=x.device) if sum_dtype is not None else None
    rows = x2.shape[0]
    if rows == 0:
        return out, summed
    out2 = out.view(-1, n)
    sum2 = summed.view(-1, n) if summed is not None else out2
    block_n = triton.next_power_of_2(n)
    block_rows = min(64, max(1, 4096 // block_n))  # about 4K elements per program
    _add_layer_norm_kernel[(triton.cdiv(rows, block_rows),)](
        x2, res2 if residual is not None else x2, shift.contiguous() if shift is not None else weight, weight, bias,
        out2, sum2, x2.stride(0), res2.stride(0) if residual is not None else 0, out2.stride(0), sum2.stride(0),
        rows, n, eps,
        HAS_RES=residual is not None, HAS_SHIFT=shift is not None, STORE_SUM=summed is not None, GELU=apply_gelu,
        BLOCK_ROWS=block_rows, BLOCK_N=block_n,
        num_warps=4 if block_rows * block_n <= 4096 else 8,
    )
    return out, summed


def add_layer_norm_ref(x, residual, weight, bias, eps=1e-5, out_dtype=None, sum_dtype=None, apply_gelu=False,
                       shift=None):
    s = x.float() if residual is None else x.float() + residual.float()
    s = s if shift is None else s + shift.float()
    out = F.layer_norm(s, (weight.shape[0],), weight.float(), bias.float(), eps)
    out = (F.gelu(out) if apply_gelu else out).to(out_dtype or x.dtype)
    return out, (s.to(sum_dtype) if sum_dtype is not None else None)
