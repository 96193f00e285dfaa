"""The public encoder object: audio in, frame embeddings out, on any backend."""
from __future__ import annotations

import math
import numbers
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from audioenc.audio import to_waveforms
from audioenc.config import SAMPLE_RATE, WHISPER_HOP, Wav2Vec2Dims, WhisperDims, check_preprocessor
from audioenc.frontend import normalize_waveforms, pcm_to_float32, window_log_mel
from audioenc.models.layers import valid_mask
from audioenc.progress import progress_bar
from audioenc.streaming import LONG_AUDIO_DEFAULTS, EncoderStream, encode_long
from audioenc.torch_defaults import no_autocast

# Float audio past this (24 dB over full scale) is integer PCM cast to float, not audio in [-1, 1].
FLOAT_PEAK_WARNING = 16.0

POOLS = ("mean", "max")
WHISPER_WINDOWS_PER_RUN = 16  # on a GPU; bounds memory on long audio (the CPU runs one window per call)
CPU_SAMPLES_PER_RUN = 160 * SAMPLE_RATE  # padded samples per CPU backend call (wav2vec2 family): bounds memory
GPU_MAX_BATCH = 64  # items per GPU backend call (wav2vec2 family)...
GPU_SAMPLES_PER_RUN = 1280 * SAMPLE_RATE  # ...and samples it computes, padding included: the first conv
                                          # layer's output is 4 GB in float16 at this size


@dataclass
class EncoderOutput:
    """What ``encode`` returns: the frames of a batch (``frame_rate`` per second: 50 for most models),
    zero past each item's length."""

    last_hidden_state: torch.Tensor                # (B, frames, dim); frames past lengths[b] are 0
    hidden_states: tuple[torch.Tensor, ...] | None  # input of layer 1, then one per layer (when asked)
    lengths: torch.Tensor                          # (B,) valid frames per item, int64

    def __repr__(self) -> str:  # shapes, not a screen of numbers
        x = self.last_hidden_state
        hidden = (repr(self.hidden_states) if not self.hidden_states else
                  f"{len(self.hidden_states)} x {tuple(self.hidden_states[0].shape)}")
        return (f"EncoderOutput(last_hidden_state={tuple(x.shape)} {str(x.dtype).removeprefix('torch.')} on {x.device}, "
                f"hidden_states={hidden}, lengths={self.lengths.tolist()})")


class Setting:
    """A number an encoder is tuned with (``enc.cpu_max_padding = 0.1``), checked when set: a NaN or a
    negative value would switch its rule off without a word."""

    def __init__(self, minimum: float, above: bool = False, infinite: bool = False):
        self.minimum, self.above, self.infinite = minimum, above, infinite

    def __set_name__(self, owner, name: str) -> None:
        self.name = name

    def __get__(self, encoder, owner=None):
        if encoder is None:
            return self
        try:
            return encoder.__dict__[self.name]
        except KeyError:  # not set yet: hasattr must say False
            raise AttributeError(self.name) from None

    def __set__(self, encoder, value) -> None:
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value) and (
            value > self.minimum if self.above else value >= self.minimum) and (self.infinite or math.isfinite(value))
        if not ok:
            kind = "a number" if self.infinite else "a finite number"
            raise ValueError(f"{self.name} must be {kind} {'above' if self.above else 'at least'} {self.minimum:g}, "
                             f"got {value!r}")
        encoder.__dict__[self.name] = float(value)


_fork_hook_registered = False


def _torch_on_one_thread_in_forked_children() -> None:
    """torch's OpenMP thread pool does not survive a fork once it has run: a forked child's first
    parallel torch op (padding a batch's outputs, say) hangs; a load runs it too (building
    whisper-tiny does). So once a process has loaded or encoded, the children it forks run torch ops
    on one thread, as torch's own DataLoader workers do (a child may call torch.set_num_threads
    again). Importing audioenc alone changes nothing."""
    global _fork_hook_registered
    if not _fork_hook_registered:
        _fork_hook_registered = True
        os.register_at_fork(after_in_child=lambda: torch.set_num_threads(1))


class AudioEncoder:
    """A loaded encoder. Create it with :func:`audioenc.load`. Safe to share between threads."""

    long_audio_threshold_s = Setting(0, above=True, infinite=True)  # inf: every item whole
    long_audio_chunk_s = Setting(0, above=True)
    long_audio_left_s = Setting(0)
    long_audio_right_s = Setting(0)
    cpu_max_padding = Setting(0, infinite=True)
    gpu_call_cost_s = Setting(0)

    def __init__(self, family: str, dims: Wav2Vec2Dims | WhisperDims, backend, source: str,
                 preprocessor: dict, random_weights: bool = False, target_lang: str | None = None):
        self.family, self.dims, self.backend, self.source = family, dims, backend, source
        self.random_weights = random_weights
        self.target_lang = target_lang  # MMS: the language adapter loaded in place of the checkpoint's own
        self.do_normalize = bool(check_preprocessor(preprocessor, dims, source).get("do_normalize", True))
        # Items longer than long_audio_threshold_s go through context windows (bounded memory).
        (self.long_audio_threshold_s, self.long_audio_chunk_s,
         self.long_audio_left_s, self.long_audio_right_s) = LONG_AUDIO_DEFAULTS[family]
        self._fit_long_audio_to(getattr(backend, "max_samples", None))
        # On the CPU, a list's items run in groups of similar length whose padding stays within this
        # fraction of their valid samples (wav2vec2 family; inf: one padded batch, up to
        # CPU_SAMPLES_PER_RUN samples). A batch buys the CPU little beyond fewer calls for short
        # items, and padding costs as much as audio: on wav2vec2-base, 5% ran lists of 8-16 items of
        # 1-10 s 13-21% faster than 25% did (onnx; torch 13-31%), and 0-5% slower on 8 items under 3 s.
        self.cpu_max_padding = 0.05
        # On a GPU, a list runs in the groups that compute the fewest samples (padding and the
        # backend's shape buckets included), each call counted as this much audio besides: about
        # the cost of a batch-1 call of wavlm-large beyond its share of a batch-16 one on an H200.
        self.gpu_call_cost_s = 15.0

    def __reduce__(self):
        raise TypeError("an AudioEncoder cannot be pickled or copied (backends hold runtime sessions, locks and CUDA "
                        "graphs): load one in each process, e.g. with audioenc.load in a spawn worker")

    def _fit_long_audio_to(self, max_samples: int | None) -> None:
        """A backend that takes inputs of at most max_samples (a TensorRT profile) gets longer items
        as windows that fit it: the threshold comes down to it, and the chunk too if need be."""
        if max_samples is None or self.family == "whisper":
            return
        self.long_audio_threshold_s = min(self.long_audio_threshold_s, max_samples / SAMPLE_RATE)
        longest = (max_samples - self.min_samples) / SAMPLE_RATE  # a window also holds its last frame's conv field
        contexts = self.long_audio_left_s + self.long_audio_right_s
        if self.long_audio_chunk_s + contexts <= longest:
            return
        if longest - contexts >= 1.0:  # keep the contexts (they set the frames' quality), shorten the chunk
            self.long_audio_chunk_s = float(int(longest - contexts))
        else:  # a short profile: everything shrinks alike, in whole frames (which the stream would round up)
            scale, rate = longest / (self.long_audio_chunk_s + contexts), self.frame_rate
            chunk, left, right = (math.floor(x * scale * rate) / rate
                                  for x in (self.long_audio_chunk_s, self.long_audio_left_s, self.long_audio_right_s))
            if chunk <= 0:
                raise ValueError(f"the backend takes inputs of at most {max_samples} samples: too short for "
                                 "long-audio windows (allow longer inputs, e.g. AUDIOENC_TRT_PROFILE seconds)")
            self.long_audio_chunk_s, self.long_audio_left_s, self.long_audio_right_s = chunk, left, right

    def __repr__(self) -> str:
        weights = "RANDOM weights" if self.random_weights else self.source
        if self.target_lang:
            weights += f", target_lang={self.target_lang}"
        dtype = str(self.backend.dtype).removeprefix("torch.")  # torch dtypes and backends' strings alike
        return (f"AudioEncoder({self.family}, {self.num_layers} layers x {self.hidden_size}, "
                f"backend={self.backend.name}, device={self.backend.device}, dtype={dtype}, {weights})")

    @property
    def hidden_size(self) -> int:
        return self.dims.hidden_size

    @property
    def num_layers(self) -> int:
        return self.dims.num_layers

    sample_rate = SAMPLE_RATE

    @property
    def frame_hop(self) -> int:
        """Samples between output frames: Whisper's 160-sample mel hop, doubled by its stride-2 conv;
        the wav2vec2 family's conv stack's total stride (320 for the standard stack, 640 for a
        25 Hz one such as slprl/mhubert-base-25hz)."""
        return 2 * WHISPER_HOP if self.family == "whisper" else self.dims.hop

    @property
    def frame_rate(self) -> float:
        """Output frames per second: 16000 / frame_hop (50 for most checkpoints, 25 for mHuBERT-25Hz)."""
        return SAMPLE_RATE / self.frame_hop

    @property
    def min_samples(self) -> int:
        """The shortest input that gives one frame (at 16 kHz)."""
        return WHISPER_HOP if self.family == "whisper" else self.dims.receptive_field

    def stream(self, sample_rate: float = SAMPLE_RATE, chunk_s: float | None = None,
               left_context_s: float | None = None, right_context_s: float | None = None,
               output_layer: int | None = None) -> EncoderStream:
        """A live stream: ``push(block)`` returns the frames that became final, ``flush()`` the rest.
        Frames sit on the offline grid (one every ``frame_hop`` samples); contexts default per family
        (streaming.STREAM_DEFAULTS), in seconds, rounded to whole frames."""
        return EncoderStream(self, sample_rate, chunk_s, left_context_s, right_context_s, output_layer)

    def encode(self, audio, sample_rate: float = SAMPLE_RATE, output_hidden_states: bool = False,
               output_layer: int | None = None, progress: bool = False) -> EncoderOutput:
        """Frame embeddings of one item or a batch (see audioenc.audio.to_waveforms for inputs).

        output_layer=N runs only the first N layers and returns layer N's output (0 = the input of
        the first layer), costing only those layers; N = num_layers gives last_hidden_state, which
        in pre-LN wav2vec2-family models has the final LayerNorm that hidden_states[N] lacks.
        Items of a batch never influence each other. ``sample_rate`` is that of arrays (files carry
        their own); other rates are resampled to 16 kHz. output_hidden_states: also return
        ``hidden_states``, Hugging Face's convention (the input of layer 1, then each layer's output).
        wav2vec2-family items longer than ``long_audio_threshold_s`` are encoded in windows with
        context (audioenc.streaming.encode_long; no hidden_states), Whisper items over 30 s as
        consecutive 30 s windows; ``progress`` shows a bar for either.
        """
        try:
            return self._encode(audio, sample_rate, output_hidden_states, output_layer, progress)
        finally:
            self._trim()

    def _trim(self) -> None:
        trim = getattr(self.backend, "trim", None)  # memory that big runs left in the backend's allocator
        if trim is not None:
            trim()

    def _encode(self, audio, sample_rate: float, output_hidden_states: bool, output_layer: int | None,
                progress: bool) -> EncoderOutput:
        num_layers = self._layers_to_run(output_layer)
        if not isinstance(output_hidden_states, (bool, np.bool_)):  # "yes" would export a graph of its own
            raise TypeError(f"output_hidden_states must be True or False, got {output_hidden_states!r}")
        output_hidden_states = bool(output_hidden_states)
        if not isinstance(progress, (bool, np.bool_)):
            raise TypeError(f"progress must be True or False, got {progress!r}")
        waves = to_waveforms(audio, sample_rate, self.min_samples)
        self._warn_of_pcm_scale(waves)
        # In seconds, as the setting is: threshold * 16000 can round below an item of exactly that duration
        long_items = [i for i, w in enumerate(waves)
                      if len(w) / SAMPLE_RATE > self.long_audio_threshold_s and self._windowed_long_audio()]
        if long_items and output_hidden_states:
            raise ValueError(f"output_hidden_states is not available for items longer than "
                             f"long_audio_threshold_s={self.long_audio_threshold_s:g} s (encoded in windows); "
                             "ask for one layer (output_layer=N; CLI: --layer N), or raise the encoder's "
                             "long_audio_threshold_s")
        short = [i for i in range(len(waves)) if i not in long_items]
        out = None
        if short:
            out = self._encode_items([waves[i] for i in short], num_layers, output_hidden_states, progress)
            if not long_items:
                return self._finite(out, waves)
        items = [None] * len(waves)
        for row, i in enumerate(short):
            items[i] = out.last_hidden_state[row, : out.lengths[row]]
        for i in long_items:
            items[i] = encode_long(self, waves[i], self.long_audio_chunk_s, self.long_audio_left_s,
                                   self.long_audio_right_s, output_layer, progress)
        if out is not None:
            items = [x.to(out.last_hidden_state) for x in items]
        lengths = torch.tensor([len(x) for x in items], dtype=torch.int64, device="cpu")
        return self._finite(EncoderOutput(pad_items(items), hidden_states=None, lengths=lengths), waves)

    def _warn_of_pcm_scale(self, waves: list[np.ndarray], what: str | None = None) -> bool:
        """Float samples far past [-1, 1] are almost always integer PCM cast to float (int16 audio
        as float32 reaches thousands). Whisper's log-mel, and a waveform the checkpoint does not
        normalise, take them as they are: frames of another signal, with no error. Warn, naming the
        item (or ``what``, a stream's block); returns whether it warned."""
        if self.family != "whisper" and self.do_normalize:  # normalised per item: the scale cancels
            return False
        for i, w in enumerate(waves):
            if w.dtype.kind == "f" and len(w):
                peak = float(np.abs(w).max())
                if FLOAT_PEAK_WARNING < peak <= 2.0**31:  # within integer PCM's range: past it is no cast
                    warnings.warn(f"audioenc: {what or f'audio item {i}'}: float samples reach {peak:.4g}, but float "
                                  "audio is expected within [-1, 1]; integer PCM cast to float? Pass the int16/int32 "
                                  "array itself (scaled by 2^-15 / 2^-31), or divide by 32768", UserWarning,
                                  stacklevel=4)
                    return True
        return False

    def _finite(self, out: EncoderOutput, waves: list[np.ndarray]) -> EncoderOutput:
        """out, or a ValueError naming the first item whose frames overflowed: never NaN/Inf frames."""
        finite = finite_items(out.last_hidden_state)
        if not finite.all():
            i = int(np.flatnonzero(~finite)[0])
            peak = float(np.abs(pcm_to_float32(waves[i])).max())
            dtype = str(self.backend.dtype).removeprefix("torch.")
            why = (f"the item's samples reach {peak:.3g}; audio is expected within [-1, 1]" if peak > 1 else
                   "its samples are within [-1, 1], so this model's own activations pass float16's range: use "
                   "float32, or bfloat16 where the backend takes it" if dtype == "float16" else
                   "its samples are within [-1, 1]: the checkpoint's weights may be damaged")
            raise ValueError(f"audio item {i}: the encoder's output holds NaN or Inf: the {self.backend.name} "
                             f"backend's {dtype} arithmetic overflowed ({why})")
        return out

    def _encode_items(self, waves: list[np.ndarray], num_layers: int, output_hidden_states: bool,
                      progress: bool = False) -> EncoderOutput:
        """Validated 16 kHz items, each encoded whole (no long-audio windows); ``progress``: a bar over
        Whisper's 30 s windows when an item is longer than one."""
        _torch_on_one_thread_in_forked_children()
        with no_autocast():  # the caller's autocast would run a float32 model in half precision
            if self.family == "whisper":
                return self._encode_whisper(waves, num_layers, output_hidden_states, progress)
            return self._encode_wav2vec2(waves, num_layers, output_hidden_states)

    def _windowed_long_audio(self) -> bool:
        """Whisper with no context keeps its own consecutive 30 s windows (_encode_whisper)."""
        return self.family != "whisper" or self.long_audio_left_s > 0 or self.long_audio_right_s > 0

    def embed(self, audio, sample_rate: float = SAMPLE_RATE, pool: str = "mean",
              output_layer: int | None = None) -> torch.Tensor:
        """One vector per item (B, dim), float32: the mean (or max) of its valid frames."""
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
        out = self.encode(audio, sample_rate, output_layer=output_layer)
        return pool_frames(out.last_hidden_state, out.lengths, pool)

    def warmup(self, seconds=None, batch_sizes=(1,), output_layer: int | None = None,
               output_hidden_states: bool = False) -> None:
        """Encodes noise once per (duration, batch size) so that live traffic does not pay for
        one-time work: kernel autotuning and CUDA-graph capture (triton; it keeps the graphs of its
        last 16 shapes), graph export and session set-up (onnx, tensorrt), allocator growth (torch).

        seconds: a duration or a list of them; default 10 s (wav2vec2 family) or one 30 s window
        (Whisper, whose every call is a 30 s window). Pass the durations, batch sizes, depth and
        hidden states you serve (the onnx and tensorrt backends run other graphs for hidden states).
        """
        if seconds is None:
            seconds = 30.0 if self.family == "whisper" else 10.0
        durations = [seconds] if np.isscalar(seconds) else list(seconds)
        batches = [batch_sizes] if np.isscalar(batch_sizes) else list(batch_sizes)
        if not durations or any(isinstance(d, bool) or not isinstance(d, numbers.Real) or not np.isfinite(d)
                                or d * SAMPLE_RATE < self.min_samples for d in durations):
            raise ValueError(f"warmup seconds must be finite and at least {self.min_samples / SAMPLE_RATE:g} s, "
                             f"got {seconds!r}")
        if not batches or any(isinstance(b, bool) or not isinstance(b, (int, np.integer)) or b < 1 for b in batches):
            raise ValueError(f"warmup batch_sizes must be positive ints, got {batch_sizes!r}")
        noise = np.random.default_rng(0).standard_normal(int(max(durations) * SAMPLE_RATE)).astype(np.float32)
        for duration in durations:
            item = 0.1 * noise[: int(duration * SAMPLE_RATE)]
            for batch in batches:
                self.encode([item] * int(batch), output_layer=output_layer, output_hidden_states=output_hidden_states)

    def _layers_to_run(self, output_layer: int | None) -> int:
        if output_layer is None:
            return self.num_layers
        if isinstance(output_layer, bool) or not isinstance(output_layer, (int, np.integer)):
            raise TypeError(f"output_layer must be an int, got {type(output_layer).__name__}")
        if not 0 <= output_layer <= self.num_layers:
            raise ValueError(f"output_layer must be between 0 and {self.num_layers}, got {output_layer}")
        return int(output_layer)

    def _encode_wav2vec2(self, waves: list[np.ndarray], num_layers: int, output_hidden_states: bool) -> EncoderOutput:
        dtypes = {w.dtype for w in waves}
        if len(dtypes) > 1:  # mixed PCM types in one list: meet in float32
            waves = [pcm_to_float32(w) for w in waves]
        # On the CPU a batch buys little speed (its matmuls are large already) while every padded
        # sample costs as much as a valid one: items run in groups of similar length. A GPU needs
        # batches to be busy, so there the groups weigh padding against the cost of a call.
        lengths = [len(w) for w in waves]
        if self.backend.device.type == "cpu":
            groups = length_groups(lengths, self.cpu_max_padding)
        else:
            groups = self._gpu_groups(lengths, GPU_MAX_BATCH)
        if len(groups) == 1:
            return self._run_wav2vec2(waves, num_layers, output_hidden_states)
        outs = [self._run_wav2vec2([waves[i] for i in group], num_layers, output_hidden_states) for group in groups]
        order = torch.tensor([i for group in groups for i in group], device="cpu")
        lengths = torch.empty(len(waves), dtype=torch.int64, device="cpu")
        lengths[order] = torch.cat([out.lengths for out in outs])
        order = order.to(outs[0].last_hidden_state.device)  # once: each copy to a GPU waits for it

        def merged(tensors: list[torch.Tensor]) -> torch.Tensor:
            """The groups' (B_g, T_g, D) outputs as one (B, T, D) in the caller's order."""
            in_group_order = pad_items([row for t in tensors for row in t])
            return torch.empty_like(in_group_order).index_copy_(0, order, in_group_order)

        hidden = None
        if output_hidden_states:
            hidden = tuple(merged([out.hidden_states[layer] for out in outs]) for layer in range(num_layers + 1))
        return EncoderOutput(merged([out.last_hidden_state for out in outs]), hidden_states=hidden, lengths=lengths)

    def _gpu_groups(self, lengths: list[int], max_batch: int) -> list[list[int]]:
        """cheapest_groups with the backend's own cost: the shapes it pads a call to (the triton
        backend's CUDA-graph buckets) and its largest batch (a TensorRT profile's)."""
        computed = getattr(self.backend, "computed_samples", lambda batch, samples: batch * samples)
        max_batch = min(max_batch, getattr(self.backend, "max_batch", max_batch))
        return cheapest_groups(lengths, computed, self.gpu_call_cost_s * SAMPLE_RATE, max_batch, GPU_SAMPLES_PER_RUN)

    def _run_wav2vec2(self, waves: list[np.ndarray], num_layers: int, output_hidden_states: bool) -> EncoderOutput:
        """One backend call on a padded batch of validated items."""
        lengths = np.array([len(w) for w in waves], dtype=np.int64)
        batch = np.zeros((len(waves), lengths.max()), dtype=waves[0].dtype)
        for row, w in zip(batch, waves):
            row[: len(w)] = w
        inputs = torch.from_numpy(normalize_waveforms(batch, lengths, self.do_normalize))
        out, hidden_states, frame_lengths = self.backend.run(inputs, torch.from_numpy(lengths), num_layers,
                                                                   output_hidden_states)
        frame_lengths = normal_tensor(frame_lengths.cpu())
        clean = padding_zeroer(frame_lengths, out)
        hidden = tuple(clean(h) for h in hidden_states) if output_hidden_states else None
        return EncoderOutput(clean(out), hidden_states=hidden, lengths=frame_lengths)

    def _encode_whisper(self, waves: list[np.ndarray], num_layers: int, output_hidden_states: bool,
                        progress: bool = False) -> EncoderOutput:
        """Each item is cut into consecutive 30 s windows (the last one padded); every window is
        encoded on its own and the valid frames of an item's windows are concatenated."""
        size = self.dims.window_samples
        windows, owners, valid = [], [], []
        for i, w in enumerate(waves):
            for start in range(0, len(w), size):
                piece = w[start : start + size]
                if len(piece) < WHISPER_HOP and start > 0:
                    break  # a tail shorter than one mel frame adds no frame
                windows.append(piece)
                owners.append(i)
                valid.append(self.dims.num_frames(len(piece)))
        outputs, layer_outputs = [], []
        if self.backend.device.type == "cpu":
            # A batch of windows runs no faster on the CPU and holds more memory: 8 minutes of
            # whisper-base took 4.25 s as 16-window batches and 3.66 s window by window (onnx), at a
            # peak of 2163 MB against 644 MB.
            runs = [[i] for i in range(len(windows))]
        else:  # equal lengths: the groups are consecutive runs of windows, in order
            runs = self._gpu_groups([size] * len(windows), WHISPER_WINDOWS_PER_RUN)
        long = len(windows) > len(waves)  # some item is over 30 s: a bar, as long wav2vec2-family items get
        with progress_bar(progress and long, total=len(windows), unit="window", desc="encode") as bar:
            for run in runs:
                mel = window_log_mel([windows[i] for i in run], size, self.dims.n_mels, self.backend.device)
                out, hidden_states, _ = self.backend.run(mel, None, num_layers, output_hidden_states)
                outputs.append(out)
                if output_hidden_states:
                    layer_outputs.append(hidden_states)
                bar.update(len(run))
        out = outputs[0] if len(outputs) == 1 else torch.cat(outputs)
        per_item = stitch_windows(out, owners, valid, len(waves))
        lengths = torch.tensor([len(x) for x in per_item], dtype=torch.int64, device="cpu")
        hidden = None
        if output_hidden_states:
            hidden = tuple(pad_items(stitch_windows(torch.cat([h[layer] for h in layer_outputs]), owners, valid, len(waves)))
                           for layer in range(num_layers + 1))
        return EncoderOutput(pad_items(per_item), hidden_states=hidden, lengths=lengths)


def length_groups(lengths: list[int], max_padding: float, max_samples: int = CPU_SAMPLES_PER_RUN) -> list[list[int]]:
    """Indices of the items grouped for separate runs: longest first, each group as long as its
    padding stays within ``max_padding`` of its valid samples and its padded batch within
    ``max_samples`` (bounded memory; one item always runs, however long)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    valid = 0
    for i in order:
        if groups:
            longest, count = lengths[groups[-1][0]], len(groups[-1]) + 1
            padded = longest * count
            if padded <= (1 + max_padding) * (valid + lengths[i]) and padded <= max_samples:
                groups[-1].append(i)
                valid += lengths[i]
                continue
        groups.append([i])
        valid = lengths[i]
    return groups


def cheapest_groups(lengths: list[int], computed_samples, call_samples: float, max_batch: int,
                    max_samples: float = math.inf) -> list[list[int]]:
    """Indices of the items grouped for separate runs, longest first: of the ways to cut the items,
    sorted by length, into runs of at most ``max_batch`` items and ``max_samples`` computed samples
    (one item always runs), the one that minimises the samples computed,
    ``computed_samples(batch, longest)``, plus ``call_samples`` per run."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    best = [0.0] + [math.inf] * len(order)  # best[k]: the cheapest way to run the k longest items
    start_of = [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):
        for start in range(end - 1, max(0, end - max_batch) - 1, -1):  # growing runs ending at end
            computed = computed_samples(end - start, lengths[order[start]])
            if computed > max_samples and start < end - 1:
                break  # longer runs compute more still
            cost = best[start] + call_samples + computed
            if cost <= best[end]:  # ties keep the larger group: fewer calls
                best[end], start_of[end] = cost, start
    groups, end = [], len(order)
    while end:
        groups.append(order[start_of[end]:end])
        end = start_of[end]
    return groups[::-1]


def stitch_windows(out: torch.Tensor, owners: list[int], valid: list[int], num_items: int) -> list[torch.Tensor]:
    """Concatenates the valid frames of each item's windows, in order (an item of one window: a view,
    no copy on torch's threads; see finite_items)."""
    pieces: list[list[torch.Tensor]] = [[] for _ in range(num_items)]
    for window, (owner, n) in enumerate(zip(owners, valid)):
        pieces[owner].append(out[window, :n])
    return [normal_tensor(p[0]) if len(p) == 1 else torch.cat(p) for p in pieces]


def pad_items(items: list[torch.Tensor]) -> torch.Tensor:
    if len(items) == 1:  # a view, not a copy: one long item's frames can be GBs
        return items[0].unsqueeze(0)
    return torch.nn.utils.rnn.pad_sequence(items, batch_first=True)


def normal_tensor(x: torch.Tensor) -> torch.Tensor:
    """x as a tensor callers may change in place and use under autograd, which the backends'
    inference-mode tensors allow neither; on the CPU without a copy (see finite_items)."""
    if not x.is_inference():
        return x
    if x.device.type == "cpu" and x.dtype != torch.bfloat16:  # numpy has no bfloat16
        return torch.from_numpy(x.numpy())  # the same memory, now a plain tensor's
    return x.clone()


def finite_items(x: torch.Tensor) -> np.ndarray:
    """Per item of x (B, ...), whether all its values are finite. On the CPU numpy checks, on one
    thread: after a parallel torch op, torch's OpenMP threads spin for milliseconds and slowed the
    next call's onnxruntime threads (wav2vec2-base, 1 s items back to back: 50 against 44 ms)."""
    if x.device.type == "cpu":
        return np.isfinite(x.float().numpy()).reshape(len(x), -1).all(1)
    return torch.isfinite(x).flatten(1).all(1).cpu().numpy()


def padding_zeroer(lengths: torch.Tensor, like: torch.Tensor):
    """A function that sets the frames past each item's length to 0 in (B, T, D) tensors shaped like
    ``like`` (and returns their memory when no item is padded); the mask is made, and sent to a
    GPU, once for all of a call's hidden states."""
    if int(lengths.min()) == like.shape[1]:
        return normal_tensor
    invalid = ~valid_mask(lengths.to(like.device), like.shape[1])[..., None]
    return lambda x: x.masked_fill(invalid, 0)  # not a product: NaN x 0 would stay NaN


def pool_frames(x: torch.Tensor, lengths: torch.Tensor, pool: str) -> torch.Tensor:
    """(B, T, D) with lengths -> (B, D) float32 over each item's valid frames (a float16 sum over
    minutes of frames would overflow). On the CPU in numpy, on one thread (see finite_items)."""
    x = x.float()
    if x.device.type == "cpu":
        frames = x.numpy()
        reduce = np.mean if pool == "mean" else np.max
        return torch.from_numpy(np.stack([reduce(item[:n], axis=0) for item, n in zip(frames, lengths.tolist())]))
    valid = valid_mask(lengths.to(x.device), x.shape[1])[..., None]
    if pool == "mean":
        return (x * valid).sum(1) / lengths.to(x.device, x.dtype)[:, None]
    return x.masked_fill(~valid, float("-inf")).amax(1)
