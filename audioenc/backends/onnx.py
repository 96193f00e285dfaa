"""ONNX Runtime backend: the reference model exported once per depth (cached on disk), with each
attention as onnxruntime's fused MultiHeadAttention op, run in a tuned InferenceSession with IO
binding straight into torch tensors.

A graph runs only the layers asked for, so ``output_layer=k`` costs layers 1..k; each new depth
is exported (and cached) on first use, which takes seconds for a base-size model.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import warnings
import weakref
from collections import OrderedDict

import torch
from torch import nn

from audioenc.backends import import_problem, resolve_dtype
from audioenc.config import WhisperDims
from audioenc.cpu import TRIM_AFTER_SAMPLES, return_freed_memory, usable_cores
from audioenc.export import ExportSpec
from audioenc.fork_safe_lock import ForkSafeLock, fork_waits
from audioenc.reference_weights import ReferenceWeights

DTYPES = ("float32", "float16", "bfloat16", "int8")
GRAPH_DTYPE = {"float32": "float32", "float16": "float16", "bfloat16": "float32", "int8": "int8"}
# Ops counted in the optimised graph: what ORT fused. FastGelu is tanh-approximate and must not
# appear in a float32 graph.
FUSED_OPS = ("Attention", "MultiHeadAttention", "LayerNormalization", "SkipLayerNormalization",
             "SimplifiedLayerNormalization", "Gelu", "BiasGelu", "FastGelu", "MatMulIntegerToFloat", "DynamicQuantizeMatMul")
# Sessions kept, the most recently used: each holds its depth's weights (prepacked: wav2vec2-base's
# full depth about 350 MB) and its own thread pool. Three serve the last layer, the same with every
# hidden state and one middle layer without reloading; a sweep over output_layer holds no more.
SESSION_CACHE_SIZE = 3
_backends: weakref.WeakSet[OnnxBackend] = weakref.WeakSet()


def _keep_sessions_of_the_parent() -> None:
    """In a forked child: the sessions made before the fork are never freed there. Freeing one waits
    forever on a condition variable that the parent's session threads were waiting on, threads the
    child does not have: a worker that evicted one (a 4th depth) hung. They still run in the child;
    their memory is the parent's, shared. A reference in a list would be dropped as the interpreter
    finalizes; this one never is."""
    for backend in list(_backends):
        for session in backend.sessions.values():
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(session))  # a reference that is never dropped


os.register_at_fork(after_in_child=_keep_sessions_of_the_parent)


class OnnxBackend:
    name = "onnx"
    cached_weights = True  # runs on its cached graphs' weights (audioenc.load reads none it has a record of)

    @classmethod
    def available(cls) -> str | None:
        # onnx is found, not imported: only an export needs it (0.1 s a load from the cache skips)
        return import_problem(("onnxruntime",), "pip install 'audioenc[onnx]'", found_only=("onnx",))

    def __init__(self, model: nn.Module, device: torch.device, dtype: str):
        import onnxruntime as ort

        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise ValueError("device 'cuda' needs onnxruntime-gpu (its CUDA provider is not in this onnxruntime)")
            self.providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        else:
            self.providers = ["CPUExecutionProvider"]
        dtype = resolve_dtype(dtype, device, DTYPES, "onnx")
        if dtype == "bfloat16" and not (device.type == "cpu" and platform.machine() in ("aarch64", "arm64")):
            raise ValueError("dtype 'bfloat16' in onnxruntime needs an ARM64 CPU (its bf16 fast-math GEMM); "
                             "this machine has no bf16 path there: use float32, float16 or int8")
        # read again as each session is made; a typo fails the load, not every call (each file of an embed job)
        onnx_threads(), onnx_prepack()
        self.device, self.dtype = device, dtype
        self.dims = model.dims
        self.reference = ReferenceWeights(model)  # released once a session holds the weights
        # (num_layers, hidden_states) -> session, the least recently used first
        self.sessions: OrderedDict[tuple[int, bool], object] = OrderedDict()
        self.evicted: set[tuple[int, bool]] = set()  # keys whose session was dropped: a reload warns, once
        self.reload_warned = False
        self.untrimmed: set[tuple[int, bool]] = set()  # sessions that ran past TRIM_AFTER_SAMPLES since a trim
        self.lock = ForkSafeLock(level=0)  # held while a graph is exported: a fork waits for it
        _backends.add(self)

    def __repr__(self) -> str:
        return f"OnnxBackend({self.dims.family}, {self.dtype}, {self.providers[0]})"

    def session_options(self):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = onnx_threads()
        options.inter_op_num_threads = 1
        options.enable_cpu_mem_arena = True  # reuse activation buffers across calls
        # The pool's threads spin between a run's parallel loops (quick hand-offs) but stop when it
        # ends: by default they spin on for tens of ms (about 50 ms on a Xeon), taking the cores from
        # whatever the caller runs next, its own torch work or another model included.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        if not onnx_prepack():
            options.add_session_config_entry("session.disable_prepacking", "1")
        if self.dtype == "bfloat16":
            options.add_session_config_entry("mlas.enable_gemm_fastmath_arm64_bfloat16", "1")
        return options

    def graph_path(self, num_layers: int, hidden_states: bool, rebuild_reason: str | None = None) -> str:
        spec = ExportSpec(num_layers=num_layers, hidden_states=hidden_states, dtype=GRAPH_DTYPE[self.dtype],
                          fused_attention=True)
        return self.reference.graph_path(spec, rebuild_reason)

    def session(self, num_layers: int, hidden_states: bool = False):
        """The session of the graph that runs ``num_layers`` layers, created on first use. Graphs that
        also return every layer's hidden states are separate: a graph output is kept whether it is
        fetched or not, and all of whisper-large-v3's for 16 windows would take 4 GB."""
        import onnxruntime as ort

        key = (num_layers, hidden_states)
        session = self.sessions.get(key)  # a graph in use never waits for another's export
        if session is not None:
            with contextlib.suppress(KeyError):  # evicted meanwhile: its runs hold it until they end
                self.sessions.move_to_end(key)
            return session
        with self.lock:
            if key not in self.sessions:
                options = self.session_options()  # its errors are the caller's, not the graph's
                while len(self.sessions) >= SESSION_CACHE_SIZE:  # before the new one loads: a lower peak
                    self.evicted.add(self.sessions.popitem(last=False)[0])
                if key in self.evicted and not self.reload_warned:
                    self.reload_warned = True  # once per encoder
                    warnings.warn(f"audioenc: the onnx backend keeps the {SESSION_CACHE_SIZE} sessions last used "
                                  "(one per depth, and apart for hidden states), so a dropped one is loaded again, "
                                  "which takes about a second; for several layers of each input, ask for "
                                  "output_hidden_states=True, which returns every layer from one run",
                                  UserWarning, stacklevel=2)
                path = self.graph_path(*key)
                self.reference.release()  # before the session loads its own copy: a lower peak
                try:
                    session = ort.InferenceSession(path, options, providers=self.providers)
                except Exception as exc:  # onnxruntime raises its own exception types for a bad graph
                    path = self.graph_path(*key, rebuild_reason=f"onnxruntime could not load it: {exc}")
                    self.reference.release()
                    session = ort.InferenceSession(path, options, providers=self.providers)
                return_freed_memory()  # the graph's file image, read to build the session, and an evicted session
                self.sessions[key] = session
            return self.sessions[key]

    def fused_op_counts(self, num_layers: int | None = None) -> dict[str, int]:
        """How many of FUSED_OPS the optimised graph holds (saved once by ORT and counted)."""
        import tempfile

        import onnx
        import onnxruntime as ort

        num_layers = self.dims.num_layers if num_layers is None else num_layers
        with tempfile.TemporaryDirectory() as tmp:
            options = self.session_options()
            options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
            options.log_severity_level = 3  # not its warning that a saved optimised graph is machine-specific
            with self.lock:
                path = self.graph_path(num_layers, hidden_states=False)
                self.reference.release()
            ort.InferenceSession(path, options, providers=self.providers)
            graph = onnx.load(options.optimized_model_filepath, load_external_data=False).graph
        counts = {op: 0 for op in FUSED_OPS}
        for node in graph.node:
            if node.op_type in counts:
                counts[node.op_type] += 1
        return counts

    def trim(self) -> None:
        """Hands back the activation memory that runs over 30 s of audio left in onnxruntime's CPU
        arena, which otherwise keeps its peak for the life of the session (wav2vec2-base: 2.4 GB
        resident after a 4-minute encode, 0.8 GB once trimmed). A run of the shortest input with
        arena shrinkage on frees it, in about 10 ms. Whisper's graphs take only whole 30 s windows, so
        a trim would cost a window: theirs are not trimmed."""
        if not self.untrimmed:
            return
        import numpy as np
        import onnxruntime as ort

        options = ort.RunOptions()
        options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        shortest = self.dims.receptive_field
        feeds = {"waveforms": np.zeros((1, shortest), np.float32), "lengths": np.array([shortest])}
        while True:
            try:
                key = self.untrimmed.pop()
            except KeyError:  # empty, or another thread took the last one
                return
            session = self.sessions.get(key)
            if session is None:  # evicted: its arena went with it
                continue
            with fork_waits():  # as run_batch's calls
                session.run(["last_hidden_state"], feeds, options)

    @torch.inference_mode()
    def run(self, inputs: torch.Tensor, lengths: torch.Tensor | None, num_layers: int,
            output_hidden_states: bool = True):
        if self.dtype != "int8" or inputs.shape[0] == 1:
            return self.run_batch(inputs, lengths, num_layers, output_hidden_states)
        # Dynamic quantisation scales an activation by its range over the whole batch tensor, so an
        # item's int8 frames would depend on the rest of its batch: each item runs alone, at its length.
        runs = [self.run_batch(inputs[i : i + 1] if lengths is None else inputs[i : i + 1, : int(lengths[i])],
                               None if lengths is None else lengths[i : i + 1], num_layers, output_hidden_states)
                for i in range(inputs.shape[0])]
        frames = self.dims.n_ctx if lengths is None else self.dims.num_frames(inputs.shape[1])

        def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:  # (1, f_i, D) each -> (B, frames, D), 0-padded
            out = tensors[0].new_zeros(len(tensors), frames, tensors[0].shape[-1])
            for i, t in enumerate(tensors):
                out[i, : t.shape[1]] = t[0]
            return out

        hidden_states = [stacked([run[1][j] for run in runs]) for j in range(len(runs[0][1]))]
        frame_lengths = None if lengths is None else torch.cat([run[2] for run in runs])
        return stacked([run[0] for run in runs]), hidden_states, frame_lengths

    def run_batch(self, inputs: torch.Tensor, lengths: torch.Tensor | None, num_layers: int,
                  output_hidden_states: bool = True):
        """One session run over the whole batch (the graph masks each item's padding)."""
        session = self.session(num_layers, output_hidden_states)
        device = self.device
        batch = inputs.shape[0]
        feeds = {"mel": inputs} if lengths is None else {"waveforms": inputs, "lengths": lengths}
        feeds = {name: t.to(device, torch.int64 if name == "lengths" else torch.float32).contiguous()
                 for name, t in feeds.items()}
        if isinstance(self.dims, WhisperDims):
            frames = self.dims.n_ctx
        else:
            frames = self.dims.num_frames(inputs.shape[1])
        shape = (batch, frames, self.dims.hidden_size)
        if device.type == "cuda":  # onnxruntime runs on its own stream: torch's work on the inputs must be done
            torch.cuda.current_stream(device).synchronize()
        with fork_waits():  # a child forked while these calls hold the session's mutexes would hang on them
            outputs = {o.name: torch.empty(batch, dtype=torch.int64, device=device) if o.name == "frame_lengths"
                       else torch.empty(shape, dtype=torch.float32, device=device) for o in session.get_outputs()}
            binding = session.io_binding()
            for name, tensor in feeds.items():
                bind(binding.bind_input, name, tensor)
            for name, tensor in outputs.items():
                bind(binding.bind_output, name, tensor)
            session.run_with_iobinding(binding)
        if device.type == "cpu" and lengths is not None and inputs.numel() > TRIM_AFTER_SAMPLES:
            self.untrimmed.add((num_layers, output_hidden_states))
        hidden_states = [outputs[f"hidden_state_{i}"] for i in range(num_layers + 1)] if output_hidden_states else []
        return outputs["last_hidden_state"], hidden_states, outputs.get("frame_lengths")


def onnx_threads() -> int:
    """onnxruntime's intra-op threads: $AUDIOENC_ONNX_THREADS, else torch's intra-op thread count, at
    most the cores this process may run on. Following torch keeps a DataLoader worker (torch runs
    one thread there) or a caller's torch.set_num_threads(n) from starting a thread per core in
    every process."""
    value = os.environ.get("AUDIOENC_ONNX_THREADS", "").strip()
    if value:
        if not value.isdecimal() or int(value) < 1:
            raise ValueError(f"AUDIOENC_ONNX_THREADS must be a whole number >= 1, got {value!r}")
        return int(value)
    return max(1, min(usable_cores(), torch.get_num_threads()))


def onnx_prepack() -> bool:
    """Whether sessions prepack their MatMul weights ($AUDIOENC_ONNX_PREPACK, default 1). Prepacked
    weights are a private copy per session, per depth and per process (wav2vec2-base: about 350 MB
    in float32); without them sessions read the mapped graph file, which processes share, at up to
    8% more time per call (2 AVX-512 cores, 10 s and 30 s inputs)."""
    value = os.environ.get("AUDIOENC_ONNX_PREPACK", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"AUDIOENC_ONNX_PREPACK must be 0 or 1, got {value!r}")
    return value == "1"


def bind(method, name: str, tensor: torch.Tensor) -> None:
    """Binds a contiguous torch tensor's memory to a graph input or output (no copies)."""
    import numpy as np

    element = np.int64 if tensor.dtype == torch.int64 else np.float32
    method(name, tensor.device.type, tensor.device.index or 0, element, tuple(tensor.shape), tensor.data_ptr())
