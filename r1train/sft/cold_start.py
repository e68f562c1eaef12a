"""Cold-start SFT data in the R1 format `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`.

The R1 tutorial's "Cold Start Data" section names three ways to get long, readable reasoning to
fine-tune on before RL, plus a ready-made set; each is one function here:

    convert_bespoke        Bespoke-Stratos-17k rows (<|begin_of_thought|> ... blocks) -> R1 format
    few_shot_messages      few-shot prompting with long CoT (solved examples, delimiter markers)
    direct_messages        direct prompting: "solve, show your reasoning step by step, verify"
    refine_output          post-processing of R1-Zero style outputs (fillers out, summary line)
    to_r1_format           any of those outputs -> the R1-format SFT target
    generate_sft_set       an engine + a prompt builder -> generations -> R1 format -> JSONL
    write_sft_jsonl        SFT records -> JSONL in Bespoke's layout, which `data.load_records` reads

Departures from the tutorial. Its `refine_output` splits on the tags and so raises IndexError
when a tag is missing, removes only the literal "umm...", and calls str.capitalize(), which
lowercases the rest of the text ("GCD" -> "gcd"); here missing tags fall back to the other
markers, every filler word goes, and only the first letter is raised. Its few-shot prompt ends
with the target problem and then appends it a second time; here it appears once. The SFT target
of every generated row pairs the R1 system prompt and the bare problem (not the few-shot prompt
that produced it) with the R1-format reply, since that is the conversation RL will continue.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from r1train.data.prompts import SYSTEM_PROMPT, make_conversation, render_prompt
from r1train.data.schemas import DatasetError, last_boxed

THOUGHT = ("<|begin_of_thought|>", "<|end_of_thought|>")
SOLUTION = ("<|begin_of_solution|>", "<|end_of_solution|>")
SPECIAL_TOKEN = "<|special_token|>"  # the tutorial's delimiter around reasoning and summary
R1_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
log = logging.getLogger(__name__)

COLD_START_SYSTEM_PROMPT = "You are a careful assistant. You solve problems step by step and check your work."


def r1_text(reasoning: str, answer: str) -> str:
    """The R1 reply: `<think>\\n{reasoning}\\n</think>\\n<answer>\\n{answer}\\n</answer>`."""
    return f"<think>\n{reasoning}\n</think>\n<answer>\n{answer}\n</answer>"


# Bespoke-Stratos -> R1

def _block(text: str, markers: tuple[str, str]) -> tuple[str, int, int]:
    start, end = text.find(markers[0]), text.find(markers[1])
    if start < 0 or end < 0:
        missing = markers[0] if start < 0 else markers[1]
        raise ValueError(f"no {missing} marker")
    if text.count(markers[0]) > 1 or text.count(markers[1]) > 1:
        raise ValueError(f"more than one {markers[0]} ... {markers[1]} block")
    if end < start:
        raise ValueError(f"{markers[1]} comes before {markers[0]}")
    return text[start + len(markers[0]) : end].strip(), start, end + len(markers[1])


def bespoke_to_r1(text: str) -> str:
    """One Bespoke-Stratos assistant reply in the R1 format.

    `<|begin_of_thought|> T <|end_of_thought|> <|begin_of_solution|> S <|end_of_solution|>` ->
    `<think>\\nT\\n</think>\\n<answer>\\nS\\n</answer>`, T and S stripped. Raises ValueError when a
    marker is missing, repeated or out of order, or when text lies outside the two blocks (it
    would be lost without a word).
    """
    thought, t0, t1 = _block(text, THOUGHT)
    solution, s0, s1 = _block(text, SOLUTION)
    if s0 < t1:
        raise ValueError("the solution block does not follow the thought block")
    outside = (text[:t0] + text[t1:s0] + text[s1:]).strip()
    if outside:
        raise ValueError(f"text outside the thought and solution blocks: {outside[:60]!r}")
    if not thought or not solution:
        raise ValueError(f"empty {'thought' if not thought else 'solution'} block")
    return r1_text(thought, solution)


def convert_bespoke(
    records: Iterable[dict[str, Any]], *, system_prompt: str | None = SYSTEM_PROMPT, on_bad_row: str = "error"
) -> tuple[list[dict[str, Any]], int]:
    """Bespoke-Stratos records (`data.load_records(..., schema="bespoke")`) in the R1 format.

    Every assistant message goes through `bespoke_to_r1`; the system message becomes
    `system_prompt` (None keeps the row's own). `solution` becomes the converted first reply and
    `prompt` the new [system, user]; `problem` and `answer` stay. A row whose reply lacks the
    markers raises DatasetError naming the row, or with `on_bad_row="skip"` is left out and
    counted. Returns (records, skipped).
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"convert_bespoke: on_bad_row={on_bad_row!r}; expected 'error' or 'skip'")
    converted, bad = [], []
    for i, record in enumerate(records):
        messages = record.get("messages") if isinstance(record, dict) else None
        if not isinstance(messages, list) or len(messages) < 3 or messages[0].get("role") != "system":
            raise DatasetError(f"convert_bespoke: row {i} has no [system, user, assistant, ...] 'messages'")
        try:
            new = [_convert_message(j, m) for j, m in enumerate(messages)]
        except ValueError as e:
            where = f"row {i} (problem {str(record.get('problem', ''))[:40]!r}), {e}"
            if on_bad_row == "error":
                raise DatasetError(f"convert_bespoke: {where}") from None
            bad.append(where)
            continue
        if system_prompt is not None:
            new[0]["content"] = system_prompt
        converted.append({**record, "messages": new, "prompt": new[:2], "solution": new[2]["content"]})
    if bad:
        log.warning(f"convert_bespoke: skipped {len(bad)} rows without the Bespoke markers (first: {bad[0]})")
    return converted, len(bad)


def _convert_message(j: int, message: dict[str, str]) -> dict[str, str]:
    if message.get("role") != "assistant":
        return dict(message)
    try:
        return dict(message, content=bespoke_to_r1(message["content"]))
    except ValueError as e:
        raise ValueError(f"messages[{j}]: {e}") from None


# Prompt builders

# (problem, reasoning, summary): written for this project, in the tutorial's shape.
DEFAULT_FEW_SHOT_EXAMPLES = (
    ("What is the square root of 16, plus 7?",
     "The square root of 16 is 4, since 4 * 4 = 16. Adding 7 gives 4 + 7 = 11. "
     "Check: 11 - 7 = 4, and 4 * 4 = 16.",
     "The answer is 11."),
    ("A car drives at 50 km/h for 3 hours. How far does it go?",
     "Distance is speed times time. The speed is 50 km/h and the time is 3 hours, so the distance "
     "is 50 * 3 = 150 km. Check: 150 / 3 = 50, the given speed.",
     "The answer is 150 km."),
)


def few_shot_messages(
    problem: str,
    examples: Sequence[tuple[str, str, str]] = DEFAULT_FEW_SHOT_EXAMPLES,
    *,
    delimiter: str = SPECIAL_TOKEN,
    system_prompt: str = COLD_START_SYSTEM_PROMPT,
) -> list[dict[str, str]]:
    """Few-shot prompting with long CoT: solved examples, then `problem`, as [system, user].

    Each example is `Problem: ...` then `Solution: {delimiter} reasoning {delimiter} Summary: ...`,
    the layout the model is expected to copy; the user turn ends with the open `Solution:`.
    """
    if not examples:
        raise ValueError("few_shot_messages: examples is empty; pass at least one (problem, reasoning, summary)")
    shots = []
    for k, example in enumerate(examples):
        if len(example) != 3 or not all(isinstance(x, str) and x.strip() for x in example):
            raise ValueError(f"few_shot_messages: examples[{k}] must be three non-empty strings, got {example!r:.80}")
        q, reasoning, summary = (x.strip() for x in example)
        shots.append(f"Problem: {q}\nSolution: {delimiter} {reasoning} {delimiter} Summary: {summary}")
    intro = (f"Here are solved problems. Each solution reasons step by step between {delimiter} markers "
             "and ends with a one-line summary. Solve the last problem the same way.")
    user = "\n\n".join([intro, *shots, f"Problem: {_problem(problem)}\nSolution:"])
    return make_conversation(user, system_prompt)


def direct_messages(problem: str, *, system_prompt: str = COLD_START_SYSTEM_PROMPT) -> list[dict[str, str]]:
    """Direct prompting: ask for step-by-step reasoning, a verification and a summary line."""
    user = ("Solve the problem below. Show your reasoning step by step, then verify the result, and "
            "finish with the line 'Summary: The answer is <answer>.'\n\n"
            f"Problem: {_problem(problem)}")
    return make_conversation(user, system_prompt)


def _problem(problem: str) -> str:
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"problem must be a non-empty string, got {problem!r:.80}")
    return problem.strip()


# Post-processing of generated reasoning

_FILLER = re.compile(r"\b(?:u+m+|u+h+|h+m+|e+r+m+)\b[.,…!]*[ \t]*", re.IGNORECASE)  # umm..., uh, hmm, erm,
_SUMMARY = re.compile(r"summary\s*:", re.IGNORECASE)
_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+)", re.IGNORECASE | re.DOTALL)


def _last_between(text: str, open_tag: str, close_tag: str) -> str | None:
    end = text.rfind(close_tag)
    start = text.rfind(open_tag, 0, end) if end >= 0 else -1
    return text[start + len(open_tag) : end] if start >= 0 else None


def _answer_from_line(line: str) -> str:
    line = line.strip().splitlines()[0].strip() if line.strip() else ""
    said = _ANSWER_IS.search(line)
    return (said.group(1) if said else line).strip().rstrip(".").strip()


def parse_output(text: str, delimiter: str = SPECIAL_TOKEN) -> tuple[str, str]:
    """A generated reply split into (reasoning, answer); either may be "". The reasoning is raw
    (see `clean_reasoning`); the answer is stripped, stray R1 tags out.

    Answer: the last `<answer>...</answer>`; else the text after an unclosed `<answer>`; else
    the first line after the last "Summary:" ("The answer is X." -> "X"); else the last
    \\boxed{}; else the first line after `</think>` (read as after "Summary:"); else "".
    Reasoning: the first `<think>...</think>`; else the text after an unclosed `<think>` up to
    `<answer>`; else the text before a lone `</think>`; else the text before `<answer>` /
    "Summary:"; else all of it.
    """
    if not isinstance(text, str):
        raise ValueError(f"parse_output: text must be a string, got {type(text).__name__}")
    answer_start = text.find("<answer>")
    tagged = _last_between(text, "<answer>", "</answer>")
    summaries = list(_SUMMARY.finditer(text)) if answer_start < 0 else []
    if tagged is not None:
        answer = tagged.strip()
    elif answer_start >= 0:
        answer = text[answer_start + len("<answer>") :].strip()
    elif summaries:
        answer = _answer_from_line(text[summaries[-1].end() :])
        answer_start = summaries[-1].start()
    else:
        answer = last_boxed(text)
    think_open, think_close = text.find("<think>"), text.find("</think>")
    if not answer and think_close >= 0:
        answer = _answer_from_line(text[think_close + len("</think>") :])
    if think_open >= 0:
        stop = think_close if think_close > think_open else (answer_start if answer_start > think_open else len(text))
        reasoning = text[think_open + len("<think>") : stop]
    elif think_close >= 0:  # the prompt opened <think> (a common R1-Zero template)
        reasoning = text[:think_close]
    else:
        reasoning = text[:answer_start] if answer_start >= 0 else text
    reasoning = reasoning.replace(delimiter, " ")
    for tag in R1_TAGS:
        answer = answer.replace(tag, " ")
    return reasoning, re.sub(r"[ \t]+", " ", answer).strip()


def clean_reasoning(text: str) -> str:
    """Filler words out ("umm...", "uh,", "hmm", "erm"), stray R1 tags and a leading "Reasoning:" label
    out, runs of spaces collapsed, lines stripped, blank lines squeezed to one, the first letter
    raised, trailing dots replaced by one full stop."""
    for tag in R1_TAGS:
        text = text.replace(tag, " ")
    text = _FILLER.sub("", text)
    lines = [re.sub(r"[ \t]+", " ", line).strip() for line in text.splitlines()]
    text = re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()
    text = re.sub(r"^reasoning\s*:\s*", "", text, flags=re.IGNORECASE)
    text = text.rstrip(" .…")
    if not text:
        return ""
    if text[-1] not in "!?":
        text += "."
    return text[0].upper() + text[1:]


def refine_output(text: str, delimiter: str = SPECIAL_TOKEN) -> str:
    """The tutorial's post-processing refinement of an R1-Zero output, made robust:
    `{delimiter} Reasoning: ...\\n{delimiter} Summary: The answer is X.` (any tag may be missing;
    with no answer found the summary says so)."""
    reasoning, answer = parse_output(text, delimiter)
    summary = f"The answer is {answer.rstrip('.')}." if answer else "No final answer was given."
    return f"{delimiter} Reasoning: {clean_reasoning(reasoning)}\n{delimiter} Summary: {summary}"


def to_r1_format(text: str, *, require_answer: bool = True, delimiter: str = SPECIAL_TOKEN) -> str:
    """A generated reply (R1 tags, delimiter markers or plain text) as the R1-format SFT target,
    reasoning cleaned by `clean_reasoning`. With `require_answer`, a reply with no answer to be
    found raises ValueError: it cannot teach the format."""
    reasoning, answer = parse_output(text, delimiter)
    if require_answer and not answer:
        raise ValueError(f"to_r1_format: no answer in the output: {text[-80:]!r}")
    return r1_text(clean_reasoning(reasoning), answer)


# Files

def write_sft_jsonl(path: str | os.PathLike, records: Iterable[dict[str, Any]]) -> int:
    """Write SFT records (`messages` = system, then user / assistant turns ending with assistant)
    as JSONL in Bespoke-Stratos's layout, `{"system", "conversations": [{"from", "value"}]}`, so
    that `data.load_records(path, schema="bespoke")` reads them back. Messages without a system
    turn (prompts made under `--data.system_prompt ''`) are written with `"system": ""`, which
    the loader reads back as no system turn. Texts are stripped, as the loader strips them.
    Written to a temporary file and renamed: no half-written file is left. Returns the number
    of rows."""
    path = Path(path)
    if path.suffix != ".jsonl":
        raise ValueError(f"write_sft_jsonl: path {str(path)!r} must end in .jsonl")
    lines = []
    for i, record in enumerate(records):
        messages = record.get("messages") if isinstance(record, dict) else None
        listed = isinstance(messages, list) and bool(messages) and isinstance(messages[0], dict)
        system = listed and messages[0].get("role") == "system"
        if not listed or len(messages) < 2 + system:
            raise ValueError(f"write_sft_jsonl: record {i} has no [system, user, assistant, ...] 'messages'")
        for j, message in enumerate(messages):
            expected = "system" if system and j == 0 else ("user", "assistant")[(j - system) % 2]
            content = message.get("content") if isinstance(message, dict) else None
            if not isinstance(message, dict) or message.get("role") != expected or \
                    not isinstance(content, str) or not content.strip():
                raise ValueError(f"write_sft_jsonl: record {i}, messages[{j}]: expected a non-empty "
                                 f"{expected!r} message, got {message!r:.80}")
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"write_sft_jsonl: record {i} ends with a user turn")
        row = {"system": messages[0]["content"].strip() if system else "",
               "conversations": [{"from": m["role"], "value": m["content"].strip()} for m in messages[system:]]}
        lines.append(json.dumps(row, ensure_ascii=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, path)
    return len(lines)


@dataclass(frozen=True)
class SFTSetStats:
    problems: int
    written: int
    skipped: int  # outputs with no answer to be found (require_answer) or refused by `keep`


def generate_sft_set(
    engine: Any,
    problems: Sequence[str | dict[str, Any]],
    builder: Callable[[str], list[dict[str, str]]],
    out_path: str | os.PathLike,
    *,
    batch_size: int = 8,
    max_new_tokens: int = 512,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    require_answer: bool = True,
    keep: Callable[[dict[str, Any], str], bool] | None = None,
    system_prompt: str = SYSTEM_PROMPT,
    seed: int = 0,
) -> SFTSetStats:
    """Generate a reply to each problem, turn it into an R1-format SFT row and write the JSONL.

    `engine`: an `model.engine.Engine` (the project's one generator). `problems`: strings, or
    records with a `problem` field. Each batch is the builder's chats (`few_shot_messages`,
    `direct_messages`, ...) through the chat template, greedy or sampled with `temperature` /
    `top_p`, problem i seeded with `seed * 1_000_003 + i` (so a sampled set is reproducible and
    does not depend on `batch_size`). Each reply goes through `to_r1_format`;
    `keep(record, r1_reply)` may refuse it too (rejection sampling: keep only replies whose
    answer verifies). Written rows are [system_prompt, problem, R1 reply].
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"generate_sft_set: batch_size must be a positive int, got {batch_size!r}")
    records = [p if isinstance(p, dict) else {"problem": p} for p in problems]
    for i, record in enumerate(records):
        if not isinstance(record.get("problem"), str) or not record["problem"].strip():
            raise ValueError(f"generate_sft_set: problems[{i}] has no non-empty 'problem' text")
    tokenizer = engine.tokenizer
    rows, skipped = [], 0
    for start in range(0, len(records), batch_size):
        batch = records[start : start + batch_size]
        prompts = [tokenizer(render_prompt(tokenizer, builder(r["problem"]), add_generation_prompt=True),
                             add_special_tokens=False)["input_ids"] for r in batch]
        out = engine.generate(prompts, [seed * 1_000_003 + start + i for i in range(len(batch))],
                              max_new_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0,
                              top_p=top_p)
        for record, reply in zip(batch, out.texts):
            try:
                target = to_r1_format(reply, require_answer=require_answer)
            except ValueError:
                skipped += 1
                continue
            if keep is not None and not keep(record, target):
                skipped += 1
                continue
            messages = [*make_conversation(record["problem"].strip(), system_prompt),
                        {"role": "assistant", "content": target}]
            rows.append({"messages": messages})
    written = write_sft_jsonl(out_path, rows)
    return SFTSetStats(problems=len(records), written=written, skipped=skipped)
