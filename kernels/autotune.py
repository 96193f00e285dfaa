"""Autotuning options the kernels here share."""
import inspect
import os
from collections.abc import MutableMapping

import triton
from triton.runtime import driver

# Autotuning benchmarks every config once per key; triton >= 3.4 keeps the timings on disk, so a
# new process skips that.
CACHE_RESULTS = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def autotune_enabled() -> bool:
    """$AUDIOENC_AUTOTUNE: 1 (the default) autotunes, 0 runs each kernel's default config."""
    value = os.environ.get("AUDIOENC_AUTOTUNE", "1").strip()
    if value not in ("0", "1"):
        raise ValueError(f"AUDIOENC_AUTOTUNE must be 0 (each kernel's default config) or 1 (autotune), got {value!r}")
    return value == "1"


# Every kernel's fallback (choose_configs): benchmarks/compile_offline.py checks that the configs
# AUDIOENC_AUTOTUNE=0 keeps (a kernel's first and its fallback) include one that fits each GPU.
FALLBACKS: list = []


def choose_configs(tuned: list, interpreted: triton.Config, fallback: triton.Config | None = None) -> list:
    """The configs a kernel autotunes over.

    `tuned` on a GPU, its first being a good default; with AUDIOENC_AUTOTUNE=0 only that first one
    (and `fallback`, a config that fits where the default may run out of shared memory: the
    autotuner drops a config that does not fit), so no new shape pays for compiling and timing every
    config (faster first calls and tests, possibly slower kernels). In Triton's interpreter only
    `interpreted`: it runs every config it is given, at Python cost per program, so it gets one with
    big blocks.
    """
    enabled = autotune_enabled()  # a typo fails in the interpreter too
    if fallback is not None:
        FALLBACKS.append(fallback)
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [interpreted]
    if not enabled:
        return tuned[:1] + ([fallback] if fallback is not None else [])
    return tuned


def device_key() -> int:
    """The GPU a launch runs on: Triton launches on the current device (the triton backend makes it its own)."""
    return driver.active.get_current_device()


class PerDevice(MutableMapping):
    """An autotuner's chosen configs (tuning key -> config) for the current GPU, kept apart per GPU:
    Triton keys them by the kernel's arguments alone, so a process on two different GPUs (an H100 and
    an L4) would run the first one's choice on the other, maybe a config too big for its shared memory."""

    def __init__(self):
        self.by_device: dict = {}

    def current(self) -> dict:
        return self.by_device.setdefault(device_key(), {})

    def __getitem__(self, key):
        return self.current()[key]

    def __setitem__(self, key, config):
        self.current()[key] = config

    def __delitem__(self, key):
        del self.current()[key]

    def __iter__(self):
        return iter(self.current())

    def __len__(self):
        return len(self.current())


def autotune(configs: list, key: list):
    """triton.autotune with its choices kept per GPU (PerDevice), and on disk where Triton can."""
    def decorator(fn):
        tuner = triton.autotune(configs=configs, key=key, **CACHE_RESULTS)(fn)
        tuner.cache = PerDevice()
        return tuner
    return decorator
