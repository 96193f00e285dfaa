"""The reference backend: the plain PyTorch models, in the requested device and dtype."""
from __future__ import annotations

import torch
from torch import nn

from audioenc.backends import resolve_dtype

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchBackend:
    name = "torch"

    @classmethod
    def available(cls) -> str | None:
        return None

    def __init__(self, model: nn.Module, device: torch.device, dtype: str):
        self.device, self.dtype = device, DTYPES[resolve_dtype(dtype, device, DTYPES, "torch")]
        self.model = model.to(device=device, dtype=self.dtype).eval()

    @torch.inference_mode()
    def run(self, inputs: torch.Tensor, lengths: torch.Tensor | None, num_layers: int,
            output_hidden_states: bool = True):
        inputs = inputs.to(self.device, self.dtype)
        frame_lengths = None
        if lengths is None:
            out, hidden_states = self.model(inputs, num_layers)
        else:
            out, hidden_states, frame_lengths = self.model(inputs, lengths.to(self.device), num_layers)
        return out, hidden_states if output_hidden_states else [], frame_lengths
