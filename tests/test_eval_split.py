"""Held-out problems: one rule for the SFT and GRPO trainers (data.loaders.load_held_out), and an
SFT run resumed from a checkpoint at max_steps.

The rule: eval_source empty or equal to source -> the part training does not read (the source's
test split, or the test side of the same seeded cut); another source -> its test split if it
names one, else all of its rows. Each split test asks both trainers and wants the same answer.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from r1train.data import DatasetError
from r1train.data.problems import held_out_records, load_conversations, train_records
from r1train.grpo.config import GRPOJobConfig
from r1train.sft.trainer import SFTJobConfig

from launch import train_py

ROOT = Path(__file__).resolve().parents[1]


def chat_rows(n: int, tag: str = "p") -> list[dict]:
    """Bespoke-layout rows (SFT trains on them; GRPO reads their problem and boxed answer)."""
    return [{"system": "sys", "conversations": [
        {"from": "user", "value": f"{tag} {i}"},
        {"from": "assistant", "value": f"<think>x</think><answer>\\boxed{{{i}}}</answer>"}]} for i in range(n)]


def gsm8k_rows(n: int, tag: str) -> list[dict]:
    return [{"question": f"{tag} {i}", "answer": f"work\n#### {i}"} for i in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def problem_sets(trainer: str, **data) -> tuple[list[str], list[str]]:
    """(training problems, held-out problems) of `trainer` for these data options; `train_split`
    is SFT's `split`."""
    if trainer == "sft":
        cfg = SFTJobConfig()
        data["split"] = data.pop("train_split", "train")
    else:
        cfg = GRPOJobConfig()
    for k, v in data.items():
        setattr(cfg.data, k, v)
    if trainer == "sft":
        train, evals = load_conversations(cfg.data, cfg.train.seed)
        return [conv[1]["content"] for conv in train], [e["problem"] for e in evals]
    train, evals = train_records(cfg.data, cfg.train.seed), held_out_records(cfg.data, cfg.train.seed)
    return [r["problem"] for r in train], [e["problem"] for e in evals]


def test_same_source_holds_out_what_training_does_not_read(tmp_path):
    # A single file: the test side of the seeded cut training made, with training's test_size.
    source = write_jsonl(tmp_path / "chat.jsonl", chat_rows(100))
    everything = {f"p {i}" for i in range(100)}
    for trainer in ("sft", "grpo"):
        # Also spelled as a relative path: still the same file, so still the same cut.
        for eval_source in (source, os.path.join(".", os.path.relpath(source))):
            train, held_out = problem_sets(trainer, source=source, eval_source=eval_source, test_size=0.2)
            assert not set(train) & set(held_out), trainer
            assert len(held_out) == math.ceil(0.2 * 100), trainer
            assert set(train) | set(held_out) == everything, trainer
    # GRPO's default (no eval_source) is the same cut.
    assert problem_sets("grpo", source=source, test_size=0.2) == \
        problem_sets("grpo", source=source, eval_source=source, test_size=0.2)
    # A folder with train.jsonl / test.jsonl (a hub dataset's layout): its test file.
    write_jsonl(tmp_path / "src" / "train.jsonl", chat_rows(30, "train"))
    write_jsonl(tmp_path / "src" / "test.jsonl", chat_rows(7, "test"))
    folder = str(tmp_path / "src")
    for trainer in ("sft", "grpo"):
        train, held_out = problem_sets(trainer, source=folder, eval_source=folder)
        assert train == [f"train {i}" for i in range(30)], trainer
        assert held_out == [f"test {i}" for i in range(7)], trainer


@pytest.mark.parametrize("trainer", ["sft", "grpo"])
def test_same_source_with_nothing_held_out_is_refused(tmp_path, trainer):
    source = write_jsonl(tmp_path / "chat.jsonl", chat_rows(20))
    with pytest.raises(DatasetError, match="nothing would be held out"):
        problem_sets(trainer, source=source, eval_source=source, train_split="all")


def test_separate_unsplit_eval_file_gives_all_its_rows_up_to_num_eval(tmp_path):
    source = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    eval_file = write_jsonl(tmp_path / "gsm8k_test.jsonl", gsm8k_rows(300, "q"))
    for trainer in ("sft", "grpo"):
        _, held_out = problem_sets(trainer, source=source, eval_source=eval_file, num_eval=200)
        assert held_out == [f"q {i}" for i in range(200)], trainer  # file order, not a seeded 10%
        _, held_out = problem_sets(trainer, source=source, eval_source=eval_file, num_eval=1000)
        assert len(held_out) == 300, trainer


def test_separate_split_named_folder_gives_its_test_split(tmp_path):
    """A local folder with train.jsonl / test.jsonl stands in for a hub dataset's layout."""
    source = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    write_jsonl(tmp_path / "eval" / "train.jsonl", gsm8k_rows(50, "train"))
    write_jsonl(tmp_path / "eval" / "test.jsonl", gsm8k_rows(9, "test"))
    for trainer in ("sft", "grpo"):
        _, held_out = problem_sets(trainer, source=source, eval_source=str(tmp_path / "eval"))
        assert held_out == [f"test {i}" for i in range(9)], trainer
    # GRPO's eval_split names another split of the eval source by hand.
    _, held_out = problem_sets("grpo", source=source, eval_source=str(tmp_path / "eval"), eval_split="train")
    assert held_out == [f"train {i}" for i in range(50)]


@pytest.mark.parametrize("hub_splits, expected", [
    ({"train": 500, "test": 99}, [f"test {i}" for i in range(99)]),  # NuminaMath-TIR's layout
    ({"train": 30}, [f"train {i}" for i in range(30)]),  # a test set published as one "train" split
])
def test_separate_hub_dataset_gives_its_test_split_else_all(tmp_path, monkeypatch, hub_splits, expected):
    datasets = pytest.importorskip("datasets")

    def fake_load_dataset(name, split=None):
        assert name == "org/eval-set"
        dd = datasets.DatasetDict({s: datasets.Dataset.from_list(
            [{"problem": f"{s} {i}", "solution": f"\\boxed{{{i}}}"} for i in range(n)]) for s, n in hub_splits.items()})
        return dd if split is None else dd[split]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = write_jsonl(tmp_path / "chat.jsonl", chat_rows(40))
    for trainer in ("sft", "grpo"):
        _, held_out = problem_sets(trainer, source=source, schema="bespoke", eval_source="org/eval-set", num_eval=200)
        assert held_out == expected, trainer  # and `schema` (bespoke) is the training source's only


def test_sft_resumed_at_max_steps_finishes_with_the_last_steps_numbers(tmp_path):
    """A run stopped (preempted) right after its last step resumes to the end: final eval,
    checkpoint, export, and the final loss of step max_steps, not an UnboundLocalError."""
    from r1train.data.tiny import build_tiny_model
    from r1train.sft.trainer import main as sft_main

    tiny = build_tiny_model(tmp_path / "tiny", seed=0)
    out = tmp_path / "run"
    args = ["--model.path", str(tiny), "--data.num_train", "40", "--data.num_eval", "2",
            "--data.task.max_operands", "2", "--sft.max_seq_len", "256", "--sft.rows_per_step", "2",
            "--sft.eval_max_new_tokens", "4", "--train.eval_every", "0", "--train.save_every", "0",
            "--train.progress", "false", "--train.max_steps", "2", "--train.output_dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = train_py("sft", *args, "--train.stop_at_step", "2", env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert not (out / "final").exists()

    def rows():
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]

    last_loss = [r["loss"] for r in rows() if "loss" in r][-1]
    result = sft_main(args)  # in process, to read the result
    assert "stopped" not in result
    assert result["final_loss"] == last_loss
    assert [e["step"] for e in result["eval_history"]] == [0, 2]
    assert (out / "final" / "model.safetensors").exists()
    # Run again once finished: the step-2 evaluation is reused, not logged a second time.
    again = sft_main(args)
    assert again["final_loss"] == last_loss and again["accuracy"] == result["accuracy"]
    assert sum(1 for r in rows() if r["step"] == 2 and "eval/accuracy" in r) == 1
