"""The GPU backend: the reference models' weights run through audioenc's Triton kernels.

Same math as audioenc/models (the float32 reference), re-implemented here from its parameters:
conv feature layers fused with their norm and GELU, fused QKV projections, flash attention with the
key-padding mask and WavLM's gated relative bias inside the kernel (its gate from one small kernel),
residual add fused with LayerNorm, fc1 + bias + GELU in one kernel where that beats cuBLAS plus a
GELU pass, the grouped positional conv + GELU in one kernel where that beats cuDNN. Other
half-precision matmuls use cuBLAS through torch, and so may unmasked half-precision attention
(Whisper's) where cuDNN's kernel runs faster than ours. float32 runs every matmul and conv in our
kernels in IEEE float32, whatever the process's TF32 settings. Half precision
with float32 LayerNorm/softmax statistics; pre-LN residual streams stay in float32 so large
activations cannot overflow float16. On CUDA, forward passes are captured in CUDA graphs per
(batch bucket, length bucket, layers). With TRITON_INTERPRET=1 the same code runs on CPU tensors
(slowly), which is how the CPU tests check it.

Outputs and hidden states are returned in float32.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from audioenc.backends import import_problem, resolve_dtype
from audioenc.backends.torch import DTYPES
from audioenc.models.layers import valid_mask
from audioenc.models.wav2vec2 import group_norm_overflow
# Captured (batch, length, layers, hidden states) shapes kept per backend. They share one memory
# pool, so each costs only its static input and output buffers, not a forward pass's worth of
# memory; those may take at most GRAPH_BUFFER_SHARE of the GPU (all hidden states of a big batch
# are gigabytes).
GRAPH_CACHE_SIZE = 16
GRAPH_BUFFER_SHARE = 0.25
MIN_LENGTH_BUCKET = 16000     # samples: 1 s
MAX_GRAPH_BATCH = 64
# Triton compiles for Volta and newer only (torch.compile refuses older GPUs for the same reason);
# on a Pascal GPU (a P100, a GTX 1080) the first kernel would fail to compile mid-encode.
MIN_CAPABILITY = (7, 0)
_CAPTURE_LOCK = threading.Lock()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _capability_problem(device=None) -> str | None:
    """Why Triton cannot compile for this CUDA GPU (None when it can)."""
    capability = torch.cuda.get_device_capability(device)
    if capability >= MIN_CAPABILITY:
        return None
    return (f"Triton compiles for GPUs of compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} or newer; "
            f"{torch.cuda.get_device_name(device)} is {capability[0]}.{capability[1]} "
            "(use backend='torch' or 'tensorrt')")


def length_bucket(num_samples: int) -> int:
    """Rounds up to one of four steps per octave (at most 25% padding), at least 1 s."""
    if num_samples <= MIN_LENGTH_BUCKET:
        return MIN_LENGTH_BUCKET
    step = 1 << max(num_samples.bit_length() - 3, 0)
    return -(-num_samples // step) * step


def batch_bucket(batch: int) -> int:
    return 1 << (batch - 1).bit_length()


def graph_samples(batch: int, samples: int, whisper: bool) -> int:
    """Samples a CUDA-graph call on a (batch, samples) input computes: whole buckets (Whisper's
    windows have one length already)."""
    full, rest = divmod(batch, MAX_GRAPH_BATCH)
    items = full * MAX_GRAPH_BATCH + (batch_bucket(rest) if rest else 0)
    return items * (samples if whisper else length_bucket(samples))


class _Linear:
    """A Linear's weight and bias in the compute dtype; several Linears can be fused into one."""

    def __init__(self, layers: list[nn.Linear], dtype, device):
        self.weight = torch.cat([l.weight for l in layers]).to(device, dtype).contiguous()
        self.bias = torch.cat([l.bias if l.bias is not None else torch.zeros(l.out_features) for l in layers]
                              ).to(device, dtype)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.float32:  # IEEE float32, whatever the process's TF32 setting
            from audioenc.kernels.linear_gelu import linear_gelu

            return linear_gelu(x, self.weight, self.bias, apply_gelu=False)
        return F.linear(x, self.weight, self.bias)

    def accumulate(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """residual += x W^T without the bias, in place and in residual's dtype: on CUDA cuBLAS adds
        the residual in its epilogue (beta = 1; float32 output from half-precision inputs), so no
        pass of our own reads it. In place: torch's addmm into a new tensor first copies the residual
        there."""
        flat_r, flat_x = residual.view(-1, residual.shape[-1]), x.reshape(-1, x.shape[-1])
        if self.weight.dtype == torch.float32:  # our kernel, as in __call__; then a pass to add it
            from audioenc.kernels.linear_gelu import linear_gelu

            flat_r += linear_gelu(flat_x, self.weight, None, apply_gelu=False)
        elif x.dtype == residual.dtype:
            flat_r.addmm_(flat_x, self.weight.t())
        elif x.is_cuda:
            torch.addmm(flat_r, flat_x, self.weight.t(), out_dtype=residual.dtype, out=flat_r)
        else:  # the CPU has no mixed-dtype addmm (Triton's interpreter runs the backend there)
            flat_r.addmm_(flat_x.to(residual.dtype), self.weight.to(residual.dtype).t())
        return residual


def _faster(first, second, repeats: int = 7) -> bool:
    """Whether first() runs faster than second() on the current CUDA stream (median of repeats)."""
    times = ([], [])
    for _ in range(repeats):
        for fn, spent in zip((first, second), times):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            spent.append(start.elapsed_time(end))
    return sorted(times[0])[repeats // 2] < sorted(times[1])[repeats // 2]


class _FasterPath:
    """Two equivalent implementations, methods named TRUSTED and CANDIDATE: per input shape the
    candidate where it ran, agreed with the trusted one and was faster at the first call with that
    shape (the warm-up), else the trusted one. Off CUDA (Triton's interpreter) OFF_CUDA, by default
    the candidate, the code under test, unless ``choices`` says otherwise. ``choices`` (shape ->
    method name) may be shared by layers that compute the same function at the same shapes."""

    WHAT = TRUSTED = CANDIDATE = OFF_CUDA = ""

    def __init__(self, choices: dict):
        self.choices = choices

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self.choices:
            if x.device.type != "cuda":
                return getattr(self, self.OFF_CUDA or self.CANDIDATE)(x)
            if torch.cuda.is_current_stream_capturing():  # cannot time inside a graph capture
                return getattr(self, self.TRUSTED)(x)
            self.choices[key] = self._choose(torch.randn_like(x))
        return getattr(self, self.choices[key])(x)

    def _choose(self, probe: torch.Tensor) -> str:
        """Timed on random rows (not the warm-up's zeros: tensor cores run faster on zeros, and equal
        rows would hide a row mix-up)."""
        trusted, candidate = getattr(self, self.TRUSTED), getattr(self, self.CANDIDATE)
        # Either path may fail on a GPU it was never run on (e.g. no config of a kernel fits its
        # shared memory); the other then runs alone. Both failing raises the candidate's error.
        try:
            expected = trusted(probe).float()  # also compiles and autotunes
        except Exception as exc:  # noqa: BLE001
            candidate(probe)
            warnings.warn(f"audioenc: {self.WHAT} takes its {self.CANDIDATE} path here: the {self.TRUSTED} "
                          f"path failed ({exc})")
            return self.CANDIDATE
        try:
            got = candidate(probe).float()
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"audioenc: {self.WHAT} keeps its {self.TRUSTED} path here: the {self.CANDIDATE} "
                          f"path failed ({exc})")
            return self.TRUSTED
        # Half-precision roundings differ by about 1e-3; a miscompiled kernel on a GPU it was never
        # tested on would differ by about 1.
        error = float((got - expected).norm() / expected.norm().clamp_min(1e-30))
        if not error <= 0.02:
            warnings.warn(f"audioenc: {self.WHAT} keeps its {self.TRUSTED} path here: the {self.CANDIDATE} "
                          f"path differs from it by {error:.2g}")
            return self.TRUSTED
        return self.CANDIDATE if _faster(lambda: candidate(probe), lambda: trusted(probe)) else self.TRUSTED


class _LinearGelu(_Linear, _FasterPath):
    """gelu(Linear(x)): audioenc's fused kernel (kernels/linear_gelu.py) or cuBLAS (with the GELU in
    its epilogue in half precision, else a GELU pass)."""

    WHAT, TRUSTED, CANDIDATE = "fc1 + GELU", "cublas", "fused"

    def __init__(self, layer: nn.Linear, dtype, device, choices: dict):
        _Linear.__init__(self, [layer], dtype, device)
        _FasterPath.__init__(self, choices)
        # In half precision cuBLAS's path takes the GELU into its epilogue, which computes the tanh
        # form: at most 5e-4 from the exact erf form the models define, below half precision's own
        # rounding (whisper-large-v3: the same error against the float32 reference, 6% faster than
        # a separate GELU pass; BENCHMARKS.md). float32 keeps the exact form.
        self.approximate = "none" if dtype == torch.float32 else "tanh"

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        from audioenc.kernels.linear_gelu import linear_gelu

        return linear_gelu(x, self.weight, self.bias)

    def cublas(self, x: torch.Tensor) -> torch.Tensor:
        if self.approximate == "tanh":  # cuBLASLt's GELU epilogue: no separate GELU pass
            flat = torch._addmm_activation(self.bias, x.reshape(-1, x.shape[-1]), self.weight.t(), use_gelu=True)
            return flat.view(*x.shape[:-1], -1)
        return F.gelu(F.linear(x, self.weight, self.bias))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == torch.float32:  # IEEE in our kernel (cuBLAS may take TF32, see _Linear)
            return self.fused(x)
        return _FasterPath.__call__(self, x)


class _ConvLayerNormGelu(_FasterPath):
    """A layer-norm model's conv feature layer: gelu(LayerNorm(conv(x))) over channels, as one kernel
    (each program holds whole 512-channel rows, so its tiles are small) or as the conv kernel with
    matmul-sized tiles, then one LayerNorm + GELU pass (a float32 tensor in between)."""

    WHAT, TRUSTED, CANDIDATE = "a conv + LayerNorm + GELU layer", "fused", "split"

    def __init__(self, weight, bias, stride: int, norm: tuple, dtype):
        super().__init__({})
        self.weight, self.bias, self.stride, self.norm, self.dtype = weight, bias, stride, norm, dtype

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        from audioenc.kernels.conv_feature import conv1d_gelu

        return conv1d_gelu(x, self.weight, self.bias, self.stride, 0, *self.norm, out_dtype=self.dtype)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        from audioenc.kernels.conv_feature import conv1d_gelu
        from audioenc.kernels.layer_norm import add_layer_norm

        y = conv1d_gelu(x, self.weight, self.bias, self.stride, 0, apply_gelu=False, out_dtype=torch.float32)
        return add_layer_norm(y, None, *self.norm, out_dtype=self.dtype, apply_gelu=True)[0]


class _PositionalConv(_FasterPath):
    """gelu(grouped conv(x) + bias) over (B, T, C), the length kept: cuDNN through torch, or
    audioenc's kernel (kernels/pos_conv.py). cuDNN's choice of algorithm for this conv proved fickle
    (one kernel per group with layout conversions in an eager wav2vec2-large forward, 5x its fast
    algorithm's time; H200), so the faster is timed per shape."""

    WHAT, TRUSTED, CANDIDATE = "the positional conv", "cudnn", "triton"

    def __init__(self, conv: nn.Conv1d, dtype, device):
        super().__init__({})
        self.weight = conv.weight.detach().to(device, dtype)
        self.bias = conv.bias.detach().to(device, dtype)
        self.groups = conv.groups
        # (K, C_in / groups, C_out) memory, nn.Conv1d's shape: the kernel's best load order.
        self.weight_taps_first = self.weight.permute(2, 1, 0).contiguous().permute(2, 1, 0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        # cuDNN runs float32 convs in TF32 unless the process turns torch.backends.cudnn.allow_tf32
        # off (a switch for every thread): about 5e-4 off, past float32's 1e-4. The kernel's are IEEE.
        return self.triton(x) if x.dtype == torch.float32 else super().__call__(x)

    def cudnn(self, x: torch.Tensor) -> torch.Tensor:
        frames = x.shape[1]
        # On the transposed view cuDNN ran one kernel per group plus layout conversions (stop 17);
        # on a (B, C, T) copy it did too in an eager forward (stop 26), but not in the micro-benchmark.
        pos = F.conv1d(x.transpose(1, 2).contiguous(), self.weight, self.bias, padding=self.weight.shape[2] // 2,
                       groups=self.groups)
        return F.gelu(pos[..., :frames]).transpose(1, 2)  # even kernels drop the last frame

    def triton(self, x: torch.Tensor) -> torch.Tensor:
        from audioenc.kernels.pos_conv import grouped_conv1d_gelu

        return grouped_conv1d_gelu(x, self.weight_taps_first, self.bias, self.groups)


class _UnmaskedAttention(_FasterPath):
    """Half-precision attention without key mask or bias (Whisper's windows), from the fused QKV
    projection's (B, T, 3, H, D) output: audioenc's kernel, or cuDNN's fused attention through
    torch where that runs faster (not yet timed on a GPU in the backend). Off CUDA, ours."""

    WHAT, TRUSTED, CANDIDATE, OFF_CUDA = "attention", "triton", "cudnn", "triton"

    def triton(self, qkv: torch.Tensor) -> torch.Tensor:
        from audioenc.kernels.attention import attention

        return attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])

    def cudnn(self, qkv: torch.Tensor) -> torch.Tensor:
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, T, D) views, as SDPA takes them
        out = _cudnn_attention(q, k, v, None, False)[0]  # no bias, no log-sum-exp; scale D ** -0.5
        return out.transpose(1, 2).contiguous()  # (B, T, H, D), as ours returns


def _cudnn_attention(*args):
    """torch's entry to cuDNN's attention, without the process-wide switches of sdpa_kernel()."""
    return torch.ops.aten._scaled_dot_product_cudnn_attention(*args)


def _cudnn_attention_usable(device: torch.device) -> bool:
    """Ampere or newer, and cuDNN 9.15.1 or newer: earlier cuDNN 9 releases could access memory out
    of bounds under CUDA-graph capture (pytorch#169849; TransformerEngine refuses cuDNN 9.14 for
    non-causal attention over more than 1024 keys in graphs, and Whisper's are 1500), a fault that
    kills the process's CUDA context; torch's SDPA dispatch guards against it (pytorch#167101,
    #171627). Calling the op directly skips torch's checks: this is ours."""
    return (device.type == "cuda" and torch.backends.cudnn.is_available()
            and (torch.backends.cudnn.version() or 0) >= 91501 and torch.cuda.get_device_capability(device) >= (8, 0))


def kept_paths(model) -> str:
    """What the timed choices of a _FastWav2Vec2 / _FastWhisper kept so far, for benchmark labels:
    e.g. 'fc1 + GELU: cublas; conv + LayerNorm + GELU: split'."""
    kept = {"fc1 + GELU": list(model.fc1_choices.values()), "attention": list(model.attention_choices.values())}
    if hasattr(model, "pos_conv"):
        kept["positional conv"] = list(model.pos_conv.choices.values())
    for conv in getattr(model, "layer_norm_convs", {}).values():
        kept.setdefault("conv + LayerNorm + GELU", []).extend(conv.choices.values())
    return "; ".join(f"{what}: {'/'.join(sorted(set(names)))}" for what, names in kept.items() if names)


class _Norm:
    """A LayerNorm's parameters in float32 (statistics and affine run in float32 in the kernel)."""

    def __init__(self, norm: nn.Module, device):
        self.weight = norm.weight.detach().float().to(device)
        self.bias = norm.bias.detach().float().to(device)
        self.eps = norm.eps

    def __call__(self, x, residual=None, out_dtype=None, sum_dtype=None, shift=None):
        from audioenc.kernels.layer_norm import add_layer_norm

        return add_layer_norm(x, residual, self.weight, self.bias, self.eps, out_dtype, sum_dtype, shift=shift)


class _Adapter:
    """MMS's adapter on the pre-LN residual stream r (models.wav2vec2.AttentionAdapter):
    linear_2(relu(linear_1(LayerNorm(r)))), the LayerNorm's statistics in float32."""

    def __init__(self, adapter: nn.Module, dtype, device):
        self.norm, self.dtype = _Norm(adapter.norm, device), dtype
        self.linear_1 = _Linear([adapter.linear_1], dtype, device)
        self.linear_2 = _Linear([adapter.linear_2], dtype, device)

    def __call__(self, f: torch.Tensor, r: torch.Tensor, sum_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(the adapter's output, r + f): the feed-forward's add fused with the adapter's LayerNorm."""
        h, r = self.norm(f, r, out_dtype=self.dtype, sum_dtype=sum_dtype)
        return self.linear_2(F.relu(self.linear_1(h))), r

    def accumulate(self, r: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        """r += the adapter's output without linear_2's bias, for _run_blocks_in_cublas: r lacks the
        biases in shift."""
        h, _ = self.norm(r, shift=shift, out_dtype=self.dtype)
        return self.linear_2.accumulate(r, F.relu(self.linear_1(h)))


class _Block:
    """One transformer layer: fused QKV attention and feed-forward; WavLM's gate and MMS's adapter
    when present."""

    def __init__(self, attention: nn.Module, norm1: nn.Module, norm2: nn.Module, fc1: nn.Linear, fc2: nn.Linear,
                 dtype, device, fc1_choices: dict, attention_choices: dict, adapter: nn.Module | None = None):
        self.num_heads = attention.num_heads
        self.qkv = _Linear([attention.q_proj, attention.k_proj, attention.v_proj], dtype, device)
        self.out_proj = _Linear([attention.out_proj], dtype, device)
        self.norm1, self.norm2 = _Norm(norm1, device), _Norm(norm2, device)
        self.fc1_gelu, self.fc2 = _LinearGelu(fc1, dtype, device, fc1_choices), _Linear([fc2], dtype, device)
        # cuDNN's attention takes half precision only; off CUDA the class runs our kernel (the tests)
        self.unmasked_attention = _UnmaskedAttention(attention_choices) if dtype != torch.float32 and (
            device.type != "cuda" or _cudnn_attention_usable(device)) else None
        self.gate = None
        if hasattr(attention, "gru_rel_pos_linear"):
            from audioenc.kernels.wavlm_gate import fold_gate_linear

            lin = attention.gru_rel_pos_linear
            self.gate = tuple(t.to(device) for t in fold_gate_linear(lin.weight, lin.bias)) + (
                attention.gru_rel_pos_const.detach().float().reshape(-1).contiguous().to(device),)
        self.adapter = _Adapter(adapter, dtype, device) if adapter is not None else None  # pre-LN layers only

    def attend(self, h: torch.Tensor, lengths: torch.Tensor | None, rel_bias: torch.Tensor | None) -> torch.Tensor:
        return self.out_proj(self.attention_values(h, lengths, rel_bias))

    def attention_values(self, h: torch.Tensor, lengths: torch.Tensor | None,
                         rel_bias: torch.Tensor | None) -> torch.Tensor:
        """The heads' outputs, (B, T, D), before out_proj."""
        from audioenc.kernels.attention import attention
        from audioenc.kernels.wavlm_gate import wavlm_gate

        batch, frames, dim = h.shape
        heads = self.num_heads
        qkv = self.qkv(h).view(batch, frames, 3, heads, dim // heads)
        if self.unmasked_attention is not None and lengths is None and rel_bias is None:
            out = self.unmasked_attention(qkv)
        else:
            gate = wavlm_gate(h, heads, *self.gate) if rel_bias is not None else None
            out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], lengths, rel_bias, gate)
        return out.view(batch, frames, dim)

    def feed_forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1_gelu(h))


def _run_blocks(blocks: list[_Block], x: torch.Tensor, pre_norm: bool, final_norm: _Norm | None,
                num_layers: int, lengths, rel_bias, dtype, keep_hidden: bool,
                residual_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Runs the first num_layers blocks on x (the input of layer 0, in residual_dtype for pre-LN).

    Pre-LN: the residual stream r (float32 unless residual_dtype says otherwise) is each hidden
    state; every add is fused with the next LayerNorm (this layer's second, the next layer's first,
    or the final one), which sums in float32 and stores r in residual_dtype.
    Post-LN: hidden states are the LayerNorm outputs in the compute dtype.
    Returns (output, hidden states); the output is after final_norm when every layer ran. The
    hidden states are [] unless keep_hidden: then each layer's output can be freed as the next one
    runs (a CUDA graph keeps whatever the forward returns: 16 GB of them for whisper-large-v3 at
    batch 64).
    """
    hidden_states = []
    keep = hidden_states.append if keep_hidden else (lambda t: None)
    keep(x)
    if not pre_norm:
        for block in blocks[:num_layers]:
            x, _ = block.norm1(block.attend(x, lengths, rel_bias), x)
            x, _ = block.norm2(block.feed_forward(x), x)
            keep(x)
        return x, hidden_states
    r = x
    out = r
    if num_layers == 0:
        return out, hidden_states
    h, _ = blocks[0].norm1(r, out_dtype=dtype)
    for i, block in enumerate(blocks[:num_layers]):
        h2, r = block.norm2(block.attend(h, lengths, rel_bias), r, sum_dtype=residual_dtype)
        f = block.feed_forward(h2)
        if block.adapter is not None:  # f becomes the adapter's output, added like a feed-forward's
            f, r = block.adapter(f, r, residual_dtype)
        if i + 1 < num_layers:
            h, r = blocks[i + 1].norm1(f, r, sum_dtype=residual_dtype)
            out = r
        elif final_norm is not None and num_layers == len(blocks):
            out, r = final_norm(f, r, out_dtype=torch.float32, sum_dtype=residual_dtype)
        else:
            r = (r.float() + f.float()).to(residual_dtype)
            out = r
        keep(r)
    return out, hidden_states


def _bias_sums(blocks: list[_Block]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per layer, the float32 sum of every out_proj, fc2 and adapter linear_2 bias up to its attention's,
    its feed-forward's and its own output: what a residual stream summed without them
    (_run_blocks_in_cublas) lacks."""
    total, sums = 0, []
    for block in blocks:
        after_attention = total + block.out_proj.bias.float()
        after_feed_forward = total = after_attention + block.fc2.bias.float()
        if block.adapter is not None:
            total = total + block.adapter.linear_2.bias.float()
        sums.append((after_attention, after_feed_forward, total))
    return sums


def _run_blocks_in_cublas(blocks: list[_Block], bias_sums, x: torch.Tensor, final_norm: _Norm | None,
                          num_layers: int, lengths, rel_bias, dtype, keep_hidden: bool) -> tuple[torch.Tensor, list]:
    """_run_blocks for pre-LN models with the residual adds in cuBLAS's epilogue (an experiment,
    bench_gpu.py): out_proj and fc2 add their products to the float32 residual stream r as they
    write it, without their biases, whose running sum (bias_sums) each LayerNorm adds as it reads r.
    Each LayerNorm then reads r and writes its output, 6 bytes per element, where the fused add
    reads r and the branch and writes both, 12; cuBLAS reads and writes r in float32 instead."""
    hidden_states = []
    keep = (lambda t, shift: hidden_states.append(t + shift)) if keep_hidden else (lambda t, shift: None)
    keep(x, 0)
    if num_layers == 0:
        return x, hidden_states
    r = x
    h, _ = blocks[0].norm1(r, out_dtype=dtype)
    for i, block in enumerate(blocks[:num_layers]):
        after_attention, after_feed_forward, after_layer = bias_sums[i]
        r = block.out_proj.accumulate(r, block.attention_values(h, lengths, rel_bias))
        h2, _ = block.norm2(r, shift=after_attention, out_dtype=dtype)
        r = block.fc2.accumulate(r, block.fc1_gelu(h2))
        if block.adapter is not None:
            r = block.adapter.accumulate(r, after_feed_forward)
        if i + 1 < num_layers:
            h, _ = blocks[i + 1].norm1(r, shift=after_layer, out_dtype=dtype)
        elif final_norm is not None and num_layers == len(blocks):
            out, _ = final_norm(r, shift=after_layer, out_dtype=torch.float32)
        else:
            out = r + after_layer
        keep(r, after_layer)
    return out, hidden_states


class _FastWav2Vec2:
    """wav2vec2 / HuBERT / WavLM forward on the kernels."""

    def __init__(self, model: nn.Module, dtype, device):
        self.dims, self.dtype = model.dims, dtype
        self.convs = []
        self.layer_norm_convs = {}  # index -> _ConvLayerNormGelu: layer-norm models' matmul layers
        for i, layer in enumerate(model.feature_extractor.conv_layers):
            conv = layer.conv
            # Layer 0 reads the float32 waveform directly (no matmul there), later layers run in dtype.
            wdtype = torch.float32 if i == 0 else dtype
            # (K, C_in, C_out) memory, nn.Conv1d's (C_out, C_in, K) shape: the kernel's best load order.
            weight = conv.weight.detach().to(device, wdtype).permute(2, 1, 0).contiguous().permute(2, 1, 0)
            bias = conv.bias.detach().to(device, wdtype) if conv.bias is not None else None
            norm = None
            if layer.norm_type is not None:
                norm = (layer.layer_norm.weight.detach().float().to(device),
                        layer.layer_norm.bias.detach().float().to(device), layer.layer_norm.eps)
            if layer.norm_type == "layer" and i > 0:
                self.layer_norm_convs[i] = _ConvLayerNormGelu(weight, bias, conv.stride[0], norm, dtype)
            self.convs.append((layer.norm_type, weight, bias, conv.kernel_size[0], conv.stride[0], norm))
        projection = model.feature_projection
        self.proj_norm = _Norm(projection.layer_norm, device) if projection.layer_norm is not None else None
        self.projection = _Linear([projection.projection], dtype, device)
        encoder = model.encoder
        self.pos_conv = _PositionalConv(encoder.pos_conv_embed.conv, dtype, device)
        batch_norm = encoder.pos_conv_embed.batch_norm
        self.pos_norm = None  # mHuBERT-25Hz's BatchNorm before the positional conv: (scale, shift)
        if batch_norm is not None:
            self.pos_norm = tuple(t.detach().float().to(device) for t in batch_norm.scale_and_shift())
        self.pre_norm = encoder.pre_norm
        self.encoder_norm = _Norm(encoder.layer_norm, device)
        self.fc1_choices, self.attention_choices = {}, {}
        self.blocks = [_Block(l.attention, l.layer_norm, l.final_layer_norm, l.feed_forward.intermediate_dense,
                              l.feed_forward.output_dense, dtype, device, self.fc1_choices, self.attention_choices,
                              l.adapter_layer) for l in encoder.layers]
        self.residual_in_cublas = False  # _run_blocks_in_cublas, pre-LN only: an experiment
        self.bias_sums = _bias_sums(self.blocks) if self.pre_norm else None
        self.rel_embedding = None
        if self.dims.family == "wavlm":
            self.rel_embedding = encoder.layers[0].attention.rel_attn_embed.weight.detach().float().to(device)

    def features(self, waveforms: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from audioenc.kernels.conv_feature import conv0_group_norm_gelu, conv1d_gelu

        x = waveforms.float()
        for i, (norm_type, weight, bias, k, s, norm) in enumerate(self.convs):
            lengths = torch.div(lengths - k, s, rounding_mode="floor") + 1
            if norm_type == "group":
                x = conv0_group_norm_gelu(x, lengths, weight, bias, norm[0], norm[1], s, norm[2], out_dtype=self.dtype)
                # in place: a second copy of the widest activation is GBs at batch 64
                x.add_(group_norm_overflow(waveforms, weight, bias).to(self.dtype))
                continue
            if i in self.layer_norm_convs:
                x = self.layer_norm_convs[i](x)
                continue
            if i == 0:
                x = x[:, :, None]  # (B, L, 1): channels-last waveform
            ln = norm if norm_type == "layer" else (None, None, 1e-5)
            x = conv1d_gelu(x, weight, bias, s, 0, ln[0], ln[1], ln[2], out_dtype=self.dtype)
        return x, lengths

    def __call__(self, waveforms: torch.Tensor, lengths: torch.Tensor, num_layers: int, keep_hidden: bool = True):
        x, frame_lengths = self.features(waveforms, lengths)
        if self.proj_norm is not None:
            x, _ = self.proj_norm(x)
        x = self.projection(x)
        frames = x.shape[1]
        valid = valid_mask(frame_lengths, frames)
        x = x * valid[..., None].to(x.dtype)  # padding must not leak into valid frames via the pos conv
        conv_in = x
        if self.pos_norm is not None:  # padded frames zeroed again after the shift, as in the reference
            conv_in = ((x.float() * self.pos_norm[0] + self.pos_norm[1]) * valid[..., None]).to(x.dtype)
        pos = self.pos_conv(conv_in)
        if self.pre_norm:
            x = x.float() + pos.float()
        else:
            x, _ = self.encoder_norm(pos, x)
        rel_bias = None
        if self.rel_embedding is not None:
            from audioenc.kernels.attention import relative_bias_table

            rel_bias = relative_bias_table(self.rel_embedding, frames, self.dims.num_buckets,
                                           self.dims.max_bucket_distance)
        if self.pre_norm and self.residual_in_cublas:
            out, hidden_states = _run_blocks_in_cublas(self.blocks, self.bias_sums, x, self.encoder_norm, num_layers,
                                                       frame_lengths, rel_bias, self.dtype, keep_hidden)
        else:
            out, hidden_states = _run_blocks(self.blocks, x, self.pre_norm, self.encoder_norm if self.pre_norm else None,
                                             num_layers, frame_lengths, rel_bias, self.dtype, keep_hidden)
        return out, hidden_states, frame_lengths


class _FastWhisper:
    """The Whisper encoder forward on the kernels."""

    def __init__(self, model: nn.Module, dtype, device):
        self.dims, self.dtype = model.dims, dtype
        cl = lambda w: w.detach().to(device, dtype).permute(2, 1, 0).contiguous().permute(2, 1, 0)
        self.conv1 = (cl(model.conv1.weight), model.conv1.bias.detach().to(device, dtype))
        self.conv2 = (cl(model.conv2.weight), model.conv2.bias.detach().to(device, dtype))
        # Added in the conv2 epilogue, straight into the residual stream.
        self.positions = model.embed_positions.weight.detach().float().to(device)
        # float32 keeps the residual stream as exact as the reference's. float16 measured 2.4% faster
        # on whisper-large-v3 (H200) but with 2.5x the error, torch float16's (BENCHMARKS.md); not
        # the default, bench_gpu.py keeps timing it.
        self.residual_dtype = torch.float32
        self.fc1_choices, self.attention_choices = {}, {}
        self.blocks = [_Block(l.self_attn, l.self_attn_layer_norm, l.final_layer_norm, l.fc1, l.fc2, dtype, device,
                              self.fc1_choices, self.attention_choices) for l in model.layers]
        self.final_norm = _Norm(model.layer_norm, device)
        self.residual_in_cublas = False  # _run_blocks_in_cublas: an experiment
        self.bias_sums = _bias_sums(self.blocks)

    def __call__(self, mel: torch.Tensor, num_layers: int, keep_hidden: bool = True):
        from audioenc.kernels.conv_feature import conv1d_gelu

        x = conv1d_gelu(mel.to(self.dtype).transpose(1, 2), *self.conv1, stride=1, padding=1)
        x = conv1d_gelu(x, *self.conv2, stride=2, padding=1, add=self.positions, out_dtype=self.residual_dtype)
        if self.residual_in_cublas:
            out, hidden_states = _run_blocks_in_cublas(self.blocks, self.bias_sums, x, self.final_norm, num_layers,
                                                       None, None, self.dtype, keep_hidden)
        else:
            out, hidden_states = _run_blocks(self.blocks, x, True, self.final_norm, num_layers, None, None, self.dtype,
                                             keep_hidden, self.residual_dtype)
        if num_layers == len(self.blocks) and keep_hidden:
            hidden_states[-1] = out
        return out, hidden_states


class TritonBackend:
    name = "triton"

    @classmethod
    def available(cls) -> str | None:
        problem = import_problem(("triton",), "pip install 'audioenc[gpu]'")
        if problem is not None:
            return problem
        if torch.cuda.is_available():
            return _capability_problem()  # the current GPU: the one device="cuda" resolves to
        if _interpreting():
            return None
        return "it needs a CUDA GPU (or TRITON_INTERPRET=1 to run its kernels slowly in Triton's CPU interpreter)"

    def __init__(self, model: nn.Module, device: torch.device, dtype: str):
        from audioenc.kernels.autotune import autotune_enabled

        autotune_enabled()  # read as the kernels are first imported; a typo fails the load, not the first call
        if device.type == "cpu" and not _interpreting():
            raise ValueError("the triton backend runs on CUDA devices (on the CPU only with TRITON_INTERPRET=1)")
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"the triton backend runs on CUDA devices, not {device.type!r}")
        if device.type == "cuda" and _capability_problem(device) is not None:
            raise ValueError(f"the triton backend cannot run on {device}: {_capability_problem(device)}")
        self.device, self.dtype = device, DTYPES[resolve_dtype(dtype, device, DTYPES, "triton")]
        if device.type == "cpu" and self.dtype == torch.bfloat16:
            # Triton's interpreter computes bfloat16 tl.dot wrongly (errors of order 1e9): every matmul
            # kernel would return garbage, silently.
            raise ValueError("the triton backend runs bfloat16 only on CUDA devices: Triton's CPU interpreter "
                             "computes bfloat16 matmuls wrongly; use float32 or float16 there")
        dims = model.dims
        head_dim = dims.n_state // dims.n_head if dims.family == "whisper" else dims.hidden_size // dims.num_heads
        if head_dim > 128:  # no released checkpoint has one; found here, not at the first call
            raise ValueError(f"the triton backend's attention kernel takes head dims up to 128; this model's is "
                             f"{head_dim}: use backend='torch' or 'onnx'")
        model = model.float().eval()
        with torch.no_grad():
            if model.dims.family == "whisper":
                self.model = _FastWhisper(model, self.dtype, device)
            else:
                self.model = _FastWav2Vec2(model, self.dtype, device)
        self.is_whisper = model.dims.family == "whisper"
        self.use_graphs = device.type == "cuda"
        self._graphs: OrderedDict = OrderedDict()
        # One pool for every graph's intermediates: safe because replays never overlap (the lock)
        # and each replay's outputs are copied out before the next replay can overwrite them.
        self._graph_pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._lock = threading.Lock()  # graph replays share static buffers
        # Captures run on a stream of our device: torch's default capture stream is one per process,
        # made on whichever device captured first.
        self._capture_stream = torch.cuda.Stream(device) if self.use_graphs else None
        self._copies_done = torch.cuda.Event() if self.use_graphs else None  # the last replay's outputs copied out

    def computed_samples(self, batch: int, samples: int) -> int:
        """Samples a call on a (batch, samples) input computes (AudioEncoder groups lists by it)."""
        return graph_samples(batch, samples, self.is_whisper) if self.use_graphs else batch * samples

    def _check_item_size(self, samples: int) -> None:
        """The kernels offset within an item in int32: the first conv layer's output (frames x
        channels) must stay under 2^31 elements, about 21 minutes of audio."""
        dims = self.model.dims
        padded = length_bucket(samples) if self.use_graphs else samples
        limit = 2**31 // dims.conv_dim[0]  # first-layer frames
        if (padded - dims.conv_kernel[0]) // dims.conv_stride[0] + 1 >= limit:
            raise ValueError(f"the triton backend encodes items of up to about {limit * dims.conv_stride[0] / 16000 / 60:.0f} "
                             f"minutes whole, got {samples / 16000:.0f} s: keep the encoder's long_audio_threshold_s "
                             "below that, so longer items go through windows")

    def _forward(self, inputs, lengths, num_layers, keep_hidden):
        if self.is_whisper:
            out, hidden_states = self.model(inputs, num_layers, keep_hidden)
            return out, hidden_states, None
        return self.model(inputs, lengths, num_layers, keep_hidden)

    @torch.inference_mode()
    def run(self, inputs: torch.Tensor, lengths: torch.Tensor | None, num_layers: int,
            output_hidden_states: bool = True):
        if not self.is_whisper:
            self._check_item_size(inputs.shape[-1])
        inputs = inputs.to(self.device, torch.float32)
        if lengths is not None:
            lengths = lengths.to(self.device, torch.int64)
        # Triton launches, streams and graph captures follow the current device: make it ours
        # (device="cuda:1" while the process's current device is cuda:0).
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            if not self.use_graphs:
                out, hidden_states, frame_lengths = self._forward(inputs, lengths, num_layers, output_hidden_states)
                return out.float(), [h.float() for h in hidden_states], frame_lengths
            with self._lock:
                # Another thread's replay, maybe on another stream, must not overwrite the static
                # buffers before the last replay's outputs are copied out of them: GPU-side ordering.
                stream = torch.cuda.current_stream(self.device)
                stream.wait_event(self._copies_done)
                result = self._run_graph(inputs, lengths, num_layers, output_hidden_states)
                self._copies_done.record(stream)
                return result

    def _run_graph(self, inputs, lengths, num_layers, output_hidden_states):
        batch = inputs.shape[0]
        if batch > MAX_GRAPH_BATCH:  # split rather than capture ever larger graphs
            parts = [self._run_graph(inputs[i:i + MAX_GRAPH_BATCH],
                                     None if lengths is None else lengths[i:i + MAX_GRAPH_BATCH], num_layers,
                                     output_hidden_states)
                     for i in range(0, batch, MAX_GRAPH_BATCH)]
            return self._concat(parts)
        padded = batch_bucket(batch)
        samples = inputs.shape[-1] if self.is_whisper else length_bucket(inputs.shape[-1])
        key = (padded, samples, num_layers, output_hidden_states)
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._capture(padded, inputs.shape[1:-1] + (samples,), num_layers, output_hidden_states)
            self._graphs[key] = entry
            budget = GRAPH_BUFFER_SHARE * torch.cuda.get_device_properties(self.device).total_memory
            while len(self._graphs) > 1 and (len(self._graphs) > GRAPH_CACHE_SIZE
                                             or sum(self._buffer_bytes(e) for e in self._graphs.values()) > budget):
                self._graphs.popitem(last=False)  # least recently used first; never the new one
        self._graphs.move_to_end(key)
        graph, static_in, static_len, static_out = entry
        # Zero padding and full-length dummy items: neither reaches an item's valid frames.
        static_in.zero_()
        static_in[:batch, ..., : inputs.shape[-1]].copy_(inputs)
        if static_len is not None:
            static_len.fill_(samples)
            static_len[:batch].copy_(lengths)
        graph.replay()
        out, hidden_states, frame_lengths = static_out
        # Copies: the static buffers are overwritten by the next replay.
        frames = out.shape[1] if self.is_whisper else int(self.model.dims.num_frames(inputs.shape[-1]))
        cut = lambda t: t[:batch, :frames].to(torch.float32, copy=True)
        return cut(out), [cut(h) for h in hidden_states], None if self.is_whisper else frame_lengths[:batch].clone()

    def _capture(self, batch, shape, num_layers, keep_hidden):
        # Random, not zeros: the warm-up below autotunes on it, and timing on zeros flatters some
        # configs (every replay zeroes it before copying its input in).
        static_in = torch.randn((batch,) + tuple(shape), dtype=torch.float32, device=self.device)
        static_len = None if self.is_whisper else torch.full((batch,), shape[-1], dtype=torch.int64, device=self.device)
        # Warm up on a side stream first: compiles and autotunes every kernel outside the capture.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self._forward(static_in, static_len, num_layers, keep_hidden)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # One capture at a time in the process (encoders may share a GPU), and other threads' CUDA
        # work (allocations included) may go on meanwhile: only this thread's calls are captured.
        with _CAPTURE_LOCK, torch.cuda.graph(graph, pool=self._graph_pool, stream=self._capture_stream,
                                             capture_error_mode="thread_local"):
            static_out = self._forward(static_in, static_len, num_layers, keep_hidden)
        return graph, static_in, static_len, static_out

    @staticmethod
    def _buffer_bytes(entry) -> int:
        """Bytes a captured graph keeps between replays: its static input and outputs."""
        _, static_in, _, (out, hidden_states, _) = entry
        return sum(t.numel() * t.element_size() for t in [static_in, out, *hidden_states])

    @staticmethod
    def _concat(parts):
        outs, hidden, lens = zip(*parts)
        frames = max(o.shape[1] for o in outs)
        pad = lambda t: F.pad(t, (0, 0, 0, frames - t.shape[1]))
        return (torch.cat([pad(o) for o in outs]), [torch.cat([pad(h) for h in hs]) for hs in zip(*hidden)],
                None if lens[0] is None else torch.cat(lens))
