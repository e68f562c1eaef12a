"""Problems in, verdicts out: the training and held-out problems of a data section, their
prompts as token ids, and the held-out evaluation that GRPO, SFT and the pipeline report.

Held-out means never trained on: `held_out_records` applies one rule to every stage
(`data.loaders.load_held_out`): the same source's test split, or the other side of training's
seeded cut; another source's test split, else all of its rows.
"""
from __future__ import annotations

import dataclasses

import torch

from data.prompts import render_prompt
from data.task import task_records
from infra.config import ConfigError
from infra.dist import DistInfo, all_reduce_sum
from infra.engine import Engine
from infra.sections import EMBEDDED, DataConfig
from rewards import accuracy_reward, format_reward


def _single(d: DataConfig, source: str) -> DataConfig:
    return dataclasses.replace(d, source=source)


def _load_train(d: DataConfig, seed: int) -> list[dict]:
    from data import load_records
    from data.prompts import resolve_system_prompt
    system_prompt = resolve_system_prompt(d.system_prompt)
    if d.source == EMBEDDED:
        return task_records(d.task, d.num_train, seed=seed, split="train", system_prompt=system_prompt)
    return list(load_records(d.source, schema=d.schema, split=d.train_split, on_bad_row=d.on_bad_row,
                             test_size=d.test_size, seed=seed, system_prompt=system_prompt,
                             columns=d.columns).records)


def train_records(d: DataConfig, seed: int, say=None) -> list[dict]:
    """The training problems of a data section (GRPO prompts, rejection sampling, distillation).
    Several weighted sources (`a.jsonl:0.7,b.jsonl:0.3`) are mixed by data/mixing.py; `say`
    (a print function, or None) then gets one line per source."""
    from data.mixing import mix_records, parse_sources
    parts = parse_sources(d.source)
    if len(parts) == 1:
        return _load_train(_single(d, parts[0][0]), seed)
    pool, lines = mix_records([(s, _load_train(_single(d, s), seed), w) for s, w in parts], seed)
    if say is not None:
        say(f"data mix of {len(parts)} sources, {len(pool)} problems: {'; '.join(lines)}")
    return pool


def held_out_records(d: DataConfig, seed: int) -> list[dict]:
    """The first `num_eval` held-out problems of a data section (module docstring). Of several
    weighted sources without an `eval_source`: each one's held-out problems, in the share of
    its weight."""
    from data import load_held_out
    from data.mixing import parse_sources, shares
    from data.prompts import resolve_system_prompt
    system_prompt = resolve_system_prompt(d.system_prompt)
    parts = parse_sources(d.source)
    if len(parts) > 1 and not d.eval_source:
        counts = shares(d.num_eval, [w for _, w in parts])
        return [r for (s, _), n in zip(parts, counts)
                for r in held_out_records(dataclasses.replace(d, source=s, num_eval=n), seed)]
    source = parts[0][0] if len(parts) == 1 else d.source  # several: evaluated on eval_source alone
    if source == EMBEDDED:
        return task_records(d.task, d.num_eval, seed=seed, split="test", system_prompt=system_prompt)
    return list(load_held_out(source, d.eval_source, train_split=d.train_split,
                              eval_split=d.eval_split, schema=d.schema, on_bad_row=d.on_bad_row,
                              test_size=d.test_size, seed=seed, system_prompt=system_prompt,
                              columns=d.columns).records[: d.num_eval])


def training_prompts(tokenizer, records: list[dict], d: DataConfig, option: str, tag: str,
                     main: bool) -> tuple[list[dict], list[list[int]], int]:
    """`encode_prompts` for training or sampling: refuses a source left with no prompt, says how
    many were dropped for length."""
    kept, ids, dropped = encode_prompts(tokenizer, records, d.max_prompt_tokens)
    if not kept:
        raise ConfigError(f"--{option}.source={d.source!r}: no prompts left (dropped {dropped} longer than "
                          f"--{option}.max_prompt_tokens={d.max_prompt_tokens})")
    if main and dropped:
        print(f"[{tag}] dropped {dropped} prompts longer than {d.max_prompt_tokens} tokens", flush=True)
    return kept, ids, dropped


def encode_prompts(tokenizer, records: list[dict], max_prompt_tokens: int | None = None):
    """Render each record's prompt ([system, user] chat) with the chat template (`render_prompt`:
    merged into the user turn where the template has no system role) and tokenize it.

    Returns (kept records, their token lists, number dropped for length).
    """
    kept, ids, dropped = [], [], 0
    for r in records:
        text = render_prompt(tokenizer, r["prompt"], add_generation_prompt=True)
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        if max_prompt_tokens and len(toks) > max_prompt_tokens:
            dropped += 1
            continue
        kept.append(r)
        ids.append(toks)
    return kept, ids, dropped


@torch.no_grad()
def evaluate(engine: Engine, records: list[dict], prompt_ids: list[list[int]], info: DistInfo, *,
             max_new_tokens: int, batch_size: int = 64, temperature: float = 0.0, seed: int = 0,
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
