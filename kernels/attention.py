"""Fused non-causal attention forward (flash-attention style online softmax).

No T x T matrix is ever stored: each program keeps a BLOCK_M x BLOCK_N tile of logits in registers.
Supports a key-padding mask from per-item lengths and WavLM's gated relative position bias, looked
up inside the kernel from a 1-D table over relative distance (O(H * T) memory, not O(B * H * T * T)).

kernel -> launcher (``attention``) -> reference (``attention_ref``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from audioenc.kernels.autotune import autotune, choose_configs
from audioenc.models.wavlm import bias_per_distance

LOG2E = 1.4426950408889634


# (BLOCK_M, BLOCK_N, warps, stages) the autotuner chooses from, the default first
# (benchmarks/sweep_attention.py times each, and others, alone).
TUNED_CONFIGS = [(128, 64, 8, 3), (128, 64, 8, 4), (128, 64, 4, 3), (128, 64, 4, 4), (128, 128, 8, 3), (128, 32, 4, 4),
                 (64, 64, 4, 3), (64, 64, 4, 4), (64, 32, 4, 4), (64, 32, 4, 2)]


def _configs():
    tuned = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in TUNED_CONFIGS]
    # float32 at head dim 128 needs 295 KB of shared memory in the default (H100 and H200: 227 KB);
    # (64, 32, 4, 4) fits there (checked on an H200). Head dims 80 and 128 in float32 on 99 KB GPUs
    # (A10, L4, RTX 30/40: sm_86/89) fit only the last, two stages: 73,984 B compiled for sm_86,
    # where (64, 32, 4, 4) takes 139,520 (benchmarks/compile_offline.py).
    return choose_configs(tuned, interpreted=triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=4),
                          fallback=tuned[-1])


@triton.jit
def _load_tile(ptrs, row_mask, mask_d, MASK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Loads a (rows, BLOCK_D) tile with only the masks it needs: unmasked loads vectorise."""
    if MASK_ROWS:
        if EVEN_D:
            tile = tl.load(ptrs, mask=row_mask[:, None], other=0.0)
        else:
            tile = tl.load(ptrs, mask=row_mask[:, None] & mask_d[None, :], other=0.0)
    else:
        if EVEN_D:
            tile = tl.load(ptrs)
        else:
            tile = tl.load(ptrs, mask=mask_d[None, :], other=0.0)
    return tile


@triton.jit
def _attend_keys(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rel_base, gate, qk_scale,
                 start, end, hi, offs_n, mask_m, mask_d,
                 MASK_N: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, EVEN_D: tl.constexpr,
                 BLOCK_N: tl.constexpr):
    """Online softmax over the key blocks start, start + BLOCK_N, ... < end; MASK_N for the last,
    partial block only, so the steady loop carries no key mask."""
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < hi
        k = _load_tile(k_base + cols[:, None] * stride_kt, mask_n, mask_d, MASK_N, EVEN_D)
        if IEEE:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if HAS_BIAS:
            # relative index key - query, shifted into the table's 0 .. 2T-2 range
            if MASK_N:
                rel = tl.load(rel_base + cols[None, :], mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            else:
                rel = tl.load(rel_base + cols[None, :], mask=mask_m[:, None], other=0.0)
            s = s * qk_scale + gate[:, None] * rel
            scale = 1.0
        else:
            scale = qk_scale  # folded into the exponent below: one FMA per logit
        if MASK_N:
            s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * scale)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s * scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base + cols[:, None] * stride_vt, mask_n, mask_d, MASK_N, EVEN_D)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@autotune(configs=_configs(), key=["HEAD_DIM", "LOG2_T", "LOG2_BH", "HAS_BIAS"])
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Out, Lengths, RelBias, Gate,
    stride_qb, stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ob, stride_ot, stride_oh,
    stride_rh, stride_gb, stride_gh,
    num_heads, seq_len, qk_scale,
    LOG2_T,  # autotune keys only: tune once per power-of-two class of length and of batch x heads
    LOG2_BH,  # (a batch of 1 fills the GPU with fewer, smaller blocks than a batch of 16)
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_LENGTHS: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)  # b * stride_qb passes 2^31 on long batches
    h = pid_bh % num_heads
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < seq_len
    mask_d = offs_d < HEAD_DIM  # head dim 80 runs in a 128-wide block
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D

    # Keys past an item's length are never visited: padded frames cannot reach valid ones.
    hi = seq_len
    if HAS_LENGTHS:
        hi = tl.minimum(tl.load(Lengths + b).to(tl.int32), seq_len)

    q = _load_tile(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qt + offs_d[None, :],
                   mask_m, mask_d, True, EVEN_D)
    k_base = K + b * stride_kb + h * stride_kh + offs_d[None, :]
    v_base = V + b * stride_vb + h * stride_vh + offs_d[None, :]
    gate = None
    rel_base = None
    if HAS_BIAS:
        # Gate per (item, head, query frame), in log2 units like the scaled logits.
        gate = tl.load(Gate + b * stride_gb + h * stride_gh + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
        rel_base = RelBias + h * stride_rh + (seq_len - 1) - offs_m[:, None]

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    full = (hi // BLOCK_N) * BLOCK_N
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rel_base, gate, qk_scale,
                                 0, full, hi, offs_n, mask_m, mask_d, False, HAS_BIAS, IEEE, EVEN_D, BLOCK_N)
    acc, l_i, m_i = _attend_keys(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_vt, rel_base, gate, qk_scale,
                                 full, hi, hi, offs_n, mask_m, mask_d, True, HAS_BIAS, IEEE, EVEN_D, BLOCK_N)
    # An item of length 0 has no keys: its rows are 0 rather than NaN.
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    o_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, acc.to(Out.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None,
              rel_bias: torch.Tensor | None = None, gate: torch.Tensor | None = None,
              sm_scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * sm_scale + gate * rel_bias + key mask) v, per item and head.

    q, k, v: (B, T, H, D), any strides with a contiguous last dim (views of a fused QKV projection
    work); D <= 128. lengths: (B,) valid keys per item (keys at or past it get weight 0).
    rel_bias: (H, 2T - 1) float32, the bias of relative distance key - query, indexed by
    key - query + T - 1; gate: (B, H, T) float32 per query frame; both or neither.
    sm_scale: default D ** -0.5. Returns (B, T, H, D) contiguous, in q's dtype.
    """
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v must have the same (B, T, H, D) shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype of float16, bfloat16, float32; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.device != k.device or q.device != v.device:
        raise ValueError("q, k, v must be on one device")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("q, k, v must be contiguous in the head dimension")
    batch, seq_len, num_heads, head_dim = q.shape
    if not 1 <= head_dim <= 128:
        raise ValueError(f"head dim must be between 1 and 128, got {head_dim}")
    if lengths is not None and (lengths.shape != (batch,) or lengths.device != q.device
                                or lengths.dtype not in (torch.int32, torch.int64)):
        raise ValueError(f"lengths must be an int32/int64 tensor of shape ({batch},) on {q.device}")
    if (rel_bias is None) != (gate is None):
        raise ValueError("rel_bias and gate go together: pass both or neither")
    if rel_bias is not None:
        if rel_bias.shape != (num_heads, 2 * seq_len - 1) or rel_bias.dtype != torch.float32:
            raise ValueError(f"rel_bias must be float32 of shape ({num_heads}, {2 * seq_len - 1}), "
                             f"got {rel_bias.dtype} {tuple(rel_bias.shape)}")
        if gate.shape != (batch, num_heads, seq_len) or gate.dtype != torch.float32:
            raise ValueError(f"gate must be float32 of shape ({batch}, {num_heads}, {seq_len}), "
                             f"got {gate.dtype} {tuple(gate.shape)}")
        if (rel_bias.stride(1) != 1 and seq_len > 1) or (gate.stride(2) != 1 and seq_len > 1):
            raise ValueError("rel_bias and gate must be contiguous in their last dimension")
        if rel_bias.device != q.device or gate.device != q.device:
            raise ValueError("rel_bias and gate must be on q's device")
    if lengths is not None:
        lengths = lengths.contiguous()  # the kernel reads lengths[b] at Lengths + b
    sm_scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    out = torch.empty((batch, seq_len, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if seq_len == 0 or batch == 0:
        return out
    has_bias = rel_bias is not None
    dummy = out  # never read: the HAS_* flags compile the loads out
    grid = lambda meta: (triton.cdiv(seq_len, meta["BLOCK_M"]), batch * num_heads)
    _attention_fwd_kernel[grid](
        q, k, v, out, lengths if lengths is not None else dummy,
        rel_bias if has_bias else dummy, gate if has_bias else dummy,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        rel_bias.stride(0) if has_bias else 0, gate.stride(0) if has_bias else 0, gate.stride(1) if has_bias else 0,
        num_heads, seq_len, sm_scale * LOG2E, max(seq_len - 1, 1).bit_length(), (batch * num_heads).bit_length(),
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
        HAS_LENGTHS=lengths is not None, HAS_BIAS=has_bias, IEEE=q.dtype == torch.float32,
    )
    return out


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor | None = None,
                  rel_bias: torch.Tensor | None = None, gate: torch.Tensor | None = None,
                  sm_scale: float | None = None, compute_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The same attention with the full (B, H, T, T) matrix, computed in ``compute_dtype``
    (float32: the truth; the inputs' half dtype: the naive low-precision error the tests scale by)."""
    batch, seq_len, num_heads, head_dim = q.shape
    sm_scale = head_dim ** -0.5 if sm_scale is None else sm_scale
    qh, kh, vh = (x.to(compute_dtype).transpose(1, 2) for x in (q, k, v))
    logits = (qh @ kh.transpose(-1, -2)) * sm_scale
    if rel_bias is not None:
        pos = torch.arange(seq_len, device=q.device)
        table = rel_bias[:, pos[None, :] - pos[:, None] + seq_len - 1]           # (H, T, T)
        logits = logits + (gate[..., None] * table[None]).to(compute_dtype)
    if lengths is not None:
        valid = torch.arange(seq_len, device=q.device)[None, :] < lengths[:, None]
        logits = logits.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1).to(compute_dtype)
    out = torch.nan_to_num(probs) @ vh  # an item of length 0 gives 0, as the kernel does
    return out.transpose(1, 2).to(q.dtype).contiguous()


def relative_bias_table(embedding: torch.Tensor, seq_len: int, num_buckets: int, max_distance: int) -> torch.Tensor:
    """WavLM's bucketed bias over relative distance key - query = -(T-1) .. T-1: (H, 2T - 1) float32.

    embedding: the (num_buckets, H) weight of layer 0's rel_attn_embed.
    """
    table = bias_per_distance(embedding.float(), num_buckets, max_distance)
    relative = torch.arange(-(seq_len - 1), seq_len, device=embedding.device)
    return table[relative.clamp(-max_distance, max_distance) + max_distance].t().contiguous()
