"""The reference backend: the plain PyTorch models, in the requested device and dtype."""
from __future__ import annotations

import torch
from torch import nn

from audioenc.backends import resolve_dtype
from audioenc.cpu import TRIM_AFTER_SAMPLES, return_freed_memory

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TorchBackend:
    name = "torch"

    @classmethod
    def available(cls) -> str | None:
        return None

    def __init__(self, model: nn.Module, device: torch.device, dtype: str):
        self.device, self.dtype = device, DTYPES[resolve_dtype(dtype, device, DTYPES, "torch")]
        self.model = model.to(device=device, dtype=self.dtype).eval()
        self.untrimmed = False  # runs on the CPU left freed heap that glibc keeps
        self.samples_since_trim = 0

    def trim(self) -> None:
        """Hands the heap that large runs freed back to the OS (encode calls it after each call): with
        lengths that vary from call to call glibc's heap can keep growing (a user trial's tiny WavLM
        process: 725 MB to 1177 MB over six passes of the same files, 423 MB trimmed by hand), and
        not only after long runs (wav2vec2-base, calls of 0.5-20 s: 634 MB to 2013 MB over 120 calls).
        It takes 7-20 ms (wavlm-base-plus), so it waits for TRIM_AFTER_SAMPLES of audio run since the
        last trim: one large run, or many short ones, next to whose seconds it is little."""
        if self.untrimmed:
            self.untrimmed = False
            return_freed_memory()

    @torch.inference_mode()
    def run(self, inputs: torch.Tensor, lengths: torch.Tensor | None, num_layers: int,
            output_hidden_states: bool = True):
        # Whisper's calls all take whole 30 s windows: the same sizes each time, nothing to trim (as onnx)
        if self.device.type == "cpu" and lengths is not None:
            self.samples_since_trim += inputs.numel()
            if self.samples_since_trim > TRIM_AFTER_SAMPLES:
                self.untrimmed, self.samples_since_trim = True, 0
        inputs = inputs.to(self.device, self.dtype)
        frame_lengths = None
        if lengths is None:
            out, hidden_states = self.model(inputs, num_layers)
        else:
            out, hidden_states, frame_lengths = self.model(inputs, lengths.to(self.device), num_layers)
        return out, hidden_states if output_hidden_states else [], frame_lengths
