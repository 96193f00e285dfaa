"""audioenc's torch reference backend against Hugging Face transformers (eager attention), same
machine, same process, same random weights at real sizes, audio in -> frames out.

    python benchmarks/bench_reference.py [--repeats 5] [--no-write]

The reference backend is the ground truth, not the fast path: this table is the baseline the fast
backends are measured against.
"""
from __future__ import annotations

import argparse
import tempfile

import numpy as np
import torch

import audioenc
from audioenc import verify
from common import check_output, interleaved_medians, machine, versions, write_section


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """audioenc verify's generated speech (syllables between pauses), ``seconds`` long."""
    return verify.speech_like(int(seconds * 16000), np.random.default_rng(seed))


def wav2vec2_case(tmp: str):
    import transformers

    config = transformers.Wav2Vec2Config()  # wav2vec2-base
    model = transformers.Wav2Vec2Model(config).eval()
    model.save_pretrained(tmp)
    fe = transformers.Wav2Vec2FeatureExtractor(do_normalize=True)
    fe.save_pretrained(tmp)
    hf = transformers.Wav2Vec2Model.from_pretrained(tmp, attn_implementation="eager").eval()
    audio = speech_like(10.0)

    def run_hf():
        with torch.inference_mode():
            return hf(fe(audio, sampling_rate=16000, return_tensors="pt").input_values).last_hidden_state

    return "wav2vec2-base, 10 s, batch 1", audio, run_hf


def whisper_case(tmp: str):
    import transformers

    config = transformers.WhisperConfig(d_model=512, encoder_layers=6, encoder_attention_heads=8, encoder_ffn_dim=2048,
                                        decoder_layers=1, decoder_attention_heads=8, decoder_ffn_dim=2048)
    transformers.WhisperModel(config).eval().save_pretrained(tmp)
    fe = transformers.WhisperFeatureExtractor()
    fe.save_pretrained(tmp)
    hf = transformers.WhisperModel.from_pretrained(tmp, attn_implementation="eager").encoder.eval()
    audio = speech_like(30.0)

    def run_hf():
        with torch.inference_mode():
            return hf(fe(audio, sampling_rate=16000, return_tensors="pt").input_features).last_hidden_state

    return "whisper-base encoder, 30 s, batch 1", audio, run_hf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows = []
    for make in (wav2vec2_case, whisper_case):
        with tempfile.TemporaryDirectory() as tmp:
            name, audio, run_hf = make(tmp)
            enc = audioenc.load(tmp, backend="torch", device="cpu", dtype="float32")
            ours = enc.encode(audio).last_hidden_state[0]
            # checked before timing: past 1e-4 the two do not compute the same thing (WrongOutput)
            err = check_output(f"{name}: audioenc torch against transformers", ours, run_hf()[0, : ours.shape[0]])
            # in rounds, so a slow spell of a shared machine slows both alike
            times = interleaved_medians({"hf": run_hf, "ours": lambda: enc.encode(audio)}, args.repeats)
            t_hf, t_ours = times["hf"], times["ours"]
            rows.append(f"| {name} | {t_hf * 1000:.0f} | {t_ours * 1000:.0f} | {t_hf / t_ours:.2f}x | {err:.1e} |")
            print(rows[-1], flush=True)
    body = "\n".join([
        "`python benchmarks/bench_reference.py` — audio in, frames out, float32 on the CPU, random weights at "
        f"real sizes, median of {args.repeats} interleaved rounds after 2 warm-up runs; both sides include their own "
        "feature extraction. The reference backend is the ground truth, not the fast path.",
        "",
        f"Machine: {machine()}, torch threads {torch.get_num_threads()}.  ",
        f"Versions: {versions('audioenc', 'torch', 'transformers', 'numpy')}.",
        "",
        "| model | transformers eager (ms) | audioenc torch (ms) | speed-up | rel. error vs transformers |",
        "| --- | ---: | ---: | ---: | ---: |",
        *rows,
    ])
    if not args.no_write:
        write_section("Reference backend vs transformers (CPU)", body)
    print(body)


if __name__ == "__main__":
    main()
