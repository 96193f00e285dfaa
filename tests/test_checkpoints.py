"""audioenc.weights: every checkpoint format loads to the same canonical state dict and config as the
Hugging Face checkpoint it was made from, and every bad checkpoint fails with a clear ValueError."""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import re
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.utils.prune as prune

import audioenc
from audioenc.weights import load_checkpoint, load_hf_dir, parse_conv_feature_layers
from ckpt_factory import (W2V_KEYS, WHISPER_KEYS, fairseq_checkpoint, openai_checkpoint, randomize,
                          reference_state_dict, save_pretrained_bin, w2v_config, whisper_model, write_ct2_bin)

T = pytest.importorskip("transformers")

BASE_CLASSES = {"wav2vec2_group": T.Wav2Vec2Model, "wav2vec2_layer": T.Wav2Vec2Model, "hubert": T.HubertModel,
                "hubert_posbatchnorm": T.HubertModel, "wavlm": T.WavLMModel}
TASK_CLASSES = {"wav2vec2_group": T.Wav2Vec2ForPreTraining, "wav2vec2_layer": T.Wav2Vec2ForCTC,
                "hubert": T.HubertForCTC, "hubert_posbatchnorm": T.HubertForCTC, "wavlm": T.WavLMForXVector}
XVECTOR = dict(tdnn_dim=(8, 8), tdnn_kernel=(3, 1), tdnn_dilation=(1, 1), xvector_output_dim=8)


def assert_same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name].dtype == torch.float32, name
        assert torch.equal(got[name], want[name]), name


def assert_same_config(got: dict, want: dict, keys) -> None:
    for key in keys:
        value = want.get(key)
        assert got.get(key) == (list(value) if isinstance(value, tuple) else value), key


# ---- Hugging Face ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def w2v(tmp_path_factory):
    """variant -> (base model, dir of its save_pretrained) for every wav2vec2-family variant."""
    out = {}
    for seed, variant in enumerate(BASE_CLASSES):
        base = randomize(BASE_CLASSES[variant](w2v_config(variant)), seed).eval()
        path = tmp_path_factory.mktemp(variant)
        base.save_pretrained(path)
        out[variant] = (base, str(path))
    return out


@pytest.mark.parametrize("variant", list(BASE_CLASSES))
def test_hf_base_matches_transformers(w2v, variant):
    base, path = w2v[variant]
    ckpt = load_checkpoint(path)
    assert (ckpt.family, ckpt.format) == (base.config.model_type, "hf")
    want = reference_state_dict(base)
    name = "encoder.pos_conv_embed.conv.weight"  # folded by audioenc vs computed by torch: equal up to rounding
    torch.testing.assert_close(ckpt.state_dict.pop(name), want.pop(name), rtol=1e-6, atol=1e-7)
    assert_same(ckpt.state_dict, want)
    assert_same_config(ckpt.config, base.config.to_dict(), W2V_KEYS)


@pytest.mark.parametrize("variant", list(BASE_CLASSES))
def test_hf_task_models_give_the_base_encoder(w2v, variant, tmp_path):
    _, base_path = w2v[variant]
    task = randomize(TASK_CLASSES[variant](w2v_config(variant, **(XVECTOR if variant == "wavlm" else {}))), 7)
    task.base_model.load_state_dict(T.AutoModel.from_pretrained(base_path).state_dict())
    task.save_pretrained(tmp_path)
    assert_same(load_checkpoint(tmp_path).state_dict, load_hf_dir(base_path).state_dict)


@pytest.mark.parametrize("safe", [True, False])
def test_hf_speech_encoder_decoder_dir_gives_its_encoder(w2v, safe, tmp_path):
    """A saved SpeechEncoderDecoderModel (facebook/wav2vec2-xls-r-300m-en-to-15) loads as its encoder,
    as the model object does: its config nests the encoder's, its tensors sit under "encoder."."""
    base, path = w2v["wav2vec2_layer"]
    decoder = T.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                           vocab_size=10, is_decoder=True, add_cross_attention=True)
    speech_to_text = T.SpeechEncoderDecoderModel(T.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(
        base.config, decoder))
    speech_to_text.encoder.load_state_dict(base.state_dict())
    if safe:
        speech_to_text.save_pretrained(tmp_path)
    else:
        save_pretrained_bin(speech_to_text, tmp_path)
    ckpt, want = load_checkpoint(tmp_path, family="wav2vec2"), load_hf_dir(path)
    assert_same(ckpt.state_dict, want.state_dict)
    assert_same_config(ckpt.config, want.config, W2V_KEYS)


def test_hf_bin_sharded_and_old_weight_norm(w2v, tmp_path):
    base, path = w2v["wav2vec2_group"]
    want = load_hf_dir(path).state_dict
    save_pretrained_bin(base, tmp_path / "bin")
    save_pretrained_bin(base, tmp_path / "bin_sharded", shards=3)
    base.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    # Checkpoints saved before torch's parametrizations carry weight_g / weight_v, under a task prefix.
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(os.path.join(path, "config.json"), old)
    renames = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    sd = {}
    for k, v in base.state_dict().items():
        for a, b in renames.items():
            k = k.replace(a, b)
        sd["wav2vec2." + k] = v
    torch.save(sd, old / "pytorch_model.bin")
    for name in ("bin", "bin_sharded", "sharded", "old"):
        assert_same(load_checkpoint(tmp_path / name).state_dict, want)


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """n_mels -> (WhisperForConditionalGeneration, dir of its save_pretrained)."""
    out = {}
    for n_mels in (80, 128):
        model = whisper_model(n_mels, seed=n_mels).eval()
        path = tmp_path_factory.mktemp(f"whisper{n_mels}")
        model.save_pretrained(path)
        out[n_mels] = (model, str(path))
    return out


@pytest.mark.parametrize("n_mels", [80, 128])
def test_hf_whisper_gives_the_encoder(whisper, n_mels, tmp_path):
    model, path = whisper[n_mels]
    ckpt = load_checkpoint(path, family="whisper")
    assert (ckpt.family, ckpt.format) == ("whisper", "hf")
    assert not any("k_proj.bias" in k for k in ckpt.state_dict)
    assert_same(ckpt.state_dict, reference_state_dict(model.model.encoder))
    assert_same_config(ckpt.config, model.config.to_dict(), WHISPER_KEYS)
    # the same encoder saved as WhisperModel and WhisperForAudioClassification (prefix "encoder.") and
    # on its own (no prefix)
    model.model.save_pretrained(tmp_path / "model")
    model.model.encoder.save_pretrained(tmp_path / "encoder")
    classifier = randomize(T.WhisperForAudioClassification(model.config), 3)
    classifier.encoder.load_state_dict(model.model.encoder.state_dict())
    classifier.save_pretrained(tmp_path / "classifier")
    for name in ("model", "encoder", "classifier"):
        assert_same(load_checkpoint(tmp_path / name).state_dict, ckpt.state_dict)


# ---- openai-whisper -------------------------------------------------------------------------------

@pytest.mark.parametrize("n_mels", [80, 128])
def test_openai_whisper(whisper, n_mels, tmp_path):
    model, path = whisper[n_mels]
    want = load_hf_dir(path)
    torch.save(openai_checkpoint(model), tmp_path / "small.pt")
    ckpt = load_checkpoint(tmp_path / "small.pt")
    assert (ckpt.family, ckpt.format, ckpt.preprocessor["feature_size"]) == ("whisper", "openai", n_mels)
    assert_same(ckpt.state_dict, want.state_dict)
    assert_same_config(ckpt.config, want.config, WHISPER_KEYS)
    # released openai checkpoints are float16
    torch.save(openai_checkpoint(model, torch.float16), tmp_path / "half.pt")
    assert_same(load_checkpoint(tmp_path / "half.pt").state_dict,
                {k: v.half().float() for k, v in want.state_dict.items()})
    # .pt files are mapped while they load: the model keeps copies, so overwriting the file (which
    # truncates it first) changes nothing and cannot crash the process
    enc = audioenc.load(str(tmp_path / "small.pt"), backend="torch")
    before = {k: v.clone() for k, v in enc.backend.model.state_dict().items()}
    torch.save({"dims": {}, "model_state_dict": {k: v + 1 for k, v in openai_checkpoint(model)["model_state_dict"].items()}},
               tmp_path / "small.pt")
    assert_same(enc.backend.model.state_dict(), before)


def test_half_precision_hf_checkpoints(whisper, w2v, tmp_path):
    """Hub checkpoints are often float16 (openai/whisper-large-v3) or bfloat16, as safetensors or as a
    (mapped) pytorch_model.bin: all load as the float32 of the same values."""
    for dtype in (torch.float16, torch.bfloat16):
        for name, (model, path) in (("whisper", whisper[80]), ("wav2vec2", w2v["wav2vec2_group"])):
            want = {k: v.to(dtype).float() for k, v in load_hf_dir(path).state_dict.items()}
            for safe in (True, False):
                out = tmp_path / f"{name}-{dtype}-{safe}"
                if safe:
                    type(model).from_pretrained(path).to(dtype).save_pretrained(out)
                else:
                    save_pretrained_bin(type(model).from_pretrained(path), out, shards=2, dtype=dtype)
                got, expected = load_hf_dir(str(out)).state_dict, dict(want)
                if name == "wav2vec2":  # weight norm is folded from the half-precision g and v
                    key = "encoder.pos_conv_embed.conv.weight"
                    assert torch.allclose(got.pop(key), expected.pop(key), rtol=1e-2, atol=1e-3)
                assert_same(got, expected)
                assert all(t.dtype == torch.float32 for t in got.values())


# ---- CTranslate2 ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ct2_dirs(whisper, tmp_path_factory):
    """(n_mels, quantization) -> CTranslate2 dir converted by ctranslate2's own converter."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    out = {}
    for n_mels, quantization in [(80, "float32"), (80, "float16"), (80, "int8"), (80, "bfloat16"),
                                 (80, "int8_float16"), (80, "int8_float32"), (80, "int16"), (128, "int8_bfloat16")]:
        path = str(tmp_path_factory.mktemp(f"ct2_{n_mels}_{quantization}") / "model")
        ctranslate2.converters.TransformersConverter(whisper[n_mels][1]).convert(path, quantization=quantization)
        out[n_mels, quantization] = path
    return out


@pytest.mark.parametrize("n_mels,quantization", [(80, "float32"), (80, "float16"), (80, "bfloat16"), (80, "int8"),
                                                 (80, "int8_float16"), (80, "int8_float32"), (80, "int16"),
                                                 (128, "int8_bfloat16")])
def test_ctranslate2_whisper(whisper, ct2_dirs, n_mels, quantization):
    want = load_hf_dir(whisper[n_mels][1])
    ckpt = load_checkpoint(ct2_dirs[n_mels, quantization], family="whisper")
    assert (ckpt.family, ckpt.format, ckpt.preprocessor["feature_size"]) == ("whisper", "ctranslate2", n_mels)
    assert_same_config(ckpt.config, want.config, WHISPER_KEYS)
    assert sorted(ckpt.state_dict) == sorted(want.state_dict)
    float_type = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(quantization.split("_")[-1])
    for name, w in want.state_dict.items():
        got = ckpt.state_dict[name]
        assert got.dtype == torch.float32
        # CT2 quantizes Linear and conv weights (not embed_positions); the rest is stored as float_type
        quantized = quantization.startswith("int") and name.endswith("weight") and "norm" not in name \
            and name != "embed_positions.weight"
        if quantized:
            rows = w.reshape(w.shape[0], -1)
            # int8: one scale per output row, rounding error <= amax / 254; int16: one scale overall
            amax = rows.abs().amax(dim=1, keepdim=True) if quantization != "int16" else rows.abs().max()
            bound = 1.5 * amax / (127 if quantization != "int16" else 1024)
            assert ((got.reshape(rows.shape) - rows).abs() <= bound).all(), name
        elif float_type is not None:
            assert torch.equal(got, w.to(float_type).float()), name
        else:
            assert torch.equal(got, w), name


def test_ctranslate2_dir_with_copied_preprocessor_config(whisper, tmp_path):
    """faster-whisper repos are converted with --copy_files tokenizer.json preprocessor_config.json:
    the copied feature extractor settings are the ones used."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    source = tmp_path / "hf"
    shutil.copytree(whisper[128][1], source)
    T.WhisperFeatureExtractor(feature_size=128).save_pretrained(source)
    converter = ctranslate2.converters.TransformersConverter(str(source), copy_files=["preprocessor_config.json"])
    converter.convert(str(tmp_path / "ct2"), quantization="float16")
    ckpt = load_checkpoint(tmp_path / "ct2", family="whisper")
    assert ckpt.preprocessor == json.loads((source / "preprocessor_config.json").read_text())


# ---- fairseq --------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant,family,style", [
    *((variant, family, style) for variant, family in [("wav2vec2_group", "wav2vec2"), ("wav2vec2_layer", "wav2vec2"),
                                                        ("hubert", "hubert"), ("hubert_posbatchnorm", "hubert")]
      for style in ["cfg", "args", "finetuned"]),
    ("wav2vec2_group", "wav2vec2", "args_finetuned"), ("wav2vec2_layer", "wav2vec2", "args_finetuned"),
    ("wavlm", "wavlm", "unilm")])
def test_fairseq(w2v, variant, family, style, tmp_path):
    base, path = w2v[variant]
    want = load_hf_dir(path)
    normalize = variant == "wav2vec2_layer"
    torch.save(fairseq_checkpoint(base, family, style, normalize=normalize), tmp_path / "model.pt")
    ckpt = load_checkpoint(tmp_path / "model.pt", family=family)
    assert (ckpt.family, ckpt.format) == (family, "unilm" if style == "unilm" else "fairseq")
    assert ckpt.preprocessor["do_normalize"] is normalize
    assert_same(ckpt.state_dict, want.state_dict)
    extra = {"hubert": ("feat_proj_layer_norm", "conv_pos_batch_norm"),
             "wavlm": ("num_buckets", "max_bucket_distance")}.get(family, ())
    assert_same_config(ckpt.config, want.config, W2V_KEYS + extra)


@pytest.mark.parametrize("zipped", [True, False])
def test_fairseq_checkpoints_keep_their_training_state(w2v, zipped, tmp_path, monkeypatch):
    """fairseq's own HuBERT .pt (hubert_base_ls960.pt) keeps its label Dictionary in task_state and
    numpy scalars in extra_state, beside the tensors and cfg that audioenc reads: it loads, and nothing
    of fairseq or numpy is run; the same object where a tensor should be is refused."""
    import types

    import numpy as np

    class Dictionary:
        def __init__(self):
            self.symbols, self.indices = ["<s>", "<pad>"], {"<s>": 0, "<pad>": 1}

    Dictionary.__module__, Dictionary.__qualname__ = "fairseq.data.dictionary", "Dictionary"
    modules = {"fairseq": types.ModuleType("fairseq"), "fairseq.data": types.ModuleType("fairseq.data"),
               "fairseq.data.dictionary": types.ModuleType("fairseq.data.dictionary")}
    modules["fairseq.data.dictionary"].Dictionary = Dictionary
    base, path = w2v["hubert"]
    ckpt = fairseq_checkpoint(base, "hubert")
    ckpt.update(task_state={"dictionaries": [Dictionary()]}, optimizer_history=[{"num_updates": 400000}],
                extra_state={"metrics": {"train": [("loss", {"val": np.float64(2.5), "count": np.int64(3)}, 0)]},
                             "previous_training_time": np.float64(1234.5), "best": np.array([0.5])})
    with monkeypatch.context() as m:
        for name, module in modules.items():
            m.setitem(sys.modules, name, module)
        torch.save(ckpt, tmp_path / "hubert.pt", _use_new_zipfile_serialization=zipped)
        ckpt["model"]["encoder.layer_norm.weight"] = Dictionary()
        torch.save(ckpt, tmp_path / "bad.pt", _use_new_zipfile_serialization=zipped)
    assert "fairseq" not in sys.modules
    assert_same(load_checkpoint(tmp_path / "hubert.pt", family="hubert").state_dict, load_hf_dir(path).state_dict)
    _expect(tmp_path / "bad.pt", "refused to load.*fairseq.data.dictionary.Dictionary where audioenc reads it")


@pytest.mark.parametrize("zipped", [True, False])
def test_fairseq_cfg_pickled_as_an_omegaconf_dictconfig(w2v, zipped, tmp_path, monkeypatch):
    """fairseq of late 2020 (its Hydra port) pickled the cfg as an omegaconf DictConfig, laid out here as
    omegaconf 2.0 pickles it (nodes in _content, values in _val, a defaultdict(dict) in each metadata),
    and fairseq's own hack may put an argparse Namespace inside: the values are read from the pickled
    state, without omegaconf, and the fine-tune's cfg nested in w2v_args too."""
    import collections
    import types
    import typing

    modules, classes = {"omegaconf": types.ModuleType("omegaconf")}, {}
    for module, name in [("omegaconf.dictconfig", "DictConfig"), ("omegaconf.listconfig", "ListConfig"),
                         ("omegaconf.nodes", "AnyNode"), ("omegaconf.base", "ContainerMetadata"),
                         ("omegaconf.base", "Metadata")]:
        classes[name] = type(name, (), {"__module__": module})
        setattr(modules.setdefault(module, types.ModuleType(module)), name, classes[name])

    def omegaconf(value, parent=None, key=None):
        kind = "DictConfig" if isinstance(value, dict) else "ListConfig" if isinstance(value, list) else "AnyNode"
        node, metadata = classes[kind](), classes["Metadata" if kind == "AnyNode" else "ContainerMetadata"]()
        metadata.__dict__.update(ref_type=typing.Any if kind == "AnyNode" else dict, object_type=None, optional=True,
                                 key=key, flags={}, resolver_cache=collections.defaultdict(dict))
        node.__dict__.update(_metadata=metadata, _parent=parent)
        if kind == "DictConfig":
            node._content = {k: omegaconf(v, node, k) for k, v in value.items()}
        elif kind == "ListConfig":
            node._content = [omegaconf(v, node, i) for i, v in enumerate(value)]
        else:
            node._val = value
        return node

    base, path = w2v["wav2vec2_layer"]
    ckpt = fairseq_checkpoint(base, "wav2vec2", "finetuned", normalize=True)
    ckpt["cfg"]["model"]["w2v_args"]["model"]["latent_temp"] = [2.0, 0.5, 0.999995]
    ckpt["cfg"]["common"] = argparse.Namespace(fp16=True, seed=1)
    with monkeypatch.context() as m:
        for name, module in modules.items():
            m.setitem(sys.modules, name, module)
        ckpt["cfg"] = omegaconf(ckpt["cfg"])
        torch.save(ckpt, tmp_path / "xlsr.pt", _use_new_zipfile_serialization=zipped)
    got = load_checkpoint(tmp_path / "xlsr.pt", family="wav2vec2")
    want = load_hf_dir(path)
    assert got.preprocessor["do_normalize"] is True
    assert_same(got.state_dict, want.state_dict)
    assert_same_config(got.config, want.config, W2V_KEYS)


@pytest.mark.parametrize("style", ["cfg", "finetuned"])
def test_fairseq_cfg_sections_kept_as_namespaces(w2v, style, tmp_path):
    """convert_namespace_to_omegaconf keeps the model or task section of an architecture without a
    dataclass as its argparse Namespace, which the Trainer saves as it is (in a fine-tune's w2v_args
    too): it reads like a dict, so such a model of another kind is named, not a TypeError."""
    def namespaces(cfg):
        return {section: argparse.Namespace(**values) for section, values in cfg.items()}

    base, path = w2v["hubert"]
    ckpt = fairseq_checkpoint(base, "hubert", style)
    if style == "finetuned":
        ckpt["cfg"]["model"]["w2v_args"] = namespaces(ckpt["cfg"]["model"]["w2v_args"])
    ckpt["cfg"] = namespaces(ckpt["cfg"])
    torch.save(ckpt, tmp_path / "hubert.pt")
    got = load_checkpoint(tmp_path / "hubert.pt", family="hubert")
    assert got.preprocessor["do_normalize"] is True
    assert_same(got.state_dict, load_hf_dir(path).state_dict)
    (ckpt["cfg"]["model"].w2v_args["model"] if style == "finetuned" else ckpt["cfg"]["model"])._name = "s2t_transformer"
    torch.save(ckpt, tmp_path / "s2t.pt")
    _expect(tmp_path / "s2t.pt", "fairseq model 's2t_transformer' is not supported")


def test_fairseq_fp16_training_checkpoint(w2v, tmp_path):
    """fairseq --fp16 training halves the model (its fp32 master copy sits in the optimizer state), so
    a checkpoint_best.pt holds float16 tensors: they load as the float32 of the same values."""
    base, path = w2v["wav2vec2_group"]
    ckpt = fairseq_checkpoint(base, "wav2vec2")
    ckpt["model"] = {k: v.half() for k, v in ckpt["model"].items()}
    torch.save(ckpt, tmp_path / "checkpoint_best.pt")
    got = load_checkpoint(tmp_path / "checkpoint_best.pt", family="wav2vec2").state_dict
    want = {k: v.half().float() for k, v in load_hf_dir(path).state_dict.items()}
    key = "encoder.pos_conv_embed.conv.weight"  # folded from the half-precision g and v
    assert torch.allclose(got.pop(key), want.pop(key), rtol=1e-2, atol=1e-3)
    assert_same(got, want)


def test_conv_feature_layers_parsing():
    assert parse_conv_feature_layers("[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2") == \
        [(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512, 2, 2)] * 2
    assert parse_conv_feature_layers("[(512, 10, 5), (256, 3, 2)]") == [(512, 10, 5), (256, 3, 2)]
    for bad in ("__import__('os').system('true')", "[(512, 10)]", "", "[(512, 10, 5)] * x"):
        with pytest.raises(ValueError, match="conv_feature_layers"):
            parse_conv_feature_layers(bad)


# ---- errors ---------------------------------------------------------------------------------------

class NotAllowed:  # any class outside weights_only's allow-list
    pass


def _expect(source, match, **kwargs):
    with pytest.raises(ValueError, match=match):
        load_checkpoint(source, **kwargs)


def _truncate(path, keep=0.5):
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: int(len(data) * keep)])


def test_errors_paths_and_files(tmp_path):
    _expect(tmp_path / "missing.pt", "no such file or directory")
    _expect(str(tmp_path), "no checkpoint in this directory")
    (tmp_path / "noise.pt").write_bytes(random.Random(0).randbytes(4096))
    _expect(tmp_path / "noise.pt", "noise.pt: not a PyTorch checkpoint, or a damaged one")
    (tmp_path / "text.pt").write_bytes(b"not a pickle")  # the unpickler's reason, not torch's advice
    with pytest.raises(ValueError) as failure:
        audioenc.load(str(tmp_path / "text.pt"), backend="torch")
    assert "unpickling failed: Unsupported operand" in str(failure.value) and "file an issue" not in str(failure.value)
    torch.save({"model": NotAllowed(), "cfg": {}}, tmp_path / "unsafe.pt")
    _expect(tmp_path / "unsafe.pt", "refused to load")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "other.pt")
    _expect(tmp_path / "other.pt", "neither an openai-whisper checkpoint")
    (tmp_path / "lone.safetensors").write_bytes(b"x")
    _expect(tmp_path / "lone.safetensors", "pass the directory")


def test_errors_hf(w2v, tmp_path):
    _, path = w2v["wav2vec2_group"]
    for model_type in ("bert", "wav2vec2-conformer", "data2vec-audio"):
        d = tmp_path / model_type
        shutil.copytree(path, d)
        (d / "config.json").write_text(json.dumps({**json.loads((d / "config.json").read_text()), "model_type": model_type}))
        _expect(d, f"model_type '{model_type}' is not an encoder audioenc supports .supported: wav2vec2, hubert, wavlm, whisper")
    d = tmp_path / "truncated"
    shutil.copytree(path, d)
    _truncate(d / "model.safetensors")
    _expect(d, "model.safetensors: not a readable safetensors file")
    os.remove(d / "model.safetensors")
    _expect(d, "no model.safetensors or pytorch_model.bin")
    torch.save({"w": torch.randn(1000)}, d / "pytorch_model.bin")
    _truncate(d / "pytorch_model.bin")
    _expect(d, "pytorch_model.bin: not a PyTorch checkpoint, or a damaged one")
    _expect(path, "expected a whisper checkpoint, got wav2vec2", family="whisper")
    _expect(path, "family must be one of", family="bert")
    # bitsandbytes' int8 weights and their scales (SCB) would be "unexpected tensors" of another model
    d = tmp_path / "bnb"
    shutil.copytree(path, d)
    config = json.loads((d / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (d / "config.json").write_text(json.dumps(config))
    safetensors = pytest.importorskip("safetensors.torch")
    tensors = safetensors.load_file(d / "model.safetensors")
    name = "encoder.layers.0.feed_forward.intermediate_dense."
    scale = tensors[name + "weight"].abs().amax(1)
    tensors[name + "weight"] = (tensors[name + "weight"] / scale[:, None] * 127).round().to(torch.int8)
    tensors[name + "SCB"] = scale
    safetensors.save_file(tensors, d / "model.safetensors")
    with pytest.raises(ValueError, match="a quantised checkpoint .config quantization_config, quant_method 'bitsand"):
        audioenc.load(str(d), backend="torch")


def test_damaged_weights_are_refused(w2v, tmp_path):
    """Weights that would load into silent garbage: a misshapen weight-norm gain (it broadcasts),
    NaN, integer tensors, and adapter weights the config does not declare."""
    from safetensors.torch import load_file, save_file

    _, path = w2v["wav2vec2_group"]
    gain = "encoder.pos_conv_embed.conv.parametrizations.weight.original0"

    def damaged(name, edit):
        d = tmp_path / name
        shutil.copytree(path, d)
        tensors = load_file(str(d / "model.safetensors"))
        edit(tensors)
        save_file(tensors, str(d / "model.safetensors"))
        return d

    def bad_gain(t):
        t[gain] = torch.ones(t[gain].shape[::-1])

    def nan(t):
        t["encoder.layers.0.attention.q_proj.weight"][0, 0] = float("nan")

    def integer(t):
        t["encoder.layers.0.attention.q_proj.weight"] = t["encoder.layers.0.attention.q_proj.weight"].to(torch.int8)

    def adapter(t):
        t["adapter.layers.0.conv.weight"] = torch.zeros(4, 2, 3)

    _expect(damaged("gain", bad_gain), re.escape(f"tensor {gain} has shape"))
    _expect(damaged("adapter", adapter), f"{re.escape(str(tmp_path / 'adapter'))}: the checkpoint holds adapter weights")
    for name, edit, message in (("nan", nan, "q_proj.weight holds NaN or Inf"),
                                ("int", integer, "q_proj.weight is int8, expected floating point")):
        with pytest.raises(ValueError, match=message):
            audioenc.load(str(damaged(name, edit)), backend="torch")


def test_attention_adapters_missing_from_the_weights_are_named(tmp_path):
    """MMS keeps one language's adapters in model.safetensors and the others in adapter.<lang>.safetensors,
    which audioenc does not read: a main file without them is refused (transformers would run random
    adapters), and so is a malformed adapter_attn_dim."""
    from safetensors.torch import load_file, save_file

    base = randomize(T.Wav2Vec2Model(w2v_config("wav2vec2_layer", adapter_attn_dim=4)), 0)
    base.save_pretrained(tmp_path / "mms")
    tensors = load_file(str(tmp_path / "mms" / "model.safetensors"))
    adapters = {name: tensors.pop(name) for name in list(tensors) if ".adapter_layer." in name}
    assert len(adapters) == 12
    save_file(tensors, str(tmp_path / "mms" / "model.safetensors"))
    save_file(adapters, str(tmp_path / "mms" / "adapter.eng.safetensors"))
    with pytest.raises(ValueError, match=r"adapter_attn_dim asks for an attention adapter in every layer, but the "
                                         r"checkpoint lacks 12 of their tensors, e\.g\. encoder\.layers\.0\.adapter_layer"):
        audioenc.load(str(tmp_path / "mms"), backend="torch")
    path = _edited_copy(tmp_path / "mms", tmp_path / "bad", "config.json", lambda c: {**c, "adapter_attn_dim": "4"})
    with pytest.raises(ValueError, match="adapter_attn_dim must be an int >= 1 or null, got '4'"):
        audioenc.load(path, backend="torch")


def test_model_object_with_attention_adapters_loads(tmp_path):
    """The adapter's LayerNorm keeps torch's eps 1e-5 whatever layer_norm_eps says: that is no sign of
    an edited config."""
    base = randomize(T.Wav2Vec2Model(w2v_config("wav2vec2_layer", adapter_attn_dim=4, layer_norm_eps=1e-3)), 0).eval()
    enc = audioenc.load(base, backend="torch", preprocessor={"do_normalize": False})
    wave = torch.randn(1, 4000)
    with torch.no_grad():
        want = base(wave).last_hidden_state
    assert torch.allclose(enc.encode(wave[0].numpy()).last_hidden_state, want, rtol=1e-4, atol=1e-4)


def test_safetensors_reader_matches_the_library_and_refuses_damage(tmp_path):
    """audioenc reads safetensors itself (no memory map, only the tensors it keeps, float32 as it
    reads): the same tensors as the safetensors library, and a clear error for a damaged file."""
    from safetensors.torch import load_file, save_file

    from audioenc.weights import read_safetensors

    tensors = {"half": torch.randn(3, 5).half(), "bf16": torch.randn(7).bfloat16(), "f32": torch.randn(2, 2, 3),
               "f64": torch.randn(4).double(), "steps": torch.arange(6), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 4), "skipped": torch.randn(9)}
    path = str(tmp_path / "t.safetensors")
    save_file(tensors, path, metadata={"format": "pt"})
    got = read_safetensors(path, keep=lambda name: name != "skipped")
    want = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path).items() if k != "skipped"}
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and torch.equal(got[name], tensor)
    data = open(path, "rb").read()
    header_size = int.from_bytes(data[:8], "little")
    damaged = {"header-size": (10**6).to_bytes(8, "little") + data[8:], "cut": data[:-40], "json": data[:20] + data[21:],
               "dtype": data.replace(b'"F32"', b'"U32"', 1), "offsets": data[:8] + data[8:8 + header_size].replace(
                   b'"data_offsets":[0,', b'"data_offsets":[1,', 1) + data[8 + header_size:]}
    for name, content in damaged.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(content)
        with pytest.raises(ValueError, match="not a readable safetensors file") as error:
            read_safetensors(str(bad))
        assert name != "dtype" or "dtype U32, which audioenc does not read" in str(error.value)


def test_only_encoder_tensors_are_read_and_the_model_owns_them(whisper, monkeypatch):
    """A Whisper task checkpoint's decoder is never read; the model's weights are the checkpoint's
    tensors, each in memory of its own (no second copy while loading)."""
    from audioenc import weights
    from audioenc.weights import may_be_encoder

    read = []
    real_read = weights.read_safetensors
    monkeypatch.setattr(weights, "read_safetensors", lambda *a, **k: read.extend(t := real_read(*a, **k)) or t)
    assert len(load_hf_dir(whisper[80][1]).state_dict) == len(read) and all(n.startswith("model.encoder.") for n in read)
    assert may_be_encoder("whisper", "model.encoder.layers.0.fc1.weight")
    assert not may_be_encoder("whisper", "model.decoder.layers.0.fc1.weight")
    assert not may_be_encoder("whisper", "proj_out.weight")
    assert may_be_encoder("wav2vec2", "wav2vec2.adapter.layers.0.conv.weight")  # read, so that it is refused
    assert not may_be_encoder("wav2vec2", "lm_head.weight")
    model = audioenc.load(whisper[80][1], backend="torch").backend.model
    for name, tensor in model.state_dict().items():
        assert tensor.dtype == torch.float32 and tensor.is_contiguous() and not tensor.is_meta, name
        assert tensor.untyped_storage().nbytes() == tensor.numel() * 4, name
    # The model is built on the meta device first; ops without a C++ meta kernel there (nn.Embedding's
    # normal_) would import torch._dynamo and sympy: 900 modules, 150 MB (checked in a fresh interpreter).
    if torch.__version__ < (2, 7):
        pytest.skip("torch 2.6's uniform_ (nn.Linear's init) on the meta device imports sympy")
    code = ("import sys, audioenc\n"
            f"audioenc.load({whisper[80][1]!r}, backend='torch')\n"
            "print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "False False", result.stderr


def _edited_copy(path, target, name, edit):
    """A copy of the checkpoint dir ``path`` whose JSON file ``name`` is ``edit(its contents)``."""
    shutil.copytree(path, target)
    file = target / name
    file.write_text(json.dumps(edit(json.loads(file.read_text()) if file.exists() else {})))
    return str(target)


@pytest.mark.parametrize("key,value,message", [
    ("num_attention_heads", 0, "num_attention_heads must be an int >= 1, got 0"),
    ("conv_stride", [5, 0, 2], r"conv_stride must be a list of ints >= 1, got \[5, 0, 2\]"),
    ("hidden_size", "32", "hidden_size must be an int >= 1, got '32'"),
    ("num_hidden_layers", 1.5, "num_hidden_layers must be an int >= 0, got 1.5"),
    ("layer_norm_eps", "1e-5", "layer_norm_eps must be a positive number, got '1e-5'"),
    ("num_conv_pos_embedding_groups", 3, "hidden_size 32 is not divisible by num_conv_pos_embedding_groups 3"),
])
def test_malformed_config_values_are_named(w2v, tmp_path, key, value, message):
    path = _edited_copy(w2v["wav2vec2_group"][1], tmp_path / "bad", "config.json", lambda c: {**c, key: value})
    with pytest.raises(ValueError, match=f"{re.escape(path)}.*{message}"):
        audioenc.load(path, backend="torch")


def test_a_processor_saved_by_transformers_5_gives_the_feature_extractor(w2v, tmp_path):
    """Wav2Vec2Processor.save_pretrained writes processor_config.json alone, its feature extractor nested;
    transformers reads that first, also beside an older preprocessor_config.json."""
    base, path = w2v["hubert"]
    model = tmp_path / "model"
    shutil.copytree(path, model)
    T.Wav2Vec2Processor(T.Wav2Vec2FeatureExtractor(do_normalize=False), _tokenizer()).save_pretrained(model)
    assert not (model / "preprocessor_config.json").exists()
    assert audioenc.load(str(model), backend="torch").do_normalize is False
    T.Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(model)  # an older file beside it
    assert T.AutoFeatureExtractor.from_pretrained(model).do_normalize is False
    assert audioenc.load(str(model), backend="torch").do_normalize is False
    (model / "processor_config.json").write_text(json.dumps({"feature_extractor": None}))  # nothing nested
    assert audioenc.load(str(model), backend="torch").do_normalize is True
    with pytest.raises(ValueError, match="one file of a checkpoint directory"):
        audioenc.load(str(model / "processor_config.json"), backend="torch")
    # the same dict passed with a model object
    enc = audioenc.load(base, backend="torch", preprocessor={"feature_extractor": {"do_normalize": False}})
    assert enc.do_normalize is False


def test_json_files_that_are_not_objects_are_named(w2v, tmp_path):
    for name in ("config.json", "preprocessor_config.json"):
        path = _edited_copy(w2v["wav2vec2_group"][1], tmp_path / name, name, lambda c: [c])
        with pytest.raises(ValueError, match=f"{re.escape(os.path.join(path, name))} must hold a JSON object, got list"):
            audioenc.load(path, backend="torch")
    with pytest.raises(ValueError, match="the checkpoint's name is empty"):
        audioenc.load("", backend="torch")


def test_preprocessor_settings_audioenc_does_not_compute_are_refused(w2v, whisper, tmp_path):
    """audioenc's frontend is 16 kHz (and Whisper's 400/160 STFT): another preprocessor would
    silently give other features."""
    cases = [(w2v["wav2vec2_group"][1], lambda p: {**p, "sampling_rate": 8000}, "preprocessor sampling_rate=8000"),
             (w2v["wav2vec2_group"][1], lambda p: {**p, "feature_extractor_type": "ASTFeatureExtractor"},
              "preprocessor feature_extractor_type='ASTFeatureExtractor'"),
             (w2v["wav2vec2_group"][1], lambda p: {**p, "do_normalize": "false"}, "do_normalize must be true or false"),
             (whisper[80][1], lambda p: {**p, "chunk_length": 15}, "chunk_length=15 .*max_source_positions 1500"),
             (whisper[80][1], lambda p: {**p, "hop_length": 320}, "preprocessor hop_length=320"),
             (whisper[80][1], lambda p: {**p, "n_fft": 512}, "preprocessor n_fft=512"),
             (whisper[80][1], lambda p: {**p, "feature_size": 128}, r"preprocessor feature_size=128 .*\(80\)"),
             (whisper[80][1], lambda p: {**p, "do_normalize": True}, "do_normalize=True is not computed for Whisper")]
    for i, (path, edit, message) in enumerate(cases):
        with pytest.raises(ValueError, match=message):
            audioenc.load(_edited_copy(path, tmp_path / str(i), "preprocessor_config.json", edit), backend="torch")
    with pytest.raises(ValueError, match="do_normalize=True is not computed for Whisper"):
        audioenc.load(whisper[80][1], backend="torch", preprocessor={"do_normalize": True})
    assert audioenc.load(whisper[80][1], backend="torch", preprocessor={"do_normalize": False}).family == "whisper"


def test_a_checkpoint_that_does_not_say_whether_it_normalises_warns_and_takes_preprocessor(w2v, tmp_path):
    """A model saved without its feature extractor (model.save_pretrained alone) does not say whether
    its waveform is normalised: the default (normalised) is named in a warning, and preprocessor=
    sets it, for that encoder only."""
    path = w2v["wav2vec2_group"][1]
    with pytest.warns(UserWarning, match=r"no feature extractor settings .* preprocessor=\{'do_normalize': False\}"):
        assert audioenc.load(path, backend="torch").do_normalize
    unnormalised = _edited_copy(path, tmp_path / "saved", "preprocessor_config.json", lambda p: {"do_normalize": False})
    refused = _edited_copy(path, tmp_path / "refused", "preprocessor_config.json", lambda p: {"do_normalize": "no"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = _frames(audioenc.load(unnormalised, backend="torch"))
        for source in (path, refused):
            enc = audioenc.load(source, backend="torch", preprocessor={"do_normalize": False})
            assert not enc.do_normalize and torch.equal(_frames(enc), want)
        extractor = T.Wav2Vec2FeatureExtractor(do_normalize=False)
        assert not audioenc.load(path, backend="torch", preprocessor=extractor).do_normalize
    assert not torch.equal(_frames(audioenc.load(unnormalised, backend="torch", preprocessor={"do_normalize": True})), want)
    # the onnx backend records the checkpoint it reads: what is recorded is the checkpoint's own settings
    assert audioenc.load(unnormalised, backend="onnx", preprocessor={"do_normalize": True}).do_normalize
    assert not audioenc.load(unnormalised, backend="onnx").do_normalize
    with pytest.raises(TypeError, match="not a path"):
        audioenc.load(path, backend="torch", preprocessor=os.path.join(unnormalised, "preprocessor_config.json"))
    # preprocessor= replaces the checkpoint's settings: one that does not set do_normalize (a typo) would turn the
    # checkpoint's do_normalize=False into the default without a word, so it is refused, as for a model object
    for preprocessor in ({"do_normalise": False}, {}):
        with pytest.raises(ValueError, match=r"this one does not set do_normalize \(its keys: \[.*\]\): pass "):
            audioenc.load(unnormalised, backend="torch", preprocessor=preprocessor)


def test_errors_openai_and_fairseq(whisper, w2v, tmp_path):
    ckpt = openai_checkpoint(whisper[80][0])
    del ckpt["dims"]
    torch.save(ckpt, tmp_path / "nodims.pt")
    _expect(tmp_path / "nodims.pt", "without 'dims'")
    # a decoder-only state dict, or the encoder's own (no encoder. prefix): not "missing tensors" of a truncated file
    ckpt = openai_checkpoint(whisper[80][0])
    sd = ckpt["model_state_dict"]
    torch.save({**ckpt, "model_state_dict": {k: v for k, v in sd.items() if not k.startswith("encoder.")}},
               tmp_path / "decoder.pt")
    _expect(tmp_path / "decoder.pt", r"model_state_dict holds no encoder tensors .*: a decoder-only state dict")
    torch.save({**ckpt, "model_state_dict": {k.removeprefix("encoder."): v for k, v in sd.items()}}, tmp_path / "enc.pt")
    _expect(tmp_path / "enc.pt", r"holds no encoder tensors .*: the AudioEncoder's own state dict\? Save the whole model's state dict, or prefix")
    causal = tmp_path / "causal"  # distil-whisper's assistant models: a Whisper decoder alone
    T.WhisperForCausalLM(whisper[80][0].config).save_pretrained(causal)
    _expect(causal, "holds none of the whisper encoder's tensors .a decoder-only model, such as WhisperForCausalLM")
    fs = fairseq_checkpoint(w2v["wav2vec2_group"][0], "wav2vec2")
    fs["cfg"]["model"]["_name"] = "data2vec_audio"
    torch.save(fs, tmp_path / "d2v.pt")
    _expect(tmp_path / "d2v.pt", "fairseq model 'data2vec_audio' is not supported .supported: wav2vec2")
    fs["cfg"]["model"].update(_name="wav2vec2", layer_type="conformer")
    torch.save(fs, tmp_path / "conformer.pt")
    _expect(tmp_path / "conformer.pt", "layer_type='conformer' is not supported")
    # data2vec's released fine-tunes (audio_base_ls_960h.pt) are wav2vec_ctc around a data2vec_audio
    d2v = fairseq_checkpoint(w2v["wav2vec2_layer"][0], "wav2vec2", "finetuned")
    d2v["cfg"]["model"]["w2v_args"]["model"].update(_name="data2vec_audio", pos_conv_depth=5, conv_pos=95)
    torch.save(d2v, tmp_path / "d2v_ft.pt")
    _expect(tmp_path / "d2v_ft.pt", "fairseq model 'data2vec_audio' is not supported")
    wavlm = fairseq_checkpoint(w2v["wavlm"][0], "wavlm", "unilm")
    wavlm["cfg"]["gru_rel_pos"] = False
    torch.save(wavlm, tmp_path / "ungated.pt")
    _expect(tmp_path / "ungated.pt", "WavLM without its gated relative position bias")
    # MMS's fairseq .pt: one adapter per language in every layer, which the renames would drop
    mms = fairseq_checkpoint(w2v["wav2vec2_layer"][0], "wav2vec2", "finetuned")
    mms["model"]["w2v_encoder.w2v_model.encoder.layers.0.adapter_layer.W_a"] = torch.zeros(3, 8, 32)
    torch.save(mms, tmp_path / "mms.pt")
    _expect(tmp_path / "mms.pt", r"holds MMS language adapters \(encoder.layers.0.adapter_layer.W_a, ...\)")


def test_git_lfs_pointers_are_named(w2v, tmp_path):
    """A hub repo cloned without Git LFS holds small pointer files in place of its weights: each reader
    names one as such, not as a damaged file."""
    pointer = b"version https://git-lfs.github.com/spec/v1\noid sha256:" + b"4b" * 32 + b"\nsize 377667514\n"
    _, path = w2v["wav2vec2_group"]
    cases = {}
    for name in ("model.safetensors", "pytorch_model.bin", "model.bin"):
        d = tmp_path / name.replace(".", "_")
        d.mkdir()
        shutil.copy(os.path.join(path, "config.json"), d)
        (d / name).write_bytes(pointer)
        cases[d / name] = d
    (tmp_path / "wav2vec_small.pt").write_bytes(pointer)
    cases[tmp_path / "wav2vec_small.pt"] = tmp_path / "wav2vec_small.pt"
    for file, source in cases.items():
        _expect(source, f"{re.escape(str(file))}: a Git LFS pointer, not the file it stands for.*git lfs pull")


def test_errors_ctranslate2(ct2_dirs, tmp_path):
    d = tmp_path / "mt"
    shutil.copytree(ct2_dirs[80, "int8"], d)
    write_ct2_bin(d / "model.bin", "TransformerSpec", {"encoder/layer_0/ffn/linear_0/weight": torch.randn(4, 4)})
    _expect(d, "spec 'TransformerSpec'; audioenc reads only Whisper")
    shutil.copy(os.path.join(ct2_dirs[80, "int8"], "model.bin"), d / "model.bin")
    _truncate(d / "model.bin", keep=0.7)
    _expect(d, "model.bin: truncated")
    (d / "model.bin").write_bytes(random.Random(1).randbytes(4096))
    _expect(d, "model.bin: not a CTranslate2 model.bin")
    _expect(ct2_dirs[80, "int8"], "expected a wav2vec2 checkpoint, got whisper", family="wav2vec2")


def test_hub_id_offline(whisper, tmp_path):
    # huggingface_hub reads HF_HUB_OFFLINE and HF_HOME at import, hence a fresh interpreter.
    # A cached repo (huggingface_hub's cache layout) is used offline ...
    repo = tmp_path / "hf" / "hub" / "models--someone--tiny-whisper"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(whisper[80][1], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    # ... and an uncached one gives a clear error that suggests a local directory, without hanging.
    # A repo of which only the config is cached (AutoConfig or a feature extractor fetched it, not the
    # weights) is named as such, not as a cache directory without weights.
    partial = tmp_path / "hf" / "hub" / "models--someone--config-only"
    (partial / "snapshots" / commit).mkdir(parents=True)
    shutil.copy(os.path.join(whisper[80][1], "config.json"), partial / "snapshots" / commit)
    (partial / "refs").mkdir()
    (partial / "refs" / "main").write_text(commit)
    code = ("from audioenc.weights import load_checkpoint\n"
            "c = load_checkpoint('someone/tiny-whisper')\n"
            "print(c.family, c.config['num_mel_bins'], len(c.state_dict))\n"
            "for name in ('openai/whisper-tiny', 'someone/config-only'):\n"
            "    try:\n        load_checkpoint(name)\n"
            "    except ValueError as e:\n        print(e)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    loaded, error, partial_error = result.stdout.splitlines()
    assert loaded.split() == ["whisper", "80", str(len(load_hf_dir(whisper[80][1]).state_dict))], result.stderr
    assert error.startswith("openai/whisper-tiny: no such local path, and it could not be downloaded"), result.stderr
    assert "Pass a local model directory instead" in error
    assert partial_error.startswith("someone/config-only: its snapshot in the local Hugging Face cache"), result.stderr
    assert "holds no weights" in partial_error and "download them while online" in partial_error


@pytest.mark.parametrize("listing, want", [
    # openai/whisper-large-v3 also carries float32 shards under a non-standard name, and flax/tf copies.
    (["config.json", "preprocessor_config.json", "model.safetensors", "model.fp32-00001-of-00002.safetensors",
      "model.fp32-00002-of-00002.safetensors", "model.safetensors.index.fp32.json", "pytorch_model.bin",
      "flax_model.msgpack", "tokenizer.json"],
     ["config.json", "model.safetensors", "preprocessor_config.json"]),
    (["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
      "model.safetensors.index.json", "pytorch_model.bin"],
     ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
      "model.safetensors.index.json"]),
    (["config.json", "preprocessor_config.json", "pytorch_model.bin", "tf_model.h5"],
     ["config.json", "pytorch_model.bin", "preprocessor_config.json"]),
])
def test_hub_download_fetches_only_the_weights_it_reads(monkeypatch, tmp_path, listing, want):
    import fnmatch

    import huggingface_hub

    from audioenc.weights import _download

    def snapshot_download(repo_id, allow_patterns):  # the hub's filter: fnmatch on repo paths
        for name in listing:
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                (tmp_path / name).touch()
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    assert _download("someone/model") == str(tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(want)


@pytest.mark.parametrize("family", ["wav2vec2", "hubert", "wavlm", "whisper"])
def test_a_config_key_left_out_means_what_it_means_in_transformers(family):
    """A config.json may omit keys whose value is transformers' default: the same dims then."""
    from audioenc.config import Wav2Vec2Dims, WhisperDims

    if family == "whisper":
        hf = T.WhisperConfig()
        dims = WhisperDims.from_config({"model_type": "whisper"})
        assert (dims.n_mels, dims.n_ctx, dims.n_state, dims.n_head, dims.n_layer, dims.n_ffn) == (
            hf.num_mel_bins, hf.max_source_positions, hf.d_model, hf.encoder_attention_heads, hf.encoder_layers,
            hf.encoder_ffn_dim)
        return
    hf = {"wav2vec2": T.Wav2Vec2Config, "hubert": T.HubertConfig, "wavlm": T.WavLMConfig}[family]()
    dims = Wav2Vec2Dims.from_config(family, {"model_type": family})
    for ours, theirs in [("hidden_size", "hidden_size"), ("num_layers", "num_hidden_layers"),
                         ("num_heads", "num_attention_heads"), ("intermediate_size", "intermediate_size"),
                         ("layer_norm_eps", "layer_norm_eps"), ("conv_bias", "conv_bias"),
                         ("feat_extract_norm", "feat_extract_norm"), ("do_stable_layer_norm", "do_stable_layer_norm"),
                         ("num_conv_pos_embeddings", "num_conv_pos_embeddings"),
                         ("num_conv_pos_embedding_groups", "num_conv_pos_embedding_groups")]:
        assert getattr(dims, ours) == getattr(hf, theirs), ours
    for key in ("conv_dim", "conv_kernel", "conv_stride"):
        assert tuple(getattr(dims, key)) == tuple(getattr(hf, key)), key
    if family == "hubert":
        assert dims.feat_proj_layer_norm == hf.feat_proj_layer_norm
    if family == "wavlm":
        assert (dims.num_buckets, dims.max_bucket_distance) == (hf.num_buckets, hf.max_bucket_distance)


# ---- model objects in memory ------------------------------------------------------------------------

def _frames(enc, seed=0):
    audio = torch.Generator().manual_seed(seed)
    return enc.encode(torch.randn(2, 5000, generator=audio) * 0.1).last_hidden_state


@pytest.mark.parametrize("variant", list(BASE_CLASSES))
def test_transformers_objects_load_like_their_checkpoints(w2v, variant, tmp_path):
    base, path = w2v[variant]
    saved = audioenc.load(path, backend="torch")  # no preprocessor_config.json there: do_normalize's default, True
    enc = audioenc.load(base, backend="torch", preprocessor={"do_normalize": True})
    assert enc.source.startswith(type(base).__name__) and not enc.random_weights
    assert torch.equal(_frames(enc), _frames(saved))
    # a task model in float16, as its saved checkpoint
    task = TASK_CLASSES[variant](w2v_config(variant, **(XVECTOR if variant == "wavlm" else {})))
    task.base_model.load_state_dict(base.state_dict())
    task.half().save_pretrained(tmp_path)
    enc = audioenc.load(task, backend="torch", preprocessor={"do_normalize": True})
    assert_same(enc.backend.model.state_dict(), load_checkpoint(tmp_path).state_dict)


def test_whisper_objects_load_like_their_checkpoints(whisper, tmp_path):
    openai_whisper = pytest.importorskip("whisper")

    model, path = whisper[80]
    want = load_checkpoint(path).state_dict
    checkpoint = openai_checkpoint(model)
    openai_model = openai_whisper.model.Whisper(openai_whisper.model.ModelDimensions(**checkpoint["dims"]))
    openai_model.load_state_dict({k: v for k, v in checkpoint["model_state_dict"].items() if k.startswith("encoder.")},
                                 strict=False)
    for obj in (model, model.model, model.model.encoder, openai_model, torch.compile(model),
                torch.nn.DataParallel(model)):
        enc = audioenc.load(obj, backend="torch")
        assert enc.family == "whisper" and enc.dims.n_mels == 80
        assert_same(enc.backend.model.state_dict(), want)


def test_a_model_object_is_copied_and_its_feature_extractor_is_taken(w2v):
    base, path = w2v["hubert"]
    extractor = T.Wav2Vec2FeatureExtractor(do_normalize=False)
    enc = audioenc.load(base, backend="torch", preprocessor=extractor)
    assert not enc.do_normalize
    assert audioenc.load(base, backend="torch", preprocessor=T.Wav2Vec2Processor(extractor, _tokenizer())).do_normalize \
        is False
    before = _frames(enc)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(1)
    try:
        assert torch.equal(_frames(enc), before)
    finally:
        with torch.no_grad():
            for p in base.parameters():
                p.sub_(1)


def _tokenizer():
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        vocab = os.path.join(tmp, "vocab.json")
        with open(vocab, "w") as f:
            json.dump({"<pad>": 0, "<unk>": 1, "a": 2, "|": 3}, f)
        return T.Wav2Vec2CTCTokenizer(vocab)


def test_model_objects_that_cannot_load_are_named(w2v, whisper):
    base, path = w2v["wav2vec2_group"]
    with pytest.raises(ValueError, match=r"pass its feature extractor as preprocessor="):
        audioenc.load(base, backend="torch")
    with pytest.raises(TypeError, match="a Linear object is not a model audioenc can load"):
        audioenc.load(torch.nn.Linear(2, 2), backend="torch")
    with pytest.raises(TypeError, match="source must be a path, a hub id, 'random:NAME' or a model object, got dict"):
        audioenc.load({}, backend="torch")
    for preprocessor, message in ((True, "got bool"), (T.Wav2Vec2FeatureExtractor, "got the class Wav2Vec2FeatureExtractor"),
                                  (path, "not a path: pass transformers.AutoFeatureExtractor.from_pretrained")):
        with pytest.raises(TypeError, match=f"preprocessor must be a feature extractor .*{message}"):
            audioenc.load(base, backend="torch", preprocessor=preprocessor)
    for preprocessor, message in (({"do_normalise": False}, "pass its feature extractor as preprocessor="),
                                  ({"do_normalize": "False"}, "do_normalize must be true or false, got 'False'"),
                                  (T.ASTFeatureExtractor(), "feature_extractor_type='ASTFeatureExtractor' does not match")):
        with pytest.raises(ValueError, match=message):
            audioenc.load(base, backend="torch", preprocessor=preprocessor)
    with pytest.raises(ValueError, match=r"chunk_length=10 does not match what audioenc computes for this model "
                                         r"\(30 s, the window of max_source_positions 1500\)"):
        audioenc.load(whisper[80][0], backend="torch", preprocessor=T.WhisperFeatureExtractor(chunk_length=10))
    with pytest.raises(ValueError, match="feature_extractor_type='WhisperFeatureExtractor' does not match"):
        audioenc.load(base, backend="torch", preprocessor=T.WhisperFeatureExtractor())
    # transformers adds dither x random noise at each call; audioenc does not, and says so
    with pytest.warns(UserWarning, match="dither=1.0 is not applied"):
        audioenc.load(whisper[80][0], backend="torch", preprocessor=T.WhisperFeatureExtractor(dither=1.0))
    with pytest.raises(ValueError, match="expected a wavlm checkpoint, got whisper"):
        audioenc.load(whisper[80][0], backend="torch", family="wavlm")
    with pytest.raises(ValueError, match=r"model_type 'bert' is not an encoder audioenc supports"):
        audioenc.load(T.BertModel(T.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                                               intermediate_size=8, vocab_size=10)), backend="torch")
    with torch.device("meta"):
        empty = T.Wav2Vec2Model(w2v_config("wav2vec2_group"))
    with pytest.raises(ValueError, match="is on the meta device"):
        audioenc.load(empty, backend="torch", preprocessor={"do_normalize": True})
    with pytest.raises(ValueError, match="Wav2Vec2Model object: preprocessor sampling_rate=8000 does not match"):
        audioenc.load(base, backend="torch", preprocessor={"sampling_rate": 8000, "do_normalize": True})


def test_model_objects_audioenc_cannot_run_as_they_are_are_named(w2v, whisper):
    """Adapters, quantised layers, pruning masks, a config edited after the model was built, and parts
    without an encoder: each refused with what to do, rather than frames of another model."""
    base, _ = w2v["wav2vec2_layer"]
    pre = {"do_normalize": True}
    quantised = torch.ao.quantization.quantize_dynamic(copy.deepcopy(base), {torch.nn.Linear}, dtype=torch.qint8)
    pruned = copy.deepcopy(base)
    prune.l1_unstructured(pruned.encoder.layers[0].attention.q_proj, "weight", amount=0.5)
    for model in (quantised, pruned):
        with pytest.raises(ValueError, match="is part of an adapter, a quantised layer or a pruning mask"):
            audioenc.load(model, backend="torch", preprocessor=pre)
    edits = [("num_attention_heads", 4, "has 2 attention heads, the config 4"),
             ("conv_stride", (*base.config.conv_stride[:-1], 4), r"conv_layers.\d.conv has kernel \d and stride \d, the config"),
             ("layer_norm_eps", 1e-2, "has eps 1e-05, the config's layer_norm_eps is 0.01"),
             ("do_stable_layer_norm", False, "is a Wav2Vec2EncoderStableLayerNorm, the config's do_stable_layer_norm is False")]
    for key, value, message in edits:
        edited = copy.deepcopy(base)
        setattr(edited.config, key, value)
        with pytest.raises(ValueError, match=f"its modules do not follow its config .*{message}"):
            audioenc.load(edited, backend="torch", preprocessor=pre)
    wavlm = copy.deepcopy(w2v["wavlm"][0])
    wavlm.config.max_bucket_distance = 100
    with pytest.raises(ValueError, match=r"has max_distance \d+, the config 100"):
        audioenc.load(wavlm, backend="torch", preprocessor=pre)
    edited = copy.deepcopy(whisper[80][0])
    edited.config.encoder_attention_heads = 4
    with pytest.raises(ValueError, match="its modules do not follow its config"):
        audioenc.load(edited, backend="torch")
    with pytest.raises(ValueError, match=r"WhisperDecoder object: holds no complete whisper encoder \(conv1.weight"):
        audioenc.load(whisper[80][0].model.decoder, backend="torch")
    with pytest.raises(ValueError, match="Wav2Vec2Encoder.*object: holds no complete wav2vec2 encoder"):
        audioenc.load(base.encoder, backend="torch", preprocessor=pre)


def test_wrapped_and_partly_compiled_model_objects_load(w2v, whisper):
    openai_whisper = pytest.importorskip("whisper")

    base, path = w2v["wav2vec2_group"]
    want = load_checkpoint(path).state_dict
    task = T.Wav2Vec2ForCTC(w2v_config("wav2vec2_group"))
    task.wav2vec2.load_state_dict(base.state_dict())
    task.wav2vec2 = torch.compile(task.wav2vec2)
    decoder = T.BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
                           vocab_size=10, is_decoder=True, add_cross_attention=True)
    speech_to_text = T.SpeechEncoderDecoderModel(T.SpeechEncoderDecoderConfig.from_encoder_decoder_configs(
        base.config, decoder))
    speech_to_text.encoder.load_state_dict(base.state_dict())
    for obj in (task, torch.nn.DataParallel(torch.compile(base)), speech_to_text):
        got = audioenc.load(obj, backend="torch", preprocessor={"do_normalize": True}).backend.model.state_dict()
        name = "encoder.pos_conv_embed.conv.weight"  # folded from the same (g, v) either way
        torch.testing.assert_close(got.pop(name), want[name], rtol=1e-6, atol=1e-7)
        assert_same(got, {k: v for k, v in want.items() if k != name})
    # openai-whisper's encoder alone, its sizes read off its tensors
    model, whisper_path = whisper[128]
    checkpoint = openai_checkpoint(model)
    openai_model = openai_whisper.model.Whisper(openai_whisper.model.ModelDimensions(**checkpoint["dims"]))
    openai_model.load_state_dict({k: v for k, v in checkpoint["model_state_dict"].items() if k.startswith("encoder.")},
                                 strict=False)
    enc = audioenc.load(openai_model.encoder, backend="torch")
    assert enc.dims.n_mels == 128 and enc.source == "AudioEncoder object (openai-whisper)"
    assert_same(enc.backend.model.state_dict(), load_checkpoint(whisper_path).state_dict)
    openai_model.dims.n_audio_head *= 2  # the model runs its modules, audioenc would build from the dims
    with pytest.raises(ValueError, match="its modules do not follow its dims"):
        audioenc.load(openai_model, backend="torch")
