"""The embedded tiny model, tokenizer and task: offline, deterministic, R1-ready."""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from r1train.data.prompts import SYSTEM_PROMPT, make_conversation
from r1train.data.task import TaskConfig, generate_problems, split_of, task_records
from r1train.data.tiny import build_tiny_model, build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def test_loads_in_fresh_process_with_hub_disabled(tiny):
    code = f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
import torch
tok = AutoTokenizer.from_pretrained({str(tiny)!r})
model = AutoModelForCausalLM.from_pretrained({str(tiny)!r})
msgs = [{{"role": "system", "content": "S"}}, {{"role": "user", "content": "What is 1 + 2?"}}]
text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
ids = tok(text, return_tensors="pt")
out = model.generate(**ids, max_new_tokens=5, do_sample=False)
print(repr(text)); print(out.shape[1] - ids["input_ids"].shape[1])
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-2] == repr("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n"
                             "<|im_start|>assistant\n")
    assert 1 <= int(lines[-1]) <= 5


def test_chat_template_renders_r1_prompt(tiny):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny)
    text = tok.apply_chat_template(make_conversation("What is 2 + 3?"), tokenize=False, add_generation_prompt=True)
    assert text == (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


@pytest.mark.parametrize("text", [
    "<think>12 + 7 = 19. 19 - 5 = 14.</think><answer>14</answer>",
    "<answer>\\frac{1}{2}</answer> 1,234,567.890 0007",
    "  two  spaces\n\nnew lines\ttab",
    "中文推理 ü é — 🙂",
    "",
])
def test_tokenizer_round_trips_exactly(tiny, text):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny)
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_tags_are_single_tokens_and_digits_split(tiny):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny)
    for tag in ("<think>", "</think>", "<answer>", "</answer>", "<|im_start|>", "<|im_end|>"):
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1, tag
    pieces = [tok.decode([i]) for i in tok("1234", add_special_tokens=False)["input_ids"]]
    assert pieces == ["1", "2", "3", "4"]


def test_build_is_deterministic(tmp_path):
    a = build_tiny_model(tmp_path / "a", seed=3)
    b = build_tiny_model(tmp_path / "b", seed=3)
    c = build_tiny_model(tmp_path / "c", seed=4)
    digest = lambda p: hashlib.sha256((p / "model.safetensors").read_bytes()).hexdigest()
    assert digest(a) == digest(b) != digest(c)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


def test_task_solutions_are_correct_and_scored_by_the_reward():
    from r1train.rewards import accuracy_reward, format_reward
    cfg = TaskConfig(min_operands=3, max_operands=4, max_value=9)
    recs = task_records(cfg, 50, seed=1)
    for r in recs:
        expr = r["problem"].removeprefix("What is ").removesuffix("?")
        assert str(eval(expr)) == r["answer"]  # the chain read left to right, as written
    sols = [r["solution"] for r in recs]
    assert accuracy_reward(sols, solution=sols, answer=[r["answer"] for r in recs]) == [1.0] * 50
    assert format_reward(sols) == [1.0] * 50
    wrong = [s.replace(f"<answer>{r['answer']}</answer>", f"<answer>{int(r['answer']) + 1}</answer>")
             for s, r in zip(sols, recs)]
    assert accuracy_reward(wrong, solution=sols, answer=[r["answer"] for r in recs]) == [0.0] * 50


def test_task_worked_example():
    # "7 + 5 - 3" evaluates step by step: 7 + 5 = 12, then 12 - 3 = 9.
    import random
    cfg = TaskConfig(min_operands=3, max_operands=3, max_value=9)
    for seed in range(200):
        p = generate_problems(cfg, 1, seed=seed)[0]
        a, op1, b, op2, c = p["problem"].removeprefix("What is ").removesuffix("?").split()
        first = int(a) + int(b) if op1 == "+" else int(a) - int(b)
        final = first + int(c) if op2 == "+" else first - int(c)
        assert p["completion"] == (f"<think>{a} {op1} {b} = {first}. {first} {op2} {c} = {final}.</think>"
                                   f"<answer>{final}</answer>")
        assert final >= 0  # allow_negative=False
    del random


def test_train_and_test_are_disjoint_and_seeded():
    cfg = TaskConfig()
    train = generate_problems(cfg, 500, seed=0, split="train")
    test = generate_problems(cfg, 200, seed=0, split="test")
    assert not {p["problem"] for p in train} & {p["problem"] for p in test}
    assert all(split_of(p["problem"], cfg.test_fraction) == "test" for p in test)
    assert generate_problems(cfg, 20, seed=5) == generate_problems(cfg, 20, seed=5)
    assert generate_problems(cfg, 20, seed=5) != generate_problems(cfg, 20, seed=6)


def test_task_config_errors():
    with pytest.raises(ValueError, match="min_operands"):
        TaskConfig(min_operands=1)
    with pytest.raises(ValueError, match="ops"):
        TaskConfig(ops="+/")
    with pytest.raises(ValueError, match="distinct train problems"):
        generate_problems(TaskConfig(min_operands=2, max_operands=2, max_value=2), 1000)


def test_tokenizer_builds_without_saving():
    tok = build_tiny_tokenizer(seed=0)
    assert tok.chat_template and len(tok) < 600


def test_slip_rate_only_changes_the_cold_start_summary():
    # slip_rate=1: every cold-start reply keeps the right reasoning but answers with the value
    # before the last step ("3 + 4 = 7. 7 - 2 = 5." -> <answer>7</answer>); the record's answer,
    # the solution and the problems drawn stay those of slip_rate=0.
    clean = task_records(TaskConfig(min_operands=3, max_operands=3, max_value=9), 30, seed=2)
    sloppy = task_records(TaskConfig(min_operands=3, max_operands=3, max_value=9, slip_rate=1.0), 30, seed=2)
    for c, s in zip(clean, sloppy):
        assert (c["problem"], c["answer"], c["solution"]) == (s["problem"], s["answer"], s["solution"])
        assert c["messages"][-1]["content"] == c["solution"]
        reply = s["messages"][-1]["content"]
        think = c["solution"].split("</think>")[0]
        second_to_last = think.split(". ")[-2].split(" = ")[-1].rstrip(".")
        assert reply == f"{think}</think><answer>{second_to_last}</answer>"
