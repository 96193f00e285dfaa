"""Records of the checkpoints audioenc has read (audioenc/checkpoint_record.py); the end-to-end case
(loads that read and hash nothing, a rewritten checkpoint) is in test_onnx_backend.py."""
import dataclasses
import os
import shutil

import ckpt_factory
import pytest
import torch
from torch import nn

import audioenc
from audioenc import cache, checkpoint_record, loading
from audioenc.models import dims_of
from audioenc.weights import Checkpoint, file_stats

transformers = pytest.importorskip("transformers")


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
    assert checkpoint_record.recorded_weights_digest(model) and checkpoint_record.recall(path, path) is None
    model.checkpoint.file_stats = file_stats(path)  # as read: the stat taken before the read
    digest = checkpoint_record.recorded_weights_digest(model)
    assert checkpoint_record.recall(path, path).weights_digest == digest
    (record,) = os.listdir(cache_dir / cache.WEIGHTS_RECORDS)
    text = (cache_dir / cache.WEIGHTS_RECORDS / record).read_text()
    for damage in ("not json", "[1]", text.replace(digest, "3").replace('"3"', "3"), text.replace("hubert", "bert")):
        (cache_dir / cache.WEIGHTS_RECORDS / record).write_text(damage)
        assert checkpoint_record.recall(path, path) is None, damage
    (cache_dir / cache.WEIGHTS_RECORDS / record).write_text(text)
    assert checkpoint_record.recall(path, path) is not None

    other = str(tmp_path / "other.pt")  # another checkpoint's record, moved to this one's name
    torch.save({"w": torch.ones(2)}, other)
    model = model_of(Checkpoint("hubert", {}, {}, {}, other, "fairseq", path=other, file_stats=file_stats(other)))
    other_digest = checkpoint_record.recorded_weights_digest(model)
    assert checkpoint_record.recall(other, other).weights_digest == other_digest != digest
    (other_record,) = set(os.listdir(cache_dir / cache.WEIGHTS_RECORDS)) - {record}
    os.replace(cache_dir / cache.WEIGHTS_RECORDS / other_record, cache_dir / cache.WEIGHTS_RECORDS / record)
    assert checkpoint_record.recall(path, path) is None and checkpoint_record.recall(other, other) is None
    (cache_dir / cache.WEIGHTS_RECORDS / record).write_text(text)

    torch.save({"w": torch.ones(3)}, path)  # rewritten in place: another stat (and size: coarse clocks)
    assert checkpoint_record.recall(path, path) is None
    os.remove(path)
    assert checkpoint_record.recall(path, path) is None


def test_a_config_json_would_change_is_not_recorded(cache_dir):
    model = model_of(Checkpoint("wav2vec2", {"conv_dim": (512, 512)}, {}, {}, "random:tuples", "random"))
    checkpoint_record.recorded_weights_digest(model)
    assert checkpoint_record.recall("random:tuples", "") is None


def test_a_recalled_checkpoint_of_another_family_is_refused(w2v_checkpoints, monkeypatch):
    path = w2v_checkpoints["wav2vec2-group"][0]
    audioenc.load(path, backend="onnx")  # records it
    assert checkpoint_record.recall(path, path) is not None
    monkeypatch.setattr(loading, "load_checkpoint", None)  # the record answers: nothing is read
    with pytest.raises(ValueError, match="expected a whisper checkpoint, got wav2vec2"):
        audioenc.load(path, backend="onnx", family="whisper")


def every_format(tmp_path, w2v_checkpoints, whisper_checkpoints) -> list[str]:
    """Checkpoints of every format audioenc reads, written to disk."""
    sources = [path for path, _ in w2v_checkpoints.values()] + [whisper_checkpoints[128][0]]
    whisper = ckpt_factory.whisper_model(80)
    torch.save(ckpt_factory.openai_checkpoint(whisper, torch.float16), tmp_path / "openai.pt")
    base = transformers.WavLMModel(ckpt_factory.w2v_config("wavlm")).eval()
    torch.save(ckpt_factory.fairseq_checkpoint(base, "wavlm", "unilm"), tmp_path / "unilm.pt")
    base = transformers.HubertModel(ckpt_factory.w2v_config("hubert")).eval()
    torch.save(ckpt_factory.fairseq_checkpoint(base, "hubert", "args"), tmp_path / "fairseq.pt")
    sources += [str(tmp_path / name) for name in ("openai.pt", "unilm.pt", "fairseq.pt")]
    ctranslate2 = pytest.importorskip("ctranslate2")
    whisper.save_pretrained(tmp_path / "whisper-hf")
    ctranslate2.converters.TransformersConverter(str(tmp_path / "whisper-hf")).convert(
        str(tmp_path / "ct2"), quantization="int8_float32")
    return sources + [str(tmp_path / "ct2")]


def test_recalled_checkpoints_describe_what_a_read_gives(tmp_path, w2v_checkpoints, whisper_checkpoints, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for source in every_format(tmp_path, w2v_checkpoints, whisper_checkpoints):
        name = os.path.relpath(source) if source.startswith(str(tmp_path)) else source  # relative paths too
        read = loading.read_checkpoint(name)
        model = loading.reference_model(read, name)
        digest = checkpoint_record.recorded_weights_digest(model)
        recalled = loading.read_checkpoint(name, recall=True)
        assert recalled == dataclasses.replace(read, state_dict={}, weights_digest=digest), source
        assert dims_of(recalled) == dims_of(read)
        shell = loading.reference_model(recalled, name)
        assert all(p.is_meta for p in shell.parameters()) and shell.dims == model.dims
        assert shell.checkpoint_source == model.checkpoint_source


def test_a_checkpoint_rewritten_while_it_is_read_is_not_recorded(w2v_checkpoints, tmp_path, monkeypatch):
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(w2v_checkpoints["hubert-group-noprojln"][0], checkpoint)
    real_read = loading.load_checkpoint

    def read_then_rewrite(*args, **kwargs):
        read = real_read(*args, **kwargs)
        with open(checkpoint / "config.json", "a") as f:  # another writer, after the tensors were read
            f.write("\n")
        return read

    monkeypatch.setattr(loading, "load_checkpoint", read_then_rewrite)
    audioenc.load(str(checkpoint), backend="onnx")
    assert checkpoint_record.recall(str(checkpoint), str(checkpoint)) is None


def test_a_record_the_weights_no_longer_match_is_dropped(whisper_checkpoints, cache_dir):
    path = whisper_checkpoints[80][0]
    mel = torch.rand(1, 80, 3000)
    first = audioenc.load(path, backend="onnx").backend.run(mel, None, 2)[0]  # records the checkpoint
    (record,) = [cache_dir / cache.WEIGHTS_RECORDS / n for n in os.listdir(cache_dir / cache.WEIGHTS_RECORDS)]
    record.write_text(record.read_text().replace('"digest": "', '"digest": "0'))  # as if it held other weights
    enc = audioenc.load(path, backend="onnx")
    with pytest.raises(RuntimeError, match="its weights changed since the encoder was loaded; load the encoder again"):
        enc.backend.run(mel, None, 2)  # no graph under that digest: the weights are read, and do not match it
    assert not record.exists()
    assert torch.equal(audioenc.load(path, backend="onnx").backend.run(mel, None, 2)[0], first)
