"""Per-step GRPO metrics, reduced over ranks. Names are the ones the README's glossary explains."""
from __future__ import annotations

import torch

from r1train.grpo.advantages import zero_std_groups
from r1train.rewards import pop_reward_metrics
from r1train.run.dist import all_gather_cat

# Update statistics: per-token means over every loss token of the step, all micro-batches,
# passes and ranks together (the README's glossary: "mean per-token KL", "share of tokens"). Each
# rank sends the sums and its token count; a mean of micro-batch or rank means would instead give
# the tokens of a short micro-batch more weight, and a micro-batch whose rows all left the loss
# (grpo.mask_truncated) a weight with no tokens. "loss" is each rank's share of the whole step's
# loss (its sum over the global count), summed over ranks.
UPDATE_MEANS = ("kl", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "entropy", "mismatch_kl")
# The same, logged only by the runs whose option makes them (grpo.rollout_correction,
# grpo.top_entropy_quantile): the mean importance weight, the share of tokens whose weight was
# truncated (tis) or masked to 0 (mis), the share of tokens the entropy selection kept.
OPTIONAL_MEANS = ("is_weight_mean", "is_truncated_frac", "is_masked_frac", "entropy_kept_frac")


def _valid_group_std(rewards: torch.Tensor, valid: torch.Tensor, g: int) -> torch.Tensor:
    """Unbiased std of each group's valid rewards, 0 where fewer than two are valid."""
    r, v = rewards.view(-1, g), valid.view(-1, g).double()  # [groups, G]
    n = v.sum(-1)
    mean = (r * v).sum(-1) / n.clamp(min=1)
    var = (((r - mean[:, None]) ** 2) * v).sum(-1) / (n - 1).clamp(min=1)
    return torch.where(n >= 2, var.sqrt(), torch.zeros_like(var))  # [groups]


def reward_metrics(per_fn: torch.Tensor, rewards: torch.Tensor, lengths: torch.Tensor,
                   truncated: torch.Tensor, names: list[str], group_size: int, device=None) -> dict:
    """Reward, per-function and length statistics of the step's rows, every rank's (gathered):
    the rows trained on. With grpo.dynamic_sampling those are the groups chosen, not every group
    generated, so `frac_reward_zero_std` is 0 unless the rounds ran out (the generated groups'
    share is `dynamic/frac_zero_std_generated`, GRPOTrainer._dynamic_rounds), as verl logs
    its metrics on the filtered batch.

    per_fn `[N, F]` (NaN = no opinion), rewards `[N]`, lengths `[N]`, truncated `[N]` bool. A row
    on which every reward function abstained carries a placeholder reward of 0 and advantage 0
    (`combine_rewards`): it stays out of the means and stds, as in training.
    """
    local = torch.cat([rewards.double()[:, None], per_fn.double(), lengths.double()[:, None],
                       truncated.double()[:, None]], dim=1)  # [N, F + 3]
    everything = all_gather_cat(local.to(device) if device is not None else local).cpu()
    rewards, per_fn = everything[:, 0], everything[:, 1:-2]  # [N_global], [N_global, F]
    lengths, truncated = everything[:, -2], everything[:, -1]
    valid = ~torch.isnan(per_fn).all(-1)  # [N_global]
    m = {"reward": rewards[valid].mean().item() if valid.any() else float("nan"),
         "reward_std": _valid_group_std(rewards, valid, group_size).mean().item(),
         "frac_reward_zero_std": zero_std_groups(rewards, group_size, valid).double().mean().item()}
    for f, n in enumerate(names):
        col = per_fn[:, f]
        col = col[~torch.isnan(col)]
        m[f"{n}/mean"] = col.mean().item() if col.numel() else float("nan")
        m[f"{n}/std"] = col.std().item() if col.numel() > 1 else 0.0
    m.update({"completion_length/mean": lengths.mean().item(), "completion_length/min": lengths.min().item(),
              "completion_length/max": lengths.max().item(), "truncated_frac": truncated.mean().item(),
              "tokens": lengths.sum().item()})
    for k, v in pop_reward_metrics().items():
        m[f"rewards/{k}"] = v
    return m


def tool_metrics(episodes: list[dict], model_tokens: torch.Tensor, tools: list[str], device=None) -> dict:
    """Multi-turn rows (rollout.tools), means per completion over every rank's rows:
    "turns/mean" (assistant segments), "tools/calls_mean" (calls answered), "tools/errors" (calls
    whose answer was an error), "tools/<name>/calls" (calls of each tool) and "model_tokens/mean"
    (tokens the model wrote: completion_length counts the inserted tool turns too).
    `episodes`: Rollout.episodes; `model_tokens` `[N]`."""
    local = torch.tensor([[e["turns"], e["tool_calls"], e["tool_errors"], *(e["calls"].get(t, 0) for t in tools)]
                          for e in episodes], dtype=torch.float64).reshape(len(episodes), 3 + len(tools))
    local = torch.cat([local, model_tokens.double()[:, None]], 1)  # [N, 4 + K]
    means = all_gather_cat(local.to(device) if device is not None else local).cpu().mean(0).tolist()
    return {"turns/mean": means[0], "tools/calls_mean": means[1], "tools/errors": means[2],
            **{f"tools/{t}/calls": means[3 + k] for k, t in enumerate(tools)}, "model_tokens/mean": means[-1]}


def update_means(per_rank: torch.Tensor, names: tuple = UPDATE_MEANS) -> dict:
    """The step's update metrics from every rank's row of `[loss share, loss tokens, the sum of
    each of `names` over those tokens]` (`[R, 2 + len(names)]`): the loss shares summed, each
    statistic's sums over the tokens' count (0 when no token counted)."""
    loss, tokens, *sums = per_rank.double().sum(0).tolist()
    return {"loss": loss, **{k: s / max(tokens, 1.0) for k, s in zip(names, sums)}}


def update_metrics(update: dict, device=None) -> dict:
    """`update_means` of every rank's `update` ("loss", "tokens", "sums": GRPOTrainer.update):
    UPDATE_MEANS, and those of OPTIONAL_MEANS that the sums hold (the same on every rank: the
    options are)."""
    names = UPDATE_MEANS + tuple(k for k in OPTIONAL_MEANS if k in update["sums"])
    row = torch.tensor([[update["loss"], update["tokens"], *(update["sums"].get(k, 0.0) for k in names)]],
                       dtype=torch.float64)  # [1, K]
    return update_means(all_gather_cat(row.to(device) if device is not None else row).cpu(), names)
