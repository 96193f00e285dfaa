"""WavLM: the wav2vec 2.0 encoder with a gated relative position bias in every attention.

The bucketed bias is computed once per call from layer 0's embedding and shared by all layers; each
layer gates it per head and query frame from its own attention input.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from audioenc.config import Wav2Vec2Dims
from audioenc.models.layers import Attention, embedding
from audioenc.models.wav2vec2 import Encoder, Wav2Vec2Model


def bucket_of(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket of each key_pos - query_pos: half the buckets per sign, exact below num_buckets // 4,
    log-spaced up to max_distance, clamped to the last bucket (T5-style, as WavLM)."""
    half = num_buckets // 2
    buckets = (relative > 0).long() * half
    distance = relative.abs()
    max_exact = half // 2
    log_ratio = torch.log(distance.float().clamp(min=1) / max_exact) / math.log(max_distance / max_exact)
    large = (max_exact + log_ratio * (half - max_exact)).long().clamp(max=half - 1)
    return buckets + torch.where(distance < max_exact, distance, large)


def bias_per_distance(embedding: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """(2 * max_distance + 1, H): the bias of each key_pos - query_pos from -max_distance to
    +max_distance. Every longer distance falls in the last bucket of its sign, so clamping
    distances to +-max_distance and gathering from this is exact at any length."""
    relative = torch.arange(-max_distance, max_distance + 1, device=embedding.device)
    return embedding[bucket_of(relative, num_buckets, max_distance)]


def clamped_distances(num_frames: int, max_distance: int, device=None) -> torch.Tensor:
    """(T, T) key_pos - query_pos, clamped and shifted to index a bias_per_distance table."""
    pos = torch.arange(num_frames, device=device)
    return (pos[None, :] - pos[:, None]).clamp(-max_distance, max_distance) + max_distance


class WavLMAttention(Attention):
    def __init__(self, dims: Wav2Vec2Dims, has_relative_embedding: bool):
        super().__init__(dims.hidden_size, dims.num_heads)
        head_dim = dims.hidden_size // dims.num_heads
        self.gru_rel_pos_const = nn.Parameter(torch.ones(1, dims.num_heads, 1, 1))
        self.gru_rel_pos_linear = nn.Linear(head_dim, 8)
        if has_relative_embedding:
            self.rel_attn_embed = embedding(dims.num_buckets, dims.num_heads)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, position_bias: torch.Tensor) -> torch.Tensor:
        """position_bias (H, T, T) is gated per (item, head, query frame) by this layer's input."""
        gate_in = self.split_heads(x)                                   # (B, H, T, head_dim)
        proj = self.gru_rel_pos_linear(gate_in).unflatten(-1, (2, 4)).sum(-1)
        gate_a, gate_b = torch.sigmoid(proj.float()).chunk(2, dim=-1)  # (B, H, T, 1) each
        gate = gate_a * (gate_b * self.gru_rel_pos_const.float() - 1.0) + 2.0
        full = gate * position_bias.float()
        if bias is not None:
            full = full + bias.float()
        return super().forward(x, full.to(x.dtype))


class WavLMEncoder(Encoder):
    def __init__(self, dims: Wav2Vec2Dims):
        super().__init__(dims, make_attention=lambda i: WavLMAttention(dims, has_relative_embedding=i == 0))
        self.dims = dims

    def position_bias(self, num_frames: int, device: torch.device) -> torch.Tensor:
        """(H, T, T), gathered from the bias per distance: no (T, T) bucket arithmetic (logs) here or
        in exported graphs, where the table folds into a constant."""
        max_distance = self.dims.max_bucket_distance
        table = bias_per_distance(self.layers[0].attention.rel_attn_embed.weight, self.dims.num_buckets, max_distance)
        return table[clamped_distances(num_frames, max_distance, device)].permute(2, 0, 1)


class WavLMModel(Wav2Vec2Model):
    def make_encoder(self, dims: Wav2Vec2Dims) -> Encoder:
        return WavLMEncoder(dims)
