"""Language consistency reward of R1's reasoning-oriented RL stage (R1 Sec. 2.3.2).

R1 scores "the proportion of target language words in the CoT" to stop the model from mixing
languages. Without a language-ID model (no new dependency), this reward works at the level of
*scripts*, by Unicode code-point ranges:

    r = (letters of the completion in the prompt's script) / (letters of the completion)

The prompt's script is the one with the most letters in the user message (the `prompt`
column's last user turn, else `problem`). So an English prompt answered in Chinese, or half in
Chinese, is told apart from an English answer; English and French (both Latin) are not, and all
CJK (Han, kana, Hangul) is one script. Letters only: digits, punctuation and symbols carry no
language. LaTeX math (`$...$`, `\\(...\\)`, `\\[...\\]`), LaTeX commands and the format tags are
removed first, since `\\frac`, `x` or `<think>` are Latin letters in any language.
A prompt or a completion without letters gives None (no opinion: the share is undefined).
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from r1train.rewards.common import column, completion_texts

# Code-point ranges per script (Unicode blocks). Only letters are counted (see _LETTER_RE), so
# punctuation inside a block (e.g. CJK 、。) does not count.
_SCRIPT_RANGES = {
    "latin": "A-Za-z\u00c0-\u024f\u1e00-\u1eff\u2c60-\u2c7f\ua720-\ua7ff\uff21-\uff3a\uff41-\uff5a",
    "cjk": ("\u1100-\u11ff\u2e80-\u2fdf\u3040-\u30ff\u3100-\u318f\u31a0-\u31ff\u3400-\u4dbf"
            "\u4e00-\u9fff\ua960-\ua97f\uac00-\ud7af\uf900-\ufaff\uff66-\uff9f"
            "\U00020000-\U0003134f"),
    "cyrillic": "\u0400-\u052f\u1c80-\u1c8f\u2de0-\u2dff\ua640-\ua69f",
    "greek": "\u0370-\u03ff\u1f00-\u1fff",
    "arabic": "\u0600-\u06ff\u0750-\u077f\u08a0-\u08ff\ufb50-\ufdff\ufe70-\ufeff",
    "hebrew": "\u0590-\u05ff\ufb1d-\ufb4f",
    "devanagari": "\u0900-\u097f\ua8e0-\ua8ff",
    "thai": "\u0e00-\u0e7f",
}
_SCRIPT_RES = {name: re.compile(f"[{ranges}]") for name, ranges in _SCRIPT_RANGES.items()}
_LETTER_RE = re.compile(r"[^\W\d_]")  # Unicode word characters that are not digits: letters
_NOISE_RE = re.compile(r"\$\$.*?\$\$|\$[^$]*\$|\\\(.*?\\\)|\\\[.*?\\\]|\\[A-Za-z]+|"
                       r"</?(?:think|answer)>", re.DOTALL)


def _blank_unclosed_openers(text: str) -> str:
    """`text` with each `\\(` after the last `\\)` (and `\\[` after the last `\\]`) made spaces.

    Such an opener can never start a `_NOISE_RE` match, but trying costs a scan to the end of
    the text, once per opener: quadratic (`'\\(' * 6000` took 1 s, in the trainer's process).
    Blanked, the regex runs in linear time, and removes exactly what it removed before: an
    opener's two characters are no letters, and `.*?` / `[^$]*` match spaces as they match
    them. Each opener before its last closer finds a closer, so no scan there is wasted.
    """
    for opener, closer in (("\\(", "\\)"), ("\\[", "\\]")):
        last = text.rfind(closer)
        tail = last + len(closer) if last >= 0 else 0  # no closer at all: blank every opener
        text = text[:tail] + text[tail:].replace(opener, "  ")
    return text


def script_counts(text: str) -> dict[str, int]:
    """Letters of `text` per script (math, LaTeX commands and tags removed); 'other' = the rest."""
    letters = "".join(_LETTER_RE.findall(_NOISE_RE.sub(" ", _blank_unclosed_openers(text))))
    counts = {name: len(rx.findall(letters)) for name, rx in _SCRIPT_RES.items()}
    counts["other"] = len(letters) - sum(counts.values())
    return counts


@lru_cache(maxsize=1024)
def dominant_script(text: str) -> str | None:
    """The script with the most letters in `text` (cached: a group shares one prompt)."""
    counts = script_counts(text)
    best = max(counts, key=counts.__getitem__)
    return best if counts[best] > 0 else None


def _user_text(prompt: Any, problem: Any) -> str:
    """The question the model was asked: the last user turn of `prompt`, else `problem`."""
    if isinstance(prompt, str) and prompt.strip():
        return prompt
    if isinstance(prompt, Sequence):
        for message in reversed(prompt):
            if isinstance(message, dict) and message.get("role") == "user" \
                    and isinstance(message.get("content"), str):
                return message["content"]
    return problem if isinstance(problem, str) else ""


def language_consistency_reward(completions: Sequence[Any], **columns: Any) -> list[float | None]:
    """Share of the completion's letters written in the prompt's script, in [0, 1]."""
    texts = completion_texts(completions)
    prompts = column(columns, "prompt", len(texts)) or [None] * len(texts)
    problems = column(columns, "problem", len(texts)) or [None] * len(texts)
    rewards: list[float | None] = []
    for text, prompt, problem in zip(texts, prompts, problems):
        target = dominant_script(_user_text(prompt, problem))
        if target is None:
            rewards.append(None)
            continue
        counts = script_counts(text)
        total = sum(counts.values())
        # No letters (empty, or only math): the share is undefined, so no opinion either.
        rewards.append(counts[target] / total if total else None)
    return rewards
