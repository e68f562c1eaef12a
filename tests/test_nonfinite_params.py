"""An update that makes parameters NaN/Inf stops the run before anything is saved or exported.

The loss / gradient-norm guard cannot see it: with `--optim.lr inf` the loss and gradients of the
step are finite and only the update is not (the issue's run exited 0 with an all-NaN export)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launch import train_py

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
ARGS = {
    "grpo": ["--rollout.group_size", "4", "--grpo.prompts_per_step", "2", "--grpo.micro_batch_size", "8",
             "--rollout.max_new_tokens", "8", "--grpo.beta", "0", "--grpo.rewards", "accuracy,repetition_penalty",
             "--optim.warmup_steps", "0", "--data.num_train", "16", "--data.num_eval", "2"],
    "sft": ["--data.num_train", "16", "--data.num_eval", "2", "--sft.max_seq_len", "256",
            "--sft.rows_per_step", "2", "--sft.eval_max_new_tokens", "4", "--optim.warmup_steps", "0"],
}
COMMON = ["--train.max_steps", "2", "--train.save_every", "1", "--train.eval_every", "0",
          "--train.progress", "false"]

# An update that overflows: the real step, then one weight becomes inf, as a float32 overflow would.
OVERFLOW = """
import sys, torch
real_step = torch.optim.AdamW.step
def overflowing_step(self, *a, **k):
    out = real_step(self, *a, **k)
    with torch.no_grad():
        p = self.param_groups[0]["params"][0]
        (p.to_local() if hasattr(p, "to_local") else p).view(-1)[0] = float("inf")
    return out
torch.optim.AdamW.step = overflowing_step
sys.argv = ["train.py", *sys.argv[1:]]
sys.path.insert(0, {root!r})
from r1train.cli import main
main()
"""


def test_check_finite_params_finds_one_bad_value():
    from r1train.run.checkpoint import CheckpointManager
    from r1train.run.dist import init_distributed
    from r1train.run.loop import NonFiniteParameters, check_finite_params
    info = init_distributed("cpu")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    ckpt = CheckpointManager("/nonexistent/checkpoints", info)
    check_finite_params(model.parameters(), 3, ckpt, info.device, "test")  # all finite: no error
    with torch.no_grad():  # finite values whose sum overflows float32: still finite parameters
        model[0].weight.fill_(3e38)
    assert not torch.isfinite(model[0].weight.sum())
    check_finite_params(model.parameters(), 3, ckpt, info.device, "test")
    for bad in (float("nan"), float("inf"), -float("inf")):
        with torch.no_grad():
            model[1].bias[1] = bad
        with pytest.raises(NonFiniteParameters, match=r"\[test\] step 3: .*non-finite.*none yet"):
            check_finite_params(model.parameters(), 3, ckpt, info.device, "test")


@pytest.mark.parametrize("command", ["grpo", "sft"])
def test_an_update_that_overflows_stops_before_saving_or_exporting(tiny, tmp_path, command):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-c", OVERFLOW.format(root=str(ROOT)), command, *ARGS[command],
                          *COMMON, "--model.path", tiny, "--train.output_dir", str(out)],
                         capture_output=True, text=True, env=ENV, timeout=600)
    assert res.returncode != 0, res.stdout[-2000:]
    assert f"[{command}] step 1: the optimizer update made parameters non-finite" in res.stderr, res.stderr[-3000:]
    assert f"none yet in {out / 'checkpoints'}" in res.stderr
    assert not (out / "final").exists()
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())


@pytest.mark.parametrize("command", ["grpo", "sft"])
def test_lr_inf_never_exits_zero_with_an_export(tiny, tmp_path, command):
    """The issue's reproduction, whichever check (option validation or this guard) stops it."""
    out = tmp_path / "run"
    res = train_py(command, *ARGS[command], *COMMON, "--optim.lr", "inf", "--model.path", tiny,
                   "--train.output_dir", out, env=ENV)
    assert res.returncode != 0, res.stdout[-2000:]
    assert not (out / "final").exists()


def test_a_non_finite_loss_skips_its_update_and_max_nonfinite_in_a_row_stops_the_run(tmp_path, monkeypatch):
    """Worked out by hand: the loss is NaN at steps 2, 4 and 5, train.max_nonfinite is 2. Step 2
    is skipped (1 in a row) and leaves the weights as step 1 left them; step 3 trains and resets
    the count; steps 4 and 5 are skipped (1, then 2 in a row), and step 5 stops the run naming
    it, before anything of step 5 is saved or logged: the newest checkpoint is step 4's."""
    from r1train.run.config import parse_args
    from r1train.sft.trainer import SFTJobConfig, SFTTrainer
    cfg = parse_args(SFTJobConfig, [*ARGS["sft"], "--train.max_steps", "6", "--train.save_every", "1",
                                    "--train.eval_every", "0", "--train.progress", "false",
                                    "--train.max_nonfinite", "2", "--train.output_dir", str(tmp_path)])
    real = SFTTrainer.micro_loss

    def nan_at_some_steps(self, *args):
        loss, logged, logps = real(self, *args)
        return (loss * float("nan"), logged, logps) if self.step in (2, 4, 5) else (loss, logged, logps)

    monkeypatch.setattr(SFTTrainer, "micro_loss", nan_at_some_steps)
    trainer = SFTTrainer(cfg)
    weights = {}
    real_step = trainer.train_step

    def train_step():
        out = real_step()
        weights[trainer.step] = next(trainer.policy.parameters()).detach().clone()
        return out

    trainer.train_step = train_step
    with pytest.raises(RuntimeError, match=r"2 non-finite updates in a row at step 5"):
        trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # step 5 stops the run before its metrics row is written
    assert {r["step"]: r["skipped_update"] for r in rows if "skipped_update" in r} == \
        {1: 0.0, 2: 1.0, 3: 0.0, 4: 1.0}
    assert torch.equal(weights[2], weights[1]) and not torch.equal(weights[3], weights[2])
    assert torch.equal(weights[5], weights[4]) and torch.isfinite(weights[5]).all()
    assert trainer.ckpt.steps()[-1] == 4
