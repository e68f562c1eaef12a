"""The Triton kernel of `kernels/decode_attention.py` (its module docstring has the math).

One program per (row, KV head): its G query heads, padded to at least 16 rows, are the left
operand of `tl.dot` against a block of BLOCK_N keys; the running max `m`, denominator `l` and
output `acc` are updated per block as in FlashAttention's online softmax, and the loop runs from
the row's `start` to its `end`, both read from device memory. Probabilities enter the second
product in the values' dtype (bf16 on a GPU, as FlashAttention does), accumulated in float32.
float32 operands use full-precision products (`input_precision="ieee"`, not TF32). Under
autocast the cache holds float32 keys (RoPE's float32 tables promote them) and bf16 values,
as Hugging Face's own cache does: each product takes its operands' dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, start_ptr, end_ptr,
                             stride_qb, stride_qh, stride_kb, stride_kh, stride_kc,
                             stride_vb, stride_vh, stride_vc, stride_ob, stride_oh,
                             scale, G, D, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                             BLOCK_N: tl.constexpr, IEEE_QK: tl.constexpr, IEEE_PV: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    kv = tl.program_id(1).to(tl.int64)
    gs = tl.arange(0, BLOCK_G)
    ds = tl.arange(0, BLOCK_D)
    ns = tl.arange(0, BLOCK_N)
    g_ok = gs < G
    d_ok = ds < D
    heads = kv * G + gs  # [BLOCK_G] query heads of this KV head
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + ds[None, :],
                mask=g_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    start = tl.load(start_ptr + b)
    end = tl.load(end_ptr + b)
    k_row = k_ptr + b * stride_kb + kv * stride_kh
    v_row = v_ptr + b * stride_vb + kv * stride_vh
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)  # running max of the scores
    l_sum = tl.zeros([BLOCK_G], tl.float32)  # running sum of exp(score - m)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)  # running sum of exp(score - m) v
    for n0 in range(start, end, BLOCK_N):
        offs = n0 + ns
        n_ok = offs < end
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_row + offs[:, None] * stride_kc + ds[None, :], mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        k = k.to(q.dtype)  # no-op unless the cache's dtype differs from the query's
        if IEEE_QK:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(n_ok[None, :], s * scale, float("-inf"))  # [BLOCK_G, BLOCK_N]
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite from the first block: it holds a live key
        alpha = tl.exp(m - m_new)
        p = tl.exp(s - m_new[:, None])
        l_sum = l_sum * alpha + tl.sum(p, axis=1)
        v = tl.load(v_row + offs[:, None] * stride_vc + ds[None, :], mask=kv_mask, other=0.0)
        if IEEE_PV:
            pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m = m_new
    out = acc / l_sum[:, None]
    tl.store(o_ptr + b * stride_ob + heads[:, None] * stride_oh + ds[None, :],
             out.to(o_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


def triton_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor,
                            end: torch.Tensor, scale: float, block_n: int = 64) -> torch.Tensor:
    b, h, d = q.shape
    h_kv = keys.shape[1]
    if h % h_kv or q.stride(-1) != 1 or keys.stride(-1) != 1 or values.stride(-1) != 1:
        raise ValueError(f"decode_attention: {h} query heads over {h_kv} KV heads, with the head "
                         f"dimension contiguous (strides {q.stride()}, {keys.stride()}, {values.stride()})")
    g = h // h_kv
    start, end = start.contiguous(), end.contiguous()  # read as start_ptr + row
    out = torch.empty_like(q)
    block_g = max(16, triton.next_power_of_2(g))
    block_d = max(16, triton.next_power_of_2(d))
    _decode_attention_kernel[(b, h_kv)](
        q, keys, values, out, start, end,
        q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), keys.stride(2),
        values.stride(0), values.stride(1), values.stride(2), out.stride(0), out.stride(1),
        scale, g, d, BLOCK_G=block_g, BLOCK_D=block_d, BLOCK_N=block_n,
        IEEE_QK=q.dtype == torch.float32, IEEE_PV=values.dtype == torch.float32)
    return out
