"""Every Triton kernel against its torch reference.

Without CUDA the kernels run in Triton's CPU interpreter at small odd shapes. Triton binds every
@triton.jit function (its own standard library included) to interpreter or compiled mode when it is
decorated, so these tests run in a child process started with TRITON_INTERPRET=1
(test_in_the_interpreter), whatever this process imported before. With CUDA the same tests run
compiled on the GPU, and the `gpu` tests add real sizes and bfloat16 (the interpreter's bfloat16
tl.dot is broken, so bfloat16 is GPU-only).

Rules: float32 within 1e-4 relative of the float32 truth; half precision at most 2x the error of
the same math done naively in that half precision (flash-attention style), never NaN.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch

from conftest import rel_err, run_file_in_interpreter

ON_GPU = torch.cuda.is_available()
INTERPRETER_CHILD = os.environ.get("TRITON_INTERPRET") == "1"
RUN_HERE = ON_GPU or INTERPRETER_CHILD
DEVICE = "cuda" if ON_GPU else "cpu"
KERNEL_MODULES = ("audioenc.kernels.attention", "audioenc.kernels.conv_feature", "audioenc.kernels.layer_norm",
                  "audioenc.kernels.linear_gelu", "audioenc.kernels.pos_conv", "audioenc.kernels.wavlm_gate")


@pytest.mark.skipif(ON_GPU or INTERPRETER_CHILD, reason="runs the interpreter child only on a machine without CUDA")
def test_in_the_interpreter():
    run_file_in_interpreter(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def kernels():
    if not RUN_HERE:
        pytest.skip("without CUDA the kernel tests run in the TRITON_INTERPRET=1 child (test_in_the_interpreter)")
    pytest.importorskip("triton")
    # cuDNN convs default to TF32 on GPUs: the float32 references must really be float32.
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    yield {name.rsplit(".", 1)[1]: importlib.import_module(name) for name in KERNEL_MODULES}
    torch.backends.cudnn.allow_tf32 = saved


def check(out, truth, naive, dtype):
    """float32: 1e-4 of the truth; half: at most 2x the naive half-precision error."""
    out, truth = out.float().cpu(), truth.float().cpu()
    assert torch.isfinite(out).all()
    err = rel_err(out, truth)
    if dtype == torch.float32:
        assert err <= 1e-4, err
    else:
        bound = 2 * rel_err(naive.float().cpu(), truth) + 1e-5  # floor: exact cases (length 1)
        assert err <= bound, (err, bound)


def randn(*shape, dtype=torch.float32, scale=1.0, gen=None):
    return (scale * torch.randn(*shape, generator=gen)).to(DEVICE, dtype)


# ---------------------------------------------------------------- attention

ATTENTION_CASES = [  # (frames, heads, head_dim, key mask, WavLM bias)
    (1, 1, 64, False, False),
    (2, 2, 80, True, False),
    (97, 3, 128, True, True),
    (257, 4, 64, True, True),
    (97, 1, 80, False, True),
    (257, 2, 80, False, False),
    (2, 4, 128, False, True),
    (1, 3, 80, True, True),
]


def attention_inputs(frames, heads, head_dim, mask, bias, dtype, seed, batch=2):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (randn(batch, frames, heads, head_dim, dtype=dtype, gen=gen) for _ in range(3))
    lengths = None
    if mask:
        lengths = torch.tensor([frames] + [max(1, frames // (i + 2)) for i in range(batch - 1)], device=DEVICE)
    rel = gate = None
    if bias:
        rel = randn(heads, 2 * frames - 1, scale=2.0, gen=gen)
        gate = (2 * torch.rand(batch, heads, frames, generator=gen)).to(DEVICE)
    return q, k, v, lengths, rel, gate


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("frames,heads,head_dim,mask,bias", ATTENTION_CASES)
def test_attention_matches_reference(kernels, frames, heads, head_dim, mask, bias, dtype):
    att = kernels["attention"]
    args = attention_inputs(frames, heads, head_dim, mask, bias, dtype, seed=frames * 7 + heads)
    out = att.attention(*args)
    assert out.shape == args[0].shape and out.dtype == dtype
    truth = att.attention_ref(*args)
    naive = att.attention_ref(*args, compute_dtype=dtype) if dtype != torch.float32 else None
    check(out, truth, naive, dtype)


def test_attention_padded_keys_never_reach_valid_frames(kernels):
    att = kernels["attention"]
    q, k, v, lengths, rel, gate = attention_inputs(97, 2, 64, True, True, torch.float32, seed=3)
    out = att.attention(q, k, v, lengths, rel, gate)
    k2, v2 = k.clone(), v.clone()
    for i, n in enumerate(lengths.tolist()):
        k2[i, n:] = 1e4
        v2[i, n:] = float("nan")
    assert torch.equal(att.attention(q, k2, v2, lengths, rel, gate), out)


def test_attention_reads_strided_views_of_a_fused_projection(kernels):
    att = kernels["attention"]
    qkv = randn(2, 33, 3, 2, 80)
    q, k, v = qkv.unbind(2)
    out = att.attention(q, k, v)
    check(out, att.attention_ref(q.contiguous(), k.contiguous(), v.contiguous()), None, torch.float32)


def test_every_launcher_reads_strided_vector_arguments(kernels):
    """Lengths, biases and norm weights passed as strided views (every other element) give the
    results of their contiguous copies: the kernels index these vectors as Ptr + i."""
    gen = torch.Generator().manual_seed(11)
    every_other = lambda *values: torch.tensor(values, device=DEVICE).repeat_interleave(2)[::2]
    vec = lambda n, scale=1.0: randn(2 * n, scale=scale, gen=gen)[::2]
    att, conv, ln, lin = kernels["attention"], kernels["conv_feature"], kernels["layer_norm"], kernels["linear_gelu"]
    q, k, v = (randn(2, 9, 2, 16, gen=gen) for _ in range(3))
    lengths = every_other(9, 2)
    check(att.attention(q, k, v, lengths), att.attention_ref(q, k, v, lengths.contiguous()), None, torch.float32)
    x, w = randn(2, 12, 16, gen=gen), randn(24, 16, 3, gen=gen, scale=0.2)
    bias, nw, nb = vec(24), 1 + vec(24, 0.2), vec(24)
    check(conv.conv1d_gelu(x, w, bias, 2, 0, nw, nb),
          conv.conv1d_gelu_ref(x, w, bias.contiguous(), 2, 0, nw.contiguous(), nb.contiguous()), None, torch.float32)
    wav, w0, frames = randn(2, 500, gen=gen), randn(24, 1, 10, gen=gen, scale=0.3), every_other(99, 50)
    check(conv.conv0_group_norm_gelu(wav, frames, w0, bias, nw, nb, 5),
          conv.conv0_group_norm_gelu_ref(wav, frames.contiguous(), w0, bias.contiguous(), nw.contiguous(),
                                         nb.contiguous(), 5), None, torch.float32)
    rows = randn(3, 24, gen=gen)
    check(ln.add_layer_norm(rows, None, nw, nb)[0],
          ln.add_layer_norm_ref(rows, None, nw.contiguous(), nb.contiguous())[0], None, torch.float32)
    xl, wl = randn(3, 16, gen=gen), randn(24, 16, gen=gen, scale=0.25)
    check(lin.linear_gelu(xl, wl, bias), lin.linear_gelu_ref(xl, wl, bias.contiguous()), None, torch.float32)


def test_attention_argument_errors(kernels):
    att = kernels["attention"]
    q = randn(1, 5, 2, 64)
    with pytest.raises(ValueError, match="same"):
        att.attention(q, q[:, :4], q)
    with pytest.raises(ValueError, match="dtype"):
        att.attention(q, q.half(), q)
    with pytest.raises(ValueError, match="both or neither"):
        att.attention(q, q, q, rel_bias=torch.zeros(2, 9, device=DEVICE))
    with pytest.raises(ValueError, match="head dim"):
        big = randn(1, 5, 1, 256)
        att.attention(big, big, big)
    with pytest.raises(ValueError, match="rel_bias must be float32"):
        att.attention(q, q, q, rel_bias=torch.zeros(2, 8, device=DEVICE), gate=torch.zeros(1, 2, 5, device=DEVICE))


@pytest.mark.parametrize("frames,num_buckets,max_distance", [(1, 32, 60), (97, 32, 60), (400, 320, 800)])
def test_relative_bias_table_matches_wavlm_buckets(kernels, frames, num_buckets, max_distance):
    from audioenc.models.wavlm import bucket_of

    embedding = torch.randn(num_buckets, 3)
    table = kernels["attention"].relative_bias_table(embedding, frames, num_buckets, max_distance)
    pos = torch.arange(frames)
    full = embedding[bucket_of(pos[None, :] - pos[:, None], num_buckets, max_distance)].permute(2, 0, 1)
    assert torch.equal(table[:, pos[None, :] - pos[:, None] + frames - 1], full)


# ---------------------------------------------------------------- conv feature encoder

CONV_CASES = [  # (C_in, C_out, kernel, stride, padding, layer norm, bias, add, input length)
    (1, 24, 10, 5, 0, True, True, False, 10),      # layer 0 of layer-norm models: one frame
    (1, 40, 10, 5, 0, True, False, False, 1290),   # 257 frames
    (24, 40, 3, 2, 0, True, True, False, 197),     # 97 frames
    (40, 24, 2, 2, 0, False, False, False, 514),   # group-norm models' layers 1..6: 257 frames
    (20, 24, 3, 1, 1, False, True, False, 97),     # Whisper conv1
    (24, 40, 3, 2, 1, False, True, True, 193),     # Whisper conv2 + positions
    (24, 24, 3, 2, 0, False, True, False, 4),      # 1 frame
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("c_in,c_out,ksize,stride,padding,norm,bias,add,length", CONV_CASES)
def test_conv1d_gelu_matches_reference(kernels, c_in, c_out, ksize, stride, padding, norm, bias, add, length, dtype):
    conv = kernels["conv_feature"]
    gen = torch.Generator().manual_seed(length + c_out)
    x = randn(2, length, c_in, dtype=dtype, gen=gen)
    weight = randn(c_out, c_in, ksize, dtype=dtype, scale=(c_in * ksize) ** -0.5, gen=gen)
    kwargs = dict(bias=randn(c_out, dtype=dtype, scale=0.2, gen=gen) if bias else None, stride=stride, padding=padding)
    if norm:
        kwargs.update(norm_weight=randn(c_out, gen=gen), norm_bias=randn(c_out, gen=gen))
    t_out = conv.conv_output_length(length, ksize, stride, padding)
    if add:
        kwargs.update(add=randn(t_out, c_out, gen=gen))
    out = conv.conv1d_gelu(x, weight, **kwargs)
    assert out.shape == (2, t_out, c_out)
    naive = conv.conv1d_gelu_ref(x, weight, **kwargs, compute_dtype=dtype)
    check(out, conv.conv1d_gelu_ref(x, weight, **kwargs), naive, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_conv1d_without_gelu_is_the_conv_alone(kernels, dtype):
    """The first of the split conv + LayerNorm + GELU path's two passes (float32 out)."""
    conv = kernels["conv_feature"]
    gen = torch.Generator().manual_seed(7)
    x = randn(2, 97, 24, dtype=dtype, gen=gen)
    weight, bias = randn(40, 24, 3, dtype=dtype, scale=72 ** -0.5, gen=gen), randn(40, dtype=dtype, scale=0.2, gen=gen)
    out = conv.conv1d_gelu(x, weight, bias, 2, apply_gelu=False, out_dtype=torch.float32)
    assert out.dtype == torch.float32 and out.shape == (2, 48, 40)
    naive = conv.conv1d_gelu_ref(x, weight, bias, 2, out_dtype=torch.float32, apply_gelu=False, compute_dtype=dtype)
    check(out, conv.conv1d_gelu_ref(x, weight, bias, 2, out_dtype=torch.float32, apply_gelu=False), naive, dtype)


def test_conv1d_gelu_reads_channels_first_inputs_and_any_weight_layout(kernels):
    conv = kernels["conv_feature"]
    mel = randn(2, 20, 33)                                     # (B, n_mels, frames) like a log-mel
    weight = randn(24, 20, 3, scale=0.1)
    packed = weight.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    out = conv.conv1d_gelu(mel.transpose(1, 2), packed, None, 1, 1)
    check(out, conv.conv1d_gelu_ref(mel.transpose(1, 2).contiguous(), weight, None, 1, 1), None, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_conv0_group_norm_uses_each_items_valid_frames(kernels, dtype):
    conv = kernels["conv_feature"]
    gen = torch.Generator().manual_seed(1)
    waves = randn(4, 1290, dtype=dtype, gen=gen)                # 257 frames at k10 s5
    frames = torch.tensor([257, 97, 2, 1], device=DEVICE)
    weight, bias = randn(24, 1, 10, dtype=dtype, gen=gen), randn(24, dtype=dtype, gen=gen)
    gn_w, gn_b = randn(24, gen=gen), randn(24, gen=gen)
    out = conv.conv0_group_norm_gelu(waves, frames, weight, bias, gn_w, gn_b, 5)
    truth = conv.conv0_group_norm_gelu_ref(waves, frames, weight, bias, gn_w, gn_b, 5)
    naive = conv.conv0_group_norm_gelu_ref(waves, frames, weight, bias, gn_w, gn_b, 5, compute_dtype=dtype)
    for i, n in enumerate(frames.tolist()):
        if n > 1:  # one frame: variance 0, the output is the norm's bias up to conv rounding
            check(out[i, :n], truth[i, :n], naive[i, :n], dtype)
        # an item alone gives the same frames
        alone = conv.conv0_group_norm_gelu(waves[i:i + 1, : 5 * (n - 1) + 10], frames[i:i + 1], weight, bias, gn_w, gn_b, 5)
        torch.testing.assert_close(alone[0], out[i, :n], rtol=1e-5, atol=1e-5)


def test_conv_argument_errors(kernels):
    conv = kernels["conv_feature"]
    x, w = randn(1, 50, 8), randn(16, 8, 3)
    with pytest.raises(ValueError, match="channels-last"):
        conv.conv1d_gelu(x.transpose(1, 2), w)
    with pytest.raises(ValueError, match="weight dtype"):
        conv.conv1d_gelu(x, w.half())
    with pytest.raises(ValueError, match="norm weight and bias"):
        conv.conv1d_gelu(x, w, norm_weight=randn(16))
    with pytest.raises(ValueError, match="add must be"):
        conv.conv1d_gelu(x, w, add=randn(3, 16))
    with pytest.raises(ValueError, match="frame_lengths"):
        conv.conv0_group_norm_gelu(randn(2, 100), torch.tensor([1.0, 2.0], device=DEVICE), randn(16, 1, 10),
                                   None, randn(16), randn(16), 5)


# ---------------------------------------------------------------- positional conv

POS_CONV_CASES = [  # (channels, groups, kernel, frames)
    (32, 2, 16, 97),    # even kernel: the last frame dropped
    (48, 1, 5, 2),      # odd kernel; 48 channels per group, as in base models (768 / 16)
    (64, 4, 4, 1),      # one frame, 16 per group
    (40, 4, 15, 37),    # 10 per group: a partial channel chunk
    (160, 2, 3, 19),    # 80 per group: two output-channel tiles
    (48, 3, 9, 300),    # several frame tiles
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("channels,groups,ksize,frames", POS_CONV_CASES)
def test_grouped_conv1d_gelu_matches_reference(kernels, channels, groups, ksize, frames, dtype):
    pos = kernels["pos_conv"]
    gen = torch.Generator().manual_seed(channels + frames)
    x = randn(2, frames, channels, dtype=dtype, gen=gen)
    weight = randn(channels, channels // groups, ksize, dtype=dtype, scale=(channels // groups * ksize) ** -0.5, gen=gen)
    bias = randn(channels, dtype=dtype, scale=0.2, gen=gen)
    out = pos.grouped_conv1d_gelu(x, weight, bias, groups)
    assert out.shape == x.shape and out.dtype == dtype
    truth = pos.grouped_conv1d_gelu_ref(x, weight, bias, groups).float()
    check(out, truth, pos.grouped_conv1d_gelu_ref(x, weight, bias, groups, compute_dtype=dtype), dtype)


def test_grouped_conv1d_gelu_reads_any_strides_and_zero_pads_both_ends(kernels):
    """A transposed (B, C, T) input, the taps-first weight layout the backend keeps and a strided
    bias; frames past
    either end count as zeros, so an item's frames do not depend on what lies beyond its length."""
    pos = kernels["pos_conv"]
    x, weight, bias = randn(2, 32, 41), randn(32, 8, 16, scale=0.1), randn(64, scale=0.2)[::2]
    packed = weight.permute(2, 1, 0).contiguous().permute(2, 1, 0)
    out = pos.grouped_conv1d_gelu(x.transpose(1, 2), packed, bias, 4)
    check(out, pos.grouped_conv1d_gelu_ref(x.transpose(1, 2).contiguous(), weight, bias, 4), None, torch.float32)
    window = x.transpose(1, 2)[:1, 5:30]  # a view: real frames lie in memory on either side
    alone = pos.grouped_conv1d_gelu(window, packed, bias, 4)
    check(alone, pos.grouped_conv1d_gelu_ref(window.contiguous(), weight, bias, 4), None, torch.float32)


def test_grouped_conv1d_gelu_argument_errors(kernels):
    pos = kernels["pos_conv"]
    x, w, b = randn(1, 9, 32), randn(32, 8, 4), randn(32)
    with pytest.raises(ValueError, match="do not split into 3 groups"):
        pos.grouped_conv1d_gelu(x, w, b, 3)
    with pytest.raises(ValueError, match=r"weight must be \(32, 16, K\)"):
        pos.grouped_conv1d_gelu(x, w, b, 2)
    with pytest.raises(ValueError, match="bias must be"):
        pos.grouped_conv1d_gelu(x, w, b[:8], 4)
    with pytest.raises(ValueError, match="x's dtype"):
        pos.grouped_conv1d_gelu(x, w.half(), b, 4)
    with pytest.raises(ValueError, match="channels-last"):
        pos.grouped_conv1d_gelu(x[0], w, b, 4)


# ---------------------------------------------------------------- residual add + LayerNorm

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows,n,residual", [(1, 80, False), (97, 80, True), (257, 32, True), (2, 1024, True)])
def test_add_layer_norm_matches_reference(kernels, rows, n, residual, dtype):
    ln = kernels["layer_norm"]
    gen = torch.Generator().manual_seed(rows + n)
    x = randn(rows, n, dtype=dtype, scale=3, gen=gen)
    res = randn(rows, n, scale=3, gen=gen) if residual else None  # float32 residual stream
    w, b = randn(n, gen=gen), randn(n, gen=gen)
    out, summed = ln.add_layer_norm(x, res, w, b, 1e-5, sum_dtype=torch.float32)
    truth, truth_sum = ln.add_layer_norm_ref(x, res, w, b, 1e-5, sum_dtype=torch.float32)
    naive = torch.nn.functional.layer_norm(x + (res.to(dtype) if residual else 0), (n,), w.to(dtype), b.to(dtype))
    check(out, truth, naive, dtype)
    torch.testing.assert_close(summed, truth_sum, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("residual", [False, True])
def test_add_layer_norm_adds_the_shift_to_every_row(kernels, residual):
    """A float32 residual stream without its biases (cuBLAS summed it), their sum as the shift."""
    ln = kernels["layer_norm"]
    gen = torch.Generator().manual_seed(5)
    x, shift = randn(97, 80, scale=3, gen=gen), randn(80, scale=3, gen=gen)
    res = randn(97, 80, dtype=torch.float16, gen=gen) if residual else None
    w, b = randn(80, gen=gen), randn(80, gen=gen)
    out, summed = ln.add_layer_norm(x, res, w, b, out_dtype=torch.float16, sum_dtype=torch.float32, shift=shift)
    full = x + shift + (res.float() if residual else 0)
    truth, truth_sum = ln.add_layer_norm_ref(full, None, w, b, out_dtype=torch.float32, sum_dtype=torch.float32)
    check(out, truth, truth.half(), torch.float16)
    torch.testing.assert_close(summed, truth_sum, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="shift must be a float vector of size 80"):
        ln.add_layer_norm(x, None, w, b, shift=shift[:79])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_layer_norm_gelu_matches_reference(kernels, dtype):
    """gelu(LN(x)) of float32 conv outputs, written in the compute dtype (the split conv path)."""
    ln = kernels["layer_norm"]
    gen = torch.Generator().manual_seed(11)
    x, w, b = randn(97, 80, scale=3, gen=gen), randn(80, gen=gen), randn(80, gen=gen)
    out, summed = ln.add_layer_norm(x, None, w, b, out_dtype=dtype, apply_gelu=True)
    assert summed is None and out.dtype == dtype
    truth = ln.add_layer_norm_ref(x, None, w, b, out_dtype=torch.float32, apply_gelu=True)[0]
    naive = torch.nn.functional.gelu(torch.nn.functional.layer_norm(x.to(dtype), (80,), w.to(dtype), b.to(dtype)))
    check(out, truth, naive, dtype)


def test_add_layer_norm_float16_input_with_float32_residual_past_the_float16_range(kernels):
    ln = kernels["layer_norm"]
    x = randn(9, 80, dtype=torch.float16, scale=1e4)  # finite in float16 (|x| < 65504)
    res = randn(9, 80, scale=6e4)
    w, b = randn(80), randn(80)
    out, summed = ln.add_layer_norm(x, res, w, b, sum_dtype=torch.float32)
    assert torch.isfinite(out).all() and summed.abs().max() > 65504
    # The float32 truth, and its float16 rounding as the naive error (a float16 truth would leave
    # only the 1e-5 floor, which one rounding flip can pass).
    truth = ln.add_layer_norm_ref(x, res, w, b, out_dtype=torch.float32)[0]
    check(out, truth, truth.half(), torch.float16)


# ---------------------------------------------------------------- linear + bias + GELU

def linear_gelu_inputs(rows, k, n, bias, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = randn(rows, k, dtype=dtype, gen=gen)
    w = randn(n, k, dtype=dtype, scale=2 * k ** -0.5, gen=gen)  # pre-activations ~N(0, 4): GELU's curved part
    return x, w, randn(n, dtype=dtype, gen=gen) if bias else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows,k,n,bias", [(1, 1, 1, True), (2, 97, 80, True), (97, 64, 257, False),
                                           (257, 130, 96, True)])
def test_linear_gelu_matches_reference(kernels, rows, k, n, bias, dtype):
    lin = kernels["linear_gelu"]
    args = linear_gelu_inputs(rows, k, n, bias, dtype, seed=rows + k + n)
    check(lin.linear_gelu(*args), lin.linear_gelu_ref(*args), lin.linear_gelu_ref(*args, compute_dtype=dtype), dtype)


@pytest.mark.parametrize("rows,k,n,bias", [(2, 97, 80, False), (97, 64, 257, True)])
def test_linear_without_gelu_matches_reference(kernels, rows, k, n, bias):
    """The triton backend's float32 Linear (IEEE, where cuBLAS may take TF32)."""
    lin = kernels["linear_gelu"]
    args = linear_gelu_inputs(rows, k, n, bias, torch.float32, seed=rows * k + n)
    check(lin.linear_gelu(*args, apply_gelu=False), lin.linear_gelu_ref(*args, apply_gelu=False), None, torch.float32)


def test_linear_gelu_keeps_leading_dims_and_reads_strided_rows(kernels):
    lin = kernels["linear_gelu"]
    x, w, b = linear_gelu_inputs(2 * 5 * 3, 40, 24, True, torch.float32, seed=3)
    x = x.view(2, 5, 3 * 40)[..., 40:80]  # rows 120 apart: a strided view, no copy needed
    out = lin.linear_gelu(x, w, b)
    assert out.shape == (2, 5, 24)
    check(out, lin.linear_gelu_ref(x, w, b), None, torch.float32)


def test_linear_gelu_argument_errors(kernels):
    lin = kernels["linear_gelu"]
    x, w, b = linear_gelu_inputs(3, 8, 4, True, torch.float32, seed=4)
    with pytest.raises(ValueError, match="do not match"):
        lin.linear_gelu(x, w.t())
    with pytest.raises(ValueError, match="bias must have shape"):
        lin.linear_gelu(x, w, b[:3])
    with pytest.raises(ValueError, match="one dtype"):
        lin.linear_gelu(x, w.half(), b)
    with pytest.raises(ValueError, match="one dtype"):
        lin.linear_gelu(x.double(), w.double(), b.double())


# ---------------------------------------------------------------- WavLM's gate

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch,frames,heads,head_dim", [(1, 1, 1, 64), (2, 97, 3, 16), (3, 257, 4, 80)])
def test_wavlm_gate_matches_the_reference_model(kernels, batch, frames, heads, head_dim, dtype):
    gate_mod = kernels["wavlm_gate"]
    gen = torch.Generator().manual_seed(frames)
    layer = torch.nn.Linear(head_dim, 8)
    const = torch.rand(heads, generator=gen) * 2
    weight, bias = gate_mod.fold_gate_linear(layer.weight, layer.bias)
    weight, bias, const = weight.to(DEVICE), bias.to(DEVICE), const.to(DEVICE)
    x = randn(batch, frames, heads * head_dim, dtype=dtype, scale=3, gen=gen)
    # The model's own formula (Linear(head_dim, 8) viewed (2, 4) and summed) is the truth.
    proj = torch.sigmoid(layer.to(DEVICE)(x.float().view(batch, frames, heads, head_dim)).unflatten(-1, (2, 4)).sum(-1))
    truth = (proj[..., 0] * (proj[..., 1] * const - 1.0) + 2.0).transpose(1, 2)
    out = gate_mod.wavlm_gate(x, heads, weight, bias, const)
    assert out.shape == (batch, heads, frames) and out.dtype == torch.float32
    torch.testing.assert_close(out, truth, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gate_mod.wavlm_gate_ref(x, heads, weight, bias, const), truth, rtol=1e-5, atol=1e-5)


def test_wavlm_gate_argument_errors(kernels):
    gate_mod = kernels["wavlm_gate"]
    x, w, b, c = randn(2, 5, 32), randn(2, 16), randn(2), randn(2)
    with pytest.raises(ValueError, match="H \\* head_dim"):
        gate_mod.wavlm_gate(x, 3, w, b, c)
    with pytest.raises(ValueError, match="weight must be contiguous float32 of shape \\(2, 16\\)"):
        gate_mod.wavlm_gate(x, 2, w.half(), b, c)
    with pytest.raises(ValueError, match="const"):
        gate_mod.wavlm_gate(x, 2, w, b, randn(3))


# ---------------------------------------------------------------- real sizes (GPU only)

gpu = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA GPU")
HALF = [torch.float16, torch.bfloat16]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
@pytest.mark.parametrize("batch,frames,heads,head_dim,mask,bias", [
    (2, 1500, 20, 64, False, False),    # whisper-large
    (4, 499, 16, 64, True, True),       # WavLM-large, 10 s, padded batch
    (3, 1500, 16, 80, False, False),
    (2, 1001, 8, 128, True, False),
])
def test_attention_real_sizes(kernels, batch, frames, heads, head_dim, mask, bias, dtype):
    att = kernels["attention"]
    args = attention_inputs(frames, heads, head_dim, mask, bias, dtype, seed=5, batch=batch)
    check(att.attention(*args), att.attention_ref(*args), att.attention_ref(*args, compute_dtype=dtype), dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", HALF + [torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("rows,k,n", [(2 * 1500, 1280, 5120), (3 * 499, 1024, 4096), (499, 768, 3072),
                                      (77, 384, 1536)])
def test_linear_gelu_real_sizes(kernels, rows, k, n, dtype):
    lin = kernels["linear_gelu"]
    args = linear_gelu_inputs(rows, k, n, True, dtype, seed=6)
    check(lin.linear_gelu(*args), lin.linear_gelu_ref(*args), lin.linear_gelu_ref(*args, compute_dtype=dtype), dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", HALF, ids=["fp16", "bf16"])
def test_wavlm_gate_real_size(kernels, dtype):
    gate_mod = kernels["wavlm_gate"]
    x = randn(4, 499, 16 * 64, dtype=dtype)
    weight, bias, const = randn(2, 64, scale=0.2), randn(2), randn(16).abs()
    out = gate_mod.wavlm_gate(x, 16, weight, bias, const)
    torch.testing.assert_close(out, gate_mod.wavlm_gate_ref(x, 16, weight, bias, const), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", HALF + [torch.float32], ids=["fp16", "bf16", "fp32"])
def test_conv_real_sizes(kernels, dtype):
    conv = kernels["conv_feature"]
    waves = randn(4, 160000)
    frames = torch.tensor([31999, 20000, 401, 1], device=DEVICE)
    w0, gn_w, gn_b = randn(512, 1, 10, scale=0.3), randn(512), randn(512)
    out = conv.conv0_group_norm_gelu(waves, frames, w0, None, gn_w, gn_b, 5, out_dtype=dtype)
    truth = conv.conv0_group_norm_gelu_ref(waves, frames, w0, None, gn_w, gn_b, 5, out_dtype=torch.float32)
    for i, n in enumerate(frames.tolist()[:3]):
        check(out[i, :n], truth[i, :n], truth[i, :n].to(dtype), dtype)
    x = randn(4, 31999, 512, dtype=dtype)
    w = randn(512, 512, 3, dtype=dtype, scale=(512 * 3) ** -0.5)
    nw, nb = randn(512), randn(512)
    for norm in ((None, None), (nw, nb)):
        out = conv.conv1d_gelu(x, w, None, 2, 0, *norm)
        check(out, conv.conv1d_gelu_ref(x, w, None, 2, 0, *norm),
              conv.conv1d_gelu_ref(x, w, None, 2, 0, *norm, compute_dtype=dtype), dtype)
    mel = randn(4, 128, 3000, dtype=dtype)
    w1 = randn(1280, 128, 3, dtype=dtype, scale=(128 * 3) ** -0.5)
    out = conv.conv1d_gelu(mel.transpose(1, 2), w1, None, 1, 1)
    check(out, conv.conv1d_gelu_ref(mel.transpose(1, 2), w1, None, 1, 1),
          conv.conv1d_gelu_ref(mel.transpose(1, 2), w1, None, 1, 1, compute_dtype=dtype), dtype)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", HALF + [torch.float32], ids=["fp16", "bf16", "fp32"])
@pytest.mark.parametrize("channels", [768, 1024], ids=["base", "large"])
def test_grouped_conv1d_gelu_real_sizes(kernels, channels, dtype):
    """The positional conv of base and large models (16 groups, kernel 128) on 10 s of frames."""
    pos = kernels["pos_conv"]
    x = randn(4, 499, channels, dtype=dtype)
    weight = randn(channels, channels // 16, 128, dtype=dtype, scale=(channels // 16 * 128) ** -0.5)
    bias = randn(channels, dtype=dtype, scale=0.2)
    out = pos.grouped_conv1d_gelu(x, weight.permute(2, 1, 0).contiguous().permute(2, 1, 0), bias, 16)
    check(out, pos.grouped_conv1d_gelu_ref(x, weight, bias, 16),
          pos.grouped_conv1d_gelu_ref(x, weight, bias, 16, compute_dtype=dtype), dtype)


def test_autotune_configs_per_mode(monkeypatch):
    """All configs on a GPU, the first (and the fallback) with AUDIOENC_AUTOTUNE=0, the interpreter's
    own in it."""
    triton = pytest.importorskip("triton")
    from audioenc.kernels.autotune import choose_configs

    tuned = [triton.Config({"BLOCK": 64}, num_warps=4), triton.Config({"BLOCK": 128}, num_warps=8)]
    interpreted = triton.Config({"BLOCK": 512}, num_warps=4)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("AUDIOENC_AUTOTUNE", raising=False)
    assert choose_configs(tuned, interpreted) == tuned
    monkeypatch.setenv("AUDIOENC_AUTOTUNE", "0")
    assert choose_configs(tuned, interpreted) == tuned[:1]
    assert choose_configs(tuned, interpreted, fallback=tuned[1]) == tuned
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_configs(tuned, interpreted) == [interpreted]


@pytest.mark.parametrize("interpret", ["0", "1"])
def test_autotune_setting_other_than_0_or_1_is_an_error(monkeypatch, interpret):
    """AUDIOENC_AUTOTUNE=false (or off, no) autotuned every config, silently."""
    triton = pytest.importorskip("triton")
    from audioenc.kernels.autotune import choose_configs

    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    for value in ("false", "off", "", "2"):
        monkeypatch.setenv("AUDIOENC_AUTOTUNE", value)
        with pytest.raises(ValueError, match=r"AUDIOENC_AUTOTUNE must be 0 .* or 1 .*, got"):
            choose_configs([triton.Config({"BLOCK": 64})], triton.Config({"BLOCK": 512}))


def test_autotuned_choices_are_kept_per_gpu(kernels, monkeypatch):
    """A process on two GPUs (an H100 and an L4) ran the first one's choice on the other, where it may
    not fit in shared memory. Here the fake "small" GPU has no room for BLOCK=64."""
    import triton
    import triton.language as tl

    from audioenc.kernels import autotune

    @autotune.autotune(configs=[triton.Config({"BLOCK": 64}), triton.Config({"BLOCK": 32})], key=["N"])
    @triton.jit
    def write_block(out, N, BLOCK: tl.constexpr):
        tl.store(out + tl.arange(0, 1), tl.full((1,), BLOCK, tl.int32))

    device, timed = ["big"], []
    out = torch.zeros(1, dtype=torch.int32, device=DEVICE)

    def bench(kernel_call, quantiles):  # bigger blocks are faster, where they fit
        kernel_call()
        block = int(out[0])
        timed.append((device[0], block))
        fits = block <= {"big": 64, "small": 32}[device[0]]
        return [1 / block if fits else float("inf")] * 3

    write_block.do_bench = bench
    write_block.cache_results = False  # the disk cache is keyed by the real GPU's architecture
    monkeypatch.setattr(autotune, "device_key", lambda: device[0])
    ran = []
    for device[0] in ("big", "small", "big", "small"):
        write_block[(1,)](out, 1000)
        ran.append(int(out[0]))
    assert ran == [64, 32, 64, 32]
    assert timed == [("big", 64), ("big", 32), ("small", 64), ("small", 32)]  # each tuned once


def test_float32_linear_has_a_config_that_fits_small_gpus(monkeypatch):
    """The triton backend's float32 Linears all run in linear_gelu (IEEE): one config must fit in
    99 KB of shared memory (A10, L4), with AUDIOENC_AUTOTUNE=0 too."""
    pytest.importorskip("triton")
    from audioenc.kernels import linear_gelu

    def float32_shared_memory(config):  # a tile of x and one of the weight per pipeline stage
        blocks = config.kwargs
        return config.num_stages * (blocks["BLOCK_M"] + blocks["BLOCK_N"]) * blocks["BLOCK_K"] * 4

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for autotune in ("1", "0"):
        monkeypatch.setenv("AUDIOENC_AUTOTUNE", autotune)
        assert min(map(float32_shared_memory, linear_gelu._configs())) <= 99 * 1024


def test_float32_attention_at_head_dims_past_64_has_a_config_that_fits_small_gpus(monkeypatch):
    """Head dims 80 and 128 (XLS-R 1B, MMS-1B, HuBERT-xlarge) run in 128-wide blocks: in float32 one
    config must fit in 99 KB of shared memory (A10, L4, RTX 30/40), with AUDIOENC_AUTOTUNE=0 too, or
    every config fails to launch there. The estimate (the query tile, stages - 1 buffers of key and
    value tiles, the logits) is within 512 B of Triton's compile for sm_86 (compile_offline.py)."""
    pytest.importorskip("triton")
    from audioenc.kernels import attention

    def float32_shared_memory(config):
        m, n, d = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], 128
        return 4 * (m * d + (config.num_stages - 1) * 2 * n * d + m * n)

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for autotune in ("1", "0"):
        monkeypatch.setenv("AUDIOENC_AUTOTUNE", autotune)
        assert min(map(float32_shared_memory, attention._configs())) <= 99 * 1024
