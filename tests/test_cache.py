"""The on-disk cache of graphs and engines: listing, last-use times, removal, ``audioenc cache``."""
from __future__ import annotations

import json
import os
import sys
import time
from types import SimpleNamespace

import pytest

from audioenc import cache
from audioenc.cli import main

DAY = 86400.0


def make_entry(root, kind: str, name: str, size: int, age_days: float, meta: dict | None = None) -> str:
    path = os.path.join(root, kind, name)
    os.makedirs(path)
    with open(os.path.join(path, "model.bin"), "wb") as f:
        f.write(b"\1" * size)
    stamp = time.time() - age_days * DAY
    if meta is not None:
        with open(os.path.join(path, cache.META_FILE), "w") as f:
            json.dump(meta, f)
        os.utime(os.path.join(path, cache.META_FILE), (stamp, stamp))
    os.utime(path, (stamp, stamp))
    return path


@pytest.fixture
def filled(tmp_path, monkeypatch):
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path))
    make_entry(tmp_path, "onnx", "a" * 32, 3000, 10, {"family": "whisper", "spec": "ExportSpec(num_layers=4)"})
    make_entry(tmp_path, "onnx", "b" * 32, 500, 0.5, {"family": "wavlm", "spec": "ExportSpec(num_layers=12)"})
    make_entry(tmp_path, "tensorrt", "c" * 32, 700, 3, {"dtype": "float16", "gpu": "H100"})
    make_entry(tmp_path, "onnx", ".tmp-young", 100, 0.01)       # an export running now
    make_entry(tmp_path, "onnx", ".tmp-dead", 200, 2)           # left by a killed process
    make_entry(tmp_path, "onnx", "d" * 32, 50, 1.5)             # no meta.json
    make_entry(tmp_path, "onnx", "e" * 32, 60, 1.6, [1, 2])     # a meta.json of another shape
    with open(os.path.join(tmp_path, "tensorrt", "timing-10.0-H100.cache"), "wb") as f:
        f.write(b"\0" * 10)                                     # shared timing cache: not an entry
    make_entry(tmp_path, "onnx", "users-models", 80, 30)         # not audioenc's: never listed or removed
    os.makedirs(os.path.join(tmp_path, cache.WEIGHTS_RECORDS))
    for name, age_days in ((OLD_RECORD, 10), (NEW_RECORD, 0.5),   # checkpoint records (checkpoint_record.py)
                           ("my_finetuned_model.pt", 40)):       # a user's file: never removed
        record = os.path.join(tmp_path, cache.WEIGHTS_RECORDS, name)
        with open(record, "w") as f:
            f.write('{"digest": "0"}')
        os.utime(record, (time.time() - age_days * DAY,) * 2)
    return tmp_path


OLD_RECORD, NEW_RECORD = "0" * 32 + ".json", "f" * 32 + ".json"


def test_lists_entries_oldest_use_first_with_sizes_and_what_made_them(filled):
    entries = cache.list_entries()
    names = [os.path.basename(e.path) for e in entries]
    assert names == ["a" * 32, "c" * 32, ".tmp-dead", "e" * 32, "d" * 32, "b" * 32, ".tmp-young"]
    by_name = dict(zip(names, entries))
    assert by_name["a" * 32].size == 3000 + os.path.getsize(os.path.join(filled, "onnx", "a" * 32, "meta.json"))
    assert by_name["a" * 32].what == "whisper, ExportSpec(num_layers=4)"
    assert by_name["c" * 32].kind == "tensorrt" and by_name["c" * 32].what == "float16, H100"
    assert by_name[".tmp-dead"].unfinished and by_name[".tmp-dead"].what == "unfinished export"
    assert "no readable meta.json" in by_name["d" * 32].what
    assert "not an audioenc cache record" in by_name["e" * 32].what


def test_removable_respects_last_use_and_never_takes_a_running_export(filled):
    entries = cache.list_entries()
    everything = {os.path.basename(e.path) for e in cache.removable(entries)}
    assert everything == {"a" * 32, "b" * 32, "c" * 32, "d" * 32, "e" * 32, ".tmp-dead"}
    old = {os.path.basename(e.path) for e in cache.removable(entries, unused_days=2.5)}
    assert old == {"a" * 32, "c" * 32}


def test_cli_lists_then_clears_only_what_was_asked(filled, capsys):
    assert main(["cache"]) == 0
    listing = capsys.readouterr().out
    assert "7 entries" in listing and "whisper, ExportSpec(num_layers=4)" in listing and str(filled) in listing
    assert main(["cache", "--clear", "--unused-days", "2.5"]) == 0
    out = capsys.readouterr().out
    assert "removed 2 of 7 entries" in out and "kept 5: 5 used within --unused-days\n" in out  # the young export too
    assert sorted(os.listdir(os.path.join(filled, "onnx"))) == sorted([".tmp-dead", ".tmp-young", "b" * 32, "d" * 32,
                                                                        "e" * 32, "users-models"])
    assert os.listdir(os.path.join(filled, "tensorrt")) == ["timing-10.0-H100.cache"]
    assert sorted(os.listdir(os.path.join(filled, cache.WEIGHTS_RECORDS))) == [NEW_RECORD, "my_finetuned_model.pt"]
    assert main(["cache", "--clear"]) == 0
    assert "kept 1: 1 unfinished export(s) under 6 hours old (one may be running now)" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(filled, "onnx"))) == [".tmp-young", "users-models"]
    assert os.listdir(os.path.join(filled, cache.WEIGHTS_RECORDS)) == ["my_finetuned_model.pt"]


def test_clear_takes_entries_and_records_last_used_in_the_future(filled, capsys):
    """A cache copied from, or shared with, a machine whose clock is ahead: a plain --clear still
    removes everything (but a running export), not only what is older than now."""
    future = time.time() + 2 * 3600
    os.utime(os.path.join(filled, "onnx", "b" * 32, cache.META_FILE), (future, future))
    os.utime(os.path.join(filled, cache.WEIGHTS_RECORDS, NEW_RECORD), (future, future))
    assert main(["cache", "--clear"]) == 0
    assert "removed 6 of 7 entries" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(filled, "onnx"))) == [".tmp-young", "users-models"]
    assert os.listdir(os.path.join(filled, cache.WEIGHTS_RECORDS)) == ["my_finetuned_model.pt"]


def test_cli_rejects_unused_days_without_clear(filled, capsys):
    assert main(["cache", "--unused-days", "3"]) == 2
    assert main(["cache", "--clear", "--unused-days", "-1"]) == 2
    assert main(["cache", "--clear", "--unused-days", "nan"]) == 2
    assert "--unused-days" in capsys.readouterr().err
    assert len(cache.list_entries()) == 7


def test_empty_or_missing_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path / "never-made"))
    assert cache.list_entries() == []
    assert main(["cache", "--clear"]) == 0
    assert "removed 0 of 0 entries" in capsys.readouterr().out
    (tmp_path / "a-file").write_bytes(b"")
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path / "a-file"))
    assert main(["cache"]) == 2
    assert "a-file is a file, not a directory (set AUDIOENC_CACHE to a directory)" in capsys.readouterr().err
    assert main(["info"]) == 0
    assert "cache: the cache" in capsys.readouterr().out


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("AUDIOENC_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache.cache_root() == os.path.join(os.path.expanduser("~"), ".cache", "audioenc")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == str(tmp_path / "xdg" / "audioenc")
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path / "mine"))
    assert cache.cache_root() == str(tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AUDIOENC_CACHE", "relative-cache")
    assert cache.cache_root() == str(tmp_path / "relative-cache")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert cache.cache_root() == str(tmp_path / "relative-cache")  # where it was first used, not the new cwd
    monkeypatch.setenv("AUDIOENC_CACHE", "~/audioenc-cache")
    assert cache.cache_root() == os.path.join(os.path.expanduser("~"), "audioenc-cache")


def test_using_a_cached_graph_records_the_use(w2v_checkpoints, tmp_path, monkeypatch, capsys):
    import audioenc
    from audioenc.export import ExportSpec, cached_export

    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path))
    model = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="torch").backend.model
    spec = ExportSpec(num_layers=1)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    path = cached_export(model, spec)
    assert "exporting wav2vec2 (1 layer, float32) to ONNX: 1/1 steps" in capsys.readouterr().err  # on a terminal
    assert os.path.getsize(path + ".data") > os.path.getsize(path)  # weights beside the graph, for onnxruntime to map
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path / "elsewhere"))
    cached_export(model, spec)
    assert "exporting" not in capsys.readouterr().err  # no progress bar in a service's logs
    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path))
    meta = os.path.join(os.path.dirname(path), cache.META_FILE)
    long_ago = time.time() - 30 * DAY
    os.utime(meta, (long_ago, long_ago))
    assert cached_export(model, spec) == path
    assert "exporting" not in capsys.readouterr().err
    assert time.time() - os.path.getmtime(meta) < DAY
    (entry,) = cache.list_entries()
    assert entry.kind == "onnx" and entry.what.startswith("wav2vec2, ExportSpec(num_layers=1")
    assert entry.what.endswith(f"(from {w2v_checkpoints['wav2vec2-group'][0]})")  # the checkpoint it came from


def test_cache_and_outputs_take_the_umask_permissions_not_private_ones(w2v_checkpoints, tmp_path, monkeypatch):
    """A cache filled by one user (a container's build step) is read by another; mkdtemp and
    mkstemp would make 0700 directories and 0600 files."""
    import audioenc
    from audioenc.embed_files import atomic_write
    from audioenc.export import ExportSpec, cached_export

    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path / "cache"))
    model = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="torch").backend.model
    umask = os.umask(0o022)
    try:
        entry = os.path.dirname(cached_export(model, ExportSpec(num_layers=1)))
        atomic_write(str(tmp_path / "out" / "a.npy"), lambda tmp: open(tmp, "wb").write(b"x"))
    finally:
        os.umask(umask)
    assert os.stat(entry).st_mode & 0o777 == 0o755
    assert {os.stat(os.path.join(entry, name)).st_mode & 0o777 for name in os.listdir(entry)} == {0o644}
    assert os.stat(tmp_path / "out" / "a.npy").st_mode & 0o777 == 0o644


def test_an_unwritable_cache_says_where_and_what_to_do(w2v_checkpoints, tmp_path, monkeypatch):
    import audioenc
    from audioenc.export import ExportSpec, cached_export

    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("AUDIOENC_CACHE", str(blocker))  # makedirs fails under a file, even for root
    model = audioenc.load(w2v_checkpoints["wav2vec2-group"][0], backend="torch").backend.model
    with pytest.raises(OSError, match="cannot write the ONNX graph cache .*set AUDIOENC_CACHE"):
        cached_export(model, ExportSpec(num_layers=1))

    # an unusable entry that cannot be removed (another user's, in a shared cache)
    from audioenc import export

    monkeypatch.setenv("AUDIOENC_CACHE", str(tmp_path / "shared"))
    entry = tmp_path / "shared" / "onnx" / export.cache_key(model, ExportSpec(num_layers=1))
    entry.mkdir(parents=True)
    (entry / "model.onnx").write_bytes(b"theirs")
    # as if permission were denied (export's rmtree only: tempfile's stays)
    monkeypatch.setattr(export, "shutil", SimpleNamespace(rmtree=lambda *args, **kwargs: None,
                                                          disk_usage=export.shutil.disk_usage))
    with pytest.warns(UserWarning, match="is unusable"), \
            pytest.raises(OSError, match="cannot replace the unusable cache entry .*set AUDIOENC_CACHE"):
        cached_export(model, ExportSpec(num_layers=1))


def test_clear_reports_what_it_could_not_remove(filled, monkeypatch, capsys):
    real_rmtree = cache.shutil.rmtree

    def rmtree(path, *args, **kwargs):  # as on a read-only cache (root passes permission checks here)
        if path.endswith("a" * 32):
            raise PermissionError(13, "Permission denied", path)
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(cache.shutil, "rmtree", rmtree)
    assert main(["cache", "--clear", "--unused-days", "2.5"]) == 1
    out = capsys.readouterr()
    assert "removed 1 of 7 entries" in out.out
    assert "could not remove" in out.err and "a" * 32 in out.err and "Permission denied" in out.err


def test_clear_leaves_an_entry_another_process_is_building(filled, capsys):
    """A TensorRT entry's folder exists, without its meta.json, for the whole of its build (minutes):
    `audioenc cache --clear` meanwhile must leave it to the builder, which holds its lock (here in
    another process), and say why it kept it; once the build is over, a --clear takes it."""
    from audioenc.file_lock import file_lock

    entry = os.path.join(filled, "tensorrt", "c" * 32)
    os.remove(os.path.join(entry, cache.META_FILE))  # as during the build
    locked_r, locked_w = os.pipe()
    done_r, done_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            with file_lock(entry + ".lock", entry):
                os.write(locked_w, b"1")
                os.read(done_r, 1)
        finally:
            os._exit(0)
    try:
        assert os.read(locked_r, 1) == b"1"
        assert main(["cache"]) == 0
        listed = [line for line in capsys.readouterr().out.splitlines() if "c" * 32 in line]
        assert len(listed) == 1 and listed[0].endswith("being exported or built by another process now")
        assert main(["cache", "--clear"]) == 0
    finally:
        os.write(done_w, b"1")
        os.waitpid(pid, 0)
    out = capsys.readouterr().out
    assert "removed 5 of 7 entries" in out
    assert "kept 2: 1 unfinished export(s) under 6 hours old (one may be running now), 1 being exported or built " \
           "by another process now" in out
    assert sorted(os.listdir(os.path.join(filled, "tensorrt"))) == ["c" * 32, "timing-10.0-H100.cache"]
    assert main(["cache", "--clear"]) == 0
    assert "removed 1 of 2 entries" in capsys.readouterr().out
    assert os.listdir(os.path.join(filled, "tensorrt")) == ["timing-10.0-H100.cache"]  # no lock file left either
