"""CPU log-mel frontend: audioenc vs librosa, Hugging Face WhisperFeatureExtractor and openai-whisper,
80 bins, on a 30 s clip and a 10 min file; median of several runs in one process, the contenders
timed in turn round by round. Every contender's output is checked against audioenc's first
(DESIGN.md's float32 rule), so none is timed computing something else. Prints a markdown table and
writes it into BENCHMARKS.md's "## Frontend" section.

    python benchmarks/bench_frontend.py [--runs 15] [--no-write]
"""
import argparse
import platform

import numpy as np
import torch

import audioenc.frontend as fe
from common import check_output, interleaved_medians, machine, write_section


def peers():
    """{name: (version, fn(x) -> the (80, frames) Whisper log-mel)}. kaldi-native-fbank is not here:
    its fbank (povey window, pre-emphasis, natural log) and even its OnlineWhisperFbank (0.13 relative
    off openai-whisper, version 1.23) compute other features."""
    import librosa
    import whisper
    from transformers import WhisperFeatureExtractor

    hf = WhisperFeatureExtractor(feature_size=80)

    def librosa_log_mel(x):
        # librosa's power mel alone is less work than a log-mel: add Whisper's framing (reflect
        # padding, last frame dropped) and log scaling (DESIGN.md), as openai-whisper does in torch
        mel = librosa.feature.melspectrogram(y=x, sr=16000, n_fft=400, hop_length=160, n_mels=80,
                                             pad_mode="reflect")[:, :-1]
        log = np.log10(np.maximum(mel, 1e-10))
        return (np.maximum(log, log.max() - 8.0) + 4.0) / 4.0

    return {
        "librosa.feature.melspectrogram + log": (librosa.__version__, librosa_log_mel),
        "transformers WhisperFeatureExtractor": (__import__("transformers").__version__,
                                                 lambda x: hf(x, sampling_rate=16000, return_tensors="np", truncation=False,
                                                              padding="longest")["input_features"][0]),
        "openai-whisper log_mel_spectrogram": (whisper.__version__,
                                               lambda x: whisper.log_mel_spectrogram(torch.from_numpy(x))),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    clips = {"30 s": (0.1 * rng.standard_normal(30 * 16000)).astype(np.float32),
             "10 min": (0.1 * rng.standard_normal(600 * 16000)).astype(np.float32)}
    contenders = {name: fn for name, (_, fn) in peers().items()}
    contenders["audioenc (all cores)"] = lambda x: fe.log_mel_spectrogram(x)
    contenders["audioenc (1 thread)"] = lambda x: fe.log_mel_spectrogram(x, threads=1)
    rows = {name: {} for name in contenders}
    for c, x in clips.items():
        ours = fe.log_mel_spectrogram(x)
        for name, fn in contenders.items():
            check_output(f"{name} on the {c} clip", np.asarray(fn(x)), ours)
        # round by round, so a slow spell of a shared machine slows every contender alike
        ms = interleaved_medians({name: (lambda fn=fn: fn(x)) for name, fn in contenders.items()},
                                 args.runs if c == "30 s" else max(3, args.runs // 5), warmup=1)
        for name, seconds in ms.items():
            rows[name][c] = 1e3 * seconds
    # Accuracy of the timed output against openai-whisper (normalised units).
    import whisper
    err = {}
    for c, x in clips.items():
        d = np.abs(fe.log_mel_spectrogram(x).numpy() - whisper.log_mel_spectrogram(torch.from_numpy(x)).numpy())
        err[c] = (d.max(), d.mean())
    peer_names = [n for n in rows if not n.startswith("audioenc")]
    fastest = {c: min(rows[n][c] for n in peer_names) for c in clips}
    lines = [
        f"CPU log-mel, 80 bins, float32 input; median ms of several runs, one process "
        f"(`python benchmarks/bench_frontend.py`). Machine: {machine()}; "
        f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"audioenc vector path: {getattr(fe._C, 'log_mel_cpu_isa', 'torch fallback')}.",
        "",
        "| implementation | version | 30 s clip (ms) | vs fastest peer | 10 min (ms) | vs fastest peer |",
        "|---|---|---:|---:|---:|---:|",
    ]
    versions = {n: v for n, (v, _) in peers().items()}
    for name, r in rows.items():
        lines.append(f"| {name} | {versions.get(name, '0.1.0')} | {r['30 s']:.2f} | {r['30 s'] / fastest['30 s']:.3f} | "
                     f"{r['10 min']:.1f} | {r['10 min'] / fastest['10 min']:.3f} |")
    lines += ["", "Accuracy of audioenc against openai-whisper (normalised log-mel): " +
              "; ".join(f"{c}: max {e[0]:.1e}, mean {e[1]:.1e}" for c, e in err.items()) + ".",
              "Target: at most 0.25 x the fastest peer on both inputs.", ""]
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        write_section("Frontend", table)


if __name__ == "__main__":
    main()
