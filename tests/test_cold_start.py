"""Cold-start data tools: Bespoke-Stratos -> R1 format, prompt builders, post-processing of
R1-Zero outputs, the JSONL round trip through data.load_records, and generation on the tiny model."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from r1train.data import SYSTEM_PROMPT, DatasetError, load_records
from r1train.data.tiny import build_tiny_model
from r1train.sft.cold_start import (
    COLD_START_SYSTEM_PROMPT,
    DEFAULT_FEW_SHOT_EXAMPLES,
    bespoke_to_r1,
    convert_bespoke,
    direct_messages,
    few_shot_messages,
    generate_sft_set,
    parse_output,
    refine_output,
    to_r1_format,
    write_sft_jsonl,
)

ASSETS = Path(__file__).parent / "assets"
BESPOKE = ASSETS / "fixtures" / "bespoke_stratos.json"
BESPOKE_SYSTEM = ("Your role as an assistant involves thoroughly exploring questions through a systematic "
                  "long thinking process before providing the final precise and accurate solutions.")
# The fixture's two replies, converted by hand: markers and the blank lines around them go.
R1_ROW0 = "<think>\n7 times 8: 7 * 8 = 56.\n</think>\n<answer>\n$7 \\times 8 = \\boxed{56}$\n</answer>"
R1_ROW1 = ("<think>\nMultiply the argument by itself.\n</think>\n"
           "<answer>\ndef square(x):\n    return x * x\n</answer>")


def bespoke_row(reply: str, problem: str = "What is 1+1?") -> dict:
    return {"system": "sys", "conversations": [{"from": "user", "value": problem},
                                               {"from": "assistant", "value": reply}]}


# Bespoke-Stratos

def test_bespoke_fixture_rows_convert_to_r1_format():
    records, skipped = convert_bespoke(load_records(BESPOKE, schema="bespoke", split="all"))
    assert skipped == 0
    assert [r["messages"][2]["content"] for r in records] == [R1_ROW0, R1_ROW1]
    assert [r["solution"] for r in records] == [R1_ROW0, R1_ROW1]
    first = records[0]
    assert first["messages"][0] == {"role": "system", "content": SYSTEM_PROMPT}
    assert first["prompt"] == first["messages"][:2]
    assert first["messages"][1]["content"] == "Return your final response within \\boxed{}. What is $7 \\times 8$?"
    assert first["answer"] == "56"  # the solution block is kept whole, so its \boxed{} still reads


def test_bespoke_original_system_prompt_can_be_kept():
    records, _ = convert_bespoke(load_records(BESPOKE, schema="bespoke", split="all"), system_prompt=None)
    assert records[0]["messages"][0]["content"] == BESPOKE_SYSTEM
    assert records[0]["messages"][2]["content"] == R1_ROW0


def test_bespoke_row_without_markers_is_named_or_skipped(tmp_path, caplog):
    path = tmp_path / "bespoke.jsonl"
    rows = [bespoke_row("<|begin_of_thought|>a<|end_of_thought|><|begin_of_solution|>2<|end_of_solution|>"),
            bespoke_row("The answer is 2.")]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    records = load_records(path, schema="bespoke", split="all")
    named = r"row 1 \(problem 'What is 1\+1\?'\), messages\[2\]: no <\|begin_of_thought\|> marker"
    with pytest.raises(DatasetError, match=named):
        convert_bespoke(records)
    with caplog.at_level("WARNING"):
        converted, skipped = convert_bespoke(records, on_bad_row="skip")
    assert skipped == 1
    assert "skipped 1 rows" in caplog.text
    assert [r["messages"][2]["content"] for r in converted] == ["<think>\na\n</think>\n<answer>\n2\n</answer>"]
    with pytest.raises(ValueError, match="on_bad_row='ignore'"):
        convert_bespoke(records, on_bad_row="ignore")


@pytest.mark.parametrize("reply, message", [
    ("<|begin_of_thought|>t<|end_of_thought|>", r"no <\|begin_of_solution\|>"),
    ("<|begin_of_solution|>s<|end_of_solution|><|begin_of_thought|>t<|end_of_thought|>", "does not follow"),
    ("<|begin_of_thought|>t<|end_of_thought|>lost<|begin_of_solution|>s<|end_of_solution|>", "outside.*'lost'"),
    ("<|begin_of_thought|>t<|end_of_thought|><|begin_of_thought|>u<|end_of_thought|>"
     "<|begin_of_solution|>s<|end_of_solution|>", "more than one"),
    ("<|begin_of_thought|> <|end_of_thought|><|begin_of_solution|>s<|end_of_solution|>", "empty thought"),
])
def test_bespoke_malformed_replies(reply, message):
    with pytest.raises(ValueError, match=message):
        bespoke_to_r1(reply)


# Prompt builders

def test_few_shot_prompt_layout():
    messages = few_shot_messages("What is 2 + 3 * 4?", [("What is 1 + 1?", "One plus one is two.", "The answer is 2.")])
    assert messages == [
        {"role": "system", "content": COLD_START_SYSTEM_PROMPT},
        {"role": "user", "content":
            "Here are solved problems. Each solution reasons step by step between <|special_token|> markers "
            "and ends with a one-line summary. Solve the last problem the same way.\n\n"
            "Problem: What is 1 + 1?\n"
            "Solution: <|special_token|> One plus one is two. <|special_token|> Summary: The answer is 2.\n\n"
            "Problem: What is 2 + 3 * 4?\n"
            "Solution:"},
    ]


def test_few_shot_defaults_and_errors():
    user = few_shot_messages("What is 2 + 3 * 4?")[1]["content"]
    assert user.count("Problem:") == len(DEFAULT_FEW_SHOT_EXAMPLES) + 1
    assert user.count("What is 2 + 3 * 4?") == 1  # the tutorial's prompt carries it twice
    assert user.endswith("Problem: What is 2 + 3 * 4?\nSolution:")
    with pytest.raises(ValueError, match="examples is empty"):
        few_shot_messages("q", [])
    with pytest.raises(ValueError, match=r"examples\[0\]"):
        few_shot_messages("q", [("q", "", "s")])
    with pytest.raises(ValueError, match="problem must be a non-empty string"):
        few_shot_messages("  ")


def test_direct_prompt_layout():
    assert direct_messages("What is 2 + 3 * 4?", system_prompt="S") == [
        {"role": "system", "content": "S"},
        {"role": "user", "content":
            "Solve the problem below. Show your reasoning step by step, then verify the result, and finish "
            "with the line 'Summary: The answer is <answer>.'\n\nProblem: What is 2 + 3 * 4?"},
    ]


# Post-processing

MESSY = "<think>  ummm... multiply 3 and 4... get 12... then add 2...</think>\n<answer> 14 </answer>"


def test_refine_output_on_the_tutorial_example():
    # "ummm... " goes, runs of dots at the end become one full stop, the first letter is raised:
    # the refined text the tutorial prints for this input.
    assert refine_output(MESSY) == ("<|special_token|> Reasoning: Multiply 3 and 4... get 12... then add 2.\n"
                                    "<|special_token|> Summary: The answer is 14.")


def test_refine_output_survives_missing_tags():
    # Regression: the tutorial's split("<think>")[1] raises IndexError on each of these.
    assert refine_output("hmm, 3 times 4 is 12, plus 2") == (
        "<|special_token|> Reasoning: 3 times 4 is 12, plus 2.\n"
        "<|special_token|> Summary: No final answer was given.")
    assert refine_output("uh 12 plus 2 <answer>14</answer>") == (
        "<|special_token|> Reasoning: 12 plus 2.\n<|special_token|> Summary: The answer is 14.")
    assert refine_output("<think>erm, GCD of 4 and 6 is 2") == (  # unclosed, no answer; "GCD" stays upper case
        "<|special_token|> Reasoning: GCD of 4 and 6 is 2.\n<|special_token|> Summary: No final answer was given.")
    assert refine_output("") == "<|special_token|> Reasoning: \n<|special_token|> Summary: No final answer was given."


def test_whitespace_collapses_and_lines_stay():
    text = "<think>first   step:\t 3*4 = 12\n\n\n\n  Umm, second step: 12+2 = 14  \n</think><answer>14</answer>"
    assert parse_output(text)[1] == "14"
    assert to_r1_format(text) == ("<think>\nFirst step: 3*4 = 12\n\nsecond step: 12+2 = 14.\n</think>\n"
                                  "<answer>\n14\n</answer>")


@pytest.mark.parametrize("text, reasoning, answer", [
    (MESSY, "Multiply 3 and 4... get 12... then add 2.", "14"),
    # the few-shot / direct layout
    ("<|special_token|> Reasoning: 3 * 4 = 12, then 2 + 12 = 14.\nVerification: ok. "
     "<|special_token|> Summary: The answer is 14.", "3 * 4 = 12, then 2 + 12 = 14.\nVerification: ok.", "14"),
    # the prompt opened <think>, the reply only closes it
    ("so 2+2 = 4</think> The answer is 4.", "So 2+2 = 4.", "4"),
    ("we get \\boxed{\\frac{1}{2}} in the end", "We get \\boxed{\\frac{1}{2}} in the end.", "\\frac{1}{2}"),
])
def test_to_r1_format(text, reasoning, answer):
    assert to_r1_format(text) == f"<think>\n{reasoning}\n</think>\n<answer>\n{answer}\n</answer>"


def test_to_r1_format_requires_an_answer():
    with pytest.raises(ValueError, match="no answer"):
        to_r1_format("just thinking aloud")
    assert to_r1_format("just thinking aloud", require_answer=False) == (
        "<think>\nJust thinking aloud.\n</think>\n<answer>\n\n</answer>")


# JSONL

def chat(system: str, *turns: str) -> dict:
    roles = ["user", "assistant"] * len(turns)
    return {"messages": [{"role": "system", "content": system}]
            + [{"role": r, "content": t} for r, t in zip(roles, turns)]}


def test_write_sft_jsonl_round_trips_through_the_loader(tmp_path):
    records = [chat(SYSTEM_PROMPT, "What is 7 * 8?", R1_ROW0),
               chat("sys", "1+1?", "<think>\n1+1=2\n</think>\n<answer>\n2\n</answer>", "and 2+2?", "4")]
    path = tmp_path / "out" / "sft.jsonl"
    assert write_sft_jsonl(path, records) == 2
    first_line = json.loads(path.read_text().splitlines()[0])
    assert first_line == {"system": SYSTEM_PROMPT, "conversations": [
        {"from": "user", "value": "What is 7 * 8?"}, {"from": "assistant", "value": R1_ROW0}]}
    loaded = load_records(path, schema="bespoke", split="all")
    assert [r["messages"] for r in loaded] == [r["messages"] for r in records]
    assert loaded[0]["answer"] == "56"
    assert load_records(path, split="all").schema == "bespoke"  # detected without being told


def test_write_sft_jsonl_without_a_system_turn_round_trips(tmp_path):
    """Prompts made under `--data.system_prompt ''` have no system turn: written with an empty
    "system", read back as the same messages, the prompt being the user turn alone."""
    records = [{"messages": [{"role": "user", "content": "What is 7 * 8?"},
                             {"role": "assistant", "content": R1_ROW0}]}]
    path = tmp_path / "sft.jsonl"
    assert write_sft_jsonl(path, records) == 1
    assert json.loads(path.read_text())["system"] == ""
    loaded = load_records(path, schema="bespoke", split="all")
    assert [r["messages"] for r in loaded] == [r["messages"] for r in records]
    assert loaded[0]["prompt"] == records[0]["messages"][:1]
    assert loaded[0]["problem"] == "What is 7 * 8?" and loaded[0]["answer"] == "56"
    with pytest.raises(ValueError, match=r"record 0, messages\[1\]: expected a non-empty 'assistant'"):
        write_sft_jsonl(path, [{"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}]}])
    with pytest.raises(ValueError, match=r"record 0 has no"):
        write_sft_jsonl(path, [{"messages": [{"role": "user", "content": "q"}]}])


def test_converted_bespoke_round_trips(tmp_path):
    converted, _ = convert_bespoke(load_records(BESPOKE, schema="bespoke", split="all"))
    path = tmp_path / "r1.jsonl"
    write_sft_jsonl(path, converted)
    assert [r["messages"] for r in load_records(path, schema="bespoke", split="all")] == \
        [r["messages"] for r in converted]


def test_write_sft_jsonl_refuses_bad_records(tmp_path):
    with pytest.raises(ValueError, match="must end in .jsonl"):
        write_sft_jsonl(tmp_path / "x.json", [])
    with pytest.raises(ValueError, match=r"record 1, messages\[2\]: expected a non-empty 'assistant'"):
        write_sft_jsonl(tmp_path / "x.jsonl", [chat("s", "q", "a"), chat("s", "q", "  ")])
    with pytest.raises(ValueError, match="record 0 ends with a user turn"):
        write_sft_jsonl(tmp_path / "x.jsonl", [chat("s", "q", "a", "q2")])
    with pytest.raises(ValueError, match=r"record 0 has no"):
        write_sft_jsonl(tmp_path / "x.jsonl", [{"problem": "q"}])
    assert not (tmp_path / "x.jsonl").exists()


# Generation on the tiny model

@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1train.model.engine import Engine
    from r1train.model.policy import PolicyModel

    path = build_tiny_model(tmp_path_factory.mktemp("tiny_cold_start") / "model")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return Engine(PolicyModel(model), AutoTokenizer.from_pretrained(path))


PROBLEMS = ["What is 2 + 3?", "Tom has 3 apples and buys 4 more bags of 5 apples each. How many apples now?",
            {"problem": "What is 9 - 4?", "answer": "5"}]


def test_generate_sft_set_writes_loadable_r1_rows(tiny, tmp_path):
    engine = tiny
    out = tmp_path / "gen.jsonl"
    stats = generate_sft_set(engine, PROBLEMS, direct_messages, out, batch_size=2,
                             max_new_tokens=6, require_answer=False)
    assert (stats.problems, stats.written, stats.skipped) == (3, 3, 0)
    loaded = load_records(out, schema="bespoke", split="all")
    assert [r["problem"] for r in loaded] == [PROBLEMS[0], PROBLEMS[1], "What is 9 - 4?"]
    for record in loaded:
        assert record["messages"][0]["content"] == SYSTEM_PROMPT  # not the builder's prompt
        reply = record["messages"][2]["content"]
        assert reply.startswith("<think>\n") and "\n</think>\n<answer>\n" in reply and reply.endswith("\n</answer>")
    # Left padding: the short prompts, batched with the long one, get the greedy replies they get alone.
    alone = tmp_path / "alone.jsonl"
    generate_sft_set(engine, PROBLEMS, direct_messages, alone, batch_size=1,
                     max_new_tokens=6, require_answer=False)
    assert alone.read_text() == out.read_text()


def test_generate_sft_set_skips_replies_without_answer(tiny, tmp_path):
    engine = tiny
    out = tmp_path / "gen.jsonl"
    stats = generate_sft_set(engine, PROBLEMS, few_shot_messages, out, max_new_tokens=6,
                             do_sample=True, seed=1)
    assert stats.written + stats.skipped == 3
    assert len(out.read_text().splitlines()) == stats.written
    refuse_all = generate_sft_set(engine, PROBLEMS, direct_messages, out, max_new_tokens=4,
                                  require_answer=False, keep=lambda record, reply: False)
    assert (refuse_all.written, refuse_all.skipped) == (0, 3)
    assert out.read_text() == ""
    with pytest.raises(ValueError, match=r"problems\[0\]"):
        generate_sft_set(engine, [" "], direct_messages, out)
