"""Weights digests remembered per checkpoint (audioenc/weights_digest.py); the end-to-end case, a
rewritten checkpoint file, is in test_onnx_backend.py."""
import os

import torch
from torch import nn

from audioenc import cache, weights_digest


def tiny_model(source: str = "", path: str = "") -> nn.Module:
    model = nn.Linear(3, 2)
    model.checkpoint_source, model.checkpoint_path = source, path
    return model


def counting(monkeypatch) -> list:
    calls = []
    real = weights_digest.weights_digest
    monkeypatch.setattr(weights_digest, "weights_digest", lambda m: (calls.append(1), real(m))[1])
    return calls


def test_random_architectures_are_remembered_by_name(tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path))
    calls = counting(monkeypatch)
    model = tiny_model("random:tiny")
    digest = weights_digest.checkpoint_weights_digest(model)
    assert digest == weights_digest.weights_digest(model)
    calls.clear()
    assert weights_digest.checkpoint_weights_digest(tiny_model("random:tiny")) == digest and not calls
    weights_digest.checkpoint_weights_digest(tiny_model("random:other"))
    assert calls == [1]


def test_models_without_a_checkpoint_are_hashed_every_time(tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path))
    calls = counting(monkeypatch)
    model = tiny_model()
    for _ in range(2):
        weights_digest.checkpoint_weights_digest(model)
    assert calls == [1, 1] and not os.path.exists(tmp_path / cache.WEIGHTS_RECORDS)


def test_a_damaged_record_is_computed_again_and_replaced(tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path))
    checkpoint = tmp_path / "model.pt"
    torch.save({}, checkpoint)
    model = tiny_model(str(checkpoint), str(checkpoint))
    digest = weights_digest.checkpoint_weights_digest(model)
    (record,) = os.listdir(tmp_path / cache.WEIGHTS_RECORDS)
    for damage in ("not json", "[1]", '{"digest": 3}'):
        (tmp_path / cache.WEIGHTS_RECORDS / record).write_text(damage)
        calls = counting(monkeypatch)
        assert weights_digest.checkpoint_weights_digest(model) == digest and calls == [1]
    calls.clear()
    assert weights_digest.checkpoint_weights_digest(model) == digest and not calls
    os.remove(checkpoint)  # gone since it was read: hashed, nothing recorded
    assert weights_digest.checkpoint_weights_digest(model) == digest and calls == [1]
