"""Group-relative advantages: from per-function rewards to one advantage per completion.

GRPO (DeepSeekMath Sec. 4.1.2, outcome supervision) samples G completions o_1..o_G per prompt,
scores them r = {r_1..r_G}, and gives every token of o_i the same advantage

    A_i = (r_i - mean(r)) / std(r)

Layout: every tensor here is flat, `[N]` with `N = num_prompts * group_size`, and the G
completions of one prompt are contiguous (rows `g*G .. g*G + G-1`), the order in which the
rollout repeats each prompt G times.

Where this code departs from the paper, and why:
- `std + eps` (eps=1e-4) in the denominator: a group of equal rewards would otherwise be 0/0.
- On top of that, a group whose rewards are all equal gets advantage *exactly* 0. The float mean
  of equal numbers is not always that number ((0.1 + 0.1 + 0.1) / 3 != 0.1), so `r - mean`
  would leave ~1e-17 residue, which `/ (0 + eps)` would blow up to ~1e-13 of pure noise.
- std is the unbiased (n-1) sample std; the paper does not say which. `scale="batch"` keeps the
  group mean but divides by the std of the whole batch ("group mean, batch std", Liu et al. 2025,
  "Tricks or Traps? A Deep Dive into RL for LLM Reasoning"); `scale="none"` drops the division
  altogether, as Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-Like Training") argues the std
  biases updates toward too-easy and too-hard prompts.
- "No opinion" rows. A reward function returns NaN when it does not apply to a completion.
  `combine_rewards` returns a finite reward plus a bool mask `valid` of rows with at least one
  opinion; every function here takes that mask, computes group statistics over valid rows only,
  and gives invalid rows advantage exactly 0. NaN never leaves `combine_rewards`, so nothing
  downstream needs NaN-aware arithmetic.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

_SCALES = ("group", "batch", "none")


def _check_rewards(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None) -> torch.Tensor:
    """Validate the flat layout and return rewards as a floating tensor."""
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1:
        shape = tuple(rewards.shape) if isinstance(rewards, torch.Tensor) else type(rewards).__name__
        raise ValueError(f"rewards must be a 1-D tensor [N], got shape {shape}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        # A group of 1 has no baseline: its advantage would always be 0.
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has N={rewards.numel()} rows, not divisible by group_size={group_size}"
        )
    if valid is not None:
        ok = isinstance(valid, torch.Tensor) and valid.dtype == torch.bool
        if not ok or valid.shape != rewards.shape:
            got = (valid.dtype, tuple(valid.shape)) if isinstance(valid, torch.Tensor) else type(valid)
            raise ValueError(f"valid must be a bool tensor of shape {tuple(rewards.shape)}, got {got}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    # One host sync per step, worth it: a NaN here would silently turn a whole group's
    # advantages into NaN and the loss with them.
    bad = torch.isnan(rewards) if valid is None else torch.isnan(rewards) & valid
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"rewards[{row}] is NaN; rows with no opinion must be marked False in `valid` "
            "(see combine_rewards)"
        )
    return rewards


def _grouped(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None):
    """Reshape to [num_groups, G] and return (rewards, valid as float, valid count per group)."""
    r = rewards.view(-1, group_size)  # [num_groups, G]
    if valid is None:
        w = torch.ones_like(r)
    else:
        w = valid.view(-1, group_size).to(r.dtype)  # [num_groups, G]
    r = torch.where(w > 0, r, torch.zeros_like(r))  # invalid rows add nothing to sums
    n = w.sum(-1, keepdim=True)  # [num_groups, 1]
    return r, w, n


def zero_std_groups(
    rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Which groups carry no learning signal: all valid rewards equal (or fewer than two valid).

    Such a group has advantage 0 for every completion, so its gradient is 0 (up to the KL term);
    DAPO Sec. 3.2 ("dynamic sampling") drops these groups, and `frac_reward_zero_std` logs the
    fraction. Tested with exact equality (max == min), not std < tol, to agree with
    `group_advantages`, which zeroes exactly these groups.

    Returns: bool `[num_groups]`.
    """
    return _zero_std(_check_rewards(rewards, group_size, valid), group_size, valid)


def _zero_std(rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None) -> torch.Tensor:
    r = rewards.view(-1, group_size)  # [num_groups, G]
    if valid is None:
        return r.amax(-1) == r.amin(-1)
    v = valid.view(-1, group_size)  # [num_groups, G]
    # Invalid rows are pushed to -inf / +inf so they never set the max / min.
    hi = torch.where(v, r, -torch.inf).amax(-1)
    lo = torch.where(v, r, torch.inf).amin(-1)
    return (hi == lo) | (v.sum(-1) < 2)


def batch_reward_std(rewards: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Unbiased std of the valid rewards of a whole batch: the divisor of `scale="batch"`.

    A trainer whose batch is spread over ranks passes the rewards of *all* ranks here (gathered)
    and hands the result to `group_advantages(..., batch_std=)`, so that the advantages do not
    depend on how many processes share the batch.
    """
    w = torch.ones_like(rewards) if valid is None else valid.to(rewards.dtype)  # [N]
    n = w.sum()
    mean = (rewards * w).sum() / n.clamp(min=1)
    return (((rewards - mean) * w) ** 2).sum().div((n - 1).clamp(min=1)).sqrt()  # scalar


def group_advantages(
    rewards: torch.Tensor,
    group_size: int,
    scale: str = "group",
    eps: float = 1e-4,
    valid: torch.Tensor | None = None,
    batch_std: torch.Tensor | float | None = None,
) -> torch.Tensor:
    """Group-relative advantage, DeepSeekMath Sec. 4.1.2: A_i = (r_i - mean(r)) / (std(r) + eps).

    Args:
        rewards: `[N]`, groups of `group_size` contiguous rows.
        group_size: G >= 2.
        scale: "group" divides by each group's unbiased std (GRPO); "batch" by the unbiased std
            of all valid rewards in the batch (Liu et al. 2025, "Tricks or Traps"); "none" only
            subtracts the group mean (Dr. GRPO).
        eps: added to the std.
        valid: optional bool `[N]`, False for rows with no opinion (see `combine_rewards`); such
            rows are left out of mean and std and get advantage 0.
        batch_std: the divisor of scale="batch" when the batch is larger than `rewards` (the
            rewards of every rank, see `batch_reward_std`); None = the std of `rewards` itself.

    Returns: `[N]` advantages, exactly 0 for every row of a zero-std group and every invalid row.
    """
    if scale not in _SCALES:
        raise ValueError(f"scale must be one of {_SCALES}, got {scale!r}")
    if not eps >= 0:
        raise ValueError(f"eps must be >= 0, got {eps!r}")
    rewards = _check_rewards(rewards, group_size, valid)
    r, w, n = _grouped(rewards, group_size, valid)  # [num_groups, G], [num_groups, G], [num_groups, 1]
    mean = r.sum(-1, keepdim=True) / n.clamp(min=1)  # [num_groups, 1]
    centered = (r - mean) * w  # [num_groups, G]

    if scale == "group":
        # Unbiased: divide by n-1; groups with < 2 valid rows are zeroed below.
        std = ((centered**2).sum(-1, keepdim=True) / (n - 1).clamp(min=1)).sqrt()  # [num_groups, 1]
        advantages = centered / (std + eps)
    elif scale == "batch":
        if batch_std is None:
            std = batch_reward_std(rewards, valid)  # scalar
        else:
            std = torch.as_tensor(batch_std, dtype=r.dtype, device=r.device)
        advantages = centered / (std + eps)
    else:
        advantages = centered
    # Zero flat groups after dividing: this removes the mean's rounding residue and, with eps=0,
    # the 0/0 of a zero std.
    flat = _zero_std(rewards, group_size, valid).unsqueeze(-1)  # [num_groups, 1]
    advantages = torch.where(flat, torch.zeros_like(advantages), advantages)
    return advantages.flatten()  # [N]


def rloo_advantages(
    rewards: torch.Tensor, group_size: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """REINFORCE leave-one-out (Kool et al. 2019; Ahmadian et al. 2024, "Back to Basics", Sec. 3):

        A_i = r_i - 1/(G-1) * sum_{j != i} r_j

    The baseline excludes r_i itself, so it is independent of o_i and the estimator is unbiased.
    Equivalently A_i = G/(G-1) * (r_i - mean(r)). With `valid`, G is the number of valid rows of
    the group and only valid rows enter the baseline; invalid rows, and groups with fewer than
    two valid rows, get 0.

    Returns: `[N]`.
    """
    rewards = _check_rewards(rewards, group_size, valid)
    r, w, n = _grouped(rewards, group_size, valid)  # [num_groups, G], ..., [num_groups, 1]
    total = r.sum(-1, keepdim=True)  # [num_groups, 1]
    baseline = (total - r) / (n - 1).clamp(min=1)  # [num_groups, G]
    advantages = (r - baseline) * w
    flat = _zero_std(rewards, group_size, valid)  # [num_groups]
    # Same exact-zero guarantee as group_advantages: (total - r_i)/(G-1) of equal r_j need not be r_i.
    advantages = torch.where(flat.unsqueeze(-1), torch.zeros_like(advantages), advantages)
    return advantages.flatten()  # [N]


def combine_rewards(
    per_function: torch.Tensor, weights: Sequence[float] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted sum of reward functions, ignoring NaN ("this function has no opinion here").

        r_i = sum_{f : R[i, f] is not NaN} weights[f] * R[i, f]

    Args:
        per_function: `[N, F]` rewards, NaN where a function does not apply.
        weights: `F` finite weights.

    Returns:
        rewards: `[N]`, finite (0.0 on rows where every function returned NaN).
        valid: bool `[N]`, True where at least one function gave an opinion. Pass it as `valid=`
            to `group_advantages` / `rloo_advantages` so that opinion-less rows get advantage 0
            and stay out of their group's mean and std. The 0.0 placeholder in `rewards` is not
            a reward: use `valid` whenever the rewards are averaged or logged.
    """
    if not isinstance(per_function, torch.Tensor) or per_function.dim() != 2:
        shape = tuple(per_function.shape) if isinstance(per_function, torch.Tensor) else type(per_function)
        raise ValueError(f"per_function must be a 2-D tensor [N, F], got shape {shape}")
    if not per_function.is_floating_point():
        per_function = per_function.to(torch.get_default_dtype())
    w = torch.as_tensor(weights, dtype=per_function.dtype, device=per_function.device)
    if w.dim() != 1 or w.numel() != per_function.shape[1]:
        raise ValueError(
            f"weights must have one entry per reward function (F={per_function.shape[1]}), "
            f"got shape {tuple(w.shape)}"
        )
    if not torch.isfinite(w).all():
        raise ValueError(f"weights must be finite, got {w.tolist()}")
    has_opinion = ~torch.isnan(per_function)  # [N, F]
    # Select by the same mask that defines `valid`, so "no opinion" means one thing everywhere.
    weighted = torch.where(has_opinion, per_function * w, torch.zeros_like(per_function))  # [N, F]
    return weighted.sum(-1), has_opinion.any(-1)  # [N], [N]
