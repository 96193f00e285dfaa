"""audioenc's ONNX Runtime backend against Hugging Face transformers (eager attention, and sdpa, its default),
CTranslate2 (faster-whisper's engine, int8 and float32) and openai-whisper on the CPU: same process, same
random weights at real sizes, medians.

    python benchmarks/bench_onnx.py [--repeats 5] [--no-write] [--conv-forms | --whisper-large | --families]

wav2vec2-base: audio in -> frames out (10 s, batch 1; both sides include waveform normalisation);
with --families also at 1 and 2 s, a batch of 8 items of 2 to 10 s, hubert-base, wavlm-base-plus
and wav2vec2-large-lv60.
whisper-base (whisper-large-v3 with --whisper-large): encoder only, on the same log-mel of one 30 s
window (CTranslate2 takes it as a StorageView). Accuracy is against audioenc's torch float32 reference (which matches transformers).
"""
from __future__ import annotations

import argparse
import tempfile
from functools import partial

import numpy as np
import torch

import audioenc
from audioenc.backends.onnx import onnx_threads
from audioenc.cpu import vector_isa
from bench_reference import speech_like
from common import interleaved_medians, machine, versions, write_section


def accuracy(ours: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    ours, ref = ours.double(), ref.double()
    rel = float((ours - ref).norm() / ref.norm())
    return rel, float(torch.nn.functional.cosine_similarity(ours, ref, dim=-1).mean())


def row(name: str, t: float, t_base: float, t_ct2: float | None, acc) -> str:
    ct2 = f"{t_ct2 / t:.2f}x" if t_ct2 else "—"
    err = f"{acc[0]:.1e} | {acc[1]:.5f}" if acc else "— | —"
    return f"| {name} | {t * 1000:.0f} | {t_base / t:.2f}x | {ct2} | {err} |"


def wav2vec2_flops(dims, samples: int) -> float:
    """Multiply-adds x 2 of one item: the feature convs, projection, positional conv and the layers."""
    macs, frames, channels = 0, samples, 1
    for dim, k, s in zip(dims.conv_dim, dims.conv_kernel, dims.conv_stride):
        frames = (frames - k) // s + 1
        macs += frames * dim * channels * k
        channels = dim
    d = dims.hidden_size
    macs += frames * channels * d + frames * d * (d // dims.num_conv_pos_embedding_groups) * dims.num_conv_pos_embeddings
    macs += dims.num_layers * (4 * frames * d * d + 2 * frames * d * dims.intermediate_size + 2 * frames * frames * d)
    return 2.0 * macs


MATMUL = (2048, 2048, 3072)  # m, k, n of the float32 matmul whose rate bounds eager transformers


def matmul_rate(seconds: float) -> float:
    """FLOP/s of the MATMUL timed in ``seconds``."""
    m, k, n = MATMUL
    return 2.0 * m * k * n / seconds


def matmul_call():
    m, k, n = MATMUL
    a, b = torch.randn(m, k), torch.randn(k, n)
    return lambda: a @ b


LARGE_LV60 = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                  feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)
# (case, transformers class prefix, config kwargs, seconds of each item in the batch)
W2V_BASE_10S = ("wav2vec2-base 10 s", "Wav2Vec2", {}, [10.0])
FAMILY_CASES = [
    ("wav2vec2-base 1 s", "Wav2Vec2", {}, [1.0]),
    ("wav2vec2-base 2 s", "Wav2Vec2", {}, [2.0]),
    W2V_BASE_10S,
    ("wav2vec2-base, batch of 8 from 2 to 10 s", "Wav2Vec2", {}, [2.0 + 8.0 * i / 7 for i in range(8)]),
    ("hubert-base 10 s", "Hubert", {}, [10.0]),
    ("wavlm-base-plus 10 s", "WavLM", {}, [10.0]),
    ("wav2vec2-large-lv60 10 s", "Wav2Vec2", LARGE_LV60, [10.0]),
]


# eager: the issues' baseline; sdpa: what transformers 5 loads by default.
TRANSFORMERS_ATTENTION = ("eager", "sdpa")


def transformers_contenders(load, run) -> dict:
    """run(model) per attention of TRANSFORMERS_ATTENTION that the model class supports (WavLM has no
    sdpa); load(attention) -> the model."""
    contenders = {}
    for attention in TRANSFORMERS_ATTENTION:
        try:
            contenders[f"transformers {attention} fp32"] = partial(run, load(attention))
        except ValueError:  # transformers: "does not support an attention implementation through ..."
            pass
    return contenders


def versus_default(times: dict) -> str:
    """The default is sdpa where the model supports it, else eager."""
    attention = "sdpa" if "transformers sdpa fp32" in times else "eager"
    t = times[f"transformers {attention} fp32"]
    return (f"against transformers' default attention ({attention}), audioenc onnx float32 is "
            f"{t / times['audioenc onnx float32']:.2f}x and int8 {t / times['audioenc onnx int8']:.2f}x.")


def wav2vec2_family_rows(tmp: str, repeats: int, case) -> tuple[list[str], dict, float]:
    """Rows of one wav2vec2-family case: transformers (eager; sdpa too where the model has it) against
    audioenc onnx float32 and int8, audio in to frames out (both sides normalise the waveform).
    Returns the rows, the medians and the FLOPs of the batch."""
    import transformers

    name, prefix, config, seconds = case
    torch.manual_seed(0)  # the same weights each run, so the cached graphs are reused
    hf_class = getattr(transformers, f"{prefix}Model")
    hf_class(getattr(transformers, f"{prefix}Config")(**config)).eval().save_pretrained(tmp)
    layer_norm = config.get("feat_extract_norm") == "layer"
    fe = transformers.Wav2Vec2FeatureExtractor(do_normalize=True, return_attention_mask=layer_norm)
    fe.save_pretrained(tmp)
    audio = [speech_like(s, seed=i) for i, s in enumerate(seconds)]

    def run_hf(hf):
        inputs = fe(audio, sampling_rate=16000, padding=True, return_tensors="pt")
        with torch.inference_mode():
            return hf(inputs.input_values, attention_mask=inputs.get("attention_mask")).last_hidden_state

    reference = audioenc.load(tmp, backend="torch", dtype="float32")
    ref = reference.encode(audio)
    contenders = transformers_contenders(
        lambda attention: hf_class.from_pretrained(tmp, attn_implementation=attention).eval(), run_hf)
    # transformers' batched frames depend on the padding (group-norm models), so only a single item is compared
    outputs = {name: run() for name, run in contenders.items()} if len(audio) == 1 else {}
    for dtype in ("float32", "int8"):
        enc = audioenc.load(tmp, backend="onnx", dtype=dtype)
        outputs[f"audioenc onnx {dtype}"] = enc.encode(audio).last_hidden_state
        contenders[f"audioenc onnx {dtype}"] = lambda enc=enc: enc.encode(audio)
    # the matmul runs in the same rounds, so its rate is the machine's rate while the models ran
    times = interleaved_medians({**contenders, "matmul": matmul_call()}, repeats)
    t_hf = times["transformers eager fp32"]
    valid = [ref.last_hidden_state[i, :n] for i, n in enumerate(ref.lengths.tolist())]
    rows = []
    for contender, t in times.items():
        acc = None
        if contender in outputs:
            acc = accuracy(torch.cat([outputs[contender][i, :len(v)] for i, v in enumerate(valid)]), torch.cat(valid))
        if contender != "matmul":
            rows.append(row(f"{name}: {contender}", t, t_hf, None, acc))
    flops = sum(wav2vec2_flops(reference.backend.model.dims, int(s * 16000)) for s in seconds)
    return rows, times, flops


def wav2vec2_rows(tmp: str, repeats: int) -> tuple[list[str], str]:
    rows, times, flops = wav2vec2_family_rows(tmp, repeats, W2V_BASE_10S)
    m, k, n = MATMUL
    rate = matmul_rate(times["matmul"])
    t_hf = times["transformers eager fp32"]
    ceiling = (f"wav2vec2-base on 10 s is {flops / 1e9:.0f} GFLOP. torch's float32 matmul rate during these "
               f"rounds was {rate / 1e9:.0f} GFLOP/s (a {m}x{k}x{n} matmul, timed in the same rounds), so at that "
               f"rate the model takes {flops / rate * 1000:.0f} ms: transformers eager runs at "
               f"{flops / t_hf / rate:.0%} of it and audioenc onnx float32 at "
               f"{flops / times['audioenc onnx float32'] / rate:.0%} (onnxruntime's own GEMMs can outrun torch's); "
               f"1.3x transformers needs {1.3 * flops / t_hf / rate:.0%}.")
    return rows, f"{ceiling}\n\nwav2vec2-base 10 s: {versus_default(times)}"


def family_rows(tmp: str, repeats: int) -> tuple[list[str], str]:
    rows, notes = [], []
    for case in FAMILY_CASES:
        with tempfile.TemporaryDirectory(dir=tmp) as case_dir:
            made, times, flops = wav2vec2_family_rows(case_dir, repeats, case)
        rate = matmul_rate(times["matmul"])
        notes.append(f"{case[0]}: {flops / 1e9:.0f} GFLOP of valid audio; audioenc onnx float32 at "
                     f"{flops / times['audioenc onnx float32'] / rate:.0%} of the float32 matmul rate measured in its rounds "
                     f"({rate / 1e9:.0f} GFLOP/s), transformers at {flops / times['transformers eager fp32'] / rate:.0%}; "
                     f"{versus_default(times)}")
        print("\n".join(made), flush=True)
        rows += made
    notes.append("The mixed batch: transformers pads every item to the longest (80 s of audio for 48 s of speech); "
                 "audioenc runs a list in groups of similar length on the CPU (README), with the same frames as one "
                 "padded batch. The matmul rate drifts between cases on this shared VM; the ratios in a case are "
                 "measured in the same rounds.")
    return rows, "\n".join(f"- {note}" for note in notes)


# Encoder dims of the Whisper sizes timed here (the decoder is cut to one layer: it is never run).
WHISPER_SIZES = {
    "base": dict(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048, num_mel_bins=80),
    "large-v3": dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20, encoder_ffn_dim=5120,
                     num_mel_bins=128),
}


def whisper_rows(tmp: str, repeats: int, size: str = "base") -> tuple[list[str], str]:
    import ctranslate2
    import transformers

    dims = WHISPER_SIZES[size]
    config = transformers.WhisperConfig(**dims, decoder_layers=1, decoder_attention_heads=dims["encoder_attention_heads"],
                                        decoder_ffn_dim=dims["encoder_ffn_dim"])
    transformers.WhisperForConditionalGeneration(config).eval().save_pretrained(tmp)
    transformers.WhisperFeatureExtractor(feature_size=dims["num_mel_bins"]).save_pretrained(tmp)
    # int8: what faster-whisper users pick for speed on a CPU; float32: what its default compute type
    # resolves to on a CPU (faster-whisper's float16 models compute in float32 there). Its threads are
    # onnxruntime's (which $AUDIOENC_ONNX_THREADS may set apart from torch's), as in audioenc bench.
    ct2 = {}
    for quantization in ("int8", "float32"):
        ctranslate2.converters.TransformersConverter(tmp).convert(f"{tmp}/ct2-{quantization}", quantization=quantization)
        ct2[quantization] = ctranslate2.models.Whisper(f"{tmp}/ct2-{quantization}", device="cpu",
                                                       compute_type=quantization, intra_threads=onnx_threads())

    from audioenc.frontend import log_mel_spectrogram_ref
    from audioenc.peer_openai_whisper import openai_whisper_encoder

    layers = dims["encoder_layers"]
    mel = log_mel_spectrogram_ref(torch.from_numpy(speech_like(30.0))[None], dims["num_mel_bins"]).contiguous()
    ref_backend = audioenc.load(tmp, backend="torch", dtype="float32").backend
    ref = ref_backend.run(mel, None, layers)[0][0]

    def run_hf(hf):
        with torch.inference_mode():
            return hf(mel).last_hidden_state

    features = ctranslate2.StorageView.from_array(mel.numpy())

    def run_ct2(model):
        return np.asarray(model.encode(features, to_cpu=True))

    def run_openai(encoder):
        with torch.inference_mode():
            return encoder(mel)

    contenders = {**transformers_contenders(lambda attention: transformers.WhisperModel.from_pretrained(
                      tmp, attn_implementation=attention).encoder.eval(), run_hf),
                  **{f"CTranslate2 {q}": partial(run_ct2, model) for q, model in ct2.items()},
                  "openai-whisper fp32": partial(run_openai, openai_whisper_encoder(ref_backend.model)),
                  "audioenc torch fp32 (the reference)": lambda: ref_backend.run(mel, None, layers)}
    outputs = {**{name: contenders[name]()[0] for name in contenders if name.startswith(("transformers", "openai"))},
               **{f"CTranslate2 {q}": torch.from_numpy(run_ct2(model)[0]) for q, model in ct2.items()},
               "audioenc torch fp32 (the reference)": ref}
    for dtype in ("float32", "int8"):
        backend = audioenc.load(tmp, backend="onnx", dtype=dtype).backend
        outputs[f"audioenc onnx {dtype}"] = backend.run(mel, None, layers, False)[0][0]  # encode()'s graph
        contenders[f"audioenc onnx {dtype}"] = lambda backend=backend: backend.run(mel, None, layers, False)
    times = interleaved_medians(contenders, repeats)
    t_hf, t_ct2 = times["transformers eager fp32"], times["CTranslate2 int8"]
    note = (f"whisper-{size}: CTranslate2 float32 is what faster-whisper computes in on a CPU with its default "
            f"compute type (its float16 models; this CPU has no float16 GEMMs in CTranslate2): audioenc onnx float32 "
            f"is {times['CTranslate2 float32'] / times['audioenc onnx float32']:.2f}x it.\n\n"
            f"whisper-{size}: {versus_default(times)}")
    return [row(f"whisper-{size} 30 s: {name}", t, t_hf, t_ct2, accuracy(outputs[name], ref))
            for name, t in times.items()], note


def conv_form_rows(tmp: str, repeats: int) -> list[str]:
    """The float32 graph's conv feature encoder as onnxruntime Convs (what the backend exports) against
    the MatMul-over-gathered-taps form (what int8 graphs quantise: export.build_graph), whole model, 10 s, batch 1."""
    import onnxruntime as ort

    from audioenc.export import export_onnx
    from audioenc.frontend import normalize_waveforms

    lengths = np.array([160000])
    feeds = {"waveforms": normalize_waveforms(speech_like(10.0)[None], lengths), "lengths": lengths}
    rows = []
    for name in ("wav2vec2-base", "wav2vec2-large-lv60"):
        enc = audioenc.load(f"random:{name}", backend="onnx")
        sessions, outputs = {}, {}
        for form, as_matmul in (("MatMul", True), ("Conv", False)):
            path = f"{tmp}/{name}-{form}.onnx"
            export_onnx(enc.backend.reference.loaded(), path, fused_attention=True, convs_as_matmul=as_matmul)
            sessions[form] = ort.InferenceSession(path, enc.backend.session_options(), providers=["CPUExecutionProvider"])
            outputs[form] = torch.from_numpy(sessions[form].run(["last_hidden_state"], feeds)[0])
        times = interleaved_medians({form: lambda s=s: s.run(None, feeds) for form, s in sessions.items()}, repeats)
        rel = float((outputs["Conv"] - outputs["MatMul"]).norm() / outputs["MatMul"].norm())
        rows.append(f"| {name} | {times['MatMul'] * 1000:.0f} | {times['Conv'] * 1000:.0f} | "
                    f"{times['MatMul'] / times['Conv']:.2f}x | {rel:.1e} |")
    return rows


def write_conv_forms(repeats: int, write: bool, command: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        rows = conv_form_rows(tmp, repeats)
    body = "\n".join([
        f"`{command}` — the float32 graph with the conv feature encoder as "
        "onnxruntime Convs (2-D, height 1: run as its blocked-layout direct convolution; what the onnx backend "
        "exports) against the same graph with each conv a MatMul over gathered taps (the form layer-norm models' "
        "int8 graphs keep, since dynamic quantisation quantises MatMuls). Whole model, random weights, 10 s, batch "
        "1, median of "
        f"{repeats} interleaved rounds, one process.",
        "",
        f"Machine: {machine()}. Versions: {versions('audioenc', 'torch', 'onnxruntime')}.",
        "",
        "| model | MatMul form (ms) | Conv form (ms) | speed-up | rel. difference |",
        "| --- | ---: | ---: | ---: | ---: |",
        *rows,
    ])
    if write:
        write_section("ONNX Runtime conv feature encoder forms (CPU)", body)
    print(body)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--conv-forms", action="store_true", help="time the feature encoder's two graph forms instead")
    parser.add_argument("--whisper-large", action="store_true",
                        help="whisper-large-v3 instead of the base models (minutes per round; 3 repeats are plenty)")
    parser.add_argument("--families", action="store_true",
                        help="the wav2vec2 family instead: wav2vec2-base at 1, 2 and 10 s and a mixed batch, "
                             "hubert-base, wavlm-base-plus, wav2vec2-large-lv60")
    args = parser.parse_args()
    # the command written into the section: the arguments that give its table (--no-write does not change it)
    repeats = f" --repeats {args.repeats}" if args.repeats != parser.get_default("repeats") else ""
    if args.conv_forms:
        write_conv_forms(args.repeats, not args.no_write, f"python benchmarks/bench_onnx.py --conv-forms{repeats}")
        return
    rows, notes = [], []
    if args.whisper_large:
        makers, title, command = [partial(whisper_rows, size="large-v3")], "ONNX Runtime backend, whisper-large-v3 (CPU)", \
            f"python benchmarks/bench_onnx.py --whisper-large{repeats}"
    elif args.families:
        makers, title, command = [family_rows], "ONNX Runtime backend by family, length and batch (CPU)", \
            f"python benchmarks/bench_onnx.py --families{repeats}"
    else:
        makers, title, command = [wav2vec2_rows, whisper_rows], "ONNX Runtime backend (CPU)", \
            f"python benchmarks/bench_onnx.py{repeats}"
    for make in makers:
        with tempfile.TemporaryDirectory() as tmp:
            made, note = make(tmp, args.repeats)
            rows += made
            notes += [note] if note else []
    body = "\n".join([
        f"`{command}` — CPU, random weights at real sizes, median of "
        f"{args.repeats} rounds after 2 warm-up runs, all in one process; each round times one call of every contender, "
        "so drifts of this shared 2-core VM's speed hit all of them alike (an untimed call before each timed one lets the previous contender's thread pool stop spinning). Absolute times move between runs; "
        "the ratios within a run are what counts. "
        "Graph export time (first use, cached on disk afterwards) is not included.",
        "",
        f"Machine: {machine()}, torch threads {torch.get_num_threads()}, onnxruntime and CTranslate2 intra-op "
        f"threads {onnx_threads()}.  ",
        f"Versions: {versions('audioenc', 'torch', 'onnxruntime', 'onnx', 'transformers', 'ctranslate2')}.",
        "",
        "Accuracy is against audioenc's torch float32 reference: relative error ||out - ref|| / ||ref|| and mean "
        "per-frame cosine similarity. Targets: float32 >= 1.3x transformers eager at rel. error <= 1e-4; "
        "the fastest mode with cosine >= 0.995 >= 2x transformers eager and (Whisper) >= 1.5x CTranslate2 int8.",
        "",
        "| case | median (ms) | vs transformers eager | vs CTranslate2 int8 | rel. error | mean cosine |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
        "",
        "\n\n".join(notes),
    ])
    if not args.no_write:
        write_section(f"{title[:-1]}, {vector_isa()})", body)  # "(CPU)" -> "(CPU, AVX2)": one section per kind of CPU
    print(body)


if __name__ == "__main__":
    main()
