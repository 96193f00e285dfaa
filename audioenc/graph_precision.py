"""The float16 and int8 forms of an exported float32 graph: mixed half precision (matrix products
in fp16, everything else in fp32) after a check of the activations' headroom, and dynamic int8
quantisation of the MatMul weights.
"""
from __future__ import annotations

import os
import platform
import re

import numpy as np

from audioenc.cpu import VNNI_FLAGS, cpu_flags

FP16_MAX = 65504.0
FP16_HEADROOM = 4.0  # fail when an activation comes within this factor of the fp16 maximum
HALF_OPS = ("MatMul", "Gemm", "Conv")  # run in fp16 by the half-precision graph; everything else stays fp32
QUANTIZE_MIN_ROWS = 64  # int8 MatMuls need a reduction at least this long to pay for quantising their input
# An input whose largest channel peak is this many times its median channel's peak (measured at export
# on the model's own weights) has outlier channels, as trained encoders' LayerNorm outputs and fc2 inputs
# do: one int8 scale per call would leave its ordinary channels a few steps. (Random weights: 6-12;
# emulated outliers: 36 and up. max / RMS tells them apart less well: the outliers inflate the RMS too.)
OUTLIER_RATIO = 20.0
SMOOTH_ALPHA = 0.5  # SmoothQuant's migration strength: the outlier range is split evenly between input and weight


def to_half(fp32_path: str):
    """Mixed half precision: MatMul, Gemm and Conv run in fp16 (weights stored in fp16, activations
    cast around them); LayerNorm, softmax, GELU and the residual stream stay fp32. Inputs and
    outputs stay fp32. Returns the graph of ``fp32_path`` converted. Its float weights are read one
    at a time as they are converted, never into the graph (protobuf would keep their bytes until the
    whole graph is freed: whisper-large-v3's are 2.5 GB), and shapes are inferred before the fp16
    weights' values are filled in, so no copy of them is made."""
    import onnx
    from onnx import TensorProto, helper
    from onnx.external_data_helper import load_external_data_for_model

    folder = os.path.dirname(fp32_path)
    proto = onnx.load(fp32_path, load_external_data=False)
    graph = proto.graph
    inits = {init.name: init for init in graph.initializer}
    half_inits: dict[str, str] = {}  # float32 name -> fp16 name
    nodes = []
    for node in graph.node:
        if node.op_type not in HALF_OPS:
            nodes.append(node)
            continue
        for i, name in enumerate(node.input):
            if not name:
                continue
            if name in inits and inits[name].data_type == TensorProto.FLOAT:
                if name not in half_inits:  # values filled in below
                    graph.initializer.append(TensorProto(name=name + "_fp16", data_type=TensorProto.FLOAT16,
                                                         dims=inits[name].dims))
                    half_inits[name] = name + "_fp16"
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
    proto = onnx.shape_inference.infer_shapes(proto)
    halves = {init.name: init for init in proto.graph.initializer}
    for name, half in half_inits.items():
        halves[half].raw_data = float_weight(inits[name], folder).astype("<f2").tobytes()
    load_external_data_for_model(proto, folder)  # the weights that stay float32
    return proto


def layer_of(name: str) -> str:
    """The encoder layer a node belongs to, from the exporter's scoped names ('/model/encoder/layers.3/...')."""
    match = re.search(r"layers\.(\d+)/", name)
    return f"layer {int(match.group(1))}" if match else "embeddings"


def half_op_activations(proto) -> dict[str, str]:
    """name -> encoder layer of every activation (not weight) entering or leaving a HALF_OPS node."""
    init_names = {init.name for init in proto.graph.initializer}
    watched: dict[str, str] = {}
    for node in proto.graph.node:
        if node.op_type in HALF_OPS:
            for name in [*node.input, node.output[0]]:
                if name and name not in init_names:
                    watched.setdefault(name, layer_of(node.name))
    return watched


def half_activation_peaks(fp32_path: str, feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """Max |value| entering or leaving the ops that the half graph runs in fp16, per encoder layer,
    measured on the fp32 graph (so an overflow shows as a large finite number, not inf)."""
    import onnx
    from onnx import helper

    proto = onnx.load(fp32_path, load_external_data=False)  # weights past 2 GB cannot pass through protobuf
    watched = half_op_activations(proto)

    def peak(name, prefix):
        return [helper.make_node("Abs", [name], [prefix + "abs"], name=prefix + "abs"),
                helper.make_node("ReduceMax", [prefix + "abs"], [prefix + "max"], name=prefix + "max", keepdims=0)]

    peaks: dict[str, float] = {}
    for name, value in reduced_activations(proto, fp32_path, watched, peak, feeds):
        peaks[watched[name]] = max(peaks.get(watched[name], 0.0), float(value))
    for name, value in feeds.items():
        if value.dtype == np.float32:
            peaks["embeddings"] = max(peaks.get("embeddings", 0.0), float(np.abs(value).max()))
    return peaks


def matmul_channel_peaks(fp32_path: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """activation -> max |value| of each channel, for the inputs of the MatMuls that int8 quantises,
    measured on the fp32 graph."""
    import onnx
    from onnx import helper, numpy_helper

    proto = onnx.load(fp32_path, load_external_data=False)
    channels = {node.input[0]: int(weight.dims[0]) for node, weight in quantizable_matmuls(proto)}

    def peak_per_channel(name, prefix):
        shape = numpy_helper.from_array(np.array([-1, channels[name]], np.int64))
        return [helper.make_node("Constant", [], [prefix + "shape"], value=shape, name=prefix + "shape"),
                helper.make_node("Reshape", [name, prefix + "shape"], [prefix + "rows"], name=prefix + "rows"),
                helper.make_node("Abs", [prefix + "rows"], [prefix + "abs"], name=prefix + "abs"),
                helper.make_node("ReduceMax", [prefix + "abs"], [prefix + "max"], axes=[0], keepdims=0,
                                 name=prefix + "max")]

    return dict(reduced_activations(proto, fp32_path, channels, peak_per_channel, feeds))


def reduced_activations(proto, fp32_path: str, watched, reduce,
                        feeds: dict[str, np.ndarray]) -> list[tuple[str, np.ndarray]]:
    """Runs the graph ``proto`` (loaded from ``fp32_path`` without its weights) on ``feeds`` and returns
    (name, reduce's output) for each activation in ``watched``. ``reduce(name, prefix)`` gives the nodes
    that reduce it, whose last output is prefix + "max". Each reduction runs inside the graph right after
    the node that makes its activation, and only the reductions are outputs, so activations are freed
    as the run goes: as outputs, or reduced at the end, whisper-large-v3's attention matrices would
    take over 20 GB."""
    import onnx
    import onnxruntime as ort

    names: list[str] = []

    def reduced(name):
        prefix = f"reduced/{len(names)}_"
        names.append(name)
        return reduce(name, prefix)

    nodes = [n for name in (i.name for i in proto.graph.input) if name in watched for n in reduced(name)]
    for node in proto.graph.node:
        nodes.append(node)
        nodes.extend(n for name in node.output if name in watched for n in reduced(name))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    outputs = [f"reduced/{i}_max" for i in range(len(names))]
    proto.graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
    # Saved beside the graph, so that its external weights file (if any) resolves.
    watching = fp32_path + ".reduced.onnx"
    onnx.save_model(proto, watching)
    try:
        options = ort.SessionOptions()
        # onnxruntime's default order would run the reductions last, after every other node
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        session = ort.InferenceSession(watching, options, providers=["CPUExecutionProvider"])
        values = session.run(outputs, feeds)
    finally:
        os.remove(watching)
    return list(zip(names, values))


def outlier_ratio(peaks: np.ndarray) -> float:
    """Largest channel peak over the median channel's."""
    median = float(np.median(peaks))
    return float(peaks.max() / median) if median > 0 else 0.0


def smoothing_scales(proto, peaks: dict[str, np.ndarray], folder: str = "") -> dict[str, np.ndarray]:
    """activation -> SmoothQuant per-channel scales s for each quantised input with outlier channels:
    the graph quantises x / s and multiplies by s * W, the same product in float, with the outliers'
    range moved from the activation scales (one per call, or per block of frames: quantized_convs)
    into the per-channel weight scales. An input whose weights another input shares is left alone.
    The taps a conv-as-MatMul gathers share their source channel's scale, so that the source is
    scaled once, before the gather (smooth_inputs)."""
    weight_rows: dict[str, np.ndarray] = {}  # input -> max |weight| per input channel, over its MatMuls
    inputs_of: dict[str, set] = {}
    for node, weight in quantizable_matmuls(proto):
        x = node.input[0]
        if x in peaks and outlier_ratio(peaks[x]) > OUTLIER_RATIO:
            weight_rows[x] = np.maximum(weight_rows.get(x, 0.0), np.abs(float_weight(weight, folder)).max(axis=1))
        inputs_of.setdefault(weight.name, set()).add(x)
    shared = {x for xs in inputs_of.values() if len(xs) > 1 for x in xs}
    producer = {out: node for node in proto.graph.node for out in node.output}
    scales = {}
    for x, w in weight_rows.items():
        if x in shared:
            continue
        taps = len(gathered_taps(producer, x)[1]) or 1  # rows ordered tap-major, then channel
        peak = peaks[x].reshape(taps, -1).max(axis=0).astype(np.float64)
        w = w.reshape(taps, -1).max(axis=0).astype(np.float64)
        # a channel quiet on the example input may not be on speech: floored, its x / s grows at most ~3x
        peak = np.maximum(peak, 0.1 * np.median(peak))
        s = peak ** SMOOTH_ALPHA / np.maximum(w, 1e-5) ** (1 - SMOOTH_ALPHA)
        scales[x] = np.tile(s / np.exp(np.log(s).mean()), taps).astype(np.float32)  # geometric mean 1
    return scales


def gathered_taps(producer: dict, x: str) -> tuple[str | None, list]:
    """(source, slices) when ``x`` is a conv-as-MatMul's gathered taps, a Concat of Slices of one
    source (graph_modules writes them so), else (None, [])."""
    concat = producer.get(x)
    if concat is None or concat.op_type != "Concat":
        return None, []
    slices = [producer.get(name) for name in concat.input]
    if not all(s is not None and s.op_type == "Slice" for s in slices) or len({s.input[0] for s in slices}) != 1:
        return None, []
    return slices[0].input[0], slices


def smooth_inputs(proto, scales: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Divides each input in ``scales`` by its scales, right after the node that makes it, for the
    quantised MatMuls that read it (its other readers keep it as it is); gathered taps are divided at
    their source, which quantize_before_gather or quantized_convs then quantises once. Returns weight
    name -> the factors its rows are multiplied by (quantize_matmuls, quantize_convs)."""
    from onnx import helper, numpy_helper

    graph_nodes = list(proto.graph.node)  # one wrapper per node, so id() identifies it below
    producer = {out: node for node in graph_nodes for out in node.output}
    readers = {}  # input -> its quantised MatMuls
    for node, weight in quantizable_matmuls(proto):
        readers.setdefault(node.input[0], []).append((node, weight))
    after: dict[int | None, list] = {}  # id of the node making a tensor (None: a graph input) -> its Mul
    row_factors = {}
    for x, s in scales.items():
        source, slices = gathered_taps(producer, x)
        tensor, factor = (source, s[: len(s) // len(slices)]) if source else (x, s)
        smoothed = tensor + "_smoothed"
        proto.graph.initializer.append(numpy_helper.from_array((1 / factor).astype(np.float32), smoothed + "_by"))
        made_by = producer.get(tensor)
        after.setdefault(id(made_by) if made_by is not None else None, []).append(
            helper.make_node("Mul", [tensor, smoothed + "_by"], [smoothed], name=smoothed))
        for reader in slices if source else [node for node, _ in readers[x]]:
            reader.input[0] = smoothed
        row_factors.update((weight.name, s) for _, weight in readers[x])
    nodes = list(after.get(None, []))
    for node in graph_nodes:
        nodes.append(node)
        nodes.extend(after.get(id(node), []))
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return row_factors


def quantizable_matmuls(proto):
    """(node, weight) of each MatMul that quantize_matmuls rewrites: a constant 2-D float weight of at
    least QUANTIZE_MIN_ROWS rows that only MatMuls multiply by."""
    from onnx import TensorProto

    other_uses = {name for node in proto.graph.node for i, name in enumerate(node.input)
                  if node.op_type != "MatMul" or i != 1}
    weights = {init.name: init for init in proto.graph.initializer if init.name not in other_uses}
    for node in proto.graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if (weight is not None and len(weight.dims) == 2 and weight.dims[0] >= QUANTIZE_MIN_ROWS
                and weight.data_type == TensorProto.FLOAT):
            yield node, weight


def check_half_headroom(peaks: dict[str, float]) -> None:
    """ValueError when any layer's activations come within FP16_HEADROOM of the fp16 maximum."""
    limit = FP16_MAX / FP16_HEADROOM
    over = {layer: peak for layer, peak in peaks.items() if not peak < limit}
    if over:
        detail = ", ".join(f"{layer}: {peak:.3g}" for layer, peak in over.items())
        raise ValueError(f"float16 export would risk overflow: max |activation| within {FP16_HEADROOM:g}x of "
                         f"{FP16_MAX:g} ({detail}); use float32 (or bfloat16 on the torch or triton backend)")


def quantize_int8(fp32_path: str, path: str, external: bool = False,
                  feeds: dict[str, np.ndarray] | None = None, convs_per_block: bool = False) -> None:
    """Dynamic int8 quantisation of the MatMul weights (per output channel); activations are
    quantised per call. With ``feeds`` (example inputs), the fp32 graph runs once to find the inputs
    with outlier channels, which are smoothed first (smoothing_scales). Where ``fp32_path`` is
    exported with ``convs_as_matmul`` (build_graph does so for int8), the feature encoder's convs are
    MatMuls and are quantised too, except the first (its input is the waveform, its reduction only
    kernel-size long): with one activation scale per call, or where ``convs_per_block``, with a scale
    per block of frames (quantized_convs). The attention products (no constant weight), LayerNorm,
    softmax and GELU stay fp32.
    ``external``: as save_onnx takes it."""
    import onnx
    from onnx.external_data_helper import load_external_data_for_model

    from audioenc.export import save_onnx
    from audioenc.quantized_convs import quantize_convs

    # Float weights are read one at a time as they are quantised (whisper-large-v3's are 2.5 GB);
    # what stays float32 (norms, biases, the first conv) is read afterwards.
    folder = os.path.dirname(fp32_path)
    # The inferred shapes let onnxruntime fuse more (e.g. residual add + LayerNorm), as
    # quantize_dynamic's graphs do; inference needs the weights' shapes only.
    proto = onnx.shape_inference.infer_shapes(onnx.load(fp32_path, load_external_data=False))
    row_factors = {}
    if feeds is not None:
        row_factors = smooth_inputs(proto, smoothing_scales(proto, matmul_channel_peaks(fp32_path, feeds), folder))
    reduce_range = int8_reduce_range()
    if convs_per_block:
        quantize_convs(proto, reduce_range, folder, row_factors)
    quantize_matmuls(proto, reduce_range, folder, row_factors)
    load_external_data_for_model(proto, folder)
    quantize_before_gather(proto)
    save_onnx(proto, path, external)


def quantize_matmuls(proto, reduce_range: bool, folder: str = "", row_factors: dict | None = None) -> int:
    """Rewrites each MatMul with a constant 2-D float weight of at least QUANTIZE_MIN_ROWS rows as
    DynamicQuantizeLinear (once per input) -> MatMulInteger -> Cast -> Mul by both scales: the graph
    onnxruntime's quantize_dynamic writes (per-channel symmetric int8 weights), which its session
    fuses into MatMulIntegerToFloat / DynamicQuantizeMatMul. Done here one weight at a time, float
    weights stored outside the graph file read straight from it, never into the graph (protobuf
    would keep their bytes until the whole graph is freed): quantize_dynamic holds about three
    copies of the model (whisper-large-v3: 13 GB). Returns how many MatMuls were rewritten.

    reduce_range: 7-bit weights. int8 weights run on the u8 x s8 kernels; without VNNI, x86
    multiplies them with vpmaddubsw, whose int16 pair sums saturate, and 7 bits keep every sum exact.
    folder: where weights stored outside the graph file are, read as each is quantised.
    row_factors: weight name -> factors its rows are multiplied by first (smooth_inputs).
    """
    from onnx import TensorProto, helper, numpy_helper

    row_factors = row_factors or {}
    weights = {weight.name: weight for _, weight in quantizable_matmuls(proto)}
    limit = 64 if reduce_range else 127  # quantize_dynamic's symmetric ranges: [-64, 64], [-127, 127]
    quantized_weights: dict[str, tuple[str, str, str]] = {}  # float name -> int8, scale, zero point
    quantized_inputs: dict[str, tuple[str, str, str]] = {}  # activation -> uint8, scale, zero point
    nodes, rewritten = [], 0
    for node in proto.graph.node:
        weight = weights.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None:
            nodes.append(node)
            continue
        x = node.input[0]
        if weight.name not in quantized_weights:
            w = float_weight(weight, folder)
            if weight.name in row_factors:
                w = w * row_factors[weight.name][:, None]
            q, scale = quantize_weight(w, limit)
            names = (weight.name + "_quantized", weight.name + "_scale", weight.name + "_zero_point")
            proto.graph.initializer.extend([numpy_helper.from_array(q, names[0]), numpy_helper.from_array(scale, names[1]),
                                            numpy_helper.from_array(np.zeros_like(q[0]), names[2])])
            quantized_weights[weight.name] = names
        if x not in quantized_inputs:  # right before its first use: the input exists by then
            quantized_inputs[x] = (x + "_quantized", x + "_scale", x + "_zero_point")
            nodes.append(helper.make_node("DynamicQuantizeLinear", [x], list(quantized_inputs[x]),
                                          name=x + "_QuantizeLinear"))
        xq, x_scale, x_zero = quantized_inputs[x]
        wq, w_scale, w_zero = quantized_weights[weight.name]
        out, base = node.output[0], node.name or node.output[0]
        nodes += [helper.make_node("Mul", [x_scale, w_scale], [base + "_quant_scales_mul:0"], name=base + "_scales_mul"),
                  helper.make_node("MatMulInteger", [xq, wq, x_zero, w_zero], [out + "_output_quantized"],
                                   name=base + "_quant"),
                  helper.make_node("Cast", [out + "_output_quantized"], [out + "_output_quantized_cast_output"],
                                   to=TensorProto.FLOAT, name=base + "_cast"),
                  helper.make_node("Mul", [out + "_output_quantized_cast_output", base + "_quant_scales_mul:0"], [out],
                                   name=base + "_output_scale_mul")]
        rewritten += 1
    kept = [init for init in proto.graph.initializer if init.name not in quantized_weights]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return rewritten


def quantize_weight(w: np.ndarray, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """(int8 weight, float32 scale per column): symmetric, each column's peak at ``limit``. The range
    and the steps are float64, then float32: quantize_dynamic's scales, bit for bit."""
    scale = (2 * np.abs(w).max(axis=0).astype(np.float64) / (2 * limit)).astype(np.float32)
    scale[scale < np.finfo(np.float32).tiny] = 1.0  # an all-zero column
    return np.clip(np.round(w / scale), -128, 127).astype(np.int8), scale


def float_weight(tensor, folder: str) -> np.ndarray:
    """A float32 initializer's values, read from its external data file when it has one."""
    from onnx import numpy_helper
    from onnx.external_data_helper import uses_external_data

    if not uses_external_data(tensor):
        return numpy_helper.to_array(tensor)
    info = {entry.key: entry.value for entry in tensor.external_data}
    return np.fromfile(os.path.join(folder, info["location"]), dtype="<f4", count=int(np.prod(tensor.dims)),
                       offset=int(info.get("offset", 0))).reshape(tuple(tensor.dims))


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
        if node.op_type != "DynamicQuantizeLinear":
            continue
        source, slices = gathered_taps(producer, node.input[0])
        concat = producer.get(node.input[0])
        if source is None or uses[concat.output[0]] != 1 or any(uses[s.output[0]] != 1 for s in slices):
            continue
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
    flags = cpu_flags()
    return flags is None or not VNNI_FLAGS & flags
