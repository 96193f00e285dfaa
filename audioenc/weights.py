"""Checkpoint loading: the only module that knows foreign tensor names.

Formats :func:`load_checkpoint` reads:

- a local Hugging Face model directory: config.json + model.safetensors / pytorch_model.bin, sharded
  or not, base model or task model (ForCTC, ForXVector, ForConditionalGeneration, ...), or a
  SpeechEncoderDecoderModel's encoder;
- a Hugging Face hub id ("facebook/wav2vec2-base"), downloaded with huggingface_hub (or taken from
  its local cache when offline);
- with ``target_lang``, an MMS checkpoint's language adapter (adapter.<lang>.safetensors beside its
  config.json) in place of the adapters in its weights, as transformers' ``target_lang`` loads it;
- an openai-whisper ``.pt`` (``dims`` + ``model_state_dict``);
- a CTranslate2 / faster-whisper Whisper directory (model.bin + config.json + vocabulary), float32,
  float16, bfloat16, int8 (with any float type), int16;
- a fairseq wav2vec 2.0 / HuBERT ``.pt``, pre-trained or CTC fine-tuned, with a ``cfg`` or a legacy
  ``args`` config;
- a WavLM ``.pt`` of microsoft/unilm (WavLM-Base+.pt, WavLM-Large.pt: ``cfg`` is one flat WavLMConfig
  dict, the tensors have fairseq's names).

Model objects in memory go through the same readers (audioenc.model_objects).

Every format is turned into one :class:`Checkpoint`: a Hugging Face style config dict of the base
encoder and a float32 state dict in audioenc's canonical names, which are Hugging Face's base-model
names with the task prefix removed:

- wav2vec2 / HuBERT / WavLM: ``feature_extractor.conv_layers.0.conv.weight``, ...,
  ``encoder.pos_conv_embed.conv.weight`` (weight norm already folded into a plain weight;
  ``encoder.pos_conv_embed.batch_norm.*`` before it in mHuBERT-25Hz, without num_batches_tracked).
- Whisper: the encoder only, ``conv1.weight``, ``embed_positions.weight``, ``layers.0.fc1.weight``, ...

Missing or misshapen tensors are reported by the model loader (audioenc.models), not here.
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import pickle
import re
import struct
import zipfile
from dataclasses import dataclass, field

import torch

FAMILIES = ("wav2vec2", "hubert", "wavlm", "whisper")


@dataclass
class Checkpoint:
    family: str                        # one of FAMILIES
    config: dict                       # Hugging Face config of the base encoder (model_type, sizes, switches)
    state_dict: dict[str, torch.Tensor]  # canonical names, float32
    preprocessor: dict = field(default_factory=dict)  # preprocessor_config.json, if any (read_preprocessor)
    source: str = ""                   # what the user passed
    format: str = "hf"                 # "hf" | "openai" | "ctranslate2" | "fairseq" | "unilm"
    path: str = ""                     # the local file or directory read (a hub id's snapshot)
    weights_digest: str = ""           # recalled from audioenc's record, no tensors read (checkpoint_record.py)
    file_stats: list = field(default_factory=list)  # its files' stat, taken before they were read
    target_lang: str = ""              # MMS: the language whose adapter.<lang> file replaced the adapters


def load_checkpoint(source: str | os.PathLike, *, family: str | None = None, path: str | None = None,
                    target_lang: str | None = None) -> Checkpoint:
    """Any supported checkpoint (see the module docstring); ``family`` makes a checkpoint of another
    family an error instead of a surprise. ``path``: where :func:`locate` found it, when known.
    ``target_lang``: an MMS checkpoint's language adapter replaces the adapters of its weights."""
    check_family(None, family)
    check_target_lang(target_lang)
    source = os.fspath(source)
    path = locate(source, target_lang) if path is None else path
    if target_lang is not None and not (os.path.isdir(path) and os.path.isfile(os.path.join(path, "config.json"))
                                        and not os.path.isfile(os.path.join(path, "model.bin"))):
        # before reading it: a fairseq .pt may be gigabytes
        raise ValueError(f"{source}: target_lang={target_lang!r} picks an MMS language adapter (an "
                         "adapter.<lang>.safetensors file beside a Hugging Face checkpoint's config.json, as in "
                         "facebook/mms-1b-all), and this checkpoint is not a Hugging Face directory: it has none")
    try:
        stats = file_stats(path)
    except OSError:  # e.g. an unreadable directory: the loaders say what is wrong; no record is kept
        stats = []
    if os.path.isdir(path):
        checkpoint = _load_dir(path, "" if path == source else source)
    else:
        checkpoint = _load_file(path)
    checkpoint.path, checkpoint.file_stats = os.path.abspath(path), stats
    if target_lang is not None:
        load_language_adapter(checkpoint, path, target_lang)
    check_family(checkpoint, family)
    return checkpoint


def locate(source: str | os.PathLike, target_lang: str | None = None) -> str:
    """The checkpoint file or directory ``source`` names: itself, or a hub id's local snapshot
    (downloaded when not in the local cache, or when online and changed; with ``target_lang``'s
    adapter file)."""
    source = os.fspath(source)
    if not source.strip():
        raise ValueError("the checkpoint's name is empty: pass a checkpoint directory or file, a hub id or random:NAME")
    if os.path.isdir(source) or os.path.isfile(source):
        return source
    if os.path.exists(source):
        raise ValueError(f"{source}: not a regular file or a directory (a pipe, socket or device)")
    if _HUB_ID.fullmatch(source):
        return _download(source, target_lang)
    raise ValueError(f"{source}: no such file or directory")


def file_stats(path: str) -> list[list]:
    """Name, size, modification and change times (ns) and inode of the checkpoint file, or of each
    file in the checkpoint directory (a hub snapshot's links: their blobs): any write changes them,
    but for a rewrite of the same size within one tick of a coarse file system clock."""
    names = sorted(os.listdir(path)) if os.path.isdir(path) else [""]
    stats = []
    for name in names:
        file = os.path.join(path, name) if name else path
        if name and not os.path.isfile(file):
            continue  # subdirectories: no loader reads them
        st = os.stat(file)
        stats.append([name, st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino])
    return stats


def check_family(checkpoint: Checkpoint | None, family: str | None) -> None:
    """ValueError unless ``family`` is None or a family name, and ``checkpoint`` (when given) is of it."""
    if family is not None and family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, not {family!r}")
    if checkpoint is not None and family is not None and checkpoint.family != family:
        raise ValueError(f"{checkpoint.source or checkpoint.path}: expected a {family} checkpoint, got {checkpoint.family}")


EXPORTED_FILES = ("model.onnx", "engine.plan")  # what `audioenc export` writes
NOT_A_CHECKPOINT = ("an exported ONNX graph or TensorRT engine, not a checkpoint: load the checkpoint it came from "
                    "(backend='onnx' and 'tensorrt' export and cache their graphs themselves), or run the file with "
                    "onnxruntime or TensorRT directly")


def _load_dir(path: str, source: str = "") -> Checkpoint:
    # CTranslate2 dirs carry a config.json too, so model.bin decides first.
    if os.path.isfile(os.path.join(path, "model.bin")):
        return load_ctranslate2_dir(path, source)
    if os.path.isfile(os.path.join(path, "config.json")):
        return load_hf_dir(path, source)
    if any(os.path.isfile(os.path.join(path, name)) for name in EXPORTED_FILES):
        raise ValueError(f"{source or path}: {NOT_A_CHECKPOINT}")
    raise ValueError(
        f"{source or path}: no checkpoint in this directory (expected config.json with model.safetensors "
        f"or pytorch_model.bin, or a CTranslate2 model.bin)"
    )


def _load_file(path: str) -> Checkpoint:
    if path.endswith(".safetensors"):
        raise ValueError(f"{path}: a lone safetensors file has no config; pass the directory that holds "
                         f"it and its config.json")
    if os.path.basename(path) in ("config.json", "preprocessor_config.json", "processor_config.json", "model.bin",
                                  "pytorch_model.bin"):
        raise ValueError(f"{path}: one file of a checkpoint directory; pass the directory that holds it")
    if path.endswith((".onnx", ".onnx.data", ".engine", ".plan")):
        raise ValueError(f"{path}: {NOT_A_CHECKPOINT}")
    obj, mapped = _torch_load(path, read=("model", "cfg", "args", "dims", "model_state_dict"))
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: not a checkpoint audioenc can read (holds a {type(obj).__name__}, not a dict)")
    loader = (load_openai_whisper if "model_state_dict" in obj or "dims" in obj else
              load_fairseq if "model" in obj and ("cfg" in obj or "args" in obj) else None)
    if loader is not None:
        checkpoint = loader(obj, path)
        if mapped:
            checkpoint.state_dict = private_copies(checkpoint.state_dict, obj)
        return checkpoint
    raise ValueError(f"{path}: neither an openai-whisper checkpoint (dims, model_state_dict) nor a fairseq or "
                     f"unilm one (model, cfg or args); top-level keys: {', '.join(map(str, list(obj)[:10]))}")


class _StandIn:
    """Takes the place of a class or function that a checkpoint names beside its tensors (fairseq keeps
    its label Dictionary in task_state and numpy scalars in extra_state): nothing is imported or run.
    It keeps the state the file gives it as data, which is how a pickled omegaconf config is read."""
    state = None

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        self.state = state


# fairseq of late 2020 pickled its cfg as an omegaconf DictConfig (checkpoint_utils.save_state's "cfg": cfg;
# later Trainers save OmegaConf.to_container): the containers keep their items in _content, the nodes
# (omegaconf.nodes.AnyNode, StringNode, ...) their value in _val.
_OMEGACONF_CONTAINERS = ("omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig")


def _plain_config(x):
    """``x`` with each pickled omegaconf container in it read as the plain dict or list of its values."""
    if isinstance(x, _StandIn):
        name, state = type(x).__name__, x.state if isinstance(x.state, dict) else {}
        if name in _OMEGACONF_CONTAINERS and isinstance(state.get("_content"), (dict, list, type(None))):
            return _plain_config(state["_content"])
        if name.startswith("omegaconf.nodes.") and "_val" in state:
            return _plain_config(state["_val"])
        return x
    if isinstance(x, dict):
        return {k: _plain_config(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain_config(v) for v in x]
    return x


def _stand_in_within(x):
    """The first _StandIn in ``x`` (plain containers looked through), or None."""
    if isinstance(x, _StandIn):
        return x
    values = x.values() if isinstance(x, dict) else vars(x).values() if isinstance(x, argparse.Namespace) else \
        x if isinstance(x, (list, tuple)) else ()
    return next((found for found in map(_stand_in_within, values) if found is not None), None)


_LFS_POINTER = b"version https://git-lfs.github.com/spec/"


def _check_not_lfs_pointer(path: str) -> None:
    """ValueError when ``path`` is a Git LFS pointer: a hub repo cloned without Git LFS holds these small
    text files in place of its weights, which each reader would otherwise call damaged."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LFS_POINTER))
    except OSError:  # the reader says what is wrong
        return
    if head == _LFS_POINTER:
        raise ValueError(f"{path}: a Git LFS pointer, not the file it stands for: the repository was cloned or copied "
                         "without its Git LFS files; fetch them (git lfs install, then git lfs pull in the repository)")


def _torch_load(path: str, read=None) -> tuple[object, bool]:
    """(torch.load with weights_only=True, whether it is mapped). Legacy fairseq ``args`` need
    argparse.Namespace; any other class or function the file names becomes an inert _StandIn, and
    one within what the loaders read (the top-level keys ``read``, every key when None) is an error,
    so a file with arbitrary Python objects is never a code execution risk. A zip-format file
    (torch.save's since torch 1.6) is mapped, so tensors that no loader keeps (a decoder, fairseq's
    optimizer state) are never read; the loaders keep private copies of the rest."""
    _check_not_lfs_pointer(path)
    mapped = zipfile.is_zipfile(path)
    stand_ins = {}
    while True:
        try:
            with torch.serialization.safe_globals([argparse.Namespace, *((c, n) for n, c in stand_ins.items())]):
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mapped)
            break
        except pickle.UnpicklingError as e:
            # torch's message wraps the unpickler's reason ("WeightsUnpickler error: <reason>") in advice
            # about weights_only that does not apply here.
            text = str(e)
            reason = text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation of torch.load")[0]
            reason = " ".join(reason.split()) or text.strip()
            name = re.search(r"Unsupported global: GLOBAL (\S+) was not", reason)
            # torch names builtins.dict "dict" in its message, but looks it up by the full name
            name = name and (name[1] if "." in name[1] else f"builtins.{name[1]}")
            if name and name not in stand_ins and not name.startswith("torch."):
                stand_ins[name] = type(name, (_StandIn,), {})
                continue
            if "Unsupported global" in reason:
                raise ValueError(f"{path}: refused to load, it holds Python objects beyond tensors and plain "
                                 f"containers ({reason.split(' Please use')[0]}); audioenc never unpickles "
                                 f"arbitrary objects: re-save the checkpoint with only tensors and plain dicts") from e
            raise ValueError(f"{path}: not a PyTorch checkpoint, or a damaged one (unpickling failed: {reason})") from e
        except Exception as e:  # zip/pickle/EOF errors from a file that is not a PyTorch checkpoint
            raise ValueError(f"{path}: not a PyTorch checkpoint, or a damaged one ({type(e).__name__}: {e})") from e
    if stand_ins and isinstance(obj, dict):  # a pickled omegaconf config is among the stand-ins, or none is
        obj.update({k: _plain_config(v) for k, v in obj.items() if read is None or k in read})
    found = _stand_in_within(obj if read is None or not isinstance(obj, dict) else [obj.get(k) for k in read])
    if found is not None:
        raise ValueError(f"{path}: refused to load, it holds Python objects beyond tensors and plain containers "
                         f"(a {type(found).__name__} where audioenc reads it); audioenc never unpickles arbitrary "
                         "objects: re-save the checkpoint with only tensors and plain dicts")
    return obj, mapped


def private_copies(state_dict: dict[str, torch.Tensor], loaded) -> dict[str, torch.Tensor]:
    """``state_dict`` with each tensor that shares memory with ``loaded`` (a mapped torch.load result)
    copied out of it: the file could change, or be cut short, under the model."""
    shared = set()

    def collect(x):
        if isinstance(x, torch.Tensor):
            shared.add(x.untyped_storage().data_ptr())
        elif isinstance(x, dict):
            for value in x.values():
                collect(value)
        elif isinstance(x, (list, tuple)):
            for value in x:
                collect(value)

    collect(loaded)
    return {name: t.clone() if t.untyped_storage().data_ptr() in shared else t for name, t in state_dict.items()}


def family_of(config: dict, source: str = "") -> str:
    """The audioenc family of a Hugging Face config, or a ValueError naming what it is instead."""
    model_type = config.get("model_type")
    if model_type in FAMILIES:
        return model_type
    raise ValueError(
        f"{source or 'checkpoint'}: model_type {model_type!r} is not an encoder audioenc supports "
        f"(supported: {', '.join(FAMILIES)})"
    )


def _rename(state_dict: dict[str, torch.Tensor], table) -> dict[str, torch.Tensor]:
    """Applies the first matching (regex, template) of ``table`` to every name; names that match none
    (heads, decoders, quantizers, ...) are dropped."""
    out = {}
    for name, tensor in state_dict.items():
        for pattern, template in table:
            m = re.fullmatch(pattern, name)
            if m:
                out[m.expand(template)] = tensor
                break
    return out


def _float32(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in state_dict.items()}


# The training-step count of mHuBERT-25Hz's positional BatchNorm: inference never reads it.
_BATCH_NORM_COUNTER = "encoder.pos_conv_embed.batch_norm.num_batches_tracked"


def fold_weight_norm(state_dict: dict[str, torch.Tensor], module: str, source: str, dim: int = 2) -> None:
    """Replaces weight norm's (g, v) pair of ``module`` by the plain weight g * v / ||v||, with the
    norm taken over every dim except ``dim`` (torch.nn.utils.weight_norm semantics)."""
    pairs = [(f"{module}.weight_g", f"{module}.weight_v"),
             (f"{module}.parametrizations.weight.original0", f"{module}.parametrizations.weight.original1")]
    for g_name, v_name in pairs:
        if g_name in state_dict and v_name in state_dict:
            g = state_dict.pop(g_name).float()
            v = state_dict.pop(v_name).float()
            gain_shape = tuple(v.shape[d] if d == dim else 1 for d in range(v.dim()))
            if tuple(g.shape) != gain_shape:  # it would broadcast into a wrong weight, or fail obscurely
                raise ValueError(f"{source}: tensor {g_name} has shape {tuple(g.shape)}; weight norm of {v_name} "
                                 f"{tuple(v.shape)} over dim {dim} needs {gain_shape}")
            other = [d for d in range(v.dim()) if d != dim]
            state_dict[f"{module}.weight"] = g * v / v.norm(dim=other, keepdim=True)


# ----------------------------------------------------------------------------------------------------
# Hugging Face directories and hub ids

# Task checkpoints wrap the base model under one of these prefixes (Wav2Vec2ForCTC: "wav2vec2.",
# WhisperForConditionalGeneration: "model.encoder.", WhisperModel: "encoder."); a base model has none.
_BASE_PREFIXES = {
    "wav2vec2": ("wav2vec2.",),
    "hubert": ("hubert.",),
    "wavlm": ("wavlm.",),
    "whisper": ("model.encoder.", "encoder."),
}
# What the encoder is made of once the prefix is gone; anything else (masked_spec_embed, a decoder)
# is dropped.
_ENCODER_ROOTS = {
    "wav2vec2": ("feature_extractor.", "feature_projection.", "encoder."),
    "whisper": ("conv1.", "conv2.", "embed_positions.", "layers.", "layer_norm."),
}
_ENCODER_ROOTS["hubert"] = _ENCODER_ROOTS["wavlm"] = _ENCODER_ROOTS["wav2vec2"]


def canonical_hf_state_dict(family: str, state_dict: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Strips the task prefix, drops heads and decoder, folds weight norm; returns float32 tensors."""
    # Only the prefixed names of a task model are the encoder: WavLMForXVector also has a top-level
    # "feature_extractor.weight" (a Linear of its x-vector head).
    prefix = next((p for p in _BASE_PREFIXES[family] if any(k.startswith(p) for k in state_dict)), "")
    adapter = next((k for k in state_dict if k.startswith(f"{prefix}adapter.")), None)
    if adapter is not None:  # Wav2Vec2Model would run it on last_hidden_state: dropping it changes the output
        raise ValueError(f"{source}: the checkpoint holds adapter weights ({adapter}, ...), which audioenc does not "
                         "implement (config add_adapter)")
    out = {}
    for name, tensor in state_dict.items():
        if name.startswith(prefix) and name[len(prefix):].startswith(_ENCODER_ROOTS[family]):
            out[name[len(prefix):]] = tensor
    if family != "whisper":
        fold_weight_norm(out, "encoder.pos_conv_embed.conv", source)
        out.pop(_BATCH_NORM_COUNTER, None)
    return _float32(out)


def may_be_encoder(family: str, name: str) -> bool:
    """Whether a HF checkpoint's tensor can be part of the encoder (or an adapter, which is refused):
    a cheap first cut, before canonical_hf_state_dict picks the task prefix."""
    for prefix in ("", *_BASE_PREFIXES[family]):
        if name.startswith(prefix) and name[len(prefix):].startswith((*_ENCODER_ROOTS[family], "adapter.")):
            return True
    return False


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def read_safetensors(path: str, keep=None) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file that ``keep(name)`` accepts (all when None), floating ones as
    float32. Read one at a time into memory of their own, not mapped: a mapped file's pages count
    against the process until its last tensor is gone, and a float16 file would sit in memory beside
    its float32 copy."""
    _check_not_lfs_pointer(path)
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header_size = int.from_bytes(f.read(8), "little")
            if not 0 < header_size <= size - 8:
                raise ValueError(f"its header size {header_size} does not fit a file of {size} bytes")
            header = json.loads(f.read(header_size))
            out = {}
            for name, info in header.items():
                if name == "__metadata__" or (keep is not None and not keep(name)):
                    continue
                dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
                if dtype is None:
                    raise ValueError(f"tensor {name} has dtype {info['dtype']}, which audioenc does not read")
                begin, end = info["data_offsets"]
                shape = [int(n) for n in info["shape"]]
                if min(shape, default=0) < 0 or end - begin != math.prod(shape) * dtype.itemsize or 8 + header_size + end > size:
                    raise ValueError(f"tensor {name}'s data does not fit its shape or the file")
                tensor = torch.empty(shape, dtype=dtype)
                raw = tensor.reshape(-1).view(torch.uint8).numpy()
                f.seek(8 + header_size + begin)
                if f.readinto(raw) != raw.size:
                    raise ValueError(f"tensor {name} is cut short")
                out[name] = tensor.float() if tensor.is_floating_point() else tensor
            return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError) as e:  # truncated, corrupt
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from e


def load_hf_dir(path: str, source: str = "") -> Checkpoint:
    """A Hugging Face model directory: config.json + model.safetensors / pytorch_model.bin (sharded too)."""
    config = _read_json(os.path.join(path, "config.json"))
    outer = ""  # a SpeechEncoderDecoderModel's encoder is a model of its own, under "encoder."
    if config.get("model_type") == "speech-encoder-decoder" and isinstance(config.get("encoder"), dict):
        config, outer = config["encoder"], "encoder."
    family = family_of(config, source or path)
    quantization = config.get("quantization_config")
    if quantization:  # its int8 / int4 weights and scales would fail as unexpected tensors, unexplained
        method = quantization.get("quant_method") if isinstance(quantization, dict) else None
        raise ValueError(f"{source or path}: a quantised checkpoint (config quantization_config, quant_method "
                         f"{method!r}), which audioenc does not run: load the float checkpoint it was made from "
                         "(backend='onnx' with dtype='int8' quantises it itself)")

    def keep(n):
        return n.startswith(outer) and may_be_encoder(family, n[len(outer):])

    tensors: dict[str, torch.Tensor] = {}
    for name in weight_files(path):
        file = os.path.join(path, name)
        if name.endswith(".safetensors"):  # a decoder or task head is never read
            tensors.update(read_safetensors(file, keep=keep))
        else:  # nor is it when the pickle is mapped
            loaded, mapped = _torch_load(file)
            if not isinstance(loaded, dict):
                raise ValueError(f"{file}: not a state dict (holds a {type(loaded).__name__})")
            kept = {n: t for n, t in loaded.items() if keep(n)}
            tensors.update(private_copies(kept, loaded) if mapped else kept)
    tensors = {n[len(outer):]: t for n, t in tensors.items()}
    state_dict = canonical_hf_state_dict(family, tensors, source or path)
    if not state_dict:  # the model loader would call every tensor missing: a truncated file, it would suggest
        raise ValueError(f"{source or path}: holds none of the {family} encoder's tensors"
                         + (" (a decoder-only model, such as WhisperForCausalLM: distil-whisper's assistant models)"
                            if family == "whisper" else ""))
    preprocessor = read_preprocessor(path)
    return Checkpoint(family, config, state_dict, preprocessor, source or path, "hf")


def read_preprocessor(path: str) -> dict:
    """The feature extractor's settings in a model directory, where transformers 5 looks for them:
    processor_config.json's nested "feature_extractor" (or "audio_processor"), which a processor saved
    by transformers 5 writes instead of preprocessor_config.json; else preprocessor_config.json; {}
    when there are none."""
    processor_path = os.path.join(path, "processor_config.json")
    if os.path.exists(processor_path):
        nested = nested_feature_extractor(_read_json(processor_path))
        if nested is not None:
            return nested
    pre_path = os.path.join(path, "preprocessor_config.json")
    return _read_json(pre_path) if os.path.exists(pre_path) else {}


def nested_feature_extractor(processor: dict) -> dict | None:
    """The feature extractor's settings inside a processor_config.json, or None."""
    nested = processor.get("feature_extractor", processor.get("audio_processor"))
    return nested if isinstance(nested, dict) else None


def preprocessor_settings(preprocessor, label: str) -> dict:
    """A feature extractor (or a processor holding one) as the dict of its preprocessor_config.json."""
    preprocessor = getattr(preprocessor, "feature_extractor", preprocessor)
    if isinstance(preprocessor, (str, os.PathLike)):
        raise TypeError(f"{label}: preprocessor must be a feature extractor or a dict, not a path: pass "
                        "transformers.AutoFeatureExtractor.from_pretrained(path)")
    if hasattr(preprocessor, "to_dict") and not isinstance(preprocessor, type):
        preprocessor = preprocessor.to_dict()
    if not isinstance(preprocessor, dict):
        got = f"the class {preprocessor.__name__}" if isinstance(preprocessor, type) else type(preprocessor).__name__
        raise TypeError(f"{label}: preprocessor must be a feature extractor (an instance) or a dict, got {got}")
    return dict(nested_feature_extractor(preprocessor) or preprocessor)  # a processor_config.json's too


def _read_json(path: str) -> dict:
    """A JSON object (every file a checkpoint holds is one)."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(value).__name__}")
    return value


def weight_files(path: str) -> list[str]:
    """The weight files of a HF dir, safetensors first; sharded checkpoints through their index."""
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.exists(os.path.join(path, single)):
            return [single]
        if os.path.exists(os.path.join(path, index)):
            weight_map = _read_json(os.path.join(path, index)).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ValueError(f"{os.path.join(path, index)}: no weight_map from tensor names to files")
            return sorted(set(weight_map.values()))
    raise ValueError(f"{path}: no model.safetensors or pytorch_model.bin (nor a sharded index) in this directory")


_TARGET_LANG = re.compile(r"[A-Za-z0-9][\w-]*")  # MMS's codes: "fra", "cmn-script_simplified"
_ADAPTER_FILE = re.compile(r"adapter\.([A-Za-z0-9][\w-]*)\.(?:safetensors|bin)")


def check_target_lang(target_lang) -> None:
    """TypeError or ValueError unless ``target_lang`` is None or a language code (a file name part)."""
    if target_lang is not None and not isinstance(target_lang, str):
        raise TypeError(f"target_lang must be a language code string such as 'fra', got {type(target_lang).__name__}")
    if target_lang is not None and not _TARGET_LANG.fullmatch(target_lang):
        raise ValueError(f"target_lang must be a language code such as 'fra' or 'cmn-script_simplified' (the <lang> of "
                         f"an adapter.<lang>.safetensors file), got {target_lang!r}")


def load_language_adapter(checkpoint: Checkpoint, path: str, target_lang: str) -> None:
    """Replaces the MMS adapters in ``checkpoint``'s weights by those of ``path``/adapter.<target_lang>
    .safetensors (or .bin), with transformers' checks (Wav2Vec2ForCTC's load_adapter): every adapter
    tensor there and nothing else. Its lm_head (a CTC head for the language's letters) is not the
    encoder's: it is dropped."""
    source, config = checkpoint.source or path, checkpoint.config
    if checkpoint.family != "wav2vec2":  # HubertForCTC's target_lang goes to peft, WavLM has no adapters
        raise ValueError(f"{source}: target_lang={target_lang!r} picks an MMS language adapter, which transformers "
                         f"loads into wav2vec2 models only; this is a {checkpoint.family} checkpoint")
    if config.get("adapter_attn_dim") is None or not config.get("do_stable_layer_norm"):
        why = ("its config has no adapter_attn_dim" if config.get("adapter_attn_dim") is None else
               "its layers are post-LN (do_stable_layer_norm false), which transformers builds without adapters")
        raise ValueError(f"{source}: target_lang={target_lang!r} picks an MMS language adapter, but this checkpoint "
                         f"has no language adapters ({why}): drop target_lang, or load an MMS checkpoint such as "
                         "facebook/mms-1b-all")
    names = [f"adapter.{target_lang}.safetensors", f"adapter.{target_lang}.bin"]  # transformers' order
    file = next((os.path.join(path, n) for n in names if os.path.isfile(os.path.join(path, n))), None)
    if file is None:
        found = sorted({m[1] for m in map(_ADAPTER_FILE.fullmatch, os.listdir(path)) if m})
        hub = path != source
        where = (f"the hub repo {source} has none, or it could not be downloaded (offline?)" if hub else
                 f"{path} has none")
        # a hub snapshot holds only the adapters downloaded so far, not the repo's
        there = f"in its local snapshot {path}" if hub else "there"
        listed = (f"adapters found {there}: {', '.join(found[:10])}{', ...' if len(found) > 10 else ''} "
                  f"({len(found)} languages)" if found else f"there are no adapter.<lang>.safetensors files {there}")
        raise ValueError(f"{source}: no adapter for target_lang {target_lang!r}: {where} ({' or '.join(names)}); "
                         f"{listed}")
    mapped = False
    if file.endswith(".safetensors"):
        tensors = read_safetensors(file)
    else:
        tensors, mapped = _torch_load(file)
        if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ValueError(f"{file}: not a state dict of tensors")
    hidden, inner = config.get("hidden_size", 768), config["adapter_attn_dim"]
    shapes = {"norm.weight": (hidden,), "norm.bias": (hidden,), "linear_1.weight": (inner, hidden),
              "linear_1.bias": (inner,), "linear_2.weight": (hidden, inner), "linear_2.bias": (hidden,)}
    # Wav2Vec2ForCTC's names (a base Wav2Vec2Model's lack the prefix)
    prefix = "wav2vec2." if any(k.startswith("wav2vec2.") for k in tensors) else ""
    expected = {f"encoder.layers.{i}.adapter_layer.{leaf}": shape
                for i in range(config.get("num_hidden_layers", 12)) for leaf, shape in shapes.items()}
    adapter = {k[len(prefix):]: t for k, t in tensors.items() if k.startswith(prefix) and k[len(prefix):] in expected}
    unexpected = sorted(k for k in tensors if not k.startswith("lm_head.") and k not in {prefix + n for n in adapter})
    missing = sorted(set(expected) - set(adapter))
    if unexpected or missing:
        parts = ([f"{len(missing)} missing adapter tensor(s), e.g. {', '.join(prefix + k for k in missing[:3])}"]
                 if missing else []) + ([f"{len(unexpected)} unexpected tensor(s), e.g. {', '.join(unexpected[:3])}"]
                                        if unexpected else [])
        raise ValueError(f"{file}: not this checkpoint's language adapter: {'; '.join(parts)} (an adapter of another "
                         "model, or a damaged file?)")
    for name, tensor in adapter.items():
        if tuple(tensor.shape) != expected[name] or not tensor.is_floating_point():
            raise ValueError(f"{file}: tensor {prefix + name} is {str(tensor.dtype).removeprefix('torch.')} of shape "
                             f"{tuple(tensor.shape)}, this checkpoint's adapters take floating point {expected[name]} "
                             "(an adapter of another model size?)")
    checkpoint.state_dict.update(_float32(private_copies(adapter, tensors) if mapped else adapter))
    checkpoint.target_lang = target_lang


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_HUB_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "model.bin")


def _download(repo_id: str, target_lang: str | None = None) -> str:
    """Fetches config, preprocessor and weights of a hub repo (safetensors, else .bin; model.bin for a
    CTranslate2 repo), and ``target_lang``'s MMS adapter file (facebook/mms-1b-all holds over a thousand:
    only that one); offline, huggingface_hub answers from its local cache."""
    from huggingface_hub import snapshot_download

    # Shards by transformers' own names only: repos such as openai/whisper-large-v3 also carry
    # "model.fp32-0000N-of-0000M.safetensors" copies that a looser pattern would fetch (6 GB more).
    common = ["config.json", "preprocessor_config.json", "processor_config.json", "vocabulary.*", "model.bin"]
    if target_lang is not None:
        common += [f"adapter.{target_lang}.safetensors", f"adapter.{target_lang}.bin"]
    try:
        path = snapshot_download(repo_id, allow_patterns=common + [
            "model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json"])
        if not any(os.path.exists(os.path.join(path, f)) for f in
                   ("model.safetensors", "model.safetensors.index.json", "model.bin")):
            path = snapshot_download(repo_id, allow_patterns=common + [
                "pytorch_model.bin", "pytorch_model-*-of-*.bin", "pytorch_model.bin.index.json"])
    except (OSError, ValueError) as e:  # offline / connection / unknown repo (all OSError) / bad id
        raise ValueError(
            f"{repo_id}: no such local path, and it could not be downloaded from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0]}). Pass a local model directory instead, or "
            f"download it while online."
        ) from e
    # offline, huggingface_hub gives the cached snapshot as it is: it may hold a config and no weights
    if not any(os.path.exists(os.path.join(path, f)) for f in _HUB_WEIGHTS):
        raise ValueError(f"{repo_id}: its snapshot in the local Hugging Face cache ({path}) holds no weights "
                         f"({', '.join(_HUB_WEIGHTS)}): they could not be downloaded (offline? download them while "
                         "online, or pass a local model directory), or the repo has none in these formats")
    return path


# ----------------------------------------------------------------------------------------------------
# openai-whisper .pt

_OPENAI_NAMES = [
    (r"encoder\.conv([12])\.(weight|bias)", r"conv\1.\2"),
    (r"encoder\.positional_embedding", "embed_positions.weight"),
    (r"encoder\.blocks\.(\d+)\.attn\.query\.(\w+)", r"layers.\1.self_attn.q_proj.\2"),
    (r"encoder\.blocks\.(\d+)\.attn\.key\.(\w+)", r"layers.\1.self_attn.k_proj.\2"),
    (r"encoder\.blocks\.(\d+)\.attn\.value\.(\w+)", r"layers.\1.self_attn.v_proj.\2"),
    (r"encoder\.blocks\.(\d+)\.attn\.out\.(\w+)", r"layers.\1.self_attn.out_proj.\2"),
    (r"encoder\.blocks\.(\d+)\.attn_ln\.(\w+)", r"layers.\1.self_attn_layer_norm.\2"),
    (r"encoder\.blocks\.(\d+)\.mlp\.0\.(\w+)", r"layers.\1.fc1.\2"),
    (r"encoder\.blocks\.(\d+)\.mlp\.2\.(\w+)", r"layers.\1.fc2.\2"),
    (r"encoder\.blocks\.(\d+)\.mlp_ln\.(\w+)", r"layers.\1.final_layer_norm.\2"),
    (r"encoder\.ln_post\.(\w+)", r"layer_norm.\1"),
]


def load_openai_whisper(obj: dict, path: str) -> Checkpoint:
    """An openai-whisper checkpoint dict: ``dims`` (ModelDimensions as a dict) + ``model_state_dict``."""
    if "dims" not in obj or "model_state_dict" not in obj:
        missing = "dims" if "dims" not in obj else "model_state_dict"
        raise ValueError(f"{path}: openai-whisper checkpoint without {missing!r}")
    dims = obj["dims"]
    missing = [k for k in ("n_mels", "n_audio_ctx", "n_audio_state", "n_audio_head", "n_audio_layer") if k not in dims]
    if missing:
        raise ValueError(f"{path}: openai-whisper dims without {', '.join(missing)}")
    config = _whisper_config(num_mel_bins=dims["n_mels"], d_model=dims["n_audio_state"],
                             encoder_layers=dims["n_audio_layer"], encoder_attention_heads=dims["n_audio_head"],
                             encoder_ffn_dim=4 * dims["n_audio_state"],  # openai's MLP is always 4x wide
                             max_source_positions=dims["n_audio_ctx"])
    names = list(obj["model_state_dict"])
    if not any(name.startswith("encoder.") for name in names):  # else every tensor is called missing, unexplained
        encoder_alone = any(name.startswith(("conv1.", "blocks.", "ln_post.")) for name in names)
        raise ValueError(f"{path}: its model_state_dict holds no encoder tensors (openai-whisper names them "
                         "encoder.*): " + ("the AudioEncoder's own state dict? Save the whole model's state dict, "
                                           "or prefix its names with 'encoder.'" if encoder_alone else
                                           "a decoder-only state dict?"))
    state_dict = _float32(_rename(obj["model_state_dict"], _OPENAI_NAMES))
    preprocessor = _whisper_preprocessor(dims["n_mels"], dims["n_audio_ctx"])
    return Checkpoint("whisper", config, state_dict, preprocessor, path, "openai")


def _whisper_config(**sizes) -> dict:
    return {"model_type": "whisper", "activation_function": "gelu", **sizes}


def _whisper_preprocessor(n_mels: int, n_ctx: int) -> dict:
    """WhisperFeatureExtractor's defaults, for formats that carry no preprocessor_config.json; its
    window is the model's (30 s for every released Whisper)."""
    return {"feature_extractor_type": "WhisperFeatureExtractor", "feature_size": n_mels, "sampling_rate": 16000,
            "n_fft": 400, "hop_length": 160, "chunk_length": n_ctx // 50 if n_ctx % 50 == 0 else n_ctx / 50,
            "n_samples": 320 * n_ctx,
            "nb_max_frames": 2 * n_ctx, "padding_value": 0.0, "return_attention_mask": False}


# ----------------------------------------------------------------------------------------------------
# CTranslate2 (faster-whisper) directories. model.bin layout, from ctranslate2/specs/model_spec.py
# (little-endian): u32 binary version, string spec name, u32 spec revision, u32 variable count, then per
# variable: string name, u8 rank, u32 dims[rank], u8 dtype id, u32 byte count, bytes; then u32 alias
# count and (alias, target) string pairs. A string is a u16 length (with the NUL) + UTF-8 + NUL.

_CT2_VERSIONS = (4, 5, 6)  # dtype ids and aliases exist from version 4 on
_CT2_DTYPES = {0: torch.float32, 1: torch.int8, 2: torch.int16, 3: torch.int32, 4: torch.float16, 5: torch.bfloat16}

_CT2_NAMES = [
    (r"encoder/conv([12])/(weight|bias)", r"conv\1.\2"),
    (r"encoder/position_encodings/encodings", "embed_positions.weight"),
    (r"encoder/layer_(\d+)/self_attention/q_proj/(\w+)", r"layers.\1.self_attn.q_proj.\2"),
    (r"encoder/layer_(\d+)/self_attention/k_proj/weight", r"layers.\1.self_attn.k_proj.weight"),
    (r"encoder/layer_(\d+)/self_attention/v_proj/(\w+)", r"layers.\1.self_attn.v_proj.\2"),
    (r"encoder/layer_(\d+)/self_attention/linear_1/(\w+)", r"layers.\1.self_attn.out_proj.\2"),
    (r"encoder/layer_(\d+)/self_attention/layer_norm/(\w+)", r"layers.\1.self_attn_layer_norm.\2"),
    (r"encoder/layer_(\d+)/ffn/linear_0/(\w+)", r"layers.\1.fc1.\2"),
    (r"encoder/layer_(\d+)/ffn/linear_1/(\w+)", r"layers.\1.fc2.\2"),
    (r"encoder/layer_(\d+)/ffn/layer_norm/(\w+)", r"layers.\1.final_layer_norm.\2"),
    (r"encoder/layer_norm/(\w+)", r"layer_norm.\1"),
]


def load_ctranslate2_dir(path: str, source: str = "") -> Checkpoint:
    """A CTranslate2 Whisper model directory; int8/int16 weights are dequantized with their scales."""
    bin_path = os.path.join(path, "model.bin")
    spec, tensors = read_ctranslate2_bin(bin_path, prefix="encoder/")
    if spec != "WhisperSpec":
        raise ValueError(f"{source or path}: CTranslate2 model of spec {spec!r}; audioenc reads only Whisper "
                         f"(WhisperSpec) CTranslate2 models")
    if "encoder/num_heads" not in tensors:
        raise ValueError(f"{bin_path}: no encoder/num_heads; this CTranslate2 Whisper model predates spec "
                         f"revision 3, convert it again with a current ctranslate2")
    state_dict = {}
    for name, tensor in tensors.items():
        name = re.sub(r"/gamma$", "/weight", re.sub(r"/beta$", "/bias", name))  # CT2's LayerNorm names
        fused = re.fullmatch(r"(encoder/layer_\d+/self_attention)/linear_0/(weight|bias)", name)
        if fused:  # q, k and v are one fused Linear in CT2
            q, k, v = tensor.chunk(3, dim=0)
            base, leaf = fused.groups()
            state_dict[f"{base}/q_proj/{leaf}"] = q
            state_dict[f"{base}/v_proj/{leaf}"] = v
            if leaf == "weight":  # Whisper's key projection has no bias; CT2 stores zeros for it
                state_dict[f"{base}/k_proj/weight"] = k
        else:
            state_dict[name] = tensor
    state_dict = _float32(_rename(state_dict, _CT2_NAMES))
    for name in ("conv1.weight", "layers.0.fc1.weight", "embed_positions.weight"):  # the config is read off these
        if name not in state_dict:
            raise ValueError(f"{bin_path}: CTranslate2 Whisper model without the encoder tensor for {name}")
    conv1 = state_dict["conv1.weight"]
    config = _whisper_config(
        num_mel_bins=conv1.shape[1], d_model=conv1.shape[0],
        encoder_layers=len([n for n in state_dict if re.fullmatch(r"layers\.\d+\.fc1\.weight", n)]),
        encoder_attention_heads=int(tensors["encoder/num_heads"]),
        encoder_ffn_dim=state_dict["layers.0.fc1.weight"].shape[0],
        max_source_positions=state_dict["embed_positions.weight"].shape[0],
    )
    # faster-whisper conversions may copy it
    preprocessor = read_preprocessor(path) or _whisper_preprocessor(conv1.shape[1], config["max_source_positions"])
    return Checkpoint("whisper", config, state_dict, preprocessor, source or path, "ctranslate2")


def read_ctranslate2_bin(path: str, prefix: str = "") -> tuple[str, dict[str, torch.Tensor]]:
    """(spec name, {name: tensor}) of a CTranslate2 model.bin, for the variables and aliases whose name
    starts with ``prefix``; quantized weights come back dequantized to float32."""
    _check_not_lfs_pointer(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        def read(fmt):
            data = f.read(struct.calcsize(fmt))
            if len(data) != struct.calcsize(fmt):
                raise ValueError(f"{path}: truncated CTranslate2 model.bin")
            return struct.unpack(fmt, data)

        def read_string():
            (length,) = read("<H")
            data = f.read(length)
            if len(data) != length or not data.endswith(b"\0"):
                raise ValueError(f"{path}: truncated or corrupt CTranslate2 model.bin")
            return data[:-1].decode("utf-8", errors="replace")

        (version,) = read("<I")
        if version not in _CT2_VERSIONS:
            raise ValueError(f"{path}: not a CTranslate2 model.bin audioenc can read (binary version {version}, "
                             f"expected one of {_CT2_VERSIONS})")
        spec = read_string()
        read("<I")  # spec revision: the layout of Whisper variables is checked through their names
        (count,) = read("<I")
        entries = {}  # name -> (shape, dtype id, offset, byte count); the data is read only if needed
        for _ in range(count):
            name = read_string()
            (rank,) = read("<B")
            shape = read(f"<{rank}I")
            dtype, nbytes = read("<BI")
            offset = f.tell()
            if dtype not in _CT2_DTYPES or offset + nbytes > size:
                raise ValueError(f"{path}: truncated or corrupt CTranslate2 model.bin (variable {name!r})")
            entries[name] = (shape, dtype, offset, nbytes)
            f.seek(nbytes, os.SEEK_CUR)
        (num_aliases,) = read("<I")
        aliases = {}
        for _ in range(num_aliases):
            alias = read_string()
            aliases[alias] = read_string()

        def target(name):
            # An alias may point to another alias; CT2 also aliases a weight's "_scale" with it.
            for _ in range(len(aliases) + 1):
                if name in entries:
                    return name
                base = name[:-len("_scale")] if name.endswith("_scale") else None
                if name in aliases:
                    name = aliases[name]
                elif base in aliases:
                    name = aliases[base] + "_scale"
                else:
                    return None
            raise ValueError(f"{path}: circular aliases in CTranslate2 model.bin")

        def tensor(name):
            shape, dtype, offset, nbytes = entries[name]
            f.seek(offset)
            try:
                return torch.frombuffer(bytearray(f.read(nbytes)), dtype=_CT2_DTYPES[dtype]).reshape(shape)
            except (RuntimeError, ValueError) as e:  # byte count that does not fit shape and dtype
                raise ValueError(f"{path}: corrupt CTranslate2 variable {name!r} ({e})") from e

        out = {}
        for name in [*entries, *aliases]:
            if not name.startswith(prefix) or name.endswith("_scale"):
                continue
            if target(name) is None:
                raise ValueError(f"{path}: CTranslate2 alias {name!r} points to no variable")
            value = tensor(target(name))
            scale_name = target(name + "_scale")
            if scale_name is not None:  # int8: one scale per output row; int16: one scale overall
                scale = tensor(scale_name).float()
                value = value.float() / scale.reshape(scale.shape + (1,) * (value.dim() - scale.dim()))
            out[name] = value
    return spec, out


# ----------------------------------------------------------------------------------------------------
# fairseq wav2vec 2.0 / HuBERT .pt, and microsoft/unilm's WavLM .pt (fairseq's names and config keys)

# fairseq model names ("_name" in cfg, "arch" in legacy args) -> family; *_ctc checkpoints are
# fine-tuned and keep the pre-trained model's config in w2v_args. unilm's WavLM has no name: "wavlm" here.
_FAIRSEQ_MODELS = {"wav2vec2": "wav2vec2", "wav2vec_ctc": "wav2vec2", "hubert": "hubert", "hubert_ctc": "hubert",
                   "wavlm": "wavlm"}
_FAIRSEQ_FINETUNED_PREFIX = "w2v_encoder.w2v_model."

_FAIRSEQ_NAMES = [
    (r"feature_extractor\.conv_layers\.(\d+)\.0\.(\w+)", r"feature_extractor.conv_layers.\1.conv.\2"),
    (r"feature_extractor\.conv_layers\.0\.2\.(\w+)", r"feature_extractor.conv_layers.0.layer_norm.\1"),  # GroupNorm
    (r"feature_extractor\.conv_layers\.(\d+)\.2\.1\.(\w+)", r"feature_extractor.conv_layers.\1.layer_norm.\2"),
    (r"layer_norm\.(\w+)", r"feature_projection.layer_norm.\1"),
    (r"post_extract_proj\.(\w+)", r"feature_projection.projection.\1"),
    (r"encoder\.pos_conv\.0\.(.+)", r"encoder.pos_conv_embed.conv.\1"),
    (r"encoder\.layers\.(\d+)\.self_attn\.grep_linear\.(\w+)", r"encoder.layers.\1.attention.gru_rel_pos_linear.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.grep_a", r"encoder.layers.\1.attention.gru_rel_pos_const"),
    (r"encoder\.layers\.(\d+)\.self_attn\.relative_attention_bias\.(\w+)", r"encoder.layers.\1.attention.rel_attn_embed.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.(\w+)\.(\w+)", r"encoder.layers.\1.attention.\2.\3"),
    (r"encoder\.layers\.(\d+)\.self_attn_layer_norm\.(\w+)", r"encoder.layers.\1.layer_norm.\2"),
    (r"encoder\.layers\.(\d+)\.fc1\.(\w+)", r"encoder.layers.\1.feed_forward.intermediate_dense.\2"),
    (r"encoder\.layers\.(\d+)\.fc2\.(\w+)", r"encoder.layers.\1.feed_forward.output_dense.\2"),
    (r"encoder\.layers\.(\d+)\.final_layer_norm\.(\w+)", r"encoder.layers.\1.final_layer_norm.\2"),
    (r"encoder\.layer_norm\.(\w+)", r"encoder.layer_norm.\1"),
]

# conv_pos_batch_norm: encoder.pos_conv is Sequential(BatchNorm1d, Conv1d, SamePad, GELU).
_FAIRSEQ_BATCH_NORM_POS_CONV = [
    (r"encoder\.pos_conv\.0\.(\w+)", r"encoder.pos_conv_embed.batch_norm.\1"),
    (r"encoder\.pos_conv\.1\.(\w+)", r"encoder.pos_conv_embed.conv.\1"),
]

# fairseq's Wav2Vec2Config / HubertConfig defaults, for legacy args that omit a field.
_FAIRSEQ_DEFAULTS = {
    "extractor_mode": "default",
    "conv_feature_layers": "[(512, 10, 5)] + [(512, 3, 2)] * 4 + [(512,2,2)] * 2",
    "conv_bias": False,
    "encoder_layers": 12,
    "encoder_embed_dim": 768,
    "encoder_ffn_embed_dim": 3072,
    "encoder_attention_heads": 12,
    "activation_fn": "gelu",
    "layer_norm_first": False,
    "conv_pos": 128,
    "conv_pos_groups": 16,
    "pos_conv_depth": 1,
    "conv_pos_batch_norm": False,
    "layer_type": "transformer",
    "relative_position_embedding": False,  # WavLM's: both must be on, and its buckets come with them
    "gru_rel_pos": False,
    "num_buckets": 320,
    "max_distance": 1280,
}
_FAIRSEQ_EXTRACTOR_MODES = {"default": "group", "layer_norm": "layer"}


def load_fairseq(obj: dict, path: str) -> Checkpoint:
    """A fairseq checkpoint dict: ``model`` (state dict) + ``cfg`` (dict) or legacy ``args`` (Namespace);
    unilm's WavLM has the same layout with a flat ``cfg``."""
    name, model_cfg, task_cfg = _fairseq_cfg(obj, path)
    if name not in _FAIRSEQ_MODELS:
        raise ValueError(f"{path}: fairseq model {name!r} is not supported (supported: {', '.join(_FAIRSEQ_MODELS)})")
    family = _FAIRSEQ_MODELS[name]
    config = _fairseq_to_hf_config(family, {**_FAIRSEQ_DEFAULTS, **model_cfg}, path)

    state_dict = obj["model"]
    if any(k.startswith(_FAIRSEQ_FINETUNED_PREFIX) for k in state_dict):  # drop the CTC head w2v_encoder.proj
        state_dict = {k[len(_FAIRSEQ_FINETUNED_PREFIX):]: v for k, v in state_dict.items()
                      if k.startswith(_FAIRSEQ_FINETUNED_PREFIX)}
    adapter = next((k for k in state_dict if ".adapter_layer." in k), None)
    if adapter is not None:  # _rename would drop them: the encoder without them computes other frames
        raise ValueError(f"{path}: the checkpoint holds MMS language adapters ({adapter}, ...), one set per language, "
                         "which audioenc does not read from fairseq checkpoints: load the Hugging Face checkpoint "
                         "(e.g. facebook/mms-1b-all), which holds one language's adapters (target_lang picks another)")
    names = _FAIRSEQ_BATCH_NORM_POS_CONV + _FAIRSEQ_NAMES if config["conv_pos_batch_norm"] else _FAIRSEQ_NAMES
    state_dict = _rename(state_dict, names)
    fold_weight_norm(state_dict, "encoder.pos_conv_embed.conv", path)
    state_dict.pop(_BATCH_NORM_COUNTER, None)
    if "feature_projection.projection.weight" not in state_dict and config["conv_dim"][-1] == config["hidden_size"]:
        # fairseq skips post_extract_proj when the conv and encoder widths agree; HF always projects.
        state_dict["feature_projection.projection.weight"] = torch.eye(config["hidden_size"])
        state_dict["feature_projection.projection.bias"] = torch.zeros(config["hidden_size"])

    preprocessor = {"feature_extractor_type": "Wav2Vec2FeatureExtractor", "feature_size": 1, "sampling_rate": 16000,
                    "padding_value": 0.0, "do_normalize": bool(task_cfg.get("normalize", False)),
                    # HF's convention: only layer-norm models were trained with padding masks
                    "return_attention_mask": config["feat_extract_norm"] == "layer"}
    return Checkpoint(family, config, _float32(state_dict), preprocessor, path, "unilm" if family == "wavlm" else "fairseq")


def _fairseq_cfg(obj: dict, path: str) -> tuple[str, dict, dict]:
    """(model name, model cfg, task cfg) of a fairseq checkpoint. For a fine-tuned model, the name and
    model cfg are the pre-trained model's (w2v_args: it sits under w2v_encoder.w2v_model. and holds the
    sizes; wav2vec_ctc also wraps other models, such as data2vec_audio's released fine-tunes), and the
    task cfg's normalize is the fine-tune's, else the pre-trained model's."""
    if obj.get("cfg") and "encoder_embed_dim" in obj["cfg"]:  # unilm WavLM: one flat WavLMConfig dict
        model_cfg = dict(obj["cfg"])
        return "wavlm", model_cfg, {"normalize": model_cfg.get("normalize", False)}
    if obj.get("cfg"):
        model_cfg, task_cfg = _cfg_section(obj["cfg"].get("model")), _cfg_section(obj["cfg"].get("task"))
        name = model_cfg.get("_name")
    elif isinstance(obj.get("args"), argparse.Namespace):
        model_cfg = task_cfg = vars(obj["args"])
        name = model_cfg.get("arch")
    else:
        raise ValueError(f"{path}: fairseq checkpoint without a cfg dict or an argparse args")
    inner = model_cfg.get("w2v_args")
    if isinstance(inner, argparse.Namespace):
        model_cfg = vars(inner)
        task_cfg = {"normalize": model_cfg.get("normalize", task_cfg.get("normalize"))}
    elif isinstance(inner, dict):
        model_cfg = _cfg_section(inner.get("model"))
        task_cfg = {"normalize": task_cfg.get("normalize", _cfg_section(inner.get("task")).get("normalize"))}
    elif name in ("wav2vec_ctc", "hubert_ctc"):
        raise ValueError(f"{path}: fine-tuned fairseq checkpoint without w2v_args (the pre-trained model's "
                         f"config); it cannot be read on its own")
    if inner is not None:
        name = model_cfg.get("_name", model_cfg.get("arch", name))
    return name, model_cfg, task_cfg


def _cfg_section(section) -> dict:
    """A section of a fairseq cfg as a dict: convert_namespace_to_omegaconf keeps the model or task
    section of a legacy architecture, one without a dataclass, as its argparse Namespace."""
    return dict(vars(section) if isinstance(section, argparse.Namespace) else section or {})


def _fairseq_to_hf_config(family: str, cfg: dict, path: str) -> dict:
    for key, supported in (("activation_fn", "gelu"), ("layer_type", "transformer"), ("pos_conv_depth", 1)):
        if cfg[key] != supported:
            raise ValueError(f"{path}: fairseq {key}={cfg[key]!r} is not supported (only {supported!r})")
    if cfg["extractor_mode"] not in _FAIRSEQ_EXTRACTOR_MODES:
        raise ValueError(f"{path}: fairseq extractor_mode={cfg['extractor_mode']!r} is not supported "
                         f"(supported: {', '.join(_FAIRSEQ_EXTRACTOR_MODES)})")
    conv_layers = parse_conv_feature_layers(cfg["conv_feature_layers"], path)
    config = {
        "model_type": family,
        "hidden_size": cfg["encoder_embed_dim"],
        "num_hidden_layers": cfg["encoder_layers"],
        "num_attention_heads": cfg["encoder_attention_heads"],
        "intermediate_size": cfg["encoder_ffn_embed_dim"],
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-5,  # torch's LayerNorm default, used throughout fairseq
        "feat_extract_norm": _FAIRSEQ_EXTRACTOR_MODES[cfg["extractor_mode"]],
        "feat_extract_activation": "gelu",
        "num_feat_extract_layers": len(conv_layers),
        "conv_dim": [c[0] for c in conv_layers],
        "conv_kernel": [c[1] for c in conv_layers],
        "conv_stride": [c[2] for c in conv_layers],
        "conv_bias": bool(cfg["conv_bias"]),
        "num_conv_pos_embeddings": cfg["conv_pos"],
        "num_conv_pos_embedding_groups": cfg["conv_pos_groups"],
        "conv_pos_batch_norm": bool(cfg["conv_pos_batch_norm"]),
        "do_stable_layer_norm": bool(cfg["layer_norm_first"]),
    }
    if family == "hubert":
        config["feat_proj_layer_norm"] = True  # fairseq HuBERT always normalises the conv features
    if family == "wavlm":
        if not (cfg["relative_position_embedding"] and cfg["gru_rel_pos"]):
            raise ValueError(f"{path}: a WavLM without its gated relative position bias (relative_position_embedding="
                             f"{cfg['relative_position_embedding']}, gru_rel_pos={cfg['gru_rel_pos']}) is not supported")
        config["num_buckets"], config["max_bucket_distance"] = cfg["num_buckets"], cfg["max_distance"]
    return config


def parse_conv_feature_layers(spec: str, path: str = "") -> list[tuple[int, int, int]]:
    """fairseq's conv_feature_layers, a Python expression such as "[(512, 10, 5)] + [(512, 3, 2)] * 4",
    read piece by piece with ast.literal_eval (fairseq itself evals it)."""
    layers = []
    try:
        for piece in spec.split("+"):
            m = re.fullmatch(r"\s*(\[.*\])\s*(?:\*\s*(\d+))?\s*", piece)
            items = ast.literal_eval(m.group(1))
            for item in items * int(m.group(2) or 1):
                dim, kernel, stride = (int(x) for x in item)
                layers.append((dim, kernel, stride))
    except (AttributeError, ValueError, TypeError, SyntaxError) as e:
        raise ValueError(f"{path}: cannot read fairseq conv_feature_layers {spec!r}") from e
    if not layers:
        raise ValueError(f"{path}: fairseq conv_feature_layers {spec!r} has no layers")
    return layers
