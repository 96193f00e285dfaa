"""int8 convs over blocks of frames: the wav2vec2 family's conv feature encoder, exported as MatMuls
over gathered taps (graph_modules.ConvAsMatMul), rewritten so that each block of ``stride`` input
frames is quantised with a scale of its own.

One activation scale per call (graph_precision.quantize_matmuls) suits inputs normalised per frame.
The conv activations of group-norm models (wav2vec2-base, HuBERT-base, WavLM-base) follow the audio's
loudness instead, and one scale left the quiet frames of speech a few int8 steps: a mean frame cosine
of 0.64-0.99 to float32, by the weights' initialisation. A scale per output frame would have to
quantise the gathered taps, k / stride times the input in float32. Blocks need no gather: the input,
quantised once, reshapes to (B, blocks, stride * C), and output frame t is block t times the weight
rows of taps 0 .. stride - 1, plus block t + 1 times the rows of the next taps, and so on:
ceil(k / stride) int8 MatMuls, each scaled per row by the scales of the blocks it reads.
"""
from __future__ import annotations

import numpy as np

from audioenc.graph_precision import float_weight, gathered_taps, quantizable_matmuls, quantize_weight


def quantize_convs(proto, reduce_range: bool, folder: str = "", row_factors: dict | None = None) -> int:
    """Rewrites each conv-as-MatMul of ``proto`` whose weight quantize_matmuls would quantise (its
    arguments mean the same) as int8 MatMuls over blocks; the taps' gather goes. Returns how many
    convs were rewritten."""
    row_factors = row_factors or {}
    producer = {out: node for node in proto.graph.node for out in node.output}
    constants = {init.name: init for init in proto.graph.initializer}
    rewrites, weights = {}, set()  # id of a conv's MatMul -> the nodes that replace it; float weights
    for node, weight in quantizable_matmuls(proto):
        source, taps = gathered_taps(producer, node.input[0])
        if source is None:
            continue
        stride = conv_stride(taps, producer, constants)
        w = float_weight(weight, folder)
        if weight.name in row_factors:
            w = w * row_factors[weight.name][:, None]
        rewrites[id(node)] = blocked_conv_nodes(proto, node.name or node.output[0], source, node.output[0],
                                                w, len(taps), stride, reduce_range)
        weights.add(weight.name)
    nodes = [new for node in proto.graph.node for new in rewrites.get(id(node), [node])]
    del proto.graph.node[:]
    proto.graph.node.extend(drop_unused(nodes, {out.name for out in proto.graph.output}))
    kept = [init for init in proto.graph.initializer if init.name not in weights]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    made = {out for node in proto.graph.node for out in node.output}
    kept = [info for info in proto.graph.value_info if info.name in made]  # not the gathers' any more
    del proto.graph.value_info[:]
    proto.graph.value_info.extend(kept)
    return len(rewrites)


def conv_stride(taps: list, producer: dict, constants: dict) -> int:
    """The stride of a ConvAsMatMul's tap gather: the step of its Slices (starts 0 .. k - 1, time axis)."""
    from onnx import numpy_helper

    def value(name):
        tensor = constants[name] if name in constants else producer[name].attribute[0].t
        return numpy_helper.to_array(tensor).tolist()

    starts = [value(tap.input[1]) for tap in taps]
    axes, steps = {tuple(value(tap.input[3])) for tap in taps}, {tuple(value(tap.input[4])) for tap in taps}
    if starts != [[j] for j in range(len(taps))] or axes != {(1,)} or len(steps) != 1:
        raise ValueError(f"unexpected conv tap gather: starts {starts}, axes {axes}, steps {steps}")
    return steps.pop()[0]


def blocked_conv_nodes(proto, name: str, x: str, y: str, w: np.ndarray, k: int, stride: int,
                       reduce_range: bool) -> list:
    """The nodes computing y = the conv of x (B, T, C) with the tap-major weight w (k * C, N), in int8
    over blocks of ``stride`` frames; their constants go into ``proto``."""
    from onnx import TensorProto, helper, numpy_helper

    channels, parts, p = w.shape[0] // k, -(-k // stride), name + "_blocked/"
    nodes = []

    def const(suffix, value):
        proto.graph.initializer.append(numpy_helper.from_array(np.asarray(value), p + suffix))
        return p + suffix

    def ints(suffix, *values):
        return const(suffix, np.array(values, np.int64))

    def op(op_type, inputs, suffix, **attrs):
        nodes.append(helper.make_node(op_type, inputs, [p + suffix], name=p + suffix, **attrs))
        return p + suffix

    # Frames in (T), frames out (T_out = (T - k) // stride + 1) and the frames of the blocks they read.
    one, time_axis = ints("one", 1), ints("time_axis", 1)
    taps, frames_per_block = ints("k", k), ints("stride", stride)
    shape = op("Shape", [x], "shape")
    frames = op("Slice", [shape, one, ints("two", 2)], "frames")
    out_frames = op("Add", [op("Div", [op("Sub", [frames, taps], "minus_k"), frames_per_block], "steps"), one],
                    "out_frames")
    block_count = op("Add", [out_frames, ints("more_blocks", parts - 1)], "block_count")
    block_frames = op("Mul", [block_count, frames_per_block], "block_frames")
    # Pad's widths (B, T, C): T's end to the blocks' frames, and back; negative widths cut
    to_blocks = op("Sub", [block_frames, frames], "to_blocks")
    head, tail = ints("pads_head", 0, 0, 0, 0), ints("pads_tail", 0)
    pads_to_blocks = op("Concat", [head, to_blocks, tail], "pads_to_blocks", axis=0)
    pads_to_frames = op("Concat", [head, op("Neg", [to_blocks], "to_frames"), tail], "pads_to_frames", axis=0)

    def block_frames_of(t, suffix, fill=None):  # t (B, T, ...) padded at the end or cut to the blocks' frames
        return op("Pad", [t, pads_to_blocks] + ([fill] if fill else []), suffix + "_padded")

    # Each block's step: 1/127 of its largest |value| (floored: an all-zero block stays zero), over
    # the frames that outputs read (with k < stride, a block's first k).
    frame_peak = op("Max", [op("ReduceMax", [x], "frame_max", axes=[-1], keepdims=1),
                            op("Neg", [op("ReduceMin", [x], "frame_min", axes=[-1], keepdims=1)], "frame_min_neg")],
                    "frame_peak")
    by_block = op("Reshape", [block_frames_of(frame_peak, "frame_peak"), ints("block_shape", 0, -1, stride)], "by_block")
    if k < stride:
        by_block = op("Slice", [by_block, ints("zero", 0), taps, ints("in_block", 2)], "read_by_block")
    block_peak = op("ReduceMax", [by_block], "block_peak", axes=[-1], keepdims=1)
    block_step = op("Max", [op("Mul", [block_peak, const("per_step", np.float32(1 / 127))], "block_peak_step"),
                            const("floor", np.float32(1e-30))], "block_step")
    # x quantised a row (frame) at a time, each with its block's step, as uint8 symmetric about 128.
    # Frames past the last block, which no output reads, take the largest float as their step.
    per_frame = op("Reshape", [op("Expand", [block_step, ints("each_frame", 1, 1, stride)], "expanded"),
                               ints("frames_shape", 0, -1, 1)], "block_step_per_frame")
    each_frame = op("Pad", [per_frame, pads_to_frames, const("huge", np.float32(np.finfo(np.float32).max))],
                    "frame_steps_padded")
    frame_steps = op("Reshape", [each_frame, ints("flat", -1)], "frame_steps")
    x_zero = const("x_zero", np.uint8(128))
    zero_points = op("Expand", [const("x_zeros", np.array([128], np.uint8)), op("Shape", [frame_steps], "frame_count")],
                     "x_zero_points")
    rows_of_x = op("Reshape", [x, ints("rows_shape", -1, channels)], "x_rows")
    xq = op("Reshape", [op("QuantizeLinear", [rows_of_x, frame_steps, zero_points], "x_rows_quantized", axis=0), shape],
            "x_quantized")
    # padded frames are the zero point, 0
    blocks = op("Reshape", [block_frames_of(xq, "x", fill=x_zero), ints("blocks_shape", 0, -1, stride * channels)],
                "x_blocks")
    # The product's scale is written as quantize_matmuls writes it, Mul(activation step, weight
    # scales), with a computed step (the call's largest) where a constant 1 would do: onnxruntime fuses
    # that pattern into one MatMulIntegerToFloat, but would first fold away a product of constants.
    # Each row is then multiplied by its block's step relative to the largest.
    largest_step = op("ReduceMax", [block_step], "largest_step", keepdims=0)
    relative_step = op("Div", [block_step, largest_step], "relative_step")
    limit = 64 if reduce_range else 127
    block_axes, outputs = ints("block_axes", 1, 2), []
    for i in range(parts):
        # part i: blocks i .. i + T_out - 1 times the rows of taps i * stride onwards
        first, width = i * stride * channels, min(stride, k - i * stride) * channels
        q, scale = quantize_weight(w[first : first + width], limit)
        first_block = ints(f"first_block{i}", i)
        end = op("Add", [out_frames, first_block], f"end{i}")
        ends = op("Concat", [end, ints(f"width{i}", width)], f"ends{i}", axis=0)
        rows = op("Slice", [blocks, ints(f"start{i}", i, 0), ends, block_axes], f"rows{i}")
        steps = op("Slice", [relative_step, first_block, end, time_axis], f"steps{i}")
        w_zero = const(f"w{i}_zero", np.zeros(q.shape[1], np.int8))
        product = op("MatMulInteger", [rows, const(f"w{i}", q), x_zero, w_zero], f"product{i}")
        scales = op("Mul", [largest_step, const(f"w{i}_scale", scale)], f"scales{i}")
        scaled = op("Mul", [op("Cast", [product], f"product{i}_float", to=TensorProto.FLOAT), scales], f"scaled{i}")
        outputs.append(op("Mul", [scaled, steps], f"part{i}"))
    nodes.append(helper.make_node("Sum", outputs, [y], name=p + "sum"))
    return nodes


def drop_unused(nodes: list, graph_outputs: set) -> list:
    """``nodes`` (in order) without those whose outputs nothing reads."""
    needed, kept = set(graph_outputs), []
    for node in reversed(nodes):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1]
