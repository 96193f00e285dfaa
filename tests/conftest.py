"""Shared fixtures: tiny random Hugging Face checkpoints saved to disk, and test audio."""
from __future__ import annotations

import functools
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

# The real conv stack (receptive field 400, hop 320) with few channels, so lengths are realistic.
TINY_W2V = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                conv_dim=(24,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
TINY_WHISPER = dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=48,
                    decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=48,
                    max_source_positions=1500)

# name -> (family, config overrides, do_normalize)
W2V_VARIANTS = {
    "wav2vec2-group": ("wav2vec2", dict(feat_extract_norm="group"), True),
    "wav2vec2-stable": ("wav2vec2", dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True), True),
    "wav2vec2-layer-postln-oddpos": ("wav2vec2", dict(feat_extract_norm="layer", num_conv_pos_embeddings=15), False),
    # MMS (facebook/mms-1b-all): an attention adapter in every layer, whose LayerNorm keeps eps 1e-5
    "wav2vec2-adapters": ("wav2vec2", dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                                           adapter_attn_dim=8, layer_norm_eps=1e-2), True),
    "hubert-group-noprojln": ("hubert", dict(feat_extract_norm="group", feat_proj_layer_norm=False), False),
    "hubert-stable": ("hubert", dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True), True),
    # slprl/mhubert-base-25hz: a BatchNorm before the positional conv, no weight norm. "group" in the
    # name keeps it out of the padded-batch comparison: there transformers is padding-sensitive.
    "hubert-group-posbatchnorm": ("hubert", dict(feat_extract_norm="group", conv_pos_batch_norm=True), False),
    "wavlm-group": ("wavlm", dict(feat_extract_norm="group", num_buckets=32, max_bucket_distance=60), False),
    "wavlm-stable": ("wavlm", dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                                   num_buckets=32, max_bucket_distance=60), True),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fresh random values for every parameter, so LayerNorm gains, biases and WavLM's gate
    constants are not at their trivial initial values, and for BatchNorm's running statistics."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.2 * torch.randn(p.shape, generator=gen) if p.dim() < 2 else
                        torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=gen))
    return model.eval()


def make_w2v_hf(variant: str, path, task: str = "base"):
    """Saves a tiny random HF model of ``variant`` to ``path``; returns the HF base model."""
    transformers = pytest.importorskip("transformers")

    family, overrides, do_normalize = W2V_VARIANTS[variant]
    names = {"wav2vec2": "Wav2Vec2", "hubert": "Hubert", "wavlm": "WavLM"}[family]
    config = getattr(transformers, f"{names}Config")(**{**TINY_W2V, **overrides})
    cls = getattr(transformers, f"{names}Model" if task == "base" else f"{names}{task}")
    model = randomize(cls(config))
    model.save_pretrained(path)
    transformers.Wav2Vec2FeatureExtractor(do_normalize=do_normalize, return_attention_mask=True).save_pretrained(path)
    base = getattr(model, {"wav2vec2": "wav2vec2", "hubert": "hubert", "wavlm": "wavlm"}[family], model)
    return base


def make_whisper_hf(path, n_mels: int = 80):
    transformers = pytest.importorskip("transformers")

    config = transformers.WhisperConfig(num_mel_bins=n_mels, **TINY_WHISPER)
    model = randomize(transformers.WhisperForConditionalGeneration(config))
    model.save_pretrained(path)
    transformers.WhisperFeatureExtractor(feature_size=n_mels).save_pretrained(path)
    return model.model.encoder


def speech_like(num_samples: int, seed: int = 0) -> np.ndarray:
    """verify's generated speech (syllables between pauses 40 dB down, over faint noise): fresh each
    seed, never zeros."""
    from audioenc import verify

    return verify.speech_like(num_samples, np.random.default_rng(seed))


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Exported graphs go to a directory of this run (CLI subprocesses inherit it), not the user's cache."""
    saved = os.environ.get("AUDIOENC_CACHE")
    os.environ["AUDIOENC_CACHE"] = str(tmp_path_factory.mktemp("audioenc-cache"))
    yield
    if saved is None:
        del os.environ["AUDIOENC_CACHE"]
    else:
        os.environ["AUDIOENC_CACHE"] = saved


@pytest.fixture(scope="session")
def w2v_checkpoints(tmp_path_factory):
    """variant -> (path, HF base model) for every wav2vec2-family variant."""
    out = {}
    for variant in W2V_VARIANTS:
        path = tmp_path_factory.mktemp(variant)
        out[variant] = (str(path), make_w2v_hf(variant, path))
    return out


@pytest.fixture(scope="session")
def whisper_checkpoints(tmp_path_factory):
    """n_mels -> (path, HF WhisperEncoder)."""
    out = {}
    for n_mels in (80, 128):
        path = tmp_path_factory.mktemp(f"whisper{n_mels}")
        out[n_mels] = (str(path), make_whisper_hf(path, n_mels))
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


@functools.cache
def triton_interpreter_problem() -> str | None:
    """Why audioenc's kernels cannot run in Triton's CPU interpreter here, or None."""
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    result = subprocess.run([sys.executable, "-c", "import audioenc.kernels.attention"], capture_output=True,
                            text=True, timeout=300, env=dict(os.environ, TRITON_INTERPRET="1"))
    if "active drivers" in result.stderr:  # any other failure is for the tests to report
        return f"triton {triton.__version__}'s autotuner needs a GPU driver, even in its interpreter"
    return None


def skip_without_triton_interpreter() -> None:
    problem = triton_interpreter_problem()
    if problem is not None:
        pytest.skip(problem)


def run_file_in_interpreter(path: str) -> None:
    """Runs the pytest file ``path`` in a child process with TRITON_INTERPRET=1; fails with its output.
    The limit is wide: test_triton_backend.py's child takes ~7 min on a free 2-core machine."""
    skip_without_triton_interpreter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-m", "not gpu",
                             path], cwd=os.path.dirname(os.path.dirname(path)), env=dict(os.environ, TRITON_INTERPRET="1"),
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
