"""SFT on tool-use conversations (issue 33): the loss covers what the assistant wrote, nothing else.

The expectations are written out by hand from each template's rendering (the tiny model's ChatML,
and Qwen2.5's tools layout from test_tools.py), then tokenized piece by piece as generation does:
the labels are the assistant's text (up to `</tool_call>` before a tool turn, up to its
end-of-turn token after its last reply); tool turns, headers and the end of a turn that the
environment inserts carry -100, and packing keeps that.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_tools import QWEN_TOOLS_TEMPLATE

from r1train.data.prompts import tool_calls_text
from r1train.data.schemas import _BadRow, _messages_row
from r1train.sft.packing import IGNORE_INDEX, pack, tokenize_conversation

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "assets" / "tiny-r1-sft"

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "347 * 821"}}\n</tool_call>'
OPENAI_CALL = {"type": "function", "function": {"name": "calculator", "arguments": '{"expression": "347 * 821"}'}}


def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TINY)


def expected(tok, pieces: list[tuple[str, bool]]) -> tuple[list[int], list[int]]:
    """(ids, labels) of hand-written (text, trained) pieces, each tokenized on its own."""
    ids, labels = [], []
    for text, trained in pieces:
        piece = tok(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return ids, labels


def conversation(calls_as: str) -> list[dict]:
    call = ({"role": "assistant", "content": CALL} if calls_as == "text" else
            {"role": "assistant", "content": None, "tool_calls": [OPENAI_CALL]})
    return [{"role": "system", "content": "S"}, {"role": "user", "content": "What is 347 * 821?"}, call,
            {"role": "tool", "content": "284887"},
            {"role": "assistant", "content": "<think>347 * 821 = 284887.</think><answer>284887</answer>"}]


@pytest.mark.parametrize("calls_as", ["text", "tool_calls"])
def test_chatml_labels_are_the_assistant_text(calls_as):
    tok = tokenizer()
    ids, labels = tokenize_conversation(tok, conversation(calls_as))
    want = expected(tok, [
        ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is 347 * 821?<|im_end|>\n<|im_start|>assistant\n",
         False),
        (CALL, True),  # the row's first segment ends at </tool_call>: <|im_end|> is the environment's
        ("<|im_end|>\n<|im_start|>tool\n284887<|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>347 * 821 = 284887.</think><answer>284887</answer><|im_end|>", True),
        ("\n", False)])
    assert (ids, labels) == want
    assert tok.decode(ids) == tok.apply_chat_template(conversation("text"), tokenize=False)


def test_qwen_template_tool_calls_and_a_run_of_tool_turns():
    tok = tokenizer()
    tok.chat_template = QWEN_TOOLS_TEMPLATE
    messages = conversation("tool_calls")
    messages[2]["tool_calls"] = [OPENAI_CALL, {"function": {"name": "calculator", "arguments": {"expression": "1+1"}}}]
    messages[3:4] = [{"role": "tool", "content": "284887"}, {"role": "tool", "content": "2"}]
    ids, labels = tokenize_conversation(tok, messages)
    second = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}\n</tool_call>'
    want = expected(tok, [
        ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is 347 * 821?<|im_end|>\n<|im_start|>assistant\n",
         False),
        (CALL + "\n" + second, True),
        ("<|im_end|>\n<|im_start|>user\n<tool_response>\n284887\n</tool_response>\n<tool_response>\n2\n"
         "</tool_response><|im_end|>\n<|im_start|>assistant\n", False),
        ("<think>347 * 821 = 284887.</think><answer>284887</answer><|im_end|>", True),
        ("\n", False)])
    assert (ids, labels) == want
    # The calls written into the text render as the template's own tool_calls branch renders them
    # (given arguments as an object: jinja's tojson would quote a JSON string again).
    messages[2]["tool_calls"][0] = {"function": {"name": "calculator", "arguments": {"expression": "347 * 821"}}}
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)


def test_packing_keeps_tool_turns_off_the_loss():
    tok = tokenizer()
    docs = [tokenize_conversation(tok, conversation("text")),
            tokenize_conversation(tok, conversation("text")[:2] + [{"role": "assistant", "content": "4"}])]
    rows, stats = pack(docs, max_seq_len=4096)
    (row,) = rows
    at = 0
    for d, n in zip(row.doc_index, row.doc_lens):
        ids, labels = docs[d]
        assert row.input_ids[at:at + n] == ids
        assert row.labels[at:at + n] == [IGNORE_INDEX] + labels[1:]
        at += n
    assert stats.label_tokens == sum(sum(x != IGNORE_INDEX for x in labels[1:]) for _, labels in docs)


def test_messages_layout_reads_tool_use_conversations():
    row = {"messages": conversation("tool_calls")}
    record = _messages_row(row, ["messages"], "")
    assert record["messages"][2] == {"role": "assistant", "content": CALL}
    assert record["messages"][3] == {"role": "tool", "content": "284887"}
    assert record["solution"] == CALL
    text = tool_calls_text("Let me compute.", [OPENAI_CALL])
    assert text == "Let me compute.\n" + CALL
    with pytest.raises(_BadRow, match=r"messages\[2\]\.tool_calls"):
        _messages_row({"messages": conversation("text")[:2] + [
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": 3}}]}]}, ["messages"], "")
    with pytest.raises(_BadRow, match="arguments are not JSON"):
        _messages_row({"messages": conversation("text")[:2] + [{"role": "assistant", "tool_calls": [
            {"function": {"name": "calculator", "arguments": "{"}}]}]}, ["messages"], "")
    # Conversations without tools read exactly as before (json only for the readable failure).
    plain = {"messages": conversation("text")[:2] + [{"role": "assistant", "content": " 7 "}]}
    assert _messages_row(plain, ["messages"], "")["messages"][-1] == {"role": "assistant", "content": "7"}
    assert json.loads(CALL.split("\n")[1])["arguments"] == {"expression": "347 * 821"}


# ---------------------------------------------------------------------------------------------
# The embedded task's tool variant
# ---------------------------------------------------------------------------------------------

def chain_value(problem: str) -> int:
    """The chain of "What is a op b op c?" evaluated left to right, as the task defines it."""
    terms = problem.removeprefix("What is ").removesuffix("?").split()
    value = int(terms[0])
    for op, b in zip(terms[1::2], terms[2::2]):
        value = {"+": value + int(b), "-": value - int(b), "*": value * int(b)}[op]
    return value


def test_tool_variant_traces_call_the_calculator_for_each_product():
    import re

    from r1train.data.task import TaskConfig, generate_problems, task_records
    from r1train.tools.calculator import calculator

    cfg = dict(min_operands=2, max_operands=3, max_value=99, ops="+-*", mul_digits=3)
    records = task_records(TaskConfig(**cfg, tool_rate=1.0), 60, seed=3)
    plain = task_records(TaskConfig(**cfg), 60, seed=3)
    # tool_rate changes the cold-start conversations only, never the problems or their answers.
    assert [(r["problem"], r["answer"], r["solution"]) for r in records] == \
        [(r["problem"], r["answer"], r["solution"]) for r in plain]
    products = [int(b) for r in records for b in re.findall(r"\* (\d+)", r["problem"])]
    assert max(products) > 99 and max(products) <= 999
    for r, p in zip(records, plain):
        assert int(r["answer"]) == chain_value(r["problem"])
        turns = r["messages"][len(r["prompt"]):]
        n_products = r["problem"].count("*")
        assert [m["role"] for m in turns] == ["assistant", "tool"] * n_products + ["assistant"]
        assert r["messages"][:len(r["prompt"])] == r["prompt"]
        for call, result in zip(turns[0::2], turns[1::2]):
            (expression,) = re.findall(r'"expression": "([^"]+)"', call["content"])
            a, b = expression.split(" * ")
            assert result["content"] == str(int(a) * int(b)) == calculator(expression)
            assert call["content"].endswith("</tool_call>")
        # Without its call blocks, the segments read as the one-turn worked solution.
        joined = "".join(m["content"] for m in turns[0::2])
        assert re.sub(r"<tool_call>.*?</tool_call>", "", joined, flags=re.DOTALL) == p["messages"][-1]["content"]
    # A share of the conversations, drawn per problem: the same problems with or without it.
    half = generate_problems(TaskConfig(**cfg, tool_rate=0.5), 200, seed=3)
    calls = sum("cold_start_turns" in p for p in half)
    with_products = sum("*" in p["problem"] for p in half)
    assert 0.35 * with_products < calls < 0.65 * with_products
    assert [p["problem"] for p in half] == [p["problem"] for p in generate_problems(TaskConfig(**cfg), 200, seed=3)]


def test_tool_variant_defaults_and_refusals():
    import re

    from r1train.data.task import TaskConfig, generate_problems

    # The default draws a '*' operand from 0-9 (the golden and main-job tests pin the draws), and
    # no cold-start conversation calls a tool.
    problems = generate_problems(TaskConfig(ops="+-*", max_operands=4), 80, seed=1)
    operands = [b for p in problems for b in re.findall(r"\* (\d+)", p["problem"])]
    assert operands and all(len(b) == 1 for b in operands)
    assert not any("cold_start_turns" in p for p in problems)
    for bad, match in ((dict(mul_digits=0), "task.mul_digits"), (dict(tool_rate=1.5), "task.tool_rate")):
        with pytest.raises(ValueError, match=match):
            TaskConfig(**bad)


def test_tool_variant_sft_labels_are_the_segments():
    from r1train.data.task import TaskConfig, task_records

    tok = tokenizer()
    (record,) = [r for r in task_records(TaskConfig(ops="*", max_value=999, mul_digits=3, tool_rate=1.0,
                                                    min_operands=2, max_operands=2), 3, seed=0)][:1]
    ids, labels = tokenize_conversation(tok, record["messages"])
    trained = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    call, result, last = record["messages"][-3:]
    assert trained == tok(call["content"], add_special_tokens=False)["input_ids"] + tok(
        last["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]

