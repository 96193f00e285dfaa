"""Builds tiny checkpoints of every format audioenc reads, from one set of random Hugging Face weights.

The renames here are written from the foreign side (HF name -> openai / fairseq name), independently
of audioenc.weights, so a test that round-trips through both checks the mapping rather than repeating it.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import struct

import pytest
import torch

T = pytest.importorskip("transformers")

W2V_SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2),
                 num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2, vocab_size=12)
W2V_VARIANTS = {
    "wav2vec2_group": (T.Wav2Vec2Config, {}),
    "wav2vec2_layer": (T.Wav2Vec2Config, dict(feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True)),
    "hubert": (T.HubertConfig, {}),
    "hubert_posbatchnorm": (T.HubertConfig, dict(conv_pos_batch_norm=True)),  # slprl/mhubert-base-25hz
    "wavlm": (T.WavLMConfig, dict(num_buckets=16, max_bucket_distance=32)),
}
# Keys that size or switch the encoder; every format must agree with Hugging Face on them.
W2V_KEYS = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "hidden_act",
            "layer_norm_eps", "feat_extract_norm", "feat_extract_activation", "conv_dim", "conv_kernel", "conv_stride",
            "conv_bias", "num_conv_pos_embeddings", "num_conv_pos_embedding_groups", "do_stable_layer_norm")
WHISPER_KEYS = ("model_type", "num_mel_bins", "d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                "max_source_positions", "activation_function")


def randomize(model: torch.nn.Module, seed: int, keep=()) -> torch.nn.Module:
    """Random values everywhere (so a swapped name shows), BatchNorm's running statistics included,
    except parameters whose name contains one of ``keep``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not any(k in name for k in keep):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        for name, b in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                b.copy_(torch.rand(b.shape, generator=gen) + 0.5)
    return model


def w2v_config(variant: str, **overrides):
    config_class, extra = W2V_VARIANTS[variant]
    return config_class(**{**W2V_SIZES, **extra, **overrides})


def whisper_model(n_mels: int, seed: int = 0) -> T.WhisperForConditionalGeneration:
    config = T.WhisperConfig(vocab_size=64, num_mel_bins=n_mels, d_model=32, encoder_layers=2,
                             encoder_attention_heads=2, encoder_ffn_dim=128,  # openai's MLP is 4 x d_model
                             decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
                             max_source_positions=1500, max_target_positions=16, pad_token_id=0,
                             bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    # The last layer's LayerNorms keep their ones/zeros and its fc2 weight repeats layer 0's, so
    # CTranslate2 stores them as aliases (of a quantized weight and its scale too).
    model = randomize(T.WhisperForConditionalGeneration(config), seed, keep=("encoder.layers.1.self_attn_layer_norm",
                                                                            "encoder.layers.1.final_layer_norm"))
    layers = model.model.encoder.layers
    with torch.no_grad():
        layers[1].fc2.weight.copy_(layers[0].fc2.weight)
    return model


def reference_state_dict(base: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The canonical names and values, straight from a transformers base model (weight norm as torch
    computes it)."""
    sd = {k: v.clone() for k, v in base.state_dict().items()
          if k != "masked_spec_embed" and not k.endswith("num_batches_tracked")}
    if "encoder.pos_conv_embed.conv.parametrizations.weight.original0" in sd:
        del sd["encoder.pos_conv_embed.conv.parametrizations.weight.original0"]
        del sd["encoder.pos_conv_embed.conv.parametrizations.weight.original1"]
        sd["encoder.pos_conv_embed.conv.weight"] = base.encoder.pos_conv_embed.conv.weight.detach().clone()
    return sd


def save_pretrained_bin(model: torch.nn.Module, path, shards: int = 1, dtype=None) -> None:
    """config.json + pytorch_model.bin (or pytorch_model-0000i-of-0000n.bin shards and their
    pytorch_model.bin.index.json) as transformers 4 wrote them: transformers 5's save_pretrained
    writes safetensors whatever safe_serialization says, but hub repos and older fine-tunes hold these."""
    os.makedirs(path, exist_ok=True)
    model.config.save_pretrained(path)
    sd = {k: v if dtype is None else v.to(dtype) for k, v in model.state_dict().items()}
    if shards == 1:
        torch.save(sd, os.path.join(path, "pytorch_model.bin"))
        return
    names, weight_map = list(sd), {}
    per = -(-len(names) // shards)
    for i in range(shards):
        file = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        shard = {k: sd[k] for k in names[i * per:(i + 1) * per]}
        torch.save(shard, os.path.join(path, file))
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(t.numel() * t.element_size() for t in sd.values())
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# ---- openai-whisper -------------------------------------------------------------------------------

_TO_OPENAI = [
    (r"conv([12])\.", r"encoder.conv\1."),
    (r"embed_positions\.weight", "encoder.positional_embedding"),
    (r"layers\.(\d+)\.self_attn\.q_proj\.", r"encoder.blocks.\1.attn.query."),
    (r"layers\.(\d+)\.self_attn\.k_proj\.", r"encoder.blocks.\1.attn.key."),
    (r"layers\.(\d+)\.self_attn\.v_proj\.", r"encoder.blocks.\1.attn.value."),
    (r"layers\.(\d+)\.self_attn\.out_proj\.", r"encoder.blocks.\1.attn.out."),
    (r"layers\.(\d+)\.self_attn_layer_norm\.", r"encoder.blocks.\1.attn_ln."),
    (r"layers\.(\d+)\.fc1\.", r"encoder.blocks.\1.mlp.0."),
    (r"layers\.(\d+)\.fc2\.", r"encoder.blocks.\1.mlp.2."),
    (r"layers\.(\d+)\.final_layer_norm\.", r"encoder.blocks.\1.mlp_ln."),
    (r"layer_norm\.", "encoder.ln_post."),
]


def openai_checkpoint(model: T.WhisperForConditionalGeneration, dtype=torch.float32) -> dict:
    encoder_sd = model.model.encoder.state_dict()
    sd = {_sub(_TO_OPENAI, k): v.to(dtype) for k, v in encoder_sd.items()}
    sd["decoder.token_embedding.weight"] = torch.randn(64, 32).to(dtype)  # a decoder tensor, to be ignored
    c = model.config
    dims = dict(n_mels=c.num_mel_bins, n_audio_ctx=c.max_source_positions, n_audio_state=c.d_model,
                n_audio_head=c.encoder_attention_heads, n_audio_layer=c.encoder_layers, n_vocab=c.vocab_size,
                n_text_ctx=c.max_target_positions, n_text_state=c.d_model, n_text_head=c.decoder_attention_heads,
                n_text_layer=c.decoder_layers)
    return {"dims": dims, "model_state_dict": sd}


def _sub(table, name: str) -> str:
    for pattern, template in table:
        new, n = re.subn("^" + pattern, template, name)
        if n:
            return new
    raise KeyError(name)


# ---- fairseq --------------------------------------------------------------------------------------

def _to_fairseq_table(feat_extract_norm: str, pos_batch_norm: bool):
    norm = r"feature_extractor.conv_layers.0.2." if feat_extract_norm == "group" else r"feature_extractor.conv_layers.\1.2.1."
    # with conv_pos_batch_norm, fairseq's pos_conv is Sequential(BatchNorm1d, Conv1d, SamePad, GELU)
    pos = [(r"encoder\.pos_conv_embed\.batch_norm\.", "encoder.pos_conv.0."),
           (r"encoder\.pos_conv_embed\.conv\.", "encoder.pos_conv.1.")] if pos_batch_norm else []
    return pos + [
        (r"feature_extractor\.conv_layers\.(\d+)\.conv\.", r"feature_extractor.conv_layers.\1.0."),
        (r"feature_extractor\.conv_layers\.(\d+)\.layer_norm\.", norm),
        (r"feature_projection\.layer_norm\.", "layer_norm."),
        (r"feature_projection\.projection\.", "post_extract_proj."),
        (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original0", "encoder.pos_conv.0.weight_g"),
        (r"encoder\.pos_conv_embed\.conv\.parametrizations\.weight\.original1", "encoder.pos_conv.0.weight_v"),
        (r"encoder\.pos_conv_embed\.conv\.bias", "encoder.pos_conv.0.bias"),
        (r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_linear\.", r"encoder.layers.\1.self_attn.grep_linear."),
        (r"encoder\.layers\.(\d+)\.attention\.gru_rel_pos_const", r"encoder.layers.\1.self_attn.grep_a"),
        (r"encoder\.layers\.(\d+)\.attention\.rel_attn_embed\.", r"encoder.layers.\1.self_attn.relative_attention_bias."),
        (r"encoder\.layers\.(\d+)\.attention\.", r"encoder.layers.\1.self_attn."),
        (r"encoder\.layers\.(\d+)\.layer_norm\.", r"encoder.layers.\1.self_attn_layer_norm."),
        (r"encoder\.layers\.(\d+)\.feed_forward\.intermediate_dense\.", r"encoder.layers.\1.fc1."),
        (r"encoder\.layers\.(\d+)\.feed_forward\.output_dense\.", r"encoder.layers.\1.fc2."),
        (r"encoder\.layers\.(\d+)\.final_layer_norm\.", r"encoder.layers.\1.final_layer_norm."),
        (r"encoder\.layer_norm\.", "encoder.layer_norm."),
        (r"masked_spec_embed", "mask_emb"),
    ]


def conv_feature_layers(dims, kernels, strides) -> str:
    """fairseq's spelling, runs of equal layers written as "[(d, k, s)] * n"."""
    runs: list[list] = []
    for layer in zip(dims, kernels, strides):
        if runs and runs[-1][0] == layer:
            runs[-1][1] += 1
        else:
            runs.append([layer, 1])
    return " + ".join(f"[{layer}]" + (f" * {n}" if n > 1 else "") for layer, n in runs)


def fairseq_checkpoint(base: torch.nn.Module, family: str, style: str = "cfg", normalize: bool = True) -> dict:
    """style: "cfg" (pre-trained, dict cfg), "args" (legacy argparse Namespace), "finetuned" (CTC,
    w2v_encoder.w2v_model. prefixes, the pre-trained cfg in w2v_args), "args_finetuned" (the same with
    legacy Namespaces, as wav2vec_small_960h.pt) or "unilm" (WavLM's own .pt). fairseq's Trainer writes
    "args": None beside a cfg."""
    c = base.config
    pos_batch_norm = getattr(c, "conv_pos_batch_norm", False)
    table = _to_fairseq_table(c.feat_extract_norm, pos_batch_norm)
    sd = {_sub(table, k): v.clone() for k, v in base.state_dict().items()}
    # fairseq-only pre-training tensors, which the loader must drop
    sd.update({"quantizer.vars": torch.randn(1, 4, 8), "project_q.weight": torch.randn(8, 8),
               "final_proj.weight": torch.randn(8, 32), "label_embs_concat": torch.randn(4, 8)})
    model_cfg = {
        "_name": family, "extractor_mode": "default" if c.feat_extract_norm == "group" else "layer_norm",
        "conv_feature_layers": conv_feature_layers(c.conv_dim, c.conv_kernel, c.conv_stride),
        "conv_bias": c.conv_bias, "encoder_layers": c.num_hidden_layers, "encoder_embed_dim": c.hidden_size,
        "encoder_ffn_embed_dim": c.intermediate_size, "encoder_attention_heads": c.num_attention_heads,
        "activation_fn": "gelu", "layer_norm_first": c.do_stable_layer_norm, "conv_pos": c.num_conv_pos_embeddings,
        "conv_pos_groups": c.num_conv_pos_embedding_groups, "dropout": 0.1,
    }
    if pos_batch_norm:
        model_cfg["conv_pos_batch_norm"] = True
    task_cfg = {"_name": "audio_pretraining", "normalize": normalize, "sample_rate": 16000}
    if style == "unilm":  # microsoft/unilm WavLM: one flat WavLMConfig dict, no model name
        assert family == "wavlm"
        del model_cfg["_name"]
        model_cfg.update(normalize=normalize, relative_position_embedding=True, gru_rel_pos=True,
                         num_buckets=c.num_buckets, max_distance=c.max_bucket_distance, feature_grad_mult=0.1)
        return {"cfg": model_cfg, "model": sd}
    if style == "cfg":
        return {"args": None, "cfg": {"model": model_cfg, "task": task_cfg}, "model": sd}
    args = argparse.Namespace(arch=model_cfg.pop("_name"), **model_cfg, normalize=normalize, task="audio_pretraining")
    if style == "args":
        return {"args": args, "model": sd}
    assert style in ("finetuned", "args_finetuned")
    sd = {"w2v_encoder.w2v_model." + k: v for k, v in sd.items()}
    sd["w2v_encoder.proj.weight"] = torch.randn(12, c.hidden_size)
    sd["w2v_encoder.proj.bias"] = torch.randn(12)
    if style == "args_finetuned":
        return {"args": argparse.Namespace(arch="wav2vec_ctc", w2v_path="/gone/pretrained.pt", w2v_args=args,
                                           normalize=normalize, task="audio_pretraining"), "model": sd}
    model_cfg["_name"] = args.arch
    outer = {"_name": f"{'wav2vec' if family == 'wav2vec2' else family}_ctc", "w2v_path": "/gone/pretrained.pt",
             "w2v_args": {"model": model_cfg, "task": task_cfg}}
    return {"args": None, "cfg": {"model": outer, "task": {"_name": "audio_finetuning", "normalize": normalize}},
            "model": sd}


# ---- CTranslate2 ----------------------------------------------------------------------------------

def write_ct2_bin(path, spec: str, variables: dict[str, torch.Tensor], version: int = 6) -> None:
    """A model.bin in CTranslate2's layout (float32 variables, no aliases), for specs the converter
    would need a whole other model for."""
    def string(s):
        return struct.pack("<H", len(s) + 1) + s.encode() + b"\0"

    out = struct.pack("<I", version) + string(spec) + struct.pack("<II", 1, len(variables))
    for name, t in variables.items():
        data = t.float().numpy().tobytes()
        out += string(name) + struct.pack(f"<B{t.dim()}I", t.dim(), *t.shape) + struct.pack("<BI", 0, len(data)) + data
    out += struct.pack("<I", 0)
    with open(path, "wb") as f:
        f.write(out)
