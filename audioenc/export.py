"""ONNX export of the reference models: one graph per family, checked, optionally in half precision
or int8 (graph_precision.py), written to a directory or cached on disk under a key of everything
that made it. The traced modules are in graph_modules.py.

Graphs (opset 17, so LayerNorm stays one LayerNormalization op):
    wav2vec2 / HuBERT / WavLM: waveforms (B, samples) float32, lengths (B,) int64
                               -> last_hidden_state (B, frames, D), frame_lengths (B,) int64[, hidden_state_i]
    Whisper:                   mel (B, n_mels, 3000) float32 -> last_hidden_state (B, 1500, D)[, hidden_state_i]
Batch and time are dynamic; Whisper's mel is one 30 s window (2 x n_ctx frames), so only its batch
is. hidden_state_0 .. hidden_state_N follow the backend protocol (Hugging Face convention). A graph
runs the first ``num_layers`` layers only.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib.metadata
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from audioenc.atomic_file import PathTaken, atomic_write_bytes, move_into_place
from audioenc.cache import META_FILE, cache_root, mark_used
from audioenc.checkpoint_record import weights_digest
from audioenc.config import SAMPLE_RATE, WHISPER_HOP, WhisperDims
from audioenc.file_lock import file_lock
from audioenc.fork_safe_lock import ForkSafeLock
from audioenc.fused_attention import fuse_attention, place_optional_inputs
from audioenc.graph_modules import example_inputs, graph_io, graph_module, trace_inputs
from audioenc.graph_precision import check_half_headroom, half_activation_peaks, int8_reduce_range, quantize_int8, to_half
from audioenc.progress import progress_bar
from audioenc.torch_defaults import float32_on_cpu

log = logging.getLogger(__name__)
_EXPORT_LOCK = ForkSafeLock(level=1)  # taken inside a backend's lock (level 0)

OPSET = 17
DTYPES = ("float32", "float16", "int8")
# Training-only or random ops, data-dependent control flow, and exporter fallbacks to torch ops: none
# may appear in a deployable graph.
FORBIDDEN_OPS = frozenset({
    "Dropout", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli",
    "Multinomial", "If", "Loop", "Scan", "SequenceConstruct", "SequenceAt", "ATen", "PythonOp",
    "BatchNormalization", "Gradient",
})
MODEL_FILE = "model.onnx"
PROTOBUF_LIMIT = 1 << 30  # larger graphs keep their weights in an external data file


# ---------------------------------------------------------------------------------------------------
# Export and checks


def export_onnx(model: nn.Module, path: str, num_layers: int | None = None, hidden_states: bool = True,
                opset: int = OPSET, fused_attention: bool = False, convs_as_matmul: bool = False,
                fold_first_norm: bool = False, external: bool = False) -> None:
    """Exports ``model`` (a float32 reference model) to ``path`` and checks the graph. With
    ``fused_attention`` each attention is one onnxruntime MultiHeadAttention op (onnxruntime only);
    ``convs_as_matmul`` writes the feature encoder's convs as MatMuls (for int8 quantisation);
    ``fold_first_norm`` a group-norm layer 0 as one MatMul with float64 statistics (onnxruntime's
    float32 and int8 graphs only); ``external`` as save_onnx takes it."""
    import onnx

    dims = model.dims
    num_layers = dims.num_layers if num_layers is None else num_layers
    if not 0 <= num_layers <= dims.num_layers:
        raise ValueError(f"num_layers must be between 0 and {dims.num_layers}, got {num_layers}")
    module = graph_module(model, num_layers, hidden_states, convs_as_matmul, fold_first_norm)
    if fused_attention:
        fuse_attention(module)
    inputs, outputs, axes = graph_io(dims, num_layers, hidden_states)
    args = trace_inputs(dims)
    # Traced into memory where one protobuf holds the graph, which spares writing the weights to a
    # file and reading them back (wav2vec2-base: 0.5 s of a 4 s first use). torch writes a larger
    # graph as a file with one file per weight beside it.
    in_memory = sum(t.numel() * t.element_size() for t in module.state_dict().values()) <= PROTOBUF_LIMIT
    with tempfile.TemporaryDirectory(dir=os.path.dirname(os.path.abspath(path))) as tmp:
        raw = io.BytesIO() if in_memory else os.path.join(tmp, "raw.onnx")
        # One export at a time in the process: torch.onnx.export changes global state.
        with _EXPORT_LOCK, exporter_warnings_ignored():
            # no_grad: with autograd on, tracing would keep every activation for a backward pass
            # (whisper-large-v3's attention matrices: 14 GB instead of 5.5 GB at the peak)
            with torch.no_grad():
                torch.onnx.export(module, args, raw, dynamo=False, opset_version=opset, input_names=inputs,
                                  output_names=outputs, dynamic_axes=axes, do_constant_folding=True,
                                  # (a graph of no layers has no attention: torch warns of an unused domain)
                                  custom_opsets={"com.microsoft": 1} if fused_attention and num_layers else None)
        proto = onnx.load_from_string(raw.getvalue()) if in_memory else onnx.load(raw)
    del raw
    place_optional_inputs(proto)
    if isinstance(dims, WhisperDims):  # traced on 2 s; the encoder takes whole 30 s windows only
        proto.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 2 * dims.n_ctx
    save_onnx(proto, path, external)
    check_graph(path)


# (category, message, module) of the warnings that torch.onnx.export gives on every export
EXPORTER_WARNINGS = [
    # the tracer notes that shapes become constants; graph_io's dynamic axes keep them dynamic
    (torch.jit.TracerWarning, "", r"audioenc\."),
    # the TorchScript exporter is deprecated, but it is the one that writes opset 17 without onnxscript
    (DeprecationWarning, "You are using the legacy TorchScript-based ONNX export", r"audioenc\."),
    (DeprecationWarning, "", r"torch\.onnx\."),  # and its own internals' ("The feature will be removed")
]


@contextlib.contextmanager
def exporter_warnings_ignored():
    """Inside: EXPORTER_WARNINGS are ignored. The filter list is the process's: warnings.catch_warnings
    would put the whole list (and warnings.showwarning) back on its way out, dropping what another
    thread set meanwhile (a service's warnings.simplefilter("error"), logging.captureWarnings), and
    would hide every DeprecationWarning of every thread while an export runs (minutes for large
    models). So only these narrow filters are added, and only they are taken out again."""
    added, into = [], warnings.filters
    for category, message, module in EXPORTER_WARNINGS:
        warnings.filterwarnings("ignore", message, category, module)
        # the entry as filterwarnings stores it (warnings.filters' documented form)
        added.append(("ignore", re.compile(message, re.IGNORECASE) if message else None, category,
                      re.compile(module) if module else None, 0))
    try:
        yield
    finally:
        # from the list they went into, and from the one in use now if another thread's catch_warnings
        # swapped in its copy meanwhile (it puts back the first on its way out)
        for filters in {id(into): into, id(warnings.filters): warnings.filters}.values():
            for entry in added:
                with contextlib.suppress(ValueError):  # gone already (warnings.resetwarnings, say)
                    filters.remove(entry)


def save_onnx(proto, path: str, external: bool = False) -> None:
    """Saves a graph, with its weights in ``path + '.data'`` when ``external`` or when protobuf could
    not hold them."""
    import onnx
    from onnx.external_data_helper import set_external_data

    # Summed per weight: protobuf cannot even measure a message past 2 GB (whisper-large's encoder).
    if external or sum(weight.ByteSize() for weight in proto.graph.initializer) > PROTOBUF_LIMIT:
        # Written here rather than by onnx.save_model, which refuses when a file of the data file's
        # name exists in the current directory (it checks the name relative to the cwd) and
        # appends to an existing data file instead of replacing it.
        location = os.path.basename(path) + ".data"
        with open(path + ".data", "wb") as data:
            for weight in proto.graph.initializer:
                if weight.HasField("raw_data") and len(weight.raw_data) >= 1024:
                    data.seek(-data.tell() % 4096, os.SEEK_CUR)  # page-aligned, so it can be mapped
                    set_external_data(weight, location, data.tell(), len(weight.raw_data))
                    data.write(weight.raw_data)
                    weight.ClearField("raw_data")
    onnx.save_model(proto, path)


def forbidden_ops(proto) -> list[str]:
    """Names of forbidden ops anywhere in the graph, subgraphs included."""
    found = []

    def walk(graph):
        for node in graph.node:
            if node.op_type in FORBIDDEN_OPS or node.domain not in ("", "ai.onnx", "com.microsoft"):
                found.append(f"{node.domain or 'ai.onnx'}::{node.op_type} ({node.name})")
            for attr in node.attribute:
                if attr.g.node:
                    walk(attr.g)
                for g in attr.graphs:
                    walk(g)

    walk(proto.graph)
    return found


def check_graph(path: str) -> None:
    """onnx.checker, full shape inference, opset and the forbidden-op walk; ValueError on any failure."""
    import onnx

    onnx.checker.check_model(path, full_check=True)  # full_check runs strict shape inference
    proto = onnx.load(path, load_external_data=False)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset < OPSET:
        raise ValueError(f"{path}: opset {opset} < {OPSET}")
    bad = forbidden_ops(proto)
    if bad:
        raise ValueError(f"{path}: forbidden ops in the graph: {', '.join(bad[:8])}")
    # audio in float32 (lengths in int64), frames out in float32, whatever the graph computes inside
    typed = [v for v in (*proto.graph.input, *proto.graph.output)
             if v.type.tensor_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT64)]
    if typed:
        raise ValueError(f"{path}: the graph's inputs and outputs must be float32 (lengths int64): "
                         + ", ".join(f"{v.name} is {onnx.TensorProto.DataType.Name(v.type.tensor_type.elem_type)}"
                                     for v in typed))


# ---------------------------------------------------------------------------------------------------
# The on-disk cache


@dataclass(frozen=True)
class ExportSpec:
    """What an exported graph is made of, besides the weights."""

    num_layers: int
    hidden_states: bool = True
    dtype: str = "float32"
    opset: int = OPSET
    fused_attention: bool = False  # onnxruntime's MultiHeadAttention op: for the onnx backend only

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"export dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")


def code_digest() -> str:
    """Digest of the sources that define a graph (the export's files and the models), so a development
    checkout never reuses a graph exported by older code under the same version number."""
    from audioenc import fused_attention, graph_modules, graph_precision, models, quantized_convs

    h = hashlib.blake2b(digest_size=16)
    models_dir = models.__path__[0]
    sources = [__file__, fused_attention.__file__, graph_modules.__file__, graph_precision.__file__, quantized_convs.__file__,
               *sorted(os.path.join(models_dir, n) for n in os.listdir(models_dir) if n.endswith(".py"))]
    for path in sources:
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()


def cache_key(model: nn.Module, spec: ExportSpec, weights: str | None = None) -> str:
    """Hash of the weights, dims, family, export options and the versions that shape the graph."""
    import audioenc

    fields = {
        "weights": weights or weights_digest(model),
        "dims": repr(model.dims),
        "family": model.dims.family,
        "spec": repr(spec),
        "audioenc": audioenc.__version__,
        "code": code_digest(),
        "torch": torch.__version__,
        "onnx": importlib.metadata.version("onnx"),  # not `import onnx`: 0.1 s that a cached graph's load skips
    }
    if spec.dtype == "int8":
        fields["int8_reduce_range"] = int8_reduce_range()
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def file_digest(path: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_stat(path: str) -> list[int]:
    """Size and modification time (ns): a file whose stat still matches the one recorded when it was
    written and checksummed is taken as intact without reading it again (whisper-large-v3's 2.5 GB
    graph took 2 s to hash at every load), as make and git's index do; a write changes them, but
    for one of the same size within one tick of a coarse file system clock."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def write_meta(entry: str, meta: dict) -> None:
    """meta.json, replaced atomically."""
    atomic_write_bytes(os.path.join(entry, META_FILE), json.dumps(meta, indent=1).encode())


def entry_problem(entry: str, key: str) -> str | None:
    """None when the cache entry is complete and intact, else what is wrong with it. A file is
    checksummed when its stat differs from the one recorded (a copied cache: recorded anew once the
    checksums pass, where the cache is writable)."""
    try:
        with open(os.path.join(entry, META_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError) as exc:
        return f"no readable {META_FILE} ({exc})"
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not all(isinstance(d, str) for d in files.values()):
        return f"{META_FILE} is not an audioenc cache record"
    if meta.get("key") != key:
        return "its key does not match"
    if MODEL_FILE not in files:
        return f"{MODEL_FILE} is not recorded"
    stats = meta.get("stats") if isinstance(meta.get("stats"), dict) else {}
    checked = {}
    for name, digest in files.items():
        path = os.path.join(entry, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        stat = file_stat(path)
        if stats.get(name) == stat:
            continue
        if file_digest(path) != digest:
            return f"{name} does not match its checksum"
        checked[name] = stat
    if checked:
        try:
            write_meta(entry, {**meta, "stats": {**stats, **checked}})
        except OSError:  # a read-only cache: its files are checksummed at every use
            pass
    return None


def check_disk_space(model: nn.Module, spec: ExportSpec, directory: str) -> None:
    """OSError (ENOSPC) unless ``directory``'s disk can hold the export at its peak: the float32
    weights once (the trace's files are gone before the graph is saved), twice for a float16 or int8
    graph: the float32 one runs once as a copy with its activations' reductions added (graph_precision.
    reduced_activations; weights that fit in the graph file are copied with it), then the smaller
    graph is written beside it. A disk that fills up mid-trace leaves
    weights silently empty (the tracer's writer does not report it; onnx's checker then fails with a
    puzzling message), so this is checked first."""
    weights = sum(t.numel() * 4 for t in model.state_dict().values())
    needed = weights * (1.0 if spec.dtype == "float32" else 2.0) * 1.1 + (64 << 20)
    free = shutil.disk_usage(directory).free
    if free < needed:
        place = os.path.dirname(os.path.abspath(directory))  # the export's own temporary folder is inside it
        in_cache = os.path.commonpath([place, os.path.abspath(cache_root())]) == os.path.abspath(cache_root())
        hint = " (the cache's place is $AUDIOENC_CACHE; `audioenc cache --clear` empties it)" if in_cache else ""
        raise OSError(errno.ENOSPC, f"not enough disk space for the ONNX export in {place}: it needs about "
                                    f"{needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB are free{hint}")


def int8_convs_per_block(dims) -> bool:
    """Whether an int8 graph quantises the conv feature encoder (layers 1-6) with a scale per block
    of frames (quantized_convs) rather than one per call. In group-norm models (wav2vec2-base,
    HuBERT-base, WavLM-base) the conv activations follow the audio's loudness, and one scale per call
    left the quiet frames of speech a few int8 steps: a mean frame cosine to float32 of 0.64-0.99 on
    speech with pauses, by the weights' initialisation. Layer-norm models normalise each frame, so one
    scale serves, at 5% less time for wav2vec2-large-lv60 on 10 s (2 AVX-512 cores)."""
    return getattr(dims, "feat_extract_norm", None) == "group"


@float32_on_cpu()  # traced as the model was built, whatever torch defaults the caller set
def build_graph(model: nn.Module, spec: ExportSpec, directory: str, external: bool = False) -> None:
    """Writes ``directory/model.onnx`` (+ .data) for ``spec``, with a progress bar on stderr (a
    whisper-large export takes minutes). ``external``: the weights in model.onnx.data whatever their
    size (see save_onnx)."""
    check_disk_space(model, spec, directory)
    path = os.path.join(directory, MODEL_FILE)
    fp32 = path if spec.dtype == "float32" else os.path.join(directory, "fp32.onnx")
    layers = f"{spec.num_layers} layer{'' if spec.num_layers == 1 else 's'}"
    # only on a terminal (tqdm's disable=None); none at all without a stderr (a service started with it
    # closed, pythonw), where tqdm would write to None and the export fail
    on_terminal = sys.stderr is not None and (not hasattr(sys.stderr, "isatty") or sys.stderr.isatty())
    with progress_bar(on_terminal, total=1 if spec.dtype == "float32" else 3, file=sys.stderr,
                      desc=f"audioenc: exporting {model.dims.family} ({layers}, {spec.dtype}) to ONNX",
                      bar_format="{desc}: {n}/{total} steps [{elapsed}]{postfix}") as bar:
        bar.set_postfix_str("tracing the float32 graph")
        export_onnx(model, fp32, spec.num_layers, spec.hidden_states, spec.opset, spec.fused_attention,
                    convs_as_matmul=spec.dtype == "int8",
                    fold_first_norm=spec.fused_attention and spec.dtype != "float16",
                    external=external and spec.dtype == "float32")
        bar.update()
        if spec.dtype != "float32":
            if spec.dtype == "float16":
                bar.set_postfix_str("checking float16 headroom and converting")
                check_half_headroom(half_activation_peaks(fp32, example_inputs(model.dims)))
                save_onnx(to_half(fp32), path, external)
            else:
                bar.set_postfix_str("quantising to int8")
                quantize_int8(fp32, path, external, example_inputs(model.dims, batch=1),
                              convs_per_block=int8_convs_per_block(model.dims))
            bar.update()
            for name in os.listdir(directory):
                if name.startswith("fp32.onnx"):
                    os.remove(os.path.join(directory, name))
            bar.set_postfix_str("checking the graph")
            check_graph(path)
            bar.update()
        bar.set_postfix_str("done")


def cached_graph(model: nn.Module, spec: ExportSpec, weights: str | None = None) -> str | None:
    """Path of the cached graph for (model, spec) when its entry is there and intact, else None.
    Needs only the model's dims when ``weights`` (its digest) is given."""
    key = cache_key(model, spec, weights)
    entry = os.path.join(cache_root(), "onnx", key)
    if not os.path.lexists(entry) or entry_problem(entry, key) is not None:
        return None
    mark_used(entry)
    return os.path.join(entry, MODEL_FILE)


def cached_export(model: nn.Module, spec: ExportSpec, weights: str | None = None, rebuild_reason: str | None = None) -> str:
    """Path of the cached graph for (model, spec), exported first when missing, stale or corrupt.

    An entry is a directory named by the key, written under a temporary name and renamed into
    place, with a meta.json of file checksums and stats checked before every use. ``rebuild_reason`` forces a
    rebuild (the caller found the entry unusable, e.g. onnxruntime refused it).
    """
    key = cache_key(model, spec, weights)
    root = os.path.join(cache_root(), "onnx")
    entry = os.path.join(root, key)
    if os.path.lexists(entry):
        problem = rebuild_reason or entry_problem(entry, key)
        if problem is None:
            mark_used(entry)
            return os.path.join(entry, MODEL_FILE)
        warnings.warn(f"audioenc: cached ONNX graph {entry} is unusable ({problem}); rebuilding it", stacklevel=2)
    unusable = _inode(entry)
    # One process exports a graph; the others that need it meanwhile (workers started together on an
    # empty cache) wait and take it, rather than each exporting it again at its CPU and memory.
    with file_lock(entry + ".lock", entry):
        if (os.path.lexists(entry) and (rebuild_reason is None or _inode(entry) != unusable)
                and entry_problem(entry, key) is None):  # exported by another process while this one waited
            mark_used(entry)
            return os.path.join(entry, MODEL_FILE)
        return _export_entry(model, spec, key, root, entry, rebuild_reason)


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def _export_entry(model: nn.Module, spec: ExportSpec, key: str, root: str, entry: str,
                  rebuild_reason: str | None) -> str:
    """Exports the graph into a temporary directory and renames it into place as ``entry``."""
    try:
        os.makedirs(root, exist_ok=True)
        tmp = os.path.join(root, f".tmp-{uuid.uuid4().hex}")
        os.mkdir(tmp)  # not mkdtemp's 0700: a shared cache's other users (a container's build user) read it too
    except OSError as exc:  # e.g. a container's read-only home
        raise OSError(exc.errno, f"cannot write the ONNX graph cache in {root} ({exc.strerror}); set AUDIOENC_CACHE "
                                 "to a writable directory") from exc
    try:
        log.info("audioenc: first use of this model at %d layers in %s: its ONNX graph is exported once and cached "
                 "in %s", spec.num_layers, spec.dtype, entry)
        # onnxruntime maps a page-aligned weights file where it copies a graph's inline weights:
        # 0.2 GB less resident for wav2vec2-base, and processes share the pages.
        build_graph(model, spec, tmp, external=True)
        names = sorted(os.listdir(tmp))
        write_meta(tmp, {"key": key, "spec": repr(spec), "family": model.dims.family,
                         "source": source_label(model),
                         "files": {name: file_digest(os.path.join(tmp, name)) for name in names},
                         "stats": {name: file_stat(os.path.join(tmp, name)) for name in names}})
        if os.path.lexists(entry) and (rebuild_reason is not None or entry_problem(entry, key) is not None):
            # the unusable entry found above; one that another process completed meanwhile stays
            if os.path.isdir(entry) and not os.path.islink(entry):
                shutil.rmtree(entry, ignore_errors=True)  # another process may be removing it too
            elif os.path.lexists(entry):  # a file or link where the entry belongs
                os.remove(entry)
        try:
            os.replace(tmp, entry)
        except OSError as exc:  # another process put a complete entry there first, or the old one stays
            if entry_problem(entry, key) is not None:
                raise OSError(exc.errno, f"cannot replace the unusable cache entry {entry} ({exc.strerror}; another "
                                         "user's, or read-only?): remove it, or set AUDIOENC_CACHE to a cache of "
                                         "your own") from exc
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return os.path.join(entry, MODEL_FILE)


def checkpoint_label(model: nn.Module) -> str | None:
    """The checkpoint ``model`` was read from: its path or hub id, or a model object's label
    ("Wav2Vec2ForCTC object (...)")."""
    return getattr(model, "checkpoint_source", None) or getattr(getattr(model, "checkpoint", None), "source", None)


def target_lang_of(model: nn.Module) -> str:
    """The MMS language adapter ``model`` was loaded with ("" for the checkpoint's own)."""
    return getattr(getattr(model, "checkpoint", None), "target_lang", "")


def source_label(model: nn.Module) -> str | None:
    """What the graphs and engines of ``model`` say they came from (`audioenc cache` shows it): its
    checkpoint_label, and an MMS checkpoint's language, whose graphs are entries of their own
    ("facebook/mms-1b-all, target_lang=fra")."""
    source, target_lang = checkpoint_label(model), target_lang_of(model)
    return f"{source}, target_lang={target_lang}" if source and target_lang else source


def describe_graph(model: nn.Module, spec: ExportSpec, path: str) -> None:
    """Records in the graph's metadata (``metadata_props``, which onnxruntime's
    ``get_modelmeta().custom_metadata_map`` reads) what it is and what feeding it takes, for a
    deployment without audioenc."""
    import onnx

    from audioenc import __version__

    dims = model.dims
    if isinstance(dims, WhisperDims):
        inputs = (f"mel (batch, {dims.n_mels}, {2 * dims.n_ctx}) float32: the log-mel of one 30 s window of 16 kHz "
                  "audio, zero-padded, as openai-whisper's log_mel_spectrogram or audioenc.frontend computes it")
    else:
        checkpoint = getattr(model, "checkpoint", None)
        normalize = checkpoint is None or bool(checkpoint.preprocessor.get("do_normalize", True))
        inputs = ("waveforms (batch, samples) float32 at 16 kHz, " + (
            "each item normalised over its valid samples ((x - mean) / sqrt(var + 1e-7)), " if normalize else
            "not normalised (the checkpoint's do_normalize is false), ") + "zero after them; lengths (batch,) int64")
    frame_rate = SAMPLE_RATE / (2 * WHISPER_HOP if isinstance(dims, WhisperDims) else dims.hop)
    source = checkpoint_label(model) or ""
    target_lang = target_lang_of(model)
    proto = onnx.load(path, load_external_data=False)
    onnx.helper.set_model_props(proto, {
        "producer": f"audioenc {__version__}", "family": dims.family, "dtype": spec.dtype,
        "checkpoint": os.path.basename(source.rstrip("/")) if os.path.exists(source) else source,  # not the user's tree
        **({"target_lang": target_lang} if target_lang else {}),  # MMS: the language adapter in the graph
        "layers": f"{spec.num_layers} of {dims.num_layers}", "hidden_states": str(spec.hidden_states).lower(),
        "inputs": inputs, "frames_per_second": f"{frame_rate:g}"})
    onnx.save(proto, path)


def export_to_dir(model: nn.Module, spec: ExportSpec, out_dir: str, overwrite: bool = False) -> list[str]:
    """Exports to ``out_dir/model.onnx`` (+ .data), built in a temporary directory and moved into
    place; existing files are kept unless ``overwrite``. Returns the written paths."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} is a file; the export needs a directory")
    target = os.path.join(out_dir, MODEL_FILE)
    existing = [path for path in (target, target + ".data") if os.path.lexists(path)]
    if existing and not overwrite:
        raise FileExistsError(f"{' and '.join(existing)} exist{'s' if len(existing) == 1 else ''}; pass overwrite "
                              "(--overwrite) to replace")
    created = []  # the folders this export makes, innermost first: a failed one removes them
    folder = os.path.abspath(out_dir)
    while not os.path.isdir(folder):
        created.append(folder)
        folder = os.path.dirname(folder)
    os.makedirs(out_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=out_dir, prefix=".tmp-")
    written = []
    try:
        build_graph(model, spec, tmp)
        describe_graph(model, spec, os.path.join(tmp, MODEL_FILE))
        if overwrite and os.path.exists(target + ".data") and not os.path.exists(os.path.join(tmp, MODEL_FILE + ".data")):
            os.remove(target + ".data")  # a stale weights file of an earlier, larger export
        for name in sorted(os.listdir(tmp), reverse=True):  # the .data file before the graph that needs it
            move_into_place(os.path.join(tmp, name), os.path.join(out_dir, name), replace=overwrite)
            written.append(os.path.join(out_dir, name))
    except PathTaken:  # another export to this directory finished first: keep its files whole
        for path in written:
            os.remove(path)
        written = []
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not written:  # a failed export leaves no trace
            for folder in created:
                if os.listdir(folder):
                    break
                os.rmdir(folder)
    return written
