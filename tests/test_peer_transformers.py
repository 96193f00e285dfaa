"""The transformers peer of `audioenc bench --against transformers`: a transformers model rebuilt
from an audioenc reference's weights gives the frames of the checkpoint's own transformers model,
for every family and variant (the positional conv's weight norm round-trips)."""
import json
import shutil

import numpy as np
import pytest
import torch

import audioenc
from audioenc.peer_transformers import transformers_call
from conftest import W2V_VARIANTS, rel_err, speech_like


def frames_of(path, audio):
    enc = audioenc.load(path, backend="torch", dtype="float32")
    peer = transformers_call(enc.backend.model, enc.do_normalize, torch.device("cpu"), torch.float32)
    return enc, peer(audio)


@pytest.mark.parametrize("variant", list(W2V_VARIANTS))
def test_wav2vec2_family_peer_is_the_checkpoints_transformers_model(variant, w2v_checkpoints):
    path, hf = w2v_checkpoints[variant]
    audio = [speech_like(8000, 1), speech_like(8000, 2)]
    enc, got = frames_of(path, audio)
    normalised = [(a - a.mean()) / np.sqrt(a.var() + 1e-7) for a in audio] if enc.do_normalize else audio
    with torch.no_grad():
        want = hf(torch.from_numpy(np.stack(normalised))).last_hidden_state
    assert rel_err(got, want) <= 1e-5


def test_peer_takes_the_attention_mask_as_the_checkpoints_feature_extractor_says(w2v_checkpoints, tmp_path):
    """wavlm-base-plus is a group-norm model whose feature extractor returns an attention mask: its
    transformers peer, timed on padded batches, runs with that mask, as its users' pipelines do."""
    path, hf = w2v_checkpoints["wav2vec2-group"]
    shutil.copytree(path, tmp_path / "model")
    (tmp_path / "model" / "preprocessor_config.json").write_text(json.dumps(
        {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "do_normalize": True, "return_attention_mask": True,
         "feature_size": 1, "padding_value": 0.0, "sampling_rate": 16000}))
    audio = [speech_like(8000, 1), speech_like(5000, 2)]
    _, got = frames_of(tmp_path / "model", audio)
    normalised = [(a - a.mean()) / np.sqrt(a.var() + 1e-7) for a in audio]
    waves = torch.zeros(2, 8000)
    mask = torch.zeros(2, 8000, dtype=torch.int64)
    for i, a in enumerate(normalised):
        waves[i, : len(a)], mask[i, : len(a)] = torch.from_numpy(a), 1
    with torch.no_grad():
        want = hf(waves, attention_mask=mask).last_hidden_state
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_peer_is_the_checkpoints_encoder(n_mels, whisper_checkpoints):
    path, hf = whisper_checkpoints[n_mels]
    audio = [speech_like(16000, 3)]
    enc, got = frames_of(path, audio)
    assert got.shape[1] == enc.dims.n_ctx  # transformers' Whisper runs the whole 30 s window
    want = enc.encode(audio).last_hidden_state
    assert rel_err(got[:, : want.shape[1]], want) <= 1e-4
