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
    for heading in ("| case | engine |", "| shape | torch SDPA |",
                    "| rows x K -> N | cuBLAS + GELU pass | cuBLAS, GELU epilogue (tanh) |", "| layer | audioenc way |"):
        assert heading in out
    assert "failed" not in out
    assert "audioenc triton" in out


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
