"""audioenc verify and export: per-layer report, pass/fail rules, exit codes, CLI."""
import argparse
import os
import sys

import pytest
import torch

pytest.importorskip("onnxruntime")

import audioenc  # noqa: E402
from audioenc import export  # noqa: E402
from audioenc.backends import BACKENDS  # noqa: E402
from audioenc.backends.torch import TorchBackend  # noqa: E402
from audioenc.cli_deploy import register  # noqa: E402
from audioenc.verify import generated_audio, layer_errors, verify  # noqa: E402
from conftest import speech_like  # noqa: E402


@pytest.fixture(autouse=True)
def cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path_factory.getbasetemp() / "verify-cache"))


class NoisyBackend(TorchBackend):
    """The reference plus 1% noise on every output: verify must fail it."""

    name = "noisy"

    def run(self, inputs, lengths, num_layers, output_hidden_states=True):
        out, hidden, frames = super().run(inputs, lengths, num_layers, output_hidden_states)
        noisy = lambda x: x + 0.01 * x.std() * torch.randn_like(x)  # noqa: E731
        return noisy(out), [noisy(h) for h in hidden], frames


class NoisyPlainCallBackend(TorchBackend):
    """Right when asked for hidden states, noisy otherwise (as a wrong onnx graph without hidden states
    would be): verify must still fail it."""

    name = "noisy-plain"

    def run(self, inputs, lengths, num_layers, output_hidden_states=True):
        out, hidden, frames = super().run(inputs, lengths, num_layers, output_hidden_states)
        return (out if output_hidden_states else out + 0.01 * out.std() * torch.randn_like(out)), hidden, frames


def cli(argv):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_layer_errors_use_valid_frames_only():
    ref = torch.randn(2, 5, 4)
    ours = ref.clone()
    ours[1, 3:] = 100.0  # padding: ignored
    assert layer_errors(ours, ref, torch.tensor([5, 3])) == (0.0, 0.0, pytest.approx(1.0), pytest.approx(1.0))
    ours[0, 0, 0] += 1.0
    max_abs, rel, cos, standardized = layer_errors(ours, ref, torch.tensor([5, 3]))
    assert max_abs == pytest.approx(1.0) and rel > 0 and cos < 1 and standardized < 1


def test_the_standardized_cosine_sees_what_outlier_channels_hide():
    """One channel 1000x the rest: noise of the others' size on those others barely moves the plain
    cosine, and halves the standardised one."""
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 200, 64, generator=gen)
    ref[..., 0] = 1000 + torch.randn(200, generator=gen)
    ours = ref + torch.randn(ref.shape, generator=gen) * torch.tensor([0.0] + [1.0] * 63)
    _, _, cos, standardized = layer_errors(ours, ref, torch.tensor([200]))
    assert cos > 0.9999 and standardized < 0.75


def test_generated_audio_is_fresh_and_has_the_shortest_input():
    a, b = generated_audio("wav2vec2"), generated_audio("wav2vec2")
    assert min(len(x) for x in a) == 400
    assert not all((x == y).all() for x, y in zip(a, b))
    assert all(abs(x).max() > 0 for x in a)


@pytest.mark.parametrize("dtype,rule", [("float32", "rel <= 0.0001"), ("int8", "cos >= 0.995"),
                                        ("float16", "2x torch")])
def test_onnx_passes(w2v_checkpoints, dtype, rule):
    report = verify(w2v_checkpoints["wavlm-group"][0], "onnx", dtype=dtype, device="cpu")
    assert report.passed, report.table()
    assert [c.name for c in report.layers] == ["embeddings", "layer 1", "layer 2", "last_hidden_state", "plain encode()"]
    assert all(rule in c.limit for c in report.layers)
    assert "fused ops:" in report.table()


def test_a_model_object_is_verified_like_its_checkpoint(w2v_checkpoints):
    path, model = w2v_checkpoints["wavlm-group"]
    report = verify(model, "onnx", dtype="int8", device="cpu", preprocessor={"do_normalize": False})
    assert report.passed, report.table()
    assert [c.name for c in report.layers][-1] == "plain encode()"


def test_torch_in_half_precision_is_reported_as_the_yardstick(w2v_checkpoints):
    """Its budget would be its own error: it has no rule, and only NaN fails it."""
    report = verify(w2v_checkpoints["wav2vec2-group"][0], "torch", dtype="bfloat16", device="cpu")
    assert report.passed and all(c.limit == "none (half yardstick)" for c in report.layers)
    assert all(0 < c.rel < 0.1 for c in report.layers)


def test_verify_takes_items_past_the_long_audio_threshold_whole(w2v_checkpoints, monkeypatch):
    """A user's own long recording: every layer compared on the whole item, not refused for asking
    hidden states of windowed audio; items past VERIFY_MAX_ITEM_S refused by name."""
    from audioenc import encoder
    from audioenc import verify as verify_module

    path = w2v_checkpoints["wav2vec2-group"][0]
    long_item = speech_like(16000 * 3, 5)
    monkeypatch.setitem(encoder.LONG_AUDIO_DEFAULTS, "wav2vec2", (1.0, 0.5, 0.2, 0.2))  # 3 s is "long"
    report = verify(path, "onnx", device="cpu", audio=[long_item, long_item[:8000]])
    assert report.passed, report.table()
    monkeypatch.setattr(verify_module, "VERIFY_MAX_ITEM_S", 2)
    with pytest.raises(ValueError, match="at most 2 s; got one of 3 s"):
        verify(path, "onnx", device="cpu", audio=[long_item])



def test_cli_verify_names_a_negative_seed(w2v_checkpoints, capsys):
    with pytest.raises(SystemExit) as exited:
        cli(["verify", "--model", w2v_checkpoints["wav2vec2-group"][0], "--seed", "-1"])
    assert exited.value.code == 2 and "argument --seed: must be a whole number >= 0" in capsys.readouterr().err


def test_cli_verify_exit_codes(whisper_checkpoints, w2v_checkpoints, monkeypatch, capsys):
    assert cli(["verify", "--model", whisper_checkpoints[80][0], "--backend", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "last_hidden_state" in out and out.strip().endswith("PASS")
    monkeypatch.setitem(BACKENDS, "noisy", ("test_verify", "NoisyBackend"))
    assert cli(["verify", "--model", w2v_checkpoints["wav2vec2-group"][0], "--backend", "noisy"]) == 1
    assert capsys.readouterr().out.strip().endswith("FAIL")
    monkeypatch.setitem(BACKENDS, "noisy-plain", ("test_verify", "NoisyPlainCallBackend"))
    assert cli(["verify", "--model", w2v_checkpoints["wav2vec2-group"][0], "--backend", "noisy-plain"]) == 1
    failed = [line for line in capsys.readouterr().out.splitlines() if line.endswith(" FAIL")]
    assert len(failed) == 1 and "plain encode()" in failed[0]
    assert cli(["verify", "--model", "random:no-such", "--backend", "onnx"]) == 2
    assert cli(["verify", "--model", "random:no-such", "--backend", "onnx", "--audio", __file__, "--seed", "1"]) == 2
    assert "--seed seeds generated audio" in capsys.readouterr().err


def test_cli_export_without_onnx_says_what_to_install(w2v_checkpoints, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnx", None)  # as without the [onnx] extra: import onnx fails
    out = tmp_path / "out"
    assert cli(["export", "--model", w2v_checkpoints["hubert-stable"][0], "--out", str(out)]) == 2
    assert "cannot export an ONNX graph here: onnx is not installed (pip install 'audioenc[onnx]')" in \
        capsys.readouterr().err
    assert not out.exists()


def test_cli_export(w2v_checkpoints, tmp_path, capsys):
    import onnx

    path = w2v_checkpoints["hubert-stable"][0]  # a layer-norm model: int8 quantises its convs with one scale per call
    out = str(tmp_path / "out")
    assert cli(["export", "--model", path, "--format", "onnx", "--out", out, "--hidden-states"]) == 0
    graph = onnx.load(f"{out}/model.onnx")
    assert [o.name for o in graph.graph.output][:3] == ["last_hidden_state", "frame_lengths", "hidden_state_0"]
    facts = {p.key: p.value for p in graph.metadata_props}  # for a deployment without audioenc
    assert facts["family"] == "hubert" and facts["checkpoint"] == os.path.basename(path) and facts["dtype"] == "float32"
    assert facts["layers"] == "2 of 2" and facts["hidden_states"] == "true"
    assert facts["inputs"].startswith("waveforms (batch, samples) float32 at 16 kHz, each item normalised")
    assert facts["frames_per_second"] == f"{audioenc.load(path, backend='torch').frame_rate:g}"  # a tiny conv stack's
    for exported in (out, f"{out}/model.onnx"):  # what it is, not "no checkpoint" or "unpickling failed"
        with pytest.raises(ValueError, match="an exported ONNX graph or TensorRT engine, not a checkpoint"):
            audioenc.load(exported)
    assert cli(["export", "--model", path, "--out", out]) == 2  # exists: not overwritten
    assert "--overwrite" in capsys.readouterr().err
    assert cli(["export", "--model", path, "--out", out, "--dtype", "int8", "--layers", "1", "--overwrite"]) == 0
    ops = {n.op_type for n in onnx.load(f"{out}/model.onnx").graph.node}
    assert "DynamicQuantizeLinear" in ops or "MatMulInteger" in ops
    assert [o.name for o in onnx.load(f"{out}/model.onnx").graph.output] == ["last_hidden_state", "frame_lengths"]
    assert "MultiHeadAttention" not in ops  # standard ops unless asked
    assert cli(["export", "--model", path, "--out", out, "--fused-attention", "--overwrite"]) == 0
    graph = onnx.load(f"{out}/model.onnx").graph
    fused = [n for n in graph.node if n.op_type == "MultiHeadAttention"]
    assert len(fused) == 2 and all(n.domain == "com.microsoft" for n in fused)
    assert cli(["export", "--model", path, "--out", str(tmp_path / "trt"), "--format", "tensorrt", "--fused-attention"]) == 2
    assert cli(["export", "--model", path, "--out", str(tmp_path / "x"), "--seconds", "abc"]) == 2  # not silently ignored
    capsys.readouterr()
    assert cli(["export", "--model", path, "--out", str(tmp_path / "x"), "--format", "tensorrt",
                "--batch", "1.5:2:3"]) == 2
    assert "--batch must be whole numbers" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_cli_export_keeps_what_it_did_not_make(w2v_checkpoints, tmp_path, capsys, monkeypatch):
    path = w2v_checkpoints["hubert-group-noprojln"][0]
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "model.onnx.data").write_bytes(b"someone's weights")
    assert cli(["export", "--model", path, "--out", str(theirs)]) == 2
    assert (theirs / "model.onnx.data").read_bytes() == b"someone's weights"
    assert "model.onnx.data exists" in capsys.readouterr().err
    failed = tmp_path / "failed"
    assert cli(["export", "--model", path, "--out", str(failed), "--layer", "7"]) == 2
    assert "--layer must be between 0 and 2 for this model, got 7" in capsys.readouterr().err

    def broken(*args, **kwargs):
        raise ValueError("the export failed")

    monkeypatch.setattr(export, "build_graph", broken)
    assert cli(["export", "--model", path, "--out", str(failed)]) == 2
    assert not failed.exists()  # a failed export leaves no empty directory behind
    assert cli(["export", "--model", path, "--out", str(failed / "a" / "b")]) == 2
    assert not failed.exists()  # nor the folders it made on the way
    monkeypatch.undo()
    (tmp_path / "a-file").write_bytes(b"")
    assert cli(["export", "--model", path, "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_cli_export_keeps_a_file_that_appears_while_it_builds(w2v_checkpoints, tmp_path, capsys, monkeypatch):
    """Two exports into one directory at once: the one that finishes second must not replace the first's."""
    path = w2v_checkpoints["hubert-group-noprojln"][0]
    out = tmp_path / "out"
    build_graph = export.build_graph

    def meanwhile(model, spec, folder):
        build_graph(model, spec, folder)
        (out / "model.onnx").write_bytes(b"the other export's graph")

    monkeypatch.setattr(export, "build_graph", meanwhile)
    assert cli(["export", "--model", path, "--out", str(out)]) == 2
    assert "model.onnx appeared while this file was written" in capsys.readouterr().err
    assert (out / "model.onnx").read_bytes() == b"the other export's graph"
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx"]  # nothing of this export's left behind
    assert cli(["export", "--model", path, "--out", str(out), "--overwrite"]) == 0  # asked: replaced
    assert (out / "model.onnx").read_bytes() != b"the other export's graph"
