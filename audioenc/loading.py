"""``audioenc.load``: checkpoint -> model -> backend -> AudioEncoder."""
from __future__ import annotations

import dataclasses
import os
import warnings

import torch
from torch import nn

from audioenc.backends import backend_class, resolve_backend
from audioenc.checkpoint_record import recall as recalled
from audioenc.encoder import AudioEncoder, _torch_on_one_thread_in_forked_children
from audioenc.models import build_model, dims_of
from audioenc.presets import random_checkpoint
from audioenc.torch_defaults import float32_on_cpu
from audioenc.model_objects import load_model_object
from audioenc.weights import Checkpoint, check_family, check_target_lang, load_checkpoint, locate, preprocessor_settings


def resolve_device(device) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r} is not a valid torch device ({exc})") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {str(device)!r}: audioenc runs on the CPU ('cpu') or a CUDA GPU ('cuda', 'cuda:N')")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA GPU here")
    if device.type == "cuda" and device.index is None:  # "cuda" means the current GPU now, not in each later thread
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def load(source: str | os.PathLike | nn.Module, backend: str = "auto", device="auto", dtype="auto",
         family: str | None = None, preprocessor=None, target_lang: str | None = None) -> AudioEncoder:
    """Loads an encoder.

    source: a local Hugging Face model dir, an openai-whisper .pt, a CTranslate2 (faster-whisper)
    Whisper dir, a fairseq wav2vec2/HuBERT .pt, a microsoft/unilm WavLM .pt, a hub id (downloaded
    when online), "random:NAME" for a real-size architecture with random weights (see
    audioenc.presets), or a model object in memory: a transformers model of the four families
    (base or task model, e.g. Wav2Vec2ForCTC) or an openai-whisper model. An object's encoder
    weights are copied: later changes to it (training, say) do not reach the encoder.
    backend: "auto", "torch" (the reference), "triton", "onnx" or "tensorrt". "auto" takes the
    first that runs here: on a GPU triton, then tensorrt, then torch; on the CPU onnx (when
    onnxruntime is installed), then torch.
    device: "auto" (CUDA when torch sees a GPU, else the CPU), "cpu", "cuda" or "cuda:N" (a string or
    a torch.device).
    dtype: "auto" is float16 on a GPU and float32 on the CPU (tensorrt: float16). torch and triton
    take float32, float16, bfloat16; onnx float32, float16, int8, and bfloat16 on ARM64 CPUs only;
    tensorrt float32, float16. A torch.dtype works too.
    family: when given, a checkpoint of another family is an error.
    preprocessor: the feature extractor's settings (a transformers feature extractor or processor,
    or a dict such as {"do_normalize": True}). A model object of the wav2vec2 family needs it, as the
    model does not say whether the waveform is normalised. A path or hub id brings its own
    (processor_config.json or preprocessor_config.json); given, it replaces them.
    target_lang: an MMS checkpoint's language (e.g. "fra" for facebook/mms-1b-all): its adapter file
    adapter.<lang>.safetensors (downloaded with a hub id) replaces the adapters in the weights, as
    transformers' Wav2Vec2ForCTC.from_pretrained(..., target_lang=...) does. None: the weights' own.
    """
    if isinstance(source, nn.Module):
        name = None
    else:
        name = os.fspath(source) if isinstance(source, os.PathLike) else source
        if not isinstance(name, str):
            raise TypeError(f"source must be a path, a hub id, 'random:NAME' or a model object, got "
                            f"{type(source).__name__}")
    _torch_on_one_thread_in_forked_children()  # before the model's first torch op
    with float32_on_cpu():  # the caller's torch defaults (float64, a meta device) are not the model's
        torch_device = resolve_device(device)
        runner_class = backend_class(resolve_backend(backend, torch_device.type))
        if name is None:
            if target_lang is not None:
                raise ValueError("target_lang picks an adapter file of a checkpoint on disk or the hub; a model object "
                                 "runs the adapters it holds: call its load_adapter(target_lang) before passing it")
            checkpoint = load_model_object(source, preprocessor)
            check_family(checkpoint, family)
        else:
            # the onnx and tensorrt backends run on their cached graph's weights: a checkpoint read before
            # and unchanged since is described by its record, its tensors left unread (checkpoint_record.py)
            checkpoint = read_checkpoint(name, family, recall=getattr(runner_class, "cached_weights", False),
                                         target_lang=target_lang)
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        settings = checkpoint.preprocessor if name is None else preprocessor_of(checkpoint, name, preprocessor)
        runner = runner_class(reference_model(checkpoint, name), torch_device, dtype)
        return AudioEncoder(checkpoint.family, dims_of(checkpoint), runner, checkpoint.source if name is None else name,
                            settings, name is not None and name.startswith("random:"), checkpoint.target_lang or None)


def preprocessor_of(checkpoint: Checkpoint, name: str, preprocessor) -> dict:
    """The feature extractor's settings for a checkpoint read from ``name``: ``preprocessor`` when
    given (it replaces the checkpoint's own, for this encoder only: the graphs cached from the
    checkpoint and its record keep what the checkpoint says), else the checkpoint's."""
    if preprocessor is not None:
        settings = preprocessor_settings(preprocessor, name)
        # another kind of feature extractor is named by check_preprocessor (AudioEncoder) instead
        kind = settings.get("feature_extractor_type", "Wav2Vec2FeatureExtractor")
        if checkpoint.family != "whisper" and kind == "Wav2Vec2FeatureExtractor" and "do_normalize" not in settings:
            # it replaces the checkpoint's own: {"do_normalise": False} would normalise without a word
            raise ValueError(f"{name}: preprocessor= replaces the checkpoint's feature extractor settings, and this "
                             f"one does not set do_normalize (its keys: {sorted(settings)}): pass "
                             "{'do_normalize': True} or {'do_normalize': False}, or a feature extractor")
        return settings
    if checkpoint.family != "whisper" and "do_normalize" not in checkpoint.preprocessor:
        # hubert-base and wavlm-base(-plus) were trained on unnormalised waveforms, most others on normalised ones
        warnings.warn(f"{name}: no feature extractor settings (preprocessor_config.json) say whether the waveform is "
                      "normalised; normalising it, as transformers' Wav2Vec2FeatureExtractor does by default. If this "
                      "model was trained without (hubert-base, wavlm-base and wavlm-base-plus were), pass "
                      "preprocessor={'do_normalize': False} to audioenc.load (audioenc embed and stream: "
                      "--do-normalize false), or save its feature extractor beside it", stacklevel=3)
    return checkpoint.preprocessor


def read_checkpoint(name: str, family: str | None = None, recall: bool = False,
                    target_lang: str | None = None) -> Checkpoint:
    """The checkpoint at ``name`` (a path, hub id or "random:NAME") with ``target_lang``'s MMS
    adapter; ``family``, when given, must match. ``recall``: from audioenc's record of it when it has
    one, without its tensors."""
    check_family(None, family)
    check_target_lang(target_lang)
    random_name = name[len("random:"):] if name.startswith("random:") else None
    if random_name is not None and target_lang is not None:
        raise ValueError(f"{name}: target_lang picks an MMS checkpoint's adapter file; a random: architecture has none")
    path = "" if random_name is not None else locate(name, target_lang)
    checkpoint = recalled(name, path, target_lang) if recall else None
    if checkpoint is None and random_name is not None:
        checkpoint = random_checkpoint(random_name)
    elif checkpoint is None:
        checkpoint = load_checkpoint(name, path=path, target_lang=target_lang)
    check_family(checkpoint, family)
    return checkpoint


def reference_model(checkpoint: Checkpoint, name: str | None) -> nn.Module:
    """The float32 reference model of a checkpoint read from ``name`` (None: a model object's, which
    cannot be read again); the same weights every time, random architectures included, so a backend
    may release them and build them again. A checkpoint recalled from its record gives the model
    without its weights (checkpoint_record.py)."""
    random_weights = name is not None and name.startswith("random:") and not checkpoint.weights_digest
    with float32_on_cpu():
        model = build_model(checkpoint, random_weights=random_weights)
    # Recorded with the graphs and engines exported from it (audioenc cache), and read again to rebuild
    # released weights: a local path absolute, so that a later change of directory finds it.
    model.checkpoint_source = None if name is None else os.path.abspath(name) if os.path.exists(name) else name
    model.checkpoint = dataclasses.replace(checkpoint, state_dict={})  # its record's contents (checkpoint_record.py)
    return model
