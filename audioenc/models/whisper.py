"""The Whisper encoder: log-mel (B, n_mels, 3000) -> frames (B, 1500, n_state).

Module names follow Hugging Face's WhisperEncoder, so canonical checkpoints load without renaming.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from audioenc.config import WhisperDims
from audioenc.models.layers import Attention, LayerNorm, embedding


def sinusoids(length: int, channels: int, max_timescale: float = 10000) -> torch.Tensor:
    """Whisper's fixed positional embedding (used when a checkpoint does not carry it)."""
    log_timescale_increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, dims: WhisperDims):
        super().__init__()
        self.self_attn = Attention(dims.n_state, dims.n_head, key_bias=False)
        self.self_attn_layer_norm = LayerNorm(dims.n_state, eps=dims.layer_norm_eps)
        self.fc1 = nn.Linear(dims.n_state, dims.n_ffn)
        self.fc2 = nn.Linear(dims.n_ffn, dims.n_state)
        self.final_layer_norm = LayerNorm(dims.n_state, eps=dims.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.self_attn_layer_norm(x))
        return x + self.fc2(F.gelu(self.fc1(self.final_layer_norm(x))))


class WhisperEncoder(nn.Module):
    def __init__(self, dims: WhisperDims):
        super().__init__()
        self.dims = dims
        self.conv1 = nn.Conv1d(dims.n_mels, dims.n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(dims.n_state, dims.n_state, kernel_size=3, stride=2, padding=1)
        self.embed_positions = embedding(dims.n_ctx, dims.n_state)
        if not self.embed_positions.weight.is_meta:  # built without memory, for a checkpoint to fill
            with torch.no_grad():
                self.embed_positions.weight.copy_(sinusoids(dims.n_ctx, dims.n_state))
        self.layers = nn.ModuleList(ResidualAttentionBlock(dims) for _ in range(dims.n_layer))
        self.layer_norm = LayerNorm(dims.n_state, eps=dims.layer_norm_eps)

    def forward(self, mel: torch.Tensor, num_layers: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """mel (B, n_mels, 2 * n_ctx) -> (output, hidden states). Hidden states in Hugging Face's
        convention: the input of layer 0, then each layer's output; when every layer ran, the last
        one and the output are after the final LayerNorm."""
        expected = 2 * self.dims.n_ctx
        if mel.shape[1:] != (self.dims.n_mels, expected):
            raise ValueError(f"Whisper encoder expects log-mel of shape (B, {self.dims.n_mels}, {expected}), "
                             f"got {tuple(mel.shape)}")
        return self.encode(mel, num_layers)

    def encode(self, mel: torch.Tensor, num_layers: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """forward for any number of mel frames (at most 2 * n_ctx), the positions cut to the
        frames: the ONNX export traces a short input."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        x = x + self.embed_positions.weight[: x.shape[1]].to(x.dtype)
        num_layers = self.dims.n_layer if num_layers is None else num_layers
        hidden_states = [x]
        for layer in self.layers[:num_layers]:
            x = layer(x)
            hidden_states.append(x)
        if num_layers == self.dims.n_layer:
            x = hidden_states[-1] = self.layer_norm(x)
        return x, hidden_states
