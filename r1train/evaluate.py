"""Held-out evaluation: accuracy, format rate and mean length of greedy (or sampled) completions,
what GRPO, SFT and the pipeline report. The problems come from data/problems.py."""
from __future__ import annotations

import torch

from r1train.model.engine import Engine
from r1train.rewards import accuracy_reward, format_reward
from r1train.run.dist import DistInfo, all_reduce_sum

EVAL_BATCH_SIZE = 64  # prompts generated at once per rank (the stages' memory estimates count them)


@torch.no_grad()
def evaluate(engine: Engine, records: list[dict], prompt_ids: list[list[int]], info: DistInfo, *,
             max_new_tokens: int, batch_size: int = EVAL_BATCH_SIZE, temperature: float = 0.0, seed: int = 0,
             return_samples: int = 0) -> dict:
    """Accuracy (math_verify against the gold), format rate (strict R1 format) and mean length.

    Each rank evaluates a strided shard; the sums are all-reduced, so every rank gets the same
    numbers. `return_samples`: also the first N completions with their verdicts (every rank's).
    """
    mine = list(range(info.rank, len(records), info.world_size))
    n_batches = -(-len(records) // (info.world_size * batch_size))
    sums = torch.zeros(4, dtype=torch.float64)  # correct, formatted, tokens, count
    samples = []
    for b in range(n_batches):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        out = engine.generate([prompt_ids[i] for i in idx], [seed * 1_000_003 + i for i in idx],
                              max_new_tokens=max_new_tokens, temperature=temperature)
        if out is None:  # this rank had no problem left; it joined the generation all the same
            continue
        recs = [records[i] for i in idx]
        acc = accuracy_reward(out.texts, solution=[r["solution"] for r in recs],
                              answer=[r["answer"] for r in recs])
        fmt = format_reward(out.texts)
        sums += torch.tensor([sum(a or 0.0 for a in acc), sum(fmt), float(out.lengths.sum()), len(idx)],
                             dtype=torch.float64)
        if len(samples) < return_samples:
            samples += [{"problem": r["problem"], "answer": r["answer"], "completion": t,
                         "accuracy": a, "format": f} for r, t, a, f in zip(recs, out.texts, acc, fmt)]
    sums = all_reduce_sum(sums.to(info.device)).cpu()
    n = max(sums[3].item(), 1.0)
    result = {"accuracy": sums[0].item() / n, "format": sums[1].item() / n,
              "mean_length": sums[2].item() / n, "num_problems": int(sums[3].item())}
    if return_samples:
        if torch.distributed.is_initialized():  # every rank's share, in problem order
            shares = [None] * info.world_size
            torch.distributed.all_gather_object(shares, samples)
            w = info.world_size  # rank r evaluated problems r, r + w, r + 2w, ...
            samples = [shares[i % w][i // w] for i in range(len(records)) if i // w < len(shares[i % w])]
        result["samples"] = samples[:return_samples]
    return result
