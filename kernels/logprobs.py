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
  * "torch": the chunked autograd.Function below. It walks the tokens in chunks sized from a
    memory budget, keeps three [N] statistics per token for backward (row max, log-sum-exp,
    mean logit) and recomputes each chunk's logits there, so peak memory is O(chunk * V)
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
# Working memory of one token chunk in the chunked PyTorch path. 128 MiB is ~110 tokens of a
# 152k vocabulary: small next to the [V, H] weight gradient on a laptop, while a matmul of
# ~100 rows still runs at full speed on a CPU.
TORCH_CHUNK_BUDGET_BYTES = 128 * 2**20
# On a GPU a few hundred rows would make each chunk's matmul too small to fill the device.
TORCH_CHUNK_BUDGET_BYTES_CUDA = 2 * 2**30
# Live float [chunk, V] buffers of a chunk: the shifted logits w, and exp(w) (forward) or p
# (backward); 16-bit inputs add half a buffer (the matmul output, the cast gradient).
_LIVE_CHUNK_BUFFERS = 2


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
def chunk_rows(vocab_size: int, budget_bytes: int = TORCH_CHUNK_BUDGET_BYTES,
               elem_bytes: int = 4) -> int:
    """Tokens per chunk so that the chunk's live [chunk, V] buffers fit in `budget_bytes`."""
    return max(1, budget_bytes // (_LIVE_CHUNK_BUFFERS * vocab_size * elem_bytes))


# Per-token statistics saved for backward, all [N]: x_max, the largest raw logit of the token;
# log_s = log sum_j exp(w_j) and mean_w = sum_j p_j w_j with w_j = (x_j - x_max) / T, so that
# log p_y = w_y - log_s and H = log_s - mean_w. Subtracting x_max before dividing by T keeps
# float32 exact where it matters: x_j - x_max is exact for nearby logits, whereas x_j / T alone
# already rounds by ~1e-5 at logits of ~100.
def _shift_scale(x: torch.Tensor, x_max: torch.Tensor, temperature: float) -> torch.Tensor:
    """w = (x - x_max) / T in place; [C, V]."""
    w = x.sub_(x_max[:, None])
    return w if temperature == 1.0 else w.div_(temperature)  # T = 1 (SFT) skips a pass


def _chunk_forward(x: torch.Tensor, targets: torch.Tensor, temperature: float, need_mean: bool):
    """(log p_y, x_max, log_s, mean_w or None) of raw logits x [C, V], which it overwrites."""
    x_max = x.max(dim=-1).values  # [C]
    w = _shift_scale(x, x_max, temperature)  # [C, V], <= 0
    e = torch.exp(w)  # [C, V]
    s = e.sum(-1)  # [C]
    log_s = torch.log(s)  # [C]
    logps = w.gather(1, targets[:, None]).squeeze(1) - log_s  # [C]
    mean_w = e.mul_(w).sum(-1) / s if need_mean else None  # [C]
    return logps, x_max, log_s, mean_w


def _chunk_grad(x: torch.Tensor, targets: torch.Tensor, x_max: torch.Tensor,
                log_s: torch.Tensor, mean_w: torch.Tensor | None, grad_logps: torch.Tensor,
                grad_entropy: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """d loss / d x for raw logits x [C, V] (overwritten), each token with its own upstream g:

    (g_lp / T) (1[j = y] - p_j) - (g_H / T) p_j (w_j - sum_k p_k w_k)  (module docstring; the
    shift by x_max cancels in w_j - sum_k p_k w_k).
    """
    g_lp = (grad_logps / temperature)[:, None]  # [C, 1]
    w = _shift_scale(x, x_max, temperature)  # [C, V]
    if grad_entropy is None:
        dw = w.sub_(log_s[:, None]).exp_().mul_(-g_lp)  # [C, V]: -g p, p in place of w
    else:
        p = (w - log_s[:, None]).exp_()  # [C, V]
        g_ent = (grad_entropy / temperature)[:, None]  # [C, 1]
        dw = w.sub_(mean_w[:, None]).mul_(p).mul_(-g_ent).sub_(p.mul_(g_lp))  # [C, V]
    dw[torch.arange(x.shape[0], device=x.device), targets] += g_lp[:, 0]
    return dw


class _ChunkedLogprobs(torch.autograd.Function):
    """Token-chunked log-probs; the chunk's raw logits come from `chunk_logits`, and are
    recomputed in backward rather than saved.

    Linear mode: inputs (hidden [N, H], weight [V, H]), x = hidden_c @ weight^T.
    Logits mode: inputs (logits [N, V],), x = a float copy of logits_c.
    """

    @staticmethod
    def chunk_logits(inputs, c0, c1, cdtype):
        if len(inputs) == 2:
            return (inputs[0][c0:c1] @ inputs[1].T).to(cdtype)  # [C, V]
        return inputs[0][c0:c1].to(cdtype, copy=True)  # [C, V]; the caller's stay intact

    @staticmethod
    def forward(ctx, targets, temperature, return_entropy, rows_per_chunk, *inputs):
        N = targets.shape[0]
        cdtype = _compute_dtype(inputs[0].dtype)
        logps = torch.empty(N, dtype=cdtype, device=targets.device)  # [N]
        x_max, log_s = torch.empty_like(logps), torch.empty_like(logps)  # [N], [N]
        mean_w = torch.empty_like(logps) if return_entropy else None  # [N]
        for c0 in range(0, N, rows_per_chunk):
            c1 = min(c0 + rows_per_chunk, N)
            x = _ChunkedLogprobs.chunk_logits(inputs, c0, c1, cdtype)  # [C, V]
            lp, xm, ls, mw = _chunk_forward(x, targets[c0:c1], temperature, return_entropy)
            logps[c0:c1], x_max[c0:c1], log_s[c0:c1] = lp, xm, ls
            if return_entropy:
                mean_w[c0:c1] = mw
            del x  # before the next chunk's logits exist, not after
        ctx.save_for_backward(targets, x_max, log_s, mean_w, *inputs)
        ctx.temperature, ctx.rows_per_chunk = temperature, rows_per_chunk
        return (logps, log_s - mean_w) if return_entropy else logps

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy=None):
        targets, x_max, log_s, mean_w, *inputs = ctx.saved_tensors
        linear = len(inputs) == 2
        needs = ctx.needs_input_grad[4:]
        grads = [torch.empty_like(inputs[0]) if needs[0] else None]  # [N, H] or [N, V]
        if linear:
            grads.append(torch.empty_like(inputs[1]) if needs[1] else None)  # [V, H]
        cdtype = log_s.dtype
        for c0 in range(0, targets.shape[0], ctx.rows_per_chunk):
            c1 = min(c0 + ctx.rows_per_chunk, targets.shape[0])
            x = _ChunkedLogprobs.chunk_logits(inputs, c0, c1, cdtype)  # [C, V]
            dx = _chunk_grad(
                x, targets[c0:c1], x_max[c0:c1], log_s[c0:c1],
                None if mean_w is None else mean_w[c0:c1], grad_logps[c0:c1].to(cdtype),
                None if grad_entropy is None else grad_entropy[c0:c1].to(cdtype),
                ctx.temperature).to(inputs[0].dtype)  # [C, V]
            if not linear:
                grads[0][c0:c1] = dx
            else:
                if needs[0]:
                    torch.mm(dx, inputs[1], out=grads[0][c0:c1])  # [C, H]
                if needs[1]:  # [V, H]; dx already carries each token's own upstream gradient
                    torch.addmm(grads[1], dx.T, inputs[0][c0:c1], beta=int(c0 > 0),
                                out=grads[1])  # beta=0 on the first chunk: no zero fill
            del x, dx  # before the next chunk's logits exist, not after
        return (None, None, None, None, *grads)


def _budget(device: torch.device) -> int:
    return TORCH_CHUNK_BUDGET_BYTES_CUDA if device.type == "cuda" else TORCH_CHUNK_BUDGET_BYTES


def torch_token_logprobs(logits, targets, temperature=1.0, return_entropy=False,
                         rows_per_chunk: int | None = None):
    """Chunked PyTorch path of `token_logprobs` (inputs already validated and flattened)."""
    rows = rows_per_chunk or chunk_rows(logits.shape[1], _budget(logits.device))
    return _ChunkedLogprobs.apply(targets, temperature, return_entropy, rows, logits)


def torch_linear_logprobs(hidden, weight, targets, temperature=1.0, return_entropy=False,
                          rows_per_chunk: int | None = None):
    """Chunked PyTorch path of `fused_linear_logprobs` (inputs already validated)."""
    rows = rows_per_chunk or chunk_rows(weight.shape[0], _budget(weight.device))
    return _ChunkedLogprobs.apply(targets, temperature, return_entropy, rows, hidden, weight)


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
    entropy H = lse(z) - sum_j p_j z_j of each row (module docstring).
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
        from kernels.triton_logprobs import triton_token_logprobs
        out = triton_token_logprobs(x, y, temperature, return_entropy)
    return _unflatten(out, lead)


def fused_linear_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          temperature: float = 1.0, return_entropy: bool = False,
                          impl: str | None = None):
    """log p(target) under softmax((hidden @ weight^T) / T) without building [N, V] logits.

    hidden [..., H], weight [V, H] (the LM head), targets [...]. Returns logps [...] float32
    (float64 for float64 inputs), or (logps, entropy). Differentiable in hidden and weight.
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
        from kernels.triton_logprobs import triton_linear_logprobs
        out = triton_linear_logprobs(h, weight, y, temperature, return_entropy)
    return _unflatten(out, lead)
