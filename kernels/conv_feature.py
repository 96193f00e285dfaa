"""Conv feature encoder layers fused with their norm and GELU, channels-last.

- ``conv1d_gelu``: Conv1d (+ bias) -> optional LayerNorm over channels -> exact GELU (optional) ->
  optional added tensor (T, C). Covers wav2vec2-family conv layers 1..6 (no norm), every layer of
  layer-norm models, and the Whisper stem (k3 conv + GELU; k3 stride-2 conv + GELU + positions).
- ``conv0_group_norm_gelu``: layer 0 of group-norm models: Conv1d(1, C, k, s) -> GroupNorm with one
  group per channel whose statistics run over each item's valid frames only -> GELU.

Activations are (B, T, C) with any strides, so (B, C, T) inputs (a log-mel) go in as transposed
views and the output feeds the feature projection without a transpose. Weights keep nn.Conv1d's
(C_out, C_in, K) shape with any strides; a (K, C_in, C_out) memory layout loads best.

kernels -> launchers -> references (``*_ref``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from audioenc.kernels.autotune import autotune, choose_configs
from audioenc.kernels.gelu import gelu
from audioenc.models.layers import masked_group_norm


def _conv_configs():
    # Compiled for sm_90 at wav2vec2's and Whisper's shapes: (32, 32, 8, 3), the default, spills in
    # neither form; BLOCK_T 64 and up use Hopper's wgmma; the 128-row tiles (matmul-sized) fit in
    # registers without a LayerNorm, and 16 warps give the LayerNorm's 512-channel rows room.
    return choose_configs(
        [triton.Config({"BLOCK_T": bt, "BLOCK_CI": bci}, num_warps=w, num_stages=s)
         for bt, bci, w, s in [(32, 32, 8, 3), (16, 64, 4, 3), (32, 64, 8, 3), (64, 32, 8, 3), (64, 64, 8, 2),
                               (128, 32, 8, 4), (128, 64, 8, 3), (64, 32, 16, 3)]],
        interpreted=triton.Config({"BLOCK_T": 128, "BLOCK_CI": 64}, num_warps=4))


@autotune(configs=_conv_configs(), key=["C_in", "C_out", "KSIZE", "LOG2_T", "LAYER_NORM"])
@triton.jit
def _conv1d_gelu_kernel(
    X, W, Bias, NormW, NormB, Add, Out,
    stride_xb, stride_xt, stride_xc,
    stride_wo, stride_wi, stride_wk,
    stride_at, stride_ac,
    stride_ob, stride_ot, stride_oc,
    L_in, C_in, C_out, T_out, eps,
    LOG2_T,  # autotune key only
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
    HAS_BIAS: tl.constexpr, LAYER_NORM: tl.constexpr, GELU: tl.constexpr, HAS_ADD: tl.constexpr,
    SCALAR_IN: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_CI: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)  # b * stride_ob passes 2^31 on long batches (64 x 30 s at layer 0)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_t = offs_t < T_out
    mask_c = offs_c < C_out
    x_base = X + b * stride_xb
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(KSIZE):
        pos = offs_t * STRIDE + j - PAD
        pos_ok = mask_t & (pos >= 0) & (pos < L_in)  # zero padding at both ends
        if SCALAR_IN:
            # one input channel (the waveform): an outer product per tap, no matmul to feed
            x = tl.load(x_base + pos * stride_xt, mask=pos_ok, other=0.0).to(tl.float32)
            w = tl.load(W + offs_c * stride_wo + j * stride_wk, mask=mask_c, other=0.0).to(tl.float32)
            acc += x[:, None] * w[None, :]
        else:
            for ci0 in range(0, C_in, BLOCK_CI):
                offs_ci = ci0 + tl.arange(0, BLOCK_CI)
                mask_ci = offs_ci < C_in
                x = tl.load(x_base + pos[:, None] * stride_xt + offs_ci[None, :] * stride_xc,
                            mask=pos_ok[:, None] & mask_ci[None, :], other=0.0)
                w = tl.load(W + offs_c[None, :] * stride_wo + offs_ci[:, None] * stride_wi + j * stride_wk,
                            mask=mask_ci[:, None] & mask_c[None, :], other=0.0)
                if IEEE:
                    acc += tl.dot(x, w, input_precision="ieee")
                else:
                    acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(Bias + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
    if LAYER_NORM:
        # the whole channel row is in this program (BLOCK_C >= C_out): statistics in float32
        acc = tl.where(mask_c[None, :], acc, 0.0)
        mean = tl.sum(acc, 1) / C_out
        diff = tl.where(mask_c[None, :], acc - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(diff * diff, 1) / C_out + eps)
        nw = tl.load(NormW + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        nb = tl.load(NormB + offs_c, mask=mask_c, other=0.0).to(tl.float32)
        acc = diff * rstd[:, None] * nw[None, :] + nb[None, :]
    y = acc
    if GELU:
        y = gelu(acc)
    if HAS_ADD:
        y += tl.load(Add + offs_t[:, None] * stride_at + offs_c[None, :] * stride_ac,
                     mask=mask_t[:, None] & mask_c[None, :], other=0.0).to(tl.float32)
    tl.store(Out + b * stride_ob + offs_t[:, None] * stride_ot + offs_c[None, :] * stride_oc,
             y.to(Out.dtype.element_ty), mask=mask_t[:, None] & mask_c[None, :])


@triton.jit
def _conv0_tile(x_base, stride_xt, W, stride_wo, stride_wk, bias, offs_t, t_limit, L_in, offs_c, mask_c,
                KSIZE: tl.constexpr, STRIDE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Conv1d(1, C) outputs for frames offs_t x channels offs_c (float32); frames >= t_limit are 0."""
    mask_t = offs_t < t_limit
    acc = tl.zeros([BLOCK_T, BLOCK_C], dtype=tl.float32)
    for j in tl.static_range(KSIZE):
        pos = offs_t * STRIDE + j
        x = tl.load(x_base + pos * stride_xt, mask=mask_t & (pos < L_in), other=0.0).to(tl.float32)
        w = tl.load(W + offs_c * stride_wo + j * stride_wk, mask=mask_c, other=0.0).to(tl.float32)
        acc += x[:, None] * w[None, :]
    return tl.where(mask_t[:, None], acc + bias[None, :], 0.0)


def _conv0_configs():
    return choose_configs([triton.Config({"BLOCK_T": bt, "BLOCK_C": bc}, num_warps=w)
                           for bt, bc, w in [(128, 16, 4), (64, 32, 4), (256, 8, 4), (128, 32, 8)]],
                          interpreted=triton.Config({"BLOCK_T": 512, "BLOCK_C": 64}, num_warps=4))


@autotune(configs=_conv0_configs(), key=["C_out", "KSIZE", "LOG2_T"])
@triton.jit
def _conv0_group_norm_gelu_kernel(
    X, W, Bias, NormW, NormB, FrameLengths, Out,
    stride_xb, stride_xt, stride_wo, stride_wk,
    stride_ob, stride_ot, stride_oc,
    L_in, C_out, T_out, eps,
    LOG2_T,  # autotune key only
    KSIZE: tl.constexpr, STRIDE: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    # One program owns a block of channels of one item and sweeps its frames three times
    # (mean, variance, output), recomputing the cheap 1-channel conv instead of storing it:
    # exact two-pass statistics, deterministic, no atomics.
    pid_c = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # see _conv1d_gelu_kernel
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C_out
    arange_t = tl.arange(0, BLOCK_T)
    x_base = X + b * stride_xb
    n_valid = tl.minimum(tl.load(FrameLengths + b).to(tl.int32), T_out)
    bias = tl.zeros([BLOCK_C], dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(Bias + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    count = tl.maximum(n_valid, 1).to(tl.float32)

    total = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, n_valid, BLOCK_T):
        y = _conv0_tile(x_base, stride_xt, W, stride_wo, stride_wk, bias, t0 + arange_t, n_valid, L_in,
                        offs_c, mask_c, KSIZE, STRIDE, BLOCK_T, BLOCK_C)
        total += tl.sum(y, 0)
    mean = total / count
    sq = tl.zeros([BLOCK_C], dtype=tl.float32)
    for t0 in range(0, n_valid, BLOCK_T):
        offs_t = t0 + arange_t
        y = _conv0_tile(x_base, stride_xt, W, stride_wo, stride_wk, bias, offs_t, n_valid, L_in,
                        offs_c, mask_c, KSIZE, STRIDE, BLOCK_T, BLOCK_C)
        d = tl.where((offs_t < n_valid)[:, None], y - mean[None, :], 0.0)
        sq += tl.sum(d * d, 0)
    rstd = 1.0 / tl.sqrt(sq / count + eps)
    scale = tl.load(NormW + offs_c, mask=mask_c, other=0.0).to(tl.float32) * rstd
    shift = tl.load(NormB + offs_c, mask=mask_c, other=0.0).to(tl.float32) - mean * scale
    # Padded frames are normalised with the item's statistics too; they never reach valid frames.
    for t0 in range(0, T_out, BLOCK_T):
        offs_t = t0 + arange_t
        y = _conv0_tile(x_base, stride_xt, W, stride_wo, stride_wk, bias, offs_t, T_out, L_in,
                        offs_c, mask_c, KSIZE, STRIDE, BLOCK_T, BLOCK_C)
        y = gelu(y * scale[None, :] + shift[None, :])
        tl.store(Out + b * stride_ob + offs_t[:, None] * stride_ot + offs_c[None, :] * stride_oc,
                 y.to(Out.dtype.element_ty), mask=(offs_t < T_out)[:, None] & mask_c[None, :])


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check_common(x, weight, bias, out_dtype, name):
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: input dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if weight.dim() != 3:
        raise ValueError(f"{name}: weight must be (C_out, C_in, K) as nn.Conv1d's, got {tuple(weight.shape)}")
    if weight.device != x.device or (bias is not None and bias.device != x.device):
        raise ValueError(f"{name}: weight and bias must be on the input's device {x.device}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{name}: bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if out_dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}: out_dtype must be float16, bfloat16 or float32, got {out_dtype}")


def _check_norm(norm_weight, norm_bias, channels, device, name):
    for t in (norm_weight, norm_bias):
        if t is None or t.shape != (channels,) or t.device != device:
            raise ValueError(f"{name}: norm weight and bias must both be ({channels},) tensors on {device}")


def conv_output_length(length: int, kernel: int, stride: int, padding: int = 0) -> int:
    return max((length + 2 * padding - kernel) // stride + 1, 0)


def conv1d_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride: int = 1,
                padding: int = 0, norm_weight: torch.Tensor | None = None, norm_bias: torch.Tensor | None = None,
                eps: float = 1e-5, add: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                apply_gelu: bool = True) -> torch.Tensor:
    """gelu(norm(conv1d(x) + bias)) (+ add), channels-last.

    x: (B, L, C_in); weight (C_out, C_in, K); norm_weight/norm_bias: a LayerNorm over the C_out
    channels (both or neither); add: (T_out, C_out), added after the GELU (Whisper's positions);
    apply_gelu=False leaves the GELU out.
    Returns (B, T_out, C_out) in out_dtype (default x.dtype); fp32 accumulation and statistics.
    """
    out_dtype = out_dtype or x.dtype
    _check_common(x, weight, bias, out_dtype, "conv1d_gelu")
    if x.dim() != 3 or x.shape[2] != weight.shape[1]:
        raise ValueError(f"conv1d_gelu: x must be (B, L, {weight.shape[1]}) channels-last, got {tuple(x.shape)}")
    if x.shape[2] > 1 and weight.dtype != x.dtype:  # the matmul path needs one dtype
        raise ValueError(f"conv1d_gelu: weight dtype {weight.dtype} differs from x's {x.dtype}")
    if stride < 1 or padding < 0:
        raise ValueError(f"conv1d_gelu: stride must be >= 1 and padding >= 0, got {stride}, {padding}")
    batch, length, c_in = x.shape
    c_out, _, ksize = weight.shape
    layer_norm = norm_weight is not None or norm_bias is not None
    if layer_norm:
        _check_norm(norm_weight, norm_bias, c_out, x.device, "conv1d_gelu")
    t_out = conv_output_length(length, ksize, stride, padding)
    if add is not None and (add.shape != (t_out, c_out) or add.device != x.device):
        raise ValueError(f"conv1d_gelu: add must be a ({t_out}, {c_out}) tensor on {x.device}, got {tuple(add.shape)}")
    # The kernel reads these vectors at Ptr + channel: a strided view must not pass as one.
    bias, norm_weight, norm_bias = (None if t is None else t.contiguous() for t in (bias, norm_weight, norm_bias))
    out = torch.empty((batch, t_out, c_out), dtype=out_dtype, device=x.device)
    if t_out == 0 or batch == 0:
        return out
    # LayerNorm needs a whole channel row per program; otherwise tile channels.
    block_c = max(16, triton.next_power_of_2(c_out)) if layer_norm else min(128, max(16, triton.next_power_of_2(c_out)))
    grid = lambda meta: (triton.cdiv(t_out, meta["BLOCK_T"]), triton.cdiv(c_out, block_c), batch)
    _conv1d_gelu_kernel[grid](
        x, weight, bias if bias is not None else out, norm_weight if layer_norm else out,
        norm_bias if layer_norm else out, add if add is not None else out, out,
        x.stride(0), x.stride(1), x.stride(2),
        weight.stride(0), weight.stride(1), weight.stride(2),
        add.stride(0) if add is not None else 0, add.stride(1) if add is not None else 0,
        out.stride(0), out.stride(1), out.stride(2),
        length, c_in, c_out, t_out, eps, max(t_out - 1, 1).bit_length(),
        KSIZE=ksize, STRIDE=stride, PAD=padding,
        HAS_BIAS=bias is not None, LAYER_NORM=layer_norm, GELU=apply_gelu, HAS_ADD=add is not None,
        SCALAR_IN=c_in == 1, IEEE=x.dtype == torch.float32, BLOCK_C=block_c,
    )
    return out


def conv1d_gelu_ref(x, weight, bias=None, stride=1, padding=0, norm_weight=None, norm_bias=None, eps=1e-5,
                    add=None, out_dtype=None, apply_gelu=True, compute_dtype=torch.float32):
    """The same with torch ops in compute_dtype (LayerNorm statistics in float32 as the models do)."""
    y = F.conv1d(x.to(compute_dtype).transpose(1, 2), weight.to(compute_dtype),
                 None if bias is None else bias.to(compute_dtype), stride, padding).transpose(1, 2)
    if norm_weight is not None:
        y = F.layer_norm(y.float(), (y.shape[-1],), norm_weight.float(), norm_bias.float(), eps).to(compute_dtype)
    if apply_gelu:
        y = F.gelu(y)
    if add is not None:
        y = y + add.to(compute_dtype)
    return y.to(out_dtype or x.dtype)


def conv0_group_norm_gelu(waveforms: torch.Tensor, frame_lengths: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor | None, norm_weight: torch.Tensor, norm_bias: torch.Tensor,
                          stride: int, eps: float = 1e-5, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """gelu(GroupNorm_C(conv1d(waveforms))) with each item's statistics over its first
    frame_lengths[b] frames. waveforms (B, L); weight (C, 1, K); returns (B, T_out, C)."""
    out_dtype = out_dtype or waveforms.dtype
    _check_common(waveforms, weight, bias, out_dtype, "conv0_group_norm_gelu")
    if waveforms.dim() != 2:
        raise ValueError(f"conv0_group_norm_gelu: waveforms must be (B, L), got {tuple(waveforms.shape)}")
    if weight.shape[1] != 1:
        raise ValueError(f"conv0_group_norm_gelu: weight must have one input channel, got {tuple(weight.shape)}")
    batch, length = waveforms.shape
    if (frame_lengths.shape != (batch,) or frame_lengths.device != waveforms.device
            or frame_lengths.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"conv0_group_norm_gelu: frame_lengths must be int32/int64 of shape ({batch},) "
                         f"on {waveforms.device}")
    if stride < 1:
        raise ValueError(f"conv0_group_norm_gelu: stride must be >= 1, got {stride}")
    c_out, _, ksize = weight.shape
    _check_norm(norm_weight, norm_bias, c_out, waveforms.device, "conv0_group_norm_gelu")
    t_out = conv_output_length(length, ksize, stride)
    # The kernel reads these vectors at Ptr + channel (or item): a strided view must not pass as one.
    bias, norm_weight, norm_bias, frame_lengths = (None if t is None else t.contiguous()
                                                   for t in (bias, norm_weight, norm_bias, frame_lengths))
    out = torch.empty((batch, t_out, c_out), dtype=out_dtype, device=waveforms.device)
    if t_out == 0 or batch == 0:
        return out
    grid = lambda meta: (triton.cdiv(c_out, meta["BLOCK_C"]), batch)
    _conv0_group_norm_gelu_kernel[grid](
        waveforms, weight, bias if bias is not None else out, norm_weight, norm_bias, frame_lengths, out,
        waveforms.stride(0), waveforms.stride(1), weight.stride(0), weight.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        length, c_out, t_out, eps, max(t_out - 1, 1).bit_length(),
        KSIZE=ksize, STRIDE=stride, HAS_BIAS=bias is not None,
    )
    return out


def conv0_group_norm_gelu_ref(waveforms, frame_lengths, weight, bias, norm_weight, norm_bias, stride, eps=1e-5,
                              out_dtype=None, compute_dtype=torch.float32):
    """The reference model's own ops: conv, masked_group_norm (float32 statistics), GELU."""
    y = F.conv1d(waveforms.to(compute_dtype)[:, None, :], weight.to(compute_dtype),
                 None if bias is None else bias.to(compute_dtype), stride)
    y = F.gelu(masked_group_norm(y, frame_lengths, norm_weight, norm_bias, eps))
    return y.transpose(1, 2).to(out_dtype or waveforms.dtype)
