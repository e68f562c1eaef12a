"""The token selections end to end (grpo.rollout_correction, grpo.top_entropy_quantile): 2
processes (FSDP2, gloo) equal 1, and a resumed run equals an uninterrupted one.

The runs start from the cold-start SFT checkpoint (tests/assets/tiny-r1-sft): its distributions
are peaked where it is sure and spread where it is not, so the entropies differ between tokens,
and sampling with top_p 0.9 makes the sampler differ from the trainer where the model is unsure
(the sampler's log-probs are renormalized over the nucleus: rho = pi_old / pi_sampler = the
nucleus' mass, 1 or below): the weights are not all 1 and the bounds bind on some tokens.
"""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import torchrun_py, train_py

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "tests" / "assets" / "tiny-r1-sft"
BASE = ["--model.path", str(MODEL), "--rollout.group_size", "4", "--grpo.prompts_per_step", "4",
        "--grpo.micro_batch_size", "4", "--rollout.max_new_tokens", "32", "--rollout.top_p", "0.9",
        "--data.task.max_operands", "3", "--data.task.max_value", "9", "--data.num_train", "64",
        "--data.num_eval", "2", "--optim.lr", "2e-4", "--optim.warmup_steps", "0", "--train.eval_every", "0",
        "--train.progress", "false", "--train.sample_every", "0"]
SELECTED = ("loss", "kl", "mismatch_kl", "is_weight_mean", "is_truncated_frac", "is_masked_frac",
            "entropy_kept_frac", "entropy_threshold")


def _run(args, nproc=1):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if nproc == 1:
        res = train_py("grpo", *args, env=env, timeout=600)
    else:
        res = torchrun_py("grpo", *args, nproc=nproc, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def _steps(out) -> list[dict]:
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "loss" in r]


def _compare(a: list[dict], b: list[dict], rel=1e-4, abs_=1e-7):
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b):
        assert x["reward"] == pytest.approx(y["reward"], abs=1e-9)
        for k in SELECTED:
            assert (k in x) == (k in y), k
            if k in x:
                assert x[k] == pytest.approx(y[k], rel=rel, abs=abs_), (x["step"], k)


def test_two_processes_match_one(tmp_path):
    # Sequence-level MIS, two-sided, and the top 30% entropy tokens: the threshold is taken over
    # both ranks' tokens (gathered), so each rank masks what one process masks.
    args = [*BASE, "--train.max_steps", "2", "--train.save_every", "0", "--grpo.rollout_correction", "mis",
            "--grpo.correction_level", "sequence", "--grpo.correction_bound_low", "0.85",
            "--grpo.top_entropy_quantile", "0.3"]
    _run([*args, "--train.output_dir", str(tmp_path / "one")])
    _run([*args, "--train.output_dir", str(tmp_path / "two")], nproc=2)
    one, two = _steps(tmp_path / "one"), _steps(tmp_path / "two")
    _compare(one, two)
    assert any(0 < m["is_masked_frac"] < 1 for m in one), "MIS masked all tokens or none: untested"
    assert all(0 < m["entropy_kept_frac"] < 0.5 for m in one)
    a = load_file(tmp_path / "one" / "final" / "model.safetensors")
    b = load_file(tmp_path / "two" / "final" / "model.safetensors")
    start = load_file(MODEL / "model.safetensors")
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-5, "no update: a vacuous comparison"
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)


def test_resume_equals_uninterrupted(tmp_path):
    # Token-level TIS truncating below 1 (so that it binds: top_p keeps every ratio at or under
    # 1), the top 20% entropy tokens, 2 passes a step (their entropies and old log-probs from
    # phase 5). Nothing of either selection is state: a resume recomputes both from the batch.
    args = [*BASE, "--train.max_steps", "4", "--train.save_every", "2", "--train.export", "false",
            "--grpo.rollout_correction", "tis", "--grpo.correction_bound", "0.97",
            "--grpo.top_entropy_quantile", "0.2", "--grpo.num_iterations", "2"]
    full, part = tmp_path / "full", tmp_path / "part"
    _run([*args, "--train.output_dir", str(full)])
    _run([*args, "--train.output_dir", str(part), "--train.stop_at_step", "2"])
    res = _run([*args, "--train.output_dir", str(part)])
    assert "resumed from" in res.stdout
    a, b = _steps(full), _steps(part)
    assert [m["step"] for m in a] == [1, 2, 3, 4]
    _compare(a, b, rel=1e-5)
    assert any(0 < m["is_truncated_frac"] < 1 for m in a), "TIS truncated all tokens or none: untested"
