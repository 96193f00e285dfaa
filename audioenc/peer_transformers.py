"""Hugging Face transformers running the weights of an audioenc reference model: the peer that
``audioenc bench --against transformers`` times side by side with audioenc's backends, on the same
checkpoint and machine, and whose frames it compares with theirs.

It runs what a transformers user runs: the family's feature extractor (waveform normalisation or
log-mel, on the CPU, as in their pipelines), then the base model (the Whisper encoder alone) with
transformers' default attention.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from audioenc.config import SAMPLE_RATE, WhisperDims


def hf_config(dims):
    """The transformers config of the architecture in ``dims``."""
    import transformers

    if isinstance(dims, WhisperDims):
        return transformers.WhisperConfig(num_mel_bins=dims.n_mels, max_source_positions=dims.n_ctx, d_model=dims.n_state,
                                          encoder_layers=dims.n_layer, encoder_attention_heads=dims.n_head,
                                          encoder_ffn_dim=dims.n_ffn)
    config_class = {"wav2vec2": transformers.Wav2Vec2Config, "hubert": transformers.HubertConfig,
                    "wavlm": transformers.WavLMConfig}[dims.family]
    if dims.conv_pos_batch_norm and dims.family != "hubert":  # a fairseq wav2vec2 trained with it
        raise ValueError(f"transformers has no BatchNorm before the positional conv for {dims.family} "
                         "(conv_pos_batch_norm), only for hubert")
    extra = {"hubert": dict(feat_proj_layer_norm=dims.feat_proj_layer_norm, conv_pos_batch_norm=dims.conv_pos_batch_norm),
             "wavlm": dict(num_buckets=dims.num_buckets, max_bucket_distance=dims.max_bucket_distance)}
    return config_class(
        hidden_size=dims.hidden_size, num_hidden_layers=dims.num_layers, num_attention_heads=dims.num_heads,
        intermediate_size=dims.intermediate_size, layer_norm_eps=dims.layer_norm_eps, conv_dim=list(dims.conv_dim),
        conv_kernel=list(dims.conv_kernel), conv_stride=list(dims.conv_stride), conv_bias=dims.conv_bias,
        feat_extract_norm=dims.feat_extract_norm, num_conv_pos_embeddings=dims.num_conv_pos_embeddings,
        num_conv_pos_embedding_groups=dims.num_conv_pos_embedding_groups,
        do_stable_layer_norm=dims.do_stable_layer_norm, adapter_attn_dim=dims.adapter_attn_dim,
        **extra.get(dims.family, {}))


def hf_model(reference: nn.Module) -> nn.Module:
    """The transformers base model (WhisperEncoder for Whisper) holding the reference's weights."""
    import transformers
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    dims = reference.dims
    config = hf_config(dims)
    if isinstance(dims, WhisperDims):
        model = WhisperEncoder(config)
    else:
        model = {"wav2vec2": transformers.Wav2Vec2Model, "hubert": transformers.HubertModel,
                 "wavlm": transformers.WavLMModel}[dims.family](config)
    state = dict(reference.state_dict())
    if not isinstance(dims, WhisperDims) and not dims.conv_pos_batch_norm:
        # audioenc folds the positional conv's weight norm at load; transformers keeps it as a
        # parametrisation over dim 2: g = ||w|| per kernel tap and v = w give back w.
        weight = state.pop("encoder.pos_conv_embed.conv.weight")
        state["encoder.pos_conv_embed.conv.parametrizations.weight.original0"] = weight.norm(dim=(0, 1), keepdim=True)
        state["encoder.pos_conv_embed.conv.parametrizations.weight.original1"] = weight
    missing, unexpected = model.load_state_dict(state, strict=False)
    # training only: the masking of SpecAugment, the count of BatchNorm's updates
    missing = [name for name in missing if name != "masked_spec_embed" and not name.endswith(".num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"transformers' {type(model).__name__} does not take these weights: "
                         f"missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model.eval()


def transformers_call(reference: nn.Module, do_normalize: bool, device: torch.device,
                      dtype: torch.dtype) -> Callable[[list[np.ndarray]], torch.Tensor]:
    """audio (a list of 16 kHz float32 arrays) -> transformers' last_hidden_state (B, frames, dim)."""
    import transformers

    dims = reference.dims
    model = hf_model(reference).to(device=device, dtype=dtype)
    if isinstance(dims, WhisperDims):
        extractor = transformers.WhisperFeatureExtractor(feature_size=dims.n_mels)
    else:
        # as the checkpoint's own feature extractor (wavlm-base-plus's returns a mask); without one, as
        # transformers' preprocessor configs mostly say: an attention mask only for layer-norm models
        preprocessor = getattr(getattr(reference, "checkpoint", None), "preprocessor", {})
        mask = bool(preprocessor.get("return_attention_mask", dims.feat_extract_norm == "layer"))
        extractor = transformers.Wav2Vec2FeatureExtractor(do_normalize=do_normalize, return_attention_mask=mask)

    @torch.inference_mode()
    def call(audio: list[np.ndarray]) -> torch.Tensor:
        if isinstance(dims, WhisperDims):  # padded to 30 s windows, as Whisper needs
            inputs = extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt")
            return model(inputs.input_features.to(device, dtype)).last_hidden_state
        inputs = extractor(audio, sampling_rate=SAMPLE_RATE, padding=True, return_tensors="pt")
        mask = inputs.get("attention_mask")
        return model(inputs.input_values.to(device, dtype),
                     attention_mask=None if mask is None else mask.to(device)).last_hidden_state

    return call
