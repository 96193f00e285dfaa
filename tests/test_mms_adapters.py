"""MMS language adapters (target_lang): audioenc loads adapter.<lang>.safetensors (or .bin) over the
adapters of model.safetensors exactly as transformers' Wav2Vec2ForCTC.from_pretrained(dir, target_lang=...)
does, keeps each language's cached graphs apart, and refuses what has no such adapter."""
from __future__ import annotations

import fnmatch
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import audioenc
from audioenc import cache
from audioenc.cache import KEY_NAME
from audioenc.cli import main
from conftest import TINY_W2V, randomize, rel_err, speech_like

T = pytest.importorskip("transformers")

LANGS = {"fra": "safetensors", "deu": "safetensors", "spa": "bin"}


@pytest.fixture(scope="module")
def mms(tmp_path_factory):
    """A tiny MMS-like Wav2Vec2ForCTC dir (English adapters in model.safetensors) with adapter files for
    three languages: each its own adapter values and a CTC head of its own vocabulary, as in mms-1b-all."""
    path = tmp_path_factory.mktemp("mms")
    config = T.Wav2Vec2Config(**TINY_W2V, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
                              adapter_attn_dim=16, vocab_size=12)
    model = randomize(T.Wav2Vec2ForCTC(config))
    model.save_pretrained(path)
    T.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=True).save_pretrained(path)
    for seed, (lang, kind) in enumerate(LANGS.items(), start=1):
        gen = torch.Generator().manual_seed(seed)
        tensors = {name: (p.detach() + 0.3 * torch.randn(p.shape, generator=gen)).contiguous()
                   for name, p in model._get_adapters().items() if not name.startswith("lm_head.")}
        tensors["lm_head.weight"] = torch.randn(8 + seed, 32, generator=gen)
        tensors["lm_head.bias"] = torch.randn(8 + seed, generator=gen)
        if kind == "safetensors":
            save_file(tensors, str(path / f"adapter.{lang}.safetensors"))
        else:
            torch.save(tensors, path / f"adapter.{lang}.bin")
    return str(path)


def transformers_frames(path, wave, target_lang=None):
    model = T.Wav2Vec2ForCTC.from_pretrained(path, target_lang=target_lang).eval()
    features = T.Wav2Vec2FeatureExtractor.from_pretrained(path)(wave, sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        return model.wav2vec2(features.input_values, output_hidden_states=True).hidden_states, model


@pytest.mark.parametrize("lang", ["fra", "spa"])
def test_target_lang_gives_transformers_frames(mms, lang):
    wave = speech_like(12000, 3)
    want, model = transformers_frames(mms, wave, lang)
    # transformers really loaded the file: its adapters and CTC head are the language's
    assert model.target_lang == lang and model.lm_head.out_features == 8 + list(LANGS).index(lang) + 1
    english, _ = transformers_frames(mms, wave)
    assert rel_err(want[-1], english[-1]) > 1e-2
    enc = audioenc.load(mms, backend="torch", target_lang=lang)
    assert enc.target_lang == lang and f"target_lang={lang}" in repr(enc)
    got = enc.encode(wave, output_hidden_states=True).hidden_states
    assert len(got) == len(want)
    for mine, theirs in zip(got, want):
        assert rel_err(mine, theirs) < 1e-4
    plain = audioenc.load(mms, backend="torch")
    assert plain.target_lang is None
    assert rel_err(plain.encode(wave, output_hidden_states=True).hidden_states[-1], english[-1]) < 1e-4


def test_each_language_has_its_own_cached_graph(mms, tmp_path, monkeypatch):
    """The onnx backend keys its graphs by the weights, which it recalls from the checkpoint's record
    without reading them: a record shared by two languages would run one's graph for the other."""
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path / "cache"))
    wave = speech_like(9000, 4)
    outputs = {}
    for lang in (None, "fra", "deu"):
        outputs[lang] = audioenc.load(mms, backend="onnx", target_lang=lang).encode(wave).last_hidden_state
        reference = audioenc.load(mms, backend="torch", target_lang=lang).encode(wave).last_hidden_state
        assert rel_err(outputs[lang], reference) < 1e-4
    entries = [name for name in os.listdir(tmp_path / "cache" / "onnx") if KEY_NAME.fullmatch(name)]
    assert len(entries) == 3
    assert rel_err(outputs["fra"], outputs["deu"]) > 1e-2 and rel_err(outputs["fra"], outputs[None]) > 1e-2
    # recalled from its record (no tensors read): still French, and a new graph (layer 1) is exported from
    # French weights built again from the adapter file
    again = audioenc.load(mms, backend="onnx", target_lang="fra")
    assert next(again.backend.reference.model.parameters()).is_meta
    assert torch.equal(again.encode(wave).last_hidden_state, outputs["fra"])
    layer1 = audioenc.load(mms, backend="torch", target_lang="fra").encode(wave, output_layer=1).last_hidden_state
    assert rel_err(again.encode(wave, output_layer=1).last_hidden_state, layer1) < 1e-4
    # `audioenc cache` tells each language's graphs apart (mms-1b-all's are gigabytes each)
    labels = sorted(entry.what.rsplit(" (from ", 1)[1] for entry in cache.list_entries())
    assert labels == [f"{mms})", f"{mms}, target_lang=deu)", f"{mms}, target_lang=fra)", f"{mms}, target_lang=fra)"]


def test_hub_id_downloads_only_its_language(mms, tmp_path, monkeypatch):
    import huggingface_hub

    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()

    def snapshot_download(repo_id, allow_patterns):  # the hub's filter: fnmatch on repo paths
        for name in os.listdir(mms):
            if any(fnmatch.fnmatch(name, p) for p in allow_patterns):
                shutil.copy(os.path.join(mms, name), snapshot / name)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    wave = speech_like(8000, 5)
    enc = audioenc.load("someone/mms", backend="torch", target_lang="fra")
    assert sorted(os.listdir(snapshot)) == ["adapter.fra.safetensors", "config.json", "model.safetensors",
                                            "preprocessor_config.json"]
    want = audioenc.load(mms, backend="torch", target_lang="fra").encode(wave).last_hidden_state
    assert torch.equal(enc.encode(wave).last_hidden_state, want)
    with pytest.raises(ValueError, match=r"someone/mms: no adapter for target_lang 'ita': the hub repo someone/mms "
                                         r"has none, or it could not be downloaded .*; adapters found in its local "
                                         r"snapshot .*: fra \(1 languages\)$"):  # not the repo's: it may have 1000
        audioenc.load("someone/mms", backend="torch", target_lang="ita")


def test_an_unknown_language_lists_those_there(mms):
    with pytest.raises(ValueError, match=r"no adapter for target_lang 'ita': .* has none \(adapter\.ita\.safetensors "
                                         r"or adapter\.ita\.bin\); adapters found there: deu, fra, spa \(3 languages\)"):
        audioenc.load(mms, backend="torch", target_lang="ita")
    for bad in ("../fra", "", "fra.safetensors"):
        with pytest.raises(ValueError, match="target_lang must be a language code such as 'fra'"):
            audioenc.load(mms, backend="torch", target_lang=bad)


def damaged_copy(mms, tmp_path, edit):
    from safetensors.torch import load_file

    path = tmp_path / "damaged"
    shutil.copytree(mms, path)
    tensors = load_file(str(path / "adapter.fra.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "adapter.fra.safetensors"))
    return str(path)


def test_a_wrong_adapter_file_is_refused(mms, tmp_path):
    def missing(t):
        del t["wav2vec2.encoder.layers.1.adapter_layer.linear_2.bias"]

    def unexpected(t):
        t["wav2vec2.encoder.layers.2.adapter_layer.norm.weight"] = torch.ones(32)

    def misshapen(t):
        t["wav2vec2.encoder.layers.0.adapter_layer.linear_1.weight"] = torch.zeros(8, 32)

    def nan(t):
        t["wav2vec2.encoder.layers.0.adapter_layer.norm.bias"][3] = float("nan")

    for edit, message in ((missing, r"not this checkpoint's language adapter: 1 missing adapter tensor\(s\), e\.g\. "
                                    r"wav2vec2\.encoder\.layers\.1\.adapter_layer\.linear_2\.bias"),
                          (unexpected, r"1 unexpected tensor\(s\), e\.g\. wav2vec2\.encoder\.layers\.2\.adapter_layer"),
                          (misshapen, r"tensor wav2vec2\.encoder\.layers\.0\.adapter_layer\.linear_1\.weight is "
                                      r"float32 of shape \(8, 32\), this checkpoint's adapters take floating point "
                                      r"\(16, 32\)"),
                          (nan, r"adapter_layer\.norm\.bias holds NaN or Inf")):
        path = damaged_copy(mms, tmp_path / edit.__name__, edit)
        with pytest.raises(ValueError, match=message):
            audioenc.load(path, backend="torch", target_lang="fra")
    path = tmp_path / "cut"
    shutil.copytree(mms, path)
    with open(path / "adapter.fra.safetensors", "r+b") as f:
        f.truncate(500)
    with pytest.raises(ValueError, match="adapter.fra.safetensors: not a readable safetensors file"):
        audioenc.load(str(path), backend="torch", target_lang="fra")


def test_target_lang_without_adapters_is_refused(mms, tmp_path, w2v_checkpoints, whisper_checkpoints):
    from ckpt_factory import fairseq_checkpoint, w2v_config

    for variant in ("wav2vec2-stable", "wav2vec2-layer-postln-oddpos"):
        path = tmp_path / variant
        shutil.copytree(w2v_checkpoints[variant][0], path)
        shutil.copy(os.path.join(mms, "adapter.fra.safetensors"), path)  # the file alone does not make adapters
        with pytest.raises(ValueError, match=r"target_lang='fra' picks an MMS language adapter, but this checkpoint "
                                             r"has no language adapters"):
            audioenc.load(str(path), backend="torch", target_lang="fra")
    with pytest.raises(ValueError, match="which transformers loads into wav2vec2 models only; this is a hubert"):
        audioenc.load(w2v_checkpoints["hubert-stable"][0], backend="torch", target_lang="fra")
    not_hf = "and this checkpoint is not a Hugging Face directory: it has none"
    with pytest.raises(ValueError, match=not_hf):
        audioenc.load(whisper_checkpoints[80][0] + "/model.safetensors", backend="torch", target_lang="fra")
    base = randomize(T.Wav2Vec2Model(w2v_config("wav2vec2_layer")))
    torch.save(fairseq_checkpoint(base, "wav2vec2"), tmp_path / "fairseq.pt")
    with pytest.raises(ValueError, match=not_hf):
        audioenc.load(str(tmp_path / "fairseq.pt"), backend="torch", target_lang="fra")
    with pytest.raises(ValueError, match="wav2vec2 models only; this is a whisper checkpoint"):
        audioenc.load(whisper_checkpoints[80][0], backend="torch", target_lang="fra")
    with pytest.raises(ValueError, match="a random: architecture has none"):
        audioenc.load("random:wav2vec2-base", backend="torch", target_lang="fra")
    with pytest.raises(ValueError, match=r"a model object runs the adapters it holds: call its load_adapter"):
        audioenc.load(T.Wav2Vec2ForCTC.from_pretrained(mms), backend="torch", target_lang="fra")


def test_adapters_missing_from_the_weights_come_from_the_file(mms, tmp_path):
    """A main file without adapters names target_lang; with it, the adapter file supplies them all."""
    from safetensors.torch import load_file

    path = tmp_path / "no-adapters"
    shutil.copytree(mms, path)
    tensors = load_file(str(path / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if ".adapter_layer." not in k}, str(path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"pass target_lang='<lang>' \(audioenc.load\) or --target-lang <lang>"):
        audioenc.load(str(path), backend="torch")
    wave = speech_like(8000, 6)
    want = audioenc.load(mms, backend="torch", target_lang="deu").encode(wave).last_hidden_state
    assert torch.equal(audioenc.load(str(path), backend="torch", target_lang="deu").encode(wave).last_hidden_state, want)


@pytest.mark.parametrize("argv", [
    ["embed", "{audio}", "--out", "{tmp}/out"], ["stream", "--file", "{audio}"], ["export", "--out", "{tmp}/x"],
    ["verify", "--backend", "torch"], ["bench", "--backend", "torch", "--repeats", "1", "--warmup", "0"],
])
def test_every_command_that_loads_a_model_takes_target_lang(mms, tmp_path, argv, capsys):
    import soundfile as sf

    audio = tmp_path / "a.wav"
    sf.write(audio, speech_like(8000, 7), 16000)
    argv = [a.format(audio=audio, tmp=tmp_path) for a in argv] + ["--model", mms, "--target-lang", "ita"]
    assert main(argv) == 2
    assert "no adapter for target_lang 'ita'" in capsys.readouterr().err


def test_embed_with_target_lang(mms, tmp_path, capsys):
    import soundfile as sf

    sf.write(tmp_path / "a.wav", speech_like(8000, 8), 16000)
    out = str(tmp_path / "out")
    args = ["embed", str(tmp_path / "a.wav"), "--model", mms, "--backend", "torch", "--out", out]
    assert main(args + ["--target-lang", "fra"]) == 0
    want = audioenc.load(mms, backend="torch", target_lang="fra").embed(str(tmp_path / "a.wav"))[0].numpy()
    np.testing.assert_allclose(np.load(os.path.join(out, "a.npy")), want, rtol=1e-5, atol=1e-6)
    capsys.readouterr()
    # French embeddings are not kept beside German (or the weights' own) ones without asking
    assert main(args + ["--target-lang", "deu", "--overwrite"]) == 0
    assert main(args) == 2
    assert "holds embeddings made with target_lang 'deu' (now None)" in capsys.readouterr().err
    # a record written before --target-lang existed: its embeddings had the weights' own adapters
    assert main(args + ["--overwrite"]) == 0
    record = os.path.join(out, ".audioenc-embed.json")
    with open(record) as f:
        settings = json.load(f)
    del settings["target_lang"]
    with open(record, "w") as f:
        json.dump(settings, f)
    assert main(args + ["--target-lang", "fra"]) == 2
    assert "holds embeddings made with target_lang None (now 'fra')" in capsys.readouterr().err


def test_export_with_target_lang(mms, tmp_path):
    """The exported graph runs the language's adapters, and says which in its metadata."""
    import onnxruntime

    assert main(["export", "--model", mms, "--target-lang", "spa", "--out", str(tmp_path / "x")]) == 0
    session = onnxruntime.InferenceSession(str(tmp_path / "x" / "model.onnx"))
    meta = session.get_modelmeta().custom_metadata_map
    assert meta["target_lang"] == "spa" and meta["checkpoint"] == os.path.basename(mms)  # not the user's tree
    enc = audioenc.load(mms, backend="torch", target_lang="spa")
    wave = speech_like(8000, 9)
    normalised = (wave - wave.mean()) / np.sqrt(wave.var() + 1e-7)
    got = session.run(None, {"waveforms": normalised[None].astype(np.float32), "lengths": np.array([len(wave)])})[0]
    assert rel_err(torch.from_numpy(got), enc.encode(wave).last_hidden_state) < 1e-4
