"""ONNX export of the reference models: one graph per family, checked, optionally in half precision
or int8, cached on disk under a key of everything that made it.

Graphs (opset 17, so LayerNorm stays one LayerNormalization op):
    wav2vec2 / HuBERT / WavLM: waveforms (B, samples) float32, lengths (B,) int64
                               -> last_hidden_state (B, frames, D), frame_lengths (B,) int64[, hidden_state_i]
    Whisper:                   mel (B, n_mels, 3000) float32 -> last_hidden_state (B, 1500, D)[, hidden_state_i]
Batch and time are dynamic (Whisper: batch only). hidden_state_0 .. hidden_state_N follow the
backend protocol (Hugging Face convention). A graph runs the first ``num_layers`` layers only.
"""
from __future__ import annotations

import copy
import errno
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from audioenc.cache import META_FILE, cache_root, mark_used
from audioenc.config import WhisperDims
from audioenc.fused_attention import fuse_attention, place_optional_inputs
from audioenc.models.wavlm import WavLMEncoder, relative_position_buckets

log = logging.getLogger(__name__)

OPSET = 17
DTYPES = ("float32", "float16", "int8")
# Training-only or random ops, data-dependent control flow, and exporter fallbacks to torch ops: none
# may appear in a deployable graph.
FORBIDDEN_OPS = frozenset({
    "Dropout", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
    "Multinomial", "If", "Loop", "Scan", "SequenceConstruct", "SequenceAt", "ATen", "PythonOp",
    "BatchNormalization", "Gradient",
})
FP16_MAX = 65504.0
FP16_HEADROOM = 4.0  # fail when an activation comes within this factor of the fp16 maximum
HALF_OPS = ("MatMul", "Gemm", "Conv")  # run in fp16 by the half-precision graph; everything else stays fp32
MODEL_FILE = "model.onnx"
PROTOBUF_LIMIT = 1 << 30  # larger graphs keep their weights in an external data file
QUANTIZE_MIN_ROWS = 64  # int8 MatMuls need a reduction at least this long to pay for quantising their input


# ---------------------------------------------------------------------------------------------------
# The graph modules


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
        self.convs = nn.ModuleList(layer.conv for layer in extractor.conv_layers)  # not "layers": see layer_of
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


# ---------------------------------------------------------------------------------------------------
# Export and checks


def export_onnx(model: nn.Module, path: str, num_layers: int | None = None, hidden_states: bool = True,
                opset: int = OPSET, fused_attention: bool = False, convs_as_matmul: bool = False) -> None:
    """Exports ``model`` (a float32 reference model) to ``path`` and checks the graph. With
    ``fused_attention`` each attention is one onnxruntime MultiHeadAttention op (onnxruntime only);
    ``convs_as_matmul`` writes the feature encoder's convs as MatMuls (for int8 quantisation)."""
    import onnx

    dims = model.dims
    num_layers = dims.num_layers if num_layers is None else num_layers
    if not 0 <= num_layers <= dims.num_layers:
        raise ValueError(f"num_layers must be between 0 and {dims.num_layers}, got {num_layers}")
    module = graph_module(model, num_layers, hidden_states, convs_as_matmul)
    if fused_attention:
        fuse_attention(module)
    inputs, outputs, axes = graph_io(dims, num_layers, hidden_states)
    args = tuple(torch.from_numpy(v) for v in example_inputs(dims, seconds=0.5).values())
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
        raw = os.path.join(tmp, "raw.onnx")
        with warnings.catch_warnings():
            # the tracer notes that shapes become constants; graph_io's dynamic axes keep them dynamic
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            # the TorchScript exporter is deprecated, but it is the one that writes opset 17 without onnxscript
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            torch.onnx.export(module, args, raw, dynamo=False, opset_version=opset, input_names=inputs,
                              output_names=outputs, dynamic_axes=axes, do_constant_folding=True,
                              custom_opsets={"com.microsoft": 1})
        proto = onnx.load(raw)
    place_optional_inputs(proto)
    save_onnx(proto, path)
    check_graph(path)


def save_onnx(proto, path: str) -> None:
    """Saves a graph, with its weights in ``path + '.data'`` when protobuf could not hold them."""
    import onnx

    # Summed per weight: protobuf cannot even measure a message past 2 GB (whisper-large's encoder).
    large = sum(weight.ByteSize() for weight in proto.graph.initializer) > PROTOBUF_LIMIT
    onnx.save_model(proto, path, save_as_external_data=large, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data")


def forbidden_ops(proto) -> list[str]:
    """Names of forbidden ops anywhere in the graph, subgraphs included."""
    found = []

    def walk(graph):
        for node in graph.node:
            if node.op_type in FORBIDDEN_OPS or node.domain not in ("", "ai.onnx", "com.microsoft"):
                found.append(f"{node.domain or 'ai.onnx'}::{node.op_type} ({node.name})")
            for attr in node.attribute:
                if attr.g.node:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(proto.graph)
    return found


def check_graph(path: str) -> None:
    """onnx.checker, full shape inference, opset and the forbidden-op walk; ValueError on any failure."""
    import onnx

    onnx.checker.check_model(path, full_check=True)  # full_check runs strict shape inference
    proto = onnx.load(path, load_external_data=False)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset < OPSET:
        raise ValueError(f"{path}: opset {opset} < {OPSET}")
    bad = forbidden_ops(proto)
    if bad:
        raise ValueError(f"{path}: forbidden ops in the graph: {', '.join(bad[:8])}")


# ---------------------------------------------------------------------------------------------------
# Half precision and int8


def to_half(proto):
    """Mixed half precision: MatMul, Gemm and Conv run in fp16 (weights stored in fp16, activations
    cast around them); LayerNorm, softmax, GELU and the residual stream stay fp32. Inputs and
    outputs stay fp32. Converts ``proto`` in place (a copy of whisper-large's would be 2.5 GB)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    half_inits: dict[str, str] = {}
    nodes = []
    for node in graph.node:
        if node.op_type not in HALF_OPS:
            nodes.append(node)
            continue
        for i, name in enumerate(node.input):
            if not name:
                continue
            if name in inits and inits[name].data_type == TensorProto.FLOAT:
                if name not in half_inits:
                    half = numpy_helper.from_array(numpy_helper.to_array(inits[name]).astype(np.float16), name + "_fp16")
                    graph.initializer.append(half)
                    half_inits[name] = half.name
                node.input[i] = half_inits[name]
            elif name not in inits:
                cast = f"{node.name or node.output[0]}_in{i}_fp16"
                nodes.append(helper.make_node("Cast", [name], [cast], to=TensorProto.FLOAT16, name=cast))
                node.input[i] = cast
        out = node.output[0]
        node.output[0] = out + "_fp16"
        nodes.append(node)
        nodes.append(helper.make_node("Cast", [node.output[0]], [out], to=TensorProto.FLOAT, name=out + "_fp32"))
    del graph.node[:]
    graph.node.extend(nodes)
    still_used = {name for node in graph.node for name in node.input}
    kept = [init for init in graph.initializer if init.name in still_used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    del graph.value_info[:]  # stale types; shape inference recomputes them
    return onnx.shape_inference.infer_shapes(proto)


def layer_of(name: str) -> str:
    """The encoder layer a node belongs to, from the exporter's scoped names ('/model/encoder/layers.3/...')."""
    match = re.search(r"layers\.(\d+)/", name)
    return f"layer {int(match.group(1))}" if match else "embeddings"


def half_activation_peaks(fp32_path: str, feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Max |value| entering or leaving the ops that the half graph runs in fp16, per encoder layer,
    measured on the fp32 graph (so an overflow shows as a large finite number, not inf)."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(fp32_path, load_external_data=False)  # weights past 2 GB cannot pass through protobuf
    init_names = {init.name for init in proto.graph.initializer}
    watched: dict[str, str] = {}
    for node in proto.graph.node:
        if node.op_type in HALF_OPS:
            for name in [*node.input, node.output[0]]:
                if name and name not in init_names:
                    watched.setdefault(name, layer_of(node.name))
    visible = {o.name for o in proto.graph.output} | {i.name for i in proto.graph.input}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in watched if n not in visible)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every value visible
    # Saved beside the graph, so that its external weights file (if any) resolves.
    watching = fp32_path + ".peaks.onnx"
    onnx.save_model(proto, watching)
    try:
        session = ort.InferenceSession(watching, options, providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs() if o.name in watched]
        values = session.run(names, feeds)
    finally:
        os.remove(watching)
    peaks: dict[str, float] = {}
    for name, value in zip(names, values):
        layer = watched[name]
        peaks[layer] = max(peaks.get(layer, 0.0), float(np.abs(value).max()))
    for name, value in feeds.items():
        if value.dtype == np.float32:
            peaks["embeddings"] = max(peaks.get("embeddings", 0.0), float(np.abs(value).max()))
    return peaks


def check_half_headroom(peaks: dict[str, float]) -> None:
    """ValueError when any layer's activations come within FP16_HEADROOM of the fp16 maximum."""
    limit = FP16_MAX / FP16_HEADROOM
    over = {layer: peak for layer, peak in peaks.items() if not peak < limit}
    if over:
        detail = ", ".join(f"{layer}: {peak:.3g}" for layer, peak in over.items())
        raise ValueError(f"float16 export would risk overflow: max |activation| within {FP16_HEADROOM:g}x of "
                         f"{FP16_MAX:g} ({detail}); use float32 or bfloat16")


def quantize_int8(fp32_path: str, path: str) -> None:
    """Dynamic int8 quantisation of the MatMul weights (per output channel); activations are
    quantised per call. ``fp32_path`` is exported with ``convs_as_matmul`` (build_graph does so),
    so the feature encoder's convs are MatMuls and are quantised too, except the first (its input
    is the waveform, its reduction only kernel-size long); the attention products (no constant
    weight), LayerNorm, softmax and GELU stay fp32."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    proto = onnx.load(fp32_path, load_external_data=False)
    rows = {init.name: init.dims[0] for init in proto.graph.initializer if len(init.dims) == 2}
    short = [node.name for node in proto.graph.node
             if node.op_type == "MatMul" and rows.get(node.input[1], QUANTIZE_MIN_ROWS) < QUANTIZE_MIN_ROWS]
    # int8 weights run on the u8 x s8 kernels. Without VNNI, x86 multiplies them with vpmaddubsw,
    # whose int16 pair sums saturate; 7-bit weights (reduce_range) keep every sum exact there.
    # The quantiser logs advice meant for static quantisation on the root logger; users would see it.
    advice = lambda record: "pre-processing before quantization" not in record.getMessage()
    logging.getLogger().addFilter(advice)
    try:
        quantize_dynamic(fp32_path, path, weight_type=QuantType.QInt8, per_channel=True,
                         reduce_range=int8_reduce_range(), op_types_to_quantize=["MatMul"], nodes_to_exclude=short,
                         use_external_data_format=os.path.exists(fp32_path + ".data"),
                         extra_options={"MatMulConstBOnly": True})
    finally:
        logging.getLogger().removeFilter(advice)
    proto = onnx.load(path, load_external_data=False)
    if quantize_before_gather(proto):
        onnx.save_model(proto, path)  # the weights stay where quantize_dynamic put them


def quantize_before_gather(proto) -> int:
    """Moves the activation quantisation of each conv-as-MatMul in front of its tap gather.

    quantize_dynamic quantises the gathered taps, k times the layer's input in fp32; quantising the
    input once and gathering uint8 moves a quarter of the bytes. The scale comes from the input's
    range instead of the taps', which cover all of it but the last k - 1 frames. Returns how many
    gathers were rewritten."""
    from onnx import helper

    graph_nodes = list(proto.graph.node)  # one wrapper per node, so id() identifies it below
    producer = {out: node for node in graph_nodes for out in node.output}
    uses: dict[str, int] = {}
    for node in graph_nodes:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    rewrites = {}  # id of a DynamicQuantizeLinear -> (its replacement, the node that makes the gathered input)
    for node in graph_nodes:
        concat = producer.get(node.input[0]) if node.op_type == "DynamicQuantizeLinear" else None
        if concat is None or concat.op_type != "Concat" or uses[concat.output[0]] != 1:
            continue
        slices = [producer.get(name) for name in concat.input]
        if not all(s is not None and s.op_type == "Slice" and uses[s.output[0]] == 1 for s in slices):
            continue
        if len({s.input[0] for s in slices}) != 1:
            continue
        source = slices[0].input[0]
        quantized = node.output[0] + "_source"
        new = helper.make_node("DynamicQuantizeLinear", [source], [quantized, *node.output[1:]], name=node.name + "_source")
        for s in slices:
            s.input[0] = quantized
        concat.output[0] = node.output[0]
        rewrites[id(node)] = (new, producer.get(source))
    if not rewrites:
        return 0
    after = {id(source): new for new, source in rewrites.values()}  # right where each input is made
    nodes = [new for new, source in rewrites.values() if source is None]  # inputs of the graph
    for node in graph_nodes:
        if id(node) not in rewrites:
            nodes.append(node)
        if id(node) in after:
            nodes.append(after[id(node)])
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    retyped = {name for node in graph_nodes if node.op_type == "Slice" for name in node.output}
    kept = [info for info in proto.graph.value_info if info.name not in retyped]  # the slices now carry uint8
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    return len(rewrites)


def int8_reduce_range() -> bool:
    """True on x86 CPUs without VNNI (AVX512-VNNI or AVX-VNNI), where int8 weights must keep to 7 bits."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return True
    return not {"avx512_vnni", "avx_vnni"} & set(flags)


# ---------------------------------------------------------------------------------------------------
# The on-disk cache


@dataclass(frozen=True)
class ExportSpec:
    """What an exported graph is made of, besides the weights."""

    num_layers: int
    hidden_states: bool = True
    dtype: str = "float32"
    opset: int = OPSET
    fused_attention: bool = False  # onnxruntime's MultiHeadAttention op: for the onnx backend only

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"export dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")


def weights_digest(model: nn.Module) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def code_digest() -> str:
    """Digest of the sources that define a graph (this file, the fused attention and the models), so a
    development checkout never reuses a graph exported by older code under the same version number."""
    from audioenc import fused_attention, models

    h = hashlib.blake2b(digest_size=16)
    sources = [__file__, fused_attention.__file__, *sorted(os.path.join(models.__path__[0], n) for n in os.listdir(models.__path__[0]) if n.endswith(".py"))]
    for path in sources:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def cache_key(model: nn.Module, spec: ExportSpec, weights: str | None = None) -> str:
    """Hash of the weights, dims, family, export options and the versions that shape the graph."""
    import onnx

    import audioenc

    fields = {
        "weights": weights or weights_digest(model),
        "dims": repr(model.dims),
        "family": model.dims.family,
        "spec": repr(spec),
        "audioenc": audioenc.__version__,
        "code": code_digest(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
    }
    if spec.dtype == "int8":
        import onnxruntime

        fields["onnxruntime"] = onnxruntime.__version__  # the quantiser's version shapes that graph
        fields["int8_reduce_range"] = int8_reduce_range()
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def entry_problem(entry: str, key: str) -> str | None:
    """None when the cache entry is complete and intact, else what is wrong with it."""
    try:
        with open(os.path.join(entry, META_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        return f"no readable {META_FILE} ({exc})"
    if meta.get("key") != key:
        return "its key does not match"
    for name, digest in meta.get("files", {}).items():
        path = os.path.join(entry, name)
        if not os.path.exists(path):
            return f"{name} is missing"
        if file_digest(path) != digest:
            return f"{name} does not match its checksum"
    if MODEL_FILE not in meta.get("files", {}):
        return f"{MODEL_FILE} is not recorded"
    return None


def check_disk_space(model: nn.Module, spec: ExportSpec, directory: str) -> None:
    """OSError (ENOSPC) unless ``directory``'s disk can hold the export at its peak: the float32
    weights once (the trace's files are gone before the graph is saved), half as much again while a
    float16 or int8 graph is made from the float32 one. A disk that fills up mid-trace leaves
    weights silently empty (the tracer's writer does not report it; onnx's checker then fails with a
    puzzling message), so this is checked first."""
    weights = sum(t.numel() * 4 for t in model.state_dict().values())
    needed = weights * (1.0 if spec.dtype == "float32" else 1.5) * 1.1 + (64 << 20)
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"not enough disk space for the ONNX export in {directory}: it needs about "
                                    f"{needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free (the cache's place is "
                                    "$AUDIOENC_CACHE; `audioenc cache --clear` empties it)")


def build_graph(model: nn.Module, spec: ExportSpec, directory: str) -> None:
    """Writes ``directory/model.onnx`` (+ .data) for ``spec``, with a progress bar on stderr (a
    whisper-large export takes minutes)."""
    import onnx
    from tqdm import tqdm

    check_disk_space(model, spec, directory)
    path = os.path.join(directory, MODEL_FILE)
    fp32 = path if spec.dtype == "float32" else os.path.join(directory, "fp32.onnx")
    layers = f"{spec.num_layers} layer{'' if spec.num_layers == 1 else 's'}"
    with tqdm(total=1 if spec.dtype == "float32" else 3, file=sys.stderr,
              desc=f"audioenc: exporting {model.dims.family} ({layers}, {spec.dtype}) to ONNX",
              bar_format="{desc}: {n}/{total} steps [{elapsed}]{postfix}") as bar:
        bar.set_postfix_str("tracing the float32 graph")
        export_onnx(model, fp32, spec.num_layers, spec.hidden_states, spec.opset, spec.fused_attention,
                    convs_as_matmul=spec.dtype == "int8")
        bar.update()
        if spec.dtype != "float32":
            if spec.dtype == "float16":
                bar.set_postfix_str("checking float16 headroom and converting")
                check_half_headroom(half_activation_peaks(fp32, example_inputs(model.dims)))
                save_onnx(to_half(onnx.load(fp32)), path)
            else:
                bar.set_postfix_str("quantising to int8")
                quantize_int8(fp32, path)
            bar.update()
            for name in os.listdir(directory):
                if name.startswith("fp32.onnx"):
                    os.remove(os.path.join(directory, name))
            bar.set_postfix_str("checking the graph")
            check_graph(path)
            bar.update()
        bar.set_postfix_str("done")


def cached_export(model: nn.Module, spec: ExportSpec, weights: str | None = None, rebuild_reason: str | None = None) -> str:
    """Path of the cached graph for (model, spec), exported first when missing, stale or corrupt.

    An entry is a directory named by the key, written under a temporary name and renamed into
    place, with a meta.json of file checksums checked before every use. ``rebuild_reason`` forces a
    rebuild (the caller found the entry unusable, e.g. onnxruntime refused it).
    """
    key = cache_key(model, spec, weights)
    root = os.path.join(cache_root(), "onnx")
    entry = os.path.join(root, key)
    if os.path.exists(entry):
        problem = rebuild_reason or entry_problem(entry, key)
        if problem is None:
            mark_used(entry)
            return os.path.join(entry, MODEL_FILE)
        warnings.warn(f"audioenc: cached ONNX graph {entry} is unusable ({problem}); rebuilding it", stacklevel=2)
    try:
        os.makedirs(root, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=root, prefix=".tmp-")
    except OSError as exc:  # e.g. a container's read-only home
        raise OSError(exc.errno, f"cannot write the ONNX graph cache in {root} ({exc.strerror}); set AUDIOENC_CACHE "
                                 "to a writable directory") from exc
    try:
        log.info("audioenc: first use of this model and depth (%s); its ONNX graph will be cached in %s", spec, entry)
        build_graph(model, spec, tmp)
        files = {name: file_digest(os.path.join(tmp, name)) for name in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump({"key": key, "spec": repr(spec), "family": model.dims.family, "files": files}, f, indent=1)
        if os.path.exists(entry):
            shutil.rmtree(entry)
        try:
            os.replace(tmp, entry)
        except OSError:  # another process put a complete entry there first
            if entry_problem(entry, key) is not None:
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return os.path.join(entry, MODEL_FILE)


def export_to_dir(model: nn.Module, spec: ExportSpec, out_dir: str, overwrite: bool = False) -> list[str]:
    """Exports to ``out_dir/model.onnx`` (+ .data), built in a temporary directory and moved into
    place; existing files are kept unless ``overwrite``. Returns the written paths."""
    os.makedirs(out_dir, exist_ok=True)
    target = os.path.join(out_dir, MODEL_FILE)
    if os.path.exists(target) and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite (--overwrite) to replace it")
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=".tmp-")
    try:
        build_graph(model, spec, tmp)
        if os.path.exists(target + ".data") and not os.path.exists(os.path.join(tmp, MODEL_FILE + ".data")):
            os.remove(target + ".data")  # a stale weights file of an earlier, larger export
        written = []
        for name in sorted(os.listdir(tmp), reverse=True):  # the .data file before the graph that needs it
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
            written.append(os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return written
