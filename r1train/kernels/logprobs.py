"""Per-token log-probabilities (and entropies) without materializing `[tokens, vocab]`.

Every GRPO step needs log pi(y_t | y_<t) three times (policy, old policy, reference) and SFT
once. With z = (h W^T) / T the temperature-scaled logits of a token and y its target:

    log p_y = z_y - lse(z),            lse(z) = log sum_j exp(z_j)
    H       = -sum_j p_j log p_j = lse(z) - sum_j p_j z_j          (token entropy)

and the gradients with respect to the raw logits x = T z (what the backward passes use):

    d log p_y / d x_j = (1[j = y] - p_j) / T
    d H       / d x_j = -p_j (z_j - sum_k p_k z_k) / T

Differentiating H: dH/dz_j = dlse/dz_j - p_j - sum_k z_k dp_k/dz_j with dlse/dz_j = p_j and
dp_k/dz_j = p_k (1[k = j] - p_j), so dH/dz_j = -p_j z_j + p_j sum_k p_k z_k.

Three implementations share this file's public entry points:
  * "triton": `kernels/triton_logprobs.py`, online log-sum-exp kernels (CUDA tensors, or CPU
    tensors under `TRITON_INTERPRET=1`);
  * "torch": the chunked autograd.Function below. It walks the logits in (token x vocabulary)
    tiles sized from a memory budget, keeps three [N] statistics per token for backward (row
    max, log-sum-exp, mean logit) and recomputes each tile there, so peak memory is one tile
    instead of O(N * V) (plus the [V, H] weight gradient);
  * "eager": `matmul -> float -> /T -> log_softmax -> gather`, the obviously-correct reference.

Dispatch: `impl=` argument, else the environment variable `R1_LOGPROB_IMPL`, else CUDA tensors
go to Triton and everything else to the chunked PyTorch path.

Departures from a plain `log_softmax`: outputs are float32 for half/bfloat16/float32 inputs
(float64 inputs stay float64 so that `gradcheck` can run); logits are shifted by their row max
before the division by T (exact in float32 for nearby logits, so large logits lose no digits);
the forward-only call that serves old-policy and reference log-probs saves nothing for
backward. Targets must be real token ids: there is no ignore index, mask the outputs instead.
"""
from __future__ import annotations

import importlib.util
import math
import os

import torch

IMPLS = ("triton", "torch", "eager")
IMPL_ENV = "R1_LOGPROB_IMPL"
# Working memory of the live tiles in the chunked PyTorch path on a CPU: 16 MiB is two float32
# tiles of 2048 tokens x 1024 words (512 x 4096 for a GRPO micro-batch's completions). Smaller
# tiles stay in cache and are reused by malloc: on a 2-core EPYC, one thread, SmolLM2's head
# (H 576, V 49,152) with entropy took 0.76-0.83x the time of 128 MiB tiles forward and
# 0.86-0.95x forward + backward, at 512 and 2048 tokens, and the forward's peak fell from 128
# to 16 MiB (bench/bench_logprobs.py --budgets, bench/RESULTS.md); 8 MiB gained nothing more.
TORCH_CHUNK_BUDGET_BYTES = 16 * 2**20
# On a GPU smaller tiles would leave the matmuls too small to fill the device.
TORCH_CHUNK_BUDGET_BYTES_CUDA = 2 * 2**30
# Tokens per tile at most; the vocabulary share of a tile takes the rest of the budget.
TOKEN_BLOCK = 4096
# Live float tiles at once: the shifted logits w, and exp(w) (forward) or p (backward);
# 16-bit inputs add half a tile (the matmul output, the cast gradient).
_LIVE_TILES = 2

# ----------------------------------------------------------------------------------------
# eager reference
# ----------------------------------------------------------------------------------------
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half/bfloat16/float32, float64 for float64: the precision of the math."""
    return torch.promote_types(dtype, torch.float32)


def eager_token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                         return_entropy: bool = False):
    """log_softmax(logits / T) gathered at the targets; materializes [N, V] several times."""
    logprobs = torch.log_softmax(logits.to(_compute_dtype(logits.dtype)) / temperature, dim=-1)
    logps = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [N]
    if not return_entropy:
        return logps
    entropy = -(logprobs.exp() * logprobs).sum(-1)  # [N]
    return logps, entropy


def eager_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0, return_entropy: bool = False):
    """`eager_token_logprobs(hidden @ weight.T, ...)`: the reference for the fused path."""
    return eager_token_logprobs(hidden @ weight.T, targets, temperature, return_entropy)


# ----------------------------------------------------------------------------------------
# chunked PyTorch implementation
# ----------------------------------------------------------------------------------------
# The [N, V] logits are visited in tiles of (token block) x (vocabulary slice), the Triton
# kernel's algorithm with large tiles: within a token block, an online log-sum-exp runs over
# the vocabulary slices, and the backward recomputes each tile. All three matmuls per tile
# keep a whole token block (up to TOKEN_BLOCK rows) or slice, so they stay efficient, and the
# weight gradient of a slice is written once per token block rather than re-read per chunk.
#
# Per-token statistics saved for backward, all [N]: x_max, the largest raw logit of the token;
# log_s = log sum_j exp(w_j) and mean_w = sum_j p_j w_j with w_j = (x_j - x_max) / T, so that
# log p_y = w_y - log_s and H = log_s - mean_w. Subtracting x_max before dividing by T keeps
# float32 exact where it matters: x_j - x_max is exact for nearby logits, whereas x_j / T alone
# already rounds by ~1e-5 at logits of ~100.
def tile_shape(n_tokens: int, vocab_size: int, budget_bytes: int = TORCH_CHUNK_BUDGET_BYTES,
               elem_bytes: int = 4) -> tuple[int, int]:
    """(tokens, vocabulary entries) per tile so that the live tiles fit in `budget_bytes`."""
    rows = max(1, min(n_tokens, TOKEN_BLOCK))
    cols = budget_bytes // (_LIVE_TILES * rows * elem_bytes)
    return rows, max(1, min(vocab_size, cols))


def _shift_scale(x: torch.Tensor, x_max: torch.Tensor, temperature: float) -> torch.Tensor:
    """w = (x - x_max) / T in place; [C, Vc]."""
    w = x.sub_(x_max[:, None])
    return w if temperature == 1.0 else w.div_(temperature)  # T = 1 (SFT) skips a pass


def _block_forward(tile, targets: torch.Tensor, V: int, cols: int, temperature: float,
                   need_mean: bool):
    """(log p_y, x_max, log_s, mean_w or None) of one token block [C], from its raw logits
    `tile(v0, v1)` -> fresh float [C, v1 - v0], merged over the slices online: moving the
    reference max from m to m' multiplies the old exp(w) by a = exp(d), d = (m - m') / T,
    and turns the old w into w + d, so s' = a s and t' = a (t + d s)."""
    m = s = t = x_y = None
    for v0 in range(0, V, cols):
        v1 = min(v0 + cols, V)
        x = tile(v0, v1)  # [C, Vc]
        in_tile = (targets >= v0) & (targets < v1)  # [C]
        x_y_tile = x.gather(1, (targets - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
        x_y = x_y_tile if x_y is None else torch.where(in_tile, x_y_tile, x_y)  # [C]
        m_new = x.max(dim=-1).values if m is None else torch.maximum(m, x.max(dim=-1).values)
        w = _shift_scale(x, m_new, temperature)  # [C, Vc], <= 0
        e = torch.exp(w)  # [C, Vc]
        s_tile = e.sum(-1)  # [C]
        t_tile = e.mul_(w).sum(-1) if need_mean else None  # [C]
        if m is None:
            s, t = s_tile, t_tile
        else:
            d = (m - m_new) / temperature  # [C]
            a = torch.exp(d)
            t = a * (t + d * s) + t_tile if need_mean else None
            s = a * s + s_tile
        m = m_new
        del x, w, e  # before the next tile exists, not after
    log_s = torch.log(s)  # [C]
    logps = (x_y - m) / temperature - log_s  # [C]; x_y - m is exact for nearby logits
    return logps, m, log_s, (t / s if need_mean else None)


def _tile_grad(x: torch.Tensor, targets: torch.Tensor, v0: int, x_max: torch.Tensor,
               log_s: torch.Tensor, mean_w: torch.Tensor | None, grad_logps: torch.Tensor,
               grad_entropy: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """d loss / d x for the raw logits x [C, Vc] of vocabulary entries v0.. (overwritten),
    each token with its own upstream gradients:

    (g_lp / T) (1[j = y] - p_j) - (g_H / T) p_j (w_j - sum_k p_k w_k)  (module docstring; the
    shift by x_max cancels in w_j - sum_k p_k w_k).
    """
    g_lp = (grad_logps / temperature)[:, None]  # [C, 1]
    w = _shift_scale(x, x_max, temperature)  # [C, Vc]
    if grad_entropy is None:
        dw = w.sub_(log_s[:, None]).exp_().mul_(-g_lp)  # [C, Vc]: -g p, p in place of w
    else:
        p = (w - log_s[:, None]).exp_()  # [C, Vc]
        g_ent = (grad_entropy / temperature)[:, None]  # [C, 1]
        dw = w.sub_(mean_w[:, None]).mul_(p).mul_(-g_ent).sub_(p.mul_(g_lp))  # [C, Vc]
    rows = torch.nonzero((targets >= v0) & (targets < v0 + x.shape[1])).squeeze(1)
    dw[rows, targets[rows] - v0] += g_lp[rows, 0]
    return dw


class _ChunkedLogprobs(torch.autograd.Function):
    """Tiled log-probs whose tiles are recomputed in backward rather than saved.

    Linear mode: inputs (hidden [N, H], weight [V, H]); a tile is hidden_b @ weight_s^T.
    Logits mode: inputs (logits [N, V],); a tile is a float copy of logits_b,s.
    """

    @staticmethod
    def tile(inputs, n0, n1, v0, v1, cdtype):
        if len(inputs) == 2:
            return (inputs[0][n0:n1] @ inputs[1][v0:v1].T).to(cdtype)  # [C, Vc]
        return inputs[0][n0:n1, v0:v1].to(cdtype, copy=True)  # [C, Vc]; caller's stay intact

    @staticmethod
    def forward(ctx, targets, temperature, return_entropy, tiles, *inputs):
        N, V = targets.shape[0], (inputs[1].shape[0] if len(inputs) == 2 else inputs[0].shape[1])
        rows, cols = tiles
        cdtype = _compute_dtype(inputs[0].dtype)
        # logps, x_max, log_s, mean_w: separate [N] tensors, so that editing the returned
        # logps in place cannot touch what backward reads
        stats = [torch.empty(N, dtype=cdtype, device=targets.device)
                 for _ in range(4 if return_entropy else 3)]
        for n0 in range(0, N, rows):
            n1 = min(n0 + rows, N)
            out = _block_forward(
                lambda v0, v1: _ChunkedLogprobs.tile(inputs, n0, n1, v0, v1, cdtype),
                targets[n0:n1], V, cols, temperature, return_entropy)
            for stat, o in zip(stats, out):
                stat[n0:n1] = o
        logps, x_max, log_s, mean_w = stats if return_entropy else (*stats, None)
        ctx.save_for_backward(targets, x_max, log_s, mean_w, *inputs)
        ctx.temperature, ctx.tiles = temperature, tiles
        return (logps, log_s - mean_w) if return_entropy else logps

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy=None):
        targets, x_max, log_s, mean_w, *inputs = ctx.saved_tensors
        N, linear = targets.shape[0], len(inputs) == 2
        V = inputs[1].shape[0] if linear else inputs[0].shape[1]
        rows, cols = ctx.tiles
        needs = ctx.needs_input_grad[4:]
        cdtype = log_s.dtype
        # every element is written by its first tile's matmul (beta=0) or copy; zeros only for
        # an empty batch, where no tile runs
        alloc = torch.empty_like if N > 0 else torch.zeros_like
        grads = [alloc(t) if need else None for t, need in zip(inputs, needs)]
        for n0 in range(0, N, rows):
            n1 = min(n0 + rows, N)
            sl = slice(n0, n1)
            # grad_hidden of the block sums over all slices: float32, then cast once
            grad_h = torch.zeros(n1 - n0, inputs[0].shape[1], dtype=cdtype,
                                 device=targets.device) if linear and needs[0] else None
            for v0 in range(0, V, cols):
                v1 = min(v0 + cols, V)
                x = _ChunkedLogprobs.tile(inputs, n0, n1, v0, v1, cdtype)  # [C, Vc]
                dx = _tile_grad(x, targets[sl], v0, x_max[sl], log_s[sl],
                                None if mean_w is None else mean_w[sl],
                                grad_logps[sl].to(cdtype),
                                None if grad_entropy is None else grad_entropy[sl].to(cdtype),
                                ctx.temperature).to(inputs[0].dtype)  # [C, Vc]
                if not linear:
                    grads[0][n0:n1, v0:v1] = dx
                elif needs[0]:
                    grad_h += (dx @ inputs[1][v0:v1]).to(cdtype)  # [C, H]
                if linear and needs[1]:  # [Vc, H]; dx already carries each token's own g
                    g_w = grads[1][v0:v1]
                    torch.addmm(g_w, dx.T, inputs[0][sl], beta=int(n0 > 0), out=g_w)
                del x, dx  # before the next tile exists, not after
            if grad_h is not None:
                grads[0][sl] = grad_h
        return (None, None, None, None, *grads)


def _budget(device: torch.device) -> int:
    return TORCH_CHUNK_BUDGET_BYTES_CUDA if device.type == "cuda" else TORCH_CHUNK_BUDGET_BYTES


def torch_token_logprobs(logits, targets, temperature=1.0, return_entropy=False,
                         tiles: tuple[int, int] | None = None):
    """Chunked PyTorch path of `token_logprobs` (inputs already validated and flattened);
    `tiles` = (tokens, vocabulary entries) per tile overrides the budget's choice."""
    tiles = tiles or tile_shape(*logits.shape, _budget(logits.device))
    return _ChunkedLogprobs.apply(targets, temperature, return_entropy, tiles, logits)


def torch_linear_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False,
                          tiles: tuple[int, int] | None = None):
    """Chunked PyTorch path of `fused_linear_logprobs` (inputs already validated)."""
    tiles = tiles or tile_shape(hidden.shape[0], weight.shape[0], _budget(weight.device))
    return _ChunkedLogprobs.apply(targets, temperature, return_entropy, tiles, hidden, weight)


# ----------------------------------------------------------------------------------------
# validation and dispatch
# ----------------------------------------------------------------------------------------
def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _check_targets(targets: torch.Tensor, vocab_size: int) -> None:
    if targets.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"targets must be int64 or int32 token ids, got dtype {targets.dtype}")
    if targets.numel() == 0:
        return
    if targets.is_cuda:
        # a host check would synchronize every call; the device assert fires asynchronously
        torch._assert_async(((targets >= 0) & (targets < vocab_size)).all(),
                            f"targets out of range [0, {vocab_size})")
        return
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"targets must lie in [0, {vocab_size}) (vocabulary size), got {bad}")


def _check_float(name: str, t: torch.Tensor) -> None:
    if not t.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _interpret_mode() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve_impl(impl: str | None, device: torch.device) -> str:
    """The implementation a call on `device` uses: argument, then env var, then device."""
    source = "impl"
    if impl is None and os.environ.get(IMPL_ENV):
        impl, source = os.environ[IMPL_ENV], IMPL_ENV
    if impl is None:
        on_gpu = device.type == "cuda" and importlib.util.find_spec("triton") is not None
        return "triton" if on_gpu else "torch"
    if impl not in IMPLS:
        raise ValueError(f"{source} must be one of {IMPLS}, got {impl!r}")
    if impl == "triton" and device.type != "cuda" and not (
            device.type == "cpu" and _interpret_mode()):
        raise ValueError(f"{source}='triton' needs CUDA tensors, or CPU tensors with "
                         f"TRITON_INTERPRET=1 (set before triton is imported); got tensors "
                         f"on {device}")
    return impl


def _unflatten(out, lead: torch.Size):
    """[N] results back to the targets' shape [...] (no extra view node for 1-D targets)."""
    if len(lead) == 1:
        return out
    if isinstance(out, tuple):
        return tuple(t.reshape(lead) for t in out)
    return out.reshape(lead)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                   return_entropy: bool = False, impl: str | None = None):
    """log p(target) under softmax(logits / T) per row: logits [..., V], targets [...].

    Returns logps [...] float32 (float64 for float64 logits), or (logps, entropy) with the
    entropy H = lse(z) - sum_j p_j z_j of each row (module docstring). Logits should be
    finite: -inf entries give NaN entropies (0 * -inf, as in eager), and NaN log-probs too if
    a row's first tile or block is all -inf.
    """
    temperature = _check_temperature(temperature)
    _check_float("logits", logits)
    if logits.dim() < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits [..., V] and targets [...] disagree: logits "
                         f"{tuple(logits.shape)}, targets {tuple(targets.shape)}")
    V = logits.shape[-1]
    _check_targets(targets, V)
    impl = resolve_impl(impl, logits.device)
    lead = targets.shape
    x, y = logits.reshape(-1, V), targets.reshape(-1).long()  # [N, V], [N]
    if impl == "eager":
        out = eager_token_logprobs(x, y, temperature, return_entropy)
    elif impl == "torch":
        out = torch_token_logprobs(x, y, temperature, return_entropy)
    else:
        from r1train.kernels.triton_logprobs import triton_token_logprobs
        out = triton_token_logprobs(x, y, temperature, return_entropy)
    return _unflatten(out, lead)


def _autocast_inputs(hidden: torch.Tensor, weight: torch.Tensor):
    """Under autocast, the LM head's matmul runs in the autocast dtype, as `F.linear` would.

    A Hugging Face decoder under autocast hands over float32 hidden states (its residual
    stream and final norm stay float32) and the float32 weight; without this cast the fused
    kernel would take them at float32 matmul speed, where eager autocast uses bfloat16.
    """
    device = hidden.device.type
    if not torch.is_autocast_enabled(device):
        return hidden, weight
    dtype = torch.get_autocast_dtype(device)
    cast = lambda t: t.to(dtype) if t.dtype == torch.float32 else t  # noqa: E731
    return cast(hidden), cast(weight)


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0, return_entropy: bool = False,
                          impl: str | None = None):
    """log p(target) under softmax((hidden @ weight^T) / T) without building [N, V] logits.

    hidden [..., H], weight [V, H] (the LM head), targets [...]. Returns logps [...] float32
    (float64 for float64 inputs), or (logps, entropy). Differentiable in hidden and weight.
    Under autocast, float32 inputs are cast to the autocast dtype first, as `F.linear` does.
    """
    temperature = _check_temperature(temperature)
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if weight.dim() != 2 or hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden [..., H] and weight [V, H] disagree: hidden "
                         f"{tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(f"hidden [..., H] and targets [...] disagree: hidden "
                         f"{tuple(hidden.shape)}, targets {tuple(targets.shape)}")
    hidden, weight = _autocast_inputs(hidden, weight)
    if hidden.dtype != weight.dtype or hidden.device != weight.device:
        raise ValueError(f"hidden and weight must share dtype and device, got "
                         f"{hidden.dtype}/{hidden.device} and {weight.dtype}/{weight.device}")
    _check_targets(targets, weight.shape[0])
    impl = resolve_impl(impl, hidden.device)
    lead = targets.shape
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1).long()  # [N, H], [N]
    if impl == "eager":
        out = eager_linear_logprobs(h, weight, y, temperature, return_entropy)
    elif impl == "torch":
        out = torch_linear_logprobs(h, weight, y, temperature, return_entropy)
    else:
        from r1train.kernels.triton_logprobs import triton_linear_logprobs
        out = triton_linear_logprobs(h, weight, y, temperature, return_entropy)
    return _unflatten(out, lead)
