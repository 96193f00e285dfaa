"""Frontends: the wav2vec2-family waveform normalisation and Whisper's log-mel spectrogram.

The functions ending in ``_ref`` are the plain numpy/torch references that the native core
(audioenc._C) is tested against; the public functions call the native core when it is built.
"""
from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

from audioenc._native import _C

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160


# ---------------------------------------------------------------- wav2vec2 family: waveform path

def normalize_waveforms_ref(waveforms: np.ndarray, lengths: np.ndarray, normalize: bool = True,
                            eps: float = 1e-7) -> np.ndarray:
    """PCM (B, T) -> float32 (B, T): int PCM scaled to [-1, 1), each row normalised over its own
    first ``lengths[b]`` samples exactly as Wav2Vec2FeatureExtractor does; padding set to 0."""
    x = pcm_to_float32(waveforms)
    out = np.zeros_like(x)
    for b, n in enumerate(lengths):
        row = x[b, :n]
        if normalize and n > 0:
            row = (row - row.mean()) / np.sqrt(row.var() + eps)
        out[b, :n] = row
    return out


def normalize_waveforms(waveforms: np.ndarray, lengths: np.ndarray, normalize: bool = True,
                        eps: float = 1e-7) -> np.ndarray:
    """Same result as :func:`normalize_waveforms_ref`, in one native pass when _C is built."""
    lengths = np.ascontiguousarray(lengths, dtype=np.int64)
    if _C is None:
        return normalize_waveforms_ref(waveforms, lengths, normalize, eps)
    return _C.normalize_waveforms(np.ascontiguousarray(waveforms), lengths, normalize, eps)


def pcm_to_float32(x: np.ndarray) -> np.ndarray:
    """int16 / int32 PCM scaled by 2^-15 / 2^-31; float PCM cast to float32."""
    if x.dtype == np.int16:
        return x.astype(np.float32) / 32768.0
    if x.dtype == np.int32:
        return (x.astype(np.float64) / 2147483648.0).astype(np.float32)
    return x.astype(np.float32, copy=False)


# ---------------------------------------------------------------------------- Whisper: log-mel

def hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above (librosa's htk=False)."""
    freq = np.asarray(freq, dtype=np.float64)
    f_sp = 200.0 / 3
    mels = freq / f_sp
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(freq >= min_log_hz, min_log_mel + np.log(np.maximum(freq, 1e-10) / min_log_hz) / logstep, mels)


def mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    f_sp = 200.0 / 3
    min_log_hz = 1000.0
    min_log_mel = min_log_hz / f_sp
    logstep = math.log(6.4) / 27.0
    return np.where(mels >= min_log_mel, min_log_hz * np.exp(logstep * (mels - min_log_mel)), f_sp * mels)


@lru_cache(maxsize=None)
def mel_filters(n_mels: int, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Slaney-normalised triangular mel filterbank (n_mels, n_fft // 2 + 1), 0 Hz to Nyquist,
    float32; the same matrix as librosa.filters.mel(sr, n_fft, n_mels) that Whisper ships."""
    fft_freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    mel_pts = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))
    fdiff = np.diff(mel_pts)
    ramps = mel_pts[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper))
    weights *= (2.0 / (mel_pts[2 : n_mels + 2] - mel_pts[:n_mels]))[:, None]
    weights.setflags(write=False)
    return weights.astype(np.float32)


def log_mel_spectrogram_ref(audio: torch.Tensor, n_mels: int = 80, padding: int = 0) -> torch.Tensor:
    """openai-whisper's log_mel_spectrogram: (..., samples) float32 -> (..., n_mels, frames).

    Centred STFT with reflect padding (needs more than n_fft // 2 samples after ``padding`` zeros
    are appended), periodic Hann, |X|^2 without the last frame, Slaney mel, log10 clamp at 1e-10,
    floor at max - 8 per item, then (x + 4) / 4.
    """
    audio = torch.as_tensor(audio, dtype=torch.float32)
    if padding > 0:
        audio = torch.nn.functional.pad(audio, (0, padding))
    if audio.shape[-1] <= N_FFT // 2:
        raise ValueError(f"log-mel needs more than {N_FFT // 2} samples (reflect padding), got {audio.shape[-1]}")
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    filters = torch.from_numpy(mel_filters(n_mels)).to(audio.device)
    log_spec = torch.clamp(filters @ power, min=1e-10).log10()
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0
