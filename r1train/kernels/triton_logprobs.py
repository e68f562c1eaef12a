"""Triton kernels for per-token log-probs and entropies; math in `kernels/logprobs.py`.

Two kernel families, both in float32 whatever the input dtype:
  * given logits [N, V]: one program per row sweeps the vocabulary in blocks with an online
    max / log-sum-exp (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax");
    the backward recomputes p = exp(w - log_s) from the saved row statistics.
  * fused with the LM head: programs tile tokens x vocabulary, compute x = h W^T with
    `tl.dot` and float32 accumulation, and keep the same online statistics per token over
    their slice of the vocabulary; the slices' partial (max, sum, sum e w) are merged on the
    host side ([splits, N] floats, never [N, V]). The target's own logit h . W[y] is a
    float32 dot product per token, taken once outside the vocabulary loop (exact products of
    16-bit inputs, as the tiles have; float32 inputs under TF32 get it in full precision). The
    backward recomputes logits chunk by chunk, writes d loss / d logits for the chunk (each
    token's own upstream gradient applied) and hands the two reductions grad_hidden = dx W and
    grad_weight += dx^T h to cuBLAS; the only [*, V] buffer is that chunk's gradient.

CPU tensors run through Triton's interpreter only when TRITON_INTERPRET=1 is set before
`triton` is imported: triton 3.x reads the variable when `@triton.jit` wraps a function, and
`triton.language`'s own helpers (tl.sum, tl.max, tl.zeros) are wrapped when it is imported, so
setting the variable later leaves compiled-mode helpers the interpreter cannot call.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

# Working memory for the [chunk, V] logit gradient of the fused backward on a GPU; 1 GiB is
# ~3.5k tokens of a 152k vocabulary in bf16, enough for cuBLAS to run the reductions at speed.
BACKWARD_CHUNK_BYTES = 2**30
_SUPPORTED = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _token_fwd_kernel(x_ptr, stride_x, y_ptr, logp_ptr, x_max_ptr, log_s_ptr, mean_w_ptr, V,
                      inv_t, BLOCK_V: tl.constexpr, RETURN_ENTROPY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride exceeds 2^31 for long batches
    x_row = x_ptr + row * stride_x
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)  # running max of the raw logits x
    s = tl.zeros([], tl.float32)  # running sum_j exp(w_j), w_j = (x_j - m) / T
    t = tl.zeros([], tl.float32)  # running sum_j exp(w_j) w_j, for the entropy
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + cols
        mask = offs < V
        # the tail is -inf so that it adds exp(-inf) = 0 to the sums
        x = tl.load(x_row + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        w = (x - m_new) * inv_t
        e = tl.exp(w)
        shift = (m - m_new) * inv_t  # -inf on the first block, where s = t = 0
        alpha = tl.exp(shift)
        if RETURN_ENTROPY:
            # moving the reference from m to m_new turns each old w into w + shift; before s
            # is updated, as the old terms need the old s
            t = alpha * (t + tl.where(s > 0, shift, 0.0) * s) \
                + tl.sum(e * tl.where(mask, w, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    log_s = tl.log(s)
    x_y = tl.load(x_row + tl.load(y_ptr + row)).to(tl.float32)
    tl.store(logp_ptr + row, (x_y - m) * inv_t - log_s)
    tl.store(x_max_ptr + row, m)
    tl.store(log_s_ptr + row, log_s)
    if RETURN_ENTROPY:
        tl.store(mean_w_ptr + row, t / s)


@triton.jit
def _token_bwd_kernel(x_ptr, stride_x, y_ptr, x_max_ptr, log_s_ptr, mean_w_ptr, g_logp_ptr,
                      g_ent_ptr, dx_ptr, stride_dx, V, inv_t,
                      BLOCK_V: tl.constexpr, HAS_ENTROPY: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    dx_row = dx_ptr + row * stride_dx
    cols = tl.arange(0, BLOCK_V)
    x_max = tl.load(x_max_ptr + row)
    log_s = tl.load(log_s_ptr + row)
    g_lp = tl.load(g_logp_ptr + row)
    y = tl.load(y_ptr + row)
    if HAS_ENTROPY:
        mean_w = tl.load(mean_w_ptr + row)
        g_ent = tl.load(g_ent_ptr + row)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + cols
        mask = offs < V
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.where(mask, (x - x_max) * inv_t, 0.0)  # the tail is never stored
        p = tl.exp(w - log_s)
        dw = g_lp * (tl.where(offs == y, 1.0, 0.0) - p)  # d logp_y / dz
        if HAS_ENTROPY:
            dw -= g_ent * p * (w - mean_w)  # dH/dz_j = -p_j (z_j - sum p z), shift-free
        tl.store(dx_row + offs, (dw * inv_t).to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _logits_tile(h_ptr, stride_h, w_ptr, stride_w, rows64, row_mask, cols64, col_mask, H,
                 BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """x = h W^T for one [BLOCK_N, BLOCK_V] tile, float32 accumulation over H in BLOCK_K steps."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.full([BLOCK_N, BLOCK_V], 0.0, tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + ks
        k_mask = k < H
        a = tl.load(h_ptr + rows64[:, None] * stride_h + k[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BN, BK]
        b = tl.load(w_ptr + cols64[None, :] * stride_w + k[:, None],
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)  # [BK, BV] = W^T
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit(do_not_specialize=["N", "v_per_split"])  # one compile for every batch size
def _linear_fwd_kernel(h_ptr, stride_h, w_ptr, stride_w, y_ptr, part_m_ptr, part_s_ptr,
                       part_t_ptr, x_y_ptr, N, V, H, v_per_split, inv_t,
                       BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                       RETURN_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)  # as in _token_fwd_kernel, per row
    s = tl.full([BLOCK_N], 0.0, tl.float32)
    t = tl.full([BLOCK_N], 0.0, tl.float32)
    v_lo = split * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_hi
        cols64 = cols.to(tl.int64)
        acc = _logits_tile(h_ptr, stride_h, w_ptr, stride_w, rows64, row_mask, cols64, col_mask,
                           H, BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
        x = tl.where(col_mask[None, :], acc, float("-inf"))  # [BN, BV] raw logits
        m_new = tl.maximum(m, tl.max(x, axis=1))
        w = (x - m_new[:, None]) * inv_t
        e = tl.exp(w)
        shift = (m - m_new) * inv_t
        alpha = tl.exp(shift)
        if RETURN_ENTROPY:
            t = alpha * (t + tl.where(s > 0, shift, 0.0) * s) \
                + tl.sum(e * tl.where(col_mask[None, :], w, 0.0), axis=1)
        s = s * alpha + tl.sum(e, axis=1)
        m = m_new
    part = split.to(tl.int64) * N + rows64
    tl.store(part_m_ptr + part, m, mask=row_mask)
    tl.store(part_s_ptr + part, s, mask=row_mask)
    if RETURN_ENTROPY:
        tl.store(part_t_ptr + part, t, mask=row_mask)
    if split == 0:
        # The target's logit x_y = h . W[y], once per token, out of the vocabulary loop: picking
        # it out of every tile costs a compare and a reduction per logit.
        y = tl.load(y_ptr + rows64, mask=row_mask, other=0).to(tl.int64)
        ks = tl.arange(0, BLOCK_K)
        x_y = tl.zeros([BLOCK_N], tl.float32)
        for k0 in range(0, H, BLOCK_K):
            k = k0 + ks
            both = row_mask[:, None] & (k < H)[None, :]
            a = tl.load(h_ptr + rows64[:, None] * stride_h + k[None, :], mask=both, other=0.0)
            b = tl.load(w_ptr + y[:, None] * stride_w + k[None, :], mask=both, other=0.0)
            x_y += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)  # [BN]
        tl.store(x_y_ptr + rows64, x_y, mask=row_mask)


@triton.jit(do_not_specialize=["N"])
def _linear_dz_kernel(h_ptr, stride_h, w_ptr, stride_w, y_ptr, x_max_ptr, log_s_ptr,
                      mean_w_ptr, g_logp_ptr, g_ent_ptr, dx_ptr, stride_dx, N, V, H,
                      inv_t, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
                      BLOCK_K: tl.constexpr, HAS_ENTROPY: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    # program_id(0) walks the token tiles first, so programs running together share a
    # weight tile in L2
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask, col_mask = rows < N, cols < V
    rows64, cols64 = rows.to(tl.int64), cols.to(tl.int64)
    acc = _logits_tile(h_ptr, stride_h, w_ptr, stride_w, rows64, row_mask, cols64, col_mask, H,
                       BLOCK_N, BLOCK_V, BLOCK_K, DOT_PRECISION)
    x_max = tl.load(x_max_ptr + rows64, mask=row_mask, other=0.0)
    log_s = tl.load(log_s_ptr + rows64, mask=row_mask, other=0.0)
    g_lp = tl.load(g_logp_ptr + rows64, mask=row_mask, other=0.0)
    y = tl.load(y_ptr + rows64, mask=row_mask, other=-1)
    w = tl.where(col_mask[None, :], (acc - x_max[:, None]) * inv_t, 0.0)  # [BN, BV]
    p = tl.exp(w - log_s[:, None])
    dw = g_lp[:, None] * (tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - p)
    if HAS_ENTROPY:
        mean_w = tl.load(mean_w_ptr + rows64, mask=row_mask, other=0.0)
        g_ent = tl.load(g_ent_ptr + rows64, mask=row_mask, other=0.0)
        dw -= g_ent[:, None] * p * (w - mean_w[:, None])
    tl.store(dx_ptr + rows64[:, None] * stride_dx + cols64[None, :],
             (dw * inv_t).to(dx_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


# Whether Triton's interpreter runs our kernels: both they and triton.language's own helpers
# must have been wrapped in interpreter mode (a variable set between the two imports is not).
INTERPRETED = not isinstance(_token_fwd_kernel, JITFunction) \
    and not isinstance(tl.sum, JITFunction)


def _check_device(name: str, t: torch.Tensor) -> None:
    if t.is_cuda or (INTERPRETED and t.device.type == "cpu"):
        return
    raise ValueError(f"{name}: the Triton path needs CUDA tensors, or CPU tensors with "
                     f"TRITON_INTERPRET=1 set before triton is imported; got {t.device} "
                     f"(interpreter {'on' if INTERPRETED else 'off'})")


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _SUPPORTED:
        raise ValueError(f"{name}: the Triton path takes float16/bfloat16/float32, got "
                         f"{t.dtype}; use impl='torch' for other dtypes")


def _dot_precision(dtype: torch.dtype) -> str:
    # float32 inputs follow torch's own matmul setting; 16-bit inputs ignore this
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch_opts(device: torch.device, num_warps: int, num_stages: int = 3) -> dict:
    return {"num_warps": num_warps, "num_stages": num_stages} if device.type == "cuda" else {}


# ----------------------------------------------------------------------------------------
# given logits
# ----------------------------------------------------------------------------------------
# Per-row statistics saved for backward, all float32 [N]: x_max, the row's largest raw logit;
# log_s = log sum_j exp(w_j) and mean_w = sum_j p_j w_j with w_j = (x_j - x_max) / T. Working
# relative to x_max keeps float32 exact where it matters: x_j - x_max is exact for nearby
# logits, whereas x_j / T alone would already round by ~1e-5 at logits of ~100. Then
# log p_y = w_y - log_s and H = log_s - mean_w.
def _token_forward(x, y, temperature, return_entropy, block_v):
    N, V = x.shape
    logps = torch.empty(N, dtype=torch.float32, device=x.device)  # [N]
    x_max, log_s = torch.empty_like(logps), torch.empty_like(logps)  # [N], [N]
    mean_w = torch.empty_like(logps) if return_entropy else None  # [N]
    if N > 0:
        _token_fwd_kernel[(N,)](
            x, x.stride(0), y, logps, x_max, log_s, log_s if mean_w is None else mean_w, V,
            1.0 / temperature, BLOCK_V=block_v, RETURN_ENTROPY=return_entropy,
            **_launch_opts(x.device, 8))
    return logps, (x_max, log_s, mean_w)


def _outputs(logps, stats, return_entropy):
    _, log_s, mean_w = stats
    return (logps, log_s - mean_w) if return_entropy else logps  # H = log_s - sum p w


class _TritonTokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, temperature, return_entropy, block_v):
        logps, stats = _token_forward(x, y, temperature, return_entropy, block_v)
        ctx.save_for_backward(x, y, *stats)
        ctx.temperature, ctx.block_v = temperature, block_v
        return _outputs(logps, stats, return_entropy)

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy=None):
        x, y, x_max, log_s, mean_w = ctx.saved_tensors
        N, V = x.shape
        grad_x = torch.empty_like(x)  # [N, V]
        g_lp = grad_logps.float().contiguous()  # a .sum() upstream hands an expanded tensor
        g_ent = g_lp if grad_entropy is None else grad_entropy.float().contiguous()
        if N > 0:
            _token_bwd_kernel[(N,)](
                x, x.stride(0), y, x_max, log_s, log_s if mean_w is None else mean_w, g_lp,
                g_ent, grad_x, grad_x.stride(0), V, 1.0 / ctx.temperature,
                BLOCK_V=ctx.block_v, HAS_ENTROPY=grad_entropy is not None,
                **_launch_opts(x.device, 8))
        return grad_x, None, None, None, None


def triton_token_logprobs(logits, targets, temperature=1.0, return_entropy=False,
                          block_v: int | None = None):
    """Triton path of `token_logprobs`: logits [N, V], targets [N] int64 (validated)."""
    _check_dtype("logits", logits)
    _check_device("logits", logits)
    x = _row_major(logits)
    block_v = block_v or min(4096, triton.next_power_of_2(x.shape[1]))
    if torch.is_grad_enabled() and x.requires_grad:
        return _TritonTokenLogprobs.apply(x, targets, temperature, return_entropy, block_v)
    logps, stats = _token_forward(x.detach(), targets, temperature, return_entropy, block_v)
    return _outputs(logps, stats, return_entropy)


# ----------------------------------------------------------------------------------------
# fused with the LM head
# ----------------------------------------------------------------------------------------
class Tiles(NamedTuple):
    """Launch shape of the fused kernels: a [block_n tokens, block_v words] logit tile, built
    from block_k-deep slices of H, with the warps and software-pipeline stages of one program."""
    block_n: int
    block_v: int
    block_k: int
    num_warps: int = 8
    num_stages: int = 3


# Default launch shapes by input width and kernel, from bench/gpu_suite.py's sweep on an H200
# (N=16384, H=896, V=151,936, bf16; bench/RESULTS.md): 128 x 256 x 64 tiles with 8 warps and 3
# stages ran the forward in 8.9 ms (0.67 of a cuBLAS matmul's rate), the 128 x 128 x 64 tile
# in 11.4 ms. Their staged tiles take 144 KiB of shared memory; GPUs with less (consumer
# cards have ~100 KiB) step down to the next shape of _SMALLER that fits. float32 tiles are
# twice as wide per element, so they take half the rows and half the K depth (not tuned).
TILES = {
    (16, "forward"): Tiles(128, 256, 64, 8, 3),
    (16, "backward"): Tiles(128, 256, 64, 8, 3),
    (32, "forward"): Tiles(64, 128, 32),
    (32, "backward"): Tiles(64, 128, 32),
}
_SMALLER = (Tiles(128, 128, 64, 8, 3), Tiles(64, 128, 32, 4, 2))


def _shared_bytes(t: Tiles, elem_bytes: int) -> int:
    """Shared memory of the staged [BN, BK] and [BK, BV] operand tiles: what limits a shape."""
    return t.num_stages * (t.block_n * t.block_k + t.block_k * t.block_v) * elem_bytes


def _max_shared(device: torch.device) -> int | None:
    try:
        from triton.runtime import driver
        return int(driver.active.utils.get_device_properties(device.index or 0)["max_shared_mem"])
    except Exception:  # an old triton, or the interpreter: launch as asked
        return None


def _tiles(dtype: torch.dtype, backward: bool, device: torch.device | None = None) -> Tiles:
    t = TILES[(32 if dtype == torch.float32 else 16, "backward" if backward else "forward")]
    limit = _max_shared(device) if device is not None and device.type == "cuda" else None
    if limit is None:
        return t
    esize = torch.empty(0, dtype=dtype).element_size()
    return next((c for c in (t, *_SMALLER) if _shared_bytes(c, esize) <= limit), _SMALLER[-1])


def _linear_forward(h, w, y, temperature, return_entropy, tiles: Tiles, num_splits):
    N, H = h.shape
    V = w.shape[0]
    BN, BV, BK = tiles[:3]
    n_tiles, v_tiles = triton.cdiv(N, BN), triton.cdiv(V, BV)
    if num_splits is None:
        # enough programs to fill the GPU a few times over; each split is a vocabulary slice
        sms = torch.cuda.get_device_properties(h.device).multi_processor_count \
            if h.is_cuda else 1
        num_splits = min(v_tiles, max(1, triton.cdiv(4 * sms, n_tiles)))
    v_per_split = triton.cdiv(v_tiles, num_splits) * BV  # whole tiles: one split per target
    num_splits = triton.cdiv(V, v_per_split)
    part_m = torch.empty(num_splits, N, dtype=torch.float32, device=h.device)  # [S, N]
    part_s = torch.empty_like(part_m)  # [S, N]
    part_t = torch.empty_like(part_m) if return_entropy else part_s  # [S, N]
    x_y = torch.empty(N, dtype=torch.float32, device=h.device)  # [N], by the split-0 programs
    if N > 0:
        _linear_fwd_kernel[(n_tiles, num_splits)](
            h, h.stride(0), w, w.stride(0), y, part_m, part_s, part_t, x_y,
            N, V, H, v_per_split, 1.0 / temperature,
            BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=BK, RETURN_ENTROPY=return_entropy,
            DOT_PRECISION=_dot_precision(h.dtype),
            **_launch_opts(h.device, tiles.num_warps, tiles.num_stages))
    # merge the slices, each summed relative to its own max m_k, onto x_max = max_k m_k:
    # s = sum_k a_k s_k and t = sum_k a_k (t_k + d_k s_k), a_k = exp(d_k), d_k = (m_k - x_max)/T
    x_max = part_m.max(0).values  # [N]
    d = (part_m - x_max) / temperature  # [S, N]
    a = torch.exp(d)  # [S, N]
    s = (a * part_s).sum(0)  # [N]
    log_s = torch.log(s)  # [N]
    mean_w = (a * (part_t + d * part_s)).sum(0) / s if return_entropy else None  # [N]
    logps = (x_y - x_max) / temperature - log_s  # [N]
    return logps, (x_max, log_s, mean_w)


class _TritonLinearLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, y, temperature, return_entropy, tiles, bwd_tiles, num_splits,
                rows_per_chunk):
        logps, stats = _linear_forward(h, w, y, temperature, return_entropy, tiles, num_splits)
        ctx.save_for_backward(h, w, y, *stats)
        ctx.temperature, ctx.tiles, ctx.rows_per_chunk = temperature, bwd_tiles, rows_per_chunk
        return _outputs(logps, stats, return_entropy)

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy=None):
        h, w, y, x_max, log_s, mean_w = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        N, H = h.shape
        V = w.shape[0]
        tiles = ctx.tiles
        BN, BV, BK = tiles[:3]
        has_ent = grad_entropy is not None
        g_lp = grad_logps.float().contiguous()  # [N]
        g_ent = grad_entropy.float().contiguous() if has_ent else g_lp  # [N]
        mean_w = log_s if mean_w is None else mean_w  # dummy pointer when HAS_ENTROPY is off
        C = ctx.rows_per_chunk or max(BN, BACKWARD_CHUNK_BYTES // (V * h.element_size())
                                      // BN * BN)
        grad_h = torch.empty_like(h) if need_h else None  # [N, H]
        # accumulated in the weight's dtype: cuBLAS adds each chunk in float32 and rounds once
        # per chunk, a handful of roundings, against 2x the weight's memory for a float32 copy
        grad_w = torch.zeros_like(w) if need_w else None  # [V, H]
        dx = torch.empty(min(C, N), V, dtype=h.dtype, device=h.device)  # [C, V], reused
        for c0 in range(0, N, C):
            c1 = min(c0 + C, N)
            dx_c = dx[: c1 - c0]
            _linear_dz_kernel[(triton.cdiv(c1 - c0, BN), triton.cdiv(V, BV))](
                h[c0:c1], h.stride(0), w, w.stride(0), y[c0:c1], x_max[c0:c1], log_s[c0:c1],
                mean_w[c0:c1], g_lp[c0:c1], g_ent[c0:c1], dx_c, dx_c.stride(0), c1 - c0, V,
                H, 1.0 / ctx.temperature, BLOCK_N=BN, BLOCK_V=BV, BLOCK_K=BK, HAS_ENTROPY=has_ent,
                DOT_PRECISION=_dot_precision(h.dtype),
                **_launch_opts(h.device, tiles.num_warps, tiles.num_stages))
            if need_h:
                torch.mm(dx_c, w, out=grad_h[c0:c1])  # [C, H]
            if need_w:
                grad_w.addmm_(dx_c.T, h[c0:c1])  # [V, H]
        return grad_h, grad_w, None, None, None, None, None, None, None


def triton_linear_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False,
                           blocks: tuple[int, ...] | None = None,
                           num_splits: int | None = None, rows_per_chunk: int | None = None):
    """Triton path of `fused_linear_logprobs`: hidden [N, H], weight [V, H], targets [N].

    `blocks` (BLOCK_N, BLOCK_V, BLOCK_K[, num_warps, num_stages]: a `Tiles`) for both kernels,
    `num_splits` (vocabulary slices per token tile) and `rows_per_chunk` (tokens per backward
    chunk) override the GPU defaults, for tests and tuning.
    """
    _check_dtype("hidden", hidden)
    _check_device("hidden", hidden)
    h, w = _row_major(hidden), _row_major(weight)
    fwd_tiles = Tiles(*blocks) if blocks else _tiles(h.dtype, backward=False, device=h.device)
    bwd_tiles = Tiles(*blocks) if blocks else _tiles(h.dtype, backward=True, device=h.device)
    if torch.is_grad_enabled() and (h.requires_grad or w.requires_grad):
        return _TritonLinearLogprobs.apply(h, w, targets, temperature, return_entropy,
                                           fwd_tiles, bwd_tiles, num_splits, rows_per_chunk)
    # old-policy / reference log-probs: nothing is kept for a backward that never comes
    logps, stats = _linear_forward(h.detach(), w.detach(), targets, temperature,
                                   return_entropy, fwd_tiles, num_splits)
    return _outputs(logps, stats, return_entropy)
