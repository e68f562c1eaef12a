"""What every reward shares: the calling convention, column access, lengths, metrics.

Calling convention: `fn(completions, **columns) -> list[float | None]`. `completions` are strings
or chat message lists (`[{"role": "assistant", "content": ...}]`); `columns` are the batch's
dataset fields, one item per completion (`solution`, `answer`, `problem`, `prompt`, ...) and,
when the trainer has them, `completion_ids` (unpadded token-id lists). Unknown columns are
ignored. `None` means "no opinion": the trainer leaves it out of that reward's mean.
"""
from __future__ import annotations

import os
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

RewardFn = Callable[..., list]

LENGTH_UNITS = ("auto", "tokens", "chars")


def completion_text(completion: Any, index: int = 0) -> str:
    """The text of one completion: a string as is, or the joined `content` of a message list.

    Contents may be strings or lists of parts (`{"type": "text", "text": ...}`), as chat
    templates with tool or vision support produce; a missing content is "".
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, Sequence):
        parts = []
        for message in completion:
            if not isinstance(message, dict):
                raise ValueError(f"completions[{index}] holds a {type(message).__name__}, "
                                 f"expected chat messages {{'role': ..., 'content': ...}}")
            content = message.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, Sequence):
                parts.extend(p.get("text") or "" for p in content if isinstance(p, dict))
        return "".join(parts)
    raise ValueError(f"completions[{index}] must be a string or a list of chat messages, "
                     f"got {type(completion).__name__}: {completion!r:.80}")


def completion_texts(completions: Sequence[Any]) -> list[str]:
    if isinstance(completions, str):
        raise ValueError("completions must be a list of completions, got a single string")
    return [completion_text(c, i) for i, c in enumerate(completions)]


def column(columns: dict[str, Any], name: str, n: int) -> list | None:
    """Column `name` as a list of `n` items, or None when the batch does not carry it."""
    values = columns.get(name)
    if values is None:
        return None
    values = list(values)
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} items but there are {n} "
                         f"completions; pass one item per completion")
    return values


def check_length_unit(unit: str) -> str:
    if unit not in LENGTH_UNITS:
        raise ValueError(f"length_unit must be one of {LENGTH_UNITS}, got {unit!r}")
    return unit


def lengths(texts: list[str], columns: dict[str, Any], unit: str) -> list[int]:
    """Completion lengths: tokens from `completion_ids` or characters of the text.

    unit "auto": tokens when the batch has `completion_ids`, else characters; "tokens": needs
    `completion_ids`; "chars": always characters.
    """
    ids = column(columns, "completion_ids", len(texts)) if unit != "chars" else None
    if ids is not None:
        return [len(x) for x in ids]
    if unit == "tokens":
        raise ValueError("length_unit='tokens' needs the 'completion_ids' column, which this "
                         "batch does not have")
    return [len(t) for t in texts]


# ---- metrics ---------------------------------------------------------------------------------

_METRICS: defaultdict[str, float] = defaultdict(float)
_METRICS_LOCK = threading.Lock()


def add_metric(name: str, value: float = 1.0) -> None:
    with _METRICS_LOCK:
        _METRICS[name] += value


def pop_reward_metrics() -> dict[str, float]:
    """Reward counters since the last call (e.g. `accuracy/timeouts`), then reset. Thread-safe."""
    global _METRICS
    with _METRICS_LOCK:
        metrics, _METRICS = dict(_METRICS), defaultdict(float)
    return metrics


def _reset_lock_in_child() -> None:
    global _METRICS_LOCK
    _METRICS_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_reset_lock_in_child)
