"""CPU log-mel frontend: audioenc vs librosa, Hugging Face WhisperFeatureExtractor, openai-whisper
and kaldi-native-fbank, 80 bins, on a 30 s clip and a 10 min file; median of several runs in one
process. Prints a markdown table and writes it into BENCHMARKS.md's "## Frontend" section.

    python benchmarks/bench_frontend.py [--runs 15] [--no-write]
"""
import argparse
import platform

import numpy as np
import torch

import audioenc.frontend as fe
from common import machine, median_time, write_section

def median_ms(fn, runs):
    return 1e3 * median_time(fn, repeats=runs, warmup=1)


def peers():
    import kaldi_native_fbank as knf
    import librosa
    import whisper
    from transformers import WhisperFeatureExtractor

    hf = WhisperFeatureExtractor(feature_size=80)

    def kaldi(x):
        opts = knf.FbankOptions()
        opts.frame_opts.dither = 0.0
        opts.mel_opts.num_bins = 80
        fb = knf.OnlineFbank(opts)
        fb.accept_waveform(16000, x)
        fb.input_finished()
        return fb.get_frames(list(range(fb.num_frames_ready))) if hasattr(fb, "get_frames") else \
            [fb.get_frame(i) for i in range(fb.num_frames_ready)]

    return {
        "librosa.feature.melspectrogram": (librosa.__version__, lambda x: librosa.feature.melspectrogram(
            y=x, sr=16000, n_fft=400, hop_length=160, n_mels=80)),
        "transformers WhisperFeatureExtractor": (__import__("transformers").__version__,
                                                 lambda x: hf(x, sampling_rate=16000, return_tensors="np",
                                                                    truncation=False, padding="longest")),
        "openai-whisper log_mel_spectrogram": (whisper.__version__,
                                               lambda x: whisper.log_mel_spectrogram(torch.from_numpy(x))),
        "kaldi-native-fbank OnlineFbank": (getattr(knf, "__version__", "?"), kaldi),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    clips = {"30 s": (0.1 * rng.standard_normal(30 * 16000)).astype(np.float32),
             "10 min": (0.1 * rng.standard_normal(600 * 16000)).astype(np.float32)}
    rows = {}
    ours = {"audioenc (all cores)": lambda x: fe.log_mel_spectrogram(x),
            "audioenc (1 thread)": lambda x: fe.log_mel_spectrogram(x, threads=1)}
    for name, (_, fn) in peers().items():
        rows[name] = {c: median_ms(lambda: fn(x), args.runs if c == "30 s" else max(3, args.runs // 5))
                      for c, x in clips.items()}
    for name, fn in ours.items():
        rows[name] = {c: median_ms(lambda: fn(x), args.runs * 4 if c == "30 s" else args.runs)
                      for c, x in clips.items()}
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
