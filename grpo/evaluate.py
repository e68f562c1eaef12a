"""Held-out evaluation: greedy (or sampled) completions on problems the model never trains on,
scored with the same reward code as training. Shared by GRPO, SFT and the pipeline.
"""
from __future__ import annotations

import torch

from rewards import accuracy_reward, format_reward
from grpo.rollout import generate, pad_prompts
from infra.dist import DistInfo, all_reduce_sum, set_gathered


def encode_prompts(tokenizer, records: list[dict], max_prompt_tokens: int | None = None):
    """Render each record's [system, user] prompt with the chat template and tokenize it.

    Returns (kept records, their token lists, number dropped for length).
    """
    kept, ids, dropped = [], [], 0
    for r in records:
        text = tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        if max_prompt_tokens and len(toks) > max_prompt_tokens:
            dropped += 1
            continue
        kept.append(r)
        ids.append(toks)
    return kept, ids, dropped


def all_done_fn(info: DistInfo, device):
    """Ranks agree to stop generating only when every rank is done (FSDP needs equal forwards)."""
    if not info.distributed:
        return None

    def all_done(local: bool) -> bool:
        flag = torch.tensor([0.0 if local else 1.0], device=device)
        return all_reduce_sum(flag).item() == 0

    return all_done


@torch.no_grad()
def evaluate(model, tokenizer, records: list[dict], prompt_ids: list[list[int]], info: DistInfo, *,
             max_new_tokens: int, batch_size: int = 64, temperature: float = 0.0, seed: int = 0,
             eos_token_ids=None, return_samples: int = 0) -> dict:
    """Accuracy (math_verify against the gold), format rate (strict R1 format) and mean length.

    Each rank evaluates a strided shard; the sums are all-reduced, so every rank gets the same
    numbers. Ranks with fewer rows still join every generation call (FSDP needs it).
    """
    model.eval()
    set_gathered(model, True)
    mine = list(range(info.rank, len(records), info.world_size))
    n_batches = -(-len(records) // (info.world_size * batch_size))
    sums = torch.zeros(4, dtype=torch.float64)  # correct, formatted, tokens, count
    samples = []
    for b in range(n_batches):
        idx = mine[b * batch_size:(b + 1) * batch_size]
        rows = idx if idx else mine[:1] or [0]  # an idle rank generates a dummy row
        ids, mask = pad_prompts([prompt_ids[i] for i in rows], tokenizer.pad_token_id, info.device)
        out = generate(model, tokenizer, ids, mask, seeds=[seed * 1_000_003 + i for i in rows],
                       max_new_tokens=max_new_tokens, temperature=temperature,
                       eos_token_ids=eos_token_ids, all_done=all_done_fn(info, info.device))
        if not idx:
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
    set_gathered(model, False)
    model.train()
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
