"""The reference backend: the plain PyTorch models, in the requested device and dtype."""
from __future__ import annotations

import torch
from torch import nn


class TorchBackend:
    name = "torch"

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype):
        self.model = model.to(device=device, dtype=dtype).eval()
        self.device, self.dtype = device, dtype

    @torch.inference_mode()
    def run(self, inputs: torch.Tensor, lengths: torch.Tensor | None, num_layers: int):
        """Whisper: inputs are log-mel windows and lengths is None; wav2vec2 family: normalised
        waveforms and their valid samples. Returns (output, hidden states, frame lengths or None)."""
        inputs = inputs.to(self.device, self.dtype)
        if lengths is None:
            out, hidden_states = self.model(inputs, num_layers)
            return out, hidden_states, None
        return self.model(inputs, lengths.to(self.device), num_layers)
