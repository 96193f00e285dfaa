"""Streaming and long-audio encoding on the offline frame grid.

Audio is cut by the native chunker (audioenc.chunker) into windows of ``left + chunk + right``
samples; each window is encoded on its own and only the frames whose start lies in its centre are
kept, so every frame is produced exactly once and at the position it has offline: frame j starts at
sample hop * j, the model's hop (``AudioEncoder.frame_hop``: 320 samples, 20 ms, for Whisper and the
standard wav2vec2-family conv stack; 640 for a 25 Hz one such as slprl/mhubert-base-25hz). ``chunk``
and ``left`` are rounded to whole frames so window starts stay on that grid; the right context gets
the extra samples the conv stack needs to finish the centre's last frame (its receptive field less
one hop: 80 for the standard wav2vec2-family stack, 200 for Whisper's mel + conv stem).

Whisper's positions are absolute within its 30 s windows, and offline audio is encoded as
consecutive 30 s windows; so a Whisper stream never crosses a 30 s boundary: each window starts at
most ``left`` before its centre but not before the start of its 30 s block (the default left context
is all of it), and ends at the block's end at the latest. Each block is a stream of its own in the
chunker, so the block's last windows are final as soon as its 30 s are in. A window that starts
after its block's start is encoded behind silence up to its start, so that every frame keeps its
offline position. A Whisper call costs a full 30 s window whatever the audio, so the default, full
context is free.

Group-norm models, waveform normalisation, Whisper's per-window log-mel range and attention all see
only the window, so streamed frames differ from offline ones; benchmarks/bench_streaming.py measures
how much against context length, and the defaults below come from that measurement.
"""
from __future__ import annotations

import math
import numbers
import re
from collections import deque
from dataclasses import dataclass, replace

import numpy as np
import torch

from audioenc.audio import MAX_CHANNELS, as_pcm_array, check_rate, finite_float32
from audioenc.chunker import Chunker, Window
from audioenc.config import SAMPLE_RATE
from audioenc.deferred_interrupt import InterruptSafeLock, interrupt_deferred
from audioenc.frontend import pcm_to_float32
from audioenc.progress import progress_bar

# Windows that arrive together (long audio) are encoded in batches of at most this much audio:
# enough to keep the encoder busy, small enough that the conv stack's activations stay ~1 GB.
SECONDS_PER_RUN = 48.0
# A window (left context + chunk + right context) is one encoder call on one item and sits whole
# in the chunker's ring buffer: past this, memory (attention over every frame) runs out first.
MAX_WINDOW_S = 600.0

# Defaults (seconds): chunk, left context, right context: the cheapest measured setting whose final
# layer reaches mean cosine >= 0.99 to offline (BENCHMARKS.md "Streaming and long audio").
STREAM_DEFAULTS = {
    "wav2vec2": (1.0, 2.0, 1.0),
    "hubert": (1.0, 2.0, 1.0),
    "wavlm": (1.0, 4.0, 4.0),
    "whisper": (1.0, 30.0, 0.1),  # left: everything since the start of the 30 s window
}
# Offline encode of longer audio goes through windows: threshold, chunk, left, right (seconds).
LONG_AUDIO_DEFAULTS = {
    "wav2vec2": (120.0, 30.0, 8.0, 8.0),
    "hubert": (120.0, 30.0, 8.0, 8.0),
    "wavlm": (120.0, 30.0, 8.0, 8.0),
    "whisper": (30.0, 30.0, 0.0, 0.0),
}


@dataclass
class StreamFrames:
    """Frames that became final: ``frames`` (n, dim) float32 on the CPU, ``times`` (n,) seconds
    at which each frame starts, ``first`` the index of frames[0] on the offline grid."""

    frames: torch.Tensor
    times: np.ndarray
    first: int

    def __len__(self) -> int:
        return self.frames.shape[0]


def conv_tail(encoder) -> int:
    """Samples past a frame's start that its features depend on, beyond one hop (none where the
    receptive field is shorter than the hop)."""
    return 200 if encoder.family == "whisper" else max(0, encoder.dims.receptive_field - encoder.frame_hop)


def seconds_to_frames(seconds: float, what: str, hop: int, minimum: int = 0) -> int:
    """Seconds -> whole frames of ``hop`` samples."""
    if not isinstance(seconds, numbers.Real) or isinstance(seconds, bool):
        raise TypeError(f"{what} must be a number of seconds, got {seconds!r}")
    seconds = round(float(seconds), 4)  # to 0.1 ms, finer than any frame: a float32 0.39 is 0.38999998...
    if not math.isfinite(seconds):
        raise ValueError(f"{what} must be a finite number of seconds, got {seconds}")
    if seconds < 0 and not minimum:
        raise ValueError(f"{what} must be >= 0 seconds, got {seconds}")
    # Halves up, as people round (0.05 s -> 3 frames), after rounding off binary noise (2.01 s is 100.4999... frames)
    n = math.floor(round(seconds * SAMPLE_RATE / hop, 6) + 0.5)
    if n < minimum:
        raise ValueError(f"{what} must be at least {minimum * hop / SAMPLE_RATE:g} s, got {seconds}")
    return n


class EncoderStream:
    """Live encoding: ``push(block)`` any number of samples at the source rate, get the frames
    that became final; ``flush()`` ends the stream and returns the rest. Create it with
    :meth:`audioenc.AudioEncoder.stream`. One stream serves one producer thread: pushes from several
    threads go in one at a time, in whichever order they come."""

    def __init__(self, encoder, sample_rate: float = SAMPLE_RATE, chunk_s: float | None = None,
                 left_context_s: float | None = None, right_context_s: float | None = None,
                 output_layer: int | None = None):
        defaults = STREAM_DEFAULTS[encoder.family]
        chunk_s = defaults[0] if chunk_s is None else chunk_s
        left_context_s = defaults[1] if left_context_s is None else left_context_s
        right_context_s = defaults[2] if right_context_s is None else right_context_s
        self.encoder = encoder
        self.sample_rate = check_rate(sample_rate)
        self.num_layers = encoder._layers_to_run(output_layer)  # fails now on a bad layer
        self.hop = encoder.frame_hop  # samples per frame: the grid that chunk and contexts keep to
        self.chunk = seconds_to_frames(chunk_s, "chunk_s", self.hop, minimum=1) * self.hop
        self.left = seconds_to_frames(left_context_s, "left_context_s", self.hop) * self.hop
        self.right = seconds_to_frames(right_context_s, "right_context_s", self.hop) * self.hop
        self.tail = conv_tail(encoder)
        # Whisper: windows stay inside their 30 s block (see the module docstring).
        self.block = encoder.dims.window_samples if encoder.family == "whisper" else None
        if self.block is not None:
            if self.block % self.chunk:
                raise ValueError(f"whisper streams need a chunk_s of whole 20 ms frames that divides "
                                 f"{self.block / SAMPLE_RATE:g} s (so no chunk straddles two 30 s windows), such as "
                                 f"0.5, 1, 1.5, 2 or 3; got {chunk_s:g} s, {self.chunk / SAMPLE_RATE:g} s on the frame grid")
            self.left = min(self.left, self.block - self.chunk)
            self.right = min(self.right, self.block - self.chunk)  # no context reaches past the block
        if self.left + self.chunk + self.right > MAX_WINDOW_S * SAMPLE_RATE:
            raise ValueError(f"a stream window (left_context_s + chunk_s + right_context_s) can be at most "
                             f"{MAX_WINDOW_S:g} s, got {left_context_s:g} + {chunk_s:g} + {right_context_s:g} s")
        longest = getattr(encoder.backend, "max_samples", None)  # a TensorRT profile's longest input
        if self.block is None and longest is not None and self.left + self.chunk + self.right + self.tail > longest:
            raise ValueError(f"a stream window (left_context_s + chunk_s + right_context_s + the conv stack's "
                             f"{self.tail / SAMPLE_RATE * 1000:g} ms) must fit the backend's longest input, "
                             f"{longest / SAMPLE_RATE:g} s; got {left_context_s:g} + {chunk_s:g} + {right_context_s:g} s")
        self.chunker = Chunker(self.chunk, self.left, self.right + self.tail)
        self.resampler = None
        if self.sample_rate != SAMPLE_RATE:
            import soxr

            self.resampler = soxr.ResampleStream(self.sample_rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")
        # Work moves through these in order, and each step is dropped only once the next holds its
        # result, Ctrl-C held back in between (interrupt_deferred): a push interrupted midway loses
        # nothing, the next push or flush goes on.
        self._unfed = np.zeros(0, np.float32)   # 16 kHz samples not yet in the chunker
        self._windows: deque[Window] = deque()  # windows taken from the chunker, not yet encoded
        self._block_start = 0  # Whisper: the stream position of the chunker's 0 (the current 30 s block)
        self._done: list[tuple[int, torch.Tensor]] = []  # (first frame, frames) not yet returned
        # Samples fed to the chunker at a time: about one encoder call's windows (a Whisper window
        # runs as its whole 30 s block), so one big push holds a bounded number of windows.
        window = self.block if self.block is not None else self.left + self.chunk + self.right + self.tail
        self._windows_per_run = max(1, int(SECONDS_PER_RUN * SAMPLE_RATE) // window)
        self._feed = self._windows_per_run * self.chunk
        self._input_ended = self._chunker_ended = self.finished = False
        self._failure: str | None = None  # why an earlier call failed for good
        self.lock = InterruptSafeLock()
        self.emitted = 0  # frames returned so far
        self.samples_taken = 0  # input samples taken, at the input's rate
        self.backend_output = False  # encode_long: frames as the backend returns them, like short items
        self.scale_warned = False  # float blocks past [-1, 1] (integer PCM cast to float) warned of

    @property
    def latency_s(self) -> float:
        """Audio a frame waits for at most before it is final: chunk + right context + the conv
        stack's tail (5 ms; Whisper 12.5 ms). At other rates than 16 kHz the resampler adds its
        own delay (soxr; measured 0.115 s at 8 kHz, 0.037 s at 48 kHz, 0.079 s at 192 kHz)."""
        return (self.chunk + self.right + self.tail) / SAMPLE_RATE

    def push(self, block) -> StreamFrames:
        """Takes a block of samples and returns the frames that became final. A block refused before it
        is taken (NaN/Inf, a wrong shape: ValueError; a wrong dtype: TypeError) leaves the stream unchanged;
        a push interrupted by Ctrl-C took all of its block or none of it: ``samples_taken`` tells which."""
        with self.lock:  # blocks pushed from several threads at once go in one after another
            with interrupt_deferred():
                self._check_usable()
                if self._input_ended:  # flush() began (it may have been interrupted: call it again)
                    raise RuntimeError("push after flush(); start a new stream")
                x = self._prepare(block)
                overflow = self._hold(x)
                self.samples_taken += len(x)
            self._advance(overflow)
            return self._take()

    def flush(self) -> StreamFrames:
        """Ends the stream and returns the remaining frames; later calls return no frames. An
        interrupted flush goes on where it stopped when called again. After a push failed for good,
        it returns the frames finished before the failure."""
        with self.lock:
            if self._failure is None and not self.finished:
                if not self._input_ended:
                    # Ended first: soxr takes its last call once, and an interrupted encode of the
                    # samples it gives back goes on in the _advance below when flush is called again
                    with interrupt_deferred():
                        self._input_ended = True
                        overflow = self._hold(np.zeros(0, np.float32), last=True) if self.resampler else None
                    self._advance(overflow)
                self._advance()
                if not self._chunker_ended:
                    with interrupt_deferred():
                        self._take_windows(self.chunker.flush())
                        self._chunker_ended = True
                self._advance()
            self.finished = True
            return self._take()

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise RuntimeError(f"this stream failed earlier ({self._failure}); flush() returns the frames "
                               "finished before that; start a new stream")

    def _fail(self, message: str):
        """Audio already inside the stream breaks it for good (its samples stay in every later
        window's context): later pushes are refused."""
        self._failure = message
        return ValueError(message)

    def _prepare(self, block) -> np.ndarray:
        x = as_pcm_array(block, "block", takes_paths=False)
        if x.dtype.kind == "f":
            x = finite_float32(x, "block")
            if not self.scale_warned:  # once: a live stream would repeat it every block
                self.scale_warned = self.encoder._warn_of_pcm_scale([x], "block")
        else:
            x = pcm_to_float32(x)
        if x.ndim == 2 and 1 <= x.shape[1] <= MAX_CHANNELS:  # interleaved PCM, as sound cards deliver it
            x = x.mean(axis=1, dtype=np.float32)
        elif x.ndim != 1:
            raise ValueError(f"block: expected 1-D samples or (samples, channels) with at most {MAX_CHANNELS} "
                             f"channels, got shape {tuple(x.shape)}")
        if not np.isfinite(x).all():  # the channels' mean of samples near float32's limit
            raise ValueError("block: the channels' mean overflows float32 (audio is expected within [-1, 1])")
        return np.ascontiguousarray(x)

    def _hold(self, x: np.ndarray, last: bool = False) -> str | None:
        """Adds a block's samples, resampled to 16 kHz, to those held for the chunker (a copy: x may be
        a view of the caller's buffer, which it may refill before the next push). Returns why the
        stream must fail once the samples before the problem are encoded, or None."""
        overflow = None
        if self.resampler is not None:
            x = self.resampler.resample_chunk(x, last=last)
            finite = np.isfinite(x)
            if not finite.all():  # finite audio near float32's limit, as encode checks too
                overflow = "block: resampling to 16 kHz overflows float32 (audio is expected within [-1, 1])"
                x = x[: int(np.argmin(finite))]  # the samples before it still make their frames
        self._unfed = np.concatenate([self._unfed, x])
        return overflow

    def _advance(self, overflow: str | None = None) -> None:
        """Feeds the held samples to the chunker and encodes the windows they complete, one
        encoder call's worth at a time; then fails the stream for ``overflow``, if given."""
        while True:
            if self._windows:
                self._encode_next_windows()
            elif len(self._unfed):
                with interrupt_deferred():  # the samples leave _unfed as their windows join _windows
                    take = self._feed if self.block is None else min(self._feed, self.block - self.chunker.received)
                    self._take_windows(self.chunker.push(self._unfed[:take]))
                    self._unfed = self._unfed[take:]
                    if self.block is not None and self.chunker.received == self.block:
                        # Whisper: its 30 s block is complete, and so are the block's windows, none of
                        # which reaches past it; the next block starts a new chunker stream.
                        self._take_windows(self.chunker.flush())
                        self.chunker.reset()
                        self._block_start += self.block
            else:
                break
        if overflow:
            raise self._fail(overflow)

    def _take_windows(self, windows: list[Window]) -> None:
        self._windows.extend(replace(w, start=w.start + self._block_start) for w in windows)

    def _encode_next_windows(self) -> None:
        kept, first = [], None
        group = [self._windows[i] for i in range(min(self._windows_per_run, len(self._windows)))]
        for w in group:
            # The existing samples of the window (inside its 30 s block for Whisper); keep the frames
            # that start in its centre (the last window of a stream may hold fewer: frames the
            # audio does not complete).
            centre = w.start + w.left
            begin, end = centre - w.valid_left, centre + w.valid_centre + w.valid_right
            silence = 0
            if self.block is not None:
                block_start = centre - centre % self.block
                end = min(end, block_start + self.block)
                silence = max(0, begin - block_start)  # before a left context that starts inside the block
                begin = max(begin, block_start)
            samples = w.samples[begin - w.start : end - w.start]
            if silence:  # the window at its place in the block keeps every frame's position
                samples, begin = np.concatenate([np.zeros(silence, np.float32), samples]), begin - silence
            if len(samples) >= self.encoder.min_samples:
                first = centre // self.hop if first is None else first
                offset = (centre - begin) // self.hop  # begin is on the frame grid
                kept.append((samples, offset, -(-w.valid_centre // self.hop), (begin, end)))
        if kept:
            try:
                encoded = self.encode_samples([samples for samples, *_ in kept])
            except ValueError as exc:
                # The encoder refuses what it was given (Whisper: finite samples whose spectrogram
                # overflows), which every retry of these windows would meet again. Its "audio item N"
                # is the Nth window here: named by where it is in the stream.
                message, item = str(exc), re.match(r"audio item (\d+): ", str(exc))
                if item and int(item[1]) < len(kept):
                    begin, end = kept[int(item[1])][3]
                    message = f"the stream's audio from {begin / SAMPLE_RATE:.2f} s to {end / SAMPLE_RATE:.2f} s: " \
                        + message[item.end():]
                raise self._fail(message) from exc
            pieces = [frames[offset : offset + count] for frames, (_, offset, count, _) in zip(encoded, kept)]
            # As encode: never NaN or Inf frames. The windows before an overflowing one keep theirs.
            finite = torch.stack([torch.isfinite(p).all() for p in pieces]).cpu()  # one wait on a GPU
            good = next((i for i, ok in enumerate(finite.tolist()) if not ok), len(pieces))
            if good < len(pieces):
                if good:
                    self._done.append((first, torch.cat(pieces[:good])))
                raise self._fail("the encoder's output for this audio holds NaN or Inf: the backend's arithmetic "
                                 "overflowed (audio is expected within [-1, 1])")
        with interrupt_deferred():  # the frames join _done as their windows leave
            if kept:
                self._done.append((first, torch.cat(pieces)))
            for _ in group:
                self._windows.popleft()

    def _take(self) -> StreamFrames:
        """The frames encoded and not yet returned. A Ctrl-C before the one-statement commit (no call in
        it, so Python raises no KeyboardInterrupt inside it) leaves them for the next call."""
        if not self._done:
            return StreamFrames(torch.zeros(0, self.encoder.hidden_size, dtype=torch.float32, device="cpu"),
                                np.zeros(0), self.emitted)
        first = self._done[0][0]  # consecutive: no window is dropped
        out = torch.cat([frames for _, frames in self._done]) if len(self._done) > 1 else self._done[0][1]
        frames = StreamFrames(out, (first + np.arange(len(out))) * self.hop / SAMPLE_RATE, first)
        self._done, self.emitted = [], first + len(out)
        return frames

    def encode_samples(self, windows: list[np.ndarray]) -> list[torch.Tensor]:
        """Windows at 16 kHz -> their (frames, dim), encoded as one batch: float32 on the CPU, or
        as the backend returns them (its device and dtype) for encode_long."""
        try:
            out = self.encoder._encode_items(windows, self.num_layers, output_hidden_states=False)
        finally:  # as encode: a stream-only service never calls it (a 60 s push kept 1.1 GB in onnx's arena)
            self.encoder._trim()
        hidden = out.last_hidden_state if self.backend_output else out.last_hidden_state.float().cpu()  # one copy
        return [hidden[i, : out.lengths[i]] for i in range(len(windows))]


def encode_long(encoder, wave: np.ndarray, chunk_s: float, left_s: float, right_s: float,
                output_layer: int | None = None, progress: bool = False) -> torch.Tensor:
    """Offline encode of one long item through the streaming windows, in bounded memory.
    Returns (frames, dim) on the device and in the dtype of the backend's outputs, as short items."""
    try:
        stream = EncoderStream(encoder, SAMPLE_RATE, chunk_s, left_s, right_s, output_layer)
    except ValueError as exc:  # the stream's names for the encoder's long-audio settings
        raise ValueError(f"the long-audio windows (enc.long_audio_chunk_s={chunk_s:g}, long_audio_left_s={left_s:g}, "
                         f"long_audio_right_s={right_s:g}) do not make a valid stream: {exc}") from None
    stream.backend_output = True
    stream.scale_warned = True  # encode warned of the item already
    # A GPU is given 8 chunks per push (the stream encodes their windows in runs of at most
    # SECONDS_PER_RUN: with the default 46 s windows, one per run); a CPU gains little from a batch
    # (and its bar moves per window).
    block = stream.chunk * (8 if encoder.backend.device.type == "cuda" else 1)
    outputs = []
    # The bar counts the audio whose frames are final (one hop each), so it is full when they all are.
    total = len(wave) / SAMPLE_RATE
    with progress_bar(progress, total=total, unit="s", unit_scale=True, desc="encode",
                      bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}]") as bar:
        for start in range(0, len(wave), block):
            outputs.append(stream.push(wave[start : start + block]).frames)
            bar.update(min(len(outputs[-1]) * stream.hop / SAMPLE_RATE, total - bar.n))
        outputs.append(stream.flush().frames)
        bar.update(total - bar.n)
    pieces = [x for x in outputs if len(x)]  # pushes that finished no frame give CPU float32
    del outputs
    # Copied into one tensor piece by piece, each freed once copied: an hour of frames is GBs, and
    # torch.cat would hold them twice.
    frames = pieces[0].new_empty(sum(len(x) for x in pieces), pieces[0].shape[1])
    row = 0
    while pieces:
        piece = pieces.pop(0)
        frames[row : row + len(piece)] = piece
        row += len(piece)
    return frames
