"""Shared by the benchmark scripts: timing, machine description, and BENCHMARKS.md sections."""
from __future__ import annotations

import os
import platform
import re
import statistics

import torch

from audioenc.cpu import cores_text, cpu_name, vector_isa
from audioenc.verify import FLOAT32_TOL, HALF_FACTOR

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS_MD = os.path.join(ROOT, "BENCHMARKS.md")


def interleaved_medians(fns: dict, repeats: int = 7, warmup: int = 2) -> dict:
    """Median wall time in seconds of each fn, timed in rounds (audioenc.cli_bench.timed_rounds)."""
    from audioenc.cli_bench import timed_rounds

    return {name: statistics.median(t) for name, t in timed_rounds(fns, repeats, warmup).items()}


class WrongOutput(SystemExit):
    """A contender's output is not its reference's, so its time is not worth reporting. A SystemExit,
    not an Exception: the scripts' `except Exception` (a config that does not fit this GPU, a peer
    that fails) must not turn it into one more row."""


def check_output(name: str, out, truth, naive=None) -> float:
    """out's relative error ||out - truth|| / ||truth|| against the float32 truth; raises WrongOutput
    past DESIGN.md's rule (audioenc.verify): float32 within 1e-4; half precision (naive: the same math
    done naively in that precision, e.g. a kernel's *_ref with compute_dtype) at most 2x naive's
    error. NaN never passes."""
    out, truth = torch.as_tensor(out).detach().cpu().double(), torch.as_tensor(truth).detach().cpu().double()
    if out.shape != truth.shape:
        raise WrongOutput(f"{name}: output shape {tuple(out.shape)}, its reference's {tuple(truth.shape)}")
    rel = lambda a: float((a - truth).norm() / (truth.norm() if truth.norm() > 0 else 1.0))
    err = rel(out)
    # the floor: cases the half-precision math gets exactly right
    bound = FLOAT32_TOL if naive is None else HALF_FACTOR * rel(torch.as_tensor(naive).cpu().double()) + 1e-5
    if not err <= bound:  # NaN fails here too
        raise WrongOutput(f"{name}: output differs from its reference by {err:.2e} relative (allowed {bound:.2e}); "
                          "not timing a wrong answer")
    return err


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
