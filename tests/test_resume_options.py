"""A resumed run does what was typed: options changed since the checkpoint are applied (the
restored optimizer gets the new learning rate) or refused by name (those that define the run),
and said either way."""
import json
import os
import shutil
from pathlib import Path

import pytest

from r1train.run.resume import config_changes

from launch import train_py

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
GRPO = ["grpo", "--rollout.group_size", "2", "--grpo.prompts_per_step", "2",
        "--grpo.micro_batch_size", "4", "--rollout.max_new_tokens", "8", "--data.num_train", "16",
        "--data.num_eval", "2", "--optim.lr", "2e-4", "--optim.warmup_steps", "0",
        "--train.max_steps", "2", "--train.save_every", "1", "--train.eval_every", "0",
        "--train.sample_every", "1", "--train.progress", "false"]


def _train(*args):
    return train_py(*args, env=ENV)


@pytest.fixture(scope="module")
def stopped(tiny, tmp_path_factory):
    """A run stopped at step 1 (checkpoint step-1), made once: each test resumes its own copy."""
    out = tmp_path_factory.mktemp("stopped")
    first = _train(*GRPO, "--model.path", tiny, "--train.output_dir", str(out), "--train.stop_at_step", "1")
    assert first.returncode == 0, first.stderr[-3000:]
    assert (out / "checkpoints" / "step-1").is_dir() and not (out / "final").exists()
    return out


def test_resume_applies_a_new_learning_rate(tiny, stopped, tmp_path):
    shutil.copytree(stopped, tmp_path, dirs_exist_ok=True)
    out = ["--model.path", tiny, "--train.output_dir", str(tmp_path)]
    res = _train(*GRPO, *out, "--optim.lr", "5e-5")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "--optim.lr 0.0002 -> 5e-05 (re-applied to the restored optimizer)" in res.stdout
    lrs = {r["step"]: r["lr"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().split("\n")[:-1])
           if "lr" in r}
    # step 1 trained at 2e-4 before the stop; step 2, after the resume, at the new 5e-5
    assert lrs == {1: pytest.approx(2e-4), 2: pytest.approx(5e-5)}
    # What a run leaves to read: its options at the top, samples with the gold answer and every
    # reward, and each held-out evaluation's completions (2 problems, at steps 0 and 2).
    assert "lr: 5.0e-05" in (tmp_path / "config.yaml").read_text()
    assert "lr: 5.0e-05" in (tmp_path / "final" / "training_config.yaml").read_text()
    sample = json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])
    assert {"answer", "completion", "reward", "accuracy", "format"} <= set(sample)
    evals = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 0, 2, 2]
    assert {"problem", "answer", "completion", "accuracy", "format"} <= set(evals[0])


def test_resume_refuses_options_that_define_the_run(tiny, stopped, tmp_path):
    shutil.copytree(stopped, tmp_path, dirs_exist_ok=True)
    out = ["--model.path", tiny, "--train.output_dir", str(tmp_path)]
    res = _train(*GRPO, *out, "--data.num_train", "32", "--train.seed", "3")
    assert res.returncode == 2
    assert "--data.num_train was 16, now 32" in res.stderr and "--train.seed was 0, now 3" in res.stderr
    assert "--train.resume false" in res.stderr


def test_config_changes_lists_each_difference():
    saved = {"optim": {"lr": 2e-4, "betas": [0.9, 0.99]}, "train": {"output_dir": "a", "seed": 0}}
    now = {"optim": {"lr": 5e-5, "betas": [0.9, 0.99]}, "train": {"output_dir": "b", "seed": 0},
           "grpo": {"beta": 0.0}}
    # output_dir is where the run is, not what it is; a new option appears with None before it
    assert config_changes(saved, now) == [("grpo.beta", None, 0.0), ("optim.lr", 2e-4, 5e-5)]


def test_resume_re_applies_changed_betas_and_weight_decay(tiny, stopped, tmp_path):
    # The checkpoint restores AdamW's param groups (betas 0.9/0.99, decay 0); the options typed
    # at the resume replace them before the first step: decay on the matrices' group only
    # (group 1 holds norms and biases), the learning rate as the schedule says (constant, 2e-4).
    from r1train.grpo.config import GRPOJobConfig
    from r1train.grpo.trainer import GRPOTrainer
    from r1train.run.config import parse_args
    shutil.copytree(stopped, tmp_path, dirs_exist_ok=True)
    cfg = parse_args(GRPOJobConfig, [*GRPO[1:], "--model.path", tiny, "--train.output_dir", str(tmp_path),
                                     "--optim.beta1", "0.5", "--optim.beta2", "0.9", "--optim.weight_decay", "0.2"])
    trainer = GRPOTrainer(cfg)
    trainer._resume()
    assert trainer.step == 1 and trainer.optimizer.state, "nothing was restored"
    groups = trainer.optimizer.param_groups
    assert [g["betas"] for g in groups] == [(0.5, 0.9), (0.5, 0.9)]
    assert [g["weight_decay"] for g in groups] == [0.2, 0.0]
    assert [g["lr"] for g in groups] == [pytest.approx(2e-4)] * 2
