"""The GPU benchmark scripts must run end to end without a GPU (tiny models, Triton interpreter)."""
import os
import subprocess
import sys

import pytest

from conftest import skip_without_triton_interpreter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(*args: str, interpreter: bool = True) -> str:
    if interpreter:
        skip_without_triton_interpreter()
    else:
        pytest.importorskip("triton")
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result.stdout


def test_bench_gpu_runs_tiny_and_writes_nothing():
    out = run_script("benchmarks/bench_gpu.py", "--tiny", "--no-write")
    for heading in ("| case | engine |", "| rel. error vs fp32 | first call (s) |", "| shape | torch SDPA |",
                    "| rows x K -> N | cuBLAS + GELU pass | cuBLAS, GELU epilogue (tanh) |", "| layer | audioenc way |"):
        assert heading in out
    assert "failed" not in out
    assert "audioenc triton" in out
    # Each case's rows: case, engine, ms / item, RTF, speed-up, matmul fraction, error, first call.
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith(("| whisper-tiny-random", "| wav2vec2-tiny-random", "| wavlm-tiny-random"))]
    peers = [row for row in rows if row[1].startswith(("transformers", "openai-whisper"))]
    assert len(peers) >= 3 and all(len(row) == 8 for row in rows)
    # The peers run the reference's weights, so their numbers are checked against it in the same run
    # (other weights would be off by about 1; float16, where a GPU runs --tiny, by about 1e-3).
    assert all(float(row[6]) < 1e-2 for row in peers), peers
    assert all(float(row[7]) > 0 for row in rows)  # the first call (compiling, autotuning), timed apart


def test_profile_gpu_runs_tiny():
    out = run_script("benchmarks/profile_gpu.py", "--tiny")
    assert "### whisper-tiny-random" in out and "| kernel | calls | ms | share |" in out


def test_bench_gpu_groups_plans_without_a_gpu():
    out = run_script("benchmarks/bench_gpu_groups.py", "--models", "wav2vec2-base,whisper-large-v3", interpreter=False)
    assert "| wav2vec2-base | 17 x 10 s | 15 | 1+16 |" in out  # not a CUDA graph of 32
    assert "| wav2vec2-base | 30 s + 15 x 1 s | 15 | 1+15 |" in out
    assert "| whisper-large-v3 | one 270 s item (9 windows) | as few calls as fit | 9 |" in out


def test_compile_offline_compiles_a_kernel_for_hopper_without_a_gpu():
    out = run_script("benchmarks/compile_offline.py", "--only", "add_layer_norm shift float16")
    assert "ok   add_layer_norm shift float16: no autotuning" in out and "0 failed" in out


def test_bench_onnx_runs_ctranslate2_on_onnxruntimes_threads(tmp_path, monkeypatch):
    """CTranslate2 gets the intra-op threads audioenc's onnxruntime sessions get, not torch's count,
    which $AUDIOENC_ONNX_THREADS sets apart from them."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench_onnx

    threads = torch.get_num_threads() + 1
    monkeypatch.setenv("AUDIOENC_ONNX_THREADS", str(threads))
    monkeypatch.setitem(bench_onnx.WHISPER_SIZES, "tiny", dict(d_model=64, encoder_layers=1, encoder_attention_heads=2,
                                                               encoder_ffn_dim=256, num_mel_bins=80))

    class Loaded(Exception):
        pass

    def whisper(*args, intra_threads, **kwargs):  # stops the benchmark once its first CTranslate2 model is made
        raise Loaded(intra_threads)

    monkeypatch.setattr(ctranslate2.models, "Whisper", whisper)
    with pytest.raises(Loaded) as loaded:
        bench_onnx.whisper_rows(str(tmp_path), repeats=1, size="tiny")
    assert loaded.value.args == (threads,)
