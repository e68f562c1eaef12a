"""Final-answer extraction and math_verify equivalence; also the sandboxed verifier worker.

The R1 accuracy reward (DeepSeek-R1 Sec. 2.2.2, "accuracy rewards") asks one question: is the
model's final answer mathematically equal to the gold answer? This module answers it in three
steps, each a plain function:

1. *Find the final answer.* In a completion: the content of the last `<answer>...</answer>`
   block; with no block, only a `\\boxed{}` (or math_verify's "final answer is" anchors) in the
   whole text. In a gold: the number after the last `####` (GSM8K), the `\\boxed{}` of a worked
   solution, or else the whole string (a plain answer).
2. *Parse it* with math_verify into sympy. A bare span (`14`, `\\frac{1}{2}`, `2\\sqrt{3}`) is
   parsed as LaTeX math by wrapping it in `$...$`; a span with words (`14 dollars`) is left to
   math_verify's number-in-text extraction, because LaTeX would read `dollars` as a product of
   seven symbols. This is the fix for the tutorial's accuracy reward, which parsed completions
   with `try_extract_without_anchor=False` and so could never read `<answer>14</answer>`.
3. *Compare* with `math_verify.verify(gold, answer)`.

One departure from "mathematically equal": when the gold is a plain number, an answer that is
a calculation still to be done (`25 + 10 - 7`, `3 \\times 4`: numbers joined by + - * × · ÷,
`unevaluated_arithmetic`, decided in `check_answer`: such a span is never a plain number, so the
parent's fast path leaves it to the worker) is wrong, although sympy evaluates it to the gold. A policy
finds this on its own: SmolLM2 under R1-Zero GRPO learned within 60 steps to copy the question's
expression into `<answer>`, and math_verify scored 100% (bench/RESULTS.md). A fraction (`1/2`)
and a power (`10^3`) stay answers.

Sympy can hang on hostile input (`\\boxed{9^{9^{9^{9}}}}`), and math_verify's own timeout is a
`signal.alarm`, which only works on the main thread of the main interpreter. So parsing and
verifying run here, inside a worker *process* (`serve()`, started by `verifier_pool.py`) that
the parent kills when an item overruns its bound. Only the standard library is imported at
module level: the parent imports this file for the string helpers without loading sympy, and
the worker runs it by file path so that it does not import the `rewards` package (or torch).
"""
from __future__ import annotations

import json
import os
import re
import sys
from decimal import Decimal, InvalidOperation
from functools import lru_cache

# Outcome codes, shared by the worker (which returns them) and the parent (which adds the last
# three). TIMEOUT: the job ran for its whole bound (a verdict on the answer); CRASHED and
# ABANDONED (the batch budget ran out before the job finished, or started) are not verdicts.
CORRECT, WRONG, GOLD_UNPARSEABLE, NO_ANSWER, ERROR, TIMEOUT, CRASHED, ABANDONED = range(8)
OUTCOME_NAMES = ("correct", "wrong", "gold_unparseable", "no_answer", "errors", "timeouts",
                 "worker_crashes", "abandoned")

_ANSWER_OPEN, _ANSWER_CLOSE = "<answer>", "</answer>"
# `1,450,000` -> `1450000`: commas only when they group digits by three, so a pair `(1,2)` stays.
_THOUSANDS_RE = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_PLAIN_NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
# One layer of `$N$`, `\\(N\\)` or `\\boxed{N}` around a plain number.
_WRAPPED_RE = re.compile(r"\$([^$]*)\$|\\\(([^$]*)\\\)|\\boxed\{([^{}]*)\}")
_LATEX_COMMAND_RE = re.compile(r"\\[A-Za-z]+")
_TEXT_BLOCK_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\{[^{}]*\}")
_WORD_RE = re.compile(r"[A-Za-z]{2,}")
# Numbers joined by the operators of a calculation (not "/": a fraction is an answer; not "^").
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_UNEVALUATED_RE = re.compile(rf"[+-]?{_NUMBER}(?:(?:[+\-*×·÷]|\\times|\\cdot|\\div)[+-]?{_NUMBER})+")
# A plain number longer than this goes to math_verify instead of Decimal (keeps the parent cheap).
_MAX_PLAIN_DIGITS = 64


def extract_answer_span(completion: str) -> tuple[str | None, bool]:
    """Where the final answer of a completion lies: `(span, tagged)`.

    `tagged` is True when the span is the content of the *last* `<answer>...</answer>` block
    (stripped); then it is read as a bare answer. Otherwise the span is the whole completion and
    only a `\\boxed{}` or an explicit "final answer is" anchor counts (as in the tutorial), so a
    number that merely appears in the reasoning is never taken for the answer.
    """
    end = completion.rfind(_ANSWER_CLOSE)
    if end >= 0:
        start = completion.rfind(_ANSWER_OPEN, 0, end)
        if start >= 0:
            return completion[start + len(_ANSWER_OPEN):end].strip(), True
    return (completion if completion.strip() else None), False


def gold_final_span(gold: str) -> str:
    """The final-answer part of a gold string: after the last `####` (GSM8K), else all of it."""
    if "####" in gold:
        return gold.rsplit("####", 1)[1].strip()
    return gold.strip()


def plain_number(span: str | None) -> Decimal | None:
    """`span` as an exact Decimal when it is nothing but a number, else None.

    Accepts `18`, `-3`, `025`, `18.00`, `1,000`, `$18`, `\\$18`, `$18$`, `\\boxed{18}`.
    Two plain numbers are equal exactly when math_verify would call them equal (up to its float
    rounding at 1e-6), so the parent compares them without a worker round trip (the fast path).
    """
    if span is None:
        return None
    s = span.strip()
    wrapped = _WRAPPED_RE.fullmatch(s)
    if wrapped:
        s = next(g for g in wrapped.groups() if g is not None).strip()
    if s.startswith("\\$"):
        s = s[2:]
    elif s.startswith("$") and s.count("$") == 1:
        s = s[1:]
    s = _THOUSANDS_RE.sub("", s.strip())
    if len(s) > _MAX_PLAIN_DIGITS or not _PLAIN_NUMBER_RE.fullmatch(s):
        return None
    try:
        return Decimal(s)
    except InvalidOperation:
        return None


def unevaluated_arithmetic(span: str | None) -> bool:
    """True when `span` is a calculation left to do: numbers joined by + - * × · ÷ (or \\times,
    \\cdot, \\div), e.g. `25 + 10 - 7`, `$3 \\times 4$`, `(2 + 3) * 4`; parentheses, spaces,
    thousands commas and one layer of `$...$` / `\\boxed{}` are ignored. A lone signed number
    (`-3`), a fraction (`1/2`) and a power (`10^3`) are not (module docstring)."""
    if span is None:
        return False
    s = span.strip()
    wrapped = _WRAPPED_RE.fullmatch(s)
    if wrapped:
        s = next(g for g in wrapped.groups() if g is not None)
    s = _THOUSANDS_RE.sub("", re.sub(r"[\s()]", "", s))
    return len(s) <= 4 * _MAX_PLAIN_DIGITS and _UNEVALUATED_RE.fullmatch(s) is not None


def _is_prose(span: str) -> bool:
    """True when a bare span has words outside LaTeX commands and `\\text{}` (`14 dollars`)."""
    stripped = _LATEX_COMMAND_RE.sub(" ", _TEXT_BLOCK_RE.sub(" ", span))
    return _WORD_RE.search(stripped) is not None


# ---- worker side: everything below imports math_verify lazily --------------------------------

@lru_cache(maxsize=1)
def _configs():
    from math_verify import ExprExtractionConfig, LatexExtractionConfig

    # boxed_match_priority=0: a \boxed{} wins over any other LaTeX in the same text.
    latex = LatexExtractionConfig(boxed_match_priority=0)
    anchored = LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)
    return latex, anchored, ExprExtractionConfig()


def _parse(text: str, configs: list) -> list:
    from math_verify import parse

    # parsing_timeout=None: the signal alarm cannot be used off the main thread, and the parent
    # bounds this process from outside anyway.
    return parse(text, extraction_config=configs, extraction_mode="first_match",
                 parsing_timeout=None)


def parse_span(span: str) -> list:
    """math_verify's parse of a bare final answer (the content of `<answer>`, a gold answer)."""
    latex, _, expr = _configs()
    span = span.strip()
    if not span:
        return []
    if "\\boxed" in span or "\\fbox" in span or span.count("$") >= 2 or "\\(" in span \
            or "\\[" in span:
        return _parse(span, [latex])
    bare = _THOUSANDS_RE.sub("", span.replace("$", "") if span.count("$") == 1 else span)
    if _is_prose(bare):
        return _parse(bare, [latex, expr])
    return _parse(f"${bare}$", [latex])


@lru_cache(maxsize=4096)
def parse_gold(gold: str) -> tuple:
    """Parsed gold (cached: the G completions of a group share one gold). Empty = unparseable."""
    if "####" in gold:
        return tuple(parse_span(gold_final_span(gold)))
    if "\\boxed" in gold or "\\fbox" in gold or "\\framebox" in gold:
        # AIME-style solutions write \framebox{204}; math_verify knows \boxed and \fbox.
        return tuple(_parse(gold.replace("\\framebox", "\\boxed"), [_configs()[0]]))
    return tuple(parse_span(gold))


def check_answer(gold: str, span: str | None, tagged: bool) -> int:
    """Outcome code for one (gold, final-answer span) pair. Unbounded in time: run it in a worker.

    The gold is parsed first, so an unparseable gold is reported even when the answer is missing.
    """
    from math_verify import verify

    try:
        gold_parsed = list(parse_gold(gold))
        if not gold_parsed:
            return GOLD_UNPARSEABLE
        if span is None:
            return NO_ANSWER
        if tagged and unevaluated_arithmetic(span) and plain_number(gold_final_span(gold)) is not None:
            return WRONG  # a numeric question answered with the calculation, not its value
        answer = parse_span(span) if tagged else _parse(span, [_configs()[1]])
        if not answer:
            return NO_ANSWER
        return CORRECT if verify(gold_parsed, answer, timeout_seconds=None) else WRONG
    except Exception:  # math_verify swallows its own errors; anything left is a bug in sympy
        return ERROR


# ---- the worker process ----------------------------------------------------------------------
# Protocol: frames of a 4-byte big-endian length, then UTF-8 JSON. The parent sends a list of
# jobs [id, gold, span, tagged]; the worker answers each job with its own frame [id, code], so
# the parent can restart the clock of the next job as soon as one finishes. The first frame the
# worker sends is ["ready", pid], after its imports, so start-up time is not charged to a job.

def write_frame(stream, obj) -> None:
    data = json.dumps(obj).encode("utf-8")
    stream.write(len(data).to_bytes(4, "big") + data)
    stream.flush()


def _read_exact(stream, n: int) -> bytes | None:
    chunks, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def serve() -> None:
    """Worker main loop: read job frames from stdin, answer on the original stdout, exit on EOF."""
    import logging

    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a stray print() from a library must not corrupt the protocol stream
    limit_mb = int(os.environ.get("R1_VERIFIER_MEMORY_MB", "0"))
    if limit_mb > 0:
        import resource

        # A hostile expression can allocate gigabytes before its time bound; cap the address
        # space so it fails with MemoryError (scored ERROR) instead of swapping the trainer.
        resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))
    logging.disable(logging.WARNING)  # math_verify warns per failed parse; the parent counts
    check_answer("1", "1", True)  # import sympy/antlr and compile math_verify's regexes now
    write_frame(out, ["ready", os.getpid()])
    stdin = sys.stdin.buffer
    while True:
        header = _read_exact(stdin, 4)
        if header is None:
            return
        body = _read_exact(stdin, int.from_bytes(header, "big"))
        if body is None:
            return
        for job_id, gold, span, tagged in json.loads(body):
            write_frame(out, [job_id, check_answer(gold, span, tagged)])


if __name__ == "__main__":
    serve()
