"""Real-size architectures by name, for ``load("random:NAME")``: the published configs of the
common checkpoints with random weights, for trying the engine and timing it without downloads."""
from __future__ import annotations

from audioenc.weights import Checkpoint

_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
             feat_extract_norm="group", conv_bias=False, do_stable_layer_norm=False)
_LARGE = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
              feat_extract_norm="layer", conv_bias=True, do_stable_layer_norm=True)


def _whisper(d_model, layers, heads, n_mels=80):
    return dict(model_type="whisper", d_model=d_model, encoder_layers=layers, encoder_attention_heads=heads,
                encoder_ffn_dim=4 * d_model, num_mel_bins=n_mels, max_source_positions=1500)


ARCHITECTURES = {
    "wav2vec2-base": (dict(model_type="wav2vec2", **_BASE), {"do_normalize": True}),
    "wav2vec2-large-lv60": (dict(model_type="wav2vec2", **_LARGE), {"do_normalize": True}),
    "hubert-base": (dict(model_type="hubert", **_BASE), {"do_normalize": False}),
    "hubert-large": (dict(model_type="hubert", **_LARGE), {"do_normalize": True}),
    "wavlm-base-plus": (dict(model_type="wavlm", **_BASE), {"do_normalize": False}),
    "wavlm-large": (dict(model_type="wavlm", **dict(_LARGE, conv_bias=False)), {"do_normalize": True}),
    "whisper-tiny": (_whisper(384, 4, 6), {}),
    "whisper-base": (_whisper(512, 6, 8), {}),
    "whisper-small": (_whisper(768, 12, 12), {}),
    "whisper-medium": (_whisper(1024, 24, 16), {}),
    "whisper-large-v2": (_whisper(1280, 32, 20), {}),
    "whisper-large-v3": (_whisper(1280, 32, 20, n_mels=128), {}),
}


def random_checkpoint(name: str) -> Checkpoint:
    """A Checkpoint with a named architecture and no weights (the model keeps its random init)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"random:{name}: unknown architecture; choose one of {', '.join(ARCHITECTURES)}")
    config, preprocessor = ARCHITECTURES[name]
    return Checkpoint(config["model_type"], dict(config), {}, dict(preprocessor), f"random:{name}", "random")
