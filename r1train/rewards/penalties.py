"""Penalties (rewards <= 0): word n-gram repetition, and DAPO's soft overlong punishment."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from r1train.rewards.common import RewardFn, check_length_unit, completion_texts, lengths


def get_repetition_penalty_reward(ngram_size: int = 3, max_penalty: float = -0.1) -> RewardFn:
    """Repetition penalty of the tutorial (after Yeo et al. 2025), over lower-cased word n-grams:

        r = max_penalty * (1 - unique_ngrams / total_ngrams)

    0 for text without repeats (and for text shorter than one n-gram), max_penalty as the
    share of repeated n-grams goes to 1. The tutorial's factory returned itself instead of the
    reward; this one returns the reward.
    """
    if isinstance(ngram_size, bool) or not isinstance(ngram_size, int) or ngram_size < 1:
        raise ValueError(f"ngram_size must be an int >= 1, got {ngram_size!r}")
    if max_penalty > 0:
        raise ValueError(f"max_penalty must be <= 0 (it is a penalty), got {max_penalty!r}")

    def repetition_penalty_reward(completions: Sequence[Any], **columns: Any) -> list[float]:
        rewards = []
        for text in completion_texts(completions):
            words = text.lower().split()
            total = len(words) - ngram_size + 1
            if total <= 0:
                rewards.append(0.0)
                continue
            unique = len({tuple(words[i:i + ngram_size]) for i in range(total)})
            # + 0.0 turns the -0.0 of a repeat-free text into 0.0.
            rewards.append(max_penalty * (1.0 - unique / total) + 0.0)
        return rewards

    return repetition_penalty_reward


def get_soft_overlong_punishment(max_completion_length: int, cache_length: int,
                                 length_unit: str = "auto") -> RewardFn:
    """Soft overlong punishment, DAPO Eq. (13), with L_max = max_completion_length and
    L_cache = cache_length:

        R(y) = 0                                  if |y| <= L_max - L_cache
             = ((L_max - L_cache) - |y|) / L_cache if L_max - L_cache < |y| <= L_max
             = -1                                 if L_max < |y|

    |y| is in tokens from `completion_ids` (characters as fallback, per `length_unit`). DAPO used
    L_max = 20480 and L_cache = 4096: the last 20% of the budget is a linear ramp to -1.
    """
    for name, value in (("max_completion_length", max_completion_length),
                        ("cache_length", cache_length)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if cache_length >= max_completion_length:
        raise ValueError(f"cache_length ({cache_length}) must be < max_completion_length "
                         f"({max_completion_length})")
    check_length_unit(length_unit)
    expected = max_completion_length - cache_length  # L_max - L_cache

    def soft_overlong_punishment(completions: Sequence[Any], **columns: Any) -> list[float]:
        texts = completion_texts(completions)
        rewards = []
        for n in lengths(texts, columns, length_unit):
            if n <= expected:
                rewards.append(0.0)
            elif n <= max_completion_length:
                rewards.append((expected - n) / cache_length)
            else:
                rewards.append(-1.0)
        return rewards

    return soft_overlong_punishment
