"""The triton backend end to end against the torch reference.

Without CUDA: tiny models in Triton's CPU interpreter, run in a child process started with
TRITON_INTERPRET=1 (see test_kernels.py for why). With CUDA: the same tests compiled, plus the
`gpu` tests at real sizes in float16/bfloat16 with CUDA graphs.
"""
from __future__ import annotations

import functools
import math
import os
import threading

import numpy as np
import pytest
import torch

import audioenc
from conftest import W2V_VARIANTS, rel_err, run_file_in_interpreter, speech_like

ON_GPU = torch.cuda.is_available()
INTERPRETER_CHILD = os.environ.get("TRITON_INTERPRET") == "1"
RUN_HERE = ON_GPU or INTERPRETER_CHILD
DEVICE = "cuda" if ON_GPU else "cpu"


@pytest.mark.skipif(ON_GPU or INTERPRETER_CHILD, reason="runs the interpreter child only on a machine without CUDA")
def test_in_the_interpreter():
    run_file_in_interpreter(os.path.abspath(__file__))


@pytest.fixture(autouse=True)
def here(request):
    if not RUN_HERE and request.node.name != "test_in_the_interpreter":
        pytest.skip("without CUDA these tests run in the TRITON_INTERPRET=1 child (test_in_the_interpreter)")
    if RUN_HERE:
        pytest.importorskip("triton")
    # cuDNN convs default to TF32 on GPUs: the float32 reference must really be float32.
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32 = saved


def load(path, dtype="float32", backend="triton"):
    return audioenc.load(path, backend=backend, device=DEVICE, dtype=dtype)


def assert_items_close(ours, ref, tol):
    assert ours.lengths.tolist() == ref.lengths.tolist()
    assert len(ours.hidden_states) == len(ref.hidden_states)
    for i, n in enumerate(ref.lengths.tolist()):
        assert rel_err(ours.last_hidden_state[i, :n], ref.last_hidden_state[i, :n]) <= tol
        for a, b in zip(ours.hidden_states, ref.hidden_states):
            assert rel_err(a[i, :n], b[i, :n]) <= tol


WAVES = [(400, 1), (3001, 2), (4801, 3)]  # one frame, and two odd lengths in one padded batch


def one_padded_batch(enc):
    """enc, running a list as one padded batch: on the CPU encode runs items of unequal lengths
    apart (cpu_max_padding), so the kernels' key mask and per-item statistics would go untested."""
    enc.cpu_max_padding = math.inf
    return enc


def test_autotune_setting_typo_fails_the_load(w2v_checkpoints, monkeypatch):
    """The kernels read AUDIOENC_AUTOTUNE as they are first imported, at the first call, not the load."""
    monkeypatch.setenv("AUDIOENC_AUTOTUNE", "yes")
    with pytest.raises(ValueError, match="AUDIOENC_AUTOTUNE must be 0 .* or 1 .*, got 'yes'"):
        load(w2v_checkpoints["wav2vec2-group"][0])


def test_head_dim_over_128_fails_the_load():
    """The attention kernel takes head dims up to 128: a model past that is refused at load, not at
    its first call."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    encoder = WhisperEncoder(WhisperConfig(d_model=272, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=8))
    with pytest.raises(ValueError, match="head dims up to 128; this model's is 136"):
        audioenc.load(encoder, backend="triton", device=DEVICE)


@pytest.mark.parametrize("variant", list(W2V_VARIANTS))
def test_wav2vec2_family_float32_matches_reference(variant, w2v_checkpoints):
    path, _ = w2v_checkpoints[variant]
    waves = [speech_like(n, seed) for n, seed in WAVES]
    ref = load(path, backend="torch").encode(waves, output_hidden_states=True)
    assert_items_close(one_padded_batch(load(path)).encode(waves, output_hidden_states=True), ref, 1e-4)


@pytest.mark.parametrize("way", ["fused", "split"])
def test_layer_norm_conv_layers_match_reference_either_way(way, w2v_checkpoints, monkeypatch):
    """Conv + LayerNorm + GELU as one kernel or two passes: the backend times both on a GPU."""
    from audioenc.backends import triton as backend_module

    # the candidate runs off CUDA, and on CUDA wins every timing
    monkeypatch.setattr(backend_module._ConvLayerNormGelu, "CANDIDATE", way)
    monkeypatch.setattr(backend_module, "_faster", lambda first, second: True)
    path, _ = w2v_checkpoints["wavlm-stable"]
    waves = [speech_like(n, seed) for n, seed in WAVES]
    enc = load(path)
    assert len(enc.backend.model.layer_norm_convs) == 6
    assert_items_close(enc.encode(waves, output_hidden_states=True),
                       load(path, backend="torch").encode(waves, output_hidden_states=True), 1e-4)


def test_whisper_float32_matches_reference(whisper_checkpoints):
    path, _ = whisper_checkpoints[80]
    wave = speech_like(24000, 4)
    ref = load(path, backend="torch").encode(wave, output_hidden_states=True)
    ours = load(path).encode(wave, output_hidden_states=True)
    assert_items_close(ours, ref, 1e-4)


def test_float32_runs_no_cublas_matmul_whatever_the_tf32_setting(w2v_checkpoints, whisper_checkpoints, monkeypatch):
    """cuBLAS takes float32 matmuls in TF32 when the process allows it (about 1e-3 off, and a CUDA
    graph keeps what its capture ran): the float32 backend runs its own IEEE kernels instead."""
    from audioenc.backends import triton as backend_module

    cases = [(w2v_checkpoints[name][0], [speech_like(n, seed) for n, seed in WAVES])
             for name in ("wavlm-stable", "wav2vec2-group")] + [(whisper_checkpoints[80][0], speech_like(24000, 4))]
    refs = [load(path, backend="torch").encode(audio, output_hidden_states=True) for path, audio in cases]

    def cublas(*args, **kwargs):
        raise AssertionError("a float32 matmul went to cuBLAS or cuDNN")

    for name in ("linear", "conv1d"):
        monkeypatch.setattr(backend_module.F, name, cublas)
    for name in ("addmm", "_addmm_activation"):
        monkeypatch.setattr(backend_module.torch, name, cublas)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    torch.backends.cudnn.allow_tf32 = True  # the fixture restores it
    try:
        for (path, audio), ref in zip(cases, refs):
            assert_items_close(load(path).encode(audio, output_hidden_states=True), ref, 1e-4)
    finally:
        torch.set_float32_matmul_precision(precision)


@pytest.mark.parametrize("variant", ["wav2vec2-group", "wavlm-stable", "wav2vec2-adapters"])
def test_float16_error_at_most_twice_torch_float16(variant, w2v_checkpoints):
    path, _ = w2v_checkpoints[variant]
    waves = [speech_like(n, seed + 20) for n, seed in WAVES]
    truth = load(path, backend="torch").encode(waves).last_hidden_state
    torch_half = load(path, "float16", backend="torch").encode(waves).last_hidden_state
    ours = load(path, "float16").encode(waves).last_hidden_state
    assert torch.isfinite(ours).all()
    assert rel_err(ours, truth) <= 2 * rel_err(torch_half, truth)


# bench_gpu.py's experiments: a float16 residual stream; residual adds in cuBLAS's epilogue
RESIDUAL_EXPERIMENTS = {"float32": {}, "float16": dict(residual_dtype=torch.float16),
                        "in-cublas": dict(residual_in_cublas=True),
                        "float16-in-cublas": dict(residual_dtype=torch.float16, residual_in_cublas=True)}


def skip_without_mixed_dtype_addmm():
    """The experiment adds float16 matmuls into a float32 residual with addmm(out_dtype=float32):
    torch <= 2.9's CUDA kernel refuses those mixed dtypes (pytorch#154086, relaxed by #167931)."""
    half = torch.zeros(2, 8, device=DEVICE, dtype=torch.float16)
    try:
        torch.addmm(torch.zeros(2, 2, device=DEVICE), half, half.t(), out_dtype=torch.float32)
    except (RuntimeError, TypeError) as e:
        pytest.skip(f"torch {torch.__version__} has no mixed-dtype addmm on CUDA: {str(e).splitlines()[0]}")


@pytest.mark.parametrize("experiment", list(RESIDUAL_EXPERIMENTS))
def test_whisper_float16_error_at_most_twice_torch_float16(experiment, whisper_checkpoints):
    if ON_GPU and RESIDUAL_EXPERIMENTS[experiment] == dict(residual_in_cublas=True):  # float32 residual
        skip_without_mixed_dtype_addmm()
    path, _ = whisper_checkpoints[80]
    wave = speech_like(24000, 24)
    truth = load(path, backend="torch").encode(wave, output_hidden_states=True)
    torch_half = load(path, "float16", backend="torch").encode(wave, output_hidden_states=True)
    enc = load(path, "float16")
    for attribute, value in RESIDUAL_EXPERIMENTS[experiment].items():
        setattr(enc.backend.model, attribute, value)
    ours = enc.encode(wave, output_hidden_states=True)
    for layer, (got, half, ref) in enumerate(zip(ours.hidden_states, torch_half.hidden_states, truth.hidden_states)):
        assert torch.isfinite(got).all()
        assert rel_err(got, ref) <= 2 * rel_err(half, ref) + 1e-6, layer  # floor: layer 0 may be exact


@pytest.mark.parametrize("family", ["whisper", "wavlm-stable"])
def test_residual_adds_in_cublas_match_reference_at_every_depth(family, w2v_checkpoints, whisper_checkpoints):
    """The pre-LN residual stream summed by out_proj's and fc2's matmuls, their biases added by the
    LayerNorms that read it (an experiment of bench_gpu.py): the same frames at every depth."""
    path = whisper_checkpoints[80][0] if family == "whisper" else w2v_checkpoints[family][0]
    waves = [speech_like(24000, 6)] if family == "whisper" else [speech_like(n, seed + 6) for n, seed in WAVES]
    ref = load(path, backend="torch")
    enc = load(path)
    enc.backend.model.residual_in_cublas = True
    assert_items_close(enc.encode(waves, output_hidden_states=True), ref.encode(waves, output_hidden_states=True), 1e-4)
    for layer in (0, 1):
        ours, truth = enc.encode(waves, output_layer=layer), ref.encode(waves, output_layer=layer)
        for i, n in enumerate(truth.lengths.tolist()):
            assert rel_err(ours.last_hidden_state[i, :n], truth.last_hidden_state[i, :n]) <= 1e-4, (layer, i)


def test_residual_adds_in_cublas_run_the_attention_adapters(w2v_checkpoints):
    """MMS's adapters add to that residual stream too, linear_2's bias added by the next LayerNorm."""
    path, _ = w2v_checkpoints["wav2vec2-adapters"]
    wave = speech_like(4001, 7)
    enc = load(path)
    enc.backend.model.residual_in_cublas = True
    ref = load(path, backend="torch").encode(wave, output_hidden_states=True)
    assert_items_close(enc.encode(wave, output_hidden_states=True), ref, 1e-4)


def test_layers_stop_early_and_equal_the_full_runs_hidden_state(w2v_checkpoints):
    path, _ = w2v_checkpoints["wavlm-stable"]
    enc = load(path)
    wave = speech_like(5000, 5)
    full = enc.encode(wave, output_hidden_states=True)
    for layer in range(enc.num_layers):
        torch.testing.assert_close(enc.encode(wave, output_layer=layer).last_hidden_state, full.hidden_states[layer])


def test_hidden_states_are_kept_only_when_asked(w2v_checkpoints, whisper_checkpoints):
    """Without them the forward frees each layer's output (a CUDA graph would hold them all)."""
    for path in (w2v_checkpoints["wavlm-stable"][0], w2v_checkpoints["wav2vec2-group"][0], whisper_checkpoints[80][0]):
        backend = load(path).backend
        inputs = torch.randn(2, 80, 3000) if backend.is_whisper else torch.randn(2, 4000)
        lengths = None if backend.is_whisper else torch.tensor([4000, 2500])
        layers = len(backend.model.blocks)
        full, hidden, _ = backend.run(inputs, lengths, layers, output_hidden_states=True)
        alone, none, _ = backend.run(inputs, lengths, layers, output_hidden_states=False)
        assert len(hidden) == layers + 1 and none == []
        torch.testing.assert_close(alone, full, rtol=0, atol=0)


def test_fc1_gelu_keeps_cublas_where_the_fused_kernel_disagrees_or_fails(monkeypatch):
    from audioenc.backends import triton as backend_module

    monkeypatch.setattr(backend_module, "_faster", lambda first, second: True)  # CUDA events: GPU only
    with torch.no_grad():  # as the backend builds it
        fc1 = backend_module._LinearGelu(torch.nn.Linear(16, 48), torch.float32, torch.device(DEVICE), {})
    probe = torch.randn(5, 16, device=DEVICE)
    assert fc1._choose(probe) == "fused"
    monkeypatch.setattr(fc1, "fused", lambda x: 1.5 * fc1.cublas(x))
    with pytest.warns(UserWarning, match="differs from it by 0.5"):
        assert fc1._choose(probe) == "cublas"

    def out_of_resources(x):
        raise RuntimeError("out of resource: shared memory")

    monkeypatch.setattr(fc1, "fused", out_of_resources)
    with pytest.warns(UserWarning, match="keeps its cublas path here: the fused path failed .out of resource"):
        assert fc1._choose(probe) == "cublas"


def test_a_trusted_path_that_cannot_run_gives_way_to_the_other(monkeypatch):
    """The fused conv + LayerNorm kernel in float32 fits no config on 99 KB-shared-memory GPUs (A10, L4):
    its split form must run there instead of the fused one failing at every call."""
    from audioenc.backends import triton as backend_module

    conv = torch.nn.Conv1d(8, 16, 3, stride=2).to(DEVICE)
    norm = (torch.ones(16, device=DEVICE), torch.zeros(16, device=DEVICE), 1e-5)
    layer = backend_module._ConvLayerNormGelu(conv.weight.detach(), conv.bias.detach(), 2, norm, torch.float32)
    probe = torch.randn(2, 21, 8, device=DEVICE)

    def out_of_resources(x):
        raise RuntimeError("out of resource: shared memory, Required: 139264, Hardware limit: 101376")

    monkeypatch.setattr(layer, "fused", out_of_resources)
    with pytest.warns(UserWarning, match="takes its split path here: the fused path failed .out of resource"):
        assert layer._choose(probe) == "split"
    monkeypatch.setattr(layer, "split", out_of_resources)
    with pytest.raises(RuntimeError, match="out of resource"):
        layer._choose(probe)


def test_unmasked_attention_takes_cudnn_where_it_agrees_and_wins_and_ours_where_it_fails(monkeypatch):
    """Whisper's half-precision attention may run cuDNN's kernel. Its op is CUDA-only, so here SDPA's
    math kernel stands in for it, with the same (B, H, T, D) strided views in and out: the layout
    around it must give our kernel's frames."""
    from audioenc.backends import triton as backend_module

    sdpa = lambda q, k, v, bias, lse: (torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        q.float(), k.float(), v.float()).to(q.dtype),)
    monkeypatch.setattr(backend_module, "_cudnn_attention", sdpa)
    monkeypatch.setattr(backend_module, "_faster", lambda first, second: True)  # CUDA events: GPU only
    attention = backend_module._UnmaskedAttention({})
    qkv = torch.randn(2, 97, 3, 2, 64, device=DEVICE, dtype=torch.float16)  # (B, T, q/k/v, H, D)
    assert attention(qkv).shape == (2, 97, 2, 64)  # off CUDA, before any choice: ours
    assert attention._choose(qkv) == "cudnn"
    ours, theirs = attention.triton(qkv), attention.cudnn(qkv)
    assert theirs.shape == ours.shape and theirs.is_contiguous()
    assert rel_err(theirs.float(), ours.float()) <= 2e-3

    def unsupported(*args):
        raise RuntimeError("No available kernel")

    monkeypatch.setattr(backend_module, "_cudnn_attention", unsupported)
    with pytest.warns(UserWarning, match="attention keeps its triton path here: the cudnn path failed .No available"):
        assert attention._choose(qkv) == "triton"


def test_only_half_precision_attention_without_mask_considers_cudnn(whisper_checkpoints):
    path, _ = whisper_checkpoints[80]
    assert all(block.unmasked_attention is None for block in load(path).backend.model.blocks)  # float32
    assert all(block.unmasked_attention is not None for block in load(path, "float16").backend.model.blocks)


@pytest.mark.parametrize("kernel", [16, 15])
def test_both_positional_conv_paths_compute_the_models_conv(kernel):
    """cuDNN's and our kernel's positional conv against the reference model's module (an even kernel
    drops the last frame); in float32, and off CUDA, the backend runs ours."""
    from audioenc.backends.triton import _PositionalConv
    from audioenc.config import Wav2Vec2Dims
    from audioenc.models.wav2vec2 import PositionalConvEmbedding

    dims = Wav2Vec2Dims.from_config("wav2vec2", dict(hidden_size=48, num_conv_pos_embeddings=kernel,
                                                     num_conv_pos_embedding_groups=3))
    module = PositionalConvEmbedding(dims).to(DEVICE).eval()
    pos = _PositionalConv(module.conv, torch.float32, torch.device(DEVICE))
    x = torch.randn(2, 37, 48, device=DEVICE)
    with torch.no_grad():
        truth = module(x, torch.ones(2, 37, dtype=torch.bool, device=DEVICE))  # every frame valid
        for path in ("cudnn", "triton"):
            assert rel_err(getattr(pos, path)(x), truth) <= 1e-5, path
        assert rel_err(pos(x), truth) <= 1e-5 and not pos.choices  # float32: ours (cuDNN's TF32 is off), untimed


@pytest.mark.parametrize("cudnn,capability,usable", [(91501, (9, 0), True), (91500, (9, 0), False),
                                                     (91002, (9, 0), False), (92000, (7, 5), False)])
def test_cudnn_attention_needs_ampere_and_cudnn_9_15_1(cudnn, capability, usable, monkeypatch):
    """Older cuDNN 9 could fault on graph replays of Whisper-length attention (pytorch#169849)."""
    from audioenc.backends import triton as backend_module

    monkeypatch.setattr(torch.backends.cudnn, "is_available", lambda: True)
    monkeypatch.setattr(torch.backends.cudnn, "version", lambda: cudnn)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert backend_module._cudnn_attention_usable(torch.device("cuda")) is usable
    assert not backend_module._cudnn_attention_usable(torch.device("cpu"))


def test_fc1_gelu_cublas_path_takes_the_epilogue_in_half_precision_within_5e_4_of_exact():
    """cuBLAS's epilogue computes the tanh form; torch's CPU kernel for the same op the exact one."""
    from audioenc.backends.triton import _LinearGelu

    layer = torch.nn.Linear(24, 40).requires_grad_(False)
    for dtype, approximate in [(torch.float16, "tanh"), (torch.bfloat16, "tanh"), (torch.float32, "none")]:
        assert _LinearGelu(layer, dtype, torch.device(DEVICE), {}).approximate == approximate
    fc1 = _LinearGelu(layer, torch.float32, torch.device(DEVICE), {})
    fc1.approximate = "tanh"  # the half-precision path, in float32 so the CPU runs it
    x = 3 * torch.randn(2, 7, 24, device=DEVICE)
    got = fc1.cublas(x)
    exact = torch.nn.functional.gelu(torch.nn.functional.linear(x, fc1.weight, fc1.bias))
    assert got.shape == exact.shape
    assert (got - exact).abs().max() <= 5e-4 + 1e-5


def test_graph_cache_evicts_the_least_recently_used_by_count_and_by_bytes(whisper_checkpoints, monkeypatch):
    """The eviction policy alone, with capture and replay faked (real graphs need CUDA)."""
    from types import SimpleNamespace

    from audioenc.backends import triton as backend_module

    class FakeGraph:
        def replay(self):
            pass

    def fake_capture(batch, shape, num_layers, keep_hidden):
        out = torch.zeros(batch, 1500, 64)
        hidden = [torch.zeros(batch, 1500, 64)] * (num_layers + 1) if keep_hidden else []
        return FakeGraph(), torch.zeros((batch,) + tuple(shape)), None, (out, hidden, None)

    backend = load(whisper_checkpoints[80][0]).backend
    monkeypatch.setattr(backend, "_capture", fake_capture)
    total = 10 ** 12
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(total_memory=total))
    mel = lambda batch: torch.zeros(batch, 80, 3000)
    for batch in (1, 2, 3, 5, 9, 17, 33) * 3:  # buckets 1, 2, 4, 8, 16, 32, 64
        backend._run_graph(mel(batch), None, 2, False)
    assert len(backend._graphs) == 7
    backend._run_graph(mel(1), None, 2, False)                                    # 1 becomes the most recent
    for layers in range(3, 3 + backend_module.GRAPH_CACHE_SIZE - 7):
        backend._run_graph(mel(2), None, layers, False)
    assert len(backend._graphs) == backend_module.GRAPH_CACHE_SIZE
    backend._run_graph(mel(4), None, 1, False)                                    # one too many
    assert len(backend._graphs) == backend_module.GRAPH_CACHE_SIZE
    assert (2, 3000, 2, False) not in backend._graphs and (1, 3000, 2, False) in backend._graphs
    # A graph whose buffers alone pass the budget is still captured; it evicts all the others.
    total = 4 * backend_module.TritonBackend._buffer_bytes(backend._graphs[(64, 3000, 2, False)])
    backend._run_graph(mel(64), None, 2, True)
    assert list(backend._graphs) == [(64, 3000, 2, True)]


def test_batch_items_equal_items_alone(w2v_checkpoints):
    path, _ = w2v_checkpoints["wavlm-group"]
    enc = one_padded_batch(load(path))
    waves = [speech_like(n, 30 + i) for i, n in enumerate((401, 5321, 2999))]
    batch = enc.encode(waves)
    for i, wave in enumerate(waves):
        alone = enc.encode(wave)
        n = alone.lengths[0]
        assert rel_err(batch.last_hidden_state[i, :n], alone.last_hidden_state[0]) <= 1e-5


def test_audio_that_overflows_the_first_conv_statistics_is_refused(w2v_checkpoints):
    """Without waveform normalisation, 1e20 samples overflow layer 0's float32 variance, which would
    normalise them to finite, wrong frames: the item is reported instead, the others unharmed."""
    path, _ = w2v_checkpoints["wav2vec2-group"]
    enc = load(path)
    enc.do_normalize = False
    quiet, loud = speech_like(3001, 4), speech_like(3001, 5) * np.float32(1e20)
    with pytest.raises(ValueError, match="audio item 1: the encoder's output holds NaN or Inf"):
        enc.encode([quiet, loud])
    assert torch.isfinite(enc.encode(quiet).last_hidden_state).all()


def test_the_callers_default_dtype_changes_nothing(whisper_checkpoints):
    """Whisper's log-mel, the kernels' buffers and the CUDA graphs' inputs name their dtype."""
    wave = speech_like(4000, 9)
    expected = load(whisper_checkpoints[80][0]).encode(wave).last_hidden_state
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = load(whisper_checkpoints[80][0]).encode(wave).last_hidden_state
    finally:
        torch.set_default_dtype(dtype)
    assert got.dtype == torch.float32 and torch.equal(got, expected)


@pytest.mark.parametrize("ffn_scale,input_scale", [(15000.0, 1.0), (15000.0, 3e4)], ids=["past-1e4", "past-fp16-max"])
def test_no_float16_overflow_with_large_activations(w2v_checkpoints, ffn_scale, input_scale):
    """Pre-LN models (wav2vec2-large, WavLM-large) grow their residual stream layer after layer; the
    backend keeps it in float32. Scaled weights push the stream past 1e4, then past float16's
    65504 (where the plain torch model in float16 gives inf/NaN and only finiteness and a
    half-precision-sized error can be asked)."""
    from audioenc.backends.torch import TorchBackend
    from audioenc.backends.triton import TritonBackend
    from audioenc.models import build_model
    from audioenc.weights import load_checkpoint

    path, _ = w2v_checkpoints["wavlm-stable"]
    model = build_model(load_checkpoint(path))
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.feed_forward.output_dense.weight.mul_(ffn_scale)
            layer.feed_forward.output_dense.bias.mul_(ffn_scale)
        model.feature_projection.projection.weight.mul_(input_scale)
        model.feature_projection.projection.bias.mul_(input_scale)
        model.encoder.pos_conv_embed.conv.weight.div_(input_scale)  # keeps the pos conv's output in range
    wave = torch.from_numpy(speech_like(6000, 6))[None]
    lengths = torch.tensor([6000])
    with torch.inference_mode():
        _, truth, _ = model(wave, lengths)
    peak = max(float(h.abs().max()) for h in truth)
    assert peak > (1e4 if input_scale == 1 else 65504)
    layers = len(model.encoder.layers)
    _, ours, _ = TritonBackend(model, torch.device(DEVICE), "float16").run(wave, lengths, layers)
    _, plain, _ = TorchBackend(model, torch.device(DEVICE), "float16").run(wave, lengths, layers)
    for a, b, ref in zip(ours, plain, truth):
        assert torch.isfinite(a).all()
        if peak < 65504:
            assert rel_err(a.cpu(), ref) <= 2 * rel_err(b.cpu(), ref)
        else:
            assert rel_err(a.cpu(), ref) <= 5e-3
    if peak >= 65504:
        assert not all(torch.isfinite(b).all() for b in plain)  # the overflow this guards against


def test_dtype_device_and_availability(w2v_checkpoints, monkeypatch):
    from audioenc.backends.triton import TritonBackend

    path, _ = w2v_checkpoints["wav2vec2-group"]
    assert TritonBackend.available() is None
    with pytest.raises(ValueError, match="float32, float16, bfloat16"):
        load(path, "int8")
    if not ON_GPU:  # the interpreter's bfloat16 tl.dot is broken: refused, not silently wrong
        with pytest.raises(ValueError, match="bfloat16 only on CUDA"):
            load(path, "bfloat16")
    if not ON_GPU:
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(ValueError, match="CUDA"):
            load(path)


def test_auto_passes_over_triton_on_gpus_triton_cannot_compile_for(w2v_checkpoints, monkeypatch):
    """A Pascal GPU (compute capability 6.0, Kaggle's P100): auto takes another backend, and asking
    for triton there names the GPU instead of failing at the first kernel's compile mid-encode."""
    from audioenc.backends import resolve_backend
    from audioenc.backends.triton import TritonBackend
    from audioenc.models import build_model
    from audioenc.weights import load_checkpoint

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (6, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla P100-PCIE-16GB")
    assert "6.0" in TritonBackend.available() and "Tesla P100" in TritonBackend.available()
    assert resolve_backend("auto", "cuda") != "triton"
    model = build_model(load_checkpoint(w2v_checkpoints["wav2vec2-group"][0]))
    with pytest.raises(ValueError, match="cannot run on cuda:0: Triton compiles for GPUs of compute capability 7.0"):
        TritonBackend(model, torch.device("cuda:0"), "float16")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert TritonBackend.available() is None


def test_buckets_pad_at_most_a_quarter():
    from audioenc.backends.triton import MIN_LENGTH_BUCKET, batch_bucket, length_bucket

    for n in [1, 400, 16000, 16001, 40000, 159999, 160000, 480001]:
        b = length_bucket(n)
        assert b >= n and (b == MIN_LENGTH_BUCKET or b <= 1.25 * n)
        assert length_bucket(b) == b
    assert [batch_bucket(n) for n in (1, 2, 3, 5, 16, 17)] == [1, 2, 4, 8, 16, 32]


# ---------------------------------------------------------------- real sizes (GPU only)

gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
# Largest first: a lease's capped run reaches them (stop 26's cap left the large ones unrun).
REAL = ["whisper-large-v3", "wavlm-large", "wav2vec2-large-lv60", "wav2vec2-base", "hubert-base", "wavlm-base-plus",
        "whisper-tiny"]


@functools.lru_cache(maxsize=None)  # one float32 run per model for both half dtypes (outputs are MBs)
def real_size_truth(name):
    """Speech-like items of a full and a partial window, and random:name's float32 output on them."""
    seconds = 30 if name.startswith("whisper") else 10
    waves = [speech_like(int(16000 * seconds), 40), speech_like(int(16000 * seconds * 0.37), 41)]
    return waves, audioenc.load(f"random:{name}", backend="torch", device="cuda", dtype="float32").encode(waves)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("name", REAL)
def test_real_size_half_precision_rule(name, dtype):
    waves, truth = real_size_truth(name)
    torch_half = audioenc.load(f"random:{name}", backend="torch", device="cuda", dtype=dtype).encode(waves)
    ours = audioenc.load(f"random:{name}", backend="triton", device="cuda", dtype=dtype).encode(waves)
    assert ours.lengths.tolist() == truth.lengths.tolist()
    for i, n in enumerate(truth.lengths.tolist()):
        ref = truth.last_hidden_state[i, :n]
        err = rel_err(ours.last_hidden_state[i, :n], ref)
        assert err <= 2 * rel_err(torch_half.last_hidden_state[i, :n], ref), (name, dtype, i, err)


@pytest.mark.gpu
@gpu
def test_cudnn_attention_agrees_with_ours_at_whisper_large_v3s_shape_eager_and_replayed():
    from audioenc.backends import triton as backend_module

    if not backend_module._cudnn_attention_usable(torch.device("cuda")):
        pytest.skip(f"the backend does not consider cuDNN's attention here (cuDNN {torch.backends.cudnn.version()})")
    attention = backend_module._UnmaskedAttention({})
    qkv = torch.randn(2, 1500, 3, 20, 64, device="cuda", dtype=torch.float16)
    ours = attention.triton(qkv).float()
    assert rel_err(attention.cudnn(qkv).float(), ours) <= 2e-3
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        replayed = attention.cudnn(qkv)
    qkv.copy_(torch.randn_like(qkv))  # a replay must read the new input
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(replayed.float(), attention.triton(qkv).float()) <= 2e-3


@pytest.fixture
def graphed_and_eager(monkeypatch):
    """make(name) -> (CUDA-graph, eager) float16 triton encoders of random:name. The two could time
    fc1 + GELU differently and keep different (equally right) kernels; elementwise comparisons need
    the same ones, so cuBLAS is pinned."""
    from audioenc.backends import triton as backend_module

    monkeypatch.setattr(backend_module, "_faster", lambda first, second: False)

    def make(name):
        enc, eager = (audioenc.load(f"random:{name}", backend="triton", device="cuda", dtype="float16")
                      for _ in range(2))
        eager.backend.use_graphs = False
        return enc, eager

    return make


@pytest.mark.gpu
@gpu
def test_cuda_graphs_reuse_buckets_and_keep_items_independent(graphed_and_eager):
    enc, eager = graphed_and_eager("wavlm-base-plus")
    waves = [speech_like(n, 50 + i) for i, n in enumerate((70000, 52001, 16000))]
    first = enc.encode(waves)
    assert len(enc.backend._graphs) == 1
    again = enc.encode([w[:-400] for w in waves])           # same (batch, length) bucket: same graph
    assert len(enc.backend._graphs) == 1 and again.lengths.tolist() != first.lengths.tolist()
    torch.testing.assert_close(first.last_hidden_state, eager.encode(waves).last_hidden_state, rtol=2e-3, atol=2e-3)
    for i, wave in enumerate(waves):
        alone = enc.encode(wave)
        n = alone.lengths[0]
        assert rel_err(first.last_hidden_state[i, :n], alone.last_hidden_state[0]) <= 2e-3


@pytest.mark.gpu
@gpu
def test_graphs_sharing_one_memory_pool_never_overwrite_each_other(graphed_and_eager):
    enc, eager = graphed_and_eager("wav2vec2-base")
    batches = [[speech_like(16000, 90)], [speech_like(50000, 91), speech_like(30001, 92)],
               [speech_like(120000, 93 + i) for i in range(3)]]
    expected = [eager.encode(b).last_hidden_state for b in batches]
    for order in ([0, 1, 2], [2, 1, 0], [1, 0, 2, 0]):  # replays in and out of capture order
        for i in order:
            torch.testing.assert_close(enc.encode(batches[i]).last_hidden_state, expected[i], rtol=2e-3, atol=2e-3)
    assert len(enc.backend._graphs) == 3


@pytest.mark.gpu
@gpu
def test_threads_share_one_encoder():
    enc = audioenc.load("random:wav2vec2-base", backend="triton", device="cuda", dtype="float16")
    waves = [speech_like(16000 * (1 + i), 60 + i) for i in range(4)]
    expected = [enc.embed(w) for w in waves]
    results = [None] * 4

    def work(i):
        results[i] = [enc.embed(waves[i]) for _ in range(5)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for r in results[i]:
            assert torch.equal(r, expected[i])


@pytest.mark.gpu
@gpu
def test_auto_picks_triton_on_cuda():
    enc = audioenc.load("random:whisper-tiny")
    assert enc.backend.name == "triton" and enc.backend.dtype == torch.float16
    assert np.isfinite(enc.embed(speech_like(16000, 70)).cpu().numpy()).all()


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("path, approximate", [("fused", "none"), ("cublas", "none"), ("cublas", "tanh")])
def test_both_fc1_gelu_paths_meet_the_half_precision_rule(path, approximate):
    """The backend keeps whichever fc1 + GELU ran faster; both must be right, so force each in turn
    (cuBLAS's with the GELU in its epilogue, the default, and as a separate pass)."""
    from audioenc.backends.triton import _LinearGelu

    layer = torch.nn.Linear(1280, 5120).requires_grad_(False)
    choices = {}
    fc1 = _LinearGelu(layer, torch.float16, torch.device("cuda"), choices)
    fc1.approximate = approximate
    x = torch.randn(2, 1500, 1280, device="cuda")
    truth = torch.nn.functional.gelu(layer.cuda()(x))
    fc1(x.half())
    assert list(choices.values())[0] in ("fused", "cublas")  # timed once at the first call
    choices[next(iter(choices))] = path
    naive = torch.nn.functional.gelu(layer.half()(x.half()))
    assert rel_err(fc1(x.half()), truth) <= 2 * rel_err(naive, truth)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("path", ["fused", "split"])
def test_both_layer_norm_conv_paths_meet_the_half_precision_rule(path):
    """wav2vec2-large's conv layer 1 (512 -> 512, k3 s2, LayerNorm) at 10 s, forced each way."""
    from audioenc.backends.triton import _ConvLayerNormGelu

    conv, norm = torch.nn.Conv1d(512, 512, 3, 2), torch.nn.LayerNorm(512)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    torch.nn.init.normal_(norm.bias, 0.0, 0.2)
    layer = _ConvLayerNormGelu(conv.weight.detach().cuda().half(), conv.bias.detach().cuda().half(), 2,
                               (norm.weight.detach().cuda(), norm.bias.detach().cuda(), norm.eps), torch.float16)
    x = torch.nn.functional.gelu(torch.randn(2, 31999, 512, device="cuda"))
    reference = lambda t, dtype: torch.nn.functional.gelu(norm.to(t.device, dtype)(
        conv.to(t.device, dtype)(t.to(dtype).transpose(1, 2)).transpose(1, 2).float().to(dtype)))
    with torch.no_grad():
        truth = reference(x, torch.float32)
        layer(x.half())
        assert list(layer.choices.values())[0] in ("fused", "split")  # timed once at the first call
        layer.choices[next(iter(layer.choices))] = path
        naive = reference(x, torch.float16)
        assert rel_err(layer(x.half()), truth) <= 2 * rel_err(naive, truth)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("path", ["cudnn", "triton"])
@pytest.mark.parametrize("channels", [768, 1024], ids=["base", "large"])
def test_both_positional_conv_paths_meet_the_half_precision_rule(channels, path):
    """The positional conv of base and large models at 10 s, batch 4, forced each way."""
    from audioenc.backends.triton import _PositionalConv

    conv = torch.nn.Conv1d(channels, channels, 128, padding=64, groups=16).cuda()
    pos = _PositionalConv(conv, torch.float16, torch.device("cuda"))
    x = torch.randn(4, 499, channels, device="cuda")
    reference = lambda t, dtype: torch.nn.functional.gelu(conv.to(dtype)(t.to(dtype).transpose(1, 2))[..., :-1])
    with torch.no_grad():
        truth = reference(x, torch.float32).transpose(1, 2)
        pos(x.half())
        assert list(pos.choices.values())[0] in ("cudnn", "triton")  # timed once at the first call
        pos.choices[next(iter(pos.choices))] = path
        naive = reference(x, torch.float16).transpose(1, 2)
        assert rel_err(pos(x.half()), truth) <= 2 * rel_err(naive, truth)


@pytest.mark.gpu
@gpu
def test_graphs_without_hidden_states_do_not_hold_them():
    """A CUDA graph keeps whatever its forward returns. Whisper, whose layer outputs outweigh the rest
    of a forward: in wav2vec2 models the conv feature layers' peak, which the graph's pool keeps
    too, is larger than all hidden states together and hid them (H200, stop 26)."""
    waves = [speech_like(5 * 16000, 80 + i) for i in range(4)]
    held = {}
    for keep in (False, True):
        enc = audioenc.load("random:whisper-base", backend="triton", device="cuda", dtype="float16")
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_reserved()
        out = enc.encode(waves, output_hidden_states=keep)
        del out
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # what is left: the captured graph's pool and its static tensors
        held[keep] = torch.cuda.memory_reserved() - before
        assert [len(entry[3][1]) for entry in enc.backend._graphs.values()] == [7 if keep else 0]
        del enc
    hidden_bytes = 7 * 4 * 1500 * 512 * 4  # 7 float32 hidden states (the residual stream) of (4, 1500, 512)
    assert held[True] - held[False] >= hidden_bytes // 2, held


@pytest.mark.gpu
@gpu
def test_lists_run_in_whole_batch_buckets():
    """17 items run as 16 + 1, not as a CUDA graph of 32 with 15 dummy items; frames as one by one."""
    enc = audioenc.load("random:wav2vec2-base", backend="triton", device="cuda", dtype="float16")
    waves = [speech_like(32000, 100 + i) for i in range(17)]
    out = enc.encode(waves)
    assert sorted(key[0] for key in enc.backend._graphs) == [1, 16]
    for i in (0, 16):
        alone = enc.encode(waves[i])
        assert rel_err(out.last_hidden_state[i], alone.last_hidden_state[0]) <= 2e-3


def test_items_past_the_kernels_int32_offsets_are_refused(w2v_checkpoints):
    """The first conv layer's output of one item must stay under 2^31 elements (int32 offsets)."""
    backend = load(w2v_checkpoints["wav2vec2-group"][0]).backend
    conv_dim, stride = backend.model.dims.conv_dim[0], backend.model.dims.conv_stride[0]
    too_long = (2**31 // conv_dim) * stride + 100
    with pytest.raises(ValueError, match="the triton backend encodes items of up to about .* long_audio_threshold_s"):
        backend._check_item_size(too_long)
    backend._check_item_size(too_long // 2)
