"""Shared by the benchmark scripts: timing, machine description, and BENCHMARKS.md sections."""
from __future__ import annotations

import os
import platform
import re
import statistics
import time

from audioenc.cpu import cores_text, cpu_name, vector_isa

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")


def median_time(fn, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of fn() in seconds, after warm-up calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict, repeats: int = 7, warmup: int = 2) -> dict:
    """Median wall time in seconds of each fn, timed in rounds (audioenc.cli_bench.timed_rounds)."""
    from audioenc.cli_bench import timed_rounds

    return {name: statistics.median(t) for name, t in timed_rounds(fns, repeats, warmup).items()}


def machine() -> str:
    return f"{cpu_name()} ({vector_isa()}), {cores_text()}, Linux {platform.release()}, Python {platform.python_version()}"


def versions(*modules: str) -> str:
    import importlib

    out = []
    for name in modules:
        try:
            out.append(f"{name} {importlib.import_module(name).__version__}")
        except ImportError:
            out.append(f"{name} missing")
    return ", ".join(out)


def write_section(title: str, body: str) -> None:
    """Replaces (or appends) the '## title' section of BENCHMARKS.md."""
    text = open(BENCHMARKS_MD).read() if os.path.exists(BENCHMARKS_MD) else "# Benchmarks\n"
    section = f"## {title}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    with open(BENCHMARKS_MD, "w") as f:
        f.write(text.rstrip() + "\n")
