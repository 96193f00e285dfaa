"""Streaming chunker: PCM blocks of any size in, windows of ``left + chunk + right`` samples out.

Window i has its centre at stream positions [i * chunk, (i + 1) * chunk) and starts at
``i * chunk - left``. Context that does not exist (before position 0, after the end of a finished
stream) is zero-filled and reported through ``valid_left`` / ``valid_right``; the last window's
centre may be short (``valid_centre < chunk``). Concatenating every window's ``centre`` gives the
input back exactly.

:class:`Chunker` wraps the native ring buffer (csrc/stream/chunker.h) when audioenc._C is built and
:class:`_PyChunker` otherwise; _PyChunker is also the reference the tests hold the native one to.
One producer thread (accept_waveform / input_finished) and one consumer thread (ready / pop) may
use a native Chunker at once.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

from audioenc._native import _C
from audioenc.frontend import pcm_to_float32


@dataclass(frozen=True)
class Window:
    index: int
    start: int            # stream position of samples[0]; negative for the first windows
    samples: np.ndarray   # float32, left + chunk + right samples, zeros where nothing exists
    valid_left: int       # context samples before the centre that exist
    valid_centre: int     # chunk, or fewer for the last window
    valid_right: int      # context samples after the centre that exist
    left: int             # the chunker's left context: the centre starts at samples[left]

    @property
    def centre(self) -> np.ndarray:
        return self.samples[self.left : self.left + self.valid_centre]


MAX_SAMPLES = 2**31  # ring buffer and window bound (37 hours at 16 kHz): 8 GB of float32 already


def _check(chunk: int, left: int, right: int, capacity: int) -> int:
    for name, value in (("chunk", chunk), ("left", left), ("right", right), ("capacity", capacity)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name} must be a whole number of samples, got {value!r}")
        if value > MAX_SAMPLES:
            raise ValueError(f"{name} can be at most {MAX_SAMPLES} samples, got {value}")
    if chunk <= 0:
        raise ValueError(f"chunk must be > 0, got {chunk}")
    if left < 0 or right < 0:
        raise ValueError(f"left and right context must be >= 0, got {left} and {right}")
    window = left + chunk + right
    if capacity == 0:
        return 2 * window
    if capacity < window:
        raise ValueError(f"capacity {capacity} is smaller than one window (left + chunk + right = {window})")
    return capacity


class _PyChunker:
    """Pure-Python chunker with the native one's semantics, capacity included."""

    def __init__(self, chunk: int, left: int = 0, right: int = 0, capacity: int = 0):
        self.capacity = _check(chunk, left, right, capacity)
        self.chunk, self.left, self.right = chunk, left, right
        self.window_size = left + chunk + right
        self.reset()

    def reset(self) -> None:
        self._buf = np.zeros(0, np.float32)  # stream samples [begin, received)
        self._begin = 0
        self._next = 0
        self.finished = False

    @property
    def received(self) -> int:
        return self._begin + len(self._buf)

    def accept_waveform(self, samples: np.ndarray) -> int:
        if self.finished:
            raise RuntimeError("accept_waveform after input_finished; call reset() first")
        take = max(0, min(len(samples), self.capacity - len(self._buf)))
        self._buf = np.concatenate([self._buf, np.asarray(samples[:take], np.float32)])
        return take

    def input_finished(self) -> None:
        self.finished = True

    def ready(self) -> bool:
        centre = self._next * self.chunk
        if self.finished:
            return centre < self.received
        return self.received >= centre + self.chunk + self.right

    def pop(self):
        if not self.ready():
            return None
        centre = self._next * self.chunk
        start = centre - self.left
        lo, hi = max(0, start), min(self.received, start + self.window_size)
        out = np.zeros(self.window_size, np.float32)
        out[lo - start : hi - start] = self._buf[lo - self._begin : hi - self._begin]
        info = (self._next, start, out, centre - lo, min(self.chunk, self.received - centre),
                max(0, hi - centre - self.chunk))
        self._next += 1
        drop = min(max(0, self._next * self.chunk - self.left - self._begin), len(self._buf))
        self._buf = self._buf[drop:]
        self._begin += drop
        return info


_BLOCK_TYPES = (np.float32, np.float64, np.int16, np.int32)


def _block(samples) -> np.ndarray:
    """A block as contiguous 1-D float32; other sample types (uint8, bool, complex, ...) would be taken
    unscaled or lose their imaginary part, so they are refused."""
    x = np.asarray(samples)
    if x.dtype.type not in _BLOCK_TYPES:
        raise TypeError(f"unsupported sample type {x.dtype}; expected float32, float64, int16 or int32")
    x = pcm_to_float32(x)
    if x.ndim != 1:
        raise ValueError(f"blocks must be 1-D, got shape {x.shape}")
    return np.ascontiguousarray(x)


class Chunker:
    """Windows with context over a stream; see the module docstring for the window layout.

    ``push(block)`` takes a whole block of any size and returns the windows that became ready;
    ``flush()`` ends the stream and returns the rest (calling it again returns nothing).
    The low-level calls (accept_waveform, input_finished, ready, pop) suit a producer and a
    consumer thread. capacity: samples the ring holds (0: two windows; at least one window).
    Bad parameters raise ValueError (TypeError when not whole numbers of samples). Blocks may be
    float32/float64/int16/int32 (int16 scaled by 1/32768, int32 by 1/2^31); other types raise TypeError.
    """

    def __init__(self, chunk: int, left: int = 0, right: int = 0, capacity: int = 0,
                 native: bool | None = None):
        _check(chunk, left, right, capacity)
        chunk, left, right, capacity = int(chunk), int(left), int(right), int(capacity)  # numpy ints too
        if native is None:
            native = _C is not None
        if native and _C is None:
            raise RuntimeError("audioenc._C is not built")
        self._impl = _C.Chunker(chunk, left, right, capacity) if native else _PyChunker(chunk, left, right, capacity)

    chunk = property(lambda self: self._impl.chunk)
    left = property(lambda self: self._impl.left)
    right = property(lambda self: self._impl.right)
    capacity = property(lambda self: self._impl.capacity)
    window_size = property(lambda self: self._impl.window_size)
    received = property(lambda self: self._impl.received)

    def accept_waveform(self, samples) -> int:
        """Takes as many samples as fit and returns how many (pop windows to make room)."""
        return self._impl.accept_waveform(_block(samples))

    def input_finished(self) -> None:
        self._impl.input_finished()

    def ready(self) -> bool:
        return self._impl.ready()

    def pop(self) -> Window | None:
        info = self._impl.pop()
        if info is None:
            return None
        index, start, samples, vl, vc, vr = info
        return Window(index, start, samples, vl, vc, vr, self.left)

    def reset(self) -> None:
        self._impl.reset()

    def push(self, block) -> list[Window]:
        x = _block(block)
        windows, done = [], 0
        while True:
            done += self._impl.accept_waveform(x[done:])
            while (w := self.pop()) is not None:
                windows.append(w)
            if done == len(x):
                return windows

    def flush(self) -> list[Window]:
        self._impl.input_finished()
        windows = []
        while (w := self.pop()) is not None:
            windows.append(w)
        return windows
