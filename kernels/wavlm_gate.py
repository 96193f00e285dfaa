"""WavLM's gate on the relative position bias, per (item, head, query frame), in one pass.

gate = sigmoid(a) * (sigmoid(b) * const[head] - 1) + 2, with (a, b) = weight @ x + bias, where x is
the head's slice of the layer's attention input at that frame and weight (2, head_dim) is the
Linear(head_dim, 8) of the checkpoint with its rows summed in fours. In torch that is a float32 copy
of the hidden states, a matmul and several small elementwise kernels per layer; here it reads the
half-precision hidden states once and writes the (B, H, T) gate that the attention kernel scales
the bias with.

kernel -> launcher (``wavlm_gate``) -> reference (``wavlm_gate_ref``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _wavlm_gate_kernel(
    X, W, Bias, Const, Out,
    stride_xb, stride_xt, stride_ob, stride_oh,
    seq_len, num_heads,
    HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)  # b * stride_xb can pass 2^31 on long batches
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    mask_t = offs_t < seq_len
    mask_d = offs_d < HEAD_DIM
    x = tl.load(X + b * stride_xb + offs_t[:, None] * stride_xt + h * HEAD_DIM + offs_d[None, :],
                mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    w_a = tl.load(W + offs_d, mask=mask_d, other=0.0)
    w_b = tl.load(W + HEAD_DIM + offs_d, mask=mask_d, other=0.0)
    a = tl.sum(x * w_a[None, :], 1) + tl.load(Bias)
    c = tl.sum(x * w_b[None, :], 1) + tl.load(Bias + 1)
    gate = tl.sigmoid(a) * (tl.sigmoid(c) * tl.load(Const + h) - 1.0) + 2.0
    tl.store(Out + b * stride_ob + h * stride_oh + offs_t, gate, mask=mask_t)


def fold_gate_linear(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear(head_dim, 8) viewed (2, 4) and summed == Linear(head_dim, 2) with summed rows:
    (2, head_dim) and (2,) float32."""
    return weight.detach().float().view(2, 4, -1).sum(1).contiguous(), bias.detach().float().view(2, 4).sum(1)


def wavlm_gate(x: torch.Tensor, num_heads: int, weight: torch.Tensor, bias: torch.Tensor,
               const: torch.Tensor) -> torch.Tensor:
    """The gate of every (item, head, frame): (B, H, T) float32.

    x: (B, T, H * head_dim) attention input, contiguous in its last dim, any float dtype;
    weight (2, head_dim), bias (2,), const (H,): float32 (``fold_gate_linear`` makes the first two).
    """
    if x.dim() != 3 or x.shape[-1] % num_heads:
        raise ValueError(f"wavlm_gate: x must be (B, T, H * head_dim) with H = {num_heads}, got {tuple(x.shape)}")
    batch, seq_len, dim = x.shape
    head_dim = dim // num_heads
    for name, t, shape in (("weight", weight, (2, head_dim)), ("bias", bias, (2,)), ("const", const, (num_heads,))):
        if t.shape != shape or t.dtype != torch.float32 or t.device != x.device or not t.is_contiguous():
            raise ValueError(f"wavlm_gate: {name} must be contiguous float32 of shape {shape} on {x.device}, got "
                             f"{t.dtype} {tuple(t.shape)} on {t.device}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty((batch, num_heads, seq_len), dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    block_t = 64
    _wavlm_gate_kernel[(triton.cdiv(seq_len, block_t), batch * num_heads)](
        x, weight, bias, const, out,
        x.stride(0), x.stride(1), out.stride(0), out.stride(1),
        seq_len, num_heads,
        HEAD_DIM=head_dim, BLOCK_T=block_t, BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out


def wavlm_gate_ref(x: torch.Tensor, num_heads: int, weight: torch.Tensor, bias: torch.Tensor,
                   const: torch.Tensor) -> torch.Tensor:
    batch, seq_len, dim = x.shape
    proj = torch.sigmoid(x.float().view(batch, seq_len, num_heads, -1) @ weight.t() + bias)  # (B, T, H, 2)
    gate_a, gate_b = proj.permute(0, 2, 1, 3).unbind(-1)                                     # (B, H, T)
    return gate_a * (gate_b * const.view(1, -1, 1) - 1.0) + 2.0
