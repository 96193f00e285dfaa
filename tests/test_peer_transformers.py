"""The transformers peer of `audioenc bench --against transformers`: a transformers model rebuilt
from an audioenc reference's weights gives the frames of the checkpoint's own transformers model,
for every family and variant (the positional conv's weight norm round-trips)."""
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


@pytest.mark.parametrize("n_mels", [80, 128])
def test_whisper_peer_is_the_checkpoints_encoder(n_mels, whisper_checkpoints):
    path, hf = whisper_checkpoints[n_mels]
    audio = [speech_like(16000, 3)]
    enc, got = frames_of(path, audio)
    assert got.shape[1] == enc.dims.n_ctx  # transformers' Whisper runs the whole 30 s window
    want = enc.encode(audio).last_hidden_state
    assert rel_err(got[:, : want.shape[1]], want) <= 1e-4
