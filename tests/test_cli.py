"""The command line: embed writes one output per input, never overwrites without asking, goes on
past bad files; info reports what is built."""
import io
import os
import re
import select
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from safetensors.numpy import load_file

import audioenc
from audioenc.cli import main
from conftest import TINY_WHISPER, randomize, speech_like


@pytest.fixture()
def audio_tree(tmp_path):
    root = tmp_path / "in"
    (root / "sub").mkdir(parents=True)
    sf.write(root / "a.wav", speech_like(16000, 1), 16000)
    sf.write(root / "sub" / "b.flac", speech_like(24000, 2), 16000)
    return root


def test_embed_directory_mean_and_frames(audio_tree, tmp_path, w2v_checkpoints, capsys):
    model = w2v_checkpoints["wav2vec2-group"][0]
    out = tmp_path / "out"
    assert main(["embed", str(audio_tree), "--model", model, "--backend", "torch", "--out", str(out)]) == 0
    enc = audioenc.load(model, backend="torch")
    a = np.load(out / "a.npy")
    assert a.shape == (32,)
    np.testing.assert_allclose(a, enc.embed(str(audio_tree / "a.wav"))[0].numpy(), rtol=1e-5, atol=1e-6)
    assert np.load(out / "sub" / "b.npy").shape == (32,)

    frames = tmp_path / "frames"
    assert main(["embed", str(audio_tree / "sub" / "b.flac"), "--model", model, "--backend", "torch", "--out", str(frames),
                 "--pool", "none", "--layer", "1"]) == 0
    expected = enc.encode(str(audio_tree / "sub" / "b.flac"), output_layer=1).last_hidden_state[0].numpy()
    np.testing.assert_allclose(np.load(frames / "b.npy"), expected, rtol=1e-5, atol=1e-6)

    # a file named both inside a directory argument and on its own: one output, where the first puts it
    both = tmp_path / "both"
    again = os.path.join(os.path.relpath(audio_tree, os.getcwd()), ".", "sub", "b.flac")  # spelt another way
    assert main(["embed", str(audio_tree), again, str(audio_tree / "a.wav"), "--model", model, "--backend", "torch",
                 "--out", str(both)]) == 0
    assert sorted(os.listdir(both)) == [".audioenc-embed.json", "a.npy", "sub"] and os.listdir(both / "sub") == ["b.npy"]


def test_embed_all_layers_to_safetensors(audio_tree, tmp_path, whisper_checkpoints):
    model = whisper_checkpoints[80][0]
    out = tmp_path / "out"
    assert main(["embed", str(audio_tree / "a.wav"), "--model", model, "--backend", "torch", "--out", str(out), "--layer", "all"]) == 0
    tensors = load_file(out / "a.safetensors")
    assert sorted(tensors) == ["hidden_states.0", "hidden_states.1", "hidden_states.2", "last_hidden_state"]
    assert tensors["last_hidden_state"].shape == (32,)


def test_embed_runs_without_a_stderr(audio_tree, tmp_path, w2v_checkpoints, monkeypatch, capsys):
    """A job started with stderr closed (sys.stderr is None): no bar, rather than tqdm writing to None."""
    monkeypatch.setattr(sys, "stderr", None)
    out = tmp_path / "out"
    assert main(["embed", str(audio_tree / "a.wav"), "--model", w2v_checkpoints["wav2vec2-group"][0],
                 "--backend", "torch", "--out", str(out)]) == 0
    assert np.load(out / "a.npy").shape == (32,)


def test_embed_never_overwrites_without_asking(audio_tree, tmp_path, w2v_checkpoints, capsys):
    model = w2v_checkpoints["wav2vec2-group"][0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.npy").write_bytes(b"precious user data")
    assert main(["embed", str(audio_tree / "a.wav"), "--model", model, "--backend", "torch", "--out", str(out)]) == 0
    assert (out / "a.npy").read_bytes() == b"precious user data"
    assert "skipped 1 existing" in capsys.readouterr().out
    assert main(["embed", str(audio_tree / "a.wav"), "--model", model, "--backend", "torch", "--out", str(out), "--overwrite"]) == 0
    assert np.load(out / "a.npy").shape == (32,)
    assert not [f for f in os.listdir(out) if f.startswith(".audioenc-tmp-")]
    umask = os.umask(0)
    os.umask(umask)
    assert (out / "a.npy").stat().st_mode & 0o777 == 0o666 & ~umask


def test_embed_outputs_take_the_umask_permissions_whatever_writes_them(audio_tree, tmp_path, w2v_checkpoints):
    """--layer all's .safetensors too: safetensors' save_file (0.8) writes its own private 0600 file and
    renames it over the one atomic_write made, which would keep other users out of a shared --out."""
    from audioenc.atomic_file import atomic_write

    model = w2v_checkpoints["wav2vec2-group"][0]
    umask = os.umask(0o022)
    try:
        for layer in ("all", "1"):
            out = tmp_path / f"out-{layer}"
            assert main(["embed", str(audio_tree / "a.wav"), "--model", model, "--backend", "torch", "--out", str(out),
                         "--layer", layer]) == 0
            (output,) = [name for name in os.listdir(out) if name.startswith("a.")]
            assert (out / output).stat().st_mode & 0o777 == 0o644, output

        def private_writer(tmp):  # what safetensors' save_file does: a 0600 temporary renamed over tmp
            private = tmp + ".private"
            with open(os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
                f.write(b"x")
            os.replace(private, tmp)

        atomic_write(str(tmp_path / "direct" / "x.bin"), private_writer)
        assert (tmp_path / "direct" / "x.bin").stat().st_mode & 0o777 == 0o644
    finally:
        os.umask(umask)


def test_embed_rerun_with_other_settings_refuses_to_mix_outputs(audio_tree, tmp_path, w2v_checkpoints, capsys):
    """A rerun into the same --out would keep the old outputs (skipped as existing) beside new ones
    of another kind; it is refused unless --overwrite replaces them."""
    model = w2v_checkpoints["wav2vec2-group"][0]
    out = tmp_path / "out"
    args = ["embed", str(audio_tree / "a.wav"), "--model", model, "--backend", "torch", "--out", str(out)]
    assert main([*args, "--layer", "1"]) == 0
    assert main([*args, "--layer", "01"]) == 0 and "skipped 1 existing" in capsys.readouterr().out  # the same
    assert main(args) == 2  # the last layer, not layer 1
    assert main([*args, "--overwrite"]) == 0
    assert main([*args, "--pool", "none"]) == 2
    assert "holds embeddings made with pool 'mean' (now 'none')" in capsys.readouterr().err
    assert np.load(out / "a.npy").shape == (32,)
    assert main([*args, "--pool", "none", "--overwrite"]) == 0
    assert np.load(out / "a.npy").ndim == 2
    assert main(args) == 2  # now the directory holds frames


def test_embed_overwrite_of_some_outputs_leaves_the_directory_marked_mixed(audio_tree, tmp_path, w2v_checkpoints,
                                                                         capsys):
    """--overwrite with new settings on some of the inputs leaves the others' old outputs: every plain
    rerun is refused until an --overwrite run has replaced them all. A job that wrote nothing blocks
    nothing."""
    model = w2v_checkpoints["wav2vec2-group"][0]
    out = tmp_path / "out"
    run = lambda inputs, *extra: main(["embed", *inputs, "--model", model, "--backend", "torch", "--out", str(out),
                                       *extra])
    assert run([str(audio_tree)]) == 0                                    # a.npy and sub/b.npy, mean-pooled
    assert run([str(audio_tree / "a.wav")], "--pool", "max", "--overwrite") == 0
    capsys.readouterr()
    for pool in ("max", "mean"):
        assert run([str(audio_tree)], "--pool", pool) == 2
        assert "more than one setting" in capsys.readouterr().err
    assert run([str(audio_tree)], "--pool", "max", "--overwrite") == 0  # all replaced: one setting again
    assert run([str(audio_tree)], "--pool", "max") == 0 and "skipped 2 existing" in capsys.readouterr().out

    empty_out = tmp_path / "empty-out"
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.wav").write_bytes(b"not audio")
    args = ["--model", model, "--backend", "torch", "--out", str(empty_out)]
    assert main(["embed", str(tmp_path / "bad"), *args]) == 1                   # wrote nothing
    assert main(["embed", str(audio_tree), *args, "--pool", "max"]) == 0      # so nothing to keep apart


def test_embed_settings_records_cover_nested_outs_failures_and_equal_spellings(audio_tree, tmp_path, w2v_checkpoints,
                                                                               capsys):
    """A --out inside or around an earlier one, where it holds outputs, is checked against its record too; an --overwrite that
    replaced every output clears the mixed mark though some inputs failed (they have no output);
    --layer N for the last layer is the default, and the precision is a setting."""
    model = w2v_checkpoints["wav2vec2-group"][0]
    out = tmp_path / "out"
    run = lambda inputs, to, *extra: main(["embed", *inputs, "--model", model, "--backend", "torch", "--out", str(to),
                                           *extra])
    assert run([str(audio_tree / "sub")], out / "sub", "--pool", "max") == 0
    capsys.readouterr()
    assert run([str(audio_tree)], out) == 2  # would keep sub/b.npy max-pooled beside mean-pooled a.npy
    assert "holds embeddings made with pool 'max' (now 'mean')" in capsys.readouterr().err
    # A new directory inside it has a record of its own; a later run at the outer one finds it.
    assert run([str(audio_tree / "sub")], out / "sub" / "deeper", "--pool", "mean") == 0
    assert run([str(audio_tree / "sub")], out / "sub", "--pool", "max") == 2
    assert "deeper holds embeddings made with pool 'mean' (now 'max')" in capsys.readouterr().err
    shutil.rmtree(out / "sub" / "deeper")
    (audio_tree / "broken.wav").write_bytes(b"not audio")
    assert run([str(audio_tree)], out, "--overwrite") == 1  # broken.wav fails; both outputs replaced
    assert not (out / "sub" / ".audioenc-embed.json").exists()
    assert run([str(audio_tree)], out) == 1 and "skipped 2 existing" in capsys.readouterr().out
    assert run([str(audio_tree)], out, "--layer", "2") == 1  # layer 2 of 2 is the last: the same setting
    assert run([str(audio_tree)], out, "--dtype", "bfloat16") == 2
    assert "dtype 'float32' (now 'bfloat16')" in capsys.readouterr().err


def test_embed_record_above_a_new_out_blocks_nothing_and_a_linked_out_is_the_real_one(audio_tree, tmp_path,
                                                                                       w2v_checkpoints, capsys):
    model = w2v_checkpoints["wav2vec2-group"][0]
    home = tmp_path / "home"
    run = lambda inputs, to, *extra: main(["embed", *inputs, "--model", model, "--backend", "torch", "--out", str(to),
                                           *extra])
    assert run([str(audio_tree)], home) == 0  # a.npy and sub/b.npy, mean-pooled, recorded at home
    assert run([str(audio_tree)], home / "project" / "emb", "--pool", "max") == 0  # new: nothing there to mix
    (tmp_path / "elsewhere").mkdir()
    os.symlink(home / "sub", tmp_path / "elsewhere" / "link")
    capsys.readouterr()
    assert run([str(audio_tree / "sub")], tmp_path / "elsewhere" / "link", "--pool", "max") == 2
    assert "holds embeddings made with pool 'mean' (now 'max')" in capsys.readouterr().err


def test_embed_records_below_and_unreadable_ones_keep_mixes_visible(audio_tree, tmp_path, w2v_checkpoints, capsys):
    model = w2v_checkpoints["wav2vec2-group"][0]
    sf.write(audio_tree / "sub" / "d.wav", speech_like(16000, 4), 16000)
    out = tmp_path / "o"
    run = lambda inputs, to, *extra: main(["embed", *inputs, "--model", model, "--backend", "torch", "--out", str(to),
                                           *extra])
    sub = [str(audio_tree / "sub" / "b.flac"), str(audio_tree / "sub" / "d.wav")]
    assert run([str(audio_tree / "a.wav")], out) == 0
    assert run(sub, out / "sub", "--pool", "max") == 0
    # An --overwrite at o replacing only sub/b.npy leaves o/sub mixed too, so a run into o/sub sees it.
    only_b = tmp_path / "only-b"
    (only_b / "sub").mkdir(parents=True)
    shutil.copy(audio_tree / "sub" / "b.flac", only_b / "sub")
    assert run([str(only_b)], out, "--pool", "none", "--overwrite") == 0
    capsys.readouterr()
    assert run(sub, out / "sub", "--pool", "max") == 2
    assert "more than one setting" in capsys.readouterr().err
    # An unreadable record is a mixed one.
    fresh = tmp_path / "p"
    assert run(sub, fresh / "sub", "--pool", "max") == 0
    (fresh / "sub" / ".audioenc-embed.json").write_text("{trunc")
    assert run([str(audio_tree / "a.wav")], fresh) == 2 and run(sub, fresh / "sub") == 2
    # A record above --out speaks for the outputs no record below describes.
    q = tmp_path / "q"
    assert run([str(audio_tree / "a.wav")], q) == 0
    assert run([str(audio_tree / "sub" / "b.flac")], q / "x" / "new", "--pool", "max") == 0
    assert run([str(audio_tree / "sub" / "d.wav")], q / "x", "--pool", "max") == 0


def test_embed_refuses_an_output_a_same_named_input_may_have_written(tmp_path, w2v_checkpoints, capsys):
    """a.wav and a.flac both write a.npy: named one at a time into one --out, the second would be
    skipped as done (or replace the first's) without a word."""
    model = w2v_checkpoints["wav2vec2-group"][0]
    folder, out = tmp_path / "in", tmp_path / "out"
    folder.mkdir()
    sf.write(folder / "a.wav", speech_like(16000, 1), 16000)
    sf.write(folder / "a.flac", speech_like(16000, 2), 16000)
    run = lambda name, *extra: main(["embed", str(folder / name), "--model", model, "--backend", "torch", "--out",
                                     str(out), *extra])
    assert main(["embed", str(folder), "--model", model, "--backend", "torch", "--out", str(out)]) == 2
    assert "rename one, or embed them into different --out directories" in capsys.readouterr().err
    assert run("a.wav") == 0
    first = np.load(out / "a.npy")
    for extra in ((), ("--overwrite",)):
        assert run("a.flac", *extra) == 2
        assert f"{out / 'a.npy'} exists, and {folder / 'a.wav'} beside" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(out / "a.npy"), first)


def test_embed_reports_bad_files_and_goes_on(audio_tree, tmp_path, w2v_checkpoints, capsys):
    model = w2v_checkpoints["wav2vec2-group"][0]
    (audio_tree / "broken.wav").write_bytes(b"not audio at all")
    sf.write(audio_tree / "tiny.wav", speech_like(100, 3), 16000)  # decodes, but too short to encode
    out = tmp_path / "out"
    assert main(["embed", str(audio_tree), "--model", model, "--backend", "torch", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "broken.wav" in err and "cannot decode" in err
    assert f"failed: {audio_tree / 'tiny.wav'}: 100 samples at 16 kHz" in err  # named by its file only
    assert (out / "a.npy").exists() and (out / "sub" / "b.npy").exists()


def test_embed_warning_names_the_file_not_its_place_in_the_batch(audio_tree, tmp_path, whisper_checkpoints):
    """Float samples at integer PCM's scale change Whisper's frames; the warning must say which file
    (the encoder says "audio item 2": its place in a batch the user never sees)."""
    loud = audio_tree / "sub" / "c.wav"
    sf.write(loud, speech_like(20000, 4) * 32767, 16000, subtype="FLOAT")  # int16 values written as float
    with pytest.warns(UserWarning, match=re.escape(f"audioenc: {loud}: float samples reach")) as caught:
        assert main(["embed", str(audio_tree), "--model", whisper_checkpoints[80][0], "--backend", "torch",
                     "--out", str(tmp_path / "out")]) == 0
    assert not [w for w in caught if "audio item" in str(w.message)]


def test_embed_usage_errors(tmp_path, w2v_checkpoints, capsys):
    model = w2v_checkpoints["wav2vec2-group"][0]
    assert main(["embed", str(tmp_path / "nope.wav"), "--model", model, "--backend", "torch", "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "gone.wav").symlink_to(tmp_path / "nowhere.wav")
    assert main(["embed", str(tmp_path / "gone.wav"), "--model", model, "--backend", "torch", "--out", str(tmp_path)]) == 2
    assert f"{tmp_path / 'gone.wav'}: a link that leads to no file" in capsys.readouterr().err
    assert main(["embed", str(tmp_path), "--model", str(tmp_path / "no-model"), "--out", str(tmp_path)]) == 2
    capsys.readouterr()
    # an empty --model (an unset shell variable) is an error, not the random weights of no --model
    assert main(["embed", str(tmp_path), "--model", "", "--backend", "torch", "--out", str(tmp_path)]) == 2
    assert "the checkpoint's name is empty" in capsys.readouterr().err
    assert main(["embed", str(tmp_path), "--model", model, "--backend", "torch", "--out", str(tmp_path), "--layer", "x"]) == 2
    capsys.readouterr()
    assert main(["embed", str(tmp_path), "--model", model, "--backend", "torch", "--out", ""]) == 2
    assert "--out must name a directory, got ''" in capsys.readouterr().err
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if not os.access(locked, os.W_OK):  # root may write anywhere
        assert main(["embed", str(tmp_path), "--model", model, "--backend", "torch", "--out", str(locked)]) == 2
        assert "not a directory this user may write to" in capsys.readouterr().err


def test_embed_checks_its_arguments_before_any_work(audio_tree, tmp_path, w2v_checkpoints, capsys):
    model = w2v_checkpoints["wav2vec2-group"][0]
    base = ["embed", str(audio_tree), "--model", model, "--backend", "torch"]
    out = tmp_path / "out"
    for extra in (["--layer", "3"], ["--layer", "-1"], ["--layer", "\u00b2"], ["--batch-size", "0"],
                  ["--max-batch-seconds", "nan"]):
        assert main([*base, "--out", str(out), *extra]) == 2, extra
        assert not out.exists()
    err = capsys.readouterr().err
    assert "--layer must be between 0 and 2 for this model" in err
    assert "--layer must be a layer number (0 or more) or 'all', got '\u00b2'" in err  # str.isdigit takes it
    (tmp_path / "a-file").write_bytes(b"")
    assert main([*base, "--out", str(tmp_path / "a-file")]) == 2
    assert "is a file" in capsys.readouterr().err
    sf.write(audio_tree / "a.flac", speech_like(16000, 5), 16000)
    assert main([*base, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "a.flac and " in err and "a.wav would both write" in err  # both inputs named


@pytest.mark.parametrize("name, value", [("AUDIOENC_ONNX_THREADS", "two"), ("AUDIOENC_ONNX_PREPACK", "yes")])
def test_a_bad_onnx_setting_stops_embed_before_any_file(name, value, audio_tree, tmp_path, w2v_checkpoints,
                                                          monkeypatch, capsys):
    """Not one 'failed:' line per file, every file of the job failing alike: one error, exit status 2."""
    pytest.importorskip("onnxruntime")
    monkeypatch.setenv(name, value)
    out = tmp_path / "out"
    assert main(["embed", str(audio_tree), "--model", w2v_checkpoints["wav2vec2-group"][0], "--backend", "onnx",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"error: {name} must be" in err and "failed:" not in err
    assert not out.exists()


def test_auto_says_which_faster_backend_it_passed_over(audio_tree, tmp_path, w2v_checkpoints, monkeypatch, capsys):
    from audioenc.backends.onnx import OnnxBackend

    monkeypatch.setattr(OnnxBackend, "available", classmethod(lambda cls: "onnxruntime is not installed (pip ...)"))
    args = ["embed", str(audio_tree / "a.wav"), "--model", w2v_checkpoints["wav2vec2-group"][0], "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "auto")]) == 0
    assert "NOTE: backend auto chose torch (onnx: onnxruntime is not installed (pip ...))" in capsys.readouterr().out
    assert main([*args, "--backend", "torch", "--out", str(tmp_path / "torch")]) == 0  # asked for: no note
    assert "NOTE" not in capsys.readouterr().out


def test_a_broken_optional_dependency_is_not_called_missing(tmp_path, monkeypatch):
    from audioenc.backends import import_problem

    (tmp_path / "broken_runtime.py").write_text("raise ImportError('libbroken.so: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert import_problem(("json", "not_a_module_here"), "pip install x") == "not_a_module_here is not installed (pip install x)"
    assert import_problem(("broken_runtime",), "pip install x") == (
        "broken_runtime is installed but cannot be imported (ImportError: libbroken.so: cannot open shared object file)")
    assert import_problem(("json",), "pip install x") is None
    assert import_problem((), "pip install x", found_only=("json",)) is None
    assert import_problem(("json",), "pip install x", found_only=("not_a_module_here",)) == (
        "not_a_module_here is not installed (pip install x)")


def test_embed_output_that_is_a_directory_fails_that_file(audio_tree, tmp_path, w2v_checkpoints, capsys, monkeypatch):
    out = tmp_path / "out"
    (out / "a.npy").mkdir(parents=True)
    args = ["embed", str(audio_tree), "--model", w2v_checkpoints["wav2vec2-group"][0], "--backend", "torch"]
    assert main([*args, "--out", str(out)]) == 1
    captured = capsys.readouterr()
    assert "a.npy is a directory" in captured.err and "wrote 1 file(s)" in captured.out
    assert (out / "sub" / "b.npy").exists()

    blocked = tmp_path / "blocked"  # a file of the user's where an output's folder must go
    blocked.mkdir()
    (blocked / "sub").write_bytes(b"mine")
    assert main([*args, "--out", str(blocked)]) == 1
    captured = capsys.readouterr()
    assert f"failed: {audio_tree / 'sub' / 'b.flac'}: cannot write {blocked / 'sub' / 'b.npy'}" in captured.err
    assert "wrote 1 file(s)" in captured.out and (blocked / "a.npy").exists()
    assert (blocked / "sub").read_bytes() == b"mine"

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)  # the machine's problem, not a file's: the job stops at once
    assert main([*args, "--out", str(tmp_path / "full")]) == 1
    assert capsys.readouterr().err.count("No space left on device") == 1


def test_embed_follows_directory_links_once(audio_tree, tmp_path, w2v_checkpoints, capsys):
    root = tmp_path / "linked"
    root.mkdir()
    (root / "sub").symlink_to(audio_tree / "sub")
    (root / "loop").symlink_to(root)  # must not be walked forever
    args = ["embed", str(root), "--model", w2v_checkpoints["wav2vec2-group"][0], "--backend", "torch"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "sub" / "b.npy").exists()
    assert "wrote 1 file(s)" in capsys.readouterr().out


def test_embed_and_stream_check_their_inputs_before_loading_the_model(tmp_path, monkeypatch, capsys):
    """A mistyped path, or a folder with no audio, must not first wait for a load (or a hub download)."""
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(audioenc, "load", no_load)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no audio here")
    for path, message in (tmp_path / "nope.wav", "no such file"), (tmp_path / "empty", "no audio files found"):
        assert main(["embed", str(path), "--model", "facebook/wav2vec2-base", "--out", str(tmp_path / "out")]) == 2
        assert message in capsys.readouterr().err
    assert main(["stream", "--file", str(tmp_path / "nope.wav"), "--model", "facebook/wav2vec2-base"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_embed_reports_pipes_and_broken_links_in_directories_unopened(audio_tree, tmp_path, w2v_checkpoints, capsys):
    """Reading a pipe's header blocks until something writes to it: the job would hang. Skipping it (or
    a link to a file since removed) unseen would hide that its output is missing."""
    root = tmp_path / "with-pipe"
    shutil.copytree(audio_tree / "sub", root)
    os.mkfifo(root / "pipe.wav")
    (root / "gone.flac").symlink_to(tmp_path / "removed.flac")
    args = ["--model", w2v_checkpoints["wav2vec2-group"][0], "--backend", "torch"]
    assert main(["embed", str(root), *args, "--out", str(tmp_path / "out")]) == 1
    out, err = capsys.readouterr()
    assert "wrote 1 file(s)" in out
    assert f"failed: {root / 'pipe.wav'}: not a regular file" in err
    assert f"failed: {root / 'gone.flac'}: a link that leads to no file" in err
    assert "2 of 3 file(s) failed" in err
    assert main(["embed", str(root / "pipe.wav"), *args, "--out", str(tmp_path / "out2")]) == 2
    assert "not a regular file" in capsys.readouterr().err


def test_embed_reports_a_folder_it_cannot_list(audio_tree, tmp_path, w2v_checkpoints, monkeypatch, capsys):
    """chmod 000 on a subfolder (as another user than root): its files must not vanish unseen."""
    root = tmp_path / "tree"
    shutil.copytree(audio_tree / "sub", root)
    shutil.copytree(audio_tree / "sub", root / "locked")
    scandir = os.scandir

    def refusing(path="."):
        if os.path.realpath(path).endswith("locked"):  # by its own name or through the link
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    (root / "link").symlink_to(root / "locked")
    args = ["embed", str(root), str(root), "--model", w2v_checkpoints["wav2vec2-group"][0], "--backend", "torch"]
    assert main([*args, "--out", str(tmp_path / "out")]) == 1
    out, err = capsys.readouterr()
    assert "wrote 1 file(s)" in out
    assert err.count("cannot list this folder") == 1  # however often it is reached
    assert f"failed: {root / 'locked'}: cannot list this folder (Permission denied)" in err
    assert "1 folder(s) could not be listed: their files were not embedded" in err


def test_a_directory_reached_directly_and_by_link_is_named_by_its_own_path(audio_tree, tmp_path, w2v_checkpoints):
    root = tmp_path / "tree"
    shutil.copytree(audio_tree / "sub", root / "zdir")
    (root / "alink").symlink_to(root / "zdir")  # sorts first, but is the link
    out = tmp_path / "out"
    args = ["embed", str(root), "--model", w2v_checkpoints["wav2vec2-group"][0], "--backend", "torch"]
    assert main([*args, "--out", str(out)]) == 0
    assert sorted(os.listdir(out)) == [".audioenc-embed.json", "zdir"]


def test_stale_temporaries_are_removed_but_not_a_running_jobs(tmp_path):
    from audioenc.embed_files import STALE_TMP_S, TMP_PREFIX, remove_stale_temporaries

    old, young = tmp_path / f"{TMP_PREFIX}old.npy", tmp_path / f"{TMP_PREFIX}young.npy"
    old.write_bytes(b"")
    young.write_bytes(b"")
    os.utime(old, (0, os.path.getmtime(old) - STALE_TMP_S - 60))
    remove_stale_temporaries(str(tmp_path))
    assert not old.exists() and young.exists()


def test_interrupt_is_a_message_not_a_traceback(monkeypatch, capsys):
    import audioenc.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_info", interrupted)
    assert main(["info"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_default_model_is_random_and_says_so(audio_tree, tmp_path):
    result = subprocess.run([sys.executable, "-m", "audioenc", "embed", str(audio_tree / "a.wav"),
                             "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "RANDOM weights" in result.stdout
    assert np.load(tmp_path / "o" / "a.npy").shape == (768,)


def test_info_runs():
    result = subprocess.run([sys.executable, "-m", "audioenc", "info"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert "native core" in result.stdout and "backend torch" in result.stdout
    assert f"cache: {os.environ['AUDIOENC_CACHE']}, " in result.stdout


def test_help_names_every_default():
    """--help is where the flags' defaults are documented: every option that has one says it."""
    import argparse

    from audioenc.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    silent = [f"{name} {action.option_strings[-1]}" for name, command in commands.items() for action in command._actions
              if action.option_strings and action.default not in (None, False, [], argparse.SUPPRESS)
              and "default" not in (action.help or "")]
    assert silent == []


def test_version():
    result = subprocess.run([sys.executable, "-m", "audioenc", "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == f"audioenc {audioenc.__version__}"


def test_embed_killed_midway_resumes_without_redoing_or_corrupting(tmp_path):
    import signal
    import time

    root = tmp_path / "in"
    root.mkdir()
    for i in range(10):
        sf.write(root / f"clip{i:02d}.wav", speech_like(32000 + 160 * i, i), 16000)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "audioenc", "embed", str(root), "--out", str(out), "--backend", "torch",
           "--batch-size", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300

    def finished():  # outputs under their final names (temporaries start with a dot)
        return {f.name: f.stat().st_mtime_ns for f in out.iterdir() if not f.name.startswith(".")} if out.exists() else {}

    while time.time() < deadline and not finished():
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = finished()
    assert 1 <= len(first) < 10, "the job was not interrupted mid-way"
    for name in first:
        assert np.load(out / name).shape == (768,)  # finished outputs are whole
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"skipped {len(first)} existing" in result.stdout
    assert sorted(f.name for f in out.iterdir()) == [".audioenc-embed.json"] + [f"clip{i:02d}.npy" for i in range(10)]
    for name, mtime in first.items():
        assert (out / name).stat().st_mtime_ns == mtime  # not redone
    enc = audioenc.load("random:wav2vec2-base", backend="torch")
    np.testing.assert_allclose(np.load(out / "clip07.npy"), enc.embed(str(root / "clip07.wav"))[0].numpy(),
                               rtol=1e-4, atol=1e-5)


def test_embed_batches_by_length_like_single_items(tmp_path, w2v_checkpoints):
    model = w2v_checkpoints["wav2vec2-group"][0]
    root = tmp_path / "in"
    root.mkdir()
    for i, n in enumerate((16000, 4000, 30000, 401, 9000)):
        sf.write(root / f"f{i}.wav", speech_like(n, i), 16000)
    sf.write(root / "short.wav", speech_like(100, 9), 16000)  # too short for one frame
    out = tmp_path / "out"
    assert main(["embed", str(root), "--model", model, "--backend", "torch", "--out", str(out),
                 "--batch-size", "3", "--pool", "none"]) == 1
    enc = audioenc.load(model, backend="torch")
    for i in range(5):
        alone = enc.encode(str(root / f"f{i}.wav")).last_hidden_state[0].numpy()
        np.testing.assert_allclose(np.load(out / f"f{i}.npy"), alone, rtol=1e-5, atol=1e-5)
    assert not (out / "short.npy").exists()


def test_embed_decodes_the_next_batch_while_one_is_encoded(tmp_path):
    from audioenc.embed_files import decoded_batches

    waves = [speech_like(4000 + 100 * i, i) for i in range(4)]
    for i, wave in enumerate(waves):
        sf.write(tmp_path / f"f{i}.wav", wave, 16000, subtype="FLOAT")
    (tmp_path / "junk.wav").write_bytes(b"not audio")
    batches = [[("f0.wav", "a"), ("junk.wav", "b")], [("f1.wav", "c"), ("f2.wav", "d")], [("f3.wav", "e")]]
    requested = []

    def lazily():
        for i, batch in enumerate(batches):
            requested.append(i)
            yield [(str(tmp_path / path), target) for path, target in batch]

    got = []
    for batch in decoded_batches(lazily(), workers=3):
        got.append(batch)
        assert requested == list(range(min(len(got) + 1, len(batches))))  # the next batch is already decoding
    assert [[target for _, target, _ in b] for b in got] == [[target for _, target in b] for b in batches]
    assert isinstance(got[0][1][2], ValueError)
    for (_, _, wave), want in zip([got[0][0], *got[1], got[2][0]], waves):
        np.testing.assert_array_equal(wave, want)
    inline = list(decoded_batches(lazily(), workers=0))  # beside a CPU backend
    assert [[t for _, t, _ in b] for b in inline] == [[t for _, t, _ in b] for b in got]


def test_stream_command_reads_raw_pcm_from_stdin(tmp_path, w2v_checkpoints):
    model = w2v_checkpoints["wav2vec2-group"][0]
    wave = speech_like(16000 * 3 + 500, 3)
    pcm = np.round(wave * 30000).astype("<i2")
    out = tmp_path / "frames.npy"
    result = subprocess.run([sys.executable, "-m", "audioenc", "stream", "--model", model, "--backend", "torch",
                             "--chunk-s", "1", "--out", str(out)], input=pcm.tobytes(), capture_output=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    lines = result.stdout.decode().splitlines()
    assert len(lines) >= 3 and "frames" in lines[0] and "compute" in lines[0]
    enc = audioenc.load(model, backend="torch")
    offline = enc.encode(pcm).last_hidden_state[0].numpy()
    assert np.load(out).shape == offline.shape
    stream = enc.stream(chunk_s=1.0)
    expected = np.concatenate([stream.push(pcm).frames.numpy(), stream.flush().frames.numpy()])
    np.testing.assert_allclose(np.load(out), expected, rtol=1e-4, atol=1e-5)
    again = subprocess.run([sys.executable, "-m", "audioenc", "stream", "--model", model, "--backend", "torch",
                            "--out", str(out)], input=pcm.tobytes(), capture_output=True, timeout=300)
    assert again.returncode == 2 and b"exists" in again.stderr  # refused before the stream, not after it
    # Interleaved stereo, in reads that split its frames: mixed to mono as the stream API does it.
    other = np.round(speech_like(len(pcm), 4) * 30000).astype("<i2")
    stereo = np.stack([pcm, other], axis=1)
    result = subprocess.run([sys.executable, "-m", "audioenc", "stream", "--model", model, "--backend", "torch",
                             "--chunk-s", "1", "--channels", "2", "--block-ms", "7", "--out", str(tmp_path / "st.npy")],
                            input=stereo.tobytes() + b"\x07", capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    assert b"stdin ended with 1 byte(s) of an incomplete 4-byte sample frame (s16le, 2 channel(s))" in result.stderr
    stream = enc.stream(chunk_s=1.0)
    expected = np.concatenate([stream.push(stereo).frames.numpy(), stream.flush().frames.numpy()])
    np.testing.assert_allclose(np.load(tmp_path / "st.npy"), expected, rtol=1e-4, atol=1e-5)


def test_stream_command_keeps_its_frames_when_stdout_closes(tmp_path, w2v_checkpoints):
    """`audioenc stream ... --out F | head -1`: the reader leaves early; F still gets the frames."""
    model = w2v_checkpoints["wav2vec2-group"][0]
    sf.write(tmp_path / "a.wav", speech_like(16000 * 10, 4), 16000)
    # Many lines (the pipe breaks during a push), then one push line and the flush's (during the flush).
    for i, (block_ms, least) in enumerate([("100", 25), ("10000", 499)]):
        out = tmp_path / f"frames{i}.npy"
        command = (f"set -o pipefail; {shlex.quote(sys.executable)} -m audioenc stream --model {shlex.quote(model)} "
                   f"--backend torch --chunk-s 0.5 --block-ms {block_ms} --file {tmp_path / 'a.wav'} --out {out} "
                   "| head -1")
        result = subprocess.run(["bash", "-c", command], capture_output=True, timeout=300)
        assert result.returncode in (0, 141), result.stderr.decode()  # 0: head read everything in time
        assert b"Traceback" not in result.stderr
        if result.returncode == 141:
            assert b"stdout was closed; the frames before it were flushed and saved" in result.stderr
        assert 499 >= np.load(out).shape[0] >= least  # the stream ends where its reader left (all 10 s: 499)


def test_stream_command_is_live_and_ctrl_c_keeps_the_frames(tmp_path, w2v_checkpoints):
    """Frames come out while stdin is still open, though 3 s never fill one 10 s --block-ms read;
    SIGINT ends the stream like end of input: every frame of the audio received is flushed and
    saved (to a name without .npy too)."""
    model = w2v_checkpoints["wav2vec2-group"][0]
    pcm = np.round(speech_like(16000 * 3, 4) * 30000).astype("<i2")
    out = tmp_path / "frames"
    proc = subprocess.Popen([sys.executable, "-m", "audioenc", "stream", "--model", model, "--backend", "torch",
                             "--chunk-s", "1", "--right-context-s", "1", "--block-ms", "10000", "--out", str(out)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            # as a terminal's foreground job gets it: a suite run in the background of a
                            # non-interactive shell (`pytest &` in a script) inherits SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        proc.stdin.write(pcm.tobytes())
        proc.stdin.flush()  # and left open, as a microphone's pipe
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        assert ready, "no frames while stdin is open"
        assert b"frames" in proc.stdout.readline()
        time.sleep(3)  # the rest of the pipe's 3 s is read meanwhile, and waits for more to fill a block
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, err.decode()
    assert b"interrupted; the frames before it were flushed and saved" in err
    saved = np.load(out)
    assert saved.shape == (149, 32) and np.isfinite(saved).all()  # all 3 s: (48000 - 400) // 320 + 1 frames


def test_stream_command_checks_its_arguments_and_keeps_frames_before_bad_audio(tmp_path, w2v_checkpoints):
    model = w2v_checkpoints["wav2vec2-group"][0]
    base = [sys.executable, "-m", "audioenc", "stream", "--model", model, "--backend", "torch"]
    wave = speech_like(16000 * 3, 5).astype("<f4")
    sf.write(tmp_path / "a.wav", wave, 16000)
    sf.write(tmp_path / "2k.wav", wave[:4000], 2000)
    (tmp_path / "dangling.npy").symlink_to(tmp_path / "nowhere")
    for extra, message in ((["--block-ms", "nan"], "--block-ms"), (["--block-ms", "0"], "--block-ms"),
                           (["--block-ms", "1e9"], "--block-ms"), (["--realtime"], "--realtime"),
                           (["--file", str(tmp_path / "a.wav"), "--rate", "8000"], "--rate"),
                           (["--out", str(tmp_path)], "is a directory"), (["--rate", "0"], "error: --rate 0 Hz is outside"), (["--out", "-"], "--out - would name"),
                           (["--left-context-s", "1e5"], "a stream window (--left-context-s + --chunk-s + "
                                                         "--right-context-s) can be at most"),
                           (["--chunk-s", "-1"], "error: --chunk-s must be at least 0.02 s"),  # the flags typed
                           (["--file", str(tmp_path / "2k.wav")], "2k.wav's sample rate 2000 Hz is outside"),
                           (["--overwrite"], "there is none"),
                           (["--channels", "0"], "--channels must be"), (["--layer", "3"], "--layer must be between 0 and 2"),
                           (["--out", str(tmp_path / "a.wav" / "x.npy")], "a.wav is not a directory"),
                           (["--out", str(tmp_path / "dangling.npy")], "dangling.npy exists (use --overwrite)"),
                           (["--file", str(tmp_path / "a.wav"), "--channels", "2"], "--channels describe stdin")):
        result = subprocess.run([*base, *extra], input=b"", capture_output=True, timeout=300)
        assert result.returncode == 2 and message.encode() in result.stderr, (extra, result.stderr.decode())
    wave[16000 * 2 + 7] = np.nan  # f32le input with a NaN after two seconds
    out = tmp_path / "frames.npy"
    result = subprocess.run([*base, "--format", "f32le", "--chunk-s", "1", "--out", str(out)], input=wave.tobytes(),
                            capture_output=True, timeout=300)
    assert result.returncode == 1, result.stderr
    found = re.search(rb"stopped at the block from sample (\d+) \([0-9.]+ s\) of the input: block: audio contains "
                      rb"NaN or Inf \(first at sample (\d+)\)", result.stderr)
    assert found and int(found[1]) + int(found[2]) == 16000 * 2 + 7, result.stderr  # where it is in the input
    assert b"Traceback" not in result.stderr
    assert 50 <= np.load(out).shape[0] < 150  # the frames of the audio before the bad block
    # Finite audio that overflows once resampled: the stream fails for good, the frames before stay.
    wave = speech_like(44100 * 3, 6).astype("<f4")
    wave[int(44100 * 2.6) : int(44100 * 2.6) + 1000] = 3e38
    out = tmp_path / "frames44.npy"
    result = subprocess.run([*base, "--format", "f32le", "--rate", "44100", "--chunk-s", "1", "--out", str(out)],
                            input=wave.tobytes(), capture_output=True, timeout=300)
    assert result.returncode == 1 and b"resampling to 16 kHz overflows" in result.stderr, result.stderr
    assert b"Traceback" not in result.stderr
    assert 0 < np.load(out).shape[0] < 150


def test_bench_times_backends_side_by_side(w2v_checkpoints, capsys):
    path = w2v_checkpoints["wav2vec2-group"][0]
    assert main(["bench", "--model", path, "--backend", "torch", "--against", "onnx:float32", "torch", "transformers",
                 "--seconds", "0.5", "--batch", "2", "--repeats", "2", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("torch ", "onnx ", "transformers "))]
    assert [r.split()[0] for r in rows] == ["torch", "onnx", "transformers"]
    assert rows[0].split()[-2:] == ["1.00x", "0.0e+00"]
    assert float(rows[1].split()[3]) > 0  # median ms
    assert all(float(r.split()[-1]) <= 1e-5 for r in rows[1:])  # the same frames, peer included
    assert main(["bench", "--model", path, "--against", "transformers", "--layer", "1"]) == 2
    assert "transformers runs every layer" in capsys.readouterr().err
    assert main(["bench", "--model", path, "--seconds", "0"]) == 2
    assert main(["bench", "--model", path, "--seconds", "nan"]) == 2
    assert main(["bench", "--model", path, "--backend", "nonsense"]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert main(["bench", "--model", "random:wavlm-large", "--against", "onnnx"]) == 2  # before the model loads
    assert "'onnnx' is neither an audioenc backend" in capsys.readouterr().err
    assert main(["bench", "--model", path, "--seconds", "3600", "--batch", "64"]) == 2
    assert "at most 3600 s of audio" in capsys.readouterr().err
    assert main(["bench", "--model", path, "--backend", "onnx", "--against", "ctranslate2"]) == 2
    err = capsys.readouterr().err  # refused before the onnx backend's first call (a graph export)
    assert "ctranslate2 (auto): CTranslate2 runs Whisper encoders" in err and "first call" not in err
    assert main(["bench", "--model", path, "--backend", "torch", "--layer", "3", "--repeats", "1"]) == 2
    assert "error: torch (auto): --layer must be between 0 and 2, got 3" in capsys.readouterr().err  # not output_layer


def test_bench_prints_the_threads_of_every_contender(w2v_checkpoints, monkeypatch, capsys):
    """$AUDIOENC_ONNX_THREADS sets onnxruntime's (and CTranslate2's) threads apart from torch's, which
    the torch backend and the torch peers run: the table must say so, not only torch's count."""
    import torch

    monkeypatch.setenv("AUDIOENC_ONNX_THREADS", str(torch.get_num_threads() + 1))
    path = w2v_checkpoints["wav2vec2-group"][0]
    assert main(["bench", "--model", path, "--backend", "onnx", "--dtype", "float32", "--against", "transformers",
                 "--seconds", "0.5", "--repeats", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert (f"torch threads {torch.get_num_threads()}, onnxruntime and CTranslate2 intra-op threads "
            f"{torch.get_num_threads() + 1}") in out, out


def test_bench_against_whisper_peers(whisper_checkpoints, w2v_checkpoints, tmp_path, capsys):
    """faster-whisper's engine and openai-whisper on the same weights: float32 gives the reference's
    frames, CTranslate2's int8 nearly."""
    pytest.importorskip("ctranslate2")
    pytest.importorskip("whisper")
    transformers = pytest.importorskip("transformers")

    # openai-whisper's MLP is always 4 x d_model wide
    config = transformers.WhisperConfig(num_mel_bins=128,
                                        **{**TINY_WHISPER, "encoder_ffn_dim": 4 * TINY_WHISPER["d_model"]})
    path = str(tmp_path / "whisper")
    randomize(transformers.WhisperForConditionalGeneration(config)).save_pretrained(path)
    transformers.WhisperFeatureExtractor(feature_size=128).save_pretrained(path)
    assert main(["bench", "--model", path, "--backend", "torch", "--against", "ctranslate2", "ctranslate2:int8",
                 "openai-whisper", "--seconds", "2", "--repeats", "1", "--warmup", "0"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(("ctranslate2 ", "openai-whisper "))]
    assert [row[:3:2] for row in rows] == [["ctranslate2", "float32"], ["ctranslate2", "int8"],
                                           ["openai-whisper", "float32"]]
    assert float(rows[0][-1]) <= 1e-5 and float(rows[2][-1]) <= 1e-5
    assert float(rows[1][-1]) <= 0.1
    w2v = w2v_checkpoints["wav2vec2-group"][0]
    for peer, message in (("ctranslate2", "CTranslate2 runs Whisper encoders"),
                          ("openai-whisper", "openai-whisper runs Whisper encoders")):
        assert main(["bench", "--model", w2v, "--against", peer]) == 2
        assert message in capsys.readouterr().err
    assert main(["bench", "--model", whisper_checkpoints[80][0], "--against", "openai-whisper"]) == 2
    assert "openai-whisper's MLP is 4 x d_model wide" in capsys.readouterr().err
    assert main(["bench", "--model", path, "--against", "ctranslate2:float8"]) == 2
    assert "no compute type 'float8'" in capsys.readouterr().err
    assert main(["bench", "--model", path, "--against", "openai-whisper", "--seconds", "31"]) == 2
    assert "first 30 s window" in capsys.readouterr().err


def test_bench_ctranslate2_runs_as_many_threads_as_audioenc(whisper_checkpoints, monkeypatch):
    """On a machine with hyperthreads torch (and so audioenc's onnx backend and the torch peers) runs one
    thread per physical core: CTranslate2 gets that many too, not one per usable (logical) core."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    pytest.importorskip("transformers")
    import torch

    from audioenc.peer_ctranslate2 import ctranslate2_call

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)  # 8 logical cores
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)  # torch's default there: the physical cores
    threads, whisper = [], ctranslate2.models.Whisper
    monkeypatch.setattr(ctranslate2.models, "Whisper", lambda *a, **kw: threads.append(kw["intra_threads"]) or whisper(*a, **kw))
    reference = audioenc.load(whisper_checkpoints[80][0], backend="torch", device="cpu", dtype="float32")
    ctranslate2_call(reference.backend.model, torch.device("cpu"), "float32")
    assert threads == [4]


def test_stream_command_keeps_a_file_made_at_its_out_during_the_stream(tmp_path, w2v_checkpoints, monkeypatch, capsys):
    from audioenc.streaming import EncoderStream

    sf.write(tmp_path / "a.wav", speech_like(16000 * 2, 8), 16000)
    out = tmp_path / "frames.npy"
    flush = EncoderStream.flush

    def meanwhile(self):
        out.write_bytes(b"the user's file")
        return flush(self)

    monkeypatch.setattr(EncoderStream, "flush", meanwhile)
    args = ["stream", "--model", w2v_checkpoints["wav2vec2-group"][0], "--backend", "torch", "--file", str(tmp_path / "a.wav")]
    assert main([*args, "--out", str(out)]) == 0
    assert out.read_bytes() == b"the user's file"
    assert "frames.npy appeared during the stream and was kept; the frames were saved to" in capsys.readouterr().err
    assert np.load(tmp_path / "frames-1.npy").shape == (99, 32)


def test_stream_command_with_stdin_closed_says_so(w2v_checkpoints, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", None)  # as Python starts under `audioenc stream <&-`
    assert main(["stream", "--model", w2v_checkpoints["wav2vec2-group"][0], "--backend", "torch"]) == 2
    assert "stdin is closed; pipe raw PCM to it or give --file" in capsys.readouterr().err


@pytest.mark.parametrize("kind, subtype", [("WAV", "PCM_16"), ("FLAC", "PCM_16"), ("AIFF", "PCM_16"),
                                           ("Ogg", "VORBIS")])
def test_stream_command_refuses_an_audio_file_on_stdin(kind, subtype, tmp_path, w2v_checkpoints, monkeypatch,
                                                       capsys):
    """`audioenc stream < talk.wav` (or arecord's default WAV output): read as raw PCM, the header and
    a file at another rate or channel count would give frames of garbage, with no error."""
    path = tmp_path / "talk"
    sf.write(path, np.stack([speech_like(48000 * 2, 6)] * 2, axis=1), 48000, subtype=subtype, format=kind)
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BufferedReader(io.BytesIO(path.read_bytes()))))
    out = tmp_path / "frames.npy"
    assert main(["stream", "--model", w2v_checkpoints["wav2vec2-group"][0], "--backend", "torch",
                 "--out", str(out)]) == 2
    assert f"error: stdin starts with a {kind} file's header, but audioenc stream reads raw PCM" in capsys.readouterr().err
    assert not out.exists()


def test_stream_frames_never_replace_a_file_the_user_did_not_name(tmp_path):
    """--overwrite names --out alone: where a folder took --out, NAME-1.npy is still the user's."""
    from audioenc.cli import save_frames

    (tmp_path / "x.npy").mkdir()
    np.save(tmp_path / "x-1.npy", np.array([42]))
    frames = np.ones((3, 4), np.float32)
    assert save_frames(str(tmp_path / "x.npy"), frames, overwrite=True) == str(tmp_path / "x-2.npy")
    assert np.load(tmp_path / "x-1.npy").tolist() == [42]
    np.testing.assert_array_equal(np.load(tmp_path / "x-2.npy"), frames)


def test_embed_do_normalize_replaces_the_checkpoints_setting(w2v_checkpoints, whisper_checkpoints, tmp_path, capsys):
    """A checkpoint saved without its feature extractor: normalised by default with a warning that
    names the flag; --do-normalize false gives what load(..., preprocessor=) gives, and is recorded
    with the outputs, so a rerun with the other setting into the same --out is refused."""
    bare = tmp_path / "bare"
    shutil.copytree(w2v_checkpoints["wav2vec2-group"][0], bare)
    (bare / "preprocessor_config.json").unlink()
    wav = tmp_path / "a.wav"
    sf.write(wav, speech_like(8000, 3), 16000)
    run = lambda out, *flags: main(["embed", str(wav), "--model", str(bare), "--backend", "torch", "--out",
                                    str(tmp_path / out), *flags])
    with pytest.warns(UserWarning, match="--do-normalize false"):
        assert run("normalised") == 0
    # the command prints the warning as a plain line, not as Python's file:line: UserWarning
    result = subprocess.run([sys.executable, "-m", "audioenc", "embed", str(wav), "--model", str(bare), "--backend",
                             "torch", "--out", str(tmp_path / "command")], capture_output=True, timeout=300)
    assert result.returncode == 0 and b": no feature extractor settings (preprocessor_config.json)" in result.stderr, result.stderr
    assert b"warning: " in result.stderr and b"UserWarning" not in result.stderr
    assert run("raw", "--do-normalize", "false") == 0
    want = audioenc.load(str(bare), backend="torch", preprocessor={"do_normalize": False}).embed(str(wav))[0]
    raw = np.load(tmp_path / "raw" / "a.npy")
    np.testing.assert_array_equal(raw, want)
    assert not np.allclose(raw, np.load(tmp_path / "normalised" / "a.npy"))
    capsys.readouterr()
    assert run("raw", "--do-normalize", "true", "--overwrite") == 0  # replaced, not mixed
    assert run("raw", "--do-normalize", "false") == 2
    assert "do_normalize True (now False)" in capsys.readouterr().err
    for value, message in [("false", "--do-normalize is for the wav2vec2 family"),
                           ("true", "do_normalize=True is not computed for Whisper")]:
        assert main(["embed", str(wav), "--model", whisper_checkpoints[80][0], "--do-normalize", value,
                     "--out", str(tmp_path / "w")]) == 2
        assert message in capsys.readouterr().err


def test_embed_keeps_links_and_files_that_appear_at_an_output(audio_tree, tmp_path, w2v_checkpoints, capsys,
                                                              monkeypatch):
    """A link at an output's path is the user's, even one that leads nowhere; an output that appears while
    the job runs (another job's) is kept too: only --overwrite replaces."""
    model = w2v_checkpoints["wav2vec2-group"][0]
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.npy").symlink_to(tmp_path / "not-yet-there.npy")
    args = ["embed", str(audio_tree), "--model", model, "--backend", "torch", "--out", str(out)]
    assert main(args) == 0
    assert (out / "a.npy").is_symlink() and "skipped 1 existing" in capsys.readouterr().out

    from audioenc import embed_files

    late = tmp_path / "late"
    write_output = embed_files.write_output

    def another_job_wrote_first(out_, row, target, *rest, **kwargs):
        with open(target, "wb") as f:
            f.write(b"another job's")
        return write_output(out_, row, target, *rest, **kwargs)

    monkeypatch.setattr(embed_files, "write_output", another_job_wrote_first)
    assert main(["embed", str(audio_tree / "a.wav"), "--model", model, "--backend", "torch", "--out", str(late)]) == 1
    assert (late / "a.npy").read_bytes() == b"another job's"
    assert "appeared while this job ran and was kept" in capsys.readouterr().err
    assert main(["embed", str(audio_tree / "a.wav"), "--model", model, "--backend", "torch", "--out", str(late),
                 "--overwrite"]) == 0
    assert np.load(late / "a.npy").shape == (32,)
