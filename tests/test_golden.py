"""Golden numbers: short GRPO and SFT runs whose per-step metrics are checked into
tests/assets/golden_runs.json and compared at rtol 1e-4.

These are regression tests, not correctness tests: the formula tests (test_loss.py,
test_advantages.py, test_kernels.py, ...) and the whole-step oracle (test_step_oracle.py) say
the math is right; these say that nothing
changed the numbers of a whole run without anyone noticing (a sampler, a mask, a reduction,
an optimizer default). When a change is meant to move them, regenerate and say why in the
commit:

    R1_UPDATE_GOLDEN=1 python -m pytest -s tests/test_golden.py   (-s: it prints old -> new)

The runs use one process and one thread (OMP_NUM_THREADS=1), so the float reductions, and
with them every sampled token, are the same on every CPU run of the pinned torch.
"""
import json
import os
from pathlib import Path

import pytest

from launch import train_py

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "assets" / "golden_runs.json"
UPDATE = os.environ.get("R1_UPDATE_GOLDEN") == "1"

COMMON = ["--data.task.max_operands", "3", "--data.task.max_value", "9", "--data.num_eval", "4",
          "--optim.warmup_steps", "0", "--train.eval_every", "0", "--train.save_every", "0",
          "--train.progress", "false", "--train.log_every", "1"]
RUNS = {
    # GRPO from the committed cold-start SFT model: its completions are right or wrong, so
    # rewards, advantages, KL and gradients are all non-trivial from step 1.
    "grpo": (["grpo", "--model.path", str(ROOT / "tests" / "assets" / "tiny-r1-sft"),
              "--rollout.group_size", "4", "--grpo.prompts_per_step", "4",
              "--grpo.micro_batch_size", "8", "--rollout.max_new_tokens", "32",
              "--grpo.beta", "0.04", "--optim.lr", "2e-4", "--data.num_train", "64",
              "--train.max_steps", "3", *COMMON],
             ["reward", "accuracy/mean", "completion_length/mean", "loss", "kl", "entropy",
              "grad_norm"]),
    # SFT with packing from the random tiny model.
    "sft": (["sft", "--data.num_train", "64", "--sft.max_seq_len", "512",
             "--sft.rows_per_step", "4", "--sft.rows_per_micro_batch", "2", "--optim.lr", "3e-3",
             "--optim.schedule", "constant", "--train.max_steps", "4", *COMMON],
            ["loss", "grad_norm", "tokens"]),
}


def _run(args: list[str], out: Path) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("R1_LOGPROB_IMPL", None)
    res = train_py(*args, "--train.output_dir", out, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss" in r]  # the training steps, not eval rows


@pytest.mark.parametrize("name", sorted(RUNS))
def test_run_matches_golden_numbers(name, tiny, tmp_path):
    args, keys = RUNS[name]
    if name == "sft":
        args = [*args, "--model.path", tiny]
    steps = [{"step": r["step"], **{k: r[k] for k in keys}} for r in _run(args, tmp_path)]
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
    if UPDATE:
        # A regeneration shows what it replaces, number by number: the oracle tests
        # (test_step_oracle.py) say whether a change is right; this file only that it happened.
        for got, was in zip(steps, golden.get(name, [{}] * len(steps))):
            moved = [f"{k} {was.get(k, 'new')} -> {got[k]}" for k in keys if was.get(k) != got[k]]
            print(f"[golden {name}] step {got['step']}: {', '.join(moved) or 'unchanged'}")
        golden[name] = steps
        GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
        return
    assert name in golden, f"no golden numbers for {name!r}: run with R1_UPDATE_GOLDEN=1"
    assert [s["step"] for s in steps] == [s["step"] for s in golden[name]]
    for got, want in zip(steps, golden[name]):
        for k in keys:
            # atol: a GRPO loss of exactly 0 in exact arithmetic comes out as ~1e-9
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), (name, got["step"], k)
