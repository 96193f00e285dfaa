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


# faster-whisper's feature extractor, for a test without faster-whisper: it also records the intra-op
# threads CTranslate2's Whisper is made with.
FAKE_FASTER_WHISPER = """
import json, os
import ctranslate2
import numpy as np

whisper = ctranslate2.models.Whisper


def recorded(*args, **kwargs):
    with open(os.environ["THREADS_RECORD"], "w") as f:
        json.dump(kwargs.get("intra_threads"), f)
    return whisper(*args, **kwargs)


ctranslate2.models.Whisper = recorded


class FeatureExtractor:
    def __init__(self, feature_size):
        self.feature_size = feature_size

    def __call__(self, audio):
        return np.zeros((self.feature_size, len(audio) // 160), np.float32)
"""


def test_bench_memory_runs_ctranslate2_on_audioencs_threads(tmp_path, monkeypatch):
    """CTranslate2's default is up to 4 intra-op threads, whatever the cores: its process gets the
    threads audioenc's onnxruntime sessions run, as in the other scripts."""
    pytest.importorskip("ctranslate2")
    transformers = pytest.importorskip("transformers")
    bench_memory = bench_module(monkeypatch, "bench_memory")
    package = tmp_path / "fake" / "faster_whisper"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "feature_extractor.py").write_text(FAKE_FASTER_WHISPER)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(tmp_path / "fake"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("THREADS_RECORD", str(tmp_path / "threads.json"))
    monkeypatch.setenv("AUDIOENC_ONNX_THREADS", "3")
    path = str(tmp_path / "whisper")
    config = transformers.WhisperConfig(d_model=64, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=256,
                                        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=256, vocab_size=64,
                                        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    transformers.WhisperForConditionalGeneration(config).save_pretrained(path)
    transformers.WhisperFeatureExtractor().save_pretrained(path)
    import ctranslate2

    ctranslate2.converters.TransformersConverter(path).convert(path + "-ct2", force=True)
    result = bench_memory.measure("ctranslate2 float32", path, 1.0, 2, str(tmp_path / "cache"))
    assert result["call_s"] > 0
    assert (tmp_path / "threads.json").read_text() == "3"


def test_bench_reference_checks_then_times_both_sides_round_by_round(tmp_path, monkeypatch):
    """transformers and the reference are timed in alternating rounds (not all of one, then all of the
    other, on a machine whose speed drifts), and only once they agree."""
    transformers = pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    bench_reference = bench_module(monkeypatch, "bench_reference")
    calls, scale = [], [1.0]

    def tiny_case(tmp):
        config = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                             intermediate_size=64, conv_dim=(16, 16), conv_kernel=(10, 3),
                                             conv_stride=(5, 2), num_conv_pos_embeddings=16,
                                             num_conv_pos_embedding_groups=2)
        hf = transformers.Wav2Vec2Model(config).eval()
        hf.save_pretrained(tmp)
        fe = transformers.Wav2Vec2FeatureExtractor(do_normalize=True)
        fe.save_pretrained(tmp)
        audio = bench_reference.speech_like(0.5)

        def run_hf():
            calls.append("hf")
            with torch.inference_mode():
                return scale[0] * hf(fe(audio, sampling_rate=16000, return_tensors="pt").input_values).last_hidden_state

        return "tiny", audio, run_hf

    monkeypatch.setattr(bench_reference, "wav2vec2_case", tiny_case)
    monkeypatch.setattr(bench_reference, "whisper_case", tiny_case)
    encode = bench_reference.audioenc.AudioEncoder.encode
    monkeypatch.setattr(bench_reference.audioenc.AudioEncoder, "encode",
                        lambda self, *a, **kw: calls.append("ours") or encode(self, *a, **kw))
    monkeypatch.setattr(sys, "argv", ["bench_reference.py", "--repeats", "3", "--no-write"])
    bench_reference.main()
    switches = sum(x != y for x, y in zip(calls, calls[1:]))
    assert switches >= 2 * 2 * 3, calls  # each timed round of each case runs both sides
    scale[0] = 1.001  # 0.1% off: not the same computation
    with pytest.raises(SystemExit, match="tiny: audioenc torch against transformers: output differs"):
        bench_reference.main()
