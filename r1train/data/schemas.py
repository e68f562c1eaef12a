"""Dataset layouts: which columns a row has, and how each layout becomes a record.

One function per layout turns a row (a dict) into a record (data/loaders.py's docstring lists
the record's fields). Layouts, detected from the columns in this order or chosen by name:

    bespoke         Bespoke-Stratos-17k: system, conversations [{"from", "value"}]
    numina          NuminaMath-TIR: problem, solution, messages; answer = last \\boxed{} of solution
    verl            verl's RL parquet: prompt (chat messages), reward_model.ground_truth
    conversational  TRL: prompt (chat messages, or a string) and ground_truth | answer | solution
    messages        SFT chats (TRL, OpenRLHF): messages [{"role", "content"}, ...]; tool use too:
                    `tool` turns and assistant `tool_calls` (written into the text as <tool_call>
                    blocks, prompts.tool_calls_text)
    math            MATH / AIME / AMC: problem and solution and/or answer
    gsm8k           GSM8K: question, answer = worked text ending in "#### N"
    qa              question and a bare answer ("12"): auto picks it over gsm8k when no row's
                    answer has a "#### N" line

`columns` mapping (`--data.columns problem=question,answer=target`) renames a file's columns
to these names before detection; a source may be nested (`answer=reward_model.ground_truth`).
Columns a layout does not read stay in the record, unchanged, for reward functions.

System prompts. `system_prompt` opens the prompt of RL layouts whose rows are bare problems
(numina, math, gsm8k, qa), and of conversational and verl prompts that carry no system turn
(empty: none). Chat layouts for SFT (bespoke, messages) are taught as they are: the row's own
system turn or none.
"""
from __future__ import annotations

import math
import re
from typing import Any

from r1train.data.prompts import make_conversation, tool_calls_text


class DatasetError(ValueError):
    """A dataset source, file, column or row that cannot be read into records."""


# Each schema is a tuple of column groups; a file needs at least one column of every group.
# Detection tries them in this order because the AIME/AMC copies carry `question` + `answer`
# (the GSM8K columns) next to `problem`, NuminaMath's columns contain MATH's and those of
# `messages`, and verl's rows carry a `prompt` as conversational rows do.
SCHEMAS: dict[str, tuple[tuple[str, ...], ...]] = {
    "bespoke": (("system",), ("conversations",)),
    "numina": (("problem",), ("solution",), ("messages",)),
    "verl": (("prompt",), ("reward_model",)),
    "conversational": (("prompt",), ("ground_truth", "answer", "solution")),
    "messages": (("messages",),),
    "math": (("problem",), ("solution", "answer")),
    "gsm8k": (("question",), ("answer",)),
    "qa": (("question",), ("answer",)),
}
# Fields every record has (or, `messages`, SFT records): never overwritten by a row's extra columns.
RECORD_FIELDS = ("prompt", "problem", "solution", "answer", "messages")
ROLES = ("system", "user", "assistant")


class _BadRow(Exception):
    """What is wrong with one row: a field of it (`field_name`), or the whole row (None)."""

    def __init__(self, field_name: str | None, reason: str):
        super().__init__(reason if field_name is None else f"field {field_name!r}: {reason}")
        self.field_name, self.reason = field_name, reason


# ---- answers ------------------------------------------------------------------------------

GSM8K_FINAL = re.compile(r"####[ \t]*(\S[^\n]*?)\s*$")
THOUSANDS_SEPARATOR = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


def last_boxed(text: str) -> str:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) in `text`, braces balanced; "" if none.

    `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`: a regex up to the first "}" would cut it.
    """
    found = ""
    for match in re.finditer(r"\\(?:boxed|fbox)\s*\{", text):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                found = text[start:i].strip()
                break
    return found


def normalize_answer(value: Any) -> str:
    """A gold answer as a string: AMC stores 27.0 (-> "27"), AIME "025" (kept), 0.5 -> "0.5"."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"answer must be a string or a number, got {type(value).__name__} {value!r:.60}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"answer must be finite, got {value!r}")
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value).strip()


# ---- rows -> records, one function per schema ----------------------------------------------

def _text(row: dict, key: str, field_name: str | None = None) -> str:
    name = field_name or key
    if key not in row or row[key] is None:
        raise _BadRow(name, "missing")
    value = row[key]
    if not isinstance(value, str):
        raise _BadRow(name, f"not a string: {type(value).__name__} {value!r:.60}")
    if not value.strip():
        raise _BadRow(name, "empty")
    return value.strip()


def _answer_field(row: dict, key: str = "answer", field_name: str | None = None) -> str:
    name = field_name or key
    if row.get(key) is None:
        raise _BadRow(name, "missing")
    try:
        answer = normalize_answer(row[key])
    except ValueError as e:
        raise _BadRow(name, str(e)) from None
    if not answer:
        raise _BadRow(name, "empty")
    return answer


def _rl_record(problem: str, solution: str, answer: str, system_prompt: str) -> dict[str, Any]:
    prompt = make_conversation(problem, system_prompt)
    return {"prompt": prompt, "problem": problem, "solution": solution, "answer": answer}


def _numina_row(row: dict, columns: list[str], system_prompt: str) -> dict[str, Any]:
    problem, solution = _text(row, "problem"), _text(row, "solution")
    return _rl_record(problem, solution, last_boxed(solution), system_prompt)


def _math_row(row: dict, columns: list[str], system_prompt: str) -> dict[str, Any]:
    problem = _text(row, "problem")
    solution = _text(row, "solution") if "solution" in columns else ""
    answer = _answer_field(row) if "answer" in columns else last_boxed(solution)
    return _rl_record(problem, solution, answer, system_prompt)


def _gsm8k_row(row: dict, columns: list[str], system_prompt: str) -> dict[str, Any]:
    question, worked = _text(row, "question"), _text(row, "answer")
    final = GSM8K_FINAL.search(worked)
    if final is None:
        raise _BadRow("answer", f"no final '#### N' line: ...{worked[-60:]!r}")
    answer = THOUSANDS_SEPARATOR.sub("", final.group(1))  # "#### 2,125" -> "2125"
    return _rl_record(question, worked[: final.start()].rstrip(), answer, system_prompt)


def _bespoke_row(row: dict, columns: list[str], system_prompt: str) -> dict[str, Any]:
    # The row brings its own system prompt (Bespoke's "Your role as an assistant ..."): SFT
    # teaches the model that conversation, so `system_prompt` is not applied here. An empty
    # "system" (a set written under `--data.system_prompt ''`) means no system turn.
    none = isinstance(row.get("system"), str) and not row["system"].strip()
    messages = [] if none else [{"role": "system", "content": _text(row, "system")}]
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise _BadRow("conversations", f"not a non-empty list: {turns!r:.60}")
    for j, turn in enumerate(turns):
        expected = ("user", "assistant")[j % 2]  # user asks, assistant answers, in turn
        if not isinstance(turn, dict) or turn.get("from") != expected:
            raise _BadRow(f"conversations[{j}]", f"expected a turn from {expected!r}, got {turn!r:.60}")
        messages.append({"role": expected, "content": _text(turn, "value", f"conversations[{j}].value")})
    if messages[-1]["role"] != "assistant":
        raise _BadRow("conversations", "ends with a user turn: no assistant reply to learn from")
    user = 0 if none else 1  # the first user turn
    reply = messages[user + 1]["content"]
    return {"prompt": messages[:user + 1], "problem": messages[user]["content"], "solution": reply,
            "answer": last_boxed(reply), "messages": messages}




def _chat(value: Any, field_name: str, tools: bool = False) -> list[dict[str, str]]:
    """A list of {"role", "content"} messages with string contents and known roles.

    `tools` (SFT conversations, the messages layout): `tool` turns too, and assistant turns with
    `tool_calls` (OpenAI's layout; content may then be empty or null), whose calls are written
    into the content as `<tool_call>` blocks (data/prompts.py `tool_calls_text`)."""
    if not isinstance(value, list) or not value:
        raise _BadRow(field_name, f"not a non-empty list of chat messages: {value!r:.60}")
    roles = ROLES + ("tool",) if tools else ROLES
    messages = []
    for j, m in enumerate(value):
        calls = m.get("tool_calls") if tools and isinstance(m, dict) and m.get("role") == "assistant" else None
        if calls:
            m = _with_calls(m, calls, f"{field_name}[{j}]")
        if not isinstance(m, dict) or m.get("role") not in roles or not isinstance(m.get("content"), str):
            raise _BadRow(f"{field_name}[{j}]", f"expected {{'role': {'|'.join(roles)}, 'content': "
                                                f"text}}, got {m!r:.60}")
        messages.append({"role": m["role"], "content": m["content"].strip()})
    return messages


def _with_calls(message: dict, calls: Any, field_name: str) -> dict:
    """An assistant message with `tool_calls` as one whose content holds them as text."""
    if not isinstance(calls, list) or not all(
            isinstance(c, dict) and isinstance(c.get("function", c), dict)
            and isinstance(c.get("function", c).get("name"), str)
            and isinstance(c.get("function", c).get("arguments"), (dict, str)) for c in calls):
        raise _BadRow(f"{field_name}.tool_calls", f"expected [{{'function': {{'name': text, 'arguments': "
                                                  f"object}}}}, ...], got {calls!r:.60}")
    content = message.get("content") or ""
    if not isinstance(content, str):
        raise _BadRow(f"{field_name}.content", f"not a string: {content!r:.60}")
    try:
        return {"role": "assistant", "content": tool_calls_text(content.strip(), calls)}
    except ValueError as e:  # arguments given as a JSON string that does not parse
        raise _BadRow(f"{field_name}.tool_calls", f"arguments are not JSON: {e}") from None


def _prompt_field(row: dict, system_prompt: str) -> list[dict[str, str]]:
    """A conversational prompt: chat messages ending with the user's turn (a string is one user
    turn); `system_prompt` goes first when the prompt has no system turn and it is not empty."""
    value = row.get("prompt")
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    prompt = _chat(value, "prompt")
    if prompt[-1]["role"] != "user" or not prompt[-1]["content"]:
        raise _BadRow("prompt", "does not end with a non-empty user turn (the turn the model answers)")
    if prompt[0]["role"] != "system" and system_prompt:
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return prompt


def _conversational_row(row: dict, columns: list[str], system_prompt: str) -> dict[str, Any]:
    prompt = _prompt_field(row, system_prompt)
    solution = _text(row, "solution") if "solution" in columns else ""
    for key in ("ground_truth", "answer"):
        if key in columns:
            answer = _answer_field(row, key)
            break
    else:
        answer = last_boxed(solution)
    return {"prompt": prompt, "problem": prompt[-1]["content"], "solution": solution, "answer": answer}


def _verl_row(row: dict, columns: list[str], system_prompt: str) -> dict[str, Any]:
    prompt = _prompt_field(row, system_prompt)
    reward_model = row.get("reward_model")
    if not isinstance(reward_model, dict) or reward_model.get("ground_truth") is None:
        raise _BadRow("reward_model", f"expected {{'ground_truth': ...}}, got {reward_model!r:.60}")
    answer = _answer_field(reward_model, "ground_truth", "reward_model.ground_truth")
    return {"prompt": prompt, "problem": prompt[-1]["content"], "solution": "", "answer": answer}


def _messages_row(row: dict, columns: list[str], system_prompt: str) -> dict[str, Any]:
    messages = _chat(row.get("messages"), "messages", tools=True)
    replies = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
    if not replies or replies[0] == 0 or messages[replies[0] - 1]["role"] != "user":
        raise _BadRow("messages", "has no assistant reply after a user turn: nothing to learn from")
    prompt, reply = messages[:replies[0]], messages[replies[0]]["content"]
    # A tool-use conversation states its answer in its last reply, after the tool turns.
    final = messages[replies[-1]]["content"] if any(m["role"] == "tool" for m in messages) else reply
    answer = _answer_field(row) if "answer" in columns else last_boxed(final)
    return {"prompt": prompt, "problem": prompt[-1]["content"], "solution": reply, "answer": answer,
            "messages": messages}


def _qa_row(row: dict, columns: list[str], system_prompt: str) -> dict[str, Any]:
    return _rl_record(_text(row, "question"), "", _answer_field(row), system_prompt)


ROW_FUNCTIONS = {"bespoke": _bespoke_row, "numina": _numina_row, "verl": _verl_row,
                 "conversational": _conversational_row, "messages": _messages_row, "math": _math_row,
                 "gsm8k": _gsm8k_row, "qa": _qa_row}


def describe_schemas() -> str:
    return "; ".join(f"{name} ({', '.join('|'.join(g) for g in groups)})" for name, groups in SCHEMAS.items())


def _has_gsm8k_answers(rows: list) -> bool:
    return any(isinstance(r, dict) and isinstance(r.get("answer"), str) and "####" in r["answer"] for r in rows)


def pick_schema(name: str, columns: list[str], rows: list, schema: str) -> str:
    """The layout of a table: `schema` when named (its columns checked), else the first that
    fits its columns; of gsm8k and qa (the same columns), gsm8k when a row's answer has "####"."""
    present = set(columns)
    if schema == "auto":
        for candidate, groups in SCHEMAS.items():
            if all(present & set(group) for group in groups):
                if candidate == "gsm8k" and not _has_gsm8k_answers(rows):
                    continue
                return candidate
        raise DatasetError(
            f"{name}: unknown schema; columns found: {columns}; expected one of: {describe_schemas()}; "
            f"pass schema= (--data.schema) to choose one, or map columns with --data.columns "
            f"(e.g. problem=<column>,answer=<column>)"
        )
    missing = [" or ".join(repr(c) for c in group) for group in SCHEMAS[schema] if not present & set(group)]
    if missing:
        raise DatasetError(
            f"{name}: missing required column {', '.join(missing)} of schema {schema!r}; "
            f"columns found: {columns}; map one with --data.columns (e.g. problem=<column>)"
        )
    return schema


def parse_column_map(entries: list[str] | dict[str, str] | None) -> dict[str, str]:
    """`["problem=question", "answer=target"]` -> {"problem": "question", "answer": "target"};
    ValueError naming the entry for a malformed one or an unknown record column."""
    if isinstance(entries, dict):
        entries = [f"{k}={v}" for k, v in entries.items()]
    known = sorted({c for groups in SCHEMAS.values() for g in groups for c in g} | set(RECORD_FIELDS))
    mapping = {}
    for entry in entries or ():
        target, eq, source = (s.strip() for s in entry.partition("="))
        if not eq or not target or not source:
            raise ValueError(f"{entry!r}: expected <column>=<column of the file>, e.g. problem=question")
        if target not in known:
            raise ValueError(f"{entry!r}: {target!r} is not a column any layout reads; one of {', '.join(known)}")
        if target in mapping:
            raise ValueError(f"{entry!r}: {target!r} is mapped twice")
        mapping[target] = source
    return mapping


def _dig(row: dict, path: str) -> tuple[bool, Any]:
    """(found, value) of a column, or of a nested field `a.b` of a dict column."""
    if path in row:
        return True, row[path]
    value: Any = row
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def map_columns(name: str, columns: list[str], rows: list, mapping: dict[str, str],
                strict: bool = True) -> tuple[list[str], list]:
    """Rename the columns of a table's rows by `mapping` ({record column: file column}).

    `strict`: a file column the table lacks is a DatasetError naming it; else that entry is
    left out (an eval source with its own layout). A renamed top-level column leaves the row."""
    present = set(columns)
    used = {}
    for target, source in mapping.items():
        if source in present or source.split(".")[0] in present:
            used[target] = source
        elif strict:
            raise DatasetError(f"{name}: --data.columns {target}={source}: no column {source!r}; "
                               f"columns found: {columns}")
    if not used:
        return columns, rows
    out = []
    for row in rows:
        if not isinstance(row, dict):
            out.append(row)
            continue
        row = dict(row)
        for target, source in used.items():
            found, value = _dig(row, source)
            row.pop(source, None)
            if found:
                row[target] = value
        out.append(row)
    renamed = [c for c in columns if c not in used.values()]
    return renamed + [t for t in used if t not in renamed], out


def with_extra_columns(record: dict[str, Any], row: dict, schema: str) -> dict[str, Any]:
    """The record plus the row's columns that its layout does not read (for reward functions)."""
    read = {c for group in SCHEMAS[schema] for c in group} | set(RECORD_FIELDS)
    return {**record, **{k: v for k, v in row.items() if k not in read and k not in record}}
