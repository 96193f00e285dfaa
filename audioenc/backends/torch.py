"""The reference backend: the plain PyTorch models, in the requested device and dtype."""
from __future__ import annotations

import torch
from torch import nn

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchBackend:
    name = "torch"

    @classmethod
    def available(cls) -> str | None:
        return None

    def __init__(self, model: nn.Module, device: torch.device, dtype: str):
        if dtype == "auto":
            dtype = "float16" if device.type == "cuda" else "float32"
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported by the torch backend; choose auto, {', '.join(DTYPES)}")
        self.device, self.dtype = device, DTYPES[dtype]
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
