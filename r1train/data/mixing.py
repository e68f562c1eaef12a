"""Several training sources with weights: `--data.source a.jsonl:0.7,b.jsonl:0.3`.

The mixed pool has as many rows as the sources together (as if they were concatenated) and
each source's share of it is its weight (normalized to sum to 1; largest remainders settle the
rounding). A source that has more rows than its share gives a seeded sample of them, one with
fewer gives all of its rows, then repeats them in seeded order: a small, high-weight set is
seen more often, as a weighted sampler would show it. The trainers then read the pool as they
read one source (seeded epoch-wise permutations), so a run's steps see the weights on average.
Departure from a per-step weighted sampler (TRL, verl): the proportions hold over the pool, not
within each step.
"""
from __future__ import annotations

import math
import random


def parse_sources(text: str) -> list[tuple[str, float | None]]:
    """"a.jsonl:0.7,b.jsonl:0.3" -> [("a.jsonl", 0.7), ("b.jsonl", 0.3)]; one source without a
    weight -> [(source, None)]. ValueError naming the entry for a weight that is not a finite
    number > 0, or the list for weights whose sum is not finite (1e308,1e308: the shares would be
    NaN) or that weights some sources and not others."""
    parts = [p.strip() for p in text.split(",")] if "," in text else [text.strip()]
    out = []
    for part in parts:
        source, colon, weight = part.rpartition(":")
        try:
            w = float(weight) if colon else None
        except ValueError:
            w = None
        if w is None:
            out.append((part, None))
            continue
        if not (math.isfinite(w) and w > 0):
            raise ValueError(f"{part!r}: the weight must be a finite number > 0")
        out.append((source.strip(), w))
    if any(not s for s, _ in out):
        raise ValueError(f"{text!r}: an empty source in the list")
    if len(out) > 1 and any(w is None for _, w in out):
        raise ValueError(f"{text!r}: give every source a weight (a.jsonl:0.7,b.jsonl:0.3)")
    if not math.isfinite(sum(w or 0.0 for _, w in out)):
        raise ValueError(f"{text!r}: the weights add up to more than the largest float; only their ratios "
                         f"count, so scale them down (a.jsonl:0.7,b.jsonl:0.3)")
    return out


def shares(total: int, weights: list[float]) -> list[int]:
    """`total` split in proportion to `weights` (largest remainders): sums to `total`. Each weight
    is divided by the sum first: `total * w` can overflow (1e308 * 18) where `w / sum` cannot."""
    exact = [total * (w / sum(weights)) for w in weights]
    counts = [math.floor(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: counts[i] - exact[i])[: total - sum(counts)]:
        counts[i] += 1
    return counts


def mix_records(parts: list[tuple[str, list[dict], float]], seed: int) -> tuple[list[dict], list[str]]:
    """(the mixed pool, one report line per source) of [(source, records, weight)]."""
    counts = shares(sum(len(r) for _, r, _ in parts), [w for _, _, w in parts])
    pool, lines = [], []
    for k, ((source, records, weight), n) in enumerate(zip(parts, counts)):
        rng = random.Random(f"{seed}-mix-{k}")
        taken = []
        while len(taken) < n:  # a seeded pass over the rows, again while more are needed
            order = list(range(len(records)))
            rng.shuffle(order)
            taken += order[: n - len(taken)]
        pool += [records[i] for i in sorted(taken)] if n <= len(records) else [records[i] for i in taken]
        lines.append(f"{source}: {n} rows (weight {weight:g}, {len(records)} in the source"
                     f"{', repeated' if n > len(records) else ''})")
    return pool, lines
