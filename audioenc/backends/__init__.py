"""Backends run a family's model on prepared inputs; the torch backend is the reference.

A backend has ``run(inputs, lengths, num_layers) -> (output, hidden_states, frame_lengths)`` with
the semantics of the models in audioenc.models.
"""
from __future__ import annotations

BACKENDS = ("torch", "triton", "onnx", "tensorrt")
IMPLEMENTED = ("torch",)


def resolve_backend(name: str) -> str:
    if name == "auto":
        return "torch"  # the only backend this version implements
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is unknown; choose one of auto, {', '.join(BACKENDS)}")
    if name not in IMPLEMENTED:
        raise ValueError(f"backend {name!r} is not available in audioenc {__import__('audioenc').__version__}; "
                         f"available: {', '.join(IMPLEMENTED)}")
    return name
