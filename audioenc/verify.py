"""``audioenc verify``: a backend against the float32 torch reference, layer by layer.

Rules (DESIGN.md, Verification): a float32 path passes within 1e-4 relative error
(||out - ref|| / ||ref||) on every layer; a half-precision path passes when every layer's error is
at most 2x the error of the plain torch model run in that same half precision; an int8 path passes
when every layer's mean per-frame cosine similarity is at least 0.995. NaN never passes. Only each
item's valid frames are compared. The torch backend in half precision is the half rule's yardstick:
its errors are reported, and only NaN or Inf fails it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

FLOAT32_TOL = 1e-4
HALF_FACTOR = 2.0
INT8_MIN_COSINE = 0.995
HALF_DTYPES = ("float16", "bfloat16")


@dataclass
class LayerCheck:
    name: str
    max_abs: float
    rel: float
    cosine: float
    standardized_cosine: float
    limit: str        # the rule this layer was held to, for the table
    passed: bool


@dataclass
class Report:
    backend: str
    dtype: str
    layers: list[LayerCheck] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # facts worth printing (fused ops, inputs)

    @property
    def passed(self) -> bool:
        return bool(self.layers) and all(layer.passed for layer in self.layers)

    def table(self) -> str:
        lines = [f"backend {self.backend}, dtype {self.dtype} vs torch float32 reference", *self.extra,
                 f"{'layer':>18s} {'max abs err':>12s} {'rel err':>10s} {'mean cos':>10s} {'std cos':>10s}  "
                 f"{'rule':<22s} result"]
        for c in self.layers:
            lines.append(f"{c.name:>18s} {c.max_abs:12.3e} {c.rel:10.3e} {c.cosine:10.6f} {c.standardized_cosine:10.6f}"
                         f"  {c.limit:<22s} {'ok' if c.passed else 'FAIL'}")
        lines.append("PASS" if self.passed else "FAIL")
        return "\n".join(lines)


def speech_like(num_samples: int, rng: np.random.Generator) -> np.ndarray:
    """Voiced syllables (harmonics of a moving pitch) between pauses, over faint noise: speech's
    range of loudness (pauses 40 dB down), which a per-call int8 activation scale must resolve
    too. Never zeros, fresh per generator."""
    t = np.arange(num_samples) / 16000
    f0 = rng.uniform(90, 220) + 40 * np.sin(2 * np.pi * rng.uniform(0.3, 1.5) * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(f0) / 16000
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    gate = np.zeros(num_samples)
    start = int(rng.uniform(0, 0.2) * 16000)
    while start < num_samples:
        syllable = int(rng.uniform(0.08, 0.35) * 16000)
        gate[start:start + syllable] = np.hanning(syllable)[: num_samples - start]
        start += syllable + int(rng.uniform(0.03, 0.5) * 16000)
    return (0.1 * gate * voiced + 0.001 * rng.standard_normal(num_samples)).astype(np.float32)


def generated_audio(family: str, seed: int | None = None) -> list[np.ndarray]:
    """A padded batch of fresh random speech-like items of different lengths (the shortest valid
    input among them for the wav2vec2 family)."""
    rng = np.random.default_rng(seed)
    seconds = (4.0, 31.5) if family == "whisper" else (2.0, 0.025, 3.3)
    return [speech_like(int(s * 16000), rng) for s in seconds]


def layer_errors(ours: torch.Tensor, ref: torch.Tensor,
                 lengths: torch.Tensor) -> tuple[float, float, float, float]:
    """(max abs error, relative error, mean per-frame cosine, standardised cosine) over each item's
    valid frames. The standardised cosine is the mean per-frame cosine after each channel is
    standardised by the reference's mean and std over the frames: where a few channels are far larger
    than the rest (trained encoders carry such outlier channels), they dominate the plain cosine and
    hide damage to all the others, such as int8 can do."""
    a = torch.cat([ours[i, :n] for i, n in enumerate(lengths.tolist())]).double()
    b = torch.cat([ref[i, :n] for i, n in enumerate(lengths.tolist())]).double()
    diff = a - b
    rel = float(diff.norm() / b.norm()) if b.norm() > 0 else float(diff.norm())
    cosine = float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())
    standardized = math.nan  # one frame has no spread to standardise by
    if len(b) > 1:
        mean, std = b.mean(0), b.std(0)
        std = std.clamp(min=1e-3 * float(std.median()) or 1.0)  # a (nearly) constant channel: not a huge weight
        standardized = float(torch.nn.functional.cosine_similarity((a - mean) / std, (b - mean) / std, dim=-1).mean())
    return float(diff.abs().max()), rel, cosine, standardized


def layer_names(num_hidden: int) -> list[str]:
    return ["embeddings", *(f"layer {i}" for i in range(1, num_hidden)), "last_hidden_state", "plain encode()"]


def outputs_of(enc, audio) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Every layer's hidden states, then the output of a call that asks for none (on the onnx backend,
    another graph)."""
    out = enc.encode(audio, output_hidden_states=True)
    return [*out.hidden_states, out.last_hidden_state, enc.encode(audio).last_hidden_state], out.lengths


VERIFY_MAX_ITEM_S = 600


def whole_items(audio, encoders) -> list:
    """The audio decoded, with the encoders set to take each item whole: verify compares every
    layer's hidden states, which items past long_audio_threshold_s (encoded in windows) do not have.
    Items over VERIFY_MAX_ITEM_S are refused (attention memory grows with the square of the length)."""
    from audioenc.audio import to_waveforms

    waves = to_waveforms(audio, min_samples=max(enc.min_samples for enc in encoders))
    longest = max(len(w) for w in waves) / 16000
    if longest > VERIFY_MAX_ITEM_S:
        raise ValueError(f"verify compares every layer of whole items, so it takes items of at most "
                         f"{VERIFY_MAX_ITEM_S} s; got one of {longest:.0f} s: give it a clip")
    for enc in encoders:
        enc.long_audio_threshold_s = max(enc.long_audio_threshold_s, longest)
    return waves


def verify(source, backend: str, dtype: str = "auto", device: str = "auto", audio=None,
           seed: int | None = None, preprocessor=None, target_lang: str | None = None) -> Report:
    """Runs ``backend`` and the torch float32 reference on ``audio`` (a path, array or list; fresh
    generated speech-like audio when None) and checks every layer against the rules above.
    ``source``, ``preprocessor`` and ``target_lang`` are as audioenc.load takes them (a model object too)."""
    import audioenc

    ref_enc = audioenc.load(source, backend="torch", device="cpu", dtype="float32", preprocessor=preprocessor,
                            target_lang=target_lang)
    enc = audioenc.load(source, backend=backend, device=device, dtype=dtype, preprocessor=preprocessor,
                        target_lang=target_lang)
    resolved = str(enc.backend.dtype).removeprefix("torch.")
    report = Report(enc.backend.name, resolved)
    if audio is None:
        audio = generated_audio(enc.family, seed)
        report.extra.append("input: generated speech-like audio, items of "
                            + ", ".join(f"{len(a) / 16000:g} s" for a in audio))
    audio = whole_items(audio, (ref_enc, enc))
    counts = getattr(enc.backend, "fused_op_counts", None)
    if counts is not None:
        report.extra.append("fused ops: " + ", ".join(f"{k} {v}" for k, v in counts().items() if v))
    ref, lengths = outputs_of(ref_enc, audio)
    ours, our_lengths = outputs_of(enc, audio)
    if not torch.equal(lengths, our_lengths):
        raise ValueError(f"the backend returned valid frame counts {our_lengths.tolist()}, the reference {lengths.tolist()}")
    half_ref = None
    yardstick = resolved in HALF_DTYPES and enc.backend.name == "torch"  # the budget would be itself
    if resolved in HALF_DTYPES and not yardstick:  # the error budget: the plain torch model in that precision
        half_enc = audioenc.load(source, backend="torch", device=enc.backend.device, dtype=resolved,
                                 preprocessor=preprocessor, target_lang=target_lang)
        half_enc.long_audio_threshold_s = enc.long_audio_threshold_s
        half_ref, _ = outputs_of(half_enc, audio)
    for i, (name, mine, want) in enumerate(zip(layer_names(len(ref) - 2), ours, ref)):
        max_abs, rel, cosine, standardized = layer_errors(mine.float().cpu(), want, lengths)
        if yardstick:  # reported, with NaN the only failure
            limit, passed = "none (half yardstick)", True
        elif half_ref is not None:
            budget = HALF_FACTOR * layer_errors(half_ref[i].float().cpu(), want, lengths)[1]
            limit, passed = f"rel <= {budget:.2e} (2x torch)", rel <= budget
        elif resolved == "int8":
            limit, passed = f"cos >= {INT8_MIN_COSINE}", cosine >= INT8_MIN_COSINE
        else:
            limit, passed = f"rel <= {FLOAT32_TOL:g}", rel <= FLOAT32_TOL
        finite = all(math.isfinite(v) for v in (max_abs, rel, cosine)) and bool(torch.isfinite(mine).all())
        report.layers.append(LayerCheck(name, max_abs, rel, cosine, standardized, limit, passed and finite))
    return report
