"""The modules that the ONNX export traces: a copy of a reference model with the parts that export
badly or run slowly in onnxruntime rewritten, giving the same numbers (tests/test_export.py).

- the wav2vec2 family's conv feature encoder as 2-D convs (onnxruntime's blocked direct convolution)
  or, for int8 graphs, as MatMuls over gathered taps, with a masked GroupNorm whose sums are MatMuls;
- WavLM's relative position bias gathered from a constant table instead of the bucket arithmetic;
- the graph's inputs and outputs (graph_io) and random, non-zero example inputs for tracing.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from audioenc.config import WhisperDims
from audioenc.models.wavlm import WavLMEncoder, relative_position_buckets


class TablePositionBias(nn.Module):
    """WavLM's (H, T, T) position bias from a constant table of the bias per relative distance.

    Every distance beyond max_distance falls in the last bucket, so clamping the distance to
    +-max_distance and gathering from a (2 * max_distance + 1, H) table is exact at any length,
    and the graph carries no bucket arithmetic (log, casts) at all.
    """

    def __init__(self, encoder: WavLMEncoder):
        super().__init__()
        dims = encoder.dims
        self.max_distance = dims.max_bucket_distance
        grid = relative_position_buckets(self.max_distance + 1, dims.num_buckets, self.max_distance)
        # grid[0, j] is the bucket of distance +j, grid[i, 0] of distance -i
        buckets = torch.cat([grid[1:, 0].flip(0), grid[0]])
        with torch.no_grad():
            table = encoder.layers[0].attention.rel_attn_embed(buckets)
        self.register_buffer("table", table.detach().clone())

    def forward(self, num_frames: int, device: torch.device) -> torch.Tensor:
        pos = torch.arange(num_frames, device=device)
        distance = (pos[None, :] - pos[:, None]).clamp(-self.max_distance, self.max_distance)
        return self.table[distance + self.max_distance].permute(2, 0, 1)


class ConvAsMatMul(nn.Module):
    """A Conv1d without padding on channel-last input, (B, T, C) -> (B, frames, out), as one MatMul
    over the gathered taps: exact, quantised by int8 dynamic quantisation, and run on the GEMM
    kernels (ORT's Conv is an im2col of its own and is not quantised dynamically)."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        out_dim, in_dim, k = conv.weight.shape
        self.kernel, self.stride = k, conv.stride[0]
        # (k * in_dim, out_dim), rows ordered as the gathered frames: tap-major, then channel
        self.weight = nn.Parameter(conv.weight.detach().permute(2, 1, 0).reshape(k * in_dim, out_dim).clone())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = (x.shape[1] - self.kernel) // self.stride + 1
        span = self.stride * (frames - 1) + 1
        taps = torch.cat([x[:, j : j + span : self.stride] for j in range(self.kernel)], dim=-1)
        y = taps @ self.weight
        return y if self.bias is None else y + self.bias


def masked_group_norm_channel_last(x: torch.Tensor, lengths: torch.Tensor, weight: torch.Tensor,
                                   bias: torch.Tensor, eps: float) -> torch.Tensor:
    """models.layers.masked_group_norm on (B, T, C): the masked sums over time are MatMuls with the
    (B, 1, T) valid-frame mask, so the statistics cost two reads of x instead of a chain of
    elementwise passes."""
    valid = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).to(x.dtype)[:, None, :]
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    centred = x - (valid @ x) / count
    var = (valid @ (centred * centred)) / count
    return centred * (torch.rsqrt(var + eps) * weight) + bias


def masked_group_norm_nchw(x: torch.Tensor, lengths: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float) -> torch.Tensor:
    """masked_group_norm_channel_last on (B, C, 1, T): the sums over time are MatMuls with the
    (B, 1, T, 1) valid-frame mask."""
    valid = (torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None]).to(x.dtype)[:, None, :, None]
    count = valid.sum(-2, keepdim=True).clamp(min=1)
    centred = x - (x @ valid) / count
    var = ((centred * centred) @ valid) / count
    return centred * (torch.rsqrt(var + eps) * weight[:, None, None]) + bias[:, None, None]


class Conv2dFeatureExtractor(nn.Module):
    """The conv feature encoder as 2-D convs of height 1 on (B, C, 1, T). onnxruntime's CPU provider
    runs them as its blocked-layout (NCHWc) direct convolution: no tap gathers, GELU kept in that
    layout, and a LayerNorm over channels reads channel-last data that the layout reorder writes
    anyway (the transposes around it fold into the reorders). Whole model on 10 s against
    ChannelLastFeatureExtractor: 1.18x for wav2vec2-base, 1.00-1.05x for wav2vec2-large-lv60 (its
    feature encoder alone: 1.2x); BENCHMARKS.md. Same numbers as FeatureExtractor."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.convs = nn.ModuleList(layer.conv for layer in extractor.conv_layers)  # not "layers": see graph_precision.layer_of
        self.norms = nn.ModuleList(layer.layer_norm if layer.norm_type else nn.Identity()
                                   for layer in extractor.conv_layers)
        self.norm_types = [layer.norm_type for layer in extractor.conv_layers]

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, samples), valid samples per item -> (B, frames, C), valid frames per item."""
        x = waveforms[:, None, None, :]
        for conv, norm, norm_type in zip(self.convs, self.norms, self.norm_types):
            kernel, stride = conv.kernel_size[0], conv.stride[0]
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
            x = nn.functional.conv2d(x, conv.weight[:, :, None, :], conv.bias, stride=(1, stride))
            if norm_type == "layer":
                x = nn.functional.gelu(norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
                continue
            if norm_type == "group":
                x = masked_group_norm_nchw(x, lengths, norm.weight, norm.bias, norm.eps)
            x = nn.functional.gelu(x)
        return x[:, :, 0].transpose(1, 2), lengths


class ChannelLastFeatureExtractor(nn.Module):
    """The conv feature encoder channel-last from the waveform to the feature projection, each conv
    a MatMul over gathered taps, for int8 graphs: dynamic quantisation quantises MatMuls, not Convs.
    Same numbers as FeatureExtractor."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.convs = nn.ModuleList(ConvAsMatMul(layer.conv) for layer in extractor.conv_layers)
        self.norms = nn.ModuleList(layer.layer_norm if layer.norm_type else nn.Identity()
                                   for layer in extractor.conv_layers)
        self.norm_types = [layer.norm_type for layer in extractor.conv_layers]

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, samples), valid samples per item -> (B, frames, C), valid frames per item."""
        x = waveforms[:, :, None]
        for conv, norm, norm_type in zip(self.convs, self.norms, self.norm_types):
            lengths = torch.div(lengths - conv.kernel, conv.stride, rounding_mode="floor") + 1
            x = conv(x)
            if norm_type == "group":
                x = masked_group_norm_channel_last(x, lengths, norm.weight, norm.bias, norm.eps)
            elif norm_type == "layer":
                x = norm(x)
            x = nn.functional.gelu(x)
        return x, lengths


class Wav2Vec2Graph(nn.Module):
    def __init__(self, model: nn.Module, num_layers: int, hidden_states: bool, convs_as_matmul: bool):
        super().__init__()
        extractor = ChannelLastFeatureExtractor if convs_as_matmul else Conv2dFeatureExtractor
        self.feature_extractor = extractor(model.feature_extractor)
        self.feature_projection, self.encoder = model.feature_projection, model.encoder
        if isinstance(self.encoder, WavLMEncoder):
            self.encoder.position_bias = TablePositionBias(self.encoder)
        self.num_layers, self.hidden_states = num_layers, hidden_states

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor):
        # Wav2Vec2Model.forward with the features already channel-last
        features, frame_lengths = self.feature_extractor(waveforms, lengths)
        out, hidden = self.encoder(self.feature_projection(features), frame_lengths, self.num_layers)
        return (out, frame_lengths, *hidden) if self.hidden_states else (out, frame_lengths)


class WhisperGraph(nn.Module):
    def __init__(self, model: nn.Module, num_layers: int, hidden_states: bool):
        super().__init__()
        self.model, self.num_layers, self.hidden_states = model, num_layers, hidden_states

    def forward(self, mel: torch.Tensor):
        out, hidden = self.model(mel, self.num_layers)
        return (out, *hidden) if self.hidden_states else (out,)


def graph_io(dims, num_layers: int, hidden_states: bool) -> tuple[list[str], list[str], dict]:
    """Input names, output names and dynamic axes of a family's graph."""
    hidden = [f"hidden_state_{i}" for i in range(num_layers + 1)] if hidden_states else []
    frames = {0: "batch", 1: "frames"}
    if isinstance(dims, WhisperDims):
        outputs = ["last_hidden_state", *hidden]
        return ["mel"], outputs, {"mel": {0: "batch"}, **{name: {0: "batch"} for name in outputs}}
    outputs = ["last_hidden_state", "frame_lengths", *hidden]
    axes = {"waveforms": {0: "batch", 1: "samples"}, "lengths": {0: "batch"}, "frame_lengths": {0: "batch"},
            "last_hidden_state": frames, **{name: frames for name in hidden}}
    return ["waveforms", "lengths"], outputs, axes


def example_inputs(dims, batch: int = 2, seconds: float = 1.0, seed: int = 0) -> dict[str, np.ndarray]:
    """Random, non-zero inputs for tracing and checks; wav2vec2 batches are padded (unequal lengths)."""
    rng = np.random.default_rng(seed)
    if isinstance(dims, WhisperDims):
        return {"mel": rng.uniform(-1, 1, (batch, dims.n_mels, 2 * dims.n_ctx)).astype(np.float32)}
    samples = max(int(seconds * 16000), dims.receptive_field + dims.hop)
    lengths = np.array([samples - (i * samples) // (2 * batch) for i in range(batch)], dtype=np.int64)
    waves = rng.standard_normal((batch, samples)).astype(np.float32)
    waves[np.arange(samples)[None, :] >= lengths[:, None]] = 0
    return {"waveforms": waves, "lengths": lengths}


def graph_module(model: nn.Module, num_layers: int, hidden_states: bool, convs_as_matmul: bool = False) -> nn.Module:
    """The module that torch.onnx.export traces: a copy of the reference with the conv feature
    encoder in the form that runs fastest (as MatMuls where ``convs_as_matmul``, for int8) and
    WavLM's position bias from a constant table (weight norm is already folded at load, dropout
    does not exist)."""
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in model.parameters()):
        raise ValueError("export takes the float32 reference model on the CPU")
    # Only the modules are copied, not the weights: the export changes modules, never weights, and a
    # second copy of whisper-large's would be 2.5 GB.
    model = copy.deepcopy(model, memo={id(t): t for t in [*model.parameters(), *model.buffers()]}).eval()
    if isinstance(model.dims, WhisperDims):
        return WhisperGraph(model, num_layers, hidden_states)
    return Wav2Vec2Graph(model, num_layers, hidden_states, convs_as_matmul)
