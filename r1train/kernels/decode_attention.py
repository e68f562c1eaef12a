"""Attention for one decode step: each row's one query against the live part of its KV cache.

A decode step's attention is softmax(q K^T / sqrt(D)) V for one query per row and head, over the
keys this row has written. Two things make the generic path slow there, and this op avoids both:

  * grouped KV heads (Qwen2.5-0.5B: 14 query heads share 2 KV heads) are read as they are
    stored, G = H / H_kv query heads per KV head, instead of `repeat_interleave`-ing the cache to
    H heads before every step;
  * only each row's live keys are read: positions [start, end) of a static cache whose capacity
    is the whole generation's (prompt padding before `start`, unwritten positions after `end`),
    rather than the whole capacity under a mask.

    decode_attention(q, keys, values, start, end, scale)
        q [B, H, D], keys / values [B, H_kv, C, D], start / end [B] -> [B, H, D]

One entry point, two implementations: on CUDA tensors (or CPU tensors under TRITON_INTERPRET=1) a
Triton kernel with one program per (row, KV head) that sweeps the live keys in blocks with an
online softmax (Milakov & Gimelshein 2018), its G query heads as the rows of a `tl.dot`; elsewhere
`eager_decode_attention`, the same sum written over the whole capacity with masked positions
at -inf (exact zeros after the softmax), which is also the kernel's oracle in the tests. Both
accumulate in float32 (float64 inputs: float64, in the eager one). The kernel reads `start` and
`end` from device memory, so a step captured in a CUDA graph takes each step's lengths without a
host sync.
No split over the key axis (flash-decoding): at 64 rows a step already has 64 x H_kv programs.
"""
from __future__ import annotations

import os

import torch


def eager_decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor,
                           end: torch.Tensor, scale: float) -> torch.Tensor:
    """The reference: the whole capacity, positions outside [start, end) masked to -inf."""
    b, h, d = q.shape
    h_kv, c = keys.shape[1], keys.shape[2]
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.reshape(b, h_kv, h // h_kv, d).to(acc)  # [B, H_kv, G, D]: query heads of one KV head together
    scores = torch.einsum("bkgd,bkcd->bkgc", qg, keys.to(acc)) * scale  # [B, H_kv, G, C]
    pos = torch.arange(c, device=q.device)  # [C]
    live = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])  # [B, C]
    scores = scores.masked_fill(~live[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)  # [B, H_kv, G, C]
    out = torch.einsum("bkgc,bkcd->bkgd", probs, values.to(acc))  # [B, H_kv, G, D]
    return out.reshape(b, h, d).to(q.dtype)


@torch.library.custom_op("r1train::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: torch.Tensor,
                     end: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, H, D] attention output of one query per row (module docstring). Requires
    0 <= start < end <= C for every row: a row attends to at least its own new key.

    A PyTorch custom operator: torch.compile keeps it as one opaque node of the graph (the
    kernel launch is not traced; a CUDA graph captures it like any kernel), whichever of the
    two implementations runs."""
    if q.is_cuda or (q.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
                     and {q.dtype, keys.dtype, values.dtype} == {torch.float32}):  # the interpreter: float32 only
        from r1train.kernels.triton_decode_attention import triton_decode_attention
        from r1train.kernels.triton_logprobs import INTERPRETED  # whether the interpreter runs the kernels
        if q.is_cuda or INTERPRETED:
            return triton_decode_attention(q, keys, values, start, end, scale)
    return eager_decode_attention(q, keys, values, start, end, scale)  # a new tensor, never a view


@decode_attention.register_fake
def _(q, keys, values, start, end, scale):
    return torch.empty_like(q)  # what the op returns, for tracing: [B, H, D] in q's dtype
