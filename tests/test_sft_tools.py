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
