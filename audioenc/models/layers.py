"""Blocks shared by every family. Inference only: no dropout, masking or layer drop."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def embedding(num_embeddings: int, dim: int) -> nn.Embedding:
    """nn.Embedding, initialised as nn.Embedding does except on the meta device (a model built there
    for a checkpoint to fill), where normal_ would import torch's Python meta kernels: 150 MB."""
    weight = torch.empty(num_embeddings, dim)
    if not weight.is_meta:
        nn.init.normal_(weight)
    return nn.Embedding(num_embeddings, dim, _weight=weight)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the activation dtype (as openai-whisper does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


def valid_mask(lengths: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B, num_frames) bool: True on each item's first lengths[b] frames."""
    return torch.arange(num_frames, device=lengths.device)[None, :] < lengths[:, None]


def key_padding_bias(lengths: torch.Tensor, num_frames: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive attention bias (B, 1, 1, T): 0 for valid keys, the dtype's lowest value for padding.

    A finite value rather than -inf so a row can never become NaN.
    """
    valid = valid_mask(lengths, num_frames)
    bias = torch.zeros(valid.shape, dtype=dtype, device=lengths.device)
    bias.masked_fill_(~valid, torch.finfo(dtype).min)
    return bias[:, None, None, :]


class Attention(nn.Module):
    """Multi-head self-attention; q is scaled by head_dim ** -0.5 (inside SDPA)."""

    def __init__(self, dim: int, num_heads: int, key_bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim, bias=key_bias)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        batch, frames, dim = x.shape
        return x.view(batch, frames, self.num_heads, dim // self.num_heads).transpose(1, 2)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, T, D); bias: additive, broadcastable to (B, H, T, T) (padding mask and/or position bias)."""
        return self.out_proj(self.sdpa(self.q_proj(x), self.k_proj(x), self.v_proj(x), bias))

    def sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Scaled dot-product attention of (B, T, D) projections -> (B, T, D). An exported onnxruntime
        graph swaps it for one fused op (audioenc.fused_attention)."""
        out = F.scaled_dot_product_attention(self.split_heads(q), self.split_heads(k), self.split_heads(v), attn_mask=bias)
        return out.transpose(1, 2).flatten(2)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.intermediate_dense = nn.Linear(dim, hidden)
        self.output_dense = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output_dense(F.gelu(self.intermediate_dense(x)))


def masked_group_norm(x: torch.Tensor, lengths: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      eps: float = 1e-5) -> torch.Tensor:
    """GroupNorm with one group per channel, statistics over each item's first ``lengths[b]`` frames.

    x (B, C, T). With full lengths this equals nn.GroupNorm(C, C); with padding every item gets the
    statistics it would get alone. Statistics in float32.
    """
    # No padding: torch's fused kernel. An exported graph always takes the masked path, since a traced
    # branch would be frozen to the example's choice. (is_tracing is per thread: an export in another
    # thread does not change this one's path.)
    if not torch.jit.is_tracing() and bool((lengths == x.shape[-1]).all()):
        return F.group_norm(x.float(), x.shape[1], weight.float(), bias.float(), eps).to(x.dtype)
    valid = valid_mask(lengths, x.shape[-1]).to(torch.float32)[:, None, :]
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    xf = x.float()
    mean = (xf * valid).sum(-1, keepdim=True) / count
    var = (((xf - mean) * valid) ** 2).sum(-1, keepdim=True) / count
    out = (xf - mean) * torch.rsqrt(var + eps) * weight.float()[None, :, None] + bias.float()[None, :, None]
    return out.to(x.dtype)
