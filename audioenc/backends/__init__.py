"""Backends run a family's model on prepared inputs; the torch backend is the reference.

Each backend is a class in its own module here, found through BACKENDS, with

    available() -> str | None            classmethod: None when usable here, else the reason
    __init__(model, device, dtype)       model: the float32 reference nn.Module on the CPU, which the
                                         backend owns from then on (onnx and tensorrt free its weights);
                                         device: torch.device; dtype: the user's string ("auto" resolved
                                         by the backend, which also rejects dtypes it cannot run)
    run(inputs, lengths, num_layers, output_hidden_states=True) -> (output, hidden_states, frame_lengths)
        Whisper: inputs = log-mel windows (B, n_mels, 3000), lengths None, frame_lengths None.
        wav2vec2 family: normalised waveforms (B, samples) and valid samples per item (B,).
        hidden_states: list of num_layers + 1 tensors (Hugging Face convention), output the last
        layer's output (after the final LayerNorm when every layer ran and the model has one);
        an empty list when output_hidden_states is False (spares the triton backend their copies).
    name, device, dtype                  attributes, for repr and info
    trim()                               optional: called at the end of every encode, to hand back
                                         memory that big runs left in the backend's allocator (onnx)

Modules are imported only when their backend is asked for.
"""
from __future__ import annotations

import importlib
import importlib.util

BACKENDS = {
    "torch": ("audioenc.backends.torch", "TorchBackend"),
    "triton": ("audioenc.backends.triton", "TritonBackend"),
    "onnx": ("audioenc.backends.onnx", "OnnxBackend"),
    "tensorrt": ("audioenc.backends.tensorrt", "TensorRTBackend"),
}
AUTO_ORDER = {"cuda": ("triton", "tensorrt", "torch"), "cpu": ("onnx", "torch")}


def import_problem(modules: tuple[str, ...], install: str, found_only: tuple[str, ...] = ()) -> str | None:
    """None when every module imports (those in ``found_only``: is installed), else why not: not
    installed, or installed but broken (a missing shared library, a mismatched build)."""
    for module in found_only:
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed ({install})"
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            if exc.name == module:
                return f"{module} is not installed ({install})"
            return f"{module} is installed but cannot be imported ({type(exc).__name__}: {exc})"
    return None


def resolve_dtype(dtype: str, device, supported, backend: str) -> str:
    """A backend's dtype: "auto" is float16 on a GPU and float32 on the CPU; others must be supported."""
    if dtype == "auto":
        dtype = "float16" if device.type == "cuda" else "float32"
    if dtype not in supported:
        raise ValueError(f"dtype {dtype!r} is not supported by the {backend} backend; choose auto, {', '.join(supported)}")
    return dtype


def backend_class(name: str):
    """The backend's class, or a ValueError saying why it cannot be used here."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a name (auto, {', '.join(BACKENDS)}), got {type(name).__name__}")
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is unknown; choose one of auto, {', '.join(BACKENDS)}")
    module_name, class_name = BACKENDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise ValueError(f"backend {name!r} is not in this version of audioenc") from None
        raise
    cls = getattr(module, class_name)
    reason = cls.available()
    if reason is not None:
        raise ValueError(f"backend {name!r} is not available here: {reason}")
    return cls


def availability(name: str) -> str | None:
    """None when ``name`` can run here, else the reason (for ``audioenc info``)."""
    try:
        backend_class(name)
    except ValueError as exc:
        return str(exc).split(": ", 1)[-1] if "not available here" in str(exc) else str(exc)
    return None


def resolve_backend(name: str, device_type: str) -> str:
    """'auto' -> the first backend of AUTO_ORDER that runs here; other names are checked."""
    if not isinstance(name, str) or name != "auto":
        backend_class(name)
        return name
    for candidate in AUTO_ORDER.get(device_type, ("torch",)):
        if availability(candidate) is None:
            return candidate
    return "torch"


def auto_note(chosen: str, device_type: str) -> str | None:
    """Why 'auto' passed over faster backends to run ``chosen`` (None when it took the first): the CLI
    says so, since a missing optional dependency otherwise costs speed silently."""
    skipped = []
    for candidate in AUTO_ORDER.get(device_type, ()):
        if candidate == chosen:
            break
        reason = availability(candidate)
        if reason is not None:
            skipped.append(f"{candidate}: {reason}")
    return f"backend auto chose {chosen} ({'; '.join(skipped)})" if skipped else None
