"""Accuracy reward (R1 Sec. 2.2.2) and the cosine length-scaled reward built on it.

`AnswerChecker` decides correctness for a batch: it finds each final answer (math_answer.py),
settles pairs of plain numbers in-process (exact Decimal equality, the fast path), serves
repeats from an LRU cache (the G completions of a group often agree, and `cosine` asks again
after `accuracy`), and sends the rest, deduplicated, to the time-bounded verifier workers
(verifier_pool.py): one worker for small batches, `pool_size` workers from `pool_threshold`
distinct jobs on.

Departures from the tutorial, each a bug fix:
- the answer inside `<answer>` is read even when bare (`<answer>14</answer>`);
- the gold is the `answer` column when it is a non-empty string (GSM8K `#### N`, AIME/AMC
  numbers), else `solution`;
- the cosine reward computes correctness itself (the tutorial's took an `accuracy_rewards`
  argument that no trainer passes), measures tokens when `completion_ids` is given, and clamps
  its progress to [0, 1] (past `max_len`, cos(pi * L / max_len) turns back up and a very long
  answer would score like an empty one).
"""
from __future__ import annotations

import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from r1train.rewards.common import RewardFn, add_metric, check_length_unit, column, completion_texts, lengths
from r1train.rewards.math_answer import (
    ABANDONED,
    CORRECT,
    CRASHED,
    ERROR,
    GOLD_UNPARSEABLE,
    NO_ANSWER,
    OUTCOME_NAMES,
    WRONG,
    extract_answer_span,
    gold_final_span,
    plain_number,
)
from r1train.rewards.verifier_pool import VerifierPool, shared_pool

UNPARSEABLE_GOLD_POLICIES = ("neutral", "skip")
# Default bound on one batch's verification. Honest batches need a small fraction of it: one
# worker verifies about 1,900 answers/s through math_verify (bench/RESULTS.md, fast path off),
# so even 4,096 distinct answers take ~2 s, and 60 s leaves 30x for slow expressions, a loaded
# machine and worker start-up. A batch of hostile answers (each held to `timeout_s`, 5 s) costs
# at most this instead of len(batch) * 5 s / workers: 256 of them took 708 s unbounded. What is
# left when it runs out scores 0 for this batch, is counted as accuracy/abandoned, and is asked
# again next time (never cached).
DEFAULT_BATCH_TIMEOUT_S = 60.0


class AnswerChecker:
    """Batched, cached, time-bounded correctness: `check(golds, completions) -> outcome codes`.

    Args:
        timeout_s: bound on one parse + verify, seconds; an overrun scores TIMEOUT (wrong).
        pool_size: workers for large batches; 0 means min(4, CPU count).
        pool_threshold: batches with at least this many distinct jobs left for math_verify use
            `pool_size` workers; smaller ones use one (no fan-out cost).
        fast_path: settle "number vs number" in-process with exact Decimal equality.
        batch_timeout_s: bound on one whole `check` (None: none); jobs left then score ABANDONED
            (0 for this batch, not cached).
        cache_size: entries of the (gold, answer) -> outcome LRU cache; 0 disables it.
        pool: the VerifierPool to use; default the process-wide shared one.
    """

    def __init__(self, timeout_s: float = 5.0, pool_size: int = 0, pool_threshold: int = 64,
                 fast_path: bool = True,
                 batch_timeout_s: float | None = DEFAULT_BATCH_TIMEOUT_S,
                 cache_size: int = 16384, pool: VerifierPool | None = None):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
        if pool_size < 0 or pool_threshold < 1 or cache_size < 0:
            raise ValueError(f"need pool_size >= 0, pool_threshold >= 1, cache_size >= 0; got "
                             f"{pool_size!r}, {pool_threshold!r}, {cache_size!r}")
        if batch_timeout_s is not None and not batch_timeout_s > 0:
            raise ValueError(f"batch_timeout_s must be > 0 or None, got {batch_timeout_s!r}")
        self.timeout_s = timeout_s
        self.pool_size = pool_size or min(4, os.cpu_count() or 1)
        self.pool_threshold = pool_threshold
        self.fast_path = fast_path
        self.batch_timeout_s = batch_timeout_s
        self.cache_size = cache_size
        self._pool = pool
        self._cache: OrderedDict[tuple, int] = OrderedDict()
        self._cache_lock = threading.Lock()

    def _job(self, gold: str, text: str) -> tuple[tuple, int | None]:
        """The worker job for one pair, and its outcome when known without a worker."""
        span, tagged = extract_answer_span(text)
        job = (gold, span, tagged)
        if self.fast_path:
            gold_number = plain_number(gold_final_span(gold))
            if gold_number is not None:
                if span is None:
                    return job, NO_ANSWER
                answer_number = plain_number(span) if tagged else None
                if answer_number is not None:
                    add_metric("accuracy/fast_path")
                    return job, CORRECT if answer_number == gold_number else WRONG
        with self._cache_lock:
            code = self._cache.get(job)
            if code is not None:
                self._cache.move_to_end(job)
                add_metric("accuracy/cache_hits")
        return job, code

    def check(self, golds: Sequence[str], texts: Sequence[str]) -> list[int]:
        """Outcome code (math_answer.CORRECT, WRONG, ..., ABANDONED) per (gold, completion)."""
        codes: list[int | None] = [None] * len(texts)
        pending: dict[tuple, list[int]] = {}
        for i, (gold, text) in enumerate(zip(golds, texts, strict=True)):
            job, codes[i] = self._job(gold, text)
            if codes[i] is None:
                pending.setdefault(job, []).append(i)
        if pending:
            jobs = list(pending)
            n_workers = self.pool_size if len(jobs) >= self.pool_threshold else 1
            pool = self._pool or shared_pool()
            results = pool.run(jobs, self.timeout_s, n_workers, self.batch_timeout_s)
            for event, count in pool.pop_events().items():
                if count:
                    add_metric(f"accuracy/{event}", count)
            add_metric("accuracy/verified", len(jobs))
            with self._cache_lock:
                for job, code in zip(jobs, results):
                    for i in pending[job]:
                        codes[i] = code
                    # A crash or an abandoned job says nothing about the pair (an abandoned one
                    # may be a right answer queued behind hostile ones): never cached, asked
                    # again next time. A timeout is a verdict, kept so that `cosine` does not
                    # wait a second time on the same hostile answer.
                    if self.cache_size and code not in (CRASHED, ABANDONED):
                        self._cache[job] = code
                        self._cache.move_to_end(job)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return codes  # type: ignore[return-value]

    def clear_cache(self) -> None:
        with self._cache_lock:
            self._cache.clear()


_DEFAULT_CHECKER = AnswerChecker()


def _format_number(x: int | float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def gold_texts(columns: dict[str, Any], n: int) -> list[str]:
    """The gold per completion: `answer` when it is a non-empty string, else `solution`.

    Raw rows whose `answer` is a number (AMC's 27.0) are read as that number ("27").
    An item with neither gives "", which is an unparseable gold.
    """
    answers = column(columns, "answer", n)
    solutions = column(columns, "solution", n)
    if answers is None and solutions is None:
        raise ValueError("the accuracy reward needs an 'answer' or 'solution' column; the batch "
                         f"has only {sorted(columns)}")
    golds = []
    for i in range(n):
        a = answers[i] if answers is not None else None
        if isinstance(a, str) and a.strip():
            golds.append(a)
        elif isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a):
            golds.append(_format_number(a))
        else:
            s = solutions[i] if solutions is not None else None
            golds.append(s if isinstance(s, str) else "")
    return golds


def _check_policy(unparseable_gold: str) -> str:
    if unparseable_gold not in UNPARSEABLE_GOLD_POLICIES:
        raise ValueError(f"unparseable_gold must be one of {UNPARSEABLE_GOLD_POLICIES}, got "
                         f"{unparseable_gold!r}")
    return unparseable_gold


def get_accuracy_reward(unparseable_gold: str = "neutral",
                        checker: AnswerChecker | None = None) -> RewardFn:
    """Accuracy reward: 1.0 when the final answer equals the gold (math_verify), else 0.0.

    A gold that cannot be parsed scores 0.5 under "neutral" (the tutorial's choice, so an
    unverifiable row pushes no group member up or down) or None under "skip". Timed-out,
    abandoned (batch budget spent) and unanswered items score 0.0 and are counted in
    `pop_reward_metrics()`.
    """
    policy = _check_policy(unparseable_gold)

    def accuracy_reward(completions: Sequence[Any], **columns: Any) -> list[float | None]:
        texts = completion_texts(completions)
        codes = (checker or _DEFAULT_CHECKER).check(gold_texts(columns, len(texts)), texts)
        rewards: list[float | None] = []
        for code in codes:
            if code in (GOLD_UNPARSEABLE, NO_ANSWER, ERROR):  # timeouts: counted by the checker
                add_metric(f"accuracy/{OUTCOME_NAMES[code]}")
            if code == GOLD_UNPARSEABLE:
                rewards.append(0.5 if policy == "neutral" else None)
            else:
                rewards.append(1.0 if code == CORRECT else 0.0)
        return rewards

    return accuracy_reward


def get_cosine_scaled_reward(min_value_wrong: float = -0.5, max_value_wrong: float = -0.1,
                             min_value_correct: float = 0.8, max_value_correct: float = 1.0,
                             max_len: int = 1000, length_unit: str = "auto",
                             unparseable_gold: str = "neutral",
                             checker: AnswerChecker | None = None) -> RewardFn:
    """Cosine length-scaled correctness ("Demystifying Long CoT Reasoning", Yeo et al. 2025).

        progress = min(1, L / max_len)
        r = lo + (hi - lo) * (1 + cos(pi * progress)) / 2
        correct: lo = min_value_correct, hi = max_value_correct   (short correct best: 1.0 at L=0)
        wrong:   lo = max_value_wrong,   hi = min_value_wrong     (short wrong worst: -0.5 at L=0)

    L is in tokens (`completion_ids`) or characters, per `length_unit` (see common.lengths).
    An unparseable gold scores 0.0 under "neutral" (between the wrong and correct ranges) and
    None under "skip".
    """
    if not (isinstance(max_len, int) and max_len > 0):
        raise ValueError(f"max_len must be a positive int, got {max_len!r}")
    if min_value_wrong > max_value_wrong or min_value_correct > max_value_correct:
        raise ValueError(f"need min_value_wrong <= max_value_wrong and min_value_correct <= "
                         f"max_value_correct, got {min_value_wrong}, {max_value_wrong}, "
                         f"{min_value_correct}, {max_value_correct}")
    check_length_unit(length_unit)
    policy = _check_policy(unparseable_gold)

    def cosine_scaled_reward(completions: Sequence[Any], **columns: Any) -> list[float | None]:
        texts = completion_texts(completions)
        codes = (checker or _DEFAULT_CHECKER).check(gold_texts(columns, len(texts)), texts)
        rewards: list[float | None] = []
        for code, n in zip(codes, lengths(texts, columns, length_unit)):
            if code == GOLD_UNPARSEABLE:
                rewards.append(0.0 if policy == "neutral" else None)
                continue
            progress = min(1.0, n / max_len)
            if code == CORRECT:
                lo, hi = min_value_correct, max_value_correct
            else:  # the swap: the cosine starts at the harshest penalty for a short wrong answer
                lo, hi = max_value_wrong, min_value_wrong
            rewards.append(lo + 0.5 * (hi - lo) * (1.0 + math.cos(math.pi * progress)))
        return rewards

    return cosine_scaled_reward


accuracy_reward = get_accuracy_reward()
