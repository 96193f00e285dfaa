"""Frontends: the wav2vec2-family waveform normalisation and Whisper's log-mel spectrogram.

The functions ending in ``_ref`` are the plain numpy/torch references that the native core
(audioenc._C) is tested against; the public functions call the native core when it is built.
"""
from __future__ import annotations

import math
import warnings
from functools import lru_cache

import numpy as np
import torch

from audioenc._native import _C
from audioenc.config import SAMPLE_RATE

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
    """int16 / int32 PCM (either byte order) scaled by 2^-15 / 2^-31; float PCM cast to float32."""
    if x.dtype.type == np.int16:
        return x.astype(np.float32) / 32768.0
    if x.dtype.type == np.int32:
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
    weights = weights.astype(np.float32)
    weights.setflags(write=False)  # cached and shared: no caller may change it
    return weights


@lru_cache(maxsize=None)
def _mel_filters_on(n_mels: int, device: torch.device) -> torch.Tensor:
    """mel_filters as a tensor on device, copied there once (each copy to a GPU waits for it); a
    normal tensor even if made under inference mode, so later calls under autograd can use it."""
    with torch.inference_mode(False):
        return torch.from_numpy(mel_filters(n_mels).copy()).to(device)


def _stft_power(audio: torch.Tensor, padding: int) -> torch.Tensor:
    if padding > 0:
        audio = torch.nn.functional.pad(audio, (0, padding))
    if audio.shape[-1] <= N_FFT // 2:
        raise ValueError(f"log-mel needs more than {N_FFT // 2} samples (reflect padding), got {audio.shape[-1]}")
    window = torch.hann_window(N_FFT, dtype=audio.dtype, device=audio.device)  # not the default dtype
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    return stft[..., :-1].abs() ** 2


def power_spectrogram_ref(audio: torch.Tensor, padding: int = 0) -> torch.Tensor:
    """|STFT|^2 as openai-whisper computes it: (..., samples) -> (..., 201, frames)."""
    return _stft_power(torch.as_tensor(audio, dtype=torch.float32), padding)


def log_mel_spectrogram_ref(audio: torch.Tensor, n_mels: int = 80, padding: int = 0,
                            normalize: bool = True) -> torch.Tensor:
    """openai-whisper's log_mel_spectrogram: (..., samples) float32 -> (..., n_mels, frames).

    Centred STFT with reflect padding (needs more than n_fft // 2 samples after ``padding`` zeros
    are appended), periodic Hann, |X|^2 without the last frame, Slaney mel, log10 clamp at 1e-10,
    floor at max - 8 per item, then (x + 4) / 4 (``normalize=False`` stops after the log10).
    """
    power = _stft_power(torch.as_tensor(audio, dtype=torch.float32), padding)
    log_spec = torch.clamp(_mel_filters_on(n_mels, power.device) @ power, min=1e-10).log10()
    if not normalize:
        return log_spec
    peak = log_spec.amax(dim=(-2, -1), keepdim=True)
    log_spec = torch.maximum(log_spec, peak - 8.0)
    return (log_spec + 4.0) / 4.0


# ------------------------------------------------------------------ Whisper: public log-mel entry

_SUPPORTED = (torch.float32, torch.float64, torch.int16)
_NUMPY = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64, np.dtype(np.int16): torch.int16}
CUDA_MAX_GRID_Y = 65535
_cuda_tables: dict = {}
_cuda_kernel_failed: set = set()  # devices where the native kernel cannot run (e.g. no binary for the GPU)


def log_mel_spectrogram(audio, n_mels: int = 80, sample_rate: int = SAMPLE_RATE, padding: int = 0,
                        device=None, threads: int | None = None, normalize: bool = True):
    """Whisper's log-mel spectrogram, one fused native pass (CPU threads or CUDA kernels).

    audio: (samples,) or (batch, samples) numpy array or torch tensor of float32, float64 or int16
      (int16 scaled by 1/32768), or a list of 1-D arrays of different lengths.
    padding: zeros appended to every item before the STFT (openai-whisper's ``padding``).
    Returns float32 (..., n_mels, frames), frames = (samples + padding) // 160, on ``device``
    (None: the input's device; numpy input: CPU). A list gives a list of (n_mels, frames_i) tensors,
    each computed on its own samples only (views into one padded buffer).
    normalize=True: openai-whisper's output, except that the max - 8 floor uses each item's own
    max (openai-whisper takes the max over the whole batch). normalize=False: log10 of the mel
    power clamped at 1e-10.
    threads: CPU threads (None: all cores; short inputs use fewer).
    Raises ValueError for sample_rate != 16000 (resample first), items of 200 samples or fewer
    after padding (reflect padding needs at least 201), NaN/Inf, or 3-D input; TypeError for
    other sample types. CUDA tensors use the CUDA kernels when they were compiled and can run on
    that GPU, else log_mel_spectrogram_ref on that device; CPU uses audioenc._C, else the torch
    reference.
    """
    return _spectrogram(audio, "normalized" if normalize else "log", n_mels, sample_rate, padding,
                        device, threads)


def power_spectrogram(audio, sample_rate: int = SAMPLE_RATE, padding: int = 0, device=None,
                      threads: int | None = None):
    """|STFT|^2 of Whisper's frontend, (..., 201, frames); same inputs and rules as
    :func:`log_mel_spectrogram`."""
    return _spectrogram(audio, "power", 0, sample_rate, padding, device, threads)


def window_log_mel(items: list[np.ndarray], window: int, n_mels: int, device) -> torch.Tensor:
    """log_mel_spectrogram of each item zero-padded to ``window`` samples (Whisper's 30 s input):
    (len(items), n_mels, window // 160) on ``device``. Only the frames that see audio and one frame of
    zeros after them are computed; the other frames read only zeros, so they equal that one bit for
    bit (a zero frame is the 1e-10 clamp, which never sets an item's max). A 1 s item thus costs
    0.13 ms instead of the whole window's 0.68 ms (2 CPU cores, idle; 8 ms when they were busy)."""
    longest = max(len(w) for w in items)
    # a frame reads N_FFT // 2 samples either side of its centre: the last one computed reads only zeros
    computed = min(window, -(-(longest + N_FFT) // HOP_LENGTH) * HOP_LENGTH)
    batch = np.zeros((len(items), computed), dtype=np.float32)
    for row, w in zip(batch, items):
        row[: len(w)] = pcm_to_float32(w)
    head = log_mel_spectrogram(torch.from_numpy(batch).to(device), n_mels)
    if computed == window:
        return head
    mel = head.new_empty(len(items), n_mels, window // HOP_LENGTH)
    mel[..., : head.shape[-1]] = head
    mel[..., head.shape[-1] :] = head[..., -1:]
    return mel


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        if x.dtype not in _SUPPORTED:
            raise TypeError(f"unsupported sample type {x.dtype}; expected float32, float64 or int16")
        return x
    x = np.asarray(x)
    if not x.dtype.isnative:  # big-endian samples (e.g. read from an AIFF or AU file): the same values
        x = x.astype(x.dtype.newbyteorder("="))
    if x.dtype not in _NUMPY:
        raise TypeError(f"unsupported sample type {x.dtype}; expected float32, float64 or int16")
    return torch.from_numpy(np.ascontiguousarray(x))


def _spectrogram(audio, kind, n_mels, sample_rate, padding, device, threads):
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"the Whisper frontend takes {SAMPLE_RATE} Hz audio, got sample_rate={sample_rate}; "
                         "resample first")
    padding = int(padding)
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if kind != "power" and n_mels <= 0:
        raise ValueError(f"n_mels must be positive, got {n_mels}")
    is_list = isinstance(audio, (list, tuple))
    if is_list:
        items = [_as_tensor(a) for a in audio]
        if not items:
            raise ValueError("empty list of audio items")
        if any(a.ndim != 1 for a in items):
            raise ValueError("a list of audio items must hold 1-D arrays")
        if len({a.dtype for a in items}) > 1:  # one batch dtype: float32, int16 PCM scaled as the kernels do
            items = [a.float() / 32768.0 if a.dtype == torch.int16 else a.float() for a in items]
        lengths = [a.shape[0] for a in items]
        x = torch.zeros(len(items), max(lengths), dtype=items[0].dtype, device=items[0].device)
        for b, a in enumerate(items):
            x[b, : lengths[b]] = a.to(x.device)
    else:
        x = _as_tensor(audio)
        if x.ndim not in (1, 2):
            raise ValueError(f"audio must be 1-D (samples,) or 2-D (batch, samples), got shape {tuple(x.shape)}")
        lengths = [x.shape[-1]] * (x.shape[0] if x.ndim == 2 else 1)
    if not lengths:
        raise ValueError("empty batch")
    short = min(lengths) + padding
    if short <= N_FFT // 2:
        raise ValueError(f"log-mel needs at least {N_FFT // 2 + 1} samples per item after padding "
                         f"(reflect padding of n_fft // 2), got {short}")
    device = torch.device(device) if device is not None else x.device
    x2 = x.reshape(len(lengths), x.shape[-1]).to(device)  # not -1: empty items (all padding) are allowed
    filters = None if kind == "power" else mel_filters(n_mels)
    out = None
    if device.type == "cuda" and _C is not None and getattr(_C, "cuda_compiled", False) \
            and device not in _cuda_kernel_failed:
        try:
            out = _spectrogram_cuda(x2, lengths, kind, filters, padding)
        except torch.cuda.OutOfMemoryError:  # passing, not a kernel that cannot run here
            raise
        except RuntimeError as exc:  # CUDA errors; bad audio is a ValueError and goes on up
            _cuda_kernel_failed.add(device)
            warnings.warn(f"audioenc: the native CUDA log-mel cannot run on {device} ({exc}); using the torch "
                          "reference there", stacklevel=2)
    elif device.type == "cpu" and _C is not None:
        n_out = 201 if kind == "power" else n_mels
        out = torch.empty(x2.shape[0], n_out, (max(lengths) + padding) // HOP_LENGTH, dtype=torch.float32,
                          device="cpu")
        _C.log_mel_cpu(x2.detach().contiguous().numpy(), np.asarray(lengths, dtype=np.int64), out.numpy(), filters, padding,
                       kind, threads or 0)
    if out is None:
        out = _spectrogram_torch(x2, lengths, kind, n_mels, padding)
    if is_list:
        return [out[b, :, : (n + padding) // HOP_LENGTH] for b, n in enumerate(lengths)]
    return out if x.ndim == 2 else out[0]


def _check_finite(x: torch.Tensor) -> None:
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError("audio contains NaN or Inf")


def _spectrogram_torch(x, lengths, kind, n_mels, padding):
    _check_finite(x)
    x = x.float() / 32768.0 if x.dtype == torch.int16 else x.float()
    rows = []
    for b, n in enumerate(lengths):
        if kind == "power":
            rows.append(power_spectrogram_ref(x[b, :n], padding))
        else:
            rows.append(log_mel_spectrogram_ref(x[b, :n], n_mels, padding, normalize=kind == "normalized"))
    frames = max(r.shape[-1] for r in rows)
    return torch.stack([torch.nn.functional.pad(r, (0, frames - r.shape[-1])) for r in rows])


def _spectrogram_cuda(x, lengths, kind, filters, padding):
    _check_finite(x)
    if x.dtype == torch.float64:
        x = x.float()
    x = x.contiguous()
    dev = x.device
    key = (dev, None if filters is None else filters.shape[0])
    if key not in _cuda_tables:
        _cuda_tables[key] = torch.from_numpy(_C.mel_cuda_tables(filters)).to(dev)
    tables = _cuda_tables[key]
    batch = x.shape[0]
    frames = (max(lengths) + padding) // HOP_LENGTH
    n_out = 201 if filters is None else filters.shape[0]
    lens = torch.tensor(lengths, dtype=torch.int64, device="cpu").to(dev, non_blocking=False)
    out = torch.zeros(batch, n_out, frames, dtype=torch.float32, device=dev)  # the kernel writes float32
    item_max = torch.empty(batch, dtype=torch.float32, device=dev)
    stream = torch.cuda.current_stream(dev).cuda_stream
    for b in range(0, batch, CUDA_MAX_GRID_Y):  # items are the grid's y dimension
        n = min(CUDA_MAX_GRID_Y, batch - b)
        _C.log_mel_cuda(x[b].data_ptr(), 1 if x.dtype == torch.int16 else 0, x.shape[1], lens[b].data_ptr(), n,
                        frames, padding, tables.data_ptr(), tables.numel(), n_out if filters is not None else 0,
                        {"power": 0, "log": 1, "normalized": 2}[kind], out[b].data_ptr(), frames,
                        item_max[b].data_ptr(), dev.index if dev.index is not None else torch.cuda.current_device(),
                        stream)
    if not bool(torch.isfinite(out).all()):  # finite samples whose power passes float32's range
        raise ValueError("audio: its spectrogram overflows float32 (samples far outside [-1, 1])")
    return out
