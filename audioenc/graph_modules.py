"""The modules that the ONNX export traces: a copy of a reference model with the parts that export
badly or run slowly in onnxruntime rewritten, giving the same numbers (tests/test_export.py).

- the wav2vec2 family's conv feature encoder as 2-D convs (onnxruntime's blocked direct convolution)
  or, for int8 graphs that quantise it, as MatMuls over gathered taps, with a masked GroupNorm whose
  sums are MatMuls;
  in onnxruntime's float32 and int8 graphs, a group-norm layer 0 folds into one per-item MatMul;
- wav2vec2's positional conv and Whisper's conv stem as 2-D convs (the same blocked convolution);
- the graph's inputs and outputs (graph_io) and random, non-zero example inputs for tracing.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from audioenc.config import WhisperDims
from audioenc.models.layers import valid_mask
from audioenc.models.wav2vec2 import group_norm_overflow


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
    valid = valid_mask(lengths, x.shape[1]).to(x.dtype)[:, None, :]
    count = valid.sum(-1, keepdim=True).clamp(min=1)
    centred = x - (valid @ x) / count
    var = (valid @ (centred * centred)) / count
    return centred * (torch.rsqrt(var + eps) * weight) + bias


def masked_group_norm_nchw(x: torch.Tensor, lengths: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                           eps: float) -> torch.Tensor:
    """masked_group_norm_channel_last on (B, C, 1, T): the sums over time are MatMuls with the
    (B, 1, T, 1) valid-frame mask."""
    valid = valid_mask(lengths, x.shape[-1]).to(x.dtype)[:, None, :, None]
    count = valid.sum(-2, keepdim=True).clamp(min=1)
    centred = x - (x @ valid) / count
    var = ((centred * centred) @ valid) / count
    return centred * (torch.rsqrt(var + eps) * weight[:, None, None]) + bias[:, None, None]


class FoldedGroupNormConv(nn.Module):
    """Layer 0 of a group-norm model, Conv1d(1, C, k, stride) then GroupNorm(C, C) over each item's
    valid frames, as one MatMul per item (without GELU): (B, samples) -> (B, frames, C) when
    ``channels_last``, else (B, C, frames).

    The conv is linear in its k taps p, so channel c's mean over time is w_c . mean(p) and its
    variance w_c^T cov(p) w_c: statistics of a k x k covariance instead of four passes over the
    (C, frames) output, the largest activation of the model. They are float64: a filter that rejects
    most of the signal's power (a high-pass on a hum) leaves a variance far below the terms of that
    sum. The normalisation then folds into per-item weights and a bias column (the conv's own bias
    cancels). onnxruntime graphs only: TensorRT has no float64, and to_half would cast it to fp16."""

    def __init__(self, conv: nn.Conv1d, norm: nn.GroupNorm, channels_last: bool):
        super().__init__()
        self.kernel, self.stride = conv.kernel_size[0], conv.stride[0]
        self.conv, self.norm, self.channels_last = conv, norm, channels_last

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """lengths: valid frames of the output per item."""
        frames = (waveforms.shape[1] - self.kernel) // self.stride + 1
        span = self.stride * (frames - 1) + 1
        columns = [waveforms[:, j : j + span : self.stride] for j in range(self.kernel)]
        taps = torch.stack(columns, dim=-1)                                      # (B, frames, k)
        valid = valid_mask(lengths, frames).to(torch.float64)[..., None]
        count = valid.sum(1, keepdim=True).clamp(min=1)
        exact = taps.to(torch.float64)
        mean = (exact * valid).sum(1, keepdim=True) / count                     # (B, 1, k)
        centred = (exact - mean) * valid
        # the taps stacked again as (B, k, frames), where a transpose of them would do: onnxruntime
        # 1.23 (Python 3.10's last) fuses a Transpose feeding a MatMul into a FusedMatMul, which has
        # no float64 kernel, and the session would not load (and this is as fast as that fusion)
        centred_t = torch.stack(columns, dim=1).to(torch.float64) - mean.transpose(1, 2)
        cov = (centred_t @ centred) / count              # (B, k, k); one side masked is enough
        w = self.conv.weight[:, 0, :].to(torch.float64)                          # (C, k)
        var = ((w @ cov) * w).sum(-1)                                            # (B, C)
        scale = torch.rsqrt(var + self.norm.eps) * self.norm.weight.to(torch.float64)
        weight = w * scale[..., None]                                            # (B, C, k)
        bias = self.norm.bias.to(torch.float64) - (weight * mean).sum(-1)        # (B, C)
        folded = torch.cat([weight, bias[..., None]], dim=-1).to(waveforms.dtype)  # (B, C, k + 1)
        taps = torch.cat([taps, torch.ones_like(taps[..., :1])], dim=-1)          # (B, frames, k + 1)
        if self.channels_last:
            return taps @ folded.transpose(1, 2)
        return folded @ taps.transpose(1, 2)


def split_first_layer(extractor: nn.Module, fold_first_norm: bool, channels_last: bool):
    """(a FoldedGroupNormConv of a group-norm layer 0 where ``fold_first_norm``, else None; the conv
    layers left to run one by one)."""
    layers = list(extractor.conv_layers)
    if fold_first_norm and layers[0].norm_type == "group":
        return FoldedGroupNormConv(layers[0].conv, layers[0].layer_norm, channels_last), layers[1:]
    return None, layers


class Conv2dFeatureExtractor(nn.Module):
    """The conv feature encoder as 2-D convs of height 1 on (B, C, 1, T). onnxruntime's CPU provider
    runs them as its blocked-layout (NCHWc) direct convolution: no tap gathers, GELU kept in that
    layout, and a LayerNorm over channels reads channel-last data that the layout reorder writes
    anyway (the transposes around it fold into the reorders). Whole model on 10 s against
    ChannelLastFeatureExtractor: 1.18x for wav2vec2-base, 1.00-1.05x for wav2vec2-large-lv60 (its
    feature encoder alone: 1.2x); BENCHMARKS.md. Same numbers as FeatureExtractor. With
    ``fold_first_norm``, a group-norm layer 0 is a FoldedGroupNormConv."""

    def __init__(self, extractor: nn.Module, fold_first_norm: bool = False):
        super().__init__()
        self.first, layers = split_first_layer(extractor, fold_first_norm, channels_last=False)
        self.convs = nn.ModuleList(layer.conv for layer in layers)  # not "layers": see graph_precision.layer_of
        self.norms = nn.ModuleList(layer.layer_norm if layer.norm_type else nn.Identity() for layer in layers)
        self.norm_types = [layer.norm_type for layer in layers]

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, samples), valid samples per item -> (B, frames, C), valid frames per item."""
        x = waveforms[:, None, None, :]
        if self.first is not None:
            lengths = torch.div(lengths - self.first.kernel, self.first.stride, rounding_mode="floor") + 1
            x = nn.functional.gelu(self.first(waveforms, lengths))[:, :, None, :]
        for conv, norm, norm_type in zip(self.convs, self.norms, self.norm_types):
            kernel, stride = conv.kernel_size[0], conv.stride[0]
            lengths = torch.div(lengths - kernel, stride, rounding_mode="floor") + 1
            x = nn.functional.conv2d(x, conv.weight[:, :, None, :], conv.bias, stride=(1, stride))
            if norm_type == "layer":
                x = nn.functional.gelu(norm(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
                continue
            if norm_type == "group":
                x = masked_group_norm_nchw(x, lengths, norm.weight, norm.bias, norm.eps)
                x = x + group_norm_overflow(waveforms, conv.weight, conv.bias).to(x.dtype)[..., None]
            x = nn.functional.gelu(x)
        return x[:, :, 0].transpose(1, 2), lengths


class ChannelLastFeatureExtractor(nn.Module):
    """The conv feature encoder channel-last from the waveform to the feature projection, each conv
    a MatMul over gathered taps, for int8 graphs: dynamic quantisation quantises MatMuls, not Convs.
    Same numbers as FeatureExtractor. With ``fold_first_norm``, a group-norm layer 0 is a
    FoldedGroupNormConv."""

    def __init__(self, extractor: nn.Module, fold_first_norm: bool = False):
        super().__init__()
        self.first, layers = split_first_layer(extractor, fold_first_norm, channels_last=True)
        self.convs = nn.ModuleList(ConvAsMatMul(layer.conv) for layer in layers)
        self.norms = nn.ModuleList(layer.layer_norm if layer.norm_type else nn.Identity() for layer in layers)
        self.norm_types = [layer.norm_type for layer in layers]

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, samples), valid samples per item -> (B, frames, C), valid frames per item."""
        x = waveforms[:, :, None]
        if self.first is not None:
            lengths = torch.div(lengths - self.first.kernel, self.first.stride, rounding_mode="floor") + 1
            x = nn.functional.gelu(self.first(waveforms, lengths))
        for conv, norm, norm_type in zip(self.convs, self.norms, self.norm_types):
            lengths = torch.div(lengths - conv.kernel, conv.stride, rounding_mode="floor") + 1
            x = conv(x)
            if norm_type == "group":
                x = masked_group_norm_channel_last(x, lengths, norm.weight, norm.bias, norm.eps)
                # (k * C_in, C_out) taps as nn.Conv1d's (C_out, k * C_in, 1): each channel's |weights| summed alike
                x = x + group_norm_overflow(waveforms, conv.weight.t()[:, :, None], conv.bias).to(x.dtype)
            elif norm_type == "layer":
                x = norm(x)
            x = nn.functional.gelu(x)
        return x, lengths


class Conv1dAs2d(nn.Module):
    """An nn.Conv1d as a 2-D conv of height 1, which onnxruntime's CPU provider runs as its
    blocked-layout (NCHWc) direct convolution. Against its 1-D conv: wav2vec2's positional conv (768
    channels, 16 groups, 128 taps) in 0.7x the time, Whisper's second conv (stride 2) in about 0.8x
    (BENCHMARKS.md, stop 38). Same numbers."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        return nn.functional.conv2d(x[:, :, None], conv.weight[:, :, None], conv.bias, stride=(1, conv.stride[0]),
                                    padding=(0, conv.padding[0]), groups=conv.groups)[:, :, 0]


class Wav2Vec2Graph(nn.Module):
    def __init__(self, model: nn.Module, num_layers: int, hidden_states: bool, convs_as_matmul: bool,
                 fold_first_norm: bool):
        super().__init__()
        extractor = ChannelLastFeatureExtractor if convs_as_matmul else Conv2dFeatureExtractor
        self.feature_extractor = extractor(model.feature_extractor, fold_first_norm)
        model.encoder.pos_conv_embed.conv = Conv1dAs2d(model.encoder.pos_conv_embed.conv)
        self.feature_projection, self.encoder = model.feature_projection, model.encoder
        self.num_layers, self.hidden_states = num_layers, hidden_states

    def forward(self, waveforms: torch.Tensor, lengths: torch.Tensor):
        # Wav2Vec2Model.forward with the features already channel-last
        features, frame_lengths = self.feature_extractor(waveforms, lengths)
        out, hidden = self.encoder(self.feature_projection(features), frame_lengths, self.num_layers)
        return (out, frame_lengths, *hidden) if self.hidden_states else (out, frame_lengths)


class WhisperGraph(nn.Module):
    """Traced on a short input (tracing runs the model, and a 30 s window of whisper-large-v3 took
    27 s of its 53 s export); the graph takes whole windows at run time."""

    def __init__(self, model: nn.Module, num_layers: int, hidden_states: bool):
        super().__init__()
        self.model, self.num_layers, self.hidden_states = model, num_layers, hidden_states

    def forward(self, mel: torch.Tensor):
        out, hidden = self.model.encode(mel, self.num_layers)
        return (out, *hidden) if self.hidden_states else (out,)


def graph_io(dims, num_layers: int, hidden_states: bool) -> tuple[list[str], list[str], dict]:
    """Input names, output names and dynamic axes of a family's graph."""
    hidden = [f"hidden_state_{i}" for i in range(num_layers + 1)] if hidden_states else []
    frames = {0: "batch", 1: "frames"}
    if isinstance(dims, WhisperDims):  # time is dynamic for the short trace; export_onnx pins it to a window
        outputs = ["last_hidden_state", *hidden]
        return ["mel"], outputs, {"mel": {0: "batch", 2: "mel_frames"}, **{name: frames for name in outputs}}
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


def trace_inputs(dims) -> tuple[torch.Tensor, ...]:
    """The inputs torch.onnx.export traces with: short ones, since tracing runs the model."""
    if isinstance(dims, WhisperDims):
        return (torch.from_numpy(example_inputs(dims)["mel"][..., :200]),)  # 2 s of mel frames
    return tuple(torch.from_numpy(v) for v in example_inputs(dims, seconds=0.5).values())


def graph_module(model: nn.Module, num_layers: int, hidden_states: bool, convs_as_matmul: bool = False,
                 fold_first_norm: bool = False) -> nn.Module:
    """The module that torch.onnx.export traces: a copy of the reference with the conv feature
    encoder in the form that runs fastest (as MatMuls where ``convs_as_matmul``, for int8; a
    group-norm layer 0 as one per-item MatMul where ``fold_first_norm``, for onnxruntime) and
    WavLM's position bias from a constant table (weight norm is already folded at load, dropout
    does not exist)."""
    if any(t.dtype != torch.float32 or t.device.type != "cpu" for t in model.parameters()):
        raise ValueError("export takes the float32 reference model on the CPU")
    # Only the modules are copied, not the weights: the export changes modules, never weights, and a
    # second copy of whisper-large's would be 2.5 GB.
    model = copy.deepcopy(model, memo={id(t): t for t in [*model.parameters(), *model.buffers()]}).eval()
    if isinstance(model.dims, WhisperDims):
        model.conv1, model.conv2 = Conv1dAs2d(model.conv1), Conv1dAs2d(model.conv2)
        return WhisperGraph(model, num_layers, hidden_states)
    return Wav2Vec2Graph(model, num_layers, hidden_states, convs_as_matmul, fold_first_norm)
