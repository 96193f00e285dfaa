"""The wav2vec2 family's positional conv embedding: a grouped Conv1d over time that keeps the
length, + bias, then exact GELU, channels-last.

``grouped_conv1d_gelu(x, weight, bias, groups)``: x (B, T, C); weight (C, C / groups, K) as
nn.Conv1d's; padding K // 2 with the last frame dropped for even K (as the models do), so the
output is (B, T, C) too. Each program computes a (frames x output channels) tile of one group as an
implicit matmul: one loop over (tap, input-channel chunk), each step a tl.dot of a shifted block of
input rows with that tap's weights. Base models have 48 channels per group (768 / 16), which is no
power of two: chunks of 16 input channels, and output tiles of 16, 32 or 64 channels (autotuned).

This exists because cuDNN's choice of algorithm for this conv proved fickle: an eager
wav2vec2-large forward ran it as 16 per-group kernels with layout conversions (3.5 ms, H200), where
its fast algorithm takes 0.7. The triton backend times both and keeps the faster per shape.

kernel -> launcher -> reference (``*_ref``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from audioenc.kernels.autotune import autotune, choose_configs
from audioenc.kernels.gelu import gelu


# Fits 99 KB of shared memory in float32 with 64 channels per group, where the others do not.
_SMALL = triton.Config({"BLOCK_T": 64, "BLOCK_N": 32}, num_warps=4, num_stages=2)


def _configs():
    # Output tiles of 16 or 32 channels fit base models' 48 per group with no masked-off quarter, at the
    # cost of reading the input rows two or three times (from L2).
    return choose_configs([triton.Config({"BLOCK_T": bt, "BLOCK_N": bn}, num_warps=w, num_stages=s)
                           for bt, bn, w, s in [(128, 64, 4, 4), (64, 64, 4, 4), (128, 64, 8, 3), (256, 64, 8, 3),
                                                (64, 64, 4, 6), (128, 16, 4, 4), (128, 32, 4, 4), (256, 32, 8, 3)]]
                          + [_SMALL], interpreted=triton.Config({"BLOCK_T": 128, "BLOCK_N": 64}, num_warps=4),
                          fallback=_SMALL)



@autotune(configs=_configs(), key=["GROUP_C", "KSIZE", "LOG2_T", "LOG2_BG"])
@triton.jit
def _grouped_conv1d_gelu_kernel(
    X, W, Bias, Out,
    stride_xb, stride_xt, stride_xc,
    stride_wo, stride_wi, stride_wk, stride_bias,
    stride_ob, stride_ot, stride_oc,
    T, GROUP_C,
    LOG2_T, LOG2_BG,  # autotune key only: frames, and batch x groups (the grid's other two sizes)
    KSIZE: tl.constexpr, PAD: tl.constexpr, CHUNKS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_t = tl.program_id(0)
    n_tiles = tl.cdiv(GROUP_C, BLOCK_N)
    group = tl.program_id(1) // n_tiles
    n0 = (tl.program_id(1) % n_tiles) * BLOCK_N
    b = tl.program_id(2).to(tl.int64)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = n0 + tl.arange(0, BLOCK_N)                 # output channels within the group
    mask_n = offs_n < GROUP_C
    offs_k = tl.arange(0, BLOCK_K)
    x_base = X + b * stride_xb + group * GROUP_C * stride_xc
    w_base = W + (group * GROUP_C + offs_n[None, :]) * stride_wo
    acc = tl.zeros([BLOCK_T, BLOCK_N], dtype=tl.float32)
    # One loop over (tap, chunk) rather than two nested ones: the compiler pipelines the inner loop
    # only, and 48 channels make three chunks, too few to pipeline.
    for step in range(0, KSIZE * CHUNKS):
        tap = step // CHUNKS
        offs_c = (step % CHUNKS) * BLOCK_K + offs_k
        mask_c = offs_c < GROUP_C
        src = offs_t + tap - PAD
        src_ok = (src >= 0) & (src < T)                 # zero padding at both ends
        x = tl.load(x_base + src[:, None] * stride_xt + offs_c[None, :] * stride_xc,
                    mask=src_ok[:, None] & mask_c[None, :], other=0.0)
        w = tl.load(w_base + offs_c[:, None] * stride_wi + tap * stride_wk,
                    mask=mask_c[:, None] & mask_n[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    acc += tl.load(Bias + (group * GROUP_C + offs_n) * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y = gelu(acc)
    tl.store(Out + b * stride_ob + offs_t[:, None] * stride_ot + (group * GROUP_C + offs_n[None, :]) * stride_oc,
             y.to(Out.dtype.element_ty), mask=(offs_t < T)[:, None] & mask_n[None, :])


def grouped_conv1d_gelu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, groups: int) -> torch.Tensor:
    """gelu(conv1d(x, weight, bias, padding=K // 2, groups=groups)) over the first T frames, channels-last.

    x: (B, T, C) with any strides; weight: (C, C // groups, K) with any strides (a (K, C // groups, C)
    memory layout loads best); bias: (C,). Returns (B, T, C) in x's dtype; float32 accumulation.
    """
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"grouped_conv1d_gelu: input dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"grouped_conv1d_gelu: x must be (B, T, C) channels-last, got {tuple(x.shape)}")
    batch, frames, channels = x.shape
    if groups < 1 or channels % groups:
        raise ValueError(f"grouped_conv1d_gelu: {channels} channels do not split into {groups} groups")
    group_c = channels // groups
    if weight.dim() != 3 or weight.shape[:2] != (channels, group_c):
        raise ValueError(f"grouped_conv1d_gelu: weight must be ({channels}, {group_c}, K), got {tuple(weight.shape)}")
    if bias.shape != (channels,):
        raise ValueError(f"grouped_conv1d_gelu: bias must be ({channels},), got {tuple(bias.shape)}")
    if weight.dtype != x.dtype or weight.device != x.device or bias.device != x.device:
        raise ValueError("grouped_conv1d_gelu: weight must have x's dtype, and weight and bias x's device")
    ksize = weight.shape[2]
    # Offsets within an item are int32: frames x channels below 2^31 (an hour of base-model frames
    # is 1.4e8), and an input whose strides would pass it there is read from a copy.
    if frames * channels >= 2**31:
        raise ValueError(f"grouped_conv1d_gelu: {frames} frames x {channels} channels pass 2^31 elements per item")
    if (frames + ksize) * max(x.stride(1), x.stride(2) * channels) >= 2**31:
        x = x.contiguous()
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if batch == 0 or frames == 0:
        return out
    # Chunks that divide the group's channels waste no loads: 64 for 64 or 128 channels, 16 for 48.
    block_k = 64 if group_c % 64 == 0 else 32 if group_c % 32 == 0 else 16
    grid = lambda meta: (triton.cdiv(frames, meta["BLOCK_T"]), groups * triton.cdiv(group_c, meta["BLOCK_N"]), batch)
    _grouped_conv1d_gelu_kernel[grid](
        x, weight, bias, out,
        x.stride(0), x.stride(1), x.stride(2),
        weight.stride(0), weight.stride(1), weight.stride(2), bias.stride(0),
        out.stride(0), out.stride(1), out.stride(2),
        frames, group_c, max(frames - 1, 1).bit_length(), (batch * groups - 1).bit_length(),
        KSIZE=ksize, PAD=ksize // 2, CHUNKS=triton.cdiv(group_c, block_k), IEEE=x.dtype == torch.float32,
        BLOCK_K=block_k,
    )
    return out


def grouped_conv1d_gelu_ref(x, weight, bias, groups, compute_dtype=torch.float32):
    """The reference model's ops (PositionalConvEmbedding) in compute_dtype, channels-last."""
    k = weight.shape[2]
    y = F.conv1d(x.to(compute_dtype).transpose(1, 2), weight.to(compute_dtype), bias.to(compute_dtype),
                 padding=k // 2, groups=groups)
    return F.gelu(y[..., : x.shape[1]]).transpose(1, 2).to(x.dtype)
