"""torch's defaults as audioenc's code assumes them while it builds models and graphs: new tensors in
float32 on the CPU, whatever the caller set (``torch.set_default_dtype(torch.float64)``, a
``with torch.device("meta")`` block). Without this a random architecture would draw other weights,
and a model would be built in float64 or on no memory at all."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def float32_on_cpu():
    """Inside: new tensors default to float32 on the CPU. The default dtype is process-wide in torch,
    so it is touched only when the caller changed it; the default device is per thread."""
    dtype = torch.get_default_dtype()
    with contextlib.ExitStack() as stack:
        if torch.get_default_device().type != "cpu":
            stack.enter_context(torch.device("cpu"))
        if dtype != torch.float32:
            torch.set_default_dtype(torch.float32)
            stack.callback(torch.set_default_dtype, dtype)
        yield
