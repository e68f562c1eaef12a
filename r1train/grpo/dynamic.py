"""DAPO dynamic sampling (Yu et al. 2025, "DAPO", Sec. 3.2): train on groups whose rewards differ.

DAPO takes its objective (Eq. 11) subject to 0 < |{o_i : is_equivalent(a, o_i)}| < G: a group in
which every completion is right, or every one wrong, has advantage 0 on every token and teaches
nothing (with beta > 0, only the KL term). DAPO over-samples and filters out the prompts whose
accuracy is 1 or 0, sampling until the batch is full of groups that carry a signal.
Here "carries a signal" is `advantages.zero_std_groups` negated: the weighted rewards of a
group's valid rows are not all equal (any reward, not accuracy alone; verl's
`algorithm.filter_groups.metric` picks one reward instead).

One step with `grpo.dynamic_sampling` (`GRPOTrainer.rollout`), P = prompts_per_step:

- Round k generates P new groups: the next P prompts of the seeded epoch order, split over the
  ranks as a plain step splits them. Candidate group c = k * P + s (s: the prompt's place in its
  round) samples its rows with `row_seed(seed, step, c * G + j)`, so round 0 is the plain step,
  row for row, and no candidate's completions depend on the world size.
- After each round the zero-std flags of every rank are gathered (in candidate order), and
  rounds go on until P groups with signal are found or `grpo.max_generation_rounds` have run.
- The trained groups (`select_groups`): the first P groups with signal, in candidate order; the
  surplus of the last round is dropped, as verl aligns its batch (`batch[:train_batch_size * n]`).
- At the cap with fewer than P, the earliest zero-signal groups fill the batch. Departure: verl
  raises ("Generated too many. Please check if your data are too difficult"); here the step
  trains as a step without dynamic sampling would on those groups (advantage 0, loss_weight 0
  with grpo.drop_zero_std_groups), the batch keeps its size (memory, micro-batches, the N of the
  "grpo" and "dr_grpo" losses), and `frac_reward_zero_std` > 0 says it happened.
- Rank r trains on trained groups r * P/W .. (r+1) * P/W - 1, whoever generated them: the groups
  that change rank travel as token ids, masks, texts and per-function rewards
  (`gather_trained_groups`, one all-gather of Python objects), and each rank rebuilds its batch
  from token ids (`batch_of_groups`). Selection and order depend on no world size, so 1 and 2
  processes train the same batch. Simpler than a rank-local rule: any rule that never moves a
  row either keeps different groups on different world sizes or refills each rank's own slots,
  which needs more rounds for the same batch.

The data position moves by every prompt generated (k rounds: k * P), so a prompt is drawn once
per epoch whether kept or not; the trainer keeps the position in its checkpoints.
"""
from __future__ import annotations

import torch

from r1train.grpo.batch import GRPOBatch
from r1train.model.engine import Rollout
from r1train.run.dist import all_gather_objects


def select_groups(zero_std: torch.Tensor, target: int) -> list[int]:
    """The `target` groups a step trains on, in candidate (generation) order.

    zero_std: bool `[C]`, C >= target, one flag per candidate group in generation order (True: all
    rewards equal, no signal). The first `target` groups with signal; when there are fewer, the
    earliest groups without signal make up the number (module docstring: verl raises there).
    """
    if zero_std.dim() != 1 or zero_std.numel() < target:
        raise ValueError(f"select_groups: {tuple(zero_std.shape)} flags for {target} groups")
    signal = torch.nonzero(~zero_std).flatten().tolist()[:target]
    fill = torch.nonzero(zero_std).flatten().tolist()[:target - len(signal)]
    return sorted(signal + fill)


def group_rows(batch: GRPOBatch, group: int, group_size: int) -> dict:
    """Group `group` of a scored batch as CPU tensors and lists: what a group carries to the rank
    that trains it. Its prompt and record are not sent: every rank knows them from the order."""
    rows = slice(group * group_size, (group + 1) * group_size)
    t = max(int(batch.completion_mask[rows].sum(-1).max()), 1)
    return {"completion_ids": batch.completion_ids[rows, :t].cpu(),  # [G, t]
            "completion_mask": batch.completion_mask[rows, :t].cpu(),  # [G, t]
            "truncated": batch.truncated[rows].cpu(),  # [G]
            "texts": batch.texts[rows],
            "per_fn": batch.per_fn[rows].cpu(),  # [G, F]
            # [G, t] the sampler's log-probs (grpo.rollout_correction, mismatch_kl), when recorded
            "sampler_logps": None if batch.sampler_logps is None else batch.sampler_logps[rows, :t].cpu(),
            # [G, t] multi-turn rows: the tokens the model wrote (0 on inserted tool turns)
            "model_mask": None if batch.model_mask is None else batch.model_mask[rows, :t].cpu(),
            "episodes": None if batch.episodes is None else batch.episodes[rows]}


def batch_of_groups(groups: list[dict], prompts: list[list[int]], records: list[dict], group_size: int,
                    pad_id: int, device) -> GRPOBatch:
    """A scored batch from `group_rows` groups and each group's prompt tokens and record, in order:
    the layout a step without dynamic sampling collates (each prompt repeated group_size times)."""
    rollouts = []
    for grp, prompt in zip(groups, prompts):
        ids = torch.tensor(prompt, dtype=torch.long, device=device).repeat(group_size, 1)  # [G, p]
        rollouts.append(Rollout(prompt_ids=ids, prompt_mask=torch.ones_like(ids),
                                completion_ids=grp["completion_ids"].to(device),
                                completion_mask=grp["completion_mask"].to(device),
                                truncated=grp["truncated"].to(device), texts=list(grp["texts"]),
                                logps=None if grp["sampler_logps"] is None else grp["sampler_logps"].to(device),
                                model_mask=None if grp.get("model_mask") is None else grp["model_mask"].to(device),
                                episodes=grp.get("episodes")))
    batch = GRPOBatch.from_rollouts(rollouts, [r for r in records for _ in range(group_size)], pad_id)
    batch.per_fn = torch.cat([grp["per_fn"] for grp in groups])  # [N, F]
    return batch


def gather_trained_groups(rounds: list[GRPOBatch], kept: list[int], rank: int, world_size: int,
                          group_size: int) -> list[dict]:
    """This rank's share of the trained groups `kept` (P candidate indices, `select_groups`), as
    `group_rows`. `rounds[k]`: this rank's scored batch of round k, holding the candidates
    k * P + rank * P/W + (0 .. P/W - 1).

    Collective. A group trained on the rank that generated it stays; the others go to every rank
    in one all-gather of Python objects (token ids and rewards, a small part of what the step
    generated; point-to-point sends would cut it to each rank's own), and each takes its own."""
    P = len(kept)
    per_rank = P // world_size
    owner = lambda c: (c % P) // per_rank  # noqa: E731  the rank that generated candidate c
    local = lambda c: group_rows(rounds[c // P], (c % P) % per_rank, group_size)  # noqa: E731
    send = {c: local(c) for i, c in enumerate(kept) if owner(c) == rank and i // per_rank != rank}
    received = {}
    for part in all_gather_objects(send):
        received.update(part)
    mine = kept[rank * per_rank:(rank + 1) * per_rank]
    return [local(c) if owner(c) == rank else received[c] for c in mine]
