"""Model dimensions per family, filled from a Hugging Face style config dict.

Defaults are transformers' own, so a config.json that omits a key means what it means there. A key
that changes the architecture in a way audioenc does not implement fails here, naming the key.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, fields

SAMPLE_RATE = 16000
WHISPER_HOP = 160  # samples per mel frame


def _unsupported(source: str, key: str, value, supported: str) -> ValueError:
    return ValueError(f"{source}: config key {key}={value!r} is not supported by audioenc ({supported})")


def _check_numbers(dims, source: str, config_keys: dict[str, str]) -> None:
    """Every size a positive int (a layer count may be 0) and every eps a positive number, or a
    ValueError naming the config key: a malformed config.json fails here, not deep in the model."""
    for f in fields(dims):
        value, key = getattr(dims, f.name), config_keys.get(f.name, f.name)
        if f.type == "int":
            least = 0 if f.name in ("num_layers", "n_layer") else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{source}: config key {key} must be an int >= {least}, got {value!r}")
        elif f.type == "int | None":
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{source}: config key {key} must be an int >= 1 or null, got {value!r}")
        elif f.type == "tuple[int, ...]":
            if not value or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value):
                raise ValueError(f"{source}: config key {key} must be a list of ints >= 1, got {list(value)!r}")
        elif f.type == "float":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{source}: config key {key} must be a positive number, got {value!r}")


def check_preprocessor(preprocessor, dims, source: str) -> dict:
    """preprocessor_config.json, checked for what audioenc's frontend computes: 16 kHz for every
    family; for Whisper WhisperFeatureExtractor's log-mel (a 400-sample FFT, a 160-sample hop, the
    model's mel bins, windows of the model's length; a dither is not applied, with a warning); for
    the wav2vec2 family Wav2Vec2FeatureExtractor's waveform (one channel). do_normalize must be a bool."""
    if not isinstance(preprocessor, dict):
        raise ValueError(f"{source}: preprocessor_config.json must hold a JSON object, got {type(preprocessor).__name__}")
    fixed = {"sampling_rate": SAMPLE_RATE}
    if dims.family == "whisper":
        fixed.update(feature_extractor_type="WhisperFeatureExtractor", n_fft=400, hop_length=WHISPER_HOP,
                     feature_size=dims.n_mels, chunk_length=dims.window_samples / SAMPLE_RATE)
    else:
        fixed.update(feature_extractor_type="Wav2Vec2FeatureExtractor", feature_size=1)
    for key, expected in fixed.items():
        if key in preprocessor and preprocessor[key] != expected:
            if key == "chunk_length":
                expected = f"{expected:g} s, the window of max_source_positions {dims.n_ctx}"
            raise ValueError(f"{source}: preprocessor {key}={preprocessor[key]!r} does not match what audioenc "
                             f"computes for this model ({expected})")
    if dims.family == "whisper" and preprocessor.get("dither", 0) != 0:
        warnings.warn(f"{source}: preprocessor dither={preprocessor['dither']!r} is not applied: audioenc's log-mel is "
                      "deterministic, where transformers adds dither x random noise to the waveform at each call",
                      stacklevel=3)
    if not isinstance(preprocessor.get("do_normalize", True), bool):  # bool("false") is True
        raise ValueError(f"{source}: preprocessor do_normalize must be true or false, got {preprocessor['do_normalize']!r}")
    if dims.family == "whisper" and preprocessor.get("do_normalize"):
        raise ValueError(f"{source}: preprocessor do_normalize=True is not computed for Whisper: its log-mel is taken "
                         "from the waveform as it is (transformers' WhisperFeatureExtractor does the same by default)")
    return preprocessor


@dataclass(frozen=True)
class Wav2Vec2Dims:
    """wav2vec 2.0, HuBERT and WavLM: conv feature encoder + transformer encoder."""

    family: str
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    layer_norm_eps: float = 1e-5
    conv_dim: tuple[int, ...] = (512,) * 7
    conv_kernel: tuple[int, ...] = (10, 3, 3, 3, 3, 2, 2)
    conv_stride: tuple[int, ...] = (5, 2, 2, 2, 2, 2, 2)
    conv_bias: bool = False
    feat_extract_norm: str = "group"       # "group": GroupNorm on conv layer 0; "layer": LayerNorm on all
    feat_proj_layer_norm: bool = True      # HuBERT may omit the LayerNorm before the projection
    num_conv_pos_embeddings: int = 128
    num_conv_pos_embedding_groups: int = 16
    conv_pos_batch_norm: bool = False      # mHuBERT-25Hz: BatchNorm before the positional conv, no weight norm
    do_stable_layer_norm: bool = False     # pre-LN layers + final LayerNorm
    num_buckets: int = 320                 # WavLM relative position bias
    max_bucket_distance: int = 800
    adapter_attn_dim: int | None = None    # MMS: a small adapter after every pre-LN layer (models/wav2vec2.py)

    @classmethod
    def from_config(cls, family: str, config: dict, source: str = "config") -> "Wav2Vec2Dims":
        for key, expected in (("hidden_act", "gelu"), ("feat_extract_activation", "gelu")):
            if config.get(key, expected) != expected:
                raise _unsupported(source, key, config[key], f"only the exact erf {expected!r}")
        if config.get("add_adapter"):
            raise _unsupported(source, "add_adapter", config["add_adapter"], "it must be false")
        stable = bool(config.get("do_stable_layer_norm", False))
        norm = config.get("feat_extract_norm", "group")
        if norm not in ("group", "layer"):
            raise _unsupported(source, "feat_extract_norm", norm, "'group' or 'layer'")
        dims = cls(
            family=family,
            hidden_size=config.get("hidden_size", 768),
            num_layers=config.get("num_hidden_layers", 12),
            num_heads=config.get("num_attention_heads", 12),
            intermediate_size=config.get("intermediate_size", 3072),
            layer_norm_eps=config.get("layer_norm_eps", 1e-5),
            conv_dim=tuple(config.get("conv_dim", cls.conv_dim)),
            conv_kernel=tuple(config.get("conv_kernel", cls.conv_kernel)),
            conv_stride=tuple(config.get("conv_stride", cls.conv_stride)),
            conv_bias=bool(config.get("conv_bias", False)),
            feat_extract_norm=norm,
            feat_proj_layer_norm=bool(config.get("feat_proj_layer_norm", True)) if family == "hubert" else True,
            num_conv_pos_embeddings=config.get("num_conv_pos_embeddings", 128),
            num_conv_pos_embedding_groups=config.get("num_conv_pos_embedding_groups", 16),
            conv_pos_batch_norm=bool(config.get("conv_pos_batch_norm", False)),
            do_stable_layer_norm=stable,
            num_buckets=config.get("num_buckets", 320),
            max_bucket_distance=config.get("max_bucket_distance", 800),
            # transformers builds the adapters in wav2vec2's and HuBERT's pre-LN layers only: elsewhere
            # it ignores the key, and so does audioenc
            adapter_attn_dim=config.get("adapter_attn_dim") if stable and family != "wavlm" else None,
        )
        _check_numbers(dims, source, {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads"})
        if not len(dims.conv_dim) == len(dims.conv_kernel) == len(dims.conv_stride):
            raise ValueError(f"{source}: conv_dim, conv_kernel and conv_stride must have the same length")
        if dims.hidden_size % dims.num_heads:
            raise ValueError(f"{source}: hidden_size {dims.hidden_size} is not divisible by num_attention_heads {dims.num_heads}")
        if dims.hidden_size % dims.num_conv_pos_embedding_groups:
            raise ValueError(f"{source}: hidden_size {dims.hidden_size} is not divisible by num_conv_pos_embedding_groups "
                             f"{dims.num_conv_pos_embedding_groups}")
        return dims

    @property
    def receptive_field(self) -> int:
        """Samples seen by one output frame of the conv feature encoder (400 for the standard stack)."""
        field = 1
        for k, s in zip(reversed(self.conv_kernel), reversed(self.conv_stride)):
            field = (field - 1) * s + k
        return field

    @property
    def hop(self) -> int:
        """Samples between output frames (320 for the standard stack)."""
        hop = 1
        for s in self.conv_stride:
            hop *= s
        return hop

    def num_frames(self, num_samples: int) -> int:
        """Output frames of the conv stack for ``num_samples`` samples: floor((L - k) / s) + 1 per layer."""
        length = num_samples
        for k, s in zip(self.conv_kernel, self.conv_stride):
            length = (length - k) // s + 1 if length >= k else 0
        return length


@dataclass(frozen=True)
class WhisperDims:
    """The Whisper encoder: conv stem + sinusoidal positions + pre-LN blocks + final LayerNorm."""

    n_mels: int = 80
    n_ctx: int = 1500          # encoder frames per 30 s window
    n_state: int = 512
    n_head: int = 8
    n_layer: int = 6
    n_ffn: int = 2048
    layer_norm_eps: float = 1e-5
    family: str = "whisper"

    @classmethod
    def from_config(cls, config: dict, source: str = "config") -> "WhisperDims":
        act = config.get("activation_function", "gelu")
        if act != "gelu":
            raise _unsupported(source, "activation_function", act, "only the exact erf 'gelu'")
        # An absent key means transformers' WhisperConfig default: whisper-tiny's sizes.
        dims = cls(
            n_mels=config.get("num_mel_bins", 80),
            n_ctx=config.get("max_source_positions", 1500),
            n_state=config.get("d_model", 384),
            n_head=config.get("encoder_attention_heads", 6),
            n_layer=config.get("encoder_layers", 4),
            n_ffn=config.get("encoder_ffn_dim", 1536),
        )
        _check_numbers(dims, source, {"n_mels": "num_mel_bins", "n_ctx": "max_source_positions", "n_state": "d_model",
                                      "n_head": "encoder_attention_heads", "n_layer": "encoder_layers",
                                      "n_ffn": "encoder_ffn_dim"})
        if dims.n_mels not in (80, 128):
            raise _unsupported(source, "num_mel_bins", dims.n_mels, "80 or 128")
        if dims.n_state % dims.n_head:
            raise ValueError(f"{source}: d_model {dims.n_state} is not divisible by encoder_attention_heads {dims.n_head}")
        return dims

    @property
    def hidden_size(self) -> int:
        return self.n_state

    @property
    def num_layers(self) -> int:
        return self.n_layer

    @property
    def window_samples(self) -> int:
        """Samples of one padded input window: 480,000 (30 s) for every released Whisper."""
        return 2 * self.n_ctx * WHISPER_HOP

    def num_frames(self, num_samples: int) -> int:
        """Valid encoder frames for ``num_samples`` samples inside one window."""
        mel_frames = min(num_samples, self.window_samples) // WHISPER_HOP
        return (mel_frames + 1) // 2
