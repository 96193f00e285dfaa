"""wav2vec 2.0 and HuBERT (the same encoder; HuBERT may drop the projection LayerNorm).

Module names follow Hugging Face's base models, so canonical checkpoints load without renaming.
Padded batches are exact: every statistic (waveform normalisation upstream, conv GroupNorm) and
every attention uses only an item's own valid frames.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from audioenc.config import Wav2Vec2Dims
from audioenc.models.layers import (Attention, FeedForward, LayerNorm, key_padding_bias, masked_group_norm,
                                     valid_mask)


class ConvLayer(nn.Module):
    """Conv1d (no padding) + optional norm + GELU. The norm is called layer_norm in both variants,
    as in the checkpoints: a per-channel GroupNorm over time, or a LayerNorm over channels."""

    def __init__(self, dims: Wav2Vec2Dims, index: int):
        super().__init__()
        in_dim = dims.conv_dim[index - 1] if index > 0 else 1
        out_dim = dims.conv_dim[index]
        self.conv = nn.Conv1d(in_dim, out_dim, dims.conv_kernel[index], dims.conv_stride[index], bias=dims.conv_bias)
        self.norm_type = None
        if dims.feat_extract_norm == "layer":
            self.norm_type = "layer"
            self.layer_norm = LayerNorm(out_dim)
        elif index == 0:
            self.norm_type = "group"
            self.layer_norm = nn.GroupNorm(out_dim, out_dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        inputs, x = x, self.conv(x)
        if self.norm_type == "group":
            x = masked_group_norm(x, lengths, self.layer_norm.weight, self.layer_norm.bias, self.layer_norm.eps)
            x = x + group_norm_overflow(inputs, self.conv.weight, self.conv.bias).to(x.dtype)
        elif self.norm_type == "layer":
            x = self.layer_norm(x.transpose(1, 2)).transpose(1, 2)
        return F.gelu(x)


# Conv outputs below this keep a float32 sum of squared deviations finite over 8e7 frames (layer 0 has
# 3200 per second of audio: about 7 hours)
GROUP_NORM_LIMIT = 1e15


def group_norm_overflow(waveforms: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(B, 1, 1): NaN for items whose first conv's outputs may pass GROUP_NORM_LIMIT, 0 for the
    others. Their float32 variance over time would overflow to inf and normalise them to finite,
    wrong frames; NaN frames are reported by the encoder as an overflow instead. The bound, the
    largest sample times the largest sum of one channel's |weights|, takes one pass over the audio."""
    bound = waveforms.detach().flatten(1).abs().amax(1).float()[:, None, None] * \
        weight.detach().abs().sum(dim=(1, 2)).float().amax()
    if bias is not None:
        bound = bound + bias.detach().abs().float().amax()
    return torch.where(bound > GROUP_NORM_LIMIT, float("nan"), 0.0)


class FeatureExtractor(nn.Module):
    def __init__(self, dims: Wav2Vec2Dims):
        super().__init__()
        self.dims = dims
        self.conv_layers = nn.ModuleList(ConvLayer(dims, i) for i in range(len(dims.conv_dim)))

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, samples), valid samples per item -> (B, C, frames), valid frames per item."""
        x = waveforms[:, None, :]
        for layer in self.conv_layers:
            k, s = layer.conv.kernel_size[0], layer.conv.stride[0]
            lengths = torch.div(lengths - k, s, rounding_mode="floor") + 1
            x = layer(x, lengths)
        return x, lengths


class FeatureProjection(nn.Module):
    def __init__(self, dims: Wav2Vec2Dims):
        super().__init__()
        self.layer_norm = LayerNorm(dims.conv_dim[-1], eps=dims.layer_norm_eps) if dims.feat_proj_layer_norm else None
        self.projection = nn.Linear(dims.conv_dim[-1], dims.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layer_norm is not None:
            x = self.layer_norm(x)
        return self.projection(x)


class BatchNorm(nn.Module):
    """BatchNorm1d at inference, over (B, T, C): a per-channel affine from the running statistics.
    Its tensors are parameters, as the loaders and drawn_weights take them; the checkpoint's
    num_batches_tracked, a training counter, is dropped at load."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.running_mean = nn.Parameter(torch.zeros(channels))
        self.running_var = nn.Parameter(torch.ones(channels))
        self.eps = eps

    def scale_and_shift(self) -> tuple[torch.Tensor, torch.Tensor]:
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        return scale, self.bias - self.running_mean * scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale, shift = self.scale_and_shift()
        return x * scale + shift


class PositionalConvEmbedding(nn.Module):
    """Grouped conv over time (weight norm folded at load); even kernels drop the last frame.
    With conv_pos_batch_norm (mHuBERT-25Hz), a BatchNorm first and no weight norm."""

    def __init__(self, dims: Wav2Vec2Dims):
        super().__init__()
        k = dims.num_conv_pos_embeddings
        self.batch_norm = BatchNorm(dims.hidden_size) if dims.conv_pos_batch_norm else None
        self.conv = nn.Conv1d(dims.hidden_size, dims.hidden_size, k, padding=k // 2,
                              groups=dims.num_conv_pos_embedding_groups)
        self.remove_last = k % 2 == 0

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) with padded frames zero; valid: (B, T) bool."""
        if self.batch_norm is not None:
            # The norm's shift would make padded frames nonzero; zero them again, so that the conv sees
            # what an item alone sees past its end (its zero padding). transformers and fairseq do not,
            # so there an item's frames depend on the batch's padding (transformers#47739).
            x = self.batch_norm(x) * valid[..., None].to(x.dtype)
        y = self.conv(x.transpose(1, 2))
        if self.remove_last:
            y = y[..., :-1]
        return F.gelu(y).transpose(1, 2)


class AttentionAdapter(nn.Module):
    """MMS's adapter (config adapter_attn_dim), whose output a pre-LN layer adds to its own:
    Linear(ReLU(Linear(LayerNorm(x)))). Its LayerNorm has torch's default eps, not layer_norm_eps,
    as in transformers."""

    def __init__(self, dims: Wav2Vec2Dims):
        super().__init__()
        self.norm = LayerNorm(dims.hidden_size)
        self.linear_1 = nn.Linear(dims.hidden_size, dims.adapter_attn_dim)
        self.linear_2 = nn.Linear(dims.adapter_attn_dim, dims.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.relu(self.linear_1(self.norm(x))))


class EncoderLayer(nn.Module):
    """Post-LN (base models) or pre-LN ("stable layer norm": large and XLS-R models, MMS's with an
    adapter)."""

    def __init__(self, dims: Wav2Vec2Dims, attention: Attention):
        super().__init__()
        self.pre_norm = dims.do_stable_layer_norm
        self.attention = attention
        self.layer_norm = LayerNorm(dims.hidden_size, eps=dims.layer_norm_eps)
        self.feed_forward = FeedForward(dims.hidden_size, dims.intermediate_size)
        self.final_layer_norm = LayerNorm(dims.hidden_size, eps=dims.layer_norm_eps)
        # Wav2Vec2Dims.from_config sets adapter_attn_dim for pre-LN layers only
        self.adapter_layer = AttentionAdapter(dims) if dims.adapter_attn_dim is not None else None

    def attend(self, x: torch.Tensor, bias: torch.Tensor | None, position_bias: torch.Tensor | None) -> torch.Tensor:
        if position_bias is None:
            return self.attention(x, bias)
        return self.attention(x, bias, position_bias)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None,
                position_bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attend(self.layer_norm(x), bias, position_bias)
            x = x + self.feed_forward(self.final_layer_norm(x))
            return x if self.adapter_layer is None else x + self.adapter_layer(x)
        x = self.layer_norm(x + self.attend(x, bias, position_bias))
        return self.final_layer_norm(x + self.feed_forward(x))


class Encoder(nn.Module):
    def __init__(self, dims: Wav2Vec2Dims, make_attention=None):
        super().__init__()
        make_attention = make_attention or (lambda index: Attention(dims.hidden_size, dims.num_heads))
        self.pos_conv_embed = PositionalConvEmbedding(dims)
        self.layer_norm = LayerNorm(dims.hidden_size, eps=dims.layer_norm_eps)
        self.layers = nn.ModuleList(EncoderLayer(dims, make_attention(i)) for i in range(dims.num_layers))
        self.pre_norm = dims.do_stable_layer_norm

    def position_bias(self, num_frames: int, device: torch.device) -> torch.Tensor | None:
        """Bias shared by all layers, (H, T, T); None here, WavLM overrides it."""
        return None

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, num_layers: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Runs the first ``num_layers`` layers. Returns (output, hidden states): the hidden states in
        Hugging Face's convention, the input of layer 0 then each layer's output as it leaves the
        layer; the output is the last of them, after the final LayerNorm of pre-LN models when
        every layer ran."""
        frames = x.shape[1]
        valid = valid_mask(lengths, frames)
        x = x * valid[..., None].to(x.dtype)  # padding must not leak into valid frames via the pos conv
        x = x + self.pos_conv_embed(x, valid)
        if not self.pre_norm:
            x = self.layer_norm(x)
        bias = key_padding_bias(lengths, frames, x.dtype)
        position_bias = self.position_bias(frames, x.device)
        hidden_states = [x]
        for layer in self.layers[:num_layers]:
            x = layer(x, bias, position_bias)
            hidden_states.append(x)
        if self.pre_norm and num_layers == len(self.layers):
            x = self.layer_norm(x)
        return x, hidden_states


class Wav2Vec2Model(nn.Module):
    """Normalised waveform (B, samples) -> frames (B, T, hidden_size), 50 frames/s."""

    def __init__(self, dims: Wav2Vec2Dims):
        super().__init__()
        self.dims = dims
        self.feature_extractor = FeatureExtractor(dims)
        self.feature_projection = FeatureProjection(dims)
        self.encoder = self.make_encoder(dims)

    def make_encoder(self, dims: Wav2Vec2Dims) -> Encoder:
        return Encoder(dims)

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor,
                num_layers: int | None = None) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Returns (output, hidden states, valid frames per item); see Encoder.forward."""
        features, frame_lengths = self.feature_extractor(waveforms, lengths)
        x = self.feature_projection(features.transpose(1, 2))
        num_layers = self.dims.num_layers if num_layers is None else num_layers
        out, hidden_states = self.encoder(x, frame_lengths, num_layers)
        return out, hidden_states, frame_lengths
