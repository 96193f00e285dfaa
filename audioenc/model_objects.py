"""Model objects in memory as checkpoints: a transformers model of the four families (base or task
model, any device and dtype), an openai-whisper model or its encoder. Their tensors have the names
of the checkpoints they would save (audioenc.weights reads those), and are copied: what the caller
does with the object afterwards (training it, say) does not reach the encoder."""
from __future__ import annotations

import argparse
import re
from dataclasses import replace

import torch

from audioenc.weights import (FAMILIES, Checkpoint, canonical_hf_state_dict, family_of, load_openai_whisper,
                              may_be_encoder, preprocessor_settings)


def load_model_object(model, preprocessor=None) -> Checkpoint:
    """A transformers model of a supported family (base or task model, any device and dtype) or an
    openai-whisper model (or its encoder), as a Checkpoint of float32 copies of its encoder's tensors
    on the CPU: later changes to the object (training, ``.half()``, moving it) do not reach the
    encoder. torch.compile, DataParallel and DistributedDataParallel wrappers are looked through.

    ``preprocessor``: its feature extractor (a transformers feature extractor or processor, or a dict
    like preprocessor_config.json). The wav2vec2 family needs one with do_normalize, since whether
    the waveform is normalised is set there and not in the model; Whisper takes
    WhisperFeatureExtractor's defaults.
    """
    model = _unwrapped(model)
    config, dims = getattr(model, "config", None), getattr(model, "dims", None)
    if hasattr(config, "to_dict") and hasattr(config, "model_type"):
        name = getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "")
        label = f"{type(model).__name__} object" + (f" ({name})" if name else "")
        config = config.to_dict()
        family = family_of(config, label)
        state_dict = _cpu_float32_copies(model, label, lambda n: may_be_encoder(family, n))
        checkpoint = Checkpoint(family, config, canonical_hf_state_dict(family, state_dict, label), {}, label, "hf")
    elif hasattr(dims, "n_audio_state") or all(hasattr(model, a) for a in ("conv1", "blocks", "ln_post")):
        label = f"{type(model).__name__} object (openai-whisper)"
        blocks = (model if dims is None else model.encoder).blocks
        layers, heads = len(blocks), blocks[0].attn.n_head if len(blocks) else 0
        if dims is None:  # the encoder alone: its sizes are its tensors' and modules'
            state_dict = _cpu_float32_copies(model, label, lambda n: True, prefix="encoder.")
            conv1, positions = state_dict["encoder.conv1.weight"], state_dict["encoder.positional_embedding"]
            dims = argparse.Namespace(n_mels=conv1.shape[1], n_audio_state=conv1.shape[0], n_audio_ctx=positions.shape[0],
                                      n_audio_layer=layers, n_audio_head=heads)
        else:
            state_dict = _cpu_float32_copies(model, label, lambda n: n.startswith("encoder."))
            if (dims.n_audio_layer, dims.n_audio_head) != (layers, heads):
                raise ValueError(f"{label}: its modules do not follow its dims ({layers} encoder blocks of {heads} "
                                 f"heads, the dims {dims.n_audio_layer} of {dims.n_audio_head}): were the dims edited "
                                 "after the model was built?")
        checkpoint = load_openai_whisper({"dims": vars(dims), "model_state_dict": state_dict}, label)
    else:
        raise TypeError(f"a {type(model).__name__} object is not a model audioenc can load: pass a transformers model "
                        f"of the {', '.join(FAMILIES)} families (e.g. Wav2Vec2Model, WhisperForConditionalGeneration) "
                        "or an openai-whisper model")
    first_conv = "conv1.weight" if checkpoint.family == "whisper" else "feature_extractor.conv_layers.0.conv.weight"
    if first_conv not in checkpoint.state_dict:
        raise ValueError(f"{label}: holds no complete {checkpoint.family} encoder ({first_conv} is missing): pass the "
                         "whole model, or its encoder")
    if checkpoint.format == "hf":
        _check_modules_follow_config(model, checkpoint, label)
    settings = {} if preprocessor is None else preprocessor_settings(preprocessor, label)
    # another kind of feature extractor is named by check_preprocessor (AudioEncoder) instead
    wav2vec2_settings = settings.get("feature_extractor_type", "Wav2Vec2FeatureExtractor") == "Wav2Vec2FeatureExtractor"
    if checkpoint.family != "whisper" and wav2vec2_settings and "do_normalize" not in settings:
        raise ValueError(f"{label}: pass its feature extractor as preprocessor= (e.g. the model's AutoFeatureExtractor, "
                         "or {'do_normalize': True} / {'do_normalize': False}): whether the waveform is normalised is "
                         "set there, not in the model, and differs between checkpoints")
    return replace(checkpoint, preprocessor=settings) if preprocessor is not None else checkpoint


def _unwrapped(model):
    """The model inside torch.compile's, DataParallel's and DistributedDataParallel's wrappers (which
    prefix every tensor name), or inside a SpeechEncoderDecoderModel (its encoder)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"source must be a path, a hub id, 'random:NAME' or a model object, got {type(model).__name__}")
    while True:
        if hasattr(model, "merge_and_unload"):  # peft's wrappers: their names and forward are not the model's
            raise ValueError(f"a {type(model).__name__} object: merge its adapters into the model first "
                             "(model.merge_and_unload()) and pass the result")
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            model = model.module
        elif getattr(getattr(model, "config", None), "model_type", None) == "speech-encoder-decoder":
            model = model.encoder
        else:
            return model


def _cpu_float32_copies(model: torch.nn.Module, label: str, keep, prefix: str = "") -> dict[str, torch.Tensor]:
    """Copies of the state dict's tensors that ``keep(name)`` accepts, named without the segments that
    torch.compile gives compiled submodules, each prefixed with ``prefix``."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        name = name.replace("._orig_mod.", ".").removeprefix("_orig_mod.")
        if not keep(name):
            continue
        if re.search(r"\.(lora_\w+|base_layer)\.|_packed_params|\.weight_orig$", name) or not isinstance(
                tensor, torch.Tensor) or tensor.is_quantized:
            raise ValueError(f"{label}: {name} is part of an adapter, a quantised layer or a pruning mask, which "
                             "audioenc does not run: merge adapters into the weights (peft's merge_and_unload()), "
                             "remove pruning (torch.nn.utils.prune.remove) or pass the float model")
        if tensor.is_meta:
            raise ValueError(f"{label}: tensor {name} is on the meta device (never loaded, or offloaded by accelerate): "
                             "pass a model whose weights are in memory")
        tensors[prefix + name] = tensor.detach().to("cpu", torch.float32 if tensor.is_floating_point() else None,
                                                     copy=True)
    return tensors


def _check_modules_follow_config(model: torch.nn.Module, checkpoint: Checkpoint, label: str) -> None:
    """transformers runs a model's modules, audioenc builds the encoder its config describes: a config
    edited after the model was built would give other frames, with the same tensors."""
    config, whisper = checkpoint.config, checkpoint.family == "whisper"
    heads = config.get("encoder_attention_heads" if whisper else "num_attention_heads")
    eps = config.get("layer_norm_eps", 1e-5)
    stable = bool(config.get("do_stable_layer_norm", False))
    expected = {"num_buckets": config.get("num_buckets", 320), "max_distance": config.get("max_bucket_distance", 800)}
    convs = {f"conv_layers.{i}.conv": (k, s) for i, (k, s) in
             enumerate(zip(config.get("conv_kernel", ()), config.get("conv_stride", ())))}
    for name, module in model.named_modules():
        if not may_be_encoder(checkpoint.family, name + "."):
            continue
        problem, conv = None, next((c for c in convs if name.endswith("feature_extractor." + c)), None)
        wrong = [key for key, value in expected.items() if checkpoint.family == "wavlm"
                 and isinstance(getattr(module, key, None), int) and getattr(module, key) != value]
        if isinstance(getattr(module, "num_heads", None), int) and module.num_heads != heads:
            problem = f"{name} has {module.num_heads} attention heads, the config {heads}"
        elif wrong:
            problem = f"{name} has {wrong[0]} {getattr(module, wrong[0])}, the config {expected[wrong[0]]}"
        elif conv and (module.kernel_size[0], module.stride[0]) != convs[conv]:
            problem = f"{name} has kernel {module.kernel_size[0]} and stride {module.stride[0]}, the config {convs[conv]}"
        elif (not whisper and isinstance(module, torch.nn.LayerNorm) and "feature_extractor." not in name
              and not name.endswith("adapter_layer.norm") and module.eps != eps):  # an adapter's: torch's 1e-5
            problem = f"{name} has eps {module.eps}, the config's layer_norm_eps is {eps}"
        elif not whisper and name.split(".")[-1] == "encoder" and \
                type(module).__name__.endswith("StableLayerNorm") != stable:
            problem = f"{name} is a {type(module).__name__}, the config's do_stable_layer_norm is {stable}"
        if problem:
            raise ValueError(f"{label}: its modules do not follow its config ({problem}): was the config edited "
                             "after the model was built?")
