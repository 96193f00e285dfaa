"""Records of the checkpoints audioenc has read (audioenc/checkpoint_record.py); the end-to-end case
(loads that read and hash nothing, a rewritten checkpoint) is in test_onnx_backend.py."""
import os

import pytest
import torch
from torch import nn

import audioenc
from audioenc import cache, checkpoint_record
from audioenc.weights import Checkpoint


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def model_of(checkpoint: Checkpoint | None) -> nn.Module:
    model = nn.Linear(3, 2)
    if checkpoint is not None:
        model.checkpoint = checkpoint
    return model


def counting(monkeypatch) -> list:
    calls = []
    real = checkpoint_record.weights_digest
    monkeypatch.setattr(checkpoint_record, "weights_digest", lambda m: (calls.append(1), real(m))[1])
    return calls


def test_random_architectures_are_recalled_by_name():
    described = Checkpoint("wavlm", {"hidden_size": 8}, {}, {"do_normalize": True}, "random:tiny", "random")
    model = model_of(described)
    digest = checkpoint_record.recorded_weights_digest(model)
    assert digest == checkpoint_record.weights_digest(model)
    recalled = checkpoint_record.recall("random:tiny", "")
    assert recalled == Checkpoint("wavlm", {"hidden_size": 8}, {}, {"do_normalize": True}, "random:tiny", "random",
                                  weights_digest=digest)
    assert checkpoint_record.recall("random:other", "") is None


def test_models_without_a_checkpoint_are_hashed_every_time(monkeypatch, cache_dir):
    calls = counting(monkeypatch)
    model = model_of(None)
    for _ in range(2):
        checkpoint_record.recorded_weights_digest(model)
    assert calls == [1, 1] and not os.path.exists(cache_dir / cache.WEIGHTS_RECORDS)


def test_a_changed_file_or_a_damaged_record_is_not_recalled(tmp_path, cache_dir):
    path = str(tmp_path / "model.pt")
    torch.save({"w": torch.zeros(2)}, path)
    model = model_of(Checkpoint("hubert", {}, {}, {}, path, "fairseq", path=path))
    digest = checkpoint_record.recorded_weights_digest(model)
    assert checkpoint_record.recall(path, path).weights_digest == digest
    (record,) = os.listdir(cache_dir / cache.WEIGHTS_RECORDS)
    text = (cache_dir / cache.WEIGHTS_RECORDS / record).read_text()
    for damage in ("not json", "[1]", text.replace(digest, "3").replace('"3"', "3"), text.replace("hubert", "bert")):
        (cache_dir / cache.WEIGHTS_RECORDS / record).write_text(damage)
        assert checkpoint_record.recall(path, path) is None, damage
    (cache_dir / cache.WEIGHTS_RECORDS / record).write_text(text)
    assert checkpoint_record.recall(path, path) is not None
    torch.save({"w": torch.ones(2)}, path)  # rewritten in place: another stat
    assert checkpoint_record.recall(path, path) is None
    os.remove(path)
    assert checkpoint_record.recall(path, path) is None


def test_a_config_json_would_change_is_not_recorded(cache_dir):
    model = model_of(Checkpoint("wav2vec2", {"conv_dim": (512, 512)}, {}, {}, "random:tuples", "random"))
    checkpoint_record.recorded_weights_digest(model)
    assert checkpoint_record.recall("random:tuples", "") is None


def test_a_recalled_checkpoint_of_another_family_is_refused(w2v_checkpoints):
    path = w2v_checkpoints["wav2vec2-group"][0]
    audioenc.load(path, backend="onnx")  # records it
    assert checkpoint_record.recall(path, path) is not None
    with pytest.raises(ValueError, match="expected a whisper checkpoint, got wav2vec2"):
        audioenc.load(path, backend="onnx", family="whisper")
