"""Autotuning options the kernels here share."""
import inspect
import os

import triton

# Autotuning benchmarks every config once per key; triton >= 3.4 keeps the timings on disk, so a
# new process skips that.
CACHE_RESULTS = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}


def choose_configs(tuned: list, interpreted: triton.Config, fallback: triton.Config | None = None) -> list:
    """The configs a kernel autotunes over.

    `tuned` on a GPU, its first being a good default; with AUDIOENC_AUTOTUNE=0 only that first one
    (and `fallback`, a config that fits where the default may run out of shared memory: the
    autotuner drops a config that does not fit), so no new shape pays for compiling and timing every
    config (faster first calls and tests, possibly slower kernels). In Triton's interpreter only
    `interpreted`: it runs every config it is given, at Python cost per program, so it gets one with
    big blocks.
    """
    if os.environ.get("TRITON_INTERPRET") == "1":
        return [interpreted]
    if os.environ.get("AUDIOENC_AUTOTUNE", "1") == "0":
        return tuned[:1] + ([fallback] if fallback is not None else [])
    return tuned
