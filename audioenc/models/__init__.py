"""Builds a family's model from a Checkpoint and loads its weights strictly, with clear errors."""
from __future__ import annotations

import torch
from torch import nn

from audioenc.config import Wav2Vec2Dims, WhisperDims
from audioenc.models.wav2vec2 import BatchNorm, Wav2Vec2Model
from audioenc.models.wavlm import WavLMModel
from audioenc.models.whisper import WhisperEncoder, sinusoids
from audioenc.weights import Checkpoint


def dims_of(checkpoint: Checkpoint) -> Wav2Vec2Dims | WhisperDims:
    if checkpoint.family == "whisper":
        return WhisperDims.from_config(checkpoint.config, checkpoint.source)
    return Wav2Vec2Dims.from_config(checkpoint.family, checkpoint.config, checkpoint.source)


def build_model(checkpoint: Checkpoint, random_weights: bool = False) -> nn.Module:
    """The reference model of ``checkpoint``'s family, in float32 on the CPU, in eval mode, its
    weights frozen: no forward pass records an autograd graph, whoever calls it. A checkpoint's
    tensors become the weights themselves (the model is built without memory first): loading never
    holds two copies of a model. A checkpoint recalled from audioenc's record (no tensors read) gives
    a model whose weights are not there (on the meta device); ``random_weights``: drawn_weights' instead."""
    dims = dims_of(checkpoint)
    model_class = {"whisper": WhisperEncoder, "wavlm": WavLMModel}.get(checkpoint.family, Wav2Vec2Model)
    with torch.device("meta"):
        model = model_class(dims)
    if random_weights or not checkpoint.weights_digest:
        state_dict = drawn_weights(model) if random_weights else checkpoint.state_dict
        if checkpoint.family == "whisper" and (random_weights or "embed_positions.weight" not in state_dict):
            state_dict = {**state_dict, "embed_positions.weight": sinusoids(dims.n_ctx, dims.n_state)}
        load_weights(model, state_dict, checkpoint.source)
    return model.eval().requires_grad_(False)


def drawn_weights(model: nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for ``model`` (built on the meta device), distributed as torch's own
    initialisation draws them: Linear and Conv1d weights and biases uniform within +-1/sqrt(fan_in)
    (kaiming_uniform with a=sqrt(5)), embeddings standard normal, norms 1 and 0 (running mean 0 and
    variance 1), WavLM's gate constants 1. They come from a generator of their own, not torch's global
    one, which the caller's other threads may draw from meanwhile: the same weights every time, in any
    thread."""
    generator = torch.Generator().manual_seed(seed)
    weights = {}
    for prefix, module in model.named_modules():
        for name, param in module.named_parameters(prefix=prefix, recurse=False):
            shape, last = param.shape, name.rsplit(".", 1)[-1]
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                bound = module.weight[0].numel() ** -0.5
                weights[name] = torch.rand(shape, generator=generator, dtype=torch.float32) * (2 * bound) - bound
            elif isinstance(module, nn.Embedding):
                weights[name] = torch.randn(shape, generator=generator, dtype=torch.float32)
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm, BatchNorm)) or last == "gru_rel_pos_const":
                zero = last in ("bias", "running_mean")
                weights[name] = (torch.zeros if zero else torch.ones)(shape, dtype=torch.float32)
            else:
                raise TypeError(f"no random initialisation for {name} ({type(module).__name__})")
    return weights


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Checks ``state_dict`` against the model and makes its tensors the model's weights (float32,
    contiguous, each in memory of its own)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing and all(".adapter_layer." in name for name in missing):
        # transformers would run them on random weights, with a warning
        raise ValueError(f"{source}: its config's adapter_attn_dim asks for an attention adapter in every layer, but "
                         f"the checkpoint lacks {len(missing)} of their tensors, e.g. {', '.join(missing[:2])}. Without "
                         "target_lang, audioenc reads the adapters held in model.safetensors / pytorch_model.bin (as "
                         "transformers does); to take them from an adapter.<lang>.safetensors file beside it, pass "
                         "target_lang='<lang>' (audioenc.load) or --target-lang <lang> (the command line)")
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing tensor(s), e.g. {', '.join(missing[:4])}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:4])}")
        # Unexpected tensors are refused too: ignoring one that is not zero would change the numbers.
        hint = ("a truncated checkpoint, or a config of another model?" if missing else
                "tensors the architecture its config describes has no place for: a config of another model, or "
                "parameters this encoder does not have, such as a bias Whisper's key projection lacks")
        raise ValueError(f"{source}: the checkpoint does not match its config's architecture: {'; '.join(parts)} "
                         f"({hint})")
    for name, tensor in state_dict.items():
        if tensor.shape != expected[name].shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(tensor.shape)}, "
                             f"the config implies {tuple(expected[name].shape)}")
        if not tensor.is_floating_point():  # quantised or mislabelled: casting would be silent garbage
            raise ValueError(f"{source}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')}, "
                             "expected floating point weights")
        # max and min carry any NaN or Inf, 9x faster than isfinite().all() (a second on whisper-large)
        if tensor.numel() and not (bool(tensor.amax().isfinite()) and bool(tensor.amin().isfinite())):
            raise ValueError(f"{source}: tensor {name} holds NaN or Inf (a damaged checkpoint, or training that diverged)")
    model.load_state_dict({name: owned_float32(tensor) for name, tensor in state_dict.items()}, assign=True)


def owned_float32(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as a contiguous float32 tensor in memory of its own: a view would keep a larger
    buffer alive (a whole file's)."""
    tensor = tensor.detach().float().contiguous()
    return tensor.clone() if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size() else tensor
