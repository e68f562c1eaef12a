"""Held-out evaluation: accuracy, format rate and mean length of greedy (or sampled) completions,
what GRPO, SFT and the pipeline report. The problems come from data/problems.py.

With `--eval.samples k` > 1 each problem gets k sampled completions, and besides the means over
all samples the evaluation reports
- pass@1 .. pass@k: the unbiased estimator of Chen et al. 2021 ("Evaluating Large Language
  Models Trained on Code", Eq. 1) with n = k samples per problem (`pass_at_k`);
- maj@k: the majority vote over the k samples' final answers (`majority_vote`), as DeepSeek-R1
  reports cons@64 and Minerva maj1@k.
A sample counts as correct when its accuracy reward is 1.0 (an unparseable gold, which scores
0.5 under "neutral", is correct for no sample).

Every evaluation also says how far to trust it: `accuracy_se`, the standard error of the accuracy
over the problems (`standard_error`), and, from the second evaluation of a run on, `gain` and
`gain_se`: the change since the run's first evaluation and its standard error, paired on the same
problems (`paired_gain`). A gain of 3 standard errors is what the recipes call a result.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from r1train.data.prompts import with_prefix
from r1train.model.engine import Engine, row_seed
from r1train.rewards import accuracy_reward, format_reward
from r1train.rewards.math_answer import extract_answer_span, plain_number
from r1train.run.dist import DistInfo, all_gather_objects, all_reduce_sum

EVAL_BATCH_SIZE = 64  # completions generated at once per rank (the stages' memory estimates count them)


# ---- the estimators ------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n, c of them
    correct, is correct: Chen et al. 2021, Eq. 1, for one problem,

        pass@k = 1 - C(n - c, k) / C(n, k)

    computed in the numerically stable product form of the paper's Figure 3,
        C(n - c, k) / C(n, k) = prod_{i = n - c + 1}^{n} (1 - k / i),
    which never forms the binomials (C(200, 100) overflows float64's 53-bit mantissa). Averaged
    over problems it is the unbiased estimate of pass@k from n >= k samples each.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def majority_vote(answers: Sequence[str | None]) -> int | None:
    """maj@k's vote: the index of the sample whose answer wins, or None when no sample votes.

    `answers[j]` is sample j's normalized final answer (`final_answer`), None when it has none:
    such a sample does not vote. Answers are equal when their strings are equal (the
    normalization makes 18, 18.0, \\boxed{18} and $18$ one answer; it is not math_verify's
    symbolic equality, so 1/2 and 0.5 are two answers). The answer given by the most samples
    wins; a tie goes to the answer that came first (lowest sample index). The returned index is
    that answer's first sample: the vote is correct when that sample is.
    """
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for j, a in enumerate(answers):
        if a is None:
            continue
        counts[a] = counts.get(a, 0) + 1
        first.setdefault(a, j)
    if not counts:
        return None
    # max over first-appearance order keeps the earliest of equal counts
    return first[max(counts, key=lambda a: (counts[a], -first[a]))]


def standard_error(scores: Sequence[float]) -> float:
    """Standard error of the mean of per-problem scores: sqrt(s^2 / n), s^2 the sample variance
    (n - 1 in the denominator) of the scores, n the number of problems.

    The central-limit estimate that Miller 2024 ("Adding Error Bars to Evals", arXiv:2411.00640)
    recommends for evals; with k samples a problem, a problem's score is the mean of its k
    verdicts and the problems, not the samples, are the independent draws (resampling a question
    shrinks only the within-problem part of the variance, as that paper says). For 0/1 scores it
    is sqrt(p (1 - p) / (n - 1)). Like every CLT interval it is too narrow near 0% and 100% (at 0
    of n it is 0): read it as the scale of the noise, not as a bound. 0 for fewer than 2 problems.
    """
    n = len(scores)
    if n < 2:
        return 0.0
    mean = math.fsum(scores) / n
    return math.sqrt(math.fsum((x - mean) ** 2 for x in scores) / (n - 1) / n)


def paired_gain(before: Sequence[float], after: Sequence[float]) -> tuple[float, float]:
    """(mean of after_i - before_i, its standard error) over the same problems i.

    As Miller 2024 recommends for two evaluations on the same questions: the per-question
    differences, whose variance is Var(before) + Var(after) - 2 Cov(before, after), smaller than
    the unpaired sum when the two scores agree; the standard error is `standard_error` of them.
    A problem both models solve, or both miss, adds no noise to the gain.
    """
    if len(before) != len(after):
        raise ValueError(f"paired_gain needs the same problems: {len(before)} scores before, {len(after)} after")
    diffs = [a - b for a, b in zip(after, before)]
    return (math.fsum(diffs) / len(diffs) if diffs else 0.0), standard_error(diffs)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` in `text` (braces matched), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j]
    return None


def final_answer(completion: str) -> str | None:
    """A completion's final answer as maj@k compares it, or None when it has none.

    Where the accuracy reward looks (rewards/math_answer.py `extract_answer_span`): the last
    `<answer>` block (its last `\\boxed{}` when it holds one), else the whole text's last
    `\\boxed{}`. Normalized: whitespace and enclosing `$` removed; a plain number written as
    its exact decimal value (`18.00`, `1,000`, `$18` -> `18`, `1000`, `18`).
    """
    span, tagged = extract_answer_span(completion)
    if span is None:
        return None
    boxed = last_boxed(span)
    if boxed is not None:
        span = boxed
    elif not tagged:  # an untagged completion answers only in a \boxed{}
        return None
    number = plain_number(span)
    if number is not None:
        return "0" if number == 0 else format(number.normalize(), "f")
    span = "".join(span.split()).strip("$")
    return span or None


# ---- the evaluation ------------------------------------------------------------------------
def sample_seed(seed: int, problem: int, sample: int) -> int:
    """Seed of one completion: a function of (run seed, problem, sample) alone, so any world
    size, batch size and resume draw the same samples. Sample 0 keeps the single-sample seed."""
    base = seed * 1_000_003 + problem
    return base if sample == 0 else row_seed(base, 1, sample)


@torch.no_grad()
def evaluate(engine: Engine, records: list[dict], prompt_ids: list[list[int]], info: DistInfo, *,
             max_new_tokens: int, batch_size: int = EVAL_BATCH_SIZE, temperature: float = 0.0, seed: int = 0,
             return_samples: int = 0, samples: int = 1, response_prefix: str = "", turns=None) -> dict:
    """Accuracy (math_verify against the gold), format rate (strict R1 format) and mean length,
    means over every completion, the accuracy's standard error over the problems (`accuracy_se`)
    and each problem's score (`scores`: the share of its samples that are correct, in problem
    order, for paired comparisons); with `samples` = k > 1 also pass@1 .. pass@k and maj@k.

    Each rank evaluates a strided shard of the problems (all k samples of each), `batch_size`
    completions at a time; the sums and each problem's (correct count, vote) are all-reduced, so
    every rank gets the same numbers, computed in problem order. `return_samples`: also the
    completions of the first N problems with their verdicts (every rank's; a "sample" index
    when k > 1). `response_prefix`: the text that ends each prompt of `prompt_ids` (the data
    section's), read in front of each completion by the verdicts and the samples, as in training;
    the mean length counts the model's own tokens. `turns(records) -> tools.episodes.ToolEpisodes`:
    multi-turn rows with tools (rollout.tools), as in training; the verdicts read the whole reply
    (tool turns included, so the strict format rate counts a reply with tool turns as unformatted),
    the mean length the tokens the model wrote.
    """
    k = samples
    mine = list(range(info.rank, len(records), info.world_size))
    rows = [(i, j) for i in mine for j in range(k)]  # (problem, sample), problem-major
    most = -(-len(records) // info.world_size) * k  # rows of the rank with the most
    n_batches = -(-most // batch_size)  # every rank runs as many generations (collective)
    sums = torch.zeros(4, dtype=torch.float64)  # correct, formatted, tokens, count
    per_problem = torch.zeros(len(records), 2, dtype=torch.float64)  # [P, 2]: correct samples, vote correct
    correct: dict[int, list[bool]] = {}
    answers: dict[int, list[str | None]] = {}
    completions = []
    for b in range(n_batches):
        batch = rows[b * batch_size:(b + 1) * batch_size]
        multi = {"turns": turns([records[i] for i, _ in batch])} if turns is not None and batch else {}
        out = engine.generate([prompt_ids[i] for i, _ in batch],
                              [sample_seed(seed, i, j) for i, j in batch],
                              max_new_tokens=max_new_tokens, temperature=temperature, **multi)
        if out is None:  # this rank had no problem left; it joined the generation all the same
            continue
        recs = [records[i] for i, _ in batch]
        texts = with_prefix(response_prefix, out.texts)
        acc = accuracy_reward(texts, solution=[r["solution"] for r in recs],
                              answer=[r["answer"] for r in recs])
        fmt = format_reward(texts)
        written = out.lengths.sum() if not multi else (out.completion_mask * out.model_mask).sum()
        sums += torch.tensor([sum(a or 0.0 for a in acc), sum(fmt), float(written), len(batch)],
                             dtype=torch.float64)
        for (i, _), text, a in zip(batch, texts, acc):
            correct.setdefault(i, []).append(a == 1.0)
            if k > 1:
                answers.setdefault(i, []).append(final_answer(text))
        if len(completions) < return_samples * k:
            completions += [{"problem": r["problem"], "answer": r["answer"], "completion": t,
                             "accuracy": a, "format": f, **({"sample": j} if k > 1 else {})}
                            for r, (_, j), t, a, f in zip(recs, batch, texts, acc, fmt)]
    for i in correct:
        per_problem[i, 0] = float(sum(correct[i]))
        if k > 1:
            vote = majority_vote(answers[i])
            per_problem[i, 1] = float(vote is not None and correct[i][vote])
    sums = all_reduce_sum(sums.to(info.device)).cpu()
    per_problem = all_reduce_sum(per_problem.to(info.device)).cpu()  # each problem is one rank's
    n = max(sums[3].item(), 1.0)
    scores = [c / k for c in per_problem[:, 0].tolist()]
    result = {"accuracy": sums[0].item() / n, "accuracy_se": standard_error(scores), "format": sums[1].item() / n,
              "mean_length": sums[2].item() / n, "num_problems": int(sums[3].item()) // k, "scores": scores}
    if k > 1:
        p = max(len(records), 1)
        for m in range(1, k + 1):
            result[f"pass@{m}"] = math.fsum(pass_at_k(k, int(c), m) for c in per_problem[:, 0].tolist()) / p
        result[f"maj@{k}"] = per_problem[:, 1].sum().item() / p
    if return_samples:
        shares = all_gather_objects(completions)  # every rank's share, put back in problem order
        w = info.world_size  # rank r evaluated problems r, r + w, r + 2w, ...
        completions = [shares[i % w][(i // w) * k + j] for i in range(len(records)) for j in range(k)
                       if (i // w) * k + j < len(shares[i % w])]
        result["samples"] = completions[:return_samples * k]
    return result
