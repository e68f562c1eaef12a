"""Reward functions of the R1 recipe, and the registry that builds them from a config.

Every reward is `fn(completions, **columns) -> list[float | None]` (see common.py): one value
per completion, None for "no opinion". The trainer sums them with weights:

    for name, fn, weight in get_reward_functions(["accuracy", "format"], RewardConfig()):
        rewards[name] = fn(completions, **batch_columns)

| name                 | file            | range            | what                                    |
| -------------------- | --------------- | ---------------- | --------------------------------------- |
| accuracy             | accuracy.py     | {0, 0.5*, 1}     | math_verify equality with the gold      |
| format               | format.py       | {0, 1}           | `<think>..</think><answer>..</answer>`  |
| tag_count            | format.py       | {0, 0.25, .., 1} | partial credit per well-placed tag      |
| reasoning_steps      | format.py       | [0, 1]           | min(1, step markers / 3)                |
| cosine               | accuracy.py     | [-0.5, 1]        | correctness scaled by length            |
| repetition_penalty   | penalties.py    | [-0.1, 0]        | repeated word n-grams                   |
| language_consistency | language.py     | [0, 1] or None   | share of letters in the prompt's script |
| soft_overlong        | penalties.py    | [-1, 0]          | DAPO Eq. (13)                           |
| rm:<folder>          | reward_model.py | the RM's logit   | a sequence-classification reward model  |

(*) 0.5 for an unparseable gold under the default "neutral" policy; ranges are for the
default config. Next to these names, a reward may be a function the user brings: `module:fn`,
`path/to/file.py:fn`, `name=...` or, from Python, a callable (custom.py); a reward model is
`rm:path/to/folder` (reward_model.py). Worker processes, timeouts and the verdict cache: verifier_pool.py, accuracy.py.
`pop_reward_metrics()` returns counters (timeouts, unparseable golds, ...) since its last call.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from r1train.rewards.accuracy import (
    DEFAULT_BATCH_TIMEOUT_S,
    UNPARSEABLE_GOLD_POLICIES,
    AnswerChecker,
    accuracy_reward,
    get_accuracy_reward,
    get_cosine_scaled_reward,
)
from r1train.rewards.budget import DEFAULT_CUSTOM_TIMEOUT_S, RECORD_COLUMNS, RewardInterrupted, UserReward
from r1train.rewards.common import LENGTH_UNITS, RewardFn, pop_reward_metrics
from r1train.rewards.custom import (
    RewardError,
    checked_values,
    entry_name,
    entry_text,
    is_reference,
    load_reference,
    reward_model_folder,
)
from r1train.rewards.format import format_reward, reasoning_steps_reward, tag_count_reward
from r1train.rewards.language import language_consistency_reward
from r1train.rewards.penalties import get_repetition_penalty_reward, get_soft_overlong_punishment
from r1train.rewards.reward_model import RM_DTYPES, RewardModel

REWARD_NAMES = ("accuracy", "format", "tag_count", "reasoning_steps", "cosine",
                "repetition_penalty", "language_consistency", "soft_overlong")

__all__ = ["REWARD_NAMES", "RewardConfig", "RewardError", "RewardInterrupted", "get_reward_functions",
           "pop_reward_metrics",
           "score_completions", "entry_name", "entry_text",
           "AnswerChecker", "accuracy_reward", "get_accuracy_reward", "format_reward",
           "tag_count_reward", "reasoning_steps_reward", "get_cosine_scaled_reward",
           "get_repetition_penalty_reward", "language_consistency_reward",
           "get_soft_overlong_punishment", "RewardFn"]


@dataclass
class RewardConfig:
    """Reward settings; every field has its default and meaning in `metadata["help"]`."""

    accuracy_timeout_s: float = field(default=5.0, metadata={
        "help": "bound in seconds on one answer's parse + verify; an overrun scores 0 and is "
                "counted as accuracy/timeouts"})
    accuracy_batch_timeout_s: float | None = field(default=DEFAULT_BATCH_TIMEOUT_S, metadata={
        "help": "bound in seconds on one batch's verification (honest batches take a few "
                "seconds; see accuracy.DEFAULT_BATCH_TIMEOUT_S); answers left unverified then "
                "score 0 for that batch, are counted as accuracy/abandoned and are not cached; "
                "None: no batch bound (each item is still bounded by accuracy_timeout_s)"})
    unparseable_gold: str = field(default="neutral", metadata={
        "help": "gold that math_verify cannot parse: 'neutral' scores 0.5 (tutorial), 'skip' "
                "scores None"})
    accuracy_fast_path: bool = field(default=True, metadata={
        "help": "compare plain numbers (GSM8K) in-process with exact Decimal equality"})
    accuracy_pool_size: int = field(default=0, metadata={
        "help": "verifier worker processes for large batches; 0: min(4, CPU count)"})
    accuracy_pool_threshold: int = field(default=64, metadata={
        "help": "a batch with at least this many distinct answers to verify uses the pool; "
                "smaller ones use one worker process"})
    cosine_min_value_wrong: float = field(default=-0.5, metadata={
        "help": "cosine reward of the shortest wrong answer"})
    cosine_max_value_wrong: float = field(default=-0.1, metadata={
        "help": "cosine reward of a wrong answer at max_len or longer"})
    cosine_min_value_correct: float = field(default=0.8, metadata={
        "help": "cosine reward of a correct answer at max_len or longer"})
    cosine_max_value_correct: float = field(default=1.0, metadata={
        "help": "cosine reward of the shortest correct answer"})
    cosine_max_len: int = field(default=1000, metadata={
        "help": "length (in length_unit) at which the cosine reaches its end value"})
    length_unit: str = field(default="auto", metadata={
        "help": "length for cosine and soft_overlong: 'auto' = tokens when the batch has "
                "completion_ids, else characters; 'tokens' (requires completion_ids); 'chars'"})
    repetition_ngram_size: int = field(default=3, metadata={
        "help": "word n-gram size of the repetition penalty"})
    repetition_max_penalty: float = field(default=-0.1, metadata={
        "help": "repetition penalty when every n-gram repeats; must be <= 0"})
    overlong_max_length: int = field(default=1024, metadata={
        "help": "soft_overlong L_max (DAPO Eq. 13): at and beyond it the reward is -1"})
    overlong_cache_length: int = field(default=256, metadata={
        "help": "soft_overlong L_cache: the ramp from 0 to -1 over the last L_cache units"})
    custom_timeout_s: float | None = field(default=DEFAULT_CUSTOM_TIMEOUT_S, metadata={
        "help": "bound in seconds on one call of a reward function the user brings (module:fn, "
                "file.py:fn, a callable), on one rank's batch; an overrun stops the run naming the "
                "function, the last checkpoint intact; None: unbounded (rewards/budget.py)"})
    rm_device: str = field(default="", metadata={
        "help": "device of a reward model (rm:<folder> in the rewards): cpu, cuda or cuda:N; empty: the "
                "trainer's device (each rank holds its own copy)"})
    rm_dtype: str = field(default="float32", metadata={
        "help": "weights dtype of a reward model: float32 or bfloat16 (half the memory of a large RM)"})
    rm_batch_size: int = field(default=8, metadata={
        "help": "sequences a reward model scores per forward (sorted by length, padded on the right)"})
    rm_max_tokens: int = field(default=0, metadata={
        "help": "longest input a reward model reads, in its tokens; longer ones are cut from the left "
                "(the completion's end stays) and counted as rewards/<name>/truncated; 0: the RM's own "
                "limit (max_position_embeddings, its tokenizer's model_max_length)"})

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError("<field>=<value>: why") for a value no reward can use, so a job
        refuses it at start (the trainers prefix the section: --rewards.<field>). Written
        `not (x > 0)` rather than `x <= 0` where a NaN must fail too (NaN <= 0 is False)."""
        def bad(name: str, why: str) -> None:
            raise ValueError(f"{name}={getattr(self, name)!r}: {why}")

        def finite(name: str) -> bool:
            value = getattr(self, name)
            return not isinstance(value, bool) and isinstance(value, (int, float)) \
                and math.isfinite(value)

        if self.unparseable_gold not in UNPARSEABLE_GOLD_POLICIES:
            bad("unparseable_gold", f"must be one of {', '.join(UNPARSEABLE_GOLD_POLICIES)}")
        if self.length_unit not in LENGTH_UNITS:
            bad("length_unit", f"must be one of {', '.join(LENGTH_UNITS)}")
        if not (finite("accuracy_timeout_s") and self.accuracy_timeout_s > 0):
            bad("accuracy_timeout_s", "must be a finite number of seconds > 0")
        if self.accuracy_batch_timeout_s is not None and not (
                finite("accuracy_batch_timeout_s") and self.accuracy_batch_timeout_s > 0):
            bad("accuracy_batch_timeout_s", "must be a finite number of seconds > 0, or None")
        if self.custom_timeout_s is not None and not (finite("custom_timeout_s") and self.custom_timeout_s > 0):
            bad("custom_timeout_s", "must be a finite number of seconds > 0, or None")
        if self.rm_device and not _usable_device(self.rm_device):
            bad("rm_device", "must be cpu, cuda or cuda:N naming a GPU this machine has (empty: the trainer's "
                             "device)")
        if self.rm_dtype not in RM_DTYPES:
            bad("rm_dtype", f"must be one of {', '.join(RM_DTYPES)}")
        if self.rm_batch_size < 1:
            bad("rm_batch_size", "must be >= 1")
        if self.rm_max_tokens < 0:
            bad("rm_max_tokens", "must be >= 0 (0 = the reward model's own limit)")
        if self.accuracy_pool_size < 0:
            bad("accuracy_pool_size", "must be >= 0 (0 = min(4, CPU count))")
        if self.accuracy_pool_threshold < 1:
            bad("accuracy_pool_threshold", "must be >= 1")
        for name in ("cosine_min_value_wrong", "cosine_max_value_wrong",
                     "cosine_min_value_correct", "cosine_max_value_correct",
                     "repetition_max_penalty"):
            if not finite(name):
                bad(name, "must be a finite number")
        if self.cosine_min_value_wrong > self.cosine_max_value_wrong:
            bad("cosine_min_value_wrong", f"must be <= cosine_max_value_wrong "
                                          f"({self.cosine_max_value_wrong})")
        if self.cosine_min_value_correct > self.cosine_max_value_correct:
            bad("cosine_min_value_correct", f"must be <= cosine_max_value_correct "
                                            f"({self.cosine_max_value_correct})")
        for name in ("cosine_max_len", "repetition_ngram_size", "overlong_max_length",
                     "overlong_cache_length"):
            if getattr(self, name) < 1:
                bad(name, "must be >= 1")
        if self.repetition_max_penalty > 0:
            bad("repetition_max_penalty", "must be <= 0 (it is a penalty)")
        if self.overlong_cache_length >= self.overlong_max_length:
            bad("overlong_cache_length", f"must be < overlong_max_length "
                                         f"({self.overlong_max_length})")

    def checker(self) -> AnswerChecker:
        return AnswerChecker(timeout_s=self.accuracy_timeout_s, pool_size=self.accuracy_pool_size,
                             pool_threshold=self.accuracy_pool_threshold,
                             fast_path=self.accuracy_fast_path,
                             batch_timeout_s=self.accuracy_batch_timeout_s)


def _usable_device(name: str) -> bool:
    """cpu, or cuda / cuda:N where CUDA has that GPU."""
    import torch

    if name == "cpu":
        return True
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()) or not torch.cuda.is_available():
        return False
    return not index or int(index) < torch.cuda.device_count()


def _builders(config: RewardConfig, checker: AnswerChecker) -> dict[str, Callable[[], RewardFn]]:
    c = config
    return {
        "accuracy": lambda: get_accuracy_reward(c.unparseable_gold, checker),
        "format": lambda: format_reward,
        "tag_count": lambda: tag_count_reward,
        "reasoning_steps": lambda: reasoning_steps_reward,
        "cosine": lambda: get_cosine_scaled_reward(
            c.cosine_min_value_wrong, c.cosine_max_value_wrong, c.cosine_min_value_correct,
            c.cosine_max_value_correct, c.cosine_max_len, c.length_unit, c.unparseable_gold,
            checker),
        "repetition_penalty": lambda: get_repetition_penalty_reward(
            c.repetition_ngram_size, c.repetition_max_penalty),
        "language_consistency": lambda: language_consistency_reward,
        "soft_overlong": lambda: get_soft_overlong_punishment(
            c.overlong_max_length, c.overlong_cache_length, c.length_unit),
    }


def get_reward_functions(names: Sequence[Any] | str, config: RewardConfig | None = None,
                         weights: Sequence[float] | None = None, device: Any = None
                         ) -> list[tuple[str, RewardFn, float]]:
    """`(name, fn, weight)` per requested reward, in order; weights default to 1.0.

    `names` may be a list or a comma-separated string ("accuracy,format"). An entry is a
    built-in name, a reference (`module:fn`, `file.py:fn`, `name=...`), a callable or a
    `(name, callable)` pair (custom.py); names must be distinct. `accuracy` and `cosine` share
    one AnswerChecker, so cosine reuses accuracy's verdicts from its cache. A function the user
    brings is wrapped in a `UserReward` (budget.py): its signature checked now, each call bounded
    by `config.custom_timeout_s` and given its own copy of the batch. A reward model
    (`rm:path/to/folder`) is loaded here, on `config.rm_device` or else on `device` (the trainer's;
    None: the CPU).
    """
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    unknown = [n for n in names if isinstance(n, str) and not is_reference(n) and n not in REWARD_NAMES]
    if unknown:
        raise ValueError(f"unknown reward name(s) {unknown}; valid names: {list(REWARD_NAMES)}, or a "
                         f"function as module:function or path/to/file.py:function, or a reward model as "
                         f"rm:path/to/folder")
    labels = [entry_name(n) for n in names]
    if len(set(labels)) != len(labels):
        raise ValueError(f"reward names must be distinct, got {labels}")
    if weights is None:
        weights = [1.0] * len(names)
    weights = [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"weights has {len(weights)} entries but names has {len(names)} "
                         f"({labels}); give one weight per reward")
    if not all(math.isfinite(w) for w in weights):
        raise ValueError(f"weights must be finite numbers, got {weights}")
    config = config or RewardConfig()
    builders = _builders(config, config.checker())
    out = []
    for entry, label, w in zip(names, labels, weights):
        folder = reward_model_folder(entry)
        if folder is not None:
            out.append((label, RewardModel(label, entry, folder, config.rm_device or device or "cpu", config.rm_dtype,
                                           config.rm_batch_size, config.rm_max_tokens), w))
            continue
        if isinstance(entry, str) and not is_reference(entry):
            out.append((label, builders[entry](), w))
            continue
        fn = entry[1] if isinstance(entry, tuple) else entry if callable(entry) else load_reference(entry)[1]
        if not callable(fn):
            raise RewardError(f"reward {label!r}: {fn!r} is not callable")
        out.append((label, UserReward(label, fn, config.custom_timeout_s), w))
    return out


def score_completions(reward_fns: Sequence[tuple[str, RewardFn, float]], texts: list[str], records: list[dict],
                      completion_ids: list[list[int]]):
    """[N, F] float64 tensor: reward function f on completion i, NaN where it has no opinion.

    `records[i]` is completion i's problem: every function gets all of its columns as keyword
    lists (problem, solution, answer, prompt, and whatever else the dataset row carried; a
    column a record lacks is "" for those four, None otherwise) and `completion_ids` (token
    lists). An output of the wrong length or type raises RewardError naming the function."""
    import torch

    keys = dict.fromkeys(RECORD_COLUMNS)
    for r in records:
        keys.update(dict.fromkeys(r))
    columns = {k: [r.get(k, "" if k in RECORD_COLUMNS else None) for r in records] for k in keys}
    columns["completion_ids"] = completion_ids
    values = [checked_values(name, fn, fn(texts, **columns), len(texts)) for name, fn, _ in reward_fns]
    return torch.tensor([[math.nan if v is None else v for v in col] for col in values],
                        dtype=torch.float64).T.reshape(len(texts), len(reward_fns))
