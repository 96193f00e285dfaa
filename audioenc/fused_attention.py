"""Attention exported as one onnxruntime MultiHeadAttention op (com.microsoft), for graphs that only
onnxruntime runs (the onnx backend). Its CPU kernel runs flash attention (MLAS) when there is no mask
or bias, which is every Whisper window, and a fused per-head GEMM-softmax-GEMM otherwise; either way
the (B, H, T, T) scores never pass through separate graph ops. TensorRT and `audioenc export` keep
the standard-op graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from audioenc.models.layers import Attention

OP = "MultiHeadAttention"
DOMAIN = "com.microsoft"
SLOTS_ATTRIBUTE = "audioenc_slots"  # schema positions of the traced inputs; removed after export
KEY_PADDING_SLOT, ATTENTION_BIAS_SLOT = 4, 5


class MultiHeadAttentionOp(torch.autograd.Function):
    """SDPA on (B, T, D) projections that exports as MultiHeadAttention. ``extra`` is a (B, T) int32
    key-padding mask (1 = valid; schema slot 4) or an additive (B, H, T, T) bias (slot 5)."""

    @staticmethod
    def forward(ctx, q, k, v, num_heads: int, extra=None, slot: int = 0):
        batch, frames, dim = q.shape
        q, k, v = (t.view(batch, frames, num_heads, dim // num_heads).transpose(1, 2) for t in (q, k, v))
        if slot == KEY_PADDING_SLOT:
            bias = torch.zeros(extra.shape, dtype=q.dtype, device=q.device)
            extra = bias.masked_fill_(extra == 0, torch.finfo(q.dtype).min)[:, None, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=extra)
        return out.transpose(1, 2).reshape(batch, frames, dim)

    @staticmethod
    def symbolic(g, q, k, v, num_heads: int, extra=None, slot: int = 0):
        inputs, slots = [q, k, v], [0, 1, 2]
        if extra is not None:
            inputs.append(extra)
            slots.append(slot)
        # the reference masks with the lowest float; -10000 (the default) would differ for large scores
        out = g.op(f"{DOMAIN}::{OP}", *inputs, num_heads_i=num_heads,
                   mask_filter_value_f=torch.finfo(torch.float32).min, **{f"{SLOTS_ATTRIBUTE}_i": slots})
        out.setType(q.type())  # the output has the query's shape; without it the exporter warns per layer
        return out


def fused_sdpa(attention: Attention, q, k, v, bias):
    """Attention.sdpa through MultiHeadAttentionOp; ``bias`` as built by the models: None, a (B, 1, 1, T)
    key-padding bias, or a full (B, H, T, T) one (WavLM)."""
    if bias is None:
        return MultiHeadAttentionOp.apply(q, k, v, attention.num_heads)
    if bias.shape[1] == 1 and bias.shape[2] == 1:
        valid = (bias[:, 0, 0, :] == 0).to(torch.int32)
        return MultiHeadAttentionOp.apply(q, k, v, attention.num_heads, valid, KEY_PADDING_SLOT)
    return MultiHeadAttentionOp.apply(q, k, v, attention.num_heads, bias, ATTENTION_BIAS_SLOT)


def fuse_attention(model: nn.Module) -> None:
    """Routes every Attention of ``model`` (a copy made for export) through one fused op."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.sdpa = lambda q, k, v, bias, module=module: fused_sdpa(module, q, k, v, bias)


def place_optional_inputs(proto) -> None:
    """Moves each MultiHeadAttention input to its schema position (skipped optionals as ''), which
    the TorchScript exporter cannot express, and drops the bookkeeping attribute."""
    for node in proto.graph.node:
        if node.op_type != OP or node.domain != DOMAIN:
            continue
        slots = next(list(a.ints) for a in node.attribute if a.name == SLOTS_ATTRIBUTE)
        inputs = [""] * (max(slots) + 1)
        for slot, name in zip(slots, node.input):
            inputs[slot] = name
        del node.input[:]
        node.input.extend(inputs)
        kept = [a for a in node.attribute if a.name != SLOTS_ATTRIBUTE]
        del node.attribute[:]
        node.attribute.extend(kept)
