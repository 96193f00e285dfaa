"""What the CPU is, from /proc/cpuinfo: its name and the vector extensions that decide float32 and
int8 speeds (the same model name in a VM can be an AVX2 or an AVX-512 machine)."""
from __future__ import annotations

import ctypes
import os
import platform

CPUINFO = "/proc/cpuinfo"
VNNI_FLAGS = {"avx512_vnni", "avx_vnni"}  # int8 dot products without 16-bit intermediate sums


def cpu_info(key: str) -> str | None:
    """The first value of ``key`` ("model name", "flags") in /proc/cpuinfo, or None where there is none."""
    try:
        with open(CPUINFO) as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.split(":", 1)[0].strip() == key), None)
    except OSError:
        return None


def cpu_name() -> str:
    return cpu_info("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str] | None:
    """The x86 feature flags, or None where they cannot be read."""
    flags = cpu_info("flags")
    return None if flags is None else set(flags.split())


def vector_isa() -> str:
    """"AVX-512 VNNI", "AVX2", ... (x86), else the architecture's name."""
    flags = cpu_flags()
    if flags is None:
        return platform.machine()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    return isa + (" VNNI" if flags & VNNI_FLAGS else "")


def usable_cores() -> int:
    """The cores this process may run on: its CPU affinity, as taskset and container cpusets set it."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cores_text() -> str:
    """'2 cores', or '1 of 2 cores' where the process may run on fewer (taskset, a container)."""
    usable, total = usable_cores(), os.cpu_count() or 1
    return f"{total} cores" if usable == total else f"{usable} of {total} cores usable"


TRIM_AFTER_SAMPLES = 30 * 16000  # padded samples of a CPU run past which the backends trim after the call


def return_freed_memory() -> None:
    """Hands the heap's freed memory back to the OS after a large release (glibc otherwise keeps
    freed blocks below its top for reuse); a no-op where the C library has no malloc_trim."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # TypeError: CDLL(None) on Windows
        pass
