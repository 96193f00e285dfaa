"""CTranslate2 (faster-whisper's engine) running the weights of an audioenc Whisper reference model:
the peer that ``audioenc bench --against ctranslate2[:COMPUTE_TYPE]`` times side by side with
audioenc's backends, on the same checkpoint and machine, and whose frames it compares with theirs.

It runs what faster-whisper's encoder step runs: a log-mel of 30 s windows on the CPU
(transformers' WhisperFeatureExtractor, torch's STFT where torch is installed, about 16 ms per
window on one core; faster-whisper's own numpy one takes the STFT of the audio only, then pads the
mel: cheaper for short items, and other frames past the audio), then CTranslate2's
Whisper encoder at the compute type asked for. The weights reach CTranslate2 the way
faster-whisper's models are made, through its converter for transformers checkpoints.
"""
from __future__ import annotations

import tempfile
from typing import Callable

import numpy as np
import torch
from torch import nn

from audioenc.backends.onnx import onnx_threads
from audioenc.config import SAMPLE_RATE, WhisperDims


def default_compute_type(device: torch.device) -> str:
    """What faster-whisper's default compute type gives for its published float16 models: float16
    on a GPU, float32 on a CPU (CTranslate2 has no float16 matmuls there)."""
    return "float16" if device.type == "cuda" else "float32"


def convert(reference: nn.Module, out_dir: str) -> None:
    """Writes the reference's Whisper encoder as a CTranslate2 model (float32 weights, converted to
    the compute type when loaded). The converter needs a whole Whisper model: the decoder is one
    random layer that the encoder never runs."""
    import ctranslate2
    import transformers

    from audioenc.peer_transformers import hf_config, hf_model

    dims = reference.dims
    config = hf_config(dims)
    config.update(dict(decoder_layers=1, decoder_attention_heads=dims.n_head, decoder_ffn_dim=dims.n_ffn))
    whisper = transformers.WhisperForConditionalGeneration(config)
    whisper.model.encoder = hf_model(reference)  # holds the reference's weights: no second copy
    with tempfile.TemporaryDirectory() as hf_dir:
        whisper.save_pretrained(hf_dir)
        transformers.WhisperFeatureExtractor(feature_size=dims.n_mels).save_pretrained(hf_dir)
        del whisper
        ctranslate2.converters.TransformersConverter(hf_dir).convert(out_dir, force=True)


def ctranslate2_call(reference: nn.Module, device: torch.device,
                     compute_type: str) -> Callable[[list[np.ndarray]], torch.Tensor]:
    """audio (a list of 16 kHz float32 arrays) -> CTranslate2's encoder output (B, frames, dim), float32."""
    dims = reference.dims  # the model first: installing a package would not make CTranslate2 run it
    if not isinstance(dims, WhisperDims):
        raise ValueError(f"CTranslate2 runs Whisper encoders (faster-whisper's engine), not {dims.family}")
    try:
        import ctranslate2
        import transformers
    except ImportError as exc:  # the converter reads transformers checkpoints
        raise ValueError(f"CTranslate2's Whisper needs ctranslate2 and transformers (pip install ctranslate2 "
                         f"transformers): {exc}") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"CTranslate2 runs on cpu or cuda, not {device.type}")
    supported = ctranslate2.get_supported_compute_types(device.type)
    if compute_type not in supported:
        raise ValueError(f"CTranslate2 has no compute type {compute_type!r} on this {device.type}; "
                         f"it has {', '.join(sorted(supported))}")
    with tempfile.TemporaryDirectory() as ct2_dir:
        convert(reference, ct2_dir)
        # The threads audioenc's onnx backend runs (torch's count, at most the usable cores): not every
        # usable core, which on a machine with hyperthreads is twice torch's default (its physical cores).
        model = ctranslate2.models.Whisper(ct2_dir, device=device.type, device_index=device.index or 0,
                                           compute_type=compute_type, intra_threads=onnx_threads())
    extractor = transformers.WhisperFeatureExtractor(feature_size=dims.n_mels)

    def call(audio: list[np.ndarray]) -> torch.Tensor:
        features = extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
        on_gpu = device.type == "cuda"  # the output kept there, as faster-whisper keeps it (and audioenc's is)
        out = model.encode(ctranslate2.StorageView.from_array(np.ascontiguousarray(features)), to_cpu=not on_gpu)
        if on_gpu:
            torch.cuda.synchronize(device)  # every stream of the device: CTranslate2 runs on its own
            return torch.as_tensor(out, device=device).float()  # via __cuda_array_interface__, then copied
        return torch.from_numpy(np.asarray(out).astype(np.float32))

    return call
