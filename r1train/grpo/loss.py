"""The clipped policy-gradient loss of GRPO and its variants, as one pure function of tensors.

GRPO (DeepSeekMath Eq. 3) maximizes, for G completions o_i of one prompt q,

    J = 1/G sum_i 1/|o_i| sum_t [ min(r_it A_i, clip(r_it, 1-eps, 1+eps) A_i) - beta D_KL ]
    r_it = pi_theta(o_it | q, o_i<t) / pi_old(o_it | q, o_i<t)

with the per-token KL estimator of DeepSeekMath Eq. 4 (Schulman's "k3"):
    D_KL = pi_ref/pi_theta - log(pi_ref/pi_theta) - 1.
`policy_loss` returns -J and lets each piece be swapped for a published variant:

- `epsilon_high` (DAPO Sec. 3.1, "clip-higher"): upper bound 1+epsilon_high, lower 1-epsilon_low.
- `loss_type` picks how token losses are summed and what the sum is divided by:
    "grpo"    1/N sum_i 1/|o_i| sum_t                   DeepSeekMath Eq. 3
    "bnpo"    1/sum_i|o_i| sum_i sum_t, per process     TRL's "bnpo": each rank's token mean
    "dr_grpo" 1/(N L) sum_i sum_t, L = max_completion_length    Dr. GRPO
    "dapo"    1/sum_i|o_i| sum_i sum_t, whole step      DAPO Eq. 8, token-level
- Normalization in one place: `policy_loss` returns (its batch's sum) / `denominator`, the count
  of the whole optimizer step (`loss_denominator`: sequences or tokens over every micro-batch
  and rank). Summing the micro-batch losses, and the ranks' gradients (FSDP sums, see
  `run.dist.shard_model`), then gives exactly the loss and gradient of the whole batch.
  Without a denominator the batch is its own step.
- `importance_sampling="sequence"`: GSPO's ratio s_i = exp(1/|o_i| sum_t log r_it).
- `kl_estimator`: "k1", "k2" or "k3" against the frozen reference policy.
- `token_weights`: a constant per token multiplying the clipped surrogate (not the KL), from
  two token selections below, both computed before the update:
    `rollout_correction`  truncated or masked importance weights pi_old / pi_sampler that
                          correct for the sampler's numbers differing from the trainer's
                          (Yao et al. 2025, TIS; TRL's token_mask / sequence_mask, IcePop, MIS)
    `entropy_mask`        only the highest-entropy tokens keep the policy gradient
                          ("Beyond the 80/20 Rule", Wang et al. 2025)

Shapes: N completions (all prompts x G, flattened), T completion tokens (right-padded).

Where this code departs from the papers, and why:
- The KL term is averaged with the same normalization as the policy term, as it is inside the
  token average of DeepSeekMath Eq. 3. DAPO and Dr. GRPO drop the KL (beta=0); it is still
  allowed with their normalizations.
- `old_logps`, `ref_logps` and `advantages` are detached: they are constants of the objective,
  and a gradient leaking into the reference model would be a silent bug.
- Padded positions are replaced by 0 *before* `exp`: padding may hold any finite log-prob, and
  exp(large) * 0 = inf * 0 = NaN would poison the loss and the gradient.
- "grpo" clamps |o_i| at 1, so an empty completion contributes 0 (still counted in 1/N: N is the
  batch the sampler produced). Token counts are clamped at 1 likewise.
- "dr_grpo": the paper's Eq. sums tokens with no length division; its released code divides by a
  constant generation budget L, which keeps the loss on the scale of "grpo". We follow the code.
- "bnpo" and "dapo" differ only in their denominator: "dapo" divides by the tokens of the whole
  step, "bnpo" by each rank's own tokens times the number of ranks (TRL normalizes "bnpo" per
  process and then averages the processes' gradients). On one process they are the same.
- `token_weights` leave the KL term and every denominator as they are: a token weighted 0 still
  counts in |o_i| and in the token counts, and its KL is still paid. This is TRL's choice for
  both selections (the weights multiply its per-token policy loss before beta * KL is added, its
  masks and counts unchanged) and the 80/20 paper's objective (the indicator sits inside DAPO's
  1/sum_i |o_i| sum_i sum_t). An importance weight estimates a term; 0 is its estimate, not a
  token removed. verl's rejection sampling (`rollout_rs`) differs: it takes rejected tokens out
  of its response mask, so out of the token-mean's count and the KL too.
- GSPO: the sequence ratio s_i is broadcast to every token of o_i and gradients flow through it:
  d s_i = s_i/|o_i| sum_t d log pi_theta(o_it). This is the GSPO objective under "grpo"
  normalization (each token of o_i carries the same loss), and because A_i is one number per
  completion it also equals GSPO-token (sg[s_i] * pi_theta(o_it)/sg[pi_theta(o_it)]) in value and
  gradient under every normalization. The epsilons are the caller's: GSPO uses ~3e-4/4e-4, not 0.2.
"""
from __future__ import annotations

import math
import numbers

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_SAMPLING = ("token", "sequence")
CORRECTION_LEVELS = ("token", "sequence")


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from samples of pi_theta (Schulman, "Approximating
    KL Divergence", 2020). With delta = ref_logps - logps = log(pi_ref/pi_theta):

        k1 = -delta                     unbiased, can be negative
        k2 = 0.5 * delta**2             biased, low variance
        k3 = exp(delta) - delta - 1     unbiased, >= 0 (DeepSeekMath Eq. 4)

    Returns the same shape as `logps`.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    delta = ref_logps - logps
    if estimator == "k1":
        return -delta
    if estimator == "k2":
        return 0.5 * delta**2
    # expm1 keeps digits that exp(delta) - 1 would cancel away when delta ~ 0, which is the common case.
    return torch.expm1(delta) - delta


def _shape(x: object) -> object:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__


def loss_denominator(loss_type: str, *, sequences, tokens, rank_tokens, world_size: int,
                     max_completion_length: int | None = None):
    """The count one optimizer step's summed losses are divided by (module docstring).

    `sequences`, `tokens`: completions and loss tokens of the whole step, all micro-batches and
    ranks; `rank_tokens`: this rank's loss tokens (numbers or 0-d tensors)."""
    if loss_type == "grpo":
        return sequences
    if loss_type == "dr_grpo":
        return sequences * max_completion_length
    if loss_type == "dapo":
        return tokens
    if loss_type == "bnpo":
        return rank_tokens * world_size
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def _check_args(logps, old_logps, advantages, mask, ref_logps, beta, epsilon_low, epsilon_high,
                loss_type, importance_sampling, kl_estimator, max_completion_length, denominator,
                token_weights=None):
    if not isinstance(logps, torch.Tensor) or logps.dim() != 2 or not logps.is_floating_point():
        raise ValueError(f"logps must be a floating 2-D tensor [N, T], got {_shape(logps)}")
    n, t = logps.shape
    if n == 0:
        raise ValueError("logps has N=0 completions; the loss of an empty batch is undefined")
    for name, x in (("old_logps", old_logps), ("mask", mask), ("ref_logps", ref_logps),
                    ("token_weights", token_weights)):
        if name in ("ref_logps", "token_weights") and x is None:
            continue
        if not isinstance(x, torch.Tensor) or x.shape != logps.shape:
            raise ValueError(f"{name} must have the shape of logps {(n, t)}, got {_shape(x)}")
    if not isinstance(advantages, torch.Tensor) or advantages.shape != (n,):
        raise ValueError(f"advantages must have shape [N] = {(n,)}, got {_shape(advantages)}")
    for name, x in (("epsilon_low", epsilon_low), ("epsilon_high", epsilon_high), ("beta", beta)):
        if x is None and name == "epsilon_high":
            continue
        if not isinstance(x, numbers.Real) or not x >= 0 or x == float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling not in IMPORTANCE_SAMPLING:
        raise ValueError(
            f"importance_sampling must be one of {IMPORTANCE_SAMPLING}, got {importance_sampling!r}"
        )
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if beta > 0 and ref_logps is None:
        raise ValueError(f"beta={beta!r} > 0 needs ref_logps (the KL term is against the reference)")
    if max_completion_length is not None and (
        isinstance(max_completion_length, bool)
        or not isinstance(max_completion_length, int)
        or max_completion_length < 1
    ):
        raise ValueError(f"max_completion_length must be an int >= 1, got {max_completion_length!r}")
    if loss_type == "dr_grpo" and max_completion_length is None:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length (its constant divisor)")
    if denominator is not None:
        if isinstance(denominator, torch.Tensor):
            if denominator.numel() != 1:
                raise ValueError(f"denominator must be a scalar, got shape {_shape(denominator)}")
        elif isinstance(denominator, bool) or not isinstance(denominator, numbers.Real) \
                or not denominator >= 0:
            raise ValueError(f"denominator must be a number >= 0, got {denominator!r}")


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    loss_type: str = "grpo",
    importance_sampling: str = "token",
    kl_estimator: str = "k3",
    max_completion_length: int | None = None,
    denominator: int | float | torch.Tensor | None = None,
    token_weights: torch.Tensor | None = None,
    per_token: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Negative clipped surrogate plus beta * KL: -J of DeepSeekMath Eq. 3 and its variants.

    Per token (DeepSeekMath Eq. 3 with DAPO's decoupled clip, Eq. 8):
        loss_it = -min(r_it A_i, clip(r_it, 1-epsilon_low, 1+epsilon_high) A_i) + beta KL_it
    then averaged as `loss_type` says (module docstring). With importance_sampling="sequence",
    r_it = s_i = exp(1/|o_i| sum_t (logps_it - old_logps_it)) for every t (GSPO).

    Args:
        logps: `[N, T]` log pi_theta of the sampled completion tokens (requires grad).
        old_logps: `[N, T]` log pi_old of the same tokens (the policy that sampled them).
        advantages: `[N]`, one per completion.
        mask: `[N, T]`, bool or 0/1: which tokens are completion tokens (not padding).
        ref_logps: `[N, T]` log pi_ref, needed when beta > 0; when given with beta = 0 the KL is
            only measured (metrics["kl"]).
        beta: KL coefficient.
        epsilon_low, epsilon_high: clip range [1-epsilon_low, 1+epsilon_high]; None = epsilon_low.
        loss_type: "grpo", "bnpo", "dr_grpo" or "dapo".
        importance_sampling: "token" (PPO/GRPO) or "sequence" (GSPO).
        kl_estimator: "k1", "k2" or "k3" (see `kl_penalty`).
        max_completion_length: L of "dr_grpo" (ignored by the others).
        denominator: what the summed losses are divided by, the whole optimizer step's count
            (`loss_denominator`; int or 0-d tensor, so the trainer can all-reduce it without a
            host sync). None = this batch's own: N for "grpo", N L for "dr_grpo", its mask sum
            for "bnpo" and "dapo".
        token_weights: `[N, T]` constants (detached) multiplying each token's clipped surrogate:
            w_it * -min(r_it A_i, clip(r_it) A_i) + beta KL_it. The KL and the denominators are
            not weighted (module docstring). None = 1 everywhere.
        per_token: also return the per-token quantities, detached, in metrics["per_token"]:
            "ratio" and "clip" (-1 where the lower clip binds, +1 the upper, 0 neither) `[N, T]`,
            and "kl" when measured; what the run inspector records (inspector/records.py).

    Returns:
        loss: scalar.
        metrics: detached 0-d tensors, means over the local unmasked tokens: "ratio_mean",
            "clip_frac_low" (A<0 and r<1-epsilon_low), "clip_frac_high" (A>0 and
            r>1+epsilon_high), "clip_frac" (either), and "kl" when ref_logps is given.
    """
    _check_args(logps, old_logps, advantages, mask, ref_logps, beta, epsilon_low, epsilon_high,
                loss_type, importance_sampling, kl_estimator, max_completion_length, denominator, token_weights)
    if epsilon_high is None:
        epsilon_high = epsilon_low
    n = logps.shape[0]
    mask = mask != 0  # [N, T] bool
    mask_f = mask.to(logps.dtype)  # [N, T]
    tokens_per_seq = mask_f.sum(-1)  # [N]
    A = advantages.detach().unsqueeze(-1)  # [N, 1]

    # --- importance ratio ---
    log_ratio = torch.where(mask, logps - old_logps.detach(), 0.0)  # [N, T]
    if importance_sampling == "token":
        ratio = torch.exp(log_ratio)  # [N, T]
    else:
        seq_log_ratio = log_ratio.sum(-1) / tokens_per_seq.clamp(min=1)  # [N]
        ratio = torch.exp(seq_log_ratio).unsqueeze(-1).expand_as(log_ratio)  # [N, T]

    # --- clipped surrogate ---
    clipped_ratio = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)  # [N, T]
    per_token_loss = -torch.minimum(ratio * A, clipped_ratio * A)  # [N, T]
    if token_weights is not None:  # the policy term only; where(): a weight of padding may be anything
        per_token_loss = per_token_loss * torch.where(mask, token_weights.detach().to(logps.dtype), 0.0)

    # --- KL to the reference ---
    kl = None
    if ref_logps is not None:
        # Zero both sides at padding (delta = 0, KL = 0) with where(), whose backward sends
        # exactly 0 there even if padding holds -inf.
        kl = kl_penalty(
            torch.where(mask, logps, 0.0), torch.where(mask, ref_logps.detach(), 0.0), kl_estimator
        )  # [N, T]
        if beta > 0:
            per_token_loss = per_token_loss + beta * kl

    # --- normalization: this batch's sum over the step's count ---
    per_token_loss = torch.where(mask, per_token_loss, 0.0)  # [N, T]
    if loss_type == "grpo":
        total = (per_token_loss.sum(-1) / tokens_per_seq.clamp(min=1)).sum()  # sum of sequence means
    else:
        total = per_token_loss.sum()
    if denominator is None:
        denominator = {"grpo": n, "dr_grpo": n * (max_completion_length or 1)}.get(loss_type, mask_f.sum())
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.detach().to(logps.dtype).reshape(()).clamp(min=1)
    else:
        denominator = max(float(denominator), 1.0)
    loss = total / denominator

    # --- metrics: detached, no host sync ---
    with torch.no_grad():
        n_tok = mask_f.sum().clamp(min=1)

        def masked_mean(x: torch.Tensor) -> torch.Tensor:
            return torch.where(mask, x.to(logps.dtype), 0.0).sum() / n_tok

        is_low_clipped = (A < 0) & (ratio < 1 - epsilon_low)  # [N, T]
        is_high_clipped = (A > 0) & (ratio > 1 + epsilon_high)  # [N, T]
        metrics = {
            "ratio_mean": masked_mean(ratio),
            "clip_frac_low": masked_mean(is_low_clipped),
            "clip_frac_high": masked_mean(is_high_clipped),
            "clip_frac": masked_mean(is_low_clipped | is_high_clipped),
        }
        if kl is not None:
            metrics["kl"] = masked_mean(kl)
        if per_token:
            clip = is_high_clipped.to(torch.int8) - is_low_clipped.to(torch.int8)  # [N, T]
            metrics["per_token"] = {"ratio": ratio.detach(), "clip": clip}
            if kl is not None:
                metrics["per_token"]["kl"] = kl.detach()
    return loss, metrics


def rollout_correction(old_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor, *,
                       method: str, level: str = "token", bound: float = 2.0,
                       bound_low: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Importance weights that correct for the sampler's numbers differing from the trainer's.

    The tokens were drawn from pi_sampler (the generation engine: bf16, other kernels, a
    compiled decode), while the objective is an expectation under pi_old as the trainer computes
    it. With rho = pi_old / pi_sampler of the sampled tokens (Yao et al. 2025, "Your efficient
    RL framework secretly brings you off-policy RL training"):

        level "token":     rho_it = exp(old_it - sampler_it)
        level "sequence":  rho_i  = exp(sum_t (old_it - sampler_it)), the sequence's likelihood
                           ratio (a product of the token ratios), the same for each of its tokens
        method "tis":      w = min(rho, bound)                          truncated IS (Yao et al., C = 2)
        method "mis":      w = rho if bound_low <= rho <= bound else 0  masked IS: a token (or a
                           whole sequence) past a bound leaves the policy term

    w multiplies the clipped surrogate of each token (policy_loss's `token_weights`), detached.
    "mis" keeps the ratio of the tokens it keeps: TRL's token_mask / sequence_mask, and IcePop's
    two-sided token mask [alpha, beta] (Ling Team, Ring-1T report, 2025) with bound_low = alpha;
    bound_low = 0 masks from above only (TRL's default; Liu et al. 2025, "When speed kills
    stability", mask whole sequences whose ratio exceeds C).

    Departures: the sequence level is the product, as in TRL and verl's rollout_is="sequence",
    not a geometric mean (verl's rollout_rs="geometric" rejects on the length-normalized ratio,
    which is no importance weight); "tis" truncates from above only.

    Args:
        old_logps: `[N, T]` log pi_old under the trainer (the update's logps.detach() when
            num_iterations is 1).
        sampler_logps: `[N, T]` log pi_sampler of the same tokens (`Rollout.logps`).
        mask: `[N, T]` the tokens in the loss.

    Returns:
        weights: `[N, T]` detached, in the dtype of old_logps, 0 at masked positions.
        metrics: detached 0-d tensors, means over the unmasked tokens: "mismatch_kl", the k3
            estimate of KL(pi_sampler || pi_old) (`kl_penalty` with the sampler as the sampling
            policy: E_sampler[rho - 1 - log rho], unbiased, >= 0); "is_weight_mean"; and
            "is_truncated_frac" (tis: rho > bound) or "is_masked_frac" (mis: w = 0).
    """
    if method not in ("tis", "mis"):
        raise ValueError(f"method must be 'tis' or 'mis', got {method!r}")
    if level not in CORRECTION_LEVELS:
        raise ValueError(f"level must be one of {CORRECTION_LEVELS}, got {level!r}")
    if not (bound > 0 and 0 <= bound_low < bound):
        raise ValueError(f"need 0 <= bound_low < bound, got bound_low={bound_low!r}, bound={bound!r}")
    for name, x in (("sampler_logps", sampler_logps), ("mask", mask)):
        if not isinstance(x, torch.Tensor) or x.shape != old_logps.shape:
            raise ValueError(f"{name} must have the shape of old_logps {tuple(old_logps.shape)}, got {_shape(x)}")
    mask = mask != 0  # [N, T]
    old, sampler = old_logps.detach().double(), sampler_logps.detach().double()
    log_rho = torch.where(mask, old - sampler, 0.0)  # [N, T]
    if level == "sequence":
        log_rho = log_rho.sum(-1, keepdim=True).expand_as(log_rho)  # [N, T]: each token its row's
    rho = torch.exp(log_rho)  # [N, T]; a sequence's may overflow to inf: min() and the bounds take it
    if method == "tis":
        outside = rho > bound  # [N, T]
        weights = rho.clamp(max=bound)
    else:
        outside = (rho < bound_low) | (rho > bound)  # [N, T]
        weights = torch.where(outside, 0.0, rho)
    weights = torch.where(mask, weights, 0.0)  # [N, T]
    n_tok = mask.sum().clamp(min=1)

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x.double(), 0.0).sum() / n_tok

    metrics = {"mismatch_kl": masked_mean(kl_penalty(sampler, old, "k3")),
               "is_weight_mean": masked_mean(weights),
               "is_truncated_frac" if method == "tis" else "is_masked_frac": masked_mean(outside)}
    dtype = old_logps.dtype
    return weights.to(dtype), {k: v.to(dtype) for k, v in metrics.items()}


def entropy_threshold(entropies: torch.Tensor, top_quantile: float) -> torch.Tensor:
    """tau: the entropy at or above which a share `top_quantile` of the tokens lies.

    "Beyond the 80/20 Rule" (Wang et al. 2025) restricts DAPO's objective to the forking tokens:
    each token's term is multiplied by I[H_it >= tau_rho^B], tau_rho^B the entropy above which
    the top rho of the tokens of the batch B lie (rho = 0.2 in the paper). `entropies`: `[M]`,
    the entropies of every loss token of the step, every rank's (the caller gathers them). With
    k = ceil(top_quantile * M), at least 1, tau is the k-th largest entropy (an order statistic;
    q * M is taken with a 1e-6 tolerance, so that 0.2 of 10 tokens is 2, not 3 by rounding).
    Ties: every token whose entropy equals tau is kept, so the share kept may exceed q.
    TRL's `top_entropy_quantile` takes torch.quantile(H, 1 - q) instead (linear interpolation,
    about q (M - 1) + 1 tokens kept, and at most 2^24 tokens). No token: +inf (none kept)."""
    m = entropies.numel()
    if m == 0:
        return torch.tensor(float("inf"), dtype=entropies.dtype, device=entropies.device)
    k = min(max(1, math.ceil(top_quantile * m - 1e-6)), m)
    return torch.kthvalue(entropies.flatten(), m - k + 1).values  # the k-th largest


def entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, threshold: torch.Tensor | float) -> torch.Tensor:
    """`[N, T]` bool: the tokens of `mask` whose entropy reaches `threshold` (`entropy_threshold`),
    those that keep the policy gradient (policy_loss's `token_weights`)."""
    return (entropy >= threshold) & (mask != 0)
