"""Speed of every reward on 1,024 GSM8K-style completions: single process vs pool, one table.

Completions are built from gsm8k_test.jsonl (the committed sample if the shared data is
missing) in eight shapes: bare right and wrong answers, `$N$`, `\\boxed{N}` inside and outside
the tags, "N dollars", `\\frac{2N}{2}`, and a repetitive ramble. `completion_ids` are fake
token lists of len(text) / 4 tokens. For accuracy and cosine, "single" is one verifier worker
process and "pool" is `pool_size` workers; both with and without the in-process number fast
path, with the verdict cache cleared before each run, and with warm workers (start-up is
timed once, separately). The other rewards are pure Python in the caller's process.

Then the text-only rewards on hostile completions of `--hostile-chars` characters (shapes that
made a backtracking regex quadratic), one call each, seconds (`--hostile-only` skips the rest).

    python bench/bench_rewards.py [--n 1024] [--pool-size 0] [--repeats 3] [--hostile-chars N]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from r1train.rewards import (  # noqa: E402
    REWARD_NAMES,
    AnswerChecker,
    RewardConfig,
    get_accuracy_reward,
    get_cosine_scaled_reward,
    get_reward_functions,
    pop_reward_metrics,
)
from r1train.rewards.verifier_pool import shared_pool  # noqa: E402

SYSTEM = "Think in <think></think>, then answer in <answer></answer>."


def build_batch(n: int) -> tuple[list[str], dict[str, list]]:
    path = ROOT.parent / "shared" / "data" / "gsm8k_test.jsonl"
    if not path.exists():
        path = ROOT / "tests" / "assets" / "gsm8k_test_sample.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    comps, cols = [], {"answer": [], "solution": [], "problem": [], "prompt": [],
                       "completion_ids": []}
    for i in range(n):
        row = rows[i % len(rows)]
        worked, gold = (s.strip() for s in row["answer"].rsplit("####", 1))
        value = int(gold.replace(",", ""))
        think = f"<think>{worked}</think>"
        comps.append([
            f"{think}<answer>{gold}</answer>",
            f"{think}<answer>{value + 1}</answer>",
            f"{think}<answer>${gold}$</answer>",
            f"{think}\n<answer>\\boxed{{{gold}}}</answer>",
            f"{worked}\nSo the answer is \\boxed{{{gold}}}.",
            f"{think}<answer>{gold} dollars</answer>",
            f"{think}<answer>\\frac{{{2 * value}}}{{2}}</answer>",
            "<think>" + "First, we add the numbers. " * 20 + f"</think><answer>{gold}</answer>",
        ][i % 8])
        cols["answer"].append(gold)
        cols["solution"].append(row["answer"])
        cols["problem"].append(row["question"])
        cols["prompt"].append([{"role": "system", "content": SYSTEM},
                               {"role": "user", "content": row["question"]}])
        cols["completion_ids"].append([0] * math.ceil(len(comps[-1]) / 4))
    return comps, cols


def best_rate(fn, comps, cols, repeats, before=None) -> float:
    """Completions per second of the best of `repeats` runs."""
    best = math.inf
    for _ in range(repeats):
        if before:
            before()
        start = time.perf_counter()
        fn(comps, **cols)
        best = min(best, time.perf_counter() - start)
    return len(comps) / best


def hostile_completions(chars: int) -> dict[str, str]:
    """Completions of about `chars` characters that a backtracking regex can choke on."""
    return {
        # no </answer> at all: `.*?</answer>$` scanned to the end from every </think>
        "'<think>' + '</think><answer>' * k": "<think>" + "</think><answer>" * (chars // 16),
        # no closer: `\\(.*?\\)` scanned to the end from every opener
        "'\\(' * k": "\\(" * (chars // 2),
        "'\\[' * k": "\\[" * (chars // 2),
    }


def hostile_table(chars: int) -> None:
    names = [n for n in REWARD_NAMES if n not in ("accuracy", "cosine")]
    fns = get_reward_functions(names)
    print("\ntext-only rewards on one hostile completion, seconds per call")
    print(f"{'completion':<36} {'chars':>8} " + " ".join(f"{n[:12]:>12}" for n in names))
    for label, text in hostile_completions(chars).items():
        times = []
        for _, fn, _ in fns:
            start = time.perf_counter()
            fn([text], prompt=["What is 2 + 2?"])
            times.append(time.perf_counter() - start)
        print(f"{label:<36} {len(text):>8,} " + " ".join(f"{t:>12.4f}" for t in times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1024, help="completions in the batch")
    parser.add_argument("--pool-size", type=int, default=0, help="pool workers; 0: min(4, CPUs)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per cell (best is kept)")
    parser.add_argument("--hostile-chars", type=int, default=192_000,
                        help="length of the hostile completions")
    parser.add_argument("--hostile-only", action="store_true", help="only the hostile table")
    args = parser.parse_args()
    if args.hostile_only:
        return hostile_table(args.hostile_chars)
    comps, cols = build_batch(args.n)
    pool_size = args.pool_size or min(4, os.cpu_count() or 1)

    start = time.perf_counter()
    shared_pool().run([("1", "1", True)] * pool_size, 120.0, n_workers=pool_size)
    startup = time.perf_counter() - start

    rows = []
    for name, fn, _ in get_reward_functions([n for n in REWARD_NAMES
                                             if n not in ("accuracy", "cosine")]):
        rows.append((name, best_rate(fn, comps, cols, args.repeats), None))
    for fast_path in (True, False):
        suffix = "" if fast_path else " (no fast path)"
        for name, factory in (("accuracy", lambda c: get_accuracy_reward(checker=c)),
                              ("cosine", lambda c: get_cosine_scaled_reward(checker=c))):
            rates = []
            for threshold in (10**9, 1):  # never / always use the pool
                checker = AnswerChecker(fast_path=fast_path, pool_size=pool_size,
                                        pool_threshold=threshold)
                rates.append(best_rate(factory(checker), comps, cols, args.repeats,
                                       before=checker.clear_cache))
            rows.append((name + suffix, *rates))

    # All rewards as a trainer calls them: a fresh registry per step (so an empty verdict
    # cache), accuracy then cosine sharing verdicts.
    rates = []
    for threshold in (10**9, 1):
        config = RewardConfig(accuracy_pool_size=pool_size, accuracy_pool_threshold=threshold)

        def all_rewards(c, config=config, **kw):
            for _, f, _ in get_reward_functions(list(REWARD_NAMES), config):
                f(c, **kw)
        rates.append(best_rate(all_rewards, comps, cols, args.repeats))
    rows.append(("all 8 rewards", *rates))

    print(f"{len(comps)} completions (GSM8K-style, 8 shapes), pool = {pool_size} worker "
          f"processes, {os.cpu_count()} CPUs; worker start-up (cold, {pool_size} in parallel) "
          f"{startup:.2f} s\n")
    print(f"{'reward':<28} {'single process':>16} {'pool':>16}   completions/s")
    for name, single, pooled in rows:
        pooled_text = f"{pooled:>16,.0f}" if pooled is not None else f"{'(in-process)':>16}"
        print(f"{name:<28} {single:>16,.0f} {pooled_text}")
    metrics = pop_reward_metrics()
    print(f"\ntimeouts: {metrics.get('accuracy/timeouts', 0):.0f}, "
          f"verified by workers: {metrics.get('accuracy/verified', 0):.0f}, "
          f"fast path: {metrics.get('accuracy/fast_path', 0):.0f}")
    hostile_table(args.hostile_chars)


if __name__ == "__main__":
    main()
