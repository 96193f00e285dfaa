"""torch's defaults as audioenc's code assumes them while it builds models and graphs: new tensors in
float32 on the CPU, whatever the caller set (``torch.set_default_dtype(torch.float64)``, a
``with torch.device("meta")`` block), and no autocast. Without this a random architecture would draw
other weights, a model would be built in float64 or on no memory at all, and a graph traced under the
caller's autocast would compute (and return) half precision."""
from __future__ import annotations

import contextlib
import os
import threading

import torch

_lock = threading.Lock()
_inside = 0  # threads inside float32_on_cpu now
_callers_dtype = torch.float32  # the default dtype when the first of them came in


@contextlib.contextmanager
def float32_on_cpu():
    """Inside: new tensors default to float32 on the CPU. The default device is per thread. The
    default dtype is process-wide in torch: it is float32 from the first thread in until the last
    one leaves, then the caller's again (a caller that set float64 sees float32 in its other threads
    while a load or an export runs)."""
    global _inside, _callers_dtype
    with _lock:
        if _inside == 0:
            _callers_dtype = torch.get_default_dtype()
            torch.set_default_dtype(torch.float32)
        _inside += 1
    try:
        # torch 2.6's get_default_device() does not see a `with torch.device(...)` block; a new tensor does
        elsewhere = torch.get_default_device().type != "cpu" or torch.empty(0).device.type != "cpu"
        with torch.device("cpu") if elsewhere else contextlib.nullcontext(), no_autocast():
            yield
    finally:
        with _lock:
            _inside -= 1
            if _inside == 0:
                torch.set_default_dtype(_callers_dtype)


def _forked_child() -> None:
    """A fork copies only its own thread: the threads that were inside float32_on_cpu are gone, so the
    child takes the caller's default dtype back (and a fresh lock, which one of them may have held)."""
    global _lock, _inside
    _lock = threading.Lock()
    if _inside:
        _inside = 0
        torch.set_default_dtype(_callers_dtype)


os.register_at_fork(after_in_child=_forked_child)


@contextlib.contextmanager
def no_autocast():
    """Inside: the caller's torch.autocast (per thread) is off, so a float32 model computes in float32
    and its dtype is what the caller asked of audioenc."""
    with contextlib.ExitStack() as stack:
        for device_type in ("cpu", "cuda"):
            if torch.is_autocast_enabled(device_type):
                stack.enter_context(torch.autocast(device_type, enabled=False))
        yield
