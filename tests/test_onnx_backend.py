"""The onnx backend through audioenc.load: parity with the torch backend on padded batches and
middle layers, dtypes, the on-disk cache (reuse, corrupt and stale entries), threads, fusions."""
import os
import shutil
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("onnxruntime")

import audioenc  # noqa: E402
from audioenc import checkpoint_record, export, loading  # noqa: E402
from audioenc.backends.onnx import OnnxBackend  # noqa: E402
from audioenc.cache import KEY_NAME  # noqa: E402
from audioenc.verify import generated_audio  # noqa: E402
from conftest import W2V_VARIANTS, rel_err, speech_like  # noqa: E402

TOL = 1e-4


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    """One graph cache for this module's tests, away from the user's."""
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path_factory.getbasetemp() / "onnx-backend-cache"))


def cosine(a, b):
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).mean())


def assert_same_outputs(ours, ref, tol=TOL):
    assert torch.equal(ours.lengths, ref.lengths)
    for i, n in enumerate(ref.lengths.tolist()):
        assert rel_err(ours.last_hidden_state[i, :n], ref.last_hidden_state[i, :n]) <= tol
        for a, b in zip(ours.hidden_states, ref.hidden_states):
            assert rel_err(a[i, :n], b[i, :n]) <= tol
        assert torch.all(ours.last_hidden_state[i, n:] == 0)


def test_available():
    assert OnnxBackend.available() is None


@pytest.mark.parametrize("variant", list(W2V_VARIANTS))
def test_padded_batch_matches_torch_and_items_alone(variant, w2v_checkpoints):
    path, _ = w2v_checkpoints[variant]
    ref, enc = audioenc.load(path, backend="torch"), audioenc.load(path, backend="onnx")
    ref.cpu_max_padding = enc.cpu_max_padding = float("inf")  # one padded batch, not groups of similar length
    waves = [speech_like(n, 20 + i) for i, n in enumerate((400, 12000, 7321))]
    batch = enc.encode(waves, output_hidden_states=True)
    assert_same_outputs(batch, ref.encode(waves, output_hidden_states=True))
    for i, wave in enumerate(waves):
        alone = enc.encode(wave)
        n = int(alone.lengths[0])
        assert rel_err(batch.last_hidden_state[i, :n], alone.last_hidden_state[0]) <= 1e-5


@pytest.mark.parametrize("family", ["wav2vec2", "whisper"])
def test_int8_items_do_not_depend_on_their_batch(family, tmp_path):
    """Dynamic quantisation scales activations by their range over the batch tensor: int8 runs each
    item alone, so a loud neighbour does not change a quiet item. The model is wide enough (64) for
    its MatMuls to be quantised."""
    transformers = pytest.importorskip("transformers")

    if family == "whisper":
        config = transformers.WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=128,
                                            decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64)
        transformers.WhisperModel(config).save_pretrained(tmp_path)
    else:
        config = transformers.Wav2Vec2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=128, conv_dim=(64,) * 7)
        transformers.Wav2Vec2Model(config).save_pretrained(tmp_path)
    enc = audioenc.load(str(tmp_path), backend="onnx", dtype="int8")
    enc.cpu_max_padding = float("inf")  # one padded batch, not groups of similar length
    quiet, loud = 0.05 * speech_like(16000, 1), speech_like(24000, 2) * 20
    alone = enc.encode(quiet, output_hidden_states=True)
    batch = enc.encode([quiet, loud], output_hidden_states=True)
    n = int(alone.lengths[0])
    assert torch.equal(batch.last_hidden_state[0, :n], alone.last_hidden_state[0])
    assert torch.equal(batch.hidden_states[1][0, :n], alone.hidden_states[1][0])
    assert batch.last_hidden_state[0, n:].abs().max() == 0  # padding stays 0


def test_whisper_matches_torch(whisper_checkpoints):
    path, _ = whisper_checkpoints[128]
    waves = [speech_like(16000 * 3, 1), speech_like(16000 * 31, 2)]
    ref = audioenc.load(path, backend="torch").encode(waves, output_hidden_states=True)
    assert_same_outputs(audioenc.load(path, backend="onnx").encode(waves, output_hidden_states=True), ref)


def test_middle_layer_runs_a_shallower_graph(w2v_checkpoints):
    path, _ = w2v_checkpoints["wavlm-stable"]
    enc = audioenc.load(path, backend="onnx")
    wave = speech_like(9000, 4)
    mid = enc.encode(wave, output_layer=1)
    full = audioenc.load(path, backend="torch").encode(wave, output_hidden_states=True)
    assert rel_err(mid.last_hidden_state, full.hidden_states[1]) <= TOL
    assert list(enc.backend.sessions) == [(1, False)]
    assert len(enc.backend.sessions[1, False].get_outputs()) == 2  # frames, frame lengths
    assert rel_err(enc.encode(wave, output_layer=1, output_hidden_states=True).hidden_states[1], full.hidden_states[1]) <= TOL
    assert len(enc.backend.sessions[1, True].get_outputs()) == 2 + 2


def test_a_layer_sweep_keeps_the_last_sessions_used(w2v_checkpoints):
    """Each depth is a session holding its layers' weights (prepacked: wav2vec2-base's full depth about
    350 MB) and a thread pool: a sweep over output_layer, hidden states too, kept them all."""
    from audioenc.backends import onnx

    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="onnx")
    wave = speech_like(9000, 6)
    keys = [(layer, hidden) for hidden in (False, True) for layer in range(enc.num_layers + 1)]
    first = {}
    for layer, hidden in keys:
        first[layer, hidden] = enc.encode(wave, output_layer=layer, output_hidden_states=hidden)
        assert len(enc.backend.sessions) <= onnx.SESSION_CACHE_SIZE
    assert list(enc.backend.sessions) == keys[-onnx.SESSION_CACHE_SIZE:]
    kept, evicted = keys[-1], keys[0]
    enc.encode(wave, output_layer=kept[0], output_hidden_states=kept[1])  # now the most recent: kept
    with pytest.warns(UserWarning, match="output_hidden_states=True, which returns every layer from one run"):
        again = enc.encode(wave, output_layer=evicted[0], output_hidden_states=evicted[1])  # exported once, loaded again
    assert list(enc.backend.sessions)[-2:] == [kept, evicted]
    assert torch.equal(again.last_hidden_state, first[evicted].last_hidden_state)
    enc.backend.untrimmed.add(keys[1])  # a long call's session, evicted before its trim
    enc.backend.trim()
    assert not enc.backend.untrimmed
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per encoder
        enc.encode(wave, output_layer=keys[1][0], output_hidden_states=keys[1][1])


def test_threads_at_different_depths_share_a_small_session_cache(w2v_checkpoints, monkeypatch):
    """With room for one session, each thread's new depth evicts the session another thread is running:
    that run holds its session until it ends, and every result is its depth's."""
    from audioenc.backends import onnx

    monkeypatch.setattr(onnx, "SESSION_CACHE_SIZE", 1)
    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="onnx")
    wave = speech_like(12000, 7)
    want = {layer: enc.encode(wave, output_layer=layer).last_hidden_state for layer in range(enc.num_layers + 1)}
    errors = []

    def work(layer):
        try:
            for _ in range(4):
                assert torch.equal(enc.encode(wave, output_layer=layer).last_hidden_state, want[layer])
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(layer,)) for layer in want]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(enc.backend.sessions) == 1


def test_reference_weights_are_released_and_built_again_for_another_depth(w2v_checkpoints, tmp_path, monkeypatch):
    """Once a session holds the weights, the reference's copy is freed; a graph not in the cache is
    exported from weights built again from the checkpoint, which is refused once it has changed."""
    from audioenc.reference_weights import ReferenceWeights

    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path / "cache"))  # no graph of another test's
    rebuilds = []
    loaded = ReferenceWeights.loaded
    monkeypatch.setattr(ReferenceWeights, "loaded", lambda self: rebuilds.append(self.released) or loaded(self))
    path = str(tmp_path / "ckpt")
    shutil.copytree(w2v_checkpoints["wav2vec2-group"][0], path)
    monkeypatch.chdir(tmp_path)
    enc, ref = audioenc.load("ckpt", backend="onnx"), audioenc.load(path, backend="torch")
    wave = speech_like(9000, 5)
    full = enc.encode(wave)
    assert all(p.is_meta for p in enc.backend.reference.model.parameters())
    monkeypatch.chdir(tmp_path / "cache")  # a relative path is rebuilt from where it was at load
    expected = ref.encode(wave, output_hidden_states=True)
    assert rel_err(full.last_hidden_state, expected.last_hidden_state) <= TOL
    assert rel_err(enc.encode(wave, output_layer=1).last_hidden_state, expected.hidden_states[1]) <= TOL
    assert all(p.is_meta for p in enc.backend.reference.model.parameters())
    assert rebuilds == [False, True]  # the first export, then the rebuild for depth 1

    transformers = pytest.importorskip("transformers")

    model = transformers.Wav2Vec2Model.from_pretrained(path)
    with torch.no_grad():
        model.encoder.layers[0].feed_forward.output_dense.bias.add_(1.0)
    model.save_pretrained(path)
    assert torch.equal(enc.encode(wave).last_hidden_state, full.last_hidden_state)  # cached depths still run
    with pytest.raises(RuntimeError, match="weights changed since the encoder was loaded"):
        enc.encode(wave, output_layer=0)
    shutil.rmtree(path)
    with pytest.raises(RuntimeError, match="cannot be read now"):
        enc.encode(wave, output_layer=0)


def test_arena_is_trimmed_after_calls_over_30_s(w2v_checkpoints):
    """onnxruntime's arena keeps its peak: after a call with a run over 30 s of audio, one shortest
    run with arena shrinkage on hands it back; shorter calls pay nothing."""

    class Recording:  # the session, recording its plain runs (encode itself runs through io bindings)
        def __init__(self, session):
            self.session, self.shrinks = session, []

        def run(self, names, feeds, options=None):
            self.shrinks.append(options.get_run_config_entry("memory.enable_memory_arena_shrinkage"))
            return self.session.run(names, feeds, options)

        def __getattr__(self, name):
            return getattr(self.session, name)

    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="onnx")
    enc.encode(speech_like(16000, 1))
    session = enc.backend.sessions[enc.num_layers, False] = Recording(enc.backend.sessions[enc.num_layers, False])
    enc.encode(speech_like(16000 * 20, 2))
    assert session.shrinks == []
    long = speech_like(16000 * 31, 3)
    out = enc.encode(long)
    assert session.shrinks == ["cpu:0"] and not enc.backend.untrimmed
    assert torch.equal(enc.encode(long).last_hidden_state, out.last_hidden_state)


def test_pool_threads_stop_spinning_when_a_call_ends(w2v_checkpoints):
    """onnxruntime's pool threads spin between the parallel loops of a run, and by default for tens of
    ms after it too (about 50 ms each on a Xeon), taking the cores from whatever the caller does next.
    Here they stop when the run ends: an idle process after a call uses next to no CPU."""
    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="onnx")
    if enc.backend.session_options().intra_op_num_threads < 2:
        pytest.skip("one thread: no pool to spin")
    audio = speech_like(16000 * 4, 1)
    enc.encode(audio)
    idle = []
    for _ in range(3):
        enc.encode(audio)
        start = time.process_time()  # the CPU time of all the process's threads
        time.sleep(0.3)
        idle.append(time.process_time() - start)
    assert min(idle) < 0.02, idle


def test_streams_trim_the_arena_as_encode_does(w2v_checkpoints):
    """A service that only streams never calls encode: a big push (runs of 11 four-second windows)
    kept its peak in the arena for the life of the process (wav2vec2-base: 1.1 GB after a 60 s push)."""
    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="onnx")
    stream = enc.stream()
    assert len(stream.push(speech_like(16000 * 40, 4))) > 0
    assert not enc.backend.untrimmed


def test_dtypes(whisper_checkpoints, w2v_checkpoints):
    path, _ = w2v_checkpoints["wav2vec2-group"]
    with pytest.raises(ValueError, match="auto, float32, float16, bfloat16, int8"):
        audioenc.load(path, backend="onnx", dtype="int4")
    if os.uname().machine not in ("aarch64", "arm64"):
        with pytest.raises(ValueError, match="bfloat16"):
            audioenc.load(path, backend="onnx", dtype="bfloat16")
    assert audioenc.load(path, backend="onnx").backend.dtype == "float32"
    waves = [speech_like(16000, 7), speech_like(6000, 8)]
    ref = audioenc.load(path, backend="torch").encode(waves)
    for dtype, min_cos in (("int8", 0.995), ("float16", 0.999)):
        out = audioenc.load(path, backend="onnx", dtype=dtype).encode(waves)
        for i, n in enumerate(ref.lengths.tolist()):
            assert cosine(out.last_hidden_state[i, :n], ref.last_hidden_state[i, :n]) >= min_cos


def test_a_load_from_the_cache_does_not_import_onnx(w2v_checkpoints, tmp_path):
    """Only an export needs the onnx package: importing it costs a fresh process 0.1 s."""
    script = ("import sys, audioenc, numpy; enc = audioenc.load(sys.argv[1], backend='onnx'); "
              "enc.encode(numpy.sin(numpy.arange(8000, dtype=numpy.float32))); print('onnx' in sys.modules)")
    env = {**os.environ, "AUDIOENC_CACHE": str(tmp_path)}
    runs = [subprocess.run([sys.executable, "-c", script, w2v_checkpoints["wav2vec2-group"][0]], env=env,
                           capture_output=True, text=True, timeout=300) for _ in range(2)]
    assert [run.stdout.strip() for run in runs] == ["True", "False"], runs[-1].stderr[-2000:]  # exported, then cached


OUTLIER_CHANNELS = [3, 40, 61]


def model_with_outlier_channels(family: str, path) -> None:
    """A small model whose LayerNorms make a few channels 100x the rest in every layer, as trained
    encoders carry (the MatMuls or convs that read them take their weights' input channels / 100 in
    exchange). "wav2vec2-convs": in the conv feature encoder of a layer-norm model, whose int8 graph
    quantises those convs as MatMuls over gathered taps; "wav2vec2-group-convs": in a group-norm
    model's, whose convs have no norm (a conv's output channels are 100x there), quantised per block."""
    transformers = pytest.importorskip("transformers")
    from conftest import randomize

    if family == "whisper":
        config = transformers.WhisperConfig(d_model=128, encoder_layers=2, encoder_attention_heads=2,
                                            encoder_ffn_dim=256, decoder_layers=1, decoder_attention_heads=2,
                                            decoder_ffn_dim=64)
        model = randomize(transformers.WhisperModel(config))
        transformers.WhisperFeatureExtractor().save_pretrained(path)
        layers = model.encoder.layers
        norms = [(l.self_attn_layer_norm, [l.self_attn.q_proj, l.self_attn.k_proj, l.self_attn.v_proj]) for l in layers]
        norms += [(l.final_layer_norm, [l.fc1]) for l in layers]
    else:
        layer_norm_convs = dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
        convs = layer_norm_convs if family == "wav2vec2-convs" else {}
        config = transformers.Wav2Vec2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                             intermediate_size=256, conv_dim=(64,) * 7, **convs)
        model = randomize(transformers.Wav2Vec2Model(config))
        transformers.Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(path)
        if family == "wav2vec2-group-convs":
            layers = model.feature_extractor.conv_layers
            with torch.no_grad():
                for i in (2, 3, 4):
                    layers[i].conv.weight[OUTLIER_CHANNELS] *= 100
                    layers[i + 1].conv.weight[:, OUTLIER_CHANNELS] /= 100
            norms = []
        elif convs:
            layers = model.feature_extractor.conv_layers
            norms = [(layers[i].layer_norm, [layers[i + 1].conv]) for i in (2, 3, 4)]
        else:  # post-LN: the outliers ride the residual stream too
            layers = model.encoder.layers
            norms = [(l.layer_norm, [l.feed_forward.intermediate_dense]) for l in layers]
            norms += [(a.final_layer_norm, [b.attention.q_proj, b.attention.k_proj, b.attention.v_proj])
                      for a, b in zip(layers, layers[1:])]
    with torch.no_grad():
        for norm, readers in norms:
            bias = norm.bias[OUTLIER_CHANNELS]
            norm.weight[OUTLIER_CHANNELS] *= 100
            norm.bias[OUTLIER_CHANNELS] = 100 * bias + 30 * torch.sign(bias)
            for reader in readers:
                reader.weight[:, OUTLIER_CHANNELS] /= 100  # input channels: Linear (out, in), Conv1d (out, in, k)
    model.save_pretrained(path)


def standardized_cosine(out, ref) -> float:
    """Mean per-frame cosine after each channel is standardised by the reference's statistics: a few
    huge channels cannot hide that the others are wrong, as they do in the plain cosine."""
    mean, std = ref.mean(0), ref.std(0)
    return cosine((out - mean) / std, (ref - mean) / std)


@pytest.mark.parametrize("family", ["wav2vec2", "wav2vec2-convs", "wav2vec2-group-convs", "whisper"])
def test_int8_smooths_inputs_with_outlier_channels(family, tmp_path, monkeypatch):
    """One int8 scale per call leaves the ordinary channels of an input with outlier channels a few
    steps; the export finds such inputs on the model's own weights and moves their range into the
    weights' per-channel scales (exact in float). Without that the frames are wrong here. Gathered conv
    taps are smoothed at their source, which is still quantised once, before the gather."""
    import glob

    import onnx

    from audioenc import graph_precision

    model_with_outlier_channels(family, tmp_path / "ckpt")
    wave = speech_like(16000 * 2, 7)
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path / "cache"))
    ref = audioenc.load(str(tmp_path / "ckpt"), backend="onnx").encode(wave).last_hidden_state[0]
    smoothed = audioenc.load(str(tmp_path / "ckpt"), backend="onnx", dtype="int8").encode(wave).last_hidden_state[0]
    paths = glob.glob(str(tmp_path / "cache/onnx/*/model.onnx"))
    nodes = [node for path in paths for node in onnx.load(path, load_external_data=False).graph.node]
    assert sum(node.op_type == "Mul" and node.name.endswith("_smoothed") for node in nodes) >= 2
    if family == "wav2vec2-convs":
        made_by = {out: node.op_type for node in nodes for out in node.output}
        assert not [n for n in nodes if n.op_type == "DynamicQuantizeLinear" and made_by.get(n.input[0]) == "Concat"]
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path / "cache-unsmoothed"))
    monkeypatch.setattr(graph_precision, "OUTLIER_RATIO", float("inf"))
    plain = audioenc.load(str(tmp_path / "ckpt"), backend="onnx", dtype="int8").encode(wave).last_hidden_state[0]
    # (the plain cosine, which the outliers dominate, hides the wav2vec2 case: 0.99993 unsmoothed)
    smoothed, plain = standardized_cosine(smoothed, ref), standardized_cosine(plain, ref)
    assert smoothed >= 0.93 and 1 - smoothed <= (1 - plain) / 5, (smoothed, plain)


def test_int8_keeps_the_quiet_frames_of_speech_at_real_size():
    """A real-size group-norm model on audio with pauses (verify's generated speech): with one
    activation scale per call, an int8 graph that quantised the conv feature encoder left the
    quiet frames a few int8 steps (mean cosine 0.993 here; 0.64 with transformers' initialisation);
    export.int8_convs_per_block gives those convs a scale per block of frames."""
    ref = audioenc.load("random:wav2vec2-base", backend="torch")
    out = audioenc.load("random:wav2vec2-base", backend="onnx", dtype="int8").encode(generated_audio("wav2vec2", seed=3))
    want = ref.encode(generated_audio("wav2vec2", seed=3))
    assert torch.equal(out.lengths, want.lengths)
    for i, n in enumerate(want.lengths.tolist()):
        assert cosine(out.last_hidden_state[i, :n], want.last_hidden_state[i, :n]) >= 0.995


@pytest.fixture(scope="module")
def int8_sized(tmp_path_factory):
    """family -> checkpoint path of a model just wide enough for int8 to quantise every linear layer
    (the shared tiny checkpoints, 32 wide, are below QUANTIZE_MIN_ROWS: their int8 graphs keep all
    the encoder's MatMuls in float32). The WavLM is layer-norm (convs quantised one scale per call,
    wav2vec2-base's group norm has its real-size test above) with 64-wide heads, so its gate's
    Linear(head_dim, 8) is quantised too."""
    transformers = pytest.importorskip("transformers")
    from conftest import randomize

    out = {}
    path = tmp_path_factory.mktemp("int8-whisper")
    config = transformers.WhisperConfig(d_model=64, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=256,
                                        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64)
    randomize(transformers.WhisperModel(config)).save_pretrained(path)
    transformers.WhisperFeatureExtractor().save_pretrained(path)
    out["whisper"] = str(path)
    path = tmp_path_factory.mktemp("int8-wavlm")
    config = transformers.WavLMConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                                      conv_dim=(64,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
                                      feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                                      num_buckets=32, max_bucket_distance=60)
    randomize(transformers.WavLMModel(config)).save_pretrained(path)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(path)
    out["wavlm"] = str(path)
    return out


def float_and_quantized_matmuls(graph: str) -> tuple[list[str], int]:
    """(names of the MatMuls by a constant weight left in float, number of MatMulIntegers) of a graph."""
    import onnx

    proto = onnx.load(graph, load_external_data=False)
    weights = {init.name for init in proto.graph.initializer}
    nodes = proto.graph.node
    return ([n.name for n in nodes if n.op_type == "MatMul" and n.input[1] in weights],
            sum(n.op_type == "MatMulInteger" for n in nodes))


@pytest.mark.parametrize("family,left_float,quantized", [
    ("whisper", [], 2 * 6),  # q, k, v, out, fc1, fc2 per layer; the conv stem stays Conv
    # the first conv reads the waveform (a reduction of 10); layers: 6 + the gate; convs 1-6; the projection
    ("wavlm", ["/feature_extractor/convs.0/MatMul"], 2 * 7 + 6 + 1)])
def test_int8_quantises_every_linear_layer_and_meets_the_int8_rule(family, left_float, quantized, int8_sized,
                                                                    tmp_path, monkeypatch):
    """With every linear layer quantised, each layer's mean per-frame cosine to the float32 reference
    meets `audioenc verify`'s int8 rule, for every item of a batch."""
    from audioenc.verify import INT8_MIN_COSINE

    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path))
    waves = [speech_like(16000 * 3, 11), speech_like(12345, 12)]
    out = audioenc.load(int8_sized[family], backend="onnx", dtype="int8").encode(waves, output_hidden_states=True)
    (graph,) = [os.path.join(tmp_path, "onnx", entry, "model.onnx") for entry in os.listdir(tmp_path / "onnx")]
    assert float_and_quantized_matmuls(graph) == (left_float, quantized)
    ref = audioenc.load(int8_sized[family], backend="torch").encode(waves, output_hidden_states=True)
    assert torch.equal(out.lengths, ref.lengths)
    for i, n in enumerate(ref.lengths.tolist()):
        pairs = zip((*out.hidden_states, out.last_hidden_state), (*ref.hidden_states, ref.last_hidden_state))
        cosines = [cosine(a[i, :n], b[i, :n]) for a, b in pairs]
        assert min(cosines) >= INT8_MIN_COSINE, cosines
        assert cosines[-1] < 1 - 1e-7  # quantised: not the float32 frames
        assert torch.all(out.last_hidden_state[i, n:] == 0)


@pytest.mark.parametrize("family", ["whisper", "wavlm"])
def test_int8_streams_meet_the_int8_rule_against_a_float32_stream(family, int8_sized):
    """A stream's windows see less than the whole audio, so its frames differ from offline ones in
    any dtype; an int8 stream is judged against the float32 reference streaming the same windows.
    Audio that fits one window streams to the offline int8 frames exactly."""
    from audioenc.verify import INT8_MIN_COSINE

    path = int8_sized[family]
    enc, ref = audioenc.load(path, backend="onnx", dtype="int8"), audioenc.load(path, backend="torch")
    wave = speech_like(16000 * 4 + 555, 13)

    def streamed(encoder, wave, chunk_s=1.0):
        stream, rng, pieces, pos = encoder.stream(chunk_s=chunk_s), np.random.default_rng(5), [], 0
        while pos < len(wave):
            n = int(rng.integers(1, 9000))
            pieces.append(stream.push(wave[pos : pos + n]))
            pos += n
        pieces.append(stream.flush())
        frames = torch.cat([p.frames for p in pieces])
        assert np.allclose(np.concatenate([p.times for p in pieces]), np.arange(len(frames)) * 0.02)  # on the grid, once each
        return frames

    got, want = streamed(enc, wave), streamed(ref, wave)
    assert got.shape == want.shape == enc.encode(wave).last_hidden_state[0].shape
    assert INT8_MIN_COSINE <= cosine(got, want) < 1 - 1e-7
    short = wave[:12000]  # within one window: chunk and context
    assert torch.equal(streamed(enc, short, chunk_s=2.0), enc.encode(short).last_hidden_state[0])


def test_fusions_exact_gelu_in_float32(w2v_checkpoints):
    enc = audioenc.load(w2v_checkpoints["wav2vec2-stable"][0], backend="onnx")
    counts = enc.backend.fused_op_counts()
    assert counts["MultiHeadAttention"] == enc.num_layers
    assert counts["LayerNormalization"] + counts["SkipLayerNormalization"] >= 2 * enc.num_layers
    assert counts["Gelu"] + counts["BiasGelu"] >= enc.num_layers
    assert counts["FastGelu"] == 0  # tanh-approximate: never in float32


def test_a_model_object_keeps_its_weights_for_later_graphs(w2v_checkpoints, tmp_path, monkeypatch):
    """A model object cannot be read again, so its weights are not released once a session holds them."""
    transformers = pytest.importorskip("transformers")

    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path))  # graphs of its own, not the checkpoint's from other tests

    path, model = w2v_checkpoints["wav2vec2-group"]
    extractor = transformers.AutoFeatureExtractor.from_pretrained(path)
    enc, ref = audioenc.load(model, backend="onnx", preprocessor=extractor), audioenc.load(path, backend="torch")
    wave = speech_like(9000, 5)
    assert_same_outputs(enc.encode(wave, output_hidden_states=True), ref.encode(wave, output_hidden_states=True))
    assert not enc.backend.reference.released
    assert rel_err(enc.encode(wave, output_layer=1).last_hidden_state,
                   ref.encode(wave, output_layer=1).last_hidden_state) <= TOL
    # `audioenc cache` says where its graphs came from
    from audioenc.cache import list_entries

    assert any("(from Wav2Vec2Model object)" in entry.what for entry in list_entries())


def test_cache_reused_then_corrupt_and_stale_entries_rebuilt(whisper_checkpoints, monkeypatch, tmp_path):
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path))
    path, _ = whisper_checkpoints[80]
    calls = []
    real_export = export.export_onnx
    monkeypatch.setattr(export, "export_onnx", lambda *a, **k: (calls.append(1), real_export(*a, **k))[1])
    mel = torch.rand(1, 80, 3000)
    first = audioenc.load(path, backend="onnx").backend.run(mel, None, 2)[0]
    second = audioenc.load(path, backend="onnx").backend.run(mel, None, 2)[0]
    assert len(calls) == 1 and torch.equal(first, second)
    entry = os.path.join(tmp_path, "onnx", os.listdir(os.path.join(tmp_path, "onnx"))[0])
    graph = os.path.join(entry, "model.onnx")

    with open(graph, "r+b") as f:  # flipped bytes: the checksum catches it
        f.seek(100)
        f.write(b"\x00\xff\x00\xff")
    with pytest.warns(UserWarning, match="does not match its checksum"):
        out = audioenc.load(path, backend="onnx").backend.run(mel, None, 2)[0]
    assert len(calls) == 2 and rel_err(out, first) <= 1e-6

    meta = os.path.join(entry, "meta.json")
    with open(meta) as f:
        text = f.read()
    with open(meta, "w") as f:  # an entry made for another key
        f.write(text.replace('"key": "', '"key": "0'))
    with pytest.warns(UserWarning, match="key does not match"):
        audioenc.load(path, backend="onnx").backend.run(mel, None, 2)
    assert len(calls) == 3

    # intact checksums over a graph onnxruntime refuses: found when the session is created
    with open(graph, "wb") as f:
        f.write(b"not a graph")
    with open(meta) as f:
        text = f.read()
    import json

    meta_json = json.loads(text)
    meta_json["files"]["model.onnx"] = export.file_digest(graph)
    with open(meta, "w") as f:
        json.dump(meta_json, f)
    with pytest.warns(UserWarning, match="onnxruntime could not load it"):
        audioenc.load(path, backend="onnx").backend.run(mel, None, 2)
    assert len(calls) == 4

    # valid JSON of another shape, a directory where the graph belongs, a file where the entry belongs
    for damage, message in ((lambda: open(meta, "w").write("[1, 2]"), "not an audioenc cache record"),
                            (lambda: (os.remove(graph), os.mkdir(graph)), "model.onnx is missing"),
                            (lambda: (shutil.rmtree(entry), open(entry, "w").write("x")), "no readable meta.json")):
        damage()
        with pytest.warns(UserWarning, match=message):
            out = audioenc.load(path, backend="onnx").backend.run(mel, None, 2)[0]
        assert rel_err(out, first) <= 1e-6
    assert len(calls) == 7
    assert not [n for n in os.listdir(os.path.join(tmp_path, "onnx")) if n.startswith(".tmp")]


def test_loads_read_and_hash_only_what_changed(whisper_checkpoints, monkeypatch, tmp_path):
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path / "cache"))
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(whisper_checkpoints[80][0], checkpoint)
    read, hashed_weights, hashed_files = [], [], []
    real_read, real_weights, real_file = loading.load_checkpoint, checkpoint_record.weights_digest, export.file_digest
    monkeypatch.setattr(loading, "load_checkpoint", lambda *a, **k: (read.append(1), real_read(*a, **k))[1])
    monkeypatch.setattr(checkpoint_record, "weights_digest", lambda m: (hashed_weights.append(1), real_weights(m))[1])
    monkeypatch.setattr(export, "file_digest", lambda p: (hashed_files.append(p), real_file(p))[1])
    mel = torch.rand(1, 80, 3000)

    def run(layers=2):
        read.clear(), hashed_weights.clear(), hashed_files.clear()
        return audioenc.load(str(checkpoint), backend="onnx").backend.run(mel, None, layers)[0]

    first = run()  # reads and hashes the weights, exports the graph and checksums its files
    assert read == hashed_weights == [1] and hashed_files
    # from the checkpoint's record and the cached graph: no tensor read, nothing hashed
    assert torch.equal(run(), first) and not read and not hashed_weights and not hashed_files
    enc = audioenc.load(str(checkpoint), backend="onnx")
    assert enc.backend.reference.released and enc.dims == audioenc.load(str(checkpoint), backend="torch").dims
    # a depth with no graph yet: its weights are read then, and must hash to the recorded digest
    shallow = enc.backend.run(mel, None, 1)[0]
    assert rel_err(shallow, audioenc.load(str(checkpoint), backend="torch").backend.run(mel, None, 1)[0]) <= 1e-5

    entry = os.path.join(tmp_path, "cache", "onnx", os.listdir(os.path.join(tmp_path, "cache", "onnx"))[0])
    graph = os.path.join(entry, "model.onnx")
    os.utime(graph, ns=(0, 0))  # as a copied cache: the checksums are read once more, then recorded
    hashed = []  # over both depths: which entry listdir names first depends on the keys
    for layers in (1, 2):
        run(layers)
        hashed += hashed_files
    assert hashed == [graph]
    for layers in (1, 2):
        run(layers)
        assert not hashed_files

    tensors = load_file(checkpoint / "model.safetensors")
    (name,) = [n for n in tensors if n.endswith("encoder.layers.1.fc2.bias")]
    tensors[name] += torch.randn(tensors[name].shape)  # not a constant: the final LayerNorm would remove it
    save_file(tensors, checkpoint / "model.safetensors")
    changed = run()  # the checkpoint was rewritten: read and hashed again, another graph exported
    assert read == hashed_weights == [1]
    assert rel_err(changed, audioenc.load(str(checkpoint), backend="torch").backend.run(mel, None, 2)[0]) <= 1e-5
    assert not torch.allclose(changed, first, atol=1e-3)
    assert len(os.listdir(os.path.join(tmp_path, "cache", "onnx"))) == 3


def test_cache_key_covers_weights_and_options(whisper_checkpoints):
    model = audioenc.load(whisper_checkpoints[80][0], backend="torch").backend.model
    spec = export.ExportSpec(num_layers=2)
    key = export.cache_key(model, spec)
    assert key == export.cache_key(model, export.ExportSpec(num_layers=2))
    assert key != export.cache_key(model, export.ExportSpec(num_layers=1))
    assert key != export.cache_key(model, export.ExportSpec(num_layers=2, dtype="int8"))
    with torch.no_grad():
        model.layer_norm.bias.add_(1e-3)
    assert key != export.cache_key(model, spec)


def test_shared_by_threads(w2v_checkpoints):
    enc = audioenc.load(w2v_checkpoints["hubert-stable"][0], backend="onnx")
    waves = [speech_like(n, 30 + i) for i, n in enumerate((5000, 16000))]
    want = enc.encode(waves).last_hidden_state
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(enc.encode(waves).last_hidden_state)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 12
    assert all(torch.equal(r, want) for r in results)

    # Two encoders exporting their graphs at once: torch.onnx.export's state is process-wide.
    encoders = [audioenc.load(w2v_checkpoints[v][0], backend="onnx", dtype="int8") for v in ("hubert-stable", "wavlm-group")]
    outputs = {}

    def first_use(i):
        try:
            outputs[i] = encoders[i].encode(waves).lengths
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=first_use, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(outputs) == 2
    assert not outputs[0].is_inference()  # a plain tensor the caller may change


def run_script(tmp_path, source: str, *args: str, cache: bool = False, timeout: int = 300):
    """Runs ``source`` as a script in a fresh Python (``cache``: with a cache of its own) and checks
    that it printed "ok" and nothing else; returns its result."""
    script = tmp_path / "script.py"
    script.write_text(source)
    env = dict(os.environ, AUDIOENC_CACHE=str(tmp_path / "cache")) if cache else None
    result = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
    return result


FORKED_WORKERS = """
import multiprocessing, sys, numpy as np, torch, audioenc
enc = audioenc.load(sys.argv[1], backend=sys.argv[2])
waves = [np.random.default_rng(i).standard_normal(n).astype(np.float32) * 0.1 for i, n in enumerate((16000, 9000))]
big = [torch.randn(200000, 64), torch.randn(150000, 64)]  # enough to run torch's thread pool

def work(_):
    torch.nn.utils.rnn.pad_sequence(big, batch_first=True)  # a batch's outputs padded, at real size
    return enc.encode(waves).lengths.tolist()

want = work(0)
with multiprocessing.get_context("fork").Pool(2) as pool:
    assert pool.map_async(work, range(2)).get(timeout=60) == [want, want]
print("ok")
"""


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_forked_workers_do_not_hang(backend, w2v_checkpoints, tmp_path):
    """After the parent ran torch's thread pool, a forked child's parallel torch op hangs unless
    torch runs on one thread there (audioenc sets that at fork)."""
    run_script(tmp_path, FORKED_WORKERS, w2v_checkpoints["wav2vec2-group"][0], backend, timeout=240)


FORK_AFTER_A_LOAD = """
import multiprocessing, sys, numpy as np, audioenc
enc = audioenc.load(sys.argv[1], backend="torch")  # building the model runs torch's thread pool

def work(_):
    return enc.encode(np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1).lengths.tolist()

with multiprocessing.get_context("fork").Pool(1) as pool:  # before the parent's first encode
    assert pool.map_async(work, range(1)).get(timeout=60) == [[50]]
print("ok")
"""


def test_a_child_forked_after_a_load_does_not_hang(whisper_checkpoints, tmp_path):
    """A pre-forking server that loads in the parent and encodes only in its workers: the load alone
    ran torch's thread pool, which a forked child's first parallel op would hang on."""
    run_script(tmp_path, FORK_AFTER_A_LOAD, whisper_checkpoints[80][0], timeout=240)


FORK_DURING_EXPORT = """
import multiprocessing, sys, threading, time, numpy as np, torch, audioenc
from audioenc import torch_defaults
enc = audioenc.load(sys.argv[1], backend="onnx")
wave = np.zeros(16000, np.float32)

def child(_):
    return torch.get_default_dtype(), enc.encode(wave, output_layer=1).last_hidden_state.shape

def fork_and_run_child():
    with multiprocessing.get_context("fork").Pool(1) as pool:
        return pool.map_async(child, [0]).get(timeout=120)

torch.set_default_dtype(torch.float64)
export = threading.Thread(target=enc.warmup, kwargs=dict(seconds=1, output_layer=1))  # exports a 1-layer graph
export.start()
while not enc.backend.lock.locked():
    time.sleep(0.001)
assert fork_and_run_child()[0][1][1] > 0
load = threading.Thread(target=audioenc.load, args=("random:whisper-tiny",), kwargs=dict(backend="torch"))
load.start()
while not torch_defaults._inside:
    time.sleep(0.001)
dtype, _ = fork_and_run_child()[0]
assert dtype == torch.float64, dtype  # the caller's default, not the loading thread's float32
print("ok")
"""


FORK_AFTER_THREE_SESSIONS = """
import multiprocessing, sys, numpy as np, audioenc
enc = audioenc.load(sys.argv[1], backend="onnx")
wave = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
for layer in (0, 1, 2):  # the session cache is full when the server forks
    enc.encode(wave, output_layer=layer)

def work(_):  # a 4th graph: a session made in the parent is evicted in the child
    return len(enc.encode(wave, output_hidden_states=True).hidden_states)

with multiprocessing.get_context("fork").Pool(1) as pool:
    assert pool.map_async(work, range(1)).get(timeout=60) == [3]
print("ok")
"""


def test_a_forked_child_that_evicts_a_session_of_the_parent_does_not_hang(w2v_checkpoints, tmp_path):
    """Freeing a session made before a fork hangs in the child (onnxruntime waits for the parent's
    session threads), so a worker that needed a 4th graph hung: the child never frees those."""
    run_script(tmp_path, FORK_AFTER_THREE_SESSIONS, w2v_checkpoints["wav2vec2-group"][0], cache=True, timeout=240)


def test_a_fork_during_an_export_or_a_load_gives_a_working_child(w2v_checkpoints, tmp_path):
    """A pre-forking server that forks while a warm-up thread exports a graph: the fork waits for the
    export, and the child's encodes do not hang on a lock it inherited held; a load in another thread
    leaves the child the caller's default dtype."""
    run_script(tmp_path, FORK_DURING_EXPORT, w2v_checkpoints["wav2vec2-group"][0], cache=True)


WORKERS_ON_AN_EMPTY_CACHE = """
import multiprocessing, sys, time, numpy as np, audioenc
from audioenc import export

def work(_):
    build = export.build_graph

    def slow_build(*args, **kwargs):  # the export of a larger model: a window other workers arrive in
        time.sleep(1.0)
        build(*args, **kwargs)
        print("built", flush=True)

    export.build_graph = slow_build
    enc = audioenc.load(sys.argv[1], backend="onnx")
    return enc.encode(np.full(16000, 0.01, np.float32), output_layer=1).last_hidden_state.numpy()

with multiprocessing.get_context("fork").Pool(3) as pool:
    outputs = pool.map_async(work, range(3)).get(timeout=120)
assert all(np.array_equal(out, outputs[0]) for out in outputs)
print("ok")
"""


def test_workers_started_together_on_an_empty_cache_export_a_graph_once(w2v_checkpoints, tmp_path):
    """Workers of a service started at once on an empty cache: one exports each graph, the others
    wait for it rather than each exporting it again (N times the CPU, and the memory: GBs each for a
    large model), and no lock file stays behind."""
    script = tmp_path / "script.py"
    script.write_text(WORKERS_ON_AN_EMPTY_CACHE)
    env = dict(os.environ, AUDIOENC_CACHE=str(tmp_path / "cache"))
    result = subprocess.run([sys.executable, str(script), w2v_checkpoints["wav2vec2-group"][0]], env=env,
                            capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["built", "ok"], result.stdout
    assert [name for name in os.listdir(tmp_path / "cache" / "onnx") if not KEY_NAME.fullmatch(name)] == []


def test_a_rebuild_takes_the_entry_another_process_rebuilt_meanwhile(whisper_checkpoints, tmp_path, monkeypatch):
    """Workers that all find a graph onnxruntime cannot load (say, after an onnxruntime upgrade) rebuild
    it once: one that waited while another rebuilt it takes the new entry."""
    from audioenc.file_lock import file_lock

    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path))
    enc = audioenc.load(whisper_checkpoints[80][0], backend="onnx")
    spec = export.ExportSpec(num_layers=2, hidden_states=False, fused_attention=True)
    model, digest = enc.backend.reference.model, enc.backend.reference.digest
    entry = os.path.dirname(enc.backend.graph_path(2, False))
    shutil.copytree(entry, tmp_path / "rebuilt")  # the entry another process is about to put in place
    builds, result, looked = [], [], threading.Event()
    monkeypatch.setattr(export, "build_graph", lambda *args, **kwargs: builds.append(args))
    inode = export._inode
    monkeypatch.setattr(export, "_inode", lambda path: (inode(path), looked.set())[0])
    with file_lock(entry + ".lock", entry):  # held by the process that rebuilds it
        waiter = threading.Thread(target=lambda: result.append(
            export.cached_export(model, spec, digest, rebuild_reason="onnxruntime could not load it")))
        with pytest.warns(UserWarning, match="onnxruntime could not load it"):
            waiter.start()
            assert looked.wait(timeout=60)  # it found the unusable entry, and waits for the lock
        shutil.rmtree(entry)
        os.rename(tmp_path / "rebuilt", entry)
    waiter.join(timeout=60)
    assert builds == [] and result == [os.path.join(entry, "model.onnx")]


def test_a_fork_waits_for_the_session_runs_in_progress(w2v_checkpoints):
    """A fork while another thread runs an onnxruntime session (DataLoader workers started while a
    service thread encodes): a child forked mid-run hung at its first run on the mutexes the run held
    (2 of 150 forks), so the fork waits for the run."""
    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="onnx")
    wave = speech_like(4000, 3)
    enc.encode(wave)
    session, started, ended = enc.backend.sessions[(2, False)], threading.Event(), []

    class SlowSession:  # a run long enough to fork inside it
        def __getattr__(self, name):
            return getattr(session, name)

        def run_with_iobinding(self, binding):
            started.set()
            time.sleep(0.5)
            session.run_with_iobinding(binding)
            ended.append(time.monotonic())

    enc.backend.sessions[(2, False)] = SlowSession()
    run = threading.Thread(target=enc.encode, args=(wave,))
    run.start()
    assert started.wait(timeout=30)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write, repr(time.monotonic()).encode())
        os._exit(0)
    os.close(write)
    forked = float(os.read(read, 100))
    os.close(read)
    os.waitpid(pid, 0)
    run.join()
    assert ended and forked >= ended[0]


HOST_WARNINGS_DURING_EXPORT = """
import logging, sys, threading, time, warnings, torch, audioenc
warnings.simplefilter("always")  # an exporter warning that got through would show
enc = audioenc.load(sys.argv[1], backend="onnx")
tracer_filters = lambda: sum(f[2] is torch.jit.TracerWarning for f in warnings.filters)  # torch has one
before = tracer_filters()

def start_export(layers):
    export = threading.Thread(target=enc.warmup, kwargs=dict(seconds=1, output_layer=layers))  # a graph of `layers`
    export.start()
    while export.is_alive() and tracer_filters() == before:
        time.sleep(0.001)
    assert export.is_alive()  # inside the export, its filters in place
    return export

export = start_export(1)
warnings.filterwarnings("error", message="the host's own")  # the service's own settings, meanwhile
logging.captureWarnings(True)
export.join()
assert warnings.filters[0][1].pattern == "the host's own", warnings.filters[:4]
assert tracer_filters() == before  # the export's are gone
assert warnings.showwarning.__module__ == "logging", warnings.showwarning
export = start_export(2)
with warnings.catch_warnings():  # its exit puts back the list the export added to
    export.join()
assert tracer_filters() == before
print("ok")
"""


def test_an_export_keeps_the_warning_settings_other_threads_make_meanwhile(w2v_checkpoints, tmp_path):
    """An export ignores torch.onnx.export's own warnings, and nothing else: a filter or a
    logging.captureWarnings that a service's main thread sets while a warm-up thread exports stays."""
    result = run_script(tmp_path, HOST_WARNINGS_DURING_EXPORT, w2v_checkpoints["wav2vec2-group"][0], cache=True)
    assert "TracerWarning" not in result.stderr and "TorchScript" not in result.stderr, result.stderr[-3000:]


CONCURRENT_FORKS = """
import os, threading, time
from audioenc.fork_safe_lock import ForkSafeLock
held = ForkSafeLock(level=0)

def fork():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)

def export():  # a warm-up thread that holds a backend's lock for a while
    with held:
        time.sleep(0.3)

for _ in range(5):
    threads = [threading.Thread(target=export)] + [threading.Thread(target=fork) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not held.locked()
with held:
    fork()  # from the thread that holds the lock: it is that thread's own to release
print("ok")
"""


def test_forks_from_several_threads_at_once_leave_no_lock_held(tmp_path):
    run_script(tmp_path, CONCURRENT_FORKS, timeout=120)


def test_an_encoder_cannot_be_pickled_or_copied_and_says_so(w2v_checkpoints):
    import copy
    import pickle

    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="onnx")
    for attempt in (pickle.dumps, copy.deepcopy, copy.copy):
        with pytest.raises(TypeError, match="load one in each process"):
            attempt(enc)


def test_a_first_use_exports_in_a_process_without_stderr(w2v_checkpoints, tmp_path, monkeypatch):
    """A service started with stderr closed (sys.stderr is None) still exports its graphs: the
    progress bar, shown only on a terminal, is not written to None."""
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path / "cache"))
    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="onnx")
    monkeypatch.setattr(sys, "stderr", None)
    assert enc.encode(speech_like(16000, 7)).lengths.tolist() == [49]


def test_prepacking_follows_the_environment(w2v_checkpoints, monkeypatch):
    """AUDIOENC_ONNX_PREPACK=0: sessions read the mapped weights instead of private prepacked copies,
    with the same results."""
    waves = [speech_like(16000, 2)]
    want = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="onnx").encode(waves).last_hidden_state
    monkeypatch.setenv("AUDIOENC_ONNX_PREPACK", "0")
    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="onnx")
    assert enc.backend.session_options().get_session_config_entry("session.disable_prepacking") == "1"
    assert rel_err(enc.encode(waves).last_hidden_state, want) <= 1e-5
    monkeypatch.setenv("AUDIOENC_ONNX_PREPACK", "yes")
    with pytest.raises(ValueError, match="AUDIOENC_ONNX_PREPACK must be 0 or 1"):
        enc.backend.session_options()
    monkeypatch.delenv("AUDIOENC_ONNX_PREPACK")
    with pytest.raises(Exception):  # not set: onnxruntime has no such entry
        enc.backend.session_options().get_session_config_entry("session.disable_prepacking")


def test_thread_count_follows_the_environment(w2v_checkpoints, monkeypatch):
    enc = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="onnx")
    monkeypatch.setenv("AUDIOENC_ONNX_THREADS", "1")
    assert enc.backend.session_options().intra_op_num_threads == 1
    monkeypatch.setenv("AUDIOENC_ONNX_THREADS", "0")
    with pytest.raises(ValueError, match="AUDIOENC_ONNX_THREADS must be a whole number >= 1"):
        enc.backend.session_options()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a bad setting is the caller's error, not a corrupt graph to rebuild
        with pytest.raises(ValueError, match="AUDIOENC_ONNX_THREADS must be a whole number >= 1"):
            enc.encode(speech_like(4000, 1), output_layer=1)
    monkeypatch.delenv("AUDIOENC_ONNX_THREADS")
    assert enc.backend.session_options().intra_op_num_threads == min(len(os.sched_getaffinity(0)),
                                                                     torch.get_num_threads())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker: not a thread per core in each of them
    try:
        assert enc.backend.session_options().intra_op_num_threads == 1
    finally:
        torch.set_num_threads(threads)
