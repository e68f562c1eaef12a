"""SFT trainer, rejection sampling, distillation and the pipeline, end to end on the tiny model."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import train_py

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

SFT = ["--data.num_train", "160", "--data.num_eval", "4", "--data.task.max_operands", "3",
       "--data.task.max_value", "9", "--sft.max_seq_len", "512", "--sft.rows_per_step", "4",
       "--sft.rows_per_micro_batch", "2", "--sft.eval_max_new_tokens", "8", "--optim.lr", "3e-3",
       "--optim.warmup_steps", "0", "--optim.schedule", "constant", "--train.eval_every", "0",
       "--train.save_every", "0", "--train.progress", "false", "--train.log_every", "1"]


def _run(command, args, nproc=1, timeout=600):
    if nproc == 1:
        res = train_py(command, *args, env=ENV, timeout=timeout)
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
               str(ROOT / "train.py"), command, *args]
        res = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def _losses(out):
    rows = [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [r["loss"] for r in rows if "loss" in r]


# One uninterrupted 6-step run, checkpointed every 2 steps, serves two tests: it must lower the
# loss, and a stopped and resumed run must equal it (the checkpoints do not change what is learned).
SIX = ["--train.max_steps", "6", "--train.save_every", "2"]


@pytest.fixture(scope="module")
def six_steps(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft-six")
    _run("sft", [*SFT, "--model.path", tiny, *SIX, "--train.output_dir", str(out)])
    return out


def test_sft_lowers_loss_on_its_data(six_steps):
    losses = _losses(six_steps)
    assert len(losses) == 6 and losses[-1] < 0.6 * losses[0], losses


def test_sft_with_fewer_rows_than_a_step_trains_on_what_it_has(tiny, tmp_path):
    """3 conversations pack into 1 row of 512 tokens, a step asks for 4 rows: the stage trains
    (each step reads the row 4 times) and says so, instead of stopping."""
    args = [*SFT, "--model.path", tiny, "--data.num_train", "3", "--train.max_steps", "3",
            "--train.output_dir", str(tmp_path)]
    res = _run("sft", args)
    assert "1 packed rows for --sft.rows_per_step=4: each step passes over the data 4.0 times" in res.stdout
    losses = _losses(tmp_path)
    assert len(losses) == 3 and losses[-1] < losses[0], losses


def test_sft_two_processes_match_one(tiny, tmp_path):
    args = [*SFT, "--model.path", tiny, "--train.max_steps", "2"]
    _run("sft", [*args, "--train.output_dir", str(tmp_path / "one")])
    # The same global batch of 4 rows: 2 micro-batches of 2 on one rank, 1 of 2 on each of two.
    _run("sft", [*args, "--train.output_dir", str(tmp_path / "two")], nproc=2)
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    start = load_file(Path(tiny) / "model.safetensors")
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-3  # it did train
    # atol 1e-5 is far below one Adam step (lr 3e-3): a wrong gradient anywhere would show.
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5, msg=k)


def test_sft_resume_equals_uninterrupted(tiny, six_steps, tmp_path):
    args = [*SFT, "--model.path", tiny, *SIX]
    _run("sft", [*args, "--train.output_dir", str(tmp_path / "part"), "--train.stop_at_step", "2"])
    res = _run("sft", [*args, "--train.output_dir", str(tmp_path / "part")])
    assert "resumed from" in res.stdout
    assert len(_losses(six_steps)) == 6
    assert _losses(tmp_path / "part") == pytest.approx(_losses(six_steps), rel=1e-5)


def test_rejection_sampling_keeps_only_samples_that_pass(tiny, tmp_path):
    """Score the written set again, independently: every kept completion passes the required
    rewards, and the acceptance rate is what the file holds."""
    out = tmp_path / "rej"
    _run("rejection-sample", ["--model.path", tiny, "--data.num_train", "12", "--data.task.max_operands", "2",
                              "--sampling.samples_per_prompt", "6", "--sampling.max_new_tokens", "12",
                              "--sampling.rewards", "format,language_consistency",
                              "--sampling.require", "language_consistency", "--train.output_dir", str(out)])
    stats = json.loads((out / "rejection_stats.json").read_text())
    from r1train.data import load_records
    from r1train.rewards import language_consistency_reward
    kept = load_records(out / "sft.jsonl", schema="bespoke", split="all").records
    assert stats["prompts"] == 12 and stats["kept"] == len(kept) >= 1
    assert stats["acceptance_rate"] == pytest.approx(len(kept) / 12)
    replies = [r["messages"][-1]["content"] for r in kept]
    scores = language_consistency_reward(replies, prompt=[r["prompt"] for r in kept],
                                         problem=[r["problem"] for r in kept])
    assert all(s == 1.0 for s in scores), scores


def test_rejection_sampling_without_a_system_prompt_writes_a_loadable_set(tiny, tmp_path):
    """`--data.system_prompt ''`: prompts of the user turn alone; the kept rows are written and
    read back the same way (the writer used to refuse them after all the sampling was done)."""
    out = tmp_path / "rej"
    _run("rejection-sample", ["--model.path", tiny, "--data.num_train", "12", "--data.task.max_operands", "2",
                              "--data.system_prompt", "", "--sampling.samples_per_prompt", "6",
                              "--sampling.max_new_tokens", "12", "--sampling.rewards", "format,language_consistency",
                              "--sampling.require", "language_consistency", "--train.output_dir", str(out)])
    from r1train.data import load_records
    kept = load_records(out / "sft.jsonl", schema="bespoke", split="all").records
    assert kept and all([m["role"] for m in r["messages"]] == ["user", "assistant"] for r in kept)


def test_tiny_pipeline_runs_every_stage_and_exports_load(tmp_path):
    out = tmp_path / "pipe"
    _run("pipeline", ["--recipe", str(ROOT / "configs" / "tiny-r1-full.yaml"), "--output_dir", str(out)],
         timeout=900)
    stages = ["cold-start-sft", "reasoning-rl", "rejection", "sft-stage-2", "distill"]
    for s in stages:
        assert (out / s / "stage.json").exists(), s
    assert "stage" in (out / "results.txt").read_text()
    from transformers import AutoModelForCausalLM
    exported = {s: AutoModelForCausalLM.from_pretrained(out / s / "final")
                for s in ["cold-start-sft", "reasoning-rl", "sft-stage-2", "distill"]}
    ids = torch.tensor([[1, 2, 3, 4]])
    for s, model in exported.items():  # each export loads and computes
        assert torch.isfinite(model(input_ids=ids).logits).all(), s
    for a, b in (("cold-start-sft", "reasoning-rl"), ("reasoning-rl", "sft-stage-2")):
        # each stage starts from the one before it and trains: its weights are not that stage's
        pairs = zip(exported[a].state_dict().values(), exported[b].state_dict().values())
        assert any(not torch.equal(x, y) for x, y in pairs), f"{b} exported {a}'s weights unchanged"
    small = AutoModelForCausalLM.from_pretrained(out / "distill" / "final")
    big = AutoModelForCausalLM.from_pretrained(out / "sft-stage-2" / "final")
    assert small.num_parameters() < big.num_parameters()  # distilled into a smaller student
    # A re-run skips the finished stages.
    recipe = ["--recipe", str(ROOT / "configs" / "tiny-r1-full.yaml"), "--output_dir", str(out)]
    again = _run("pipeline", recipe)
    assert again.stdout.count("already done") == len(stages)
    # A changed option of a finished stage is never skipped silently: refused, naming it ...
    changed = [*recipe, "--distill.train.max_steps", "2"]
    refused = train_py("pipeline", *changed, env=ENV)
    assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
    assert "stage distill" in refused.stderr and "--train.max_steps: 3 -> 2" in refused.stderr
    # ... or, when asked, that stage runs again and the earlier result is kept aside.
    rerun = _run("pipeline", [*changed, "--rerun_changed"])
    assert rerun.stdout.count("already done") == len(stages) - 1
    assert "stage distill: options changed, running it again" in rerun.stdout
    assert len(list(out.glob("distill.replaced-*"))) == 1
    assert json.loads((out / "distill" / "stage.json").read_text())["options"]["train.max_steps"] == 2


@pytest.mark.parametrize("recipe", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_recipe_validates(recipe, tmp_path):
    """Each recipe in configs/ parses and validates as it will run: a pipeline's stages with their
    commands' configs (`check_recipe`, what `train.py pipeline` does before anything runs), a
    one-command recipe (no `stages`) with GRPO's (`train.py grpo --recipe`). A renamed option or a
    bad value in a recipe fails here, not an hour into a run."""
    from r1train.grpo.config import GRPOJobConfig
    from r1train.pipeline import check_recipe
    from r1train.run.config import load_recipe, parse_args

    path = ROOT / "configs" / recipe
    if "stages" in load_recipe(path):
        assert check_recipe(load_recipe(path), {"output_dir": str(tmp_path / "out")})
    else:
        parse_args(GRPOJobConfig, ["--recipe", str(path)]).validate(1)
