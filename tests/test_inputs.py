"""Bad input gets a clear ValueError / TypeError naming the problem, at every entry point."""
import io

import numpy as np
import pytest
import soundfile as sf
import torch

import audioenc
from audioenc.audio import load_audio, resample, to_waveforms, truncation
from conftest import speech_like


@pytest.fixture(scope="module")
def w2v(w2v_checkpoints):
    return audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="torch")


@pytest.fixture(scope="module")
def whisper(whisper_checkpoints):
    return audioenc.load(whisper_checkpoints[80][0], backend="torch")


BAD_ARRAYS = [
    (np.zeros(0, np.float32), ValueError, "empty"),
    (np.array([0.1, np.nan] * 300, np.float32), ValueError, "NaN or Inf"),
    (np.array([0.1, np.inf] * 300, np.float32), ValueError, "NaN or Inf"),
    (np.array([0.1, 1e300] * 300), ValueError, "the samples reach 1e[+]300, beyond float32's range"),
    (np.ones((2, 3, 400), np.float32), ValueError, "1-D .* or 2-D"),
    (np.ones(800, np.int8), TypeError, "unsupported sample type int8"),
    (np.ones(800, np.uint16), TypeError, "unsupported sample type"),
    (np.ones(800, np.complex64), TypeError, "unsupported sample type"),
    (torch.ones(800, dtype=torch.complex64), TypeError, "complex"),
    (torch.empty(800, device="meta"), TypeError, "meta device holds no samples"),
    (torch.ones(800).to_sparse(), TypeError, "sparse_coo tensor; pass a dense one"),
    (torch.ones(800, dtype=torch.bool), TypeError, "unsupported sample type torch.bool"),
    (torch.ones(800).to(torch.float8_e4m3fn), TypeError, "unsupported sample type torch.float8"),
    (np.ma.masked_array(np.ones(800, np.float32), mask=np.arange(800) == 3), TypeError, "masked samples"),
    (np.zeros((0, 400), np.float32), ValueError, r"audio: empty audio \(shape \(0, 400\)\)"),
    # empty in any layout says so, not that it looks like (samples, channels) or is not 1-D
    (np.zeros((1, 0), np.float32), ValueError, r"audio: empty audio \(shape \(1, 0\)\)"),
    (torch.zeros(0, 2), ValueError, r"audio: empty audio \(shape \(0, 2\)\)"),
    (np.zeros((1, 1, 0), np.float32), ValueError, r"audio: empty audio \(shape \(1, 1, 0\)\)"),
    ([np.zeros((1, 0), np.float32)], ValueError, r"audio\[0\]: empty audio \(shape \(1, 0\)\)"),
    ([], ValueError, "empty list"),
    ([0.1] * 800, TypeError, "this one holds numbers: pass one item's samples as an array"),
    ([np.ones((2, 400), np.float32)], ValueError, "must be 1-D"),
    (np.ones((16000, 2), np.float32), ValueError, r"looks like \(samples, channels\)"),
    (np.ones((16000, 12), np.float32), ValueError, r"looks like \(samples, channels\)"),  # too short for a batch
    (12345, TypeError, "expected a numpy array"),
    ({"audio": 1}, TypeError, "expected a numpy array"),
]


@pytest.mark.parametrize("audio,error,message", BAD_ARRAYS)
def test_bad_arrays(w2v, whisper, audio, error, message):
    for enc in (w2v, whisper):
        with pytest.raises(error, match=message):
            enc.encode(audio)


@pytest.mark.parametrize("rate", [0, 1000, 500000, -16000])
def test_unsupported_sample_rates(w2v, rate):
    with pytest.raises(ValueError, match="sample_rate"):
        w2v.encode(speech_like(16000), sample_rate=rate)


def test_audio_at_float32s_limit_is_refused_not_encoded_to_nan(w2v_checkpoints, whisper):
    loud = speech_like(16000, 4)
    loud = (loud / np.abs(loud).max() * np.float32(3e38)).astype(np.float32)  # finite, near float32's max
    with pytest.raises(ValueError, match="audio: resampling to 16 kHz overflows float32 .the samples reach 3e.38"):
        whisper.encode(loud, sample_rate=44100)
    raw = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="torch")
    raw.do_normalize = False  # the waveform reaches the conv stack as it is
    with pytest.raises(ValueError, match="audio item 1: the encoder's output holds NaN or Inf: the torch backend's "
                                         "float32 arithmetic overflowed"):
        raw.encode([speech_like(4000), loud])
    stream = raw.stream()
    with pytest.raises(ValueError, match="the encoder's output for this audio holds NaN or Inf"):
        stream.push(loud)
        stream.flush()
    assert torch.isfinite(raw.encode(speech_like(4000)).last_hidden_state).all()
    # far below float32's max, but the first conv's variance over time overflows: its GroupNorm would give
    # finite, wrong frames (found at 1e20); alone (torch's fused GroupNorm) and padded in a batch
    louder = speech_like(16000, 5) * np.float32(1e20)
    for audio, item in ((louder, 0), ([speech_like(4000), louder], 1)):
        with pytest.raises(ValueError, match=f"audio item {item}: the encoder's output holds NaN or Inf"):
            raw.encode(audio)


def test_a_float16_overflow_of_the_models_own_is_not_blamed_on_the_audio(w2v_checkpoints):
    half = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="torch", dtype="float16")
    with torch.no_grad():
        half.backend.model.feature_extractor.conv_layers[1].conv.weight.mul_(1e4)  # activations past 65504
    with pytest.raises(ValueError, match=r"float16 arithmetic overflowed \(its samples are within \[-1, 1\], so "
                                         "this model's own activations pass float16's range: use float32"):
        half.encode(speech_like(16000))


def test_sample_rate_must_be_a_whole_number_of_hz(w2v):
    wave = speech_like(16000)
    expected = w2v.encode(wave).last_hidden_state
    for rate in (16000.0, 16e3, np.float32(16000)):
        torch.testing.assert_close(w2v.encode(wave, sample_rate=rate).last_hidden_state, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="sample_rate must be a whole number of Hz, got 22050.5"):
        w2v.encode(wave, sample_rate=22050.5)
    for bad in ("16000", True, None):
        with pytest.raises(TypeError, match="sample_rate must be an int in Hz"):
            w2v.encode(wave, sample_rate=bad)


def test_too_short_for_one_frame(w2v, whisper):
    with pytest.raises(ValueError, match="at least 400 samples"):
        w2v.encode(speech_like(399))
    with pytest.raises(ValueError, match="at least 400 samples"):
        w2v.encode(np.array([0.5], np.float32))
    with pytest.raises(ValueError, match="at least 160 samples"):
        whisper.encode(np.array([0.5], np.float32))
    assert w2v.encode(speech_like(400)).lengths.item() == 1
    assert whisper.encode(speech_like(160)).lengths.item() == 1


def test_too_short_names_the_file_and_counts_after_resampling(w2v, tmp_path):
    sf.write(tmp_path / "short.wav", speech_like(1000, 3), 44100)  # 363 samples at 16 kHz
    with pytest.raises(ValueError, match=r"short\.wav: 363 samples at 16 kHz; .* at least 400 samples"):
        w2v.encode([speech_like(4000), str(tmp_path / "short.wav")])


def test_files(w2v, tmp_path):
    wave = speech_like(44100, 7)
    stereo = np.stack([wave, 0.5 * wave], axis=1)
    sf.write(tmp_path / "stereo.wav", stereo, 44100, subtype="PCM_16")
    out = w2v.encode(str(tmp_path / "stereo.wav"))
    assert out.lengths.item() == 49  # one second at any rate

    with pytest.raises(ValueError, match="is a directory"):
        w2v.encode(str(tmp_path))
    with pytest.raises(ValueError, match="no such file"):
        w2v.encode(str(tmp_path / "missing.wav"))
    (tmp_path / "loop.wav").symlink_to(tmp_path / "loop.wav")
    with pytest.raises(ValueError, match="loop.wav: a link that leads to no file"):
        w2v.encode(str(tmp_path / "loop.wav"))
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    with pytest.raises(ValueError, match="cannot decode"):
        w2v.encode(str(tmp_path / "corrupt.wav"))
    data = (tmp_path / "stereo.wav").read_bytes()
    (tmp_path / "truncated.flac").write_bytes(data[:30])
    with pytest.raises(ValueError, match="cannot decode|no audio samples"):
        w2v.encode(str(tmp_path / "truncated.flac"))
    sf.write(tmp_path / "empty.wav", np.zeros((0, 1), np.float32), 16000)
    with pytest.raises(ValueError, match="no audio samples"):
        w2v.encode(str(tmp_path / "empty.wav"))
    (tmp_path / "zero.flac").write_bytes(b"")
    with pytest.raises(ValueError, match="zero.flac: an empty file \\(0 bytes\\)"):
        w2v.encode(str(tmp_path / "zero.flac"))
    sf.write(tmp_path / "whole.wav", speech_like(64000, 8), 16000, subtype="PCM_16")
    whole = (tmp_path / "whole.wav").read_bytes()
    (tmp_path / "half.wav").write_bytes(whole[: len(whole) // 2])  # libsndfile alone reads the half silently
    with pytest.raises(ValueError, match="half.wav: truncated WAV file"):
        w2v.encode(str(tmp_path / "half.wav"))
    streamed = bytearray(whole)
    for unknown in (0xFFFFFFFF, 0x7FFFF000):  # FFmpeg's and arecord's unknown data size, writing to a pipe
        streamed[40:44] = unknown.to_bytes(4, "little")
        (tmp_path / "streamed.wav").write_bytes(bytes(streamed))
        assert len(load_audio(tmp_path / "streamed.wav")[0]) == 64000
    streamed[40:44] = (0x90000000).to_bytes(4, "little")  # a real 2.4 GB data chunk, cut short
    (tmp_path / "big.wav").write_bytes(bytes(streamed))
    with pytest.raises(ValueError, match="big.wav: truncated WAV file"):
        load_audio(tmp_path / "big.wav")
    # also declare their length (libsndfile clips AU's and NIST SPHERE's to the file's without a word)
    for fmt, kind in (("AIFF", "AIFF"), ("W64", "Wave64"), ("RF64", "RF64"), ("CAF", "CAF"), ("AU", "AU"),
                      ("NIST", "NIST SPHERE")):
        sf.write(tmp_path / f"whole.{fmt}", speech_like(31999, 10), 16000, format=fmt, subtype="PCM_16")
        assert len(load_audio(tmp_path / f"whole.{fmt}")[0]) == 31999
        whole = (tmp_path / f"whole.{fmt}").read_bytes()
        (tmp_path / f"half.{fmt}").write_bytes(whole[: len(whole) // 2])
        with pytest.raises(ValueError, match=f"half.{fmt}: truncated {kind} file"):
            load_audio(tmp_path / f"half.{fmt}")
    w64 = bytearray((tmp_path / "whole.W64").read_bytes())
    data = w64.index(b"data\xf3\xac\xd3\x11") + 16
    w64[data : data + 8] = (2**63 - 1).to_bytes(8, "little")  # FFmpeg's unknown length, writing to a pipe
    (tmp_path / "piped.W64").write_bytes(bytes(w64))
    assert len(load_audio(tmp_path / "piped.W64")[0]) == 31999
    caf = bytearray((tmp_path / "whole.CAF").read_bytes())
    caf[8:20] = b"free" + (2**62).to_bytes(8, "big")  # a chunk past the file's end (not seekable): the decoder's call
    (tmp_path / "odd.CAF").write_bytes(bytes(caf))
    assert truncation(str(tmp_path / "odd.CAF")) is None
    (tmp_path / "zeros.wav").write_bytes(b"RIFF" + (1 << 20).to_bytes(4, "little") + b"WAVE" + bytes(1 << 20))
    assert truncation(str(tmp_path / "zeros.wav")) is None
    sf.write(tmp_path / "slow.wav", speech_like(3000, 9), 2000)
    with pytest.raises(ValueError, match="slow.wav: sample_rate 2000 Hz"):
        w2v.encode(str(tmp_path / "slow.wav"))


def test_big_endian_pcm_is_scaled_like_native(w2v, whisper):
    native = (speech_like(16000, 11) * 20000).astype(np.int16)
    for enc in (w2v, whisper):
        for dtype in (">i2", ">i4"):
            pcm = native.astype(np.int32) * 65536 if dtype == ">i4" else native
            expected = enc.encode(pcm, sample_rate=44100).last_hidden_state
            assert torch.equal(enc.encode(pcm.astype(dtype), sample_rate=44100).last_hidden_state, expected)
    stream = w2v.stream(sample_rate=44100)
    swapped = w2v.stream(sample_rate=44100)
    a = [stream.push(native).frames, stream.flush().frames]
    b = [swapped.push(native.astype(">i2")).frames, swapped.flush().frames]
    assert torch.equal(torch.cat(a), torch.cat(b))


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_outputs_are_plain_tensors_that_autograd_and_in_place_writes_accept(backend, w2v_checkpoints,
                                                                           whisper_checkpoints):
    """Backends run in inference mode; callers train heads on the frames and edit them in place."""
    if backend == "onnx":
        pytest.importorskip("onnxruntime")
    for path in (w2v_checkpoints["wav2vec2-group"][0], whisper_checkpoints[80][0]):
        enc = audioenc.load(path, backend=backend)
        for out in (enc.encode(speech_like(4000)), enc.encode([speech_like(4000), speech_like(3000)]),
                    enc.encode(speech_like(4000), output_hidden_states=True)):
            for frames in (out.last_hidden_state, *(out.hidden_states or ()), out.lengths):
                assert not frames.is_inference()
            head = torch.nn.Linear(out.last_hidden_state.shape[-1], 2)
            head(out.last_hidden_state).sum().backward()
            out.last_hidden_state[:, 0] = 0


def test_half_precision_pooling_does_not_overflow(w2v):
    from audioenc.encoder import pool_frames

    frames = torch.full((1, 3000, 4), 30.0, dtype=torch.float16)  # a float16 sum of these is inf
    pooled = pool_frames(frames, torch.tensor([3000]), "mean")
    assert pooled.dtype == torch.float32 and torch.allclose(pooled, torch.full((1, 4), 30.0))


def test_valid_dtypes_and_shapes():
    wave = speech_like(1000)
    assert [w.shape for w in to_waveforms(np.stack([wave, wave]))] == [(1000,), (1000,)]
    assert to_waveforms(torch.from_numpy(wave).to(torch.bfloat16))[0].dtype == np.float32
    assert to_waveforms(wave.astype(np.float16))[0].dtype == np.float32
    assert to_waveforms((wave * 30000).astype(np.int16))[0].dtype == np.int16  # scaled later, in one pass
    assert to_waveforms((wave * 30000).astype(np.int16), sample_rate=8000)[0].dtype == np.float32
    rows = to_waveforms(np.matrix(np.stack([wave, wave])))  # np.matrix rows are 2-D: taken as arrays
    assert [type(w) for w in rows] == [np.ndarray] * 2 and [w.shape for w in rows] == [(1000,), (1000,)]


def test_api_argument_errors(w2v, w2v_checkpoints, whisper_checkpoints):
    wave = speech_like(1000)
    with pytest.raises(ValueError, match="output_layer must be between 0 and 2"):
        w2v.encode(wave, output_layer=3)
    with pytest.raises(TypeError, match="output_layer must be an int"):
        w2v.encode(wave, output_layer="2")
    for flag in ("yes", [1], None):
        with pytest.raises(TypeError, match="output_hidden_states must be True or False"):
            w2v.encode(wave, output_hidden_states=flag)
    assert len(w2v.encode(wave, output_hidden_states=np.bool_(True)).hidden_states) == 3
    with pytest.raises(ValueError, match="pool must be one of"):
        w2v.embed(wave, pool="median")
    with pytest.raises(ValueError, match="expected a whisper checkpoint, got wav2vec2"):
        audioenc.load(w2v_checkpoints["wav2vec2-group"][0], family="whisper")
    with pytest.raises(ValueError, match="backend 'cuda' is unknown"):
        audioenc.load(whisper_checkpoints[80][0], backend="cuda")
    with pytest.raises(TypeError, match="backend must be a name"):
        audioenc.load(whisper_checkpoints[80][0], backend=["torch"])
    with pytest.raises(ValueError, match="dtype 'int4' is not supported by the torch backend"):
        audioenc.load(whisper_checkpoints[80][0], backend="torch", dtype="int4")
    with pytest.raises(ValueError, match="unknown architecture"):
        audioenc.load("random:wav2vec3")
    for name, value, message in (("long_audio_threshold_s", float("nan"), "a number above 0"),
                                 ("cpu_max_padding", -1, "a number at least 0"),
                                 ("gpu_call_cost_s", float("inf"), "a finite number at least 0"),
                                 ("long_audio_chunk_s", "2", "a finite number above 0")):
        with pytest.raises(ValueError, match=f"{name} must be {message}, got"):
            setattr(w2v, name, value)
    with pytest.raises(TypeError, match="progress must be True or False"):
        w2v.encode(wave, progress="yes")
    with pytest.raises(ValueError, match="device 'meta': audioenc runs on the CPU"):
        audioenc.load(w2v_checkpoints["wav2vec2-group"][0], device="meta")


@pytest.mark.parametrize("backend", ["torch", "onnx"])
@pytest.mark.parametrize("family", ["wav2vec2", "whisper"])
def test_the_callers_torch_defaults_change_nothing(family, backend, w2v_checkpoints, whisper_checkpoints):
    """A caller's torch.set_default_dtype(float64) or `with torch.device(...)`: the same frames, in
    float32 on the CPU, from load, encode (long items' windows too), embed and streams."""
    path = whisper_checkpoints[80][0] if family == "whisper" else w2v_checkpoints["wav2vec2-group"][0]
    wave, short = speech_like(16000 * 3, 1), speech_like(5000, 2)

    def run():
        enc = audioenc.load(path, backend=backend)
        enc.long_audio_threshold_s = 2.0  # the 3 s item runs in windows
        stream = enc.stream()
        frames = [stream.push(short[:100]).frames, stream.push(wave).frames, stream.flush().frames]
        out = enc.encode([wave, short], output_layer=1)
        hidden = enc.encode([short, short[:4000]], output_hidden_states=True).hidden_states
        return [out.last_hidden_state, out.lengths, *hidden, enc.embed(short), *frames]

    expected = run()
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.device("meta"):  # every tensor made without a device would have no data
            got = run()
    finally:
        torch.set_default_dtype(dtype)
    for want, have in zip(expected, got, strict=True):
        assert have.dtype == want.dtype and have.device == want.device
        torch.testing.assert_close(have, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("autocast_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["torch", "onnx"])
@pytest.mark.parametrize("family", ["wav2vec2", "whisper"])
def test_the_callers_autocast_changes_nothing(family, backend, autocast_dtype, w2v_checkpoints, whisper_checkpoints,
                                              tmp_path, monkeypatch):
    """A float32 encoder inside the caller's torch.autocast computes in float32, and a graph exported
    there (the first call, in an empty cache) is the float32 graph that later calls without it use."""
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path))
    path = whisper_checkpoints[80][0] if family == "whisper" else w2v_checkpoints["wav2vec2-group"][0]
    wave = speech_like(7000, 3)
    enc = audioenc.load(path, backend=backend)
    with torch.autocast("cpu", dtype=autocast_dtype):
        got = enc.encode(wave).last_hidden_state
    expected = audioenc.load(path, backend=backend).encode(wave).last_hidden_state
    assert got.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_random_architectures_draw_the_same_weights_from_threads_loading_at_once():
    """torch has one generator and one default dtype per process: two loads at once, one of them
    under a caller's float64 default, must not change each other's weights."""
    import threading

    expected = audioenc.load("random:whisper-tiny", backend="torch").backend.model.state_dict()
    loaded = []

    def load_three():
        loaded.extend(audioenc.load("random:whisper-tiny", backend="torch").backend.model.state_dict() for _ in range(3))

    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        threads = [threading.Thread(target=load_three) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert torch.get_default_dtype() == torch.float64  # the caller's, once every load is done
    finally:
        torch.set_default_dtype(dtype)
    assert len(loaded) == 6 and all(torch.equal(d[k], v) for d in loaded for k, v in expected.items())


def test_random_architectures_leave_torchs_global_generator_to_the_caller():
    """A caller's thread drawing from torch's global generator while a random: architecture loads
    gets the values its own seed gives, and the load gets its usual weights."""
    import threading

    expected = audioenc.load("random:whisper-tiny", backend="torch").backend.model.state_dict()
    drawn, loading = [], threading.Event()

    def draw():
        loading.wait()
        while loading.is_set():
            drawn.append(torch.rand(1).item())

    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(1234)
        thread = threading.Thread(target=draw)
        thread.start()
        loading.set()
        got = audioenc.load("random:whisper-tiny", backend="torch").backend.model.state_dict()
        loading.clear()
        thread.join()
        torch.manual_seed(1234)
        want = [torch.rand(1).item() for _ in drawn]
    finally:
        torch.random.set_rng_state(state)
    assert len(drawn) > 10 and drawn == want  # none of them seeded by the load, none taken by it
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_random_architectures_draw_the_same_weights_whatever_the_default_dtype():
    expected = audioenc.load("random:whisper-tiny", backend="torch").backend.model.state_dict()
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        got = audioenc.load("random:whisper-tiny", backend="torch").backend.model.state_dict()
    finally:
        torch.set_default_dtype(dtype)
    assert all(torch.equal(got[k], v) for k, v in expected.items())


def test_warmup_runs_each_shape_once_and_checks_its_arguments(w2v, whisper, monkeypatch):
    for enc, default_samples in ((w2v, 160000), (whisper, None)):
        calls = []
        run = enc.backend.run
        monkeypatch.setattr(enc.backend, "run", lambda inputs, *a, _run=run, **k: calls.append(tuple(inputs.shape)) or _run(inputs, *a, **k))
        enc.warmup()
        if default_samples:
            assert calls == [(1, default_samples)]
        else:
            assert calls == [(1, whisper.dims.n_mels, 3000)]
    calls.clear()
    whisper.warmup(seconds=[1, 2.5], batch_sizes=(1, 3))
    assert [c[0] for c in calls] == [1] * 8  # (1 + 3 items) x 2 durations; the CPU runs one window per call
    hidden, w2v_run = [], w2v.backend.run
    monkeypatch.setattr(w2v.backend, "run", lambda *a: hidden.append(a[3]) or w2v_run(*a))
    w2v.warmup(seconds=1, output_hidden_states=True)  # the onnx backend's hidden-state graphs are separate
    assert hidden == [True]
    for bad in (0, float("nan"), []):
        with pytest.raises(ValueError, match="warmup seconds"):
            w2v.warmup(seconds=bad)
    for bad in (0, 1.5, True, ()):
        with pytest.raises(ValueError, match="warmup batch_sizes"):
            w2v.warmup(batch_sizes=bad)


def test_checkpoint_with_missing_or_foreign_tensors(w2v_checkpoints, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    src = w2v_checkpoints["wav2vec2-group"][0]
    for name, edit, message in (
        ("missing", lambda t: t.pop("encoder.layers.1.fc2.weight", None) or t.pop("encoder.layers.1.feed_forward.output_dense.weight"),
         "1 missing tensor.*a truncated checkpoint"),
        ("extra", lambda t: t.__setitem__("encoder.layers.0.attention.k_proj.extra", torch.ones(3)),
         r"1 unexpected tensor.*has no place for"),
        ("shape", lambda t: t.__setitem__("encoder.layer_norm.weight", torch.ones(7)), "encoder.layer_norm.weight has shape"),
    ):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        tensors = load_file(dst / "model.safetensors")
        edit(tensors)
        save_file(tensors, dst / "model.safetensors")
        with pytest.raises(ValueError, match=message):
            audioenc.load(str(dst), backend="torch")


@pytest.mark.parametrize("key,value", [("add_adapter", True), ("hidden_act", "relu"),
                                       ("feat_extract_norm", "batch")])
def test_unsupported_config_switch_names_the_key(w2v_checkpoints, tmp_path, key, value):
    import json
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(w2v_checkpoints["wav2vec2-group"][0], dst)
    config = json.loads((dst / "config.json").read_text())
    config[key] = value
    (dst / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=key):
        audioenc.load(str(dst), backend="torch")


def test_formats_soundfile_cannot_read_go_through_pyav(w2v, tmp_path):
    av = pytest.importorskip("av")
    wave = speech_like(22050, 8)
    path = str(tmp_path / "clip.m4a")
    with av.open(path, "w") as container:
        stream = container.add_stream("aac", rate=22050)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(wave[None, :], format="fltp", layout="mono")
        frame.sample_rate = 22050
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    data, rate = load_audio(path)
    assert rate == 22050 and abs(len(data) - len(wave)) < 4096
    assert 48 <= w2v.encode(path).lengths.item() <= 56  # AAC adds priming samples
    # The CLI's batching reads the length from the header too; a file nobody can read runs alone.
    from audioenc.embed_files import length_batches

    sf.write(tmp_path / "short.wav", wave[:1000], 16000)
    (tmp_path / "junk.m4a").write_bytes(b"not audio")
    jobs = [(str(tmp_path / name), name) for name in ("junk.m4a", "clip.m4a", "short.wav")]
    batches = [[target for _, target in batch] for batch in length_batches(jobs, batch_size=8, max_audio_s=2.5)]
    assert batches == [["short.wav", "clip.m4a"], ["junk.m4a"]]


def test_flac_cut_at_a_frame_boundary_is_truncated(tmp_path):
    """libsndfile fails on such a file and FFmpeg (the fallback) decodes up to the cut without a word:
    the samples STREAMINFO declares tell the truncation."""
    sf.write(tmp_path / "whole.flac", speech_like(48000, 11), 16000, subtype="PCM_16")
    whole = (tmp_path / "whole.flac").read_bytes()
    assert len(load_audio(tmp_path / "whole.flac")[0]) == 48000
    # frame starts (sync code 0xFFF8 with a fixed block size) after the first frame
    starts = [i for i in range(whole.index(b"\xff\xf8") + 2, len(whole) - 1) if whole[i : i + 2] == b"\xff\xf8"]
    cut = starts[len(starts) // 2]
    (tmp_path / "cut.flac").write_bytes(whole[:cut])
    with pytest.raises(ValueError,
                       match=r"cut.flac: truncated or corrupt FLAC file \(its header declares 48000 samples"):
        load_audio(tmp_path / "cut.flac")
    unknown = bytearray(whole)  # STREAMINFO's total samples 0: a stream of unknown length decodes whole
    field = int.from_bytes(unknown[18:26], "big") & ~((1 << 36) - 1)
    unknown[18:26] = field.to_bytes(8, "big")
    (tmp_path / "unknown.flac").write_bytes(bytes(unknown))
    assert len(load_audio(tmp_path / "unknown.flac")[0]) == 48000


@pytest.mark.parametrize("where", [0.25, 0.5, 0.95])
def test_flac_with_a_corrupt_frame_is_refused_not_decoded_to_garbage(tmp_path, where):
    """libsndfile fails on a frame whose CRC does not match; FFmpeg, the fallback, decoded it anyway,
    wrong samples and all (or a frame more than the file holds), unless told to check the CRCs."""
    pytest.importorskip("av")
    sf.write(tmp_path / "whole.flac", speech_like(48000, 12), 16000, subtype="PCM_16")
    damaged = bytearray((tmp_path / "whole.flac").read_bytes())
    damaged[int(len(damaged) * where)] ^= 0x55  # one flipped byte, as bit rot or a bad copy leaves
    (tmp_path / "damaged.flac").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=r"damaged.flac: (truncated or corrupt FLAC file|cannot decode audio)"):
        load_audio(tmp_path / "damaged.flac")


def test_wav_whose_data_size_was_never_written_decodes_to_its_end(tmp_path):
    """A recorder stopped before it wrote the sizes (GStreamer's wavenc without EOS) leaves 0 in the
    data chunk's size: libsndfile reads no samples, FFmpeg reads the data to the file's end. An empty
    WAV whose RIFF size declares a chunk after its data chunk stays empty."""
    pytest.importorskip("av")
    sf.write(tmp_path / "whole.wav", speech_like(31999, 13), 16000, subtype="PCM_16")
    whole = (tmp_path / "whole.wav").read_bytes()
    assert whole[36:40] == b"data"
    for riff_size in (0, 36):  # 36: the RIFF size of the header alone, as wavenc writes it first
        unfinished = bytearray(whole)
        unfinished[4:8], unfinished[40:44] = riff_size.to_bytes(4, "little"), bytes(4)
        (tmp_path / "unfinished.wav").write_bytes(bytes(unfinished))
        data, rate = load_audio(tmp_path / "unfinished.wav")
        np.testing.assert_array_equal(data, load_audio(tmp_path / "whole.wav")[0])
        assert rate == 16000
    (tmp_path / "header.wav").write_bytes(bytes(unfinished[:44]))  # no data at all
    listed = b"LIST" + (1000).to_bytes(4, "little") + b"INFOICMT" + (992).to_bytes(4, "little") + bytes(992)
    (tmp_path / "listed.wav").write_bytes(b"RIFF" + (36 + len(listed)).to_bytes(4, "little") + unfinished[8:44] + listed)
    for name in ("header.wav", "listed.wav"):
        with pytest.raises(ValueError, match=f"{name}: the file holds no audio samples"):
            load_audio(tmp_path / name)


def test_au_file_of_unknown_length_decodes_to_its_end(tmp_path):
    """0xFFFFFFFF in an AU header's size: a pipe writer's unknown size, not a truncation."""
    sf.write(tmp_path / "whole.AU", speech_like(31999, 12), 16000, format="AU", subtype="PCM_16")
    piped = bytearray((tmp_path / "whole.AU").read_bytes())
    piped[8:12] = b"\xff\xff\xff\xff"
    (tmp_path / "piped.AU").write_bytes(bytes(piped))
    assert len(load_audio(tmp_path / "piped.AU")[0]) == 31999


def test_integer_pcm_cast_to_float_warns_where_the_scale_matters(whisper, w2v):
    """int16 audio cast to float32 (samples in the thousands) gives Whisper's log-mel another signal
    with no error: a warning names the item. A model that normalises each item's waveform is not
    affected, and int16 PCM itself and float audio in [-1, 1] never warn."""
    import warnings

    x = speech_like(16000, 13)
    pcm = np.round(x * 32767).astype(np.int16)
    with pytest.warns(UserWarning, match=r"audio item 1: float samples reach .*integer PCM cast to float"):
        whisper.encode([x, pcm.astype(np.float32)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        whisper.encode([x, pcm, 1.5 * x])
        assert w2v.do_normalize
        w2v.encode(pcm.astype(np.float32))
    # a stream's blocks (a microphone's int16 cast to float32): once per stream, not once per block
    stream = whisper.stream()
    with pytest.warns(UserWarning, match=r"block: float samples reach .*integer PCM cast to float") as caught:
        for block in np.split(pcm.astype(np.float32), 4):
            stream.push(block)
    assert len([w for w in caught if "float samples reach" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for enc, block in ((whisper, pcm), (whisper, x), (w2v, pcm.astype(np.float32))):
            enc.stream().push(block)


def ogg_pages(data: bytes):
    """(offset, header, segment table, body) of each page of an Ogg file."""
    offset = 0
    while offset < len(data):
        n = data[offset + 26]
        table = data[offset + 27 : offset + 27 + n]
        yield offset, data[offset : offset + 27], table, data[offset + 27 + n : offset + 27 + n + sum(table)]
        offset += 27 + n + sum(table)


def reference_ogg_crc(data: bytes) -> int:
    """Ogg's CRC-32 bit by bit, as RFC 3533 and libogg define it."""
    register = 0
    for byte in data:
        register ^= byte << 24
        for _ in range(8):
            register = ((register << 1) ^ 0x04C11DB7 if register & 0x80000000 else register << 1) & 0xFFFFFFFF
    return register


def ogg_page(header: bytes, table: bytes, body: bytes, number: int, flags: int, granule: int) -> bytes:
    """A page renumbered, with the flags and granule position given and its CRC recomputed."""
    page = bytearray(header + table + body)
    page[5], page[6:14], page[18:22], page[22:26], page[26] = (flags, granule.to_bytes(8, "little"),
                                                                number.to_bytes(4, "little"), bytes(4), len(table))
    page[22:26] = reference_ogg_crc(bytes(page)).to_bytes(4, "little")
    return bytes(page)


def test_ogg_crc_matches_the_reference():
    from audioenc.ogg_pages import crc

    rng = np.random.default_rng(0)
    for size in (0, 1, 3, 255, 4099):
        data = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        assert crc(data) == reference_ogg_crc(data)
    assert crc(b"\x01") == 0x04C11DB7 and crc(b"\x80") == 0x690CE0EE  # not zlib's reflected CRC
    for subtype in ("VORBIS", "OPUS"):  # pages libsndfile (libogg) wrote
        buffer = io.BytesIO()
        sf.write(buffer, speech_like(16000, 14), 16000, format="OGG", subtype=subtype)
        for _, header, table, body in ogg_pages(buffer.getvalue()):
            zeroed = header[:22] + bytes(4) + header[26:] + table + body
            assert crc(zeroed) == reference_ogg_crc(zeroed) == int.from_bytes(header[22:26], "little")


@pytest.mark.parametrize("subtype", ["VORBIS", "OPUS"])
def test_ogg_with_a_damaged_or_missing_page_is_refused(tmp_path, subtype):
    """libogg skips a page whose CRC fails, and decoding goes on a page's audio (seconds) short:
    neither libsndfile nor FFmpeg says a word."""
    sf.write(tmp_path / "whole.ogg", speech_like(48000, 15), 16000, format="OGG", subtype=subtype)
    whole = (tmp_path / "whole.ogg").read_bytes()
    assert len(load_audio(tmp_path / "whole.ogg")[0]) == 48000
    pages = list(ogg_pages(whole))
    offset, header, table, body = pages[len(pages) // 2]
    damaged = bytearray(whole)
    damaged[offset + 27 + len(table) + len(body) // 2] ^= 0x55  # one flipped byte in the middle page's audio
    (tmp_path / "damaged.ogg").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=rf"damaged.ogg: truncated or corrupt Ogg file \(the page at byte {offset} "
                                         r"fails its CRC check\)"):
        load_audio(tmp_path / "damaged.ogg")
    damaged = bytearray(whole)
    damaged[offset + 1] ^= 0x55  # its "OggS" too: libogg looks for the next page
    (tmp_path / "damaged.ogg").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match=rf"truncated or corrupt Ogg file \(no Ogg page at byte {offset}"):
        load_audio(tmp_path / "damaged.ogg")
    # a page lost whole: every CRC holds (not the first audio page: where a live stream was joined late, it jumps)
    offset, header, table, body = pages[-2]
    end = offset + 27 + len(table) + len(body)
    (tmp_path / "gap.ogg").write_bytes(whole[:offset] + whole[end:])
    number = int.from_bytes(header[18:22], "little")
    with pytest.raises(ValueError, match=rf"gap.ogg: truncated or corrupt Ogg file \(the page at byte {offset} is "
                                         rf"page {number + 1} of stream .*, where page {number} was due"):
        load_audio(tmp_path / "gap.ogg")


@pytest.mark.parametrize("subtype", ["VORBIS", "OPUS"])
def test_ogg_cut_inside_a_page_is_truncated(tmp_path, subtype):
    sf.write(tmp_path / "whole.ogg", speech_like(48000, 16), 16000, format="OGG", subtype=subtype)
    whole = (tmp_path / "whole.ogg").read_bytes()
    pages = list(ogg_pages(whole))
    for offset, _, table, body in (pages[len(pages) // 2], pages[-1]):  # the last: decoders lose only its audio
        cut = offset + 27 + len(table) + len(body) // 2
        (tmp_path / "cut.ogg").write_bytes(whole[:cut])
        with pytest.raises(ValueError, match=rf"cut.ogg: truncated or corrupt Ogg file \(the page at byte {offset} "
                                             rf"runs past the file's end at byte {cut}\)"):
            load_audio(tmp_path / "cut.ogg")


def test_chained_ogg_decodes_every_link(tmp_path):
    """``cat a.ogg b.ogg`` (an internet-radio dump): libsndfile decoded the first link only. Links of
    other rates and channel counts join at the first one's rate, mixed to mono like any file."""
    sf.write(tmp_path / "a.ogg", speech_like(24000, 17), 16000, format="OGG", subtype="VORBIS")
    sf.write(tmp_path / "b.ogg", np.stack([speech_like(36000, 18)] * 2, 1), 48000, format="OGG", subtype="OPUS")
    a, b = (tmp_path / "a.ogg").read_bytes(), (tmp_path / "b.ogg").read_bytes()
    (tmp_path / "chain.ogg").write_bytes(a + b + a)
    data, rate = load_audio(tmp_path / "chain.ogg")
    first = load_audio(tmp_path / "a.ogg")[0]
    second = resample(load_audio(tmp_path / "b.ogg")[0], 48000, 16000)
    assert rate == 16000 and len(data) == 24000 + 12000 + 24000
    np.testing.assert_array_equal(data[:24000], first)
    np.testing.assert_array_equal(data[24000:36000], second)
    np.testing.assert_array_equal(data[36000:], first)  # the same serial number twice, as cat a.ogg a.ogg makes
    # The CLI's batching: the header gives the first link's 1.5 s of the chain's 3.75, so it runs alone.
    from audioenc.embed_files import length_batches

    jobs = [(str(tmp_path / name), name) for name in ("chain.ogg", "a.ogg", "b.ogg")]
    batches = [[target for _, target in batch] for batch in length_batches(jobs, batch_size=8, max_audio_s=5)]
    assert batches == [["b.ogg", "a.ogg"], ["chain.ogg"]]
    damaged = bytearray(a + b)
    damaged[len(a) + len(b) // 2] ^= 0x55  # the second link's pages are checked too
    (tmp_path / "damaged.ogg").write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="damaged.ogg: truncated or corrupt Ogg file"):
        load_audio(tmp_path / "damaged.ogg")


def write_ogg_flac(path, wave: np.ndarray, rate: int, av) -> None:
    with av.open(str(path), "w", format="ogg") as container:
        stream = container.add_stream("flac", rate=rate)
        stream.layout = "mono"
        for start in range(0, len(wave), 4096):
            frame = av.AudioFrame.from_ndarray((wave[None, start : start + 4096] * 32767).astype(np.int16),
                                               format="s16", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)


def test_ogg_flac_links_libsndfile_cannot_read_go_through_pyav(tmp_path):
    """Each link of a chain is decoded on its own, from memory: through FFmpeg where libsndfile fails."""
    av = pytest.importorskip("av")
    write_ogg_flac(tmp_path / "a.oga", speech_like(20000, 19), 16000, av)
    write_ogg_flac(tmp_path / "b.oga", speech_like(30000, 20), 16000, av)
    single = load_audio(tmp_path / "a.oga")[0]
    assert len(single) == 20000
    (tmp_path / "chain.oga").write_bytes((tmp_path / "a.oga").read_bytes() + (tmp_path / "b.oga").read_bytes())
    data, rate = load_audio(tmp_path / "chain.oga")
    assert rate == 16000 and len(data) == 50000
    np.testing.assert_array_equal(data[:20000], single)


@pytest.mark.parametrize("subtype", ["VORBIS", "OPUS"])
def test_valid_ogg_files_pass_the_page_checks(tmp_path, subtype):
    """Pages a packet continues onto, and a page with no segments at all, are valid Ogg; so is a
    file of 0.01 s, or one that ends without its last page's end-of-stream flag (a recorder
    stopped before it wrote that page, as an unwritten WAV size is decoded to its end)."""
    sf.write(tmp_path / "short.ogg", speech_like(160, 21), 16000, format="OGG", subtype=subtype)
    assert len(load_audio(tmp_path / "short.ogg")[0]) == 160
    sf.write(tmp_path / "whole.ogg", speech_like(48000, 22), 16000, format="OGG", subtype=subtype)
    whole = (tmp_path / "whole.ogg").read_bytes()
    pages, number = [], 0
    for _, header, table, body in ogg_pages(whole):
        granule = int.from_bytes(header[6:14], "little")
        # a cut inside a packet, where no packet ends before it (or on a header page: granule 0 throughout)
        cuts = [m for m in range(1, len(table)) if table[m - 1] == 255 and (granule == 0 or min(table[:m]) == 255)]
        if header[5] & 2 or not cuts:
            pages.append(ogg_page(header, table, body, number, header[5], granule))
            number += 1
            continue
        size = sum(table[: cuts[0]])
        pages += [ogg_page(header, table[: cuts[0]], body[:size], number, header[5] & ~4, granule or 2**64 - 1),
                  ogg_page(header, b"", b"", number + 1, header[5] & ~4 | 1, 2**64 - 1),  # empty, continued
                  ogg_page(header, table[cuts[0] :], body[size:], number + 2, header[5] | 1, granule)]
        number += 3
    assert number > len(list(ogg_pages(whole)))
    (tmp_path / "paged.ogg").write_bytes(b"".join(pages))
    np.testing.assert_array_equal(load_audio(tmp_path / "paged.ogg")[0], load_audio(tmp_path / "whole.ogg")[0])
    last = list(ogg_pages(whole))[-1][0]
    (tmp_path / "stopped.ogg").write_bytes(whole[:last])
    assert 0 < len(load_audio(tmp_path / "stopped.ogg")[0]) < 48000


def test_ogg_with_a_tag_after_its_end_decodes(tmp_path):
    """An ID3v1 or APE tag, or padding, after every stream's last page: decoders skip it and lose
    nothing. Where an "OggS" follows, it is a damaged page of a link to come: still refused."""
    sf.write(tmp_path / "whole.ogg", speech_like(16000, 23), 16000, format="OGG", subtype="VORBIS")
    whole = (tmp_path / "whole.ogg").read_bytes()
    for tail in (b"TAG" + bytes(125), b"APETAGEX" + bytes(24), bytes(100)):
        (tmp_path / "tagged.ogg").write_bytes(whole + tail)
        np.testing.assert_array_equal(load_audio(tmp_path / "tagged.ogg")[0], load_audio(tmp_path / "whole.ogg")[0])
    (tmp_path / "chain.ogg").write_bytes(whole + b"TAG" + whole[3:])  # the second link's first "OggS" damaged
    with pytest.raises(ValueError, match=rf"chain.ogg: .* \(no Ogg page at byte {len(whole)}, where one was due"):
        load_audio(tmp_path / "chain.ogg")


@pytest.mark.parametrize("subtype", ["VORBIS", "OPUS"])
def test_ogg_of_a_live_stream_joined_late_decodes(tmp_path, subtype):
    """A listener joining an Icecast stream late gets its header pages (granule 0), then its pages
    from where it is now: the page number jumps once, and nothing in the file is lost."""
    sf.write(tmp_path / "whole.ogg", speech_like(48000, 24), 16000, format="OGG", subtype=subtype)
    pages = list(ogg_pages((tmp_path / "whole.ogg").read_bytes()))
    headers = [page for page in pages if int.from_bytes(page[1][6:14], "little") == 0]
    joined = []
    for i, (_, header, table, body) in enumerate(pages):
        number = int.from_bytes(header[18:22], "little") + (1000 if i >= len(headers) else 0)
        joined.append(ogg_page(header, table, body, number, header[5], int.from_bytes(header[6:14], "little")))
    (tmp_path / "joined.ogg").write_bytes(b"".join(joined))
    np.testing.assert_array_equal(load_audio(tmp_path / "joined.ogg")[0], load_audio(tmp_path / "whole.ogg")[0])
    (tmp_path / "gap.ogg").write_bytes(b"".join(joined[: len(headers) + 1] + joined[len(headers) + 2 :]))
    with pytest.raises(ValueError, match=r"gap.ogg: truncated or corrupt Ogg file .* pages are missing"):
        load_audio(tmp_path / "gap.ogg")
