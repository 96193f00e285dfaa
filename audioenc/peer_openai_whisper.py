"""openai-whisper's own encoder running the weights of an audioenc Whisper reference model: the peer
that ``audioenc bench --against openai-whisper[:DTYPE]`` times side by side with audioenc's backends,
on the same checkpoint and machine, and whose frames it compares with theirs.

It runs what ``whisper.transcribe`` runs before decoding: ``log_mel_spectrogram`` on the model's
device, of each item's first 30 s window, then the encoder, whose float32 weights are
cast to the input's dtype at each call (as ``whisper.load_model`` leaves them).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from audioenc.config import WhisperDims


def openai_names(encoder: nn.Module) -> dict[str, str]:
    """openai-whisper encoder parameter name -> the reference's name, from the table that loads
    openai-whisper checkpoints (audioenc.weights), so the two directions cannot disagree."""
    from audioenc.weights import _OPENAI_NAMES, _rename

    return {name: ours for ours, name in
            _rename({f"encoder.{name}": name for name in encoder.state_dict()}, _OPENAI_NAMES).items()}


def openai_whisper_encoder(reference: nn.Module) -> nn.Module:
    """openai-whisper's AudioEncoder holding the reference's weights (shared, not copied)."""
    dims = reference.dims  # the model first: installing openai-whisper would not make it run this one
    if not isinstance(dims, WhisperDims):
        raise ValueError(f"openai-whisper runs Whisper encoders, not {dims.family}")
    try:
        from whisper.model import AudioEncoder
    except ImportError:
        raise ValueError("openai-whisper is not installed (pip install openai-whisper)") from None
    if dims.n_ffn != 4 * dims.n_state:
        raise ValueError(f"openai-whisper's MLP is 4 x d_model wide ({4 * dims.n_state}); this model's is {dims.n_ffn}")
    encoder = AudioEncoder(dims.n_mels, dims.n_ctx, dims.n_state, dims.n_head, dims.n_layer)
    ours = reference.state_dict()
    names = openai_names(encoder)
    missing = [name for name in encoder.state_dict() if names.get(name) not in ours]
    if missing:
        raise ValueError(f"no reference weights for openai-whisper's {missing[:4]}")
    encoder.load_state_dict({name: ours[names[name]] for name in encoder.state_dict()}, assign=True)
    return encoder.eval()


def openai_whisper_call(reference: nn.Module, device: torch.device,
                        dtype: torch.dtype) -> Callable[[list[np.ndarray]], torch.Tensor]:
    """audio (a list of 16 kHz float32 arrays) -> openai-whisper's encoder output (B, 1500, dim), float32."""
    encoder = openai_whisper_encoder(reference).to(device)
    import whisper

    n_mels = reference.dims.n_mels

    @torch.inference_mode()
    def call(audio: list[np.ndarray]) -> torch.Tensor:
        # As transcribe: 30 s of zeros appended before the log-mel (the padding is audio, not mel), then
        # the first window.
        mels = [whisper.log_mel_spectrogram(torch.from_numpy(a), n_mels, padding=whisper.audio.N_SAMPLES,
                                            device=device)[:, : whisper.audio.N_FRAMES] for a in audio]
        return encoder(torch.stack(mels).to(dtype)).float()

    return call
