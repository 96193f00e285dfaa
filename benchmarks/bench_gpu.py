"""The triton backend against its peers on a CUDA GPU, same process, same random weights' sizes.

    python benchmarks/bench_gpu.py [--repeats 10] [--no-write]    # CUDA machine: writes BENCHMARKS.md
        [--cases whisper-large-v3:16,...] [--budget SECONDS]       # a subset; no new case after SECONDS
    python benchmarks/bench_gpu.py --tiny                          # anywhere; automatic without CUDA

Peers, each in float16 on the encoder forward (inputs already on the GPU, no frontend): Hugging Face
transformers with its default attention (SDPA where its class has it) on the reference's weights, the
same under torch.compile (batch 16 only: compiling
costs a minute per model), openai-whisper's encoder or torchaudio's wav2vec2 / WavLM (where
installed), audioenc's torch reference backend, and audioenc's triton backend (CUDA graphs).
Reported: ms per item, each contender's first call apart (torch.compile's compiling, audioenc's
autotuning and CUDA-graph captures), real-time factor (compute time / audio time), speed-up of triton against each
peer, the fraction of the measured bf16 matmul rate that triton reaches (FLOPs counted
from the dims), and the relative error against audioenc's float32 reference of every contender on
its weights (all but torchaudio's). Then, after the cases
(a section that fails is reported as failed, and the run goes on), timed from CUDA graphs: the
attention kernel alone against torch SDPA, fc1 + GELU as one kernel against cuBLAS with a GELU
pass and with the GELU in its epilogue, the conv feature kernels against cuDNN + torch's LayerNorm
and GELU, and the positional conv kernel against cuDNN. For whisper the
float16 residual stream and our attention kernel alone (where the backend keeps cuDNN's), the
alternatives to the defaults, get rows of their own.

Without CUDA (--tiny) the same pipeline runs at tiny sizes on the CPU with the kernels in Triton's
interpreter (torch.compile skipped), only to prove the script works; it prints that the GPU
numbers are missing and writes nothing.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import sys
import time
import traceback

import torch

TINY = "--tiny" in sys.argv or not torch.cuda.is_available()
if TINY and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton decorates any kernel

from audioenc.backends.torch import TorchBackend  # noqa: E402
from audioenc.backends.triton import TritonBackend, kept_paths  # noqa: E402
from audioenc.config import Wav2Vec2Dims, WhisperDims  # noqa: E402
from audioenc.models.wav2vec2 import Wav2Vec2Model  # noqa: E402
from audioenc.models.wavlm import WavLMModel  # noqa: E402
from audioenc.models.whisper import WhisperEncoder  # noqa: E402
# openai-whisper's encoder as whisper.load_model leaves it: float32 weights, cast to the input's dtype
# at each call (its LayerNorm takes float32 input, so converting the model to float16 would break it).
from audioenc.peer_openai_whisper import openai_whisper_encoder  # noqa: E402
from audioenc.verify import layer_errors  # noqa: E402
from common import check_output, machine, versions, write_section  # noqa: E402

SAMPLE_RATE = 16000

WHISPER_LARGE_V3 = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                        num_mel_bins=128)
WAV2VEC2_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                      feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True)
WAVLM_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                   feat_extract_norm="layer", do_stable_layer_norm=True)
# (name, family, HF config kwargs, seconds of audio, batch); the targets' batch-16 cases first, so a run
# cut short by --budget still measures them.
REAL_CASES = [
    ("whisper-large-v3", "whisper", WHISPER_LARGE_V3, 30.0, 16),
    ("wavlm-large", "wavlm", WAVLM_LARGE, 10.0, 16),
    ("wav2vec2-large", "wav2vec2", WAV2VEC2_LARGE, 10.0, 16),
    ("wav2vec2-base", "wav2vec2", dict(feat_extract_norm="group"), 10.0, 64),
    ("whisper-large-v3", "whisper", WHISPER_LARGE_V3, 30.0, 1),
    ("wavlm-large", "wavlm", WAVLM_LARGE, 10.0, 1),
    ("wav2vec2-large", "wav2vec2", WAV2VEC2_LARGE, 10.0, 1),
]
TINY_CASES = [
    ("whisper-tiny-random", "whisper", dict(d_model=64, encoder_layers=2, encoder_attention_heads=2,
                                            encoder_ffn_dim=256, num_mel_bins=80, max_source_positions=50), 1.0, 2),
    ("wav2vec2-tiny-random", "wav2vec2", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                              intermediate_size=128, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                                              num_conv_pos_embedding_groups=4, feat_extract_norm="group"), 1.0, 2),
    ("wavlm-tiny-random", "wavlm", dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=128, conv_dim=(32,) * 7, num_conv_pos_embeddings=16,
                                        num_conv_pos_embedding_groups=4, feat_extract_norm="layer",
                                        do_stable_layer_norm=True, num_buckets=32, max_bucket_distance=60), 1.0, 2),
]


def timed(fn, repeats: int) -> float:
    """Median seconds of fn(): CUDA events after warm-up on a GPU, wall time on the CPU."""
    for _ in range(1 if TINY else 3):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_rate() -> float:
    """Measured bf16 matmul FLOP/s (8192^3), the ceiling the fraction is reported against."""
    n = 8192
    a, b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16), torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n ** 3 / timed(lambda: a @ b, 20)


def flops_per_item(dims, frames: int, samples: int) -> float:
    """Multiply-adds x 2 of one item: convs, projections, attention (QK^T and PV), feed-forward."""
    if isinstance(dims, WhisperDims):
        d, f, layers = dims.n_state, dims.n_ffn, dims.n_layer
        stem = 2 * (2 * frames) * dims.n_mels * 3 * d + 2 * frames * d * 3 * d
    else:
        d, f, layers = dims.hidden_size, dims.intermediate_size, dims.num_layers
        stem, length, c_prev = 0, samples, 1
        for c, k, s in zip(dims.conv_dim, dims.conv_kernel, dims.conv_stride):
            length = (length - k) // s + 1
            stem += 2 * length * c_prev * k * c
            c_prev = c
        stem += 2 * frames * c_prev * d                                                   # feature projection
        stem += 2 * frames * d * (d // dims.num_conv_pos_embedding_groups) * dims.num_conv_pos_embeddings
    per_layer = 2 * frames * (4 * d * d + 2 * d * f) + 4 * frames * frames * d
    return stem + layers * per_layer


def build(family: str, config: dict):
    """(HF config, HF model class, audioenc reference model) with the same architecture."""
    import transformers

    if family == "whisper":
        hf_config = transformers.WhisperConfig(**config)
        from transformers.models.whisper.modeling_whisper import WhisperEncoder as HFEncoder

        dims = WhisperDims.from_config(hf_config.to_dict())
        return hf_config, HFEncoder, WhisperEncoder(dims).eval(), dims
    names = {"wav2vec2": "Wav2Vec2", "wavlm": "WavLM"}[family]
    hf_config = getattr(transformers, f"{names}Config")(**config)
    dims = Wav2Vec2Dims.from_config(family, hf_config.to_dict())
    model = (WavLMModel if family == "wavlm" else Wav2Vec2Model)(dims).eval()
    return hf_config, getattr(transformers, f"{names}Model"), model, dims


def hf_model(ref_model, device, dtype):
    """The HF model holding the reference's weights, so its error shows too, with transformers' default
    attention: SDPA where its class supports it (else eager: said in the table)."""
    from audioenc.peer_transformers import hf_model as with_weights

    model = with_weights(ref_model)
    return model.to(device, dtype).eval(), model.config._attn_implementation


def torchaudio_model(family, dims, device, dtype):
    """torchaudio's wav2vec2 / WavLM model at these dims (no CTC head)."""
    from torchaudio.models import wav2vec2_model, wavlm_model

    arch = dict(extractor_mode="group_norm" if dims.feat_extract_norm == "group" else "layer_norm",
                extractor_conv_layer_config=list(zip(dims.conv_dim, dims.conv_kernel, dims.conv_stride)),
                extractor_conv_bias=dims.conv_bias, encoder_embed_dim=dims.hidden_size,
                encoder_projection_dropout=0.0, encoder_pos_conv_kernel=dims.num_conv_pos_embeddings,
                encoder_pos_conv_groups=dims.num_conv_pos_embedding_groups, encoder_num_layers=dims.num_layers,
                encoder_num_heads=dims.num_heads, encoder_attention_dropout=0.0,
                encoder_ff_interm_features=dims.intermediate_size, encoder_ff_interm_dropout=0.0,
                encoder_dropout=0.0, encoder_layer_norm_first=dims.do_stable_layer_norm, encoder_layer_drop=0.0,
                aux_num_out=None)
    if family == "wavlm":
        model = wavlm_model(**arch, encoder_num_buckets=dims.num_buckets,
                            encoder_max_distance=dims.max_bucket_distance)
    else:
        model = wav2vec2_model(**arch)
    return model.to(device, dtype).eval()


def run_case(name, family, config, seconds, batch, repeats, device, dtype, peak):
    """Table rows of one case. A contender that fails is reported as such; the others still run."""
    _, _, ref_model, dims = build(family, config)
    gen = torch.Generator().manual_seed(0)
    if family == "whisper":
        inputs = torch.randn(batch, dims.n_mels, 2 * dims.n_ctx, generator=gen).to(device)
        lengths, frames, samples = None, dims.n_ctx, 0
    else:
        samples = int(seconds * SAMPLE_RATE)
        inputs = torch.randn(batch, samples, generator=gen).to(device)
        lengths = torch.full((batch,), samples, dtype=torch.int64)
        frames = dims.num_frames(samples)
    short = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}[dtype]
    dtype_name = str(dtype).removeprefix("torch.")
    results, errors, failures, firsts = {}, {}, {}, {}

    def first_call(fn):
        """(fn, its first output or None, seconds): the one-time work, timed apart from the median."""
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return fn, out, time.perf_counter() - start

    def contender(label, make):
        """make() -> first_call's (callable to time, its output or None, seconds); the model is freed afterwards."""
        try:
            fn, out, firsts[label] = make()
            results[label] = timed(fn, repeats)
            if out is not None:
                errors[label] = layer_errors(out.float(), truth, torch.full((batch,), truth.shape[1]))[1]
        except Exception as exc:  # noqa: BLE001 - one broken contender must not hide the others
            failures[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
            print(f"  {label} failed: {failures[label]}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()

    # The float32 reference on the same weights, for the accuracy column (cuDNN/cuBLAS TF32 off).
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    truth = TorchBackend(copy.deepcopy(ref_model), torch.device(device), "float32").run(
        inputs, lengths, dims.num_layers, output_hidden_states=False)[0]

    model, attn = hf_model(ref_model, device, dtype)
    hf_inputs = inputs.to(dtype)
    run_hf = lambda m: torch.inference_mode()(lambda: m(hf_inputs).last_hidden_state)
    contender(f"transformers {short} ({attn})", lambda: first_call(run_hf(model)))
    if not TINY and batch >= 16:  # the target is set at batch 16; compiling costs a minute per model
        # Static shapes: one input shape per case, and dynamo's symbolic shapes made wav2vec2-large's
        # recompile take minutes (stop 17).
        contender(f"transformers {short} + torch.compile",
                  lambda: first_call(run_hf(torch.compile(model, dynamic=False))))
    del model

    paths = ""

    def audioenc_backend(cls, **experiment):
        """The backend; experiment sets attributes of its model (residual_dtype, residual_in_cublas) or
        attention (the path unmasked attention keeps)."""
        nonlocal paths
        backend = cls(copy.deepcopy(ref_model), torch.device(device), dtype_name)
        for block in backend.model.blocks if "attention" in experiment else []:
            if block.unmasked_attention is not None:
                block.unmasked_attention._choose = lambda probe: experiment["attention"]
        for attribute, value in experiment.items():
            if attribute != "attention":
                setattr(backend.model, attribute, value)
        made = first_call(lambda: backend.run(inputs, lengths, dims.num_layers, output_hidden_states=False)[0])
        if cls is TritonBackend and not experiment:
            paths = kept_paths(backend.model)
        return made

    # The other libraries' own implementations, where installed: openai-whisper's on the reference's
    # weights (so its error shows), torchaudio's with its own random weights (timing only).
    def other_library():
        if family == "whisper":
            model = openai_whisper_encoder(copy.deepcopy(ref_model)).to(device)
            return first_call(torch.inference_mode()(lambda: model(hf_inputs)))
        model = torchaudio_model(family, dims, device, dtype)
        fn, _, seconds = first_call(torch.inference_mode()(lambda: model(hf_inputs)[0]))
        return fn, None, seconds

    library, module = ("openai-whisper", "whisper") if family == "whisper" else ("torchaudio", "torchaudio")
    if importlib.util.find_spec(module):
        contender(f"{library} {short}", other_library)
    else:
        print(f"  {library} is not installed: no row for it", flush=True)
    contender(f"audioenc torch {short}", lambda: audioenc_backend(TorchBackend))
    ours_label = f"audioenc triton {short}"
    contender(ours_label, lambda: audioenc_backend(TritonBackend))
    # The defaults' alternatives, to see what each is worth.
    # (The exact GELU as a separate pass, 6-8% slower in stops 13 and 17, is no longer timed.)
    experiments = {"float16 residual stream": dict(residual_dtype=torch.float16),
                   "attention: audioenc's kernel only": dict(attention="triton")} if family == "whisper" else {}
    if family == "whisper" or dims.do_stable_layer_norm:  # pre-LN: the residual stream is float32
        experiments["residual adds in cuBLAS's epilogue"] = dict(residual_in_cublas=True)
    if family == "whisper":
        experiments["float16 residual stream, adds in cuBLAS's epilogue"] = dict(residual_dtype=torch.float16,
                                                                                  residual_in_cublas=True)
    for what, experiment in experiments.items():
        contender(f"audioenc triton {short}, {what} (experiment)",
                  lambda: audioenc_backend(TritonBackend, **experiment))
    ours = results.get(ours_label)
    flops = flops_per_item(dims, frames, samples) * batch
    rows = []
    for engine in list(results) + list(failures):
        kept = f" ({paths})" if engine == ours_label and paths else ""
        case = f"| {name}, {seconds:g} s, batch {batch} | {engine}{kept} |"
        if engine in failures:
            rows.append(f"{case} failed: {failures[engine]} | | | | | |")
            continue
        t = results[engine]
        frac = f"{flops / t / peak:.2f}" if peak and engine == ours_label else ""
        speedup = f"{t / ours:.2f}x" if ours else ""
        err = f"{errors[engine]:.1e}" if engine in errors else ""
        rows.append(f"{case} {1000 * t / batch:.2f} | {t / (seconds * batch):.5f} | {speedup} | {frac} | {err} | "
                    f"{firsts[engine]:.3g} |")
    return rows


def graph_timed(fn, repeats: int, calls: int = 20) -> float:
    """Median seconds per fn() replayed from a CUDA graph of `calls` back-to-back calls: kernel time
    without the Python launch overhead that would dominate short kernels."""
    if not torch.cuda.is_available():
        return timed(fn, repeats)
    fn()  # compiles and autotunes outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return timed(graph.replay, repeats) / calls


def attention_vs_sdpa(repeats, device, dtype):
    """Our kernel against torch SDPA on (B, T, H, D) shapes of the cases; masked rows give SDPA a
    boolean key mask (then no flash kernel applies) and our kernel per-item lengths. Unmasked rows
    also time cuDNN's attention as the backend calls it (views of the fused QKV projection), which it
    may run there instead of ours, where that is faster."""
    from audioenc.backends.triton import _cudnn_attention_usable, _UnmaskedAttention
    from audioenc.kernels.attention import attention, attention_ref

    rows = []
    shapes = [(16, 1500, 20, 64, False), (16, 499, 16, 64, False), (64, 499, 12, 64, False), (16, 499, 16, 64, True)]
    for b, t, h, d, masked in (shapes if not TINY else [(2, 97, 2, 64, False), (2, 97, 2, 64, True)]):
        q, k, v = (torch.randn(b, t, h, d, device=device, dtype=dtype) for _ in range(3))
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        lengths = mask = None
        if masked:
            lengths = torch.randint(t // 2, t + 1, (b,), device=device)
            mask = (torch.arange(t, device=device)[None, :] < lengths[:, None])[:, None, None, :]
        check_output(f"attention at B={b} T={t} H={h} D={d}", attention(q, k, v, lengths),
                     attention_ref(q.float(), k.float(), v.float(), lengths),
                     attention_ref(q, k, v, lengths, compute_dtype=dtype) if dtype != torch.float32 else None)
        t_sdpa = graph_timed(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask),
                             repeats)
        t_ours = graph_timed(lambda: attention(q, k, v, lengths), repeats)
        cudnn = "—"
        if not masked and dtype != torch.float32 and _cudnn_attention_usable(torch.device(device)):
            qkv = torch.stack([q, k, v], dim=2)  # (B, T, 3, H, D): the backend's fused projection
            cudnn_path = _UnmaskedAttention({}).cudnn
            try:  # graph_timed runs it once before capturing: a failure there leaves no broken capture
                cudnn = f"{1000 * graph_timed(lambda: cudnn_path(qkv), repeats):.3f}"
            except Exception as exc:  # noqa: BLE001 - not every GPU and torch has it
                cudnn = f"failed: {str(exc).splitlines()[0][:60] if str(exc) else type(exc).__name__}"
        rows.append(f"| B={b} T={t} H={h} D={d}{', key mask' if masked else ''} | {1000 * t_sdpa:.3f} | "
                    f"{cudnn} | {1000 * t_ours:.3f} | {t_sdpa / t_ours:.2f}x |")
        print(rows[-1], flush=True)
    return rows


def linear_gelu_vs_cublas(repeats, device, dtype):
    """fc1 + GELU as our one fused kernel against cuBLAS (with its bias epilogue) plus a GELU pass, at
    the feed-forward shapes of the cases (rows = batch x frames, K -> N)."""
    from audioenc.kernels.linear_gelu import linear_gelu, linear_gelu_ref

    rows = []
    shapes = [(16 * 1500, 1280, 5120), (16 * 499, 1024, 4096), (64 * 499, 768, 3072), (499, 1024, 4096)]
    for m, k, n in (shapes if not TINY else [(97, 64, 256)]):
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype) / k ** 0.5
        b = torch.randn(n, device=device, dtype=dtype)
        check_output(f"linear_gelu at {m} x {k} -> {n}", linear_gelu(x, w, b),
                     linear_gelu_ref(x.float(), w.float(), b.float()),
                     linear_gelu_ref(x, w, b, compute_dtype=dtype) if dtype != torch.float32 else None)
        t_cublas = graph_timed(lambda: torch.nn.functional.gelu(torch.nn.functional.linear(x, w, b)), repeats)
        t_epilogue = graph_timed(lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True), repeats)
        t_ours = graph_timed(lambda: linear_gelu(x, w, b), repeats)
        rate = 2 * m * n * k / t_ours / 1e12
        rows.append(f"| {m} x {k} -> {n} | {1000 * t_cublas:.3f} | {1000 * t_epilogue:.3f} | {1000 * t_ours:.3f} | "
                    f"{t_cublas / t_ours:.2f}x | {rate:.0f} |")
        print(rows[-1], flush=True)
    return rows


def conv_vs_cudnn(repeats, device, dtype):
    """The conv feature kernels against cuDNN (channels-first input, its own layout) plus torch's
    LayerNorm and GELU, at the cases' biggest conv layers; layer-norm layers both ways the backend
    chooses between (one fused kernel, or the conv with big tiles then LayerNorm + GELU)."""
    from audioenc.backends.triton import _ConvLayerNormGelu
    from audioenc.kernels.conv_feature import conv1d_gelu, conv1d_gelu_ref

    F = torch.nn.functional
    rows = []
    # (label, batch, input frames, channels in, out, kernel, stride, padding, LayerNorm)
    shapes = [("wav2vec2-large conv 1", 16, 31999, 512, 512, 3, 2, 0, True),
              ("wav2vec2-base conv 1", 64, 31999, 512, 512, 3, 2, 0, False),
              ("whisper-large-v3 conv 2", 16, 3000, 1280, 1280, 3, 2, 1, False)]
    for label, b, length, c_in, c_out, k, stride, pad, ln in (
            shapes if not TINY else [("tiny conv", 2, 97, 32, 32, 3, 2, 0, True)]):
        x = torch.randn(b, length, c_in, device=device, dtype=dtype)
        x_first = x.transpose(1, 2).contiguous()
        w = torch.randn(c_out, c_in, k, device=device, dtype=dtype) / (c_in * k) ** 0.5
        bias = torch.randn(c_out, device=device, dtype=dtype) * 0.1
        w_ours = w.permute(2, 1, 0).contiguous().permute(2, 1, 0)  # the backend's weight layout
        norm = (torch.ones(c_out, device=device), torch.zeros(c_out, device=device), 1e-5)
        if ln:
            def cudnn():
                y = F.conv1d(x_first, w, bias, stride, pad).transpose(1, 2)
                return F.gelu(F.layer_norm(y.float(), (c_out,), norm[0], norm[1]).to(dtype))
            layer = _ConvLayerNormGelu(w_ours, bias, stride, norm, dtype)
            ours = {"fused": layer.fused, "split": layer.split}
        else:
            cudnn = lambda: F.gelu(F.conv1d(x_first, w, bias, stride, pad))
            ours = {"fused": lambda t: conv1d_gelu(t, w_ours, bias, stride, pad)}
        t_cudnn = graph_timed(cudnn, repeats)
        frames = (length + 2 * pad - k) // stride + 1
        flops = 2 * b * frames * c_out * c_in * k
        ref = lambda compute_dtype, *args: conv1d_gelu_ref(*args, stride, pad, *(norm if ln else ()),
                                                            out_dtype=torch.float32, compute_dtype=compute_dtype)
        truth = ref(torch.float32, x.float(), w_ours.float(), bias.float())
        naive = ref(dtype, x, w_ours, bias) if dtype != torch.float32 else None
        for way, fn in ours.items():
            check_output(f"conv feature kernel ({way}) at {label}", fn(x), truth, naive)
            t = graph_timed(lambda: fn(x), repeats)
            rows.append(f"| {label}, batch {b}{', LayerNorm' if ln else ''} | {way} | {1000 * t_cudnn:.3f} | "
                        f"{1000 * t:.3f} | {t_cudnn / t:.2f}x | {flops / t / 1e12:.0f} |")
            print(rows[-1], flush=True)
    return rows


def positional_conv_vs_cudnn(repeats, device, dtype) -> list[str]:
    """The grouped positional conv (16 groups, kernel 128) + GELU of wav2vec2-large (batch 16) and
    base (batch 64) at 10 s: cuDNN as the backend calls it (bias, input copied to (B, C, T)), eagerly
    and replayed from a CUDA graph (stop 26's eager profile ran it 5x slower than the graph seemed
    to), cuDNN on the transposed view, and audioenc's kernel, which the backend times against cuDNN."""
    from audioenc.backends.triton import _PositionalConv
    from audioenc.kernels.pos_conv import grouped_conv1d_gelu_ref

    rows = []
    # 499 frames: 10 s as the eager profile ran it; 511: the backend's length bucket for 10 s.
    shapes = [("wav2vec2-large", 16, 499, 1024), ("wav2vec2-large", 16, 511, 1024),
              ("wav2vec2-base", 64, 511, 768)] if not TINY else [
        ("tiny", 2, 49, 64)]
    for label, b, frames, c in shapes:
        k, groups = (128, 16) if not TINY else (16, 4)
        conv = torch.nn.Conv1d(c, c, k, padding=k // 2, groups=groups)
        pos = _PositionalConv(conv, dtype, torch.device(device))
        x = torch.randn(b, frames, c, device=device, dtype=dtype)
        check_output(f"grouped_conv1d_gelu at {label}, batch {b}, {frames} frames", pos.triton(x),
                     grouped_conv1d_gelu_ref(x.float(), pos.weight.float(), pos.bias.float(), groups),
                     grouped_conv1d_gelu_ref(x, pos.weight, pos.bias, groups, compute_dtype=dtype)
                     if dtype != torch.float32 else None)
        view = lambda: torch.nn.functional.gelu(torch.nn.functional.conv1d(
            x.transpose(1, 2), pos.weight, pos.bias, padding=k // 2, groups=groups)[..., :frames])
        t_eager = timed(lambda: pos.cudnn(x), repeats)
        t_graph, t_view, t_ours = (graph_timed(fn, repeats) for fn in (lambda: pos.cudnn(x), view, lambda: pos.triton(x)))
        flops = 2 * b * frames * c * (c // groups) * k
        rows.append(f"| {label}, batch {b}, {frames} frames | {1000 * t_eager:.3f} | {1000 * t_graph:.3f} | "
                    f"{1000 * t_view:.3f} | {1000 * t_ours:.3f} | {t_graph / t_ours:.2f}x | {flops / t_ours / 1e12:.0f} |")
        print(rows[-1], flush=True)
    return rows


def survived(section, *args) -> list[str]:
    """A micro-benchmark's rows, or one row naming its failure: a kernel that fails on this GPU must
    not cost the run the sections after it."""
    try:
        return section(*args)
    except Exception as exc:  # noqa: BLE001 (any failure is reported in the table)
        traceback.print_exc()
        return [f"| {section.__name__} failed: {type(exc).__name__}: {str(exc)[:200]} |"]


def micro_benchmarks(repeats, device, dtype) -> list[str]:
    """The kernels alone against their torch counterparts: the BENCHMARKS.md lines. Each kernel's
    output is checked against its *_ref first (DESIGN.md's half-precision rule): a mismatch stops the run."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the checks' float32 truths
    att_rows, fc1_rows, conv_rows, pos_rows = (survived(section, repeats, device, dtype) for section in (
        attention_vs_sdpa, linear_gelu_vs_cublas, conv_vs_cudnn, positional_conv_vs_cudnn))
    return [
        "Attention alone (ms per call, 20 calls replayed from a CUDA graph):",
        "",
        "| shape | torch SDPA | cuDNN attention | audioenc triton | speed-up vs SDPA |",
        "|---|---:|---:|---:|---:|",
        *att_rows,
        "",
        "Feed-forward fc1 + GELU alone (ms per call, replayed from a CUDA graph). The backend times cuBLAS "
        "(in half precision with the GELU in its epilogue) against linear_gelu at its first call per shape and "
        "keeps the faster; the case rows above say which it kept.",
        "",
        "| rows x K -> N | cuBLAS + GELU pass | cuBLAS, GELU epilogue (tanh) | audioenc linear_gelu | "
        "linear_gelu vs GELU pass | linear_gelu TFLOP/s |",
        "|---|---:|---:|---:|---:|---:|",
        *fc1_rows,
        "",
        "Conv feature layers alone (ms per call, replayed from a CUDA graph): audioenc's kernels against cuDNN "
        "plus torch's LayerNorm and GELU. For layer-norm layers the backend times its two ways per shape and "
        "keeps the faster.",
        "",
        "| layer | audioenc way | cuDNN + torch | audioenc | speed-up | TFLOP/s |",
        "|---|---|---:|---:|---:|---:|",
        *conv_rows,
        "",
        "Positional conv + GELU alone (16 groups, kernel 128; ms per call): cuDNN as the backend calls it, "
        "eagerly and replayed from a CUDA graph, cuDNN on the transposed (B, T, C) view (graph), and audioenc's "
        "kernel (graph), which the backend times against cuDNN at its first call per shape.",
        "",
        "| shape | cuDNN eager | cuDNN graph | cuDNN, transposed view | audioenc | speed-up vs cuDNN graph | "
        "audioenc TFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *pos_rows,
        "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tiny", action="store_true", help="tiny models (automatic without CUDA)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--budget", type=float, default=float("inf"),
                        help="seconds: start no new case after this (a lent GPU's time is short)")
    parser.add_argument("--cases", default="", help="only these, as NAME:BATCH,... (e.g. whisper-large-v3:16)")
    parser.add_argument("--no-micro", action="store_true",
                        help="only the cases, not the kernels alone (attention, fc1 + GELU, conv layers)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32  # CPU interpreter: fp16 matmuls are too slow
    repeats = 1 if TINY else args.repeats
    peak = matmul_rate() if device == "cuda" else None
    rows = []
    started = time.perf_counter()
    for name, family, config, seconds, batch in (TINY_CASES if TINY else REAL_CASES):
        if args.cases and f"{name}:{batch}" not in args.cases.split(","):
            continue
        if time.perf_counter() - started > args.budget:
            print(f"budget of {args.budget:g} s spent: {name} batch {batch} and later cases not run", flush=True)
            break
        case_rows = run_case(name, family, config, seconds, batch, repeats, device, dtype, peak)
        print("\n".join(case_rows), flush=True)
        rows += case_rows
    # after the cases, which matter more when a lent GPU's time runs out
    spent = time.perf_counter() - started > args.budget
    micro_lines = [] if args.no_micro or spent else micro_benchmarks(repeats, device, dtype)
    card = torch.cuda.get_device_name() if device == "cuda" else "no GPU (CPU, Triton interpreter)"
    body = "\n".join([
        f"Machine: {card}; {machine()}. {versions('torch', 'triton', 'transformers', 'audioenc')}. "
        f"Median of {repeats} runs ({'CUDA events' if device == 'cuda' else 'wall time'} after warm-up), "
        f"random weights, encoder forward only "
        f"(inputs on the device). RTF = compute time / audio time. Relative error: against audioenc's float32 "
        f"torch reference on the same weights, which transformers and openai-whisper run too (torchaudio has "
        f"its own random weights: timing only). First call: each contender's first call, not in the median "
        f"(torch.compile compiles there; audioenc's triton backend autotunes and captures its CUDA graph). "
        + (f"Measured bf16 matmul rate: {peak / 1e12:.0f} TFLOP/s." if peak else ""),
        "",
        "| case | engine | ms / item | RTF | triton speed-up | fraction of matmul rate | rel. error vs fp32 | "
        "first call (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        *micro_lines,
        "Targets on an H100: >= 1.5x transformers SDPA and >= 1.2x torch.compile at batch 16; >= 0.5 of the "
        "matmul rate for whisper-large-v3 at batch 16; attention at least as fast as SDPA (flash).",
    ])
    print(body)
    if TINY:
        print("\nGPU numbers are missing: this run had no CUDA GPU (tiny sizes, Triton interpreter, float32). "
              "Run `python benchmarks/bench_gpu.py` on a CUDA machine to measure them.")
    elif not args.no_write:
        # Its own section: "Triton backend (GPU)" gathers several sessions' runs by hand, and a run
        # that covers only some cases must not overwrite the others.
        write_section("Triton backend (GPU): the latest bench_gpu.py run", body)


if __name__ == "__main__":
    main()
