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


def test_compile_offline_compiles_a_kernel_for_a_t4_without_a_gpu():
    out = run_script("benchmarks/compile_offline.py", "--kernel", "add_layer_norm shift float16", "--arch", "75",
                     interpreter=False)
    assert "ok   add_layer_norm shift float16 sm_75: no autotuning: " in out and "fits (T4: 65536)" in out
    assert "| add_layer_norm shift float16 | 1/1 fit (" in out and "0 failed" in out


def compile_offline_module(monkeypatch):
    """benchmarks/compile_offline.py imported, with the kernels compiled (not interpreted)."""
    pytest.importorskip("triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("compile_offline.py compiles kernels: TRITON_INTERPRET=1 interprets them")
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import compile_offline

    return compile_offline


def test_compile_offline_fails_when_no_config_fits_a_gpu_class(monkeypatch, capsys):
    compile_offline = compile_offline_module(monkeypatch)
    import torch
    # The backend runs from compute capability 7.0: a V100 and a T4 are listed with their limits.
    assert compile_offline.GPUS[70][1] == 96 * 1024 and compile_offline.GPUS[75][1] == 64 * 1024
    problem = compile_offline.problem
    assert problem([70000, 50000], 65536, [0, 1]) is None
    assert problem([70000, None], 65536, [0, 1]) == "no config fits"
    assert problem([70000, 50000, 70000], 65536, [0, 2]) == "no config AUDIOENC_AUTOTUNE=0 keeps fits"
    from audioenc.kernels.attention import attention

    q = torch.randn(1, 16, 1, 64)
    configs = compile_offline.launch_of(lambda: attention(q, q, q)).configs
    assert compile_offline.untuned_indices(configs) == [0, len(configs) - 1]  # the first and the fallback
    monkeypatch.setitem(compile_offline.GPUS, 75, ("a GPU of 1 KB", 1024))  # the kernel takes 4 KB
    assert compile_offline.main(["--kernel", "add_layer_norm shift float16", "--arch", "75"]) == 1
    out = capsys.readouterr().out
    assert "FAIL add_layer_norm shift float16 sm_75 (a GPU of 1 KB): no config fits" in out and "1 failed" in out


def test_compile_offline_launches_what_the_backend_launches(monkeypatch):
    """Triton specialises a kernel on its arguments' layout and flags: the cases must be the
    backend's (conv weights taps-first, attention on views of the fused QKV output, every head dim
    of the supported models, the float32 Linear without GELU); no compiling here."""
    compile_offline = compile_offline_module(monkeypatch)
    import torch

    launches = []  # (kernel, its arguments by name)
    for _, call in compile_offline.cases():
        launch = compile_offline.launch_of(call)
        launches.append((launch.fn.__name__, dict(zip(launch.fn.arg_names, launch.args), **launch.kwargs)))
    of = lambda kernel, dtype: [args for name, args in launches if name == kernel and args["Out"].dtype == dtype]
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        pos_conv = of("_grouped_conv1d_gelu_kernel", dtype)
        # _PositionalConv's (K, C / groups, C) memory
        assert pos_conv and all(args["W"].stride()[:2] == (1, args["GROUP_C"] * 16) for args in pos_conv)
        assert {args["GROUP_C"] for args in pos_conv} == {48, 64, 80}
        convs = of("_conv1d_gelu_kernel", dtype) + of("_conv0_group_norm_gelu_kernel", dtype)
        assert convs and all(args["W"].stride(0) == 1 for args in convs)
        attention = of("_attention_fwd_kernel", dtype)
        assert {args["HEAD_DIM"] for args in attention} == {64, 80, 120}
        assert all(args["stride_qt"] == 3 * args["num_heads"] * args["HEAD_DIM"] for args in attention)  # QKV views
        assert {(args["HAS_LENGTHS"], args["HAS_BIAS"]) for args in attention} == {(False, False), (True, False),
                                                                                   (True, True)}
    assert any(args["X"].dtype == torch.float32 and not args["APPLY_GELU"] and args["HAS_BIAS"]
               for kernel, args in launches if kernel == "_linear_gelu_kernel")
    assert any(args["X"].stride(1) == 1 for kernel, args in launches if kernel == "_conv1d_gelu_kernel")  # Whisper's mel


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


def bench_module(monkeypatch, name: str):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import importlib

    return importlib.import_module(name)


def test_bench_frontend_times_the_contenders_round_by_round(monkeypatch):
    """A slow spell of a shared machine must slow every contender alike, not whichever ran then."""
    pytest.importorskip("whisper")
    bench_frontend = bench_module(monkeypatch, "bench_frontend")
    calls = []

    def peer(name):
        def fn(x):
            calls.append(name)
            return bench_frontend.fe.log_mel_spectrogram(x)
        return "1", fn

    monkeypatch.setattr(bench_frontend, "peers", lambda: {"a": peer("a"), "b": peer("b")})
    monkeypatch.setattr(sys, "argv", ["bench_frontend.py", "--runs", "3", "--no-write"])
    bench_frontend.main()
    switches = sum(x != y for x, y in zip(calls, calls[1:]))
    assert switches >= 2 * 3 + 2 * 3, calls  # at least one switch per round and clip each way


def test_bench_frontend_refuses_a_peer_that_computes_something_else(monkeypatch):
    """librosa's melspectrogram alone (no log, constant padding, one more frame) was timed as a log-mel peer."""
    librosa = pytest.importorskip("librosa")
    pytest.importorskip("whisper")
    bench_frontend = bench_module(monkeypatch, "bench_frontend")
    power_mel = lambda x: librosa.feature.melspectrogram(y=x, sr=16000, n_fft=400, hop_length=160, n_mels=80)
    monkeypatch.setattr(bench_frontend, "peers", lambda: {"librosa power mel": ("1", power_mel)})
    monkeypatch.setattr(sys, "argv", ["bench_frontend.py", "--runs", "3", "--no-write"])
    with pytest.raises(SystemExit, match="librosa power mel on the 30 s clip"):
        bench_frontend.main()
    # numbers 0.1% off are refused too, not just a wrong shape
    scaled = lambda x: 1.001 * bench_frontend.fe.log_mel_spectrogram(x)
    monkeypatch.setattr(bench_frontend, "peers", lambda: {"scaled": ("1", scaled)})
    with pytest.raises(SystemExit, match="scaled on the 30 s clip: output differs"):
        bench_frontend.main()


def test_bench_frontend_gpu_checks_each_item_against_openai_whisper(monkeypatch):
    whisper = pytest.importorskip("whisper")
    torch = pytest.importorskip("torch")
    bench_frontend_gpu = bench_module(monkeypatch, "bench_frontend_gpu")
    x = 0.1 * torch.randn(2, 16000, generator=torch.Generator().manual_seed(0))
    assert bench_frontend_gpu.checked_diff(x, whisper) < 1e-3
    real = bench_frontend_gpu.fe.log_mel_spectrogram
    monkeypatch.setattr(bench_frontend_gpu.fe, "log_mel_spectrogram", lambda x: real(x) * 1.01)
    with pytest.raises(SystemExit, match="audioenc log-mel, item 0 of a batch of 2: output differs"):
        bench_frontend_gpu.checked_diff(x, whisper)


def test_sweep_attention_runs_tiny():
    out = run_script("benchmarks/sweep_attention.py", "--tiny")
    assert out.count("| autotuned |") == 2 and "| pointer | 128, 64, 8, 3 |" in out


# Runs a benchmark script with one kernel's output off by 1%, the kernel patched before the script imports it.
WRONG_KERNEL = """
import sys
sys.argv = {argv!r}
sys.path.insert(0, "benchmarks")
import bench_gpu  # sets TRITON_INTERPRET without CUDA, before the kernels load
import runpy
import {module} as kernels
real = kernels.{kernel}
kernels.{kernel} = lambda *args, **kwargs: 1.01 * real(*args, **kwargs)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("argv, module, kernel, message", [
    (["benchmarks/sweep_attention.py", "--tiny"], "audioenc.kernels.attention", "attention",
     "attention (autotuned) at B=2 T=97 H=2 D=64: output differs"),
    (["benchmarks/bench_gpu.py", "--tiny", "--no-write", "--cases", "none"], "audioenc.kernels.attention",
     "attention", "attention at B=2 T=97 H=2 D=64: output differs"),
    (["benchmarks/bench_gpu.py", "--tiny", "--no-write", "--cases", "none"], "audioenc.kernels.linear_gelu",
     "linear_gelu", "linear_gelu at 97 x 64 -> 256: output differs"),
    (["benchmarks/bench_gpu.py", "--tiny", "--no-write", "--cases", "none"], "audioenc.kernels.conv_feature",
     "conv1d_gelu", "conv feature kernel (fused) at tiny conv: output differs"),
    (["benchmarks/bench_gpu.py", "--tiny", "--no-write", "--cases", "none"], "audioenc.kernels.pos_conv",
     "grouped_conv1d_gelu", "grouped_conv1d_gelu at tiny, batch 2, 49 frames: output differs"),
])
def test_a_wrong_kernel_output_stops_the_benchmark(argv, module, kernel, message):
    skip_without_triton_interpreter()
    code = WRONG_KERNEL.format(argv=argv, module=module, kernel=kernel)
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode != 0 and message in result.stderr, result.stdout[-4000:] + result.stderr[-4000:]
