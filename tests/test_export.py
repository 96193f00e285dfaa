"""ONNX export: graph checks, forbidden ops, parity with the torch reference in onnxruntime (every
family and variant, several lengths and batch sizes, the shortest input), half precision and its
overflow check."""
import copy
import os

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

import audioenc  # noqa: E402
from audioenc import export, graph_modules, graph_precision  # noqa: E402
from audioenc.frontend import normalize_waveforms  # noqa: E402
from audioenc.models.layers import masked_group_norm  # noqa: E402
from conftest import W2V_VARIANTS, rel_err, speech_like  # noqa: E402

TOL = 1e-4


def reference_model(path):
    return audioenc.load(path, backend="torch", dtype="float32").backend.model


def session(path):
    return ort.InferenceSession(path, providers=["CPUExecutionProvider"])


def padded_batch(lengths, seed):
    batch = np.zeros((len(lengths), max(lengths)), np.float32)
    for i, n in enumerate(lengths):
        batch[i, :n] = speech_like(n, seed + i)
    lengths = np.array(lengths, dtype=np.int64)
    return normalize_waveforms(batch, lengths, True), lengths


@pytest.fixture(scope="module")
def w2v_graphs(w2v_checkpoints, tmp_path_factory):
    """variant -> (reference model, path of its full-depth fp32 graph with hidden states)."""
    out = {}
    for variant, (path, _) in w2v_checkpoints.items():
        model = reference_model(path)
        graph = str(tmp_path_factory.mktemp(f"onnx-{variant}") / "model.onnx")
        export.export_onnx(model, graph)
        out[variant] = (model, graph)
    return out


@pytest.mark.parametrize("convs_as_matmul", [False, True], ids=["conv2d", "matmul"])
def test_graphs_give_nan_where_the_first_conv_statistics_would_overflow(convs_as_matmul, w2v_checkpoints, tmp_path):
    """Graphs that take layer 0's GroupNorm statistics in float32 (float16, TensorRT, `audioenc
    export` without --fused-attention): an item loud enough to overflow them gives NaN frames, not
    finite, wrong ones; the other items are untouched."""
    model, graph = reference_model(w2v_checkpoints["wav2vec2-group"][0]), str(tmp_path / "model.onnx")
    export.export_onnx(model, graph, num_layers=1, hidden_states=False, convs_as_matmul=convs_as_matmul)
    waves, lens = padded_batch([4000, 4000], 3)
    waves[1] *= np.float32(1e20)
    got = session(graph).run(None, {"waveforms": waves, "lengths": lens})[0]
    with torch.no_grad():
        want = model(torch.from_numpy(waves[:1]), torch.from_numpy(lens[:1]), num_layers=1)[0]
    assert np.isnan(got[1]).all() and rel_err(torch.from_numpy(got[:1]), want) <= 1e-5


@pytest.mark.parametrize("variant", list(W2V_VARIANTS))
def test_wav2vec2_family_parity(variant, w2v_graphs):
    model, graph = w2v_graphs[variant]
    sess = session(graph)
    for seed, lengths in enumerate(([400], [4001, 400], [32007, 5000, 9999, 401])):
        waves, lens = padded_batch(lengths, 10 * seed)
        with torch.no_grad():
            out, hidden, frames = model(torch.from_numpy(waves), torch.from_numpy(lens))
        got = sess.run(None, {"waveforms": waves, "lengths": lens})
        assert got[1].tolist() == frames.tolist()
        assert len(got) == 2 + model.dims.num_layers + 1
        for i, n in enumerate(frames.tolist()):
            assert rel_err(got[0][i, :n], out[i, :n]) <= TOL
            for ours, ref in zip(got[2:], hidden):
                assert rel_err(ours[i, :n], ref[i, :n]) <= TOL


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_parity(n_mels, whisper_checkpoints, tmp_path):
    model = reference_model(whisper_checkpoints[n_mels][0])
    graph = str(tmp_path / "model.onnx")
    export.export_onnx(model, graph)
    sess = session(graph)
    for batch in (1, 3):
        mel = torch.rand(batch, n_mels, 3000) * 2 - 1
        with torch.no_grad():
            out, hidden = model(mel)
        got = sess.run(None, {"mel": mel.numpy()})
        assert rel_err(got[0], out) <= TOL
        for ours, ref in zip(got[1:], hidden):
            assert rel_err(ours, ref) <= TOL


@pytest.mark.parametrize("variant", ["wavlm-stable", "whisper"])
def test_graph_module_shares_the_weights_and_leaves_the_reference_as_it_was(variant, w2v_checkpoints,
                                                                           whisper_checkpoints):
    from audioenc.fused_attention import fuse_attention
    from audioenc.models.layers import Attention

    path = whisper_checkpoints[80][0] if variant == "whisper" else w2v_checkpoints[variant][0]
    model = reference_model(path)
    before = {name: t.clone() for name, t in model.state_dict().items()}
    module = graph_modules.graph_module(model, model.dims.num_layers, True)
    fuse_attention(module)
    weights = {t.data_ptr() for t in model.parameters()}
    assert {t.data_ptr() for t in module.model.parameters()} <= weights if variant == "whisper" else \
        {t.data_ptr() for t in module.encoder.parameters()} <= weights
    assert not any("sdpa" in vars(m) for m in model.modules() if isinstance(m, Attention))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], t) for name, t in before.items())
    with pytest.raises(ValueError, match="float32 reference"):
        graph_modules.graph_module(copy.deepcopy(model).half(), 1, True)


def test_graph_is_clean(w2v_graphs):
    for model, graph in w2v_graphs.values():
        export.check_graph(graph)  # checker, strict shape inference, opset, forbidden ops
        proto = onnx.load(graph)
        ops = {node.op_type for node in proto.graph.node}
        assert "LayerNormalization" in ops or model.dims.feat_extract_norm == "group"
        assert not ops & export.FORBIDDEN_OPS
        assert "Log" not in ops  # WavLM's bucket arithmetic folds into a constant table of the bias per distance
        assert not any("parametrizations" in init.name for init in proto.graph.initializer)  # weight norm folded
        inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in proto.graph.input}
        assert inputs == {"waveforms": ["batch", "samples"], "lengths": ["batch"]}


def test_forbidden_op_walk_finds_nested_and_foreign_ops():
    from onnx import helper

    inner = helper.make_graph([helper.make_node("Dropout", ["x"], ["y"])], "inner", [], [])
    outer = helper.make_graph([helper.make_node("If", ["c"], ["z"], then_branch=inner, else_branch=inner),
                               helper.make_node("Relu", ["z"], ["w"]),
                               helper.make_node("ATen", ["w"], ["v"], domain="org.pytorch.aten")], "outer", [], [])
    found = export.forbidden_ops(helper.make_model(outer))
    assert sum("Dropout" in f for f in found) == 2 and any("::If" in f for f in found)
    assert any("ATen" in f for f in found) and not any("Relu" in f for f in found)


def test_a_graph_whose_outputs_are_not_float32_is_refused(tmp_path):
    """As one traced under a caller's autocast would be: never cached under a float32 key."""
    from onnx import TensorProto, helper, save_model

    graph = helper.make_graph([helper.make_node("Cast", ["waveforms"], ["last_hidden_state"], to=TensorProto.FLOAT16)],
                              "g", [helper.make_tensor_value_info("waveforms", TensorProto.FLOAT, ["b", "t"])],
                              [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT16, ["b", "t"])])
    path = str(tmp_path / "half.onnx")
    save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", export.OPSET)]), path)
    with pytest.raises(ValueError, match="must be float32 .* last_hidden_state is FLOAT16"):
        export.check_graph(path)


def test_wavlm_position_bias_from_its_table_is_exact(w2v_checkpoints):
    """The bias per clamped distance equals the (T, T) bucket grid's (Hugging Face's computation)."""
    from audioenc.models.wavlm import bucket_of

    model = reference_model(w2v_checkpoints["wavlm-group"][0])
    dims = model.encoder.dims
    for frames in (1, 7, 59, 61, 200):  # max_bucket_distance is 60 in the tiny config
        pos = torch.arange(frames)
        grid = bucket_of(pos[None, :] - pos[:, None], dims.num_buckets, dims.max_bucket_distance)
        full = model.encoder.layers[0].attention.rel_attn_embed(grid).permute(2, 0, 1)
        assert torch.equal(model.encoder.position_bias(frames, torch.device("cpu")), full)


def test_conv_as_matmul_matches_conv():
    for k, s, bias in ((3, 2, False), (2, 2, True), (4, 3, True), (10, 5, False)):
        conv = torch.nn.Conv1d(6, 5, k, s, bias=bias)
        x = torch.randn(2, 6, 37)
        with torch.no_grad():
            assert rel_err(graph_modules.ConvAsMatMul(conv)(x.transpose(1, 2)), conv(x).transpose(1, 2)) <= 1e-6


def hum(samples: int) -> torch.Tensor:
    """A 50 Hz hum on a DC offset over faint noise: a high-pass filter keeps little of its power."""
    t = torch.arange(samples) / 16000
    return 0.5 + 0.3 * torch.sin(2 * torch.pi * 50 * t) + 1e-3 * torch.randn(samples)


@pytest.mark.parametrize("variant", ["wav2vec2-group", "wav2vec2-stable"])
@pytest.mark.parametrize("form", ["Conv2dFeatureExtractor", "ChannelLastFeatureExtractor"])
@pytest.mark.parametrize("fold_first_norm", [False, True])
def test_graph_feature_extractors_match_reference(w2v_checkpoints, variant, form, fold_first_norm):
    extractor = reference_model(w2v_checkpoints[variant][0]).feature_extractor
    waves = torch.stack([torch.randn(4000), torch.randn(4000), hum(4000)])
    lengths = torch.tensor([4000, 2501, 400])  # padded items: the masked statistics must hold
    with torch.no_grad():
        ref, ref_lengths = extractor(waves, lengths)
        out, out_lengths = getattr(graph_modules, form)(extractor, fold_first_norm)(waves, lengths)
    assert torch.equal(out_lengths, ref_lengths)
    for i, n in enumerate(ref_lengths.tolist()):
        assert rel_err(out[i, :n], ref[i, :, :n].T) <= 1e-5


@pytest.mark.parametrize("channels_last", [False, True])
def test_folded_first_layer_is_as_exact_as_the_reference(w2v_checkpoints, channels_last):
    """Conv + masked GroupNorm of layer 0 against the same in float64, on a padded batch whose items
    include a hum: the folded statistics lose no more than the float32 reference does."""
    layer = reference_model(w2v_checkpoints["wav2vec2-group"][0]).feature_extractor.conv_layers[0]
    folded = graph_modules.FoldedGroupNormConv(layer.conv, layer.layer_norm, channels_last)
    waves = torch.stack([hum(48000), torch.randn(48000), 1e-4 * torch.randn(48000)])
    frames = (torch.tensor([48000, 20001, 30000]) - layer.conv.kernel_size[0]) // layer.conv.stride[0] + 1

    def reference(dtype):
        norm = layer.layer_norm
        y = torch.nn.functional.conv1d(waves.to(dtype)[:, None], layer.conv.weight.to(dtype), stride=layer.conv.stride)
        return masked_group_norm(y, frames, norm.weight.to(dtype), norm.bias.to(dtype), norm.eps)

    with torch.no_grad():
        exact, ref = reference(torch.float64), reference(torch.float32)
        out = folded(waves, frames)
    out = out.transpose(1, 2) if channels_last else out
    for i, n in enumerate(frames.tolist()):
        assert rel_err(out[i, :, :n], exact[i, :, :n]) <= 2 * rel_err(ref[i, :, :n], exact[i, :, :n]) + 1e-7


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_only_onnxruntime_float32_and_int8_graphs_fold_the_first_norm(dtype, w2v_checkpoints, tmp_path):
    """The fold's float64 statistics would not survive to_half's fp16 MatMuls nor run in TensorRT
    (graphs without fused attention)."""
    model = reference_model(w2v_checkpoints["wav2vec2-group"][0])
    for fused in (False, True):
        directory = tmp_path / f"{dtype}-{fused}"
        directory.mkdir()
        export.build_graph(model, export.ExportSpec(num_layers=1, dtype=dtype, fused_attention=fused), str(directory))
        graph = onnx.load(str(directory / export.MODEL_FILE), load_external_data=False).graph
        doubles = any(n.op_type == "Cast" and n.attribute[0].i == onnx.TensorProto.DOUBLE for n in graph.node)
        assert doubles == (fused and dtype != "float16"), fused


def test_no_float64_matmul_takes_a_transpose(w2v_checkpoints, tmp_path):
    """onnxruntime 1.23 (the last release for Python 3.10) fuses a Transpose feeding a MatMul into a
    FusedMatMul, which has no float64 kernel: a graph with that pair in float64 does not load there."""
    model = reference_model(w2v_checkpoints["wav2vec2-group"][0])
    export.build_graph(model, export.ExportSpec(num_layers=1, dtype="float32", fused_attention=True), str(tmp_path))
    graph = onnx.shape_inference.infer_shapes(onnx.load(str(tmp_path / export.MODEL_FILE))).graph
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.value_info, *graph.input)}
    types.update({t.name: t.data_type for t in graph.initializer})
    transposed = {out for n in graph.node if n.op_type == "Transpose" for out in n.output}
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert any(types.get(name) == onnx.TensorProto.DOUBLE for n in matmuls for name in n.input)  # the fold's
    for n in matmuls:
        for name in n.input:
            assert not (name in transposed and types.get(name) == onnx.TensorProto.DOUBLE), n.name


def test_partial_depth_graph(w2v_checkpoints, tmp_path):
    model = reference_model(w2v_checkpoints["wav2vec2-stable"][0])
    graph = str(tmp_path / "model.onnx")
    export.export_onnx(model, graph, num_layers=1)
    waves, lens = padded_batch([8000, 3000], 5)
    got = session(graph).run(None, {"waveforms": waves, "lengths": lens})
    with torch.no_grad():
        out, hidden, _ = model(torch.from_numpy(waves), torch.from_numpy(lens), 1)
    assert len(got) == 2 + 2
    assert rel_err(got[0], out) <= TOL and rel_err(got[3], hidden[1]) <= TOL
    nodes = onnx.load(graph).graph.node
    # only one encoder layer in the graph: it costs the layers below the output only
    assert not any("encoder/layers.1/" in node.name for node in nodes)
    # float graphs run the feature encoder as Convs (onnxruntime's direct conv), plus the positional conv
    assert sum(node.op_type == "Conv" for node in nodes) == len(model.dims.conv_dim) + 1


@pytest.mark.parametrize("reduce_range", [False, True], ids=["8-bit", "7-bit"])
def test_int8_weights_equal_onnxruntime_quantize_dynamic_bit_for_bit(reduce_range, w2v_checkpoints, tmp_path,
                                                                       monkeypatch):
    """audioenc's quantiser writes quantize_dynamic's graph (per-channel symmetric weights) without
    its memory: same weights, same ops, same outputs. The float weights sit outside the graph file,
    as whisper-large-v3's must."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = reference_model(w2v_checkpoints["wav2vec2-group"][0])
    traced, fp32 = str(tmp_path / "traced.onnx"), str(tmp_path / "fp32.onnx")
    export.export_onnx(model, traced, num_layers=2, convs_as_matmul=True)
    onnx.save_model(onnx.load(traced), fp32, save_as_external_data=True, location="fp32.onnx.data", size_threshold=0)
    structure = onnx.load(fp32, load_external_data=False).graph
    rows = {t.name: t.dims[0] for t in structure.initializer if len(t.dims) == 2}
    short = [n.name for n in structure.node  # what audioenc leaves float: reductions under QUANTIZE_MIN_ROWS
             if n.op_type == "MatMul" and rows.get(n.input[1], graph_precision.QUANTIZE_MIN_ROWS) < graph_precision.QUANTIZE_MIN_ROWS]
    theirs = str(tmp_path / "theirs.onnx")
    quantize_dynamic(fp32, theirs, weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range,
                     op_types_to_quantize=["MatMul"], nodes_to_exclude=short, extra_options={"MatMulConstBOnly": True})
    ours_path = str(tmp_path / "ours.onnx")
    monkeypatch.setattr(graph_precision, "int8_reduce_range", lambda: reduce_range)
    monkeypatch.setattr(graph_precision, "quantize_before_gather", lambda proto: 0)  # audioenc's own step after
    graph_precision.quantize_int8(fp32, ours_path)
    ours = onnx.load(ours_path)
    weights = lambda proto: {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    ops = lambda proto: sorted(n.op_type for n in proto.graph.node)
    theirs_proto = onnx.load(theirs)
    expected, got = weights(theirs_proto), weights(ours)
    assert sorted(got) == sorted(expected)
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and np.array_equal(got[name], value), name
    assert ops(ours) == ops(theirs_proto)
    waves, lens = padded_batch([8000, 3000], 6)
    feeds = {"waveforms": waves, "lengths": lens}
    for a, b in zip(session(ours_path).run(None, feeds), session(theirs).run(None, feeds)):
        np.testing.assert_array_equal(a, b)


def test_int8_keeps_float_a_weight_that_is_also_used_elsewhere():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((128, 8)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("Identity", ["w"], ["z"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 128])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8]),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, [128, 8])], [w])
    proto = helper.make_model(graph)
    assert graph_precision.quantize_matmuls(proto, reduce_range=False) == 0
    assert [n.op_type for n in proto.graph.node] == ["MatMul", "Identity"]
    assert [t.name for t in proto.graph.initializer] == ["w"]


def test_int8_graph_quantises_conv_inputs_before_their_gather(w2v_checkpoints, tmp_path):
    model = reference_model(w2v_checkpoints["wav2vec2-group"][0])
    fp32, int8 = str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx")
    export.export_onnx(model, fp32, num_layers=1, convs_as_matmul=True)
    graph_precision.quantize_int8(fp32, int8)
    export.check_graph(int8)
    nodes = onnx.load(int8).graph.node
    # every quantised conv gathers uint8 taps; the first (waveform input) and those with a reduction
    # shorter than QUANTIZE_MIN_ROWS (the tiny model's kernel-2 layers) stay float32
    dims = model.dims
    quantised = sum(k * c >= graph_precision.QUANTIZE_MIN_ROWS for k, c in zip(dims.conv_kernel[1:], dims.conv_dim[:-1]))
    moved = [n for n in nodes if n.op_type == "DynamicQuantizeLinear" and n.name.endswith("_source")]
    assert quantised > 0 and len(moved) == quantised
    assert any(n.op_type == "MatMul" and "convs.0/" in n.name for n in nodes)
    waves, lens = padded_batch([8000, 3000], 5)
    ref = session(fp32).run(["last_hidden_state"], {"waveforms": waves, "lengths": lens})[0]
    got = session(int8).run(["last_hidden_state"], {"waveforms": waves, "lengths": lens})[0]
    # item 0 is the longest: all its frames are valid
    cos = torch.nn.functional.cosine_similarity(torch.from_numpy(got[0]), torch.from_numpy(ref[0]), dim=-1).mean()
    assert cos >= 0.995


def conv_graph(conv: torch.nn.Conv1d, path: str) -> None:
    """A graph of one ConvAsMatMul, x (B, T, C) -> y, with B and T dynamic."""
    with torch.no_grad(), export.exporter_warnings_ignored():
        torch.onnx.export(graph_modules.ConvAsMatMul(conv), (torch.randn(2, 40, conv.in_channels),), path, dynamo=False,
                          opset_version=export.OPSET, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "items", 1: "frames"}})


@pytest.mark.parametrize("kernel,stride", [(3, 2), (2, 2), (5, 2), (4, 2), (2, 3)])
def test_int8_convs_scale_each_block_of_frames(kernel, stride, tmp_path):
    """Each block of ``stride`` frames is quantised with a scale of its own: frames 1000x quieter than
    the rest keep their precision, items of a batch are independent (to float rounding), and every
    input length (odd, even, one frame's worth of taps) gives the conv's frames. One scale per call
    leaves the quiet frames a step or two of int8."""
    from audioenc.quantized_convs import quantize_convs

    torch.manual_seed(0)
    conv = torch.nn.Conv1d(32, 24, kernel, stride, bias=False)  # a bias would hide the quiet frames from the cosine
    fp32, int8 = str(tmp_path / "fp32.onnx"), str(tmp_path / "int8.onnx")
    conv_graph(conv, fp32)
    proto = onnx.load(fp32)
    assert quantize_convs(proto, reduce_range=False) == 1
    assert not [n for n in proto.graph.node if n.op_type in ("Concat", "MatMul") and "_blocked/" not in n.name]
    read = {name for node in proto.graph.node for name in node.input}
    assert [init.name for init in proto.graph.initializer if init.name not in read] == []  # onnxruntime warns of each
    onnx.save(proto, int8)
    export.check_graph(int8)
    loud = torch.nn.functional.gelu(torch.randn(2, 101, 32))
    loud[0, 40:80] *= 1e-3  # a pause
    loud[1] *= 50
    for frames in (kernel, kernel + 1, 60, 61, 101):
        x = loud[:, :frames].contiguous()
        with torch.no_grad():
            want = conv(x.transpose(1, 2)).transpose(1, 2)
        got = torch.from_numpy(session(int8).run(None, {"x": x.numpy()})[0])
        assert got.shape == want.shape
        assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() >= 0.999, frames
        for i in range(2):  # to float rounding: the product's scale is the call's largest step (quantized_convs)
            alone = session(int8).run(None, {"x": x[i : i + 1].numpy()})[0]
            np.testing.assert_allclose(alone, got[i : i + 1].numpy(), rtol=1e-5, atol=1e-6 * float(got[i].abs().max()))
    # one scale per call (quantize_matmuls) loses the pause
    proto = onnx.load(fp32)
    graph_precision.quantize_matmuls(proto, reduce_range=False)
    onnx.save(proto, int8)
    got = torch.from_numpy(session(int8).run(None, {"x": loud[:1].numpy()})[0])
    with torch.no_grad():
        want = conv(loud[:1].transpose(1, 2)).transpose(1, 2)
    assert torch.nn.functional.cosine_similarity(got, want, dim=-1).min() < 0.99


@pytest.mark.parametrize("variant,dtype,quantised_convs", [
    ("wav2vec2-group", "float32", None), ("wav2vec2-group", "int8", "per block"), ("wav2vec2-stable", "int8", "per call")])
def test_built_graphs_take_the_conv_form_that_fits(variant, dtype, quantised_convs, w2v_checkpoints, tmp_path):
    """build_graph (the backends' and `audioenc export`'s path): Convs for float graphs; for int8
    graphs MatMuls, which int8 quantises, with only the positional conv left a Conv: with a scale per
    block of frames in group-norm models (export.int8_convs_per_block), else one per call. Every Conv
    is 2-D, which onnxruntime runs as its blocked direct convolution (graph_modules.Conv1dAs2d)."""
    model = reference_model(w2v_checkpoints[variant][0])
    export.build_graph(model, export.ExportSpec(num_layers=1, dtype=dtype), str(tmp_path))
    assert sorted(os.listdir(tmp_path)) in (["model.onnx"], ["model.onnx", "model.onnx.data"])
    nodes = onnx.load(str(tmp_path / export.MODEL_FILE)).graph.node
    convs = [node for node in nodes if node.op_type == "Conv"]
    assert len(convs) == (len(model.dims.conv_dim) + 1 if quantised_convs is None else 1)
    assert all(len(attr.ints) == 2 for node in convs for attr in node.attribute if attr.name == "kernel_shape")
    per_block = any("_blocked/" in node.name for node in nodes)
    assert per_block == (quantised_convs == "per block")


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_graphs_past_the_protobuf_limit_keep_their_weights_outside(dtype, w2v_checkpoints, tmp_path, monkeypatch):
    """whisper-large's encoder (2.5 GB) is past protobuf's 2 GB: its weights go to model.onnx.data.
    The limit is lowered here so a tiny model takes that path; the graph must still run and match."""
    monkeypatch.setattr(export, "PROTOBUF_LIMIT", 1000)
    model = reference_model(w2v_checkpoints["wav2vec2-stable"][0])
    cwd, out = tmp_path / "cwd", tmp_path / "out"
    cwd.mkdir(), out.mkdir()
    for name in ("fp32.onnx.data", "model.onnx.data"):  # onnx.save_model refused these names in the cwd
        (cwd / name).write_bytes(b"not ours")
    monkeypatch.chdir(cwd)
    export.build_graph(model, export.ExportSpec(num_layers=2, dtype=dtype), str(out))
    assert sorted(os.listdir(out)) == ["model.onnx", "model.onnx.data"]
    assert all((cwd / name).read_bytes() == b"not ours" for name in os.listdir(cwd))
    graph = str(out / export.MODEL_FILE)
    inline = onnx.load(graph, load_external_data=False).graph.initializer
    assert max(w.ByteSize() for w in inline if w.data_location != onnx.TensorProto.EXTERNAL) < 4096
    waves, lens = padded_batch([16000], 3)
    x, lengths = torch.from_numpy(waves), torch.from_numpy(lens)
    with torch.no_grad():
        ref = model(x, lengths)[0]
        torch_half = copy.deepcopy(model).half()(x.half(), lengths)[0].float()
    got = torch.from_numpy(session(graph).run(["last_hidden_state"], {"waveforms": waves, "lengths": lens})[0])
    if dtype == "float32":
        assert rel_err(got, ref) <= TOL
    elif dtype == "float16":  # DESIGN's rule: at most twice the plain torch model's half-precision error
        assert rel_err(got, ref) <= 2 * rel_err(torch_half, ref)
    else:  # int8: mean per-frame cosine, as `audioenc verify` judges it
        assert torch.nn.functional.cosine_similarity(got[0], ref[0], dim=-1).mean() >= 0.995


def test_an_export_interrupted_after_writing_its_weights_file_leaves_the_cache_clean(w2v_checkpoints, tmp_path,
                                                                                      monkeypatch):
    """Ctrl-C while a cached graph is saved, its model.onnx.data written but not the graph: no lone
    weights file, unfinished folder or lock stays in the cache, and the next use exports it whole."""
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path))
    model, spec = reference_model(w2v_checkpoints["wav2vec2-group"][0]), export.ExportSpec(num_layers=1)
    save_model = onnx.save_model

    def interrupted(proto, path, *args, **kwargs):
        assert os.path.getsize(path + ".data") > 0  # the weights are out, the graph is not
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx, "save_model", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.cached_export(model, spec)
    assert os.listdir(tmp_path / "onnx") == []
    monkeypatch.setattr(onnx, "save_model", save_model)
    graph = export.cached_export(model, spec)
    assert sorted(os.listdir(tmp_path / "onnx")) == [os.path.basename(os.path.dirname(graph))]
    assert sorted(os.listdir(os.path.dirname(graph))) == ["meta.json", "model.onnx", "model.onnx.data"]


def test_export_refuses_to_start_on_a_disk_too_full_to_hold_it(w2v_checkpoints, tmp_path, monkeypatch, capsys):
    """A disk that fills up mid-trace leaves weights silently empty; the export checks the room first."""
    import errno
    import shutil

    from audioenc.cli import main

    model = reference_model(w2v_checkpoints["wav2vec2-group"][0])
    weights = sum(t.numel() * 4 for t in model.state_dict().values())
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda path: real(path)._replace(free=weights // 2))
    with pytest.raises(OSError, match="not enough disk space") as caught:
        export.build_graph(model, export.ExportSpec(num_layers=1), str(tmp_path))
    assert caught.value.errno == errno.ENOSPC and os.listdir(tmp_path) == []
    out = tmp_path / "exported"
    assert main(["export", "--model", w2v_checkpoints["wav2vec2-group"][0], "--format", "onnx", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"not enough disk space for the ONNX export in {out}:" in err and "AUDIOENC_CACHE" not in err  # not the cache
    assert not (out / export.MODEL_FILE).exists()
    monkeypatch.setattr(shutil, "disk_usage", real)
    export.build_graph(model, export.ExportSpec(num_layers=1), str(tmp_path))  # room again: it goes ahead


@pytest.mark.parametrize("weights", ["inline", "external"])  # external: as whisper-large-v3's are
def test_half_graph_keeps_norms_in_fp32_and_matches_torch_half(weights, whisper_checkpoints, tmp_path):
    model = reference_model(whisper_checkpoints[80][0])
    fp32 = str(tmp_path / "fp32.onnx")
    export.export_onnx(model, fp32)
    if weights == "external":
        onnx.save_model(onnx.load(fp32), fp32, save_as_external_data=True, location="fp32.onnx.data", size_threshold=0)
    half = graph_precision.to_half(fp32)
    types = {vi.name: vi.type.tensor_type.elem_type for vi in [*half.graph.value_info, *half.graph.output]}
    for node in half.graph.node:
        if node.op_type in ("LayerNormalization", "Softmax", "Add"):
            assert all(types.get(o, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for o in node.output)
    path = str(tmp_path / "half.onnx")
    export.save_onnx(half, path)
    export.check_graph(path)
    mel = torch.rand(2, 80, 3000) * 2 - 1
    with torch.no_grad():
        ref = model(mel)[0]
        torch_half = copy.deepcopy(model).half()(mel.half())[0].float()
    got = session(path).run(["last_hidden_state"], {"mel": mel.numpy()})[0]
    assert rel_err(got, ref) <= 2 * rel_err(torch_half, ref)


def test_half_headroom_check():
    graph_precision.check_half_headroom({"embeddings": 3.0, "layer 0": 16000.0})
    with pytest.raises(ValueError, match="layer 3: 2e\\+04"):
        graph_precision.check_half_headroom({"layer 2": 10.0, "layer 3": 20000.0})
    with pytest.raises(ValueError):
        graph_precision.check_half_headroom({"layer 0": float("nan")})


def every_watched_value(graph, feeds):
    """The peaks the slow way: every value around a MatMul, Gemm or Conv as a graph output."""
    proto = onnx.load(graph)
    watched = {name: layer for name, layer in graph_precision.half_op_activations(proto).items()
               if name not in feeds}  # inputs: the caller's max
    outputs = {v.name for v in proto.graph.output}
    proto.graph.output.extend(onnx.ValueInfoProto(name=n) for n in watched if n not in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    peaks = {}
    for name, value in zip(watched, sess.run(list(watched), feeds)):
        peaks[watched[name]] = max(peaks.get(watched[name], 0.0), float(np.abs(value).max()))
    return peaks


@pytest.mark.parametrize("variant", ["whisper", "wav2vec2-group"])
def test_half_activation_peaks_find_the_layer_that_overflows(variant, whisper_checkpoints, w2v_checkpoints, tmp_path):
    path = whisper_checkpoints[80][0] if variant == "whisper" else w2v_checkpoints[variant][0]
    model = reference_model(path)
    fc1 = model.layers[1].fc1 if variant == "whisper" else model.encoder.layers[1].feed_forward.intermediate_dense
    with torch.no_grad():
        fc1.weight.mul_(3e4)
    graph = str(tmp_path / "model.onnx")
    export.export_onnx(model, graph, hidden_states=False)
    feeds = graph_modules.example_inputs(model.dims, seconds=0.5, seed=3)
    peaks = graph_precision.half_activation_peaks(graph, feeds)
    expected = every_watched_value(graph, feeds)
    expected["embeddings"] = max(expected["embeddings"], *(float(np.abs(v).max()) for v in feeds.values() if v.dtype == np.float32))
    assert peaks.keys() == expected.keys()
    for name in peaks:
        assert peaks[name] == pytest.approx(expected[name], rel=1e-5), name
    assert peaks["layer 1"] > graph_precision.FP16_MAX > 100 * peaks["layer 0"]
    with pytest.raises(ValueError, match="float16 export would risk overflow: .*layer 1: "):
        graph_precision.check_half_headroom(peaks)


@pytest.mark.parametrize("name", ["whisper-tiny", "wav2vec2-base"])
def test_half_activation_peaks_of_real_size_models(name, tmp_path):
    """Real-size random models: every layer's fp16 inputs and outputs stay 4x below 65504."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = audioenc.load(f"random:{name}", backend="torch").backend.model
    graph = str(tmp_path / "model.onnx")
    export.export_onnx(model, graph, num_layers=2 if name == "wav2vec2-base" else None, hidden_states=False)
    inputs = graph_modules.example_inputs(model.dims, batch=1, seconds=1.0)
    if "waveforms" in inputs:  # real speech-like audio, normalised as the encoder does
        inputs["waveforms"] = normalize_waveforms(speech_like(16000, 3)[None], inputs["lengths"][:1] * 0 + 16000, True)
        inputs["lengths"] = np.array([16000])
    peaks = graph_precision.half_activation_peaks(graph, inputs)
    assert {"embeddings", "layer 0", "layer 1"} <= set(peaks)
    assert all(0 < p < graph_precision.FP16_MAX / graph_precision.FP16_HEADROOM for p in peaks.values()), peaks
    graph_precision.check_half_headroom(peaks)


def test_int8_graph_at_whisper_large_v3_widths(tmp_path, monkeypatch):
    """whisper-large-v3 (and distil-large-v3, the same encoder) at its real widths (128 mels, 1280
    wide, 20 heads) and one layer, random weights: every linear layer quantised, the graph's weights
    outside it as the full 2.5 GB model's are (lowered limit), and the frames within the int8 rule."""
    from audioenc.frontend import window_log_mel
    from audioenc.models import build_model
    from audioenc.presets import ARCHITECTURES
    from audioenc.verify import INT8_MIN_COSINE
    from audioenc.weights import Checkpoint

    config = dict(ARCHITECTURES["whisper-large-v3"][0], encoder_layers=1)
    model = build_model(Checkpoint("whisper", config, {}, {}, "random:whisper-large-v3", "random"), random_weights=True)
    monkeypatch.setattr(export, "PROTOBUF_LIMIT", 1 << 20)
    export.build_graph(model, export.ExportSpec(num_layers=1, hidden_states=False, dtype="int8", fused_attention=True),
                       str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["model.onnx", "model.onnx.data"]
    graph = str(tmp_path / export.MODEL_FILE)
    proto = onnx.load(graph, load_external_data=False)
    weights = {init.name for init in proto.graph.initializer}
    assert not [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    assert sum(n.op_type == "MatMulInteger" for n in proto.graph.node) == 6
    mel = window_log_mel([speech_like(16000 * 7, 4)], 480000, 128, torch.device("cpu"))
    got = torch.from_numpy(session(graph).run(["last_hidden_state"], {"mel": mel.numpy()})[0])
    with torch.no_grad():
        want = model(mel, num_layers=1)[0]
    valid = 7 * 50  # frames of the 7 s of audio
    assert torch.nn.functional.cosine_similarity(got[0, :valid], want[0, :valid], dim=-1).mean() >= INT8_MIN_COSINE


def test_whisper_graph_takes_whole_windows_only(whisper_checkpoints, tmp_path):
    """The trace is short, but a Whisper encoder computes 30 s windows: another length must be
    refused by the graph, not run into frames Whisper never computes."""
    model = audioenc.load(whisper_checkpoints[80][0], backend="torch").backend.model
    path = str(tmp_path / "w.onnx")
    export.export_onnx(model, path, hidden_states=False)
    graph = onnx.load(path).graph
    mel = graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in mel] == ["batch", 80, 2 * model.dims.n_ctx]
    # the conv stem as 2-D convs (graph_modules.Conv1dAs2d)
    assert [len(attr.ints) for node in graph.node if node.op_type == "Conv"
            for attr in node.attribute if attr.name == "kernel_shape"] == [2, 2]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match="dimensions"):
        session.run(None, {"mel": np.ones((1, 80, 2000), np.float32)})
