"""The native wav2vec2-family input path against its Python reference and Hugging Face's."""
import os
import subprocess
import sys

import numpy as np
import pytest

from audioenc import _native
from audioenc.frontend import normalize_waveforms, normalize_waveforms_ref
from conftest import speech_like

transformers = pytest.importorskip("transformers")

needs_ext = pytest.mark.skipif(_native._C is None, reason=f"native core: {_native.import_error}")


def padded(waves, dtype):
    lengths = np.array([len(w) for w in waves])
    batch = np.zeros((len(waves), lengths.max()), dtype)
    for row, w in zip(batch, waves):
        row[: len(w)] = w
    return batch, lengths


@needs_ext
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int16, np.int32])
@pytest.mark.parametrize("normalize", [True, False])
def test_native_matches_reference(dtype, normalize):
    rng = np.random.default_rng(0)
    waves = []
    for n in (1, 2, 97, 1025, 16000):
        w = speech_like(n, int(rng.integers(1000))) * 3
        if np.dtype(dtype).kind == "i":
            w = (w.astype(np.float64) * (0.9 * np.iinfo(dtype).max) / np.abs(w).max()).astype(dtype)
        waves.append(w.astype(dtype))
    batch, lengths = padded(waves, dtype)
    got = normalize_waveforms(batch, lengths, normalize)
    want = normalize_waveforms_ref(batch, lengths, normalize)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for b, n in enumerate(lengths):
        assert np.all(got[b, n:] == 0)


def test_reference_matches_hugging_face():
    waves = [speech_like(n, n) * 2 + 0.05 for n in (400, 5000, 16001)]
    fe = transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True)
    ref = fe(waves, sampling_rate=16000, padding=True, return_tensors="np")["input_values"]
    batch, lengths = padded(waves, np.float32)
    np.testing.assert_allclose(normalize_waveforms_ref(batch, lengths), ref, rtol=1e-5, atol=1e-6)


@needs_ext
def test_native_errors():
    with pytest.raises(TypeError, match="unsupported sample type"):
        _native._C.normalize_waveforms(np.zeros((1, 4), np.int8), np.array([4]))
    with pytest.raises(ValueError, match="outside"):
        _native._C.normalize_waveforms(np.zeros((1, 4), np.float32), np.array([5]))
    with pytest.raises(ValueError, match="2-D"):
        _native._C.normalize_waveforms(np.zeros(4, np.float32), np.array([4]))


def test_package_runs_without_the_extension(tmp_path):
    code = ("import numpy as np, audioenc; from audioenc import _native; assert _native._C is None; "
            "enc = audioenc.load('random:wavlm-base-plus'); "
            "print(enc.embed(np.random.default_rng(0).standard_normal(8000).astype('float32')).shape)")
    env = dict(os.environ, AUDIOENC_NO_EXT="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([1, 768])" in result.stdout
    info = subprocess.run([sys.executable, "-m", "audioenc", "info"], env=env, capture_output=True, text=True, timeout=120)
    assert "native core: disabled by AUDIOENC_NO_EXT=1; using the Python paths" in info.stdout  # not "not built"
