"""Attention over packed rows: segments that cannot see each other, and segments that continue
a shared prefix. Both stages train on it: SFT packs documents into rows (sft/packing.py), GRPO
packs each prompt once with its group's completions (grpo/batch.py, `PackedRows`).

A packed row is cut into contiguous segments (FlashAttention's `cu_seqlens`: start offsets in
the flattened [B*L] token axis, then B*L). Inside a segment attention is causal. A segment may
also name an earlier segment of its row as its prefix (`prefix_of[s]`, -1 = none): its queries
then see the whole prefix before their own causal part, as if the prefix had been written in
front of them. That is the mask of a GRPO group computed in one row,

    [ prompt | completion 1 | completion 2 | ... ]    completion i sees the prompt and itself,

and it equals the per-row pass `[prompt, completion i]` token for token, once the completion's
position ids continue from the prompt's.

    "sdpa_varlen"  (registered with transformers here) one SDPA call per segment on views of
                   the row: no [L, L] mask in memory (a prefixed segment's causal mask is
                   `causal_lower_right`, which the fused kernels read without materialising it),
                   and attention work sum(n_s * (p_s + n_s)) rather than L^2. For training
                   forwards: generation has no segments, so a model generates with "sdpa" and
                   switches for its training passes (`attention_implementation`).

`block_causal_mask` is the same masking as a dense [B, 1, L, L] boolean mask, for "sdpa"/"eager"
and for the tests.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.bias import causal_lower_right

VARLEN_ATTENTION = "sdpa_varlen"


def block_causal_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] segment ids -> [B, 1, L, L] bool, True where query i may attend key j:
    same segment and j <= i. Segments are contiguous, so this is block-diagonal causal."""
    L = segment_ids.shape[1]
    causal = torch.ones(L, L, dtype=torch.bool, device=segment_ids.device).tril()  # [L, L]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, L, L]
    return (same & causal)[:, None]  # [B, 1, L, L]


def cu_seqlens(segment_ids: torch.Tensor) -> list[int]:
    """Start offsets of every segment in the flattened [B*L] token axis, then B*L (FlashAttention's
    `cu_seqlens` layout). A new row always starts a new segment."""
    B, L = segment_ids.shape
    starts = torch.ones(B, L, dtype=torch.bool, device=segment_ids.device)  # [B, L]
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return torch.nonzero(starts.flatten()).flatten().tolist() + [B * L]


def prefix_causal_mask(cu_seqlens: Sequence[int], prefix_of: Sequence[int], length: int) -> torch.Tensor:
    """The dense [1, 1, L, L] bool mask of one packed row (B = 1) with prefixes: the oracle of
    `varlen_sdpa_attention` in the tests, and a fallback for "sdpa"/"eager"."""
    allowed = torch.zeros(length, length, dtype=torch.bool)  # [L, L]
    for s, (a, b) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
        allowed[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
        if prefix_of[s] >= 0:
            pa, pb = cu_seqlens[prefix_of[s]], cu_seqlens[prefix_of[s] + 1]
            allowed[a:b, pa:pb] = True
    return allowed[None, None]


# Every SDPA backend but cuDNN's. cuDNN builds an execution plan per new shape, and packed
# documents bring new lengths every step: on an H200 (torch 2.11) its attention took 1.8 ms of
# CPU per call, 500 calls a step, and a packed SFT step of 8 x 4096 tokens ran 2.6 s instead
# of 0.7 s (bench/RESULTS.md, GPU suite). The backward runs the kernel its forward chose.
_VARLEN_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def _row_segments(cu_seqlens: Sequence[int], prefix_of: Sequence[int] | None, B: int, L: int):
    """Per row, its segments as (length, prefix) in order, `prefix` = the index within the row
    of the segment it continues, or None. Raises on a layout the attention cannot mean."""
    if cu_seqlens[0] != 0 or cu_seqlens[-1] != B * L:
        raise ValueError(f"cu_seqlens must run from 0 to B*L = {B * L}, "
                         f"got {cu_seqlens[0]} .. {cu_seqlens[-1]}")
    n = len(cu_seqlens) - 1
    if prefix_of is not None and len(prefix_of) != n:
        raise ValueError(f"prefix_of has {len(prefix_of)} entries for {n} segments")
    rows: list[list[tuple[int, int | None]]] = [[] for _ in range(B)]
    first = [0] * B  # global index of each row's first segment
    for s, (start, end) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
        b = start // L
        if not start < end <= (b + 1) * L:
            raise ValueError(f"cu_seqlens: segment [{start}, {end}) is empty or crosses the end of row {b}")
        if not rows[b]:
            first[b] = s
        p = -1 if prefix_of is None else prefix_of[s]
        if p >= 0 and not (p < s and cu_seqlens[p] // L == b and (prefix_of[p] < 0)):
            raise ValueError(f"prefix_of[{s}] = {p}: a prefix must be an earlier segment of the same row "
                             "that has no prefix itself")
        rows[b].append((end - start, None if p < 0 else p - first[b]))
    return rows


def varlen_sdpa_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    cu_seqlens: Sequence[int] | None = None,
    prefix_of: Sequence[int] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """A transformers attention function: causal attention inside each segment of `cu_seqlens`,
    after the whole of its `prefix_of` segment when it has one (module docstring).

    query [B, H, L, D], key/value [B, H_kv, L, D] -> output [B, L, H, D]. Each segment is one
    `scaled_dot_product_attention` call on its own part of the row (a view; a prefixed segment's
    keys are the prefix's and its own, concatenated), so a token cannot see another segment: there is
    nothing to mask across segments. Within a prefixed segment the causal mask is aligned to the
    bottom right (query j sees the prefix and its own keys 0..j).
    """
    if cu_seqlens is None:
        raise ValueError(
            f"attention {VARLEN_ATTENTION!r} needs cu_seqlens= (packed rows: sft.packing.packed_model_inputs, "
            "grpo.batch.PackedRows); for generation or unpacked batches switch the model to 'sdpa'"
        )
    B, H, L, D = query.shape
    segments = _row_segments(cu_seqlens, prefix_of, B, L)
    gqa = H != key.shape[1]
    # unbind / split rather than slicing or indexing: their backward is one stack / cat, where
    # every slice would add a zero-filled gradient of the whole row (3,000 of them a SmolLM2
    # update step: 0.5 s).
    out = []
    with sdpa_kernel(_VARLEN_BACKENDS):
        for b, (q, k, v) in enumerate(zip(query.unbind(0), key.unbind(0), value.unbind(0))):  # [H, L, D]
            sizes = [n for n, _ in segments[b]]
            qs, ks, vs = q.split(sizes, dim=1), k.split(sizes, dim=1), v.split(sizes, dim=1)  # [H, n, D] each
            parts = []
            for s, (n, p) in enumerate(segments[b]):
                if p is None:
                    o = F.scaled_dot_product_attention(qs[s][None], ks[s][None], vs[s][None], dropout_p=dropout,
                                                       is_causal=True, scale=scaling, enable_gqa=gqa)
                else:
                    k_s = torch.cat([ks[p], ks[s]], dim=1)  # [H_kv, p + n, D]
                    v_s = torch.cat([vs[p], vs[s]], dim=1)
                    # causal, aligned to the bottom right: query j sees keys 0 .. p + j ([n, p + n])
                    mask = causal_lower_right(n, sizes[p] + n)
                    o = F.scaled_dot_product_attention(qs[s][None], k_s[None], v_s[None], attn_mask=mask,
                                                       dropout_p=dropout, scale=scaling, enable_gqa=gqa)
                parts.append(o[0])  # [H, n, D]
            out.append(torch.cat(parts, dim=1))  # [H, L, D]
    return torch.stack(out).transpose(1, 2).contiguous(), None  # [B, L, H, D]


@contextmanager
def attention_implementation(lm: torch.nn.Module, name: str | None) -> Iterator[None]:
    """`lm` attends with `name` inside the block, and as before after it (None: no change)."""
    before = lm.config._attn_implementation
    if name is None or name == before:
        yield
        return
    lm.set_attn_implementation(name)
    try:
        yield
    finally:
        lm.set_attn_implementation(before)


def _register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN_ATTENTION, varlen_sdpa_attention)


_register()
