"""The data of one GRPO step on one rank, typed: every phase reads and fills the same tensors.

The rollout's tensors are collated once into `[N, P + T]` sequences (prompts left-padded to P,
completions right-padded to T); scoring adds rewards and advantages, the log-prob phase old and
reference log-probs, and the update slices micro-batches out of it. A micro-batch is trimmed to
its own rows' longest prompt and completion, so that it computes no more padding than a batch
collated from those rows alone would (and the same numbers).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from infra.engine import Rollout, position_ids_from_mask


@dataclass
class GRPOBatch:
    input_ids: torch.Tensor        # [N, P + T] prompt (left-padded) then completion (right-padded)
    attention_mask: torch.Tensor   # [N, P + T] 1 on real prompt and completion tokens
    prompt_len: int                # P: completion token t sits at column P + t
    completion_ids: torch.Tensor   # [N, T] pad after each completion's end
    completion_mask: torch.Tensor  # [N, T] 1 on completion tokens (up to and including EOS)
    truncated: torch.Tensor        # [N] bool: hit max_new_tokens
    texts: list[str]               # N decoded completions
    records: list[dict]            # N problems (each repeated group_size times)
    per_fn: torch.Tensor | None = None       # [N, F] each reward function's value, NaN = no opinion
    rewards: torch.Tensor | None = None      # [N] weighted total (0.0 where every function abstained)
    advantages: torch.Tensor | None = None   # [N]
    loss_weight: torch.Tensor | None = None  # [N] 1.0, or 0.0 for rows left out of the loss
    old_logps: torch.Tensor | None = None    # [N, T] log pi_old, when num_iterations > 1
    ref_logps: torch.Tensor | None = None    # [N, T] log pi_ref, when beta > 0

    @classmethod
    def from_rollouts(cls, rollouts: list[Rollout], records: list[dict], pad_id: int) -> "GRPOBatch":
        """One batch from the rollouts of a step's generation chunks (`records`: one per row)."""
        P = max(r.prompt_ids.shape[1] for r in rollouts)
        T = max(r.completion_ids.shape[1] for r in rollouts)

        def widen(x, width, left, value):  # [b, w] -> [b, width], padded on one side
            pad = torch.full((x.shape[0], width - x.shape[1]), value, dtype=x.dtype, device=x.device)
            return torch.cat([pad, x] if left else [x, pad], dim=1)
        prompt = torch.cat([widen(r.prompt_ids, P, True, pad_id) for r in rollouts])  # [N, P]
        prompt_mask = torch.cat([widen(r.prompt_mask, P, True, 0) for r in rollouts])  # [N, P]
        completion = torch.cat([widen(r.completion_ids, T, False, pad_id) for r in rollouts])  # [N, T]
        completion_mask = torch.cat([widen(r.completion_mask, T, False, 0) for r in rollouts])  # [N, T]
        return cls(input_ids=torch.cat([prompt, completion], dim=1),
                   attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
                   prompt_len=P, completion_ids=completion, completion_mask=completion_mask,
                   truncated=torch.cat([r.truncated for r in rollouts]),
                   texts=[t for r in rollouts for t in r.texts], records=records)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def position_ids(self) -> torch.Tensor:
        return position_ids_from_mask(self.attention_mask)  # [N, P + T]

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(-1)  # [N]

    @property
    def loss_mask(self) -> torch.Tensor:
        """[N, T] float: completion tokens of the rows that count in the loss."""
        weight = self.loss_weight.to(self.completion_mask.device, torch.float32)
        return self.completion_mask.float() * weight[:, None]

    def completion_lists(self) -> list[list[int]]:
        """Each completion's tokens, without padding."""
        return [ids[m.bool()].tolist() for ids, m in zip(self.completion_ids, self.completion_mask)]

    def micro(self, rows: list[int]) -> "GRPOBatch":
        """Rows `rows`, trimmed to their longest prompt and completion (module docstring)."""
        idx = torch.tensor(rows, device=self.input_ids.device)
        prompt_lens = self.attention_mask[idx, : self.prompt_len].sum(-1)  # [n]
        p = int(prompt_lens.max())
        t = max(int(self.completion_mask[idx].sum(-1).max()), 1)
        cols = torch.arange(self.prompt_len - p, self.prompt_len + t, device=idx.device)

        def pick(x):  # rows of a tensor, on whichever device it lives
            return None if x is None else x[idx.to(x.device)]

        def take(x):  # rows, and the first t completion columns
            return None if x is None else pick(x)[:, :t]
        return replace(self, input_ids=self.input_ids[idx][:, cols],
                       attention_mask=self.attention_mask[idx][:, cols], prompt_len=p,
                       completion_ids=take(self.completion_ids), completion_mask=take(self.completion_mask),
                       truncated=pick(self.truncated), texts=[self.texts[i] for i in rows],
                       records=[self.records[i] for i in rows], per_fn=pick(self.per_fn),
                       rewards=pick(self.rewards), advantages=pick(self.advantages),
                       loss_weight=pick(self.loss_weight), old_logps=take(self.old_logps),
                       ref_logps=take(self.ref_logps))

    def set_logps(self, name: str, rows: list[int], values: torch.Tensor) -> None:
        """Store a micro-batch's [n, t] log-probs into the [N, T] tensor `name` (zero elsewhere)."""
        full = getattr(self, name)
        if full is None:
            full = torch.zeros(self.completion_ids.shape, dtype=values.dtype, device=values.device)
            setattr(self, name, full)
        full[torch.tensor(rows, device=full.device), : values.shape[1]] = values
