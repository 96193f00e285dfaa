"""Autotuning options the kernels here share."""
import inspect

import triton

# Autotuning benchmarks every config once per key; triton >= 3.4 keeps the timings on disk, so a
# new process skips that.
CACHE_RESULTS = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
