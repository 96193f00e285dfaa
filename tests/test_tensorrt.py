"""TensorRT backend. Profiles are checked everywhere; engines only where TensorRT and a GPU exist
(never on the machines this was written on: those tests skip)."""
import pytest
import torch

import audioenc
from audioenc.backends.tensorrt import Profile, TensorRTBackend
from audioenc.config import Wav2Vec2Dims, WhisperDims
from conftest import rel_err, speech_like

needs_tensorrt = pytest.mark.skipif(TensorRTBackend.available() is not None,
                                    reason=f"TensorRT backend: {TensorRTBackend.available()}")


def test_profiles_from_ranges():
    w2v = Profile.from_ranges(Wav2Vec2Dims("wav2vec2"), (1, 2, 8), (0.01, 10, 30))
    assert w2v.shapes == (("waveforms", (1, 400), (2, 160000), (8, 480000)), ("lengths", (1,), (2,), (8,)))
    whisper = Profile.from_ranges(WhisperDims(n_mels=128), (1, 4, 16))
    assert whisper.shapes == (("mel", (1, 128, 3000), (4, 128, 3000), (16, 128, 3000)),)
    with pytest.raises(ValueError, match="outside the engine's profile"):
        w2v.check({"waveforms": torch.zeros(9, 1000), "lengths": torch.zeros(9)})


def test_profile_from_env(monkeypatch):
    monkeypatch.setenv("AUDIOENC_TRT_PROFILE", "batch=1:4:4,seconds=1:2:3")
    assert Profile.from_env(Wav2Vec2Dims("hubert")).shapes[0] == ("waveforms", (1, 16000), (4, 32000), (4, 48000))
    monkeypatch.setenv("AUDIOENC_TRT_PROFILE", "batch=4")  # one number: min, opt and max, as --batch takes it
    assert Profile.from_env(Wav2Vec2Dims("hubert")).shapes[1] == ("lengths", (4,), (4,), (4,))
    for text, message in (("batch=0:0:0", "0 < MIN <= OPT <= MAX"), ("batch=-4:1:2", "0 < MIN"),
                          ("batch=8:4:1", "0 < MIN"), ("batch=1.5:2:3", "whole numbers"),
                          ("seconds=a:b:c", "seconds must be MIN:OPT:MAX or one number"),
                          ("seconds=1:2:inf", "0 < MIN"), ("frames=1:2:3", "expected batch=")):
        monkeypatch.setenv("AUDIOENC_TRT_PROFILE", text)
        with pytest.raises(ValueError, match=f"AUDIOENC_TRT_PROFILE.*{message}"):
            Profile.from_env(Wav2Vec2Dims("hubert"))


def test_unavailable_is_a_clear_error():
    reason = TensorRTBackend.available()
    if reason is None:
        pytest.skip("TensorRT is available here")
    with pytest.raises(ValueError, match="not available here"):
        audioenc.load("random:whisper-tiny", backend="tensorrt")


def test_engines_are_built_without_tf32(tmp_path, monkeypatch):
    """TensorRT allows TF32 for float32 MatMuls and Convs unless told not to (10-bit mantissas: about
    1e-3 off the reference, where a float32 engine must be within 1e-4). Built here with a stand-in
    for TensorRT's Python API, which records the calls."""
    import sys
    from unittest import mock

    from audioenc.backends import tensorrt as backend

    trt = mock.MagicMock()
    config = trt.Builder.return_value.create_builder_config.return_value
    config.get_timing_cache.return_value.serialize.return_value = b"timings"
    trt.Builder.return_value.build_serialized_network.return_value = b"engine"
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    profile = Profile.from_ranges(WhisperDims(n_mels=80))
    assert backend.build_engine("model.onnx", profile, str(tmp_path / "timing.cache")) == b"engine"
    config.clear_flag.assert_any_call(trt.BuilderFlag.TF32)
    assert (tmp_path / "timing.cache").read_bytes() == b"timings"


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float16", 2e-2)])
def test_engine_matches_reference(w2v_checkpoints, dtype, tol, tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path))
    path, _ = w2v_checkpoints["wavlm-stable"]
    waves = [speech_like(n, i) for i, n in enumerate((16000, 5000))]
    ref = audioenc.load(path, backend="torch", device="cpu").encode(waves, output_hidden_states=True)
    enc = audioenc.load(path, backend="tensorrt", device="cuda", dtype=dtype)
    plain, out = enc.encode(waves), enc.encode(waves, output_hidden_states=True)  # two engines
    assert plain.hidden_states is None and len(out.hidden_states) == len(ref.hidden_states)
    for i, n in enumerate(ref.lengths.tolist()):
        for got, want in [(plain.last_hidden_state, ref.last_hidden_state), (out.last_hidden_state, ref.last_hidden_state),
                          *zip(out.hidden_states, ref.hidden_states)]:
            assert rel_err(got[i, :n].cpu(), want[i, :n]) <= tol


@pytest.mark.tensorrt
@needs_tensorrt
def test_engine_cache_rebuilds_corrupt_entry(whisper_checkpoints, tmp_path, monkeypatch):
    import glob

    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path))
    path, _ = whisper_checkpoints[80]
    mel = torch.rand(1, 80, 3000, device="cuda")
    first = audioenc.load(path, backend="tensorrt", device="cuda", dtype="float32").backend.run(mel, None, 2)[0]
    (plan,) = glob.glob(f"{tmp_path}/tensorrt/*/engine.plan")
    with open(plan, "r+b") as f:
        f.write(b"garbage")
    with pytest.warns(UserWarning, match="checksum"):
        again = audioenc.load(path, backend="tensorrt", device="cuda", dtype="float32").backend.run(mel, None, 2)[0]
    assert rel_err(again, first) <= 1e-6
