"""TensorRT backend. Profiles are checked everywhere; engines only where TensorRT and a GPU exist
(never on the machines this was written on: those tests skip)."""
import os
import traceback
import warnings

import pytest
import torch

import audioenc
from audioenc.backends.tensorrt import Profile, TensorRTBackend
from audioenc.config import Wav2Vec2Dims, WhisperDims
from conftest import rel_err, speech_like

needs_tensorrt = pytest.mark.skipif(TensorRTBackend.available() is not None,
                                    reason=f"TensorRT backend: {TensorRTBackend.available()}")


def test_profiles_from_ranges():
    w2v = Profile.from_ranges(Wav2Vec2Dims("wav2vec2"), (1, 2, 8), (0.01, 10, 30))
    assert w2v.shapes == (("waveforms", (1, 400), (2, 160000), (8, 480000)), ("lengths", (1,), (2,), (8,)))
    whisper = Profile.from_ranges(WhisperDims(n_mels=128), (1, 4, 16))
    assert whisper.shapes == (("mel", (1, 128, 3000), (4, 128, 3000), (16, 128, 3000)),)
    with pytest.raises(ValueError, match="outside the engine's profile"):
        w2v.check({"waveforms": torch.zeros(9, 1000), "lengths": torch.zeros(9)})


def test_profile_from_env(monkeypatch):
    monkeypatch.setenv("AUDIOENC_TRT_PROFILE", "batch=1:4:4,seconds=1:2:3")
    assert Profile.from_env(Wav2Vec2Dims("hubert")).shapes[0] == ("waveforms", (1, 16000), (4, 32000), (4, 48000))
    monkeypatch.setenv("AUDIOENC_TRT_PROFILE", "batch=4")  # one number: min, opt and max, as --batch takes it
    assert Profile.from_env(Wav2Vec2Dims("hubert")).shapes[1] == ("lengths", (4,), (4,), (4,))
    for text, message in (("batch=0:0:0", "0 < MIN <= OPT <= MAX"), ("batch=-4:1:2", "0 < MIN"),
                          ("batch=8:4:1", "0 < MIN"), ("batch=1.5:2:3", "whole numbers"),
                          ("seconds=a:b:c", "seconds must be MIN:OPT:MAX or one number"),
                          ("seconds=1:2:inf", "0 < MIN"), ("frames=1:2:3", "expected batch=")):
        monkeypatch.setenv("AUDIOENC_TRT_PROFILE", text)
        with pytest.raises(ValueError, match=f"AUDIOENC_TRT_PROFILE.*{message}"):
            Profile.from_env(Wav2Vec2Dims("hubert"))


def test_profile_from_env_warns_that_seconds_do_not_apply_to_whisper(monkeypatch):
    monkeypatch.setenv("AUDIOENC_TRT_PROFILE", "batch=1:2:4,seconds=1:2:3")
    with pytest.warns(UserWarning, match="seconds do not apply to a Whisper engine"):
        profile = Profile.from_env(WhisperDims())
    assert profile == Profile.from_ranges(WhisperDims(), (1, 2, 4))
    monkeypatch.setenv("AUDIOENC_TRT_PROFILE", "batch=1:2:4")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Profile.from_env(WhisperDims())
        Profile.from_env(Wav2Vec2Dims("hubert"))


def test_unavailable_is_a_clear_error():
    reason = TensorRTBackend.available()
    if reason is None:
        pytest.skip("TensorRT is available here")
    with pytest.raises(ValueError, match="not available here"):
        audioenc.load("random:whisper-tiny", backend="tensorrt")


def test_engines_are_built_without_tf32(tmp_path, monkeypatch):
    """TensorRT allows TF32 for float32 MatMuls and Convs unless told not to (10-bit mantissas: about
    1e-3 off the reference, where a float32 engine must be within 1e-4). Built here with a stand-in
    for TensorRT's Python API, which records the calls."""
    import sys
    from unittest import mock

    from audioenc.backends import tensorrt as backend

    trt = mock.MagicMock()
    config = trt.Builder.return_value.create_builder_config.return_value
    config.get_timing_cache.return_value.serialize.return_value = b"timings"
    trt.Builder.return_value.build_serialized_network.return_value = b"engine"
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    profile = Profile.from_ranges(WhisperDims(n_mels=80))
    assert backend.build_engine("model.onnx", profile, str(tmp_path / "timing.cache")) == b"engine"
    config.clear_flag.assert_any_call(trt.BuilderFlag.TF32)
    assert (tmp_path / "timing.cache").read_bytes() == b"timings"


@pytest.fixture
def stand_in_builds(tmp_path, monkeypatch):
    """cached_engine with a stand-in for TensorRT whose build takes a second and writes the pid of
    each process that builds to the file returned (a window in which other processes arrive)."""
    import sys
    import time
    from unittest import mock

    from audioenc.backends import tensorrt as backend

    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "tensorrt", mock.MagicMock(__version__="10.0"))
    monkeypatch.setattr(backend, "gpu_id", lambda: "stand-in sm90")
    builds = tmp_path / "builds"

    def build(onnx_path, profile, timing_cache_path):
        with open(builds, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        return b"engine"

    monkeypatch.setattr(backend, "build_engine", build)
    return builds


def engine_in_child(onnx_path: str, before=None) -> tuple[int, int]:
    """Forks a process that runs ``before`` then takes the engine for ``onnx_path``, and writes it to
    the pipe whose reading end is returned with its pid."""
    from audioenc.backends import tensorrt as backend

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read)
            if before is not None:
                before()
            os.write(write, backend.cached_engine(onnx_path, Profile.from_ranges(WhisperDims(n_mels=80)), "float32"))
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write)
    return pid, read


def test_workers_started_together_on_an_empty_cache_build_an_engine_once(stand_in_builds, tmp_path):
    """Workers of a service started at once on an empty cache: one builds the engine (minutes, and
    gigabytes), the others wait for it and take it; no lock file stays behind."""
    children = [engine_in_child(str(tmp_path / "graph" / "model.onnx")) for _ in range(3)]
    for pid, read in children:
        with os.fdopen(read, "rb") as f:
            engine = f.read()
        assert os.waitpid(pid, 0)[1] == 0 and engine == b"engine"
    assert len(stand_in_builds.read_text().split()) == 1
    assert [name for name in os.listdir(tmp_path / "cache" / "tensorrt") if name.endswith(".lock")] == []


def test_a_killed_build_leaves_no_one_waiting(stand_in_builds, tmp_path, capfd):
    """A process killed (SIGKILL) while it builds an engine: one that waited for it, and said so on
    stderr, builds the engine itself."""
    import signal
    import threading
    import time

    from audioenc.backends import tensorrt as backend

    onnx_path, profile = str(tmp_path / "graph" / "model.onnx"), Profile.from_ranges(WhisperDims(n_mels=80))
    started = tmp_path / "started"
    killed, _ = engine_in_child(onnx_path, before=lambda: setattr(backend, "build_engine", lambda *args: (
        started.touch(), time.sleep(600))))
    result = []
    try:
        deadline = time.monotonic() + 60
        while not started.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        waiter = threading.Thread(target=lambda: result.append(backend.cached_engine(onnx_path, profile, "float32")))
        waiter.start()
        err = ""
        while "waiting for another process" not in err and time.monotonic() < deadline:
            time.sleep(0.05)
            err += capfd.readouterr().err
        entry = tmp_path / "cache" / "tensorrt" / backend.engine_key(onnx_path, profile, "float32")
        assert err == f"audioenc: waiting for another process building {entry}\n"
        assert result == []  # waits for the killed process's build
    finally:
        os.kill(killed, signal.SIGKILL)
        os.waitpid(killed, 0)
    waiter.join(timeout=60)
    assert result == [b"engine"] and len(stand_in_builds.read_text().split()) == 1  # the waiter's own build


def test_an_unwritable_cache_fails_before_the_build(stand_in_builds, tmp_path, monkeypatch):
    """A cache that cannot be written (here: below a file) is refused before the build, which takes
    minutes, and the error says how to move the cache."""
    from audioenc.backends import tensorrt as backend

    (tmp_path / "a_file").write_bytes(b"")
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path / "a_file" / "cache"))
    with pytest.raises(OSError, match="cannot write the TensorRT engine cache .* set AUDIOENC_CACHE"):
        backend.cached_engine(str(tmp_path / "graph" / "model.onnx"), Profile.from_ranges(WhisperDims(n_mels=80)),
                              "float32")
    assert not stand_in_builds.exists()


def test_a_cached_engine_is_taken_without_the_lock(stand_in_builds, tmp_path):
    """Reading a cached engine takes no lock (held elsewhere here, the whole time): a read-only cache,
    where no lock file can be made, still serves the engines in it."""
    import threading

    from audioenc.backends import tensorrt as backend
    from audioenc.file_lock import file_lock

    onnx_path, profile = str(tmp_path / "graph" / "model.onnx"), Profile.from_ranges(WhisperDims(n_mels=80))
    assert backend.cached_engine(onnx_path, profile, "float32") == b"engine"
    (entry,) = os.listdir(tmp_path / "cache" / "tensorrt")
    result = []
    with file_lock(str(tmp_path / "cache" / "tensorrt" / f"{entry}.lock"), entry):
        reader = threading.Thread(target=lambda: result.append(backend.cached_engine(onnx_path, profile, "float32")))
        reader.start()
        reader.join(timeout=60)
        assert result == [b"engine"]
    assert len(stand_in_builds.read_text().split()) == 1


@pytest.mark.tensorrt
@needs_tensorrt
@pytest.mark.parametrize("dtype,tol", [("float32", 1e-4), ("float16", 2e-2)])
def test_engine_matches_reference(w2v_checkpoints, dtype, tol, tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path))
    path, _ = w2v_checkpoints["wavlm-stable"]
    waves = [speech_like(n, i) for i, n in enumerate((16000, 5000))]
    ref = audioenc.load(path, backend="torch", device="cpu").encode(waves, output_hidden_states=True)
    enc = audioenc.load(path, backend="tensorrt", device="cuda", dtype=dtype)
    plain, out = enc.encode(waves), enc.encode(waves, output_hidden_states=True)  # two engines
    assert plain.hidden_states is None and len(out.hidden_states) == len(ref.hidden_states)
    for i, n in enumerate(ref.lengths.tolist()):
        for got, want in [(plain.last_hidden_state, ref.last_hidden_state), (out.last_hidden_state, ref.last_hidden_state),
                          *zip(out.hidden_states, ref.hidden_states)]:
            assert rel_err(got[i, :n].cpu(), want[i, :n]) <= tol


@pytest.mark.tensorrt
@needs_tensorrt
def test_engine_cache_rebuilds_corrupt_entry(whisper_checkpoints, tmp_path, monkeypatch):
    import glob

    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path))
    path, _ = whisper_checkpoints[80]
    mel = torch.rand(1, 80, 3000, device="cuda")
    first = audioenc.load(path, backend="tensorrt", device="cuda", dtype="float32").backend.run(mel, None, 2)[0]
    (plan,) = glob.glob(f"{tmp_path}/tensorrt/*/engine.plan")
    with open(plan, "r+b") as f:
        f.write(b"garbage")
    with pytest.warns(UserWarning, match="checksum"):
        again = audioenc.load(path, backend="tensorrt", device="cuda", dtype="float32").backend.run(mel, None, 2)[0]
    assert rel_err(again, first) <= 1e-6


def test_export_refuses_seconds_for_whisper_engines(whisper_checkpoints, w2v_checkpoints, tmp_path, monkeypatch,
                                                    capsys):
    """A Whisper engine's profile has no length to set (30 s windows only): `audioenc export --format
    tensorrt --seconds` must say so, not build a 30 s engine as if it were one for the lengths asked."""
    from audioenc.backends import tensorrt as backend
    from audioenc.cli import main

    built = []
    monkeypatch.setattr(TensorRTBackend, "available", classmethod(lambda cls: None))
    monkeypatch.setattr(backend, "export_engine", lambda model, dtype, profile, out, **kw: built.append(profile) or [])
    path, out = whisper_checkpoints[80][0], str(tmp_path / "engine")
    assert main(["export", "--model", path, "--format", "tensorrt", "--out", out, "--seconds", "1:5:10"]) == 2
    assert "a Whisper engine always takes 30 s windows" in capsys.readouterr().err and not built
    assert main(["export", "--model", path, "--format", "tensorrt", "--out", out, "--batch", "1:2:4"]) == 0
    assert [shape[0] for shape in built[0].shapes[0][1:]] == [1, 2, 4]  # --batch still sets the batch
    path = w2v_checkpoints["wav2vec2-group"][0]  # the wav2vec2 family's engines take --seconds
    assert main(["export", "--model", path, "--format", "tensorrt", "--out", out, "--seconds", "1:5:10"]) == 0
    assert [shape[1] for shape in built[1].shapes[0][1:]] == [16000, 80000, 160000]


def test_export_refuses_an_out_it_cannot_write_before_building(w2v_checkpoints, tmp_path, monkeypatch, capsys):
    """`audioenc export --format tensorrt --out` naming a file, or a directory with a link at engine.plan:
    said before the graph's export and the engine's build (minutes), not after them."""
    from audioenc import export
    from audioenc.cli import main

    def build(*args, **kwargs):
        raise AssertionError("built although the engine could not be written")

    monkeypatch.setattr(TensorRTBackend, "available", classmethod(lambda cls: None))
    monkeypatch.setattr(export, "cached_export", build)
    path = w2v_checkpoints["wav2vec2-group"][0]
    (tmp_path / "a-file").write_bytes(b"the user's")
    assert main(["export", "--model", path, "--format", "tensorrt", "--out", str(tmp_path / "a-file")]) == 2
    assert "a-file is a file; the export needs a directory" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "engine.plan").symlink_to(tmp_path / "elsewhere" / "engine.plan")
    assert main(["export", "--model", path, "--format", "tensorrt", "--out", str(tmp_path / "out")]) == 2
    assert "engine.plan exists; pass --overwrite" in capsys.readouterr().err
    assert (tmp_path / "a-file").read_bytes() == b"the user's"
