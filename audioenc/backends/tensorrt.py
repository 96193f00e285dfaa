"""TensorRT backend: engines built from audioenc's ONNX graphs with the TensorRT Python API (10.x
and 11.x), cached on disk, run with named tensors and execute_async_v3 on torch buffers.

NOT RUN: TensorRT cannot be installed on the machines this was written on, so this module has
never built or run an engine. Everything up to the ONNX it consumes is verified with
onnxruntime on the CPU (tests/test_export.py); its own tests skip without TensorRT and a GPU.

Precision is expressed in the graph (a strongly typed network): float32 engines come from the
float32 ONNX, float16 engines from the half graph of audioenc.graph_precision.to_half (LayerNorm, softmax
and the residual stream in fp32), since TensorRT 11 removed the fp16 builder flag.
The optimisation profile comes from the expected batch and audio-length ranges: the defaults below,
or AUDIOENC_TRT_PROFILE="batch=MIN:OPT:MAX,seconds=MIN:OPT:MAX", or `audioenc export --format tensorrt`.
Batches smaller or shorter than its minimum are zero-padded up to it (the lengths input keeps
every frame exact). The encoder splits lists into batches the profile allows and encodes items
longer than it takes in long-audio windows that fit it. As in the onnx backend, an engine returns
every layer's hidden state only when a call asks for them: those are separate engines, since each
output is allocated per call (about 2 GB for whisper-large-v3 at batch 8).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from audioenc.atomic_file import atomic_write_bytes
from audioenc.backends import import_problem, resolve_dtype
from audioenc.config import SAMPLE_RATE, WhisperDims
from audioenc.file_lock import file_lock

DTYPES = ("float32", "float16")
ENGINE_FILE = "engine.plan"
DEFAULT_BATCH = (1, 1, 8)
# 47 s: a long-audio window (8 + 30 + 8 s and the conv's receptive field); longer items go through them
DEFAULT_SECONDS = (1.0, 10.0, 47.0)
WORKSPACE_BYTES = 4 << 30
BUILD_SETTINGS = "no TF32"  # in the engine's cache key: engines built with other settings are not reused


def parse_range(text: str, what: str, whole: bool = False) -> tuple[float, float, float]:
    """'MIN:OPT:MAX' (or one number for all three) -> three numbers, 0 < MIN <= OPT <= MAX;
    ``whole``: whole numbers (batch sizes). ``what`` names the setting in errors."""
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        raise ValueError(f"{what} must be MIN:OPT:MAX or one number, got {text!r}") from None
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or not 0 < parts[0] <= parts[1] <= parts[2] < math.inf:
        raise ValueError(f"{what} must be MIN:OPT:MAX with 0 < MIN <= OPT <= MAX, got {text!r}")
    if whole and not all(p.is_integer() for p in parts):
        raise ValueError(f"{what} must be whole numbers (batch sizes), got {text!r}")
    return parts[0], parts[1], parts[2]


@dataclass(frozen=True)
class Profile:
    """min/opt/max input shapes per graph input, as TensorRT's optimisation profile takes them."""

    shapes: tuple[tuple[str, tuple[int, ...], tuple[int, ...], tuple[int, ...]], ...]

    @classmethod
    def from_ranges(cls, dims, batch=DEFAULT_BATCH, seconds=DEFAULT_SECONDS) -> "Profile":
        """From (min, opt, max) batch sizes and seconds, as parse_range gives them."""
        b = [int(x) for x in batch]
        if isinstance(dims, WhisperDims):  # fixed 30 s windows, dynamic batch
            mel = lambda n: (n, dims.n_mels, 2 * dims.n_ctx)  # noqa: E731
            return cls((("mel", mel(b[0]), mel(b[1]), mel(b[2])),))
        samples = [max(int(s * SAMPLE_RATE), dims.receptive_field) for s in seconds]
        wave = tuple((b[i], samples[i]) for i in range(3))
        return cls((("waveforms", *wave), ("lengths", (b[0],), (b[1],), (b[2],))))

    @classmethod
    def from_env(cls, dims) -> "Profile":
        text = os.environ.get("AUDIOENC_TRT_PROFILE", "")
        ranges = {"batch": DEFAULT_BATCH, "seconds": DEFAULT_SECONDS}
        for part in filter(None, text.split(",")):
            key, _, value = part.partition("=")
            if key not in ranges:
                raise ValueError(f"AUDIOENC_TRT_PROFILE: expected batch=MIN:OPT:MAX,seconds=MIN:OPT:MAX, got {text!r}")
            ranges[key] = parse_range(value, f"AUDIOENC_TRT_PROFILE's {key}", whole=key == "batch")
        if isinstance(dims, WhisperDims) and ranges["seconds"] is not DEFAULT_SECONDS:
            # Not an error: one process-wide setting may serve wav2vec2-family engines too.
            warnings.warn("audioenc: AUDIOENC_TRT_PROFILE's seconds do not apply to a Whisper engine, which always "
                          "takes 30 s windows; only its batch range is used", stacklevel=2)
        return cls.from_ranges(dims, ranges["batch"], ranges["seconds"])

    def check(self, feeds: dict[str, torch.Tensor]) -> None:
        for name, low, _, high in self.shapes:
            shape = tuple(feeds[name].shape)
            if any(s < lo or s > hi for s, lo, hi in zip(shape, low, high)):
                raise ValueError(f"input {name} of shape {shape} is outside the engine's profile {low}..{high}; "
                                 "set AUDIOENC_TRT_PROFILE to the batch and length ranges you need")


def gpu_id() -> str:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return f"{props.name} sm{props.major}{props.minor}"


def engine_key(onnx_path: str, profile: Profile, dtype: str) -> str:
    """Model hash (the ONNX graph's cache key already holds the weights digest), profile, precision,
    TensorRT version and GPU."""
    import tensorrt as trt

    graph = os.path.basename(os.path.dirname(onnx_path))
    fields = [graph, repr(profile), dtype, trt.__version__, gpu_id(), BUILD_SETTINGS]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:32]


def build_engine(onnx_path: str, profile: Profile, timing_cache_path: str) -> bytes:
    """A serialized engine for the ONNX graph (precision from its types: strongly typed network)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(onnx_path):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ValueError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    # TF32 is on by default (TensorRT 10 and 11): float32 MatMuls and Convs would round their inputs
    # to 10-bit mantissas, about 1e-3 off the reference where float32 must be within 1e-4.
    config.clear_flag(trt.BuilderFlag.TF32)
    optimisation = builder.create_optimization_profile()
    for name, low, opt, high in profile.shapes:
        optimisation.set_shape(name, low, opt, high)
    config.add_optimization_profile(optimisation)
    cache_bytes = b""
    if os.path.exists(timing_cache_path):
        with open(timing_cache_path, "rb") as f:
            cache_bytes = f.read()
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise ValueError(f"TensorRT failed to build an engine from {onnx_path} (see its log above)")
    atomic_write_bytes(timing_cache_path, memoryview(config.get_timing_cache().serialize()))
    return bytes(engine)


def cached_engine(onnx_path: str, profile: Profile, dtype: str, source: str | None = None) -> bytes:
    """The serialized engine, from the cache when its checksum holds, else built and cached
    (``source``, the checkpoint, goes in its meta.json for ``audioenc cache``)."""
    import tensorrt as trt

    from audioenc.cache import cache_root

    root = os.path.join(cache_root(), "tensorrt")
    key = engine_key(onnx_path, profile, dtype)
    path = os.path.join(root, key, ENGINE_FILE)
    meta_path = os.path.join(root, key, "meta.json")
    data, problem = _read_entry(path, meta_path)
    if data is not None:
        return data
    if problem is not None:
        warnings.warn(f"audioenc: cached TensorRT engine {path} is unusable ({problem}); rebuilding it", stacklevel=2)
    try:  # a cache that cannot be written fails here, not after minutes of building
        os.makedirs(os.path.dirname(path), exist_ok=True)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot write the TensorRT engine cache in {root} ({exc.strerror}); set "
                                 "AUDIOENC_CACHE to a writable directory") from exc
    # One process builds an engine (minutes, and gigabytes); the others that need it meanwhile
    # (workers started together on an empty cache) wait and take it, as for the ONNX graphs.
    with file_lock(os.path.join(root, key + ".lock"), os.path.dirname(path)):
        data, _ = _read_entry(path, meta_path)
        if data is not None:  # built by another process while this one waited
            return data
        timing = os.path.join(root, f"timing-{trt.__version__}-{gpu_id().replace(' ', '_')}.cache")
        data = build_engine(onnx_path, profile, timing)
        atomic_write_bytes(path, data)
        atomic_write_bytes(meta_path, json.dumps({"sha256": hashlib.sha256(data).hexdigest(), "profile": repr(profile),
                                            "dtype": dtype, "tensorrt": trt.__version__, "gpu": gpu_id(),
                                            "source": source}).encode())
    return data


def _read_entry(path: str, meta_path: str) -> tuple[bytes | None, str | None]:
    """The cached engine when its checksum holds, else None and why not (None when there is none)."""
    from audioenc.cache import mark_used

    if not os.path.exists(path):
        return None, None
    try:
        with open(meta_path) as f:
            expected = json.load(f)["sha256"]
        with open(path, "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() == expected:
            mark_used(os.path.dirname(path))
            return data, None
        return None, "its checksum does not match"
    except (OSError, ValueError, KeyError, TypeError) as exc:  # TypeError: JSON of another shape
        return None, f"its metadata is unreadable ({exc})"


def export_engine(model: nn.Module, dtype: str, profile: Profile, out_dir: str, num_layers: int | None = None,
                  hidden_states: bool = False, overwrite: bool = False) -> list[str]:
    """``audioenc export --format tensorrt``: builds (or takes from the cache) an engine into out_dir."""
    reason = TensorRTBackend.available()
    if reason is not None:
        raise ValueError(f"cannot build a TensorRT engine here: {reason}")
    from audioenc.export import ExportSpec, cached_export, source_label

    target = os.path.join(out_dir, ENGINE_FILE)
    # before the build (minutes), not after it
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} is a file; the export needs a directory")
    if os.path.lexists(target) and not overwrite:  # a link to nothing is the user's too
        raise FileExistsError(f"{target} exists; pass --overwrite to replace it")
    spec = ExportSpec(num_layers=model.dims.num_layers if num_layers is None else num_layers,
                      hidden_states=hidden_states, dtype=dtype)
    atomic_write_bytes(target, cached_engine(cached_export(model, spec), profile, dtype,
                                             source_label(model)), replace=overwrite)
    return [target]


class TensorRTBackend:
    name = "tensorrt"
    cached_weights = True  # runs on its cached engines' weights (audioenc.load reads none it has a record of)

    @classmethod
    def available(cls) -> str | None:
        problem = import_problem(("tensorrt",), "pip install 'audioenc[tensorrt]'")
        if problem is not None:
            return problem
        if not torch.cuda.is_available():
            return "TensorRT needs a CUDA GPU and torch sees none"
        return None

    def __init__(self, model: nn.Module, device: torch.device, dtype: str):
        if device.type != "cuda":
            raise ValueError("the tensorrt backend runs on a CUDA device only; use device='cuda'")
        dtype = resolve_dtype(dtype, device, DTYPES, "tensorrt")  # a CUDA device: auto is float16
        from audioenc.reference_weights import ReferenceWeights

        self.device, self.dtype = device, dtype
        self.dims = model.dims
        self.reference = ReferenceWeights(model)  # released once its graph is exported
        self.profile = Profile.from_env(self.dims)
        self.max_batch = self.profile.shapes[0][3][0]  # the encoder runs longer lists in groups...
        # ...and longer items in windows (Whisper's input is always one 30 s window)
        self.max_samples = None if isinstance(self.dims, WhisperDims) else self.profile.shapes[0][3][1]
        self.engines: dict[tuple[int, bool], object] = {}  # (num_layers, hidden_states) -> engine
        self.lock = threading.Lock()
        self.local = threading.local()  # one execution context per thread and engine

    def engine(self, num_layers: int, hidden_states: bool):
        import tensorrt as trt

        from audioenc.export import ExportSpec, source_label

        key = (num_layers, hidden_states)
        with self.lock:
            if key not in self.engines:
                onnx_path = self.reference.graph_path(ExportSpec(num_layers=num_layers, hidden_states=hidden_states,
                                                                 dtype=self.dtype))
                self.reference.release()  # before TensorRT's build, which takes gigabytes of its own
                runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
                with torch.cuda.device(self.device):
                    engine = runtime.deserialize_cuda_engine(cached_engine(
                        onnx_path, self.profile, self.dtype, source_label(self.reference.model)))
                if engine is None:
                    raise ValueError(f"TensorRT could not deserialize the engine for {onnx_path}")
                self.engines[key] = engine
            return self.engines[key]

    def context(self, num_layers: int, hidden_states: bool):
        contexts = getattr(self.local, "contexts", None)
        if contexts is None:
            contexts = self.local.contexts = {}
        key = (num_layers, hidden_states)
        if key not in contexts:
            contexts[key] = self.engine(*key).create_execution_context()
        return contexts[key]

    @torch.inference_mode()
    def run(self, inputs: torch.Tensor, lengths: torch.Tensor | None, num_layers: int,
            output_hidden_states: bool = True):
        # Execution contexts, streams and launches on our GPU (device="cuda:1" while cuda:0 is current).
        with torch.cuda.device(self.device):
            return self._run(inputs, lengths, num_layers, output_hidden_states)

    def _run(self, inputs, lengths, num_layers, output_hidden_states):
        import tensorrt as trt

        # Up to the profile's smallest shape: zeros past every item's length change no valid frame,
        # and zero items change no other item; both are cut from the outputs below.
        batch, frames = inputs.shape[0], None
        least_batch, shortest = self.profile.shapes[0][1][0], self.profile.shapes[0][1][-1]
        if lengths is not None and inputs.shape[1] < shortest:
            frames = self.dims.num_frames(inputs.shape[1])
            inputs = torch.nn.functional.pad(inputs, (0, shortest - inputs.shape[1]))
        if batch < least_batch:
            inputs = torch.cat([inputs, inputs.new_zeros((least_batch - batch,) + inputs.shape[1:])])
            if lengths is not None:
                lengths = torch.cat([lengths, lengths.new_full((least_batch - batch,), inputs.shape[1])])
        feeds = {"mel": inputs} if lengths is None else {"waveforms": inputs, "lengths": lengths}
        feeds = {name: t.to(self.device, torch.int64 if name == "lengths" else torch.float32).contiguous()
                 for name, t in feeds.items()}
        self.profile.check(feeds)
        key = (num_layers, output_hidden_states)
        engine, context = self.engine(*key), self.context(*key)
        for name, tensor in feeds.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        # audioenc's graphs give float32 and int64; a buffer of another element size would be garbage.
        output_dtypes = {trt.DataType.FLOAT: torch.float32, trt.DataType.HALF: torch.float16,
                         trt.DataType.INT32: torch.int32, trt.DataType.INT64: torch.int64}
        outputs = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            if engine.get_tensor_mode(name) != trt.TensorIOMode.OUTPUT:
                continue
            kind = engine.get_tensor_dtype(name)
            dtype = output_dtypes.get(kind)
            if dtype is None:
                raise ValueError(f"the TensorRT engine's output {name} is of type {kind}, which audioenc does not read")
            outputs[name] = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device=self.device)
            context.set_tensor_address(name, outputs[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed (see its log)")
        stream.synchronize()
        hidden_states = ([outputs[f"hidden_state_{i}"][:batch, :frames].float() for i in range(num_layers + 1)]
                         if output_hidden_states else [])
        frame_lengths = outputs.get("frame_lengths")  # none for Whisper
        return (outputs["last_hidden_state"][:batch, :frames].float(), hidden_states,
                None if frame_lengths is None else frame_lengths[:batch].long())
