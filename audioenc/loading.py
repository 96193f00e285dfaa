"""``audioenc.load``: checkpoint -> model -> backend -> AudioEncoder."""
from __future__ import annotations

import os

import torch

from audioenc.backends import resolve_backend
from audioenc.encoder import AudioEncoder
from audioenc.models import build_model, dims_of
from audioenc.presets import random_checkpoint
from audioenc.weights import load_checkpoint

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a valid torch device ({exc})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU here")
    return device


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load(source: str | os.PathLike, backend: str = "auto", device="auto", dtype="auto",
         family: str | None = None) -> AudioEncoder:
    """Loads an encoder.

    source: a local Hugging Face model dir, an openai-whisper .pt, a CTranslate2 (faster-whisper)
    Whisper dir, a fairseq wav2vec2/HuBERT .pt, a hub id (downloaded when online), or
    "random:NAME" for a real-size architecture with random weights (see audioenc.presets).
    family: when given, a checkpoint of another family is an error.
    """
    name = os.fspath(source) if isinstance(source, os.PathLike) else source
    if not isinstance(name, str):
        raise TypeError(f"source must be a path or a string, got {type(source).__name__}")
    random_weights = name.startswith("random:")
    if random_weights:
        checkpoint = random_checkpoint(name[len("random:"):])
        if family is not None and checkpoint.family != family:
            raise ValueError(f"{name}: expected a {family} architecture, got {checkpoint.family}")
    else:
        checkpoint = load_checkpoint(name, family=family)
    backend_name = resolve_backend(backend)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random architectures are the same every run
        model = build_model(checkpoint, random_weights=random_weights)
    if backend_name == "torch":
        from audioenc.backends.torch import TorchBackend

        runner = TorchBackend(model, torch_device, torch_dtype)
    return AudioEncoder(checkpoint.family, dims_of(checkpoint), runner, name, checkpoint.preprocessor, random_weights)
