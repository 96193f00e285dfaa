"""Memory and start-up time of a process that loads an encoder from disk and encodes, against the
peers (CPU).

    python benchmarks/bench_memory.py [--whisper-large] [--calls 3] [--rounds 3] [--no-write]

Needs faster-whisper beside the dev extra (CTranslate2's rows take its feature extractor).

Each contender runs in a fresh process, as a user's would: import, load a checkpoint written to
disk beforehand (random weights at real sizes), encode the same audio ``--calls`` times. The table
gives the resident memory after those calls, the process's peak (loading included), and the time
from the process's start to its first output (imports, load, first call) beside a later call's.
The contenders' processes run in ``--rounds`` interleaved rounds; the table has their medians.
audioenc's ONNX graph is exported (and cached) by an untimed process first: the rows are what every
later process of a deployment takes; the first-use row shows the one-time export's cost.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
METHOD = ("each contender in a fresh process: import, load a checkpoint from disk (random weights at real sizes), "
          "encode the same audio (batch 1) a few times; resident memory after the calls and the process's peak "
          "(VmHWM, loading included); first output: seconds from the start of the process's script to the first "
          "call's result (imports, load, first call; the interpreter's own start is not counted), beside the last "
          "call's seconds. CTranslate2 takes faster-whisper's numpy log-mel, as faster-whisper runs it, and as many "
          "intra-op threads as onnxruntime (not CTranslate2's default, up to 4 whatever the cores). Medians of {rounds} interleaved "
          "rounds of processes. audioenc's ONNX graphs were exported and cached by earlier processes, "
          "as in a deployment; the first-use row exports its graph in the measured process. Whisper checkpoints "
          "have a one-layer decoder, so transformers' WhisperModel holds little beyond the encoder.")

# The child: prints {"rss_mb", "peak_mb", "first_s", "call_s"} after its calls.
CHILD = r"""
import time
start = time.perf_counter()
import json, sys
import numpy as np
contender, path, seconds, calls, threads = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = np.random.default_rng(0)
audio = (0.1 * rng.standard_normal(int(seconds * 16000))).astype(np.float32)
if contender.startswith("audioenc"):
    import audioenc
    backend, dtype = contender.split()[1:3]
    enc = audioenc.load(path, backend=backend, dtype=dtype)
    call = lambda: enc.encode(audio)
elif contender == "transformers":
    import torch, transformers
    config = transformers.AutoConfig.from_pretrained(path)
    if config.model_type == "whisper":
        model = transformers.WhisperModel.from_pretrained(path).encoder.eval()
        extract = transformers.WhisperFeatureExtractor.from_pretrained(path)
        features = lambda: extract(audio, sampling_rate=16000, return_tensors="pt").input_features
    else:
        model = transformers.AutoModel.from_pretrained(path).eval()
        extract = transformers.Wav2Vec2FeatureExtractor.from_pretrained(path)
        features = lambda: extract(audio, sampling_rate=16000, return_tensors="pt").input_values
    def call():
        with torch.inference_mode():
            return model(features()).last_hidden_state
else:  # "ctranslate2 COMPUTE_TYPE": faster-whisper's engine on its converted model, with its numpy log-mel
    import ctranslate2
    from faster_whisper.feature_extractor import FeatureExtractor
    model = ctranslate2.models.Whisper(path + "-ct2", device="cpu", compute_type=contender.split()[1],
                                       intra_threads=threads)
    extract = FeatureExtractor(feature_size=model.n_mels)
    def call():
        mel = extract(audio)[:, :3000]  # one 30 s window, padded as faster-whisper pads it
        mel = np.pad(mel, ((0, 0), (0, 3000 - mel.shape[1])))[None]
        return model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(mel)), to_cpu=True)
call()
first_s = time.perf_counter() - start
for _ in range(calls - 1):
    begin = time.perf_counter()
    call()
    call_s = time.perf_counter() - begin
# VmHWM, not ru_maxrss: that one keeps the parent's peak across the fork and exec
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"rss_mb": int(status["VmRSS"].split()[0]) / 1e3, "peak_mb": int(status["VmHWM"].split()[0]) / 1e3,
                  "first_s": first_s, "call_s": call_s}))
"""


def measure(contender: str, path: str, seconds: float, calls: int, cache: str) -> dict:
    from audioenc.backends.onnx import onnx_threads

    env = dict(os.environ, AUDIOENC_CACHE=cache)
    # CTranslate2's threads: the count the children's onnxruntime sessions take (torch's, as its peers)
    done = subprocess.run([sys.executable, "-c", CHILD, contender, path, str(seconds), str(calls), str(onnx_threads())],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"{contender} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def medians(runs: list[dict]) -> dict:
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def write_checkpoint(name: str, path: str) -> None:
    """A Hugging Face checkpoint dir at real size, random weights (Whisper: a CTranslate2 copy beside)."""
    import transformers

    if name.startswith("whisper"):
        dims = {"whisper-base": (512, 6, 8, 2048, 80), "whisper-large-v3": (1280, 32, 20, 5120, 128)}[name]
        d, layers, heads, ffn, mels = dims
        config = transformers.WhisperConfig(d_model=d, encoder_layers=layers, encoder_attention_heads=heads,
                                            encoder_ffn_dim=ffn, num_mel_bins=mels, decoder_layers=1,
                                            decoder_attention_heads=heads, decoder_ffn_dim=ffn)
        transformers.WhisperModel(config).save_pretrained(path)  # a one-layer decoder: the encoder's the cost
        transformers.WhisperFeatureExtractor(feature_size=mels).save_pretrained(path)
        import ctranslate2

        with tempfile.TemporaryDirectory() as generation:  # the converter takes the whole task model
            transformers.WhisperForConditionalGeneration.from_pretrained(path).save_pretrained(generation)
            transformers.WhisperFeatureExtractor(feature_size=mels).save_pretrained(generation)
            ctranslate2.converters.TransformersConverter(generation).convert(path + "-ct2", force=True)
    else:
        transformers.Wav2Vec2Model(transformers.Wav2Vec2Config()).save_pretrained(path)
        transformers.Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--whisper-large", action="store_true", help="whisper-large-v3 instead of the base models")
    parser.add_argument("--calls", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.calls < 2:
        parser.error("--calls must be at least 2 (the first call is timed apart)")
    sys.path.insert(0, HERE)
    import torch

    from audioenc.backends.onnx import onnx_threads
    from common import machine, versions, write_section

    cases = [("whisper-large-v3", 30.0)] if args.whisper_large else [("wav2vec2-base", 10.0), ("whisper-base", 30.0)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, seconds in cases:
            path, cache = os.path.join(tmp, name), os.path.join(tmp, "cache")
            write_checkpoint(name, path)
            contenders = ["transformers", "audioenc torch float32", "audioenc onnx float32", "audioenc onnx int8"]
            if name.startswith("whisper"):
                contenders[1:1] = ["ctranslate2 float32", "ctranslate2 int8"]
            first = measure("audioenc onnx float32", path, seconds, args.calls, os.path.join(tmp, "empty-cache"))
            measure("audioenc onnx int8", path, seconds, 2, cache)  # fills the cache, as a deployment's first run
            measure("audioenc onnx float32", path, seconds, 2, cache)
            runs = {c: [] for c in contenders}
            for _ in range(args.rounds):
                for contender in contenders:
                    runs[contender].append(measure(contender, path, seconds, args.calls, cache))
            results = {c: medians(r) for c, r in runs.items()}
            results["audioenc onnx float32, first use (exports its graph)"] = first
            base = results["transformers"]
            for contender, r in results.items():
                rows.append(f"| {name} {seconds:g} s | {contender} | {r['rss_mb']:.0f} | {r['rss_mb'] / base['rss_mb']:.2f}x "
                            f"| {r['peak_mb']:.0f} | {r['peak_mb'] / base['peak_mb']:.2f}x | {r['first_s']:.2f} "
                            f"| {base['first_s'] / r['first_s']:.2f}x | {r['call_s']:.2f} |")
            print("\n".join(rows[-len(results):]), flush=True)
    command = " ".join(["python benchmarks/bench_memory.py", *(a for a in sys.argv[1:] if a != "--no-write")])
    body = (f"`{command}` — {METHOD.format(rounds=args.rounds)}\n\n"
            f"Machine: {machine()}, torch threads {torch.get_num_threads()}, onnxruntime and CTranslate2 intra-op "
            f"threads {onnx_threads()}.  \nVersions: {versions('audioenc', 'torch', 'onnxruntime', 'transformers', 'ctranslate2', 'faster_whisper')}.\n\n"
            "| case | engine | resident after the calls (MB) | vs transformers | peak (MB) | vs transformers "
            "| first output (s) | speed-up vs transformers | a later call (s) |\n"
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n" + "\n".join(rows))
    print(body)
    if not args.no_write:
        write_section("Memory (CPU)" + (", whisper-large-v3" if args.whisper_large else ""), body)


if __name__ == "__main__":
    main()
