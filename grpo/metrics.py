"""Per-step GRPO metrics, reduced over ranks. Names are the ones the README's glossary explains."""
from __future__ import annotations

import torch
import torch.distributed as dist

from grpo.advantages import zero_std_groups
from rewards import pop_reward_metrics


def _gather_rows(values: list) -> list:
    if not dist.is_initialized():
        return values
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, values)
    return [v for part in out for v in part]


def _valid_group_std(rewards: torch.Tensor, valid: torch.Tensor, g: int) -> torch.Tensor:
    """Unbiased std of each group's valid rewards, 0 where fewer than two are valid."""
    r, v = rewards.view(-1, g), valid.view(-1, g).double()  # [groups, G]
    n = v.sum(-1)
    mean = (r * v).sum(-1) / n.clamp(min=1)
    var = (((r - mean[:, None]) ** 2) * v).sum(-1) / (n - 1).clamp(min=1)
    return torch.where(n >= 2, var.sqrt(), torch.zeros_like(var))  # [groups]


def step_metrics(trainer, rows: list[dict], stats: dict, upd: dict, step_time: float) -> dict:
    g = trainer.cfg.rollout.group_size
    names = [name for name, _, _ in trainer.rewards]
    local = [(x["reward"], [x["rewards"][n] for n in names], len(x["completion_ids"]), x["truncated"])
             for x in rows]
    everything = _gather_rows(local)
    rewards = torch.tensor([e[0] for e in everything], dtype=torch.float64)  # [N_global]
    per_fn = torch.tensor([e[1] for e in everything], dtype=torch.float64)   # [N_global, F]
    lengths = torch.tensor([e[2] for e in everything], dtype=torch.float64)
    truncated = torch.tensor([e[3] for e in everything], dtype=torch.float64)
    # A row on which every reward function abstained (NaN) carries a placeholder reward of 0
    # and advantage 0 (combine_rewards): it stays out of the means and stds, as in training.
    valid = ~torch.isnan(per_fn).all(-1)  # [N_global]
    m = {"reward": rewards[valid].mean().item() if valid.any() else float("nan"),
         "reward_std": _valid_group_std(rewards, valid, g).mean().item(),
         "frac_reward_zero_std": zero_std_groups(rewards, g, valid).double().mean().item()}
    for f, n in enumerate(names):
        col = per_fn[:, f]
        col = col[~torch.isnan(col)]
        m[f"{n}/mean"] = col.mean().item() if col.numel() else float("nan")
        m[f"{n}/std"] = col.std().item() if col.numel() > 1 else 0.0
    m.update({"completion_length/mean": lengths.mean().item(), "completion_length/min": lengths.min().item(),
              "completion_length/max": lengths.max().item(), "truncated_frac": truncated.mean().item()})

    # Update metrics are means over this rank's micro-batches; average them over ranks.
    keys = ["loss", "kl", "clip_frac", "clip_frac_low", "clip_frac_high", "ratio_mean", "entropy"]
    vec = torch.tensor([upd[k] for k in keys], dtype=torch.float64)
    if dist.is_initialized():
        vec = vec.to(trainer.info.device)
        dist.all_reduce(vec)
        vec = (vec / dist.get_world_size()).cpu()
    m.update(dict(zip(keys, vec.tolist())))
    m["grad_norm"] = upd["grad_norm"]
    m["skipped_update"] = upd["skipped_update"]
    m["lr"] = trainer.scheduler.get_last_lr()[0]
    for k in ("time/generate", "time/score"):
        m[k] = stats[k]
    m["time/logprob"] = upd["time/logprob"]
    m["time/update"] = upd["time/update"]
    m["time/step"] = step_time
    m["tokens_per_s"] = float(lengths.sum().item()) / max(step_time, 1e-9)
    for k, v in pop_reward_metrics().items():
        m[f"rewards/{k}"] = v
    return m
