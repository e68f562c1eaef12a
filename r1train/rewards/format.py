"""Format rewards of R1-Zero (R1 Sec. 2.2.2, "format rewards"): is the reasoning inside
`<think>...</think>` and the answer inside `<answer>...</answer>`?

- `format_reward`: strict 0/1, the tutorial's `^<think>.*?</think>\\s*<answer>.*?</answer>$`
  with DOTALL. Departures: the tutorial also passed MULTILINE, which lets `$` match at any line
  end, so `...</answer>\\nanything` passed; here only the end of the text (or one final newline,
  as Python's `$` allows) does. And the pattern is not run as a regex: on a completion such as
  `'<think>' + '</think><answer>' * 12000` its backtracking tries every `</think>` and scans to
  the end from each, quadratic in the length (9.5 s for 96k characters, in the trainer's
  process); `is_r1_format` decides the same in a few linear scans.
- `tag_count_reward`: partial credit, 0.25 per well-placed tag, so a model that gets some tags
  right sees a gradient before it masters the whole format.
- `reasoning_steps_reward`: the tutorial's step-marker count, min(1, n / 3).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from r1train.rewards.common import completion_texts

# `</think>`, optional whitespace, `<answer>`. Linear: sre finds each `</think>` by its literal
# prefix, and whitespace runs after distinct `</think>`s do not overlap.
_THINK_THEN_ANSWER_RE = re.compile(r"</think>\s*<answer>")
# "Step 1:", "1." at a line start, "-"/"*" bullets, and transition words (tutorial's list).
_STEP_RE = re.compile(r"(Step \d+:|^\d+\.|\n-|\n\*|First,|Second,|Next,|Finally,)", re.MULTILINE)
STEPS_FOR_FULL_CREDIT = 3


def is_r1_format(text: str) -> bool:
    """`re.match(r"^<think>.*?</think>\\s*<answer>.*?</answer>$", text, re.DOTALL)`, in linear time.

    The regex matches when the text opens with `<think>`, closes with `</answer>` (`$` also
    allows one final newline), and a `</think>\\s*<answer>` lies between the two (the lazy
    `.*?` parts take anything, tags included). The first such separator is the one to test: a
    later one cannot end sooner, since two of them cannot overlap.
    """
    if not text.startswith("<think>"):
        return False
    body = text[:-1] if text.endswith("\n") else text
    if not body.endswith("</answer>"):
        return False
    separator = _THINK_THEN_ANSWER_RE.search(text, len("<think>"))
    return separator is not None and separator.end() <= len(body) - len("</answer>")


def format_reward(completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 when the whole completion is `<think>...</think>` then `<answer>...</answer>`."""
    return [1.0 if is_r1_format(t) else 0.0 for t in completion_texts(completions)]


def _tag_score(text: str) -> float:
    n = {tag: text.count(tag) for tag in ("<think>", "</think>", "<answer>", "</answer>")}
    score = 0.0
    # <think>: once, opening the completion (leading whitespace allowed).
    if n["<think>"] == 1 and text.lstrip().startswith("<think>"):
        score += 0.25
    # </think>: once, and no <think> after it (the reasoning is closed, not reopened).
    if n["</think>"] == 1 and text.find("<think>", text.find("</think>")) < 0:
        score += 0.25
    # <answer>: once, and the reasoning tags are all before it (the answer comes last).
    if n["<answer>"] == 1:
        start = text.find("<answer>")
        if text.find("<think>", start) < 0 and text.find("</think>", start) < 0:
            score += 0.25
    # </answer>: once, closing the completion (trailing whitespace allowed).
    if n["</answer>"] == 1 and text.rstrip().endswith("</answer>"):
        score += 0.25
    return score


def tag_count_reward(completions: Sequence[Any], **columns: Any) -> list[float]:
    """0.25 for each of `<think>`, `</think>`, `<answer>`, `</answer>` that is well placed.

    Well placed: the tag occurs exactly once, and `<think>` opens the text, `</think>` is not
    followed by a `<think>`, `<answer>` is followed by neither think tag, `</answer>` ends the
    text. So `<think>a</think><answer>b</answer>` scores 1.0 and a bare answer 0.0.
    """
    return [_tag_score(t) for t in completion_texts(completions)]


def reasoning_steps_reward(completions: Sequence[Any], **columns: Any) -> list[float]:
    """min(1, n / 3) for n step markers ("Step 1:", "1.", bullets, First/Second/Next/Finally)."""
    return [min(1.0, len(_STEP_RE.findall(t)) / STEPS_FOR_FULL_CREDIT)
            for t in completion_texts(completions)]
