"""Real speech for benchmarks: espeak-ng (Debian's espeak-ng package) reading sentences, 16 kHz."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import numpy as np

SENTENCES = [
    "The quick brown fox jumps over the lazy dog while the farmer watches from the gate.",
    "Streaming speech recognition needs low latency and stable frame embeddings.",
    "On Monday morning the train to the coast was delayed by almost forty minutes.",
    "Please remember to bring the blue folder, two pencils and the signed permission slip.",
    "Audio encoders turn raw waveforms into sequences of vectors, fifty every second.",
    "She sells sea shells by the sea shore, and the shells she sells are surely sea shells.",
    "A large language model listened to the meeting and wrote a short summary afterwards.",
    "If the weather is fine tomorrow, we will walk along the river to the old stone bridge.",
]


def espeak_speech(seconds: float, seed: int = 0) -> np.ndarray:
    """About ``seconds`` of synthetic speech with varied voices and speeds, float32 at 16 kHz."""
    import soundfile as sf
    import soxr

    if shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    rng = np.random.default_rng(seed)
    pieces, total = [], 0
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "s.wav")
        while total < seconds * 16000:
            text = SENTENCES[int(rng.integers(len(SENTENCES)))]
            voice = ["en", "en-us", "en-gb-x-rp", "en+f3", "en+m3"][int(rng.integers(5))]
            speed = int(rng.integers(130, 190))
            subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", path, text], check=True)
            audio, rate = sf.read(path, dtype="float32")
            audio = soxr.resample(audio, rate, 16000)
            pause = np.zeros(int(rng.integers(1600, 8000)), np.float32)
            pieces += [audio, pause]
            total += len(audio) + len(pause)
    speech = np.concatenate(pieces)[: int(seconds * 16000)]
    return (speech + 1e-3 * rng.standard_normal(len(speech))).astype(np.float32)
