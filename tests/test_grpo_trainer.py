"""The GRPO trainer end to end on the tiny model: FSDP2 (2 processes, gloo) equals one process,
resume equals an uninterrupted run (also with reference refreshes, whose reference the
checkpoints hold), a killed save leaves a resumable checkpoint, the export loads, and bad options
fail at start naming the option."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import torchrun_py, train_py

ROOT = Path(__file__).resolve().parents[1]

# A random tiny model never answers correctly, so accuracy alone gives no signal; the
# repetition and language rewards vary between its completions and give non-zero advantages.
BASE = ["--rollout.group_size", "4", "--grpo.prompts_per_step", "4", "--grpo.micro_batch_size", "4",
        "--rollout.prompts_per_generation", "1", "--rollout.max_new_tokens", "12",
        "--grpo.rewards", "accuracy,repetition_penalty,language_consistency",
        "--grpo.beta", "0.04", "--optim.lr", "1e-3", "--optim.warmup_steps", "0",
        "--data.num_train", "64", "--data.num_eval", "4", "--train.eval_every", "0",
        "--train.progress", "false", "--train.sample_every", "1"]


def _run(args, nproc=1, timeout=600):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if nproc == 1:
        res = train_py("grpo", *args, env=env, timeout=timeout)
    else:
        res = torchrun_py("grpo", *args, nproc=nproc, env=env, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def _metrics(out):
    return [json.loads(l) for l in (Path(out) / "metrics.jsonl").read_text().splitlines() if l.strip()]


def test_two_processes_match_one(tiny, tmp_path):
    # scale_rewards=batch divides by the std of the whole global batch, which each rank holds
    # only half of: the run must gather it (it used the rank's own std before). The packed passes
    # are cut by a token budget (prompts of ~106 tokens: a group of 4 takes two micro-batches),
    # and the ranks agree on their number of forwards.
    args = [*BASE, "--model.path", tiny, "--train.max_steps", "2", "--train.save_every", "0",
            "--grpo.scale_rewards", "batch", "--grpo.micro_batch_tokens", "140"]
    _run([*args, "--train.output_dir", str(tmp_path / "one")])
    _run([*args, "--train.output_dir", str(tmp_path / "two")], nproc=2)
    one = load_file(tmp_path / "one" / "final" / "model.safetensors")
    two = load_file(tmp_path / "two" / "final" / "model.safetensors")
    start = load_file(Path(tiny) / "model.safetensors")
    assert one.keys() == two.keys()
    moved = max((one[k] - start[k]).abs().max().item() for k in one)
    assert moved > 1e-4, "the run did not update the parameters: the comparison would be vacuous"
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6, msg=k)
    m1, m2 = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    r1 = [m["reward"] for m in m1 if "reward" in m]
    r2 = [m["reward"] for m in m2 if "reward" in m]
    assert r1 == pytest.approx(r2, abs=1e-9) and len(r1) == 2


def test_fsdp_of_one_process_and_checkpointing_match_plain(tiny, tmp_path):
    """`--train.fsdp always` shards a single process over a process group of one (FSDP2's code
    path, gloo here) and `--model.gradient_checkpointing` recomputes activations in backward;
    neither may change what is learned."""
    args = [*BASE, "--model.path", tiny, "--train.max_steps", "2", "--train.save_every", "0"]
    plain = _run([*args, "--train.output_dir", str(tmp_path / "plain")])
    fsdp = _run([*args, "--train.output_dir", str(tmp_path / "fsdp"), "--train.fsdp", "always",
                 "--model.gradient_checkpointing", "true"])
    assert "FSDP2 off" in plain.stdout and "FSDP2 on" in fsdp.stdout
    one = load_file(tmp_path / "plain" / "final" / "model.safetensors")
    two = load_file(tmp_path / "fsdp" / "final" / "model.safetensors")
    start = load_file(Path(tiny) / "model.safetensors")
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-4
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-6, msg=k)
    r1 = [m["reward"] for m in _metrics(tmp_path / "plain") if "reward" in m]
    r2 = [m["reward"] for m in _metrics(tmp_path / "fsdp") if "reward" in m]
    assert r1 == pytest.approx(r2, abs=1e-9) and len(r1) == 2


# The uninterrupted 4-step run, checkpointed at steps 2 and 4 and exported, made once: the reference
# of the plain resume below, and the run whose step-2 checkpoint is resumed with refreshes turned on.
# Its evaluations sample 2 completions per problem (--eval.samples), each seeded by (problem,
# sample) alone: the resumed run's final evaluation draws what the uninterrupted one drew.
FOUR = [*BASE, "--train.max_steps", "4", "--train.save_every", "2", "--eval.samples", "2"]


@pytest.fixture(scope="module")
def four_steps(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("four-steps")
    _run([*FOUR, "--model.path", tiny, "--train.output_dir", str(out)])
    return out


def test_resume_equals_uninterrupted_and_export_loads(tiny, four_steps, tmp_path):
    args = [*FOUR, "--model.path", tiny]
    full, part = four_steps, tmp_path / "part"
    res = _run([*args, "--train.output_dir", str(part), "--train.stop_at_step", "2"])
    assert "stopped" in res.stdout
    assert not (part / "final").exists() and (part / "checkpoints" / "step-2").is_dir()
    res = _run([*args, "--train.output_dir", str(part)])
    assert "resumed from" in res.stdout
    a = load_file(full / "final" / "model.safetensors")
    b = load_file(part / "final" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=k)
    ma = [m for m in _metrics(full) if "reward" in m]
    mb = [m for m in _metrics(part) if "reward" in m]
    assert [m["step"] for m in mb] == [1, 2, 3, 4]  # resumed rows replace, never duplicate
    for x, y in zip(ma, mb):
        assert x["reward"] == pytest.approx(y["reward"], abs=1e-9)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-7)
    ea, eb = ([m for m in _metrics(run) if "eval/pass@2" in m] for run in (full, part))
    assert [m["step"] for m in ea] == [m["step"] for m in eb] == [0, 4]
    assert "eval/gain_se" in eb[1]  # the step-0 scores came back with the resume
    for x, y in zip(ea, eb):
        assert x == pytest.approx(y, abs=1e-9)
    sa, sb = ([json.loads(line) for line in (run / "eval_samples.jsonl").read_text().splitlines()]
              for run in (full, part))
    assert [s for s in sa if s["step"] == 4] == [s for s in sb if s["step"] == 4] and len(sa) == 2 * 4 * 2
    assert (full / "samples.jsonl").exists()

    # The export loads in a fresh process and generates.
    code = f"""
from transformers import AutoModelForCausalLM, AutoTokenizer
tok = AutoTokenizer.from_pretrained({str(full / 'final')!r})
m = AutoModelForCausalLM.from_pretrained({str(full / 'final')!r})
x = tok("What is 1 + 2?", return_tensors="pt")
print(m.generate(**x, max_new_tokens=4, do_sample=False).shape[1] - x["input_ids"].shape[1])
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip().splitlines()[-1]) >= 1


# TR-DPO-style reference refreshes after every step: the reference moves each step, so a resume
# that lost it would show a different kl from step 3 on.
REFRESH = ["--grpo.beta", "0.04", "--grpo.ref_refresh_steps", "1", "--grpo.ref_mix_alpha", "0.6"]


def _trainer_state(ckpt):
    return torch.load(Path(ckpt) / "trainer_state.pt", weights_only=True)


def _dcp_tensors(ckpt, tmp_path):
    """The model and reference tensors of a DCP checkpoint folder, as {"model": {...}, "ref": {...}}."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    out = tmp_path / f"{Path(ckpt).parent.parent.name}-{Path(ckpt).name}.pt"
    dcp_to_torch_save(ckpt, out)
    sd = torch.load(out, weights_only=False)
    return {k: sd[k] for k in ("model", "ref") if k in sd}


def _assert_resume_equals(full, part, tmp_path, rtol=1e-5, atol=1e-7):
    a = _dcp_tensors(full / "checkpoints" / "step-4", tmp_path)
    b = _dcp_tensors(part / "checkpoints" / "step-4", tmp_path)
    assert a.keys() == b.keys() == {"model", "ref"}
    for name in a:
        for k in a[name]:
            torch.testing.assert_close(b[name][k], a[name][k], rtol=rtol, atol=atol, msg=f"{name} {k}")
    ma = [m for m in _metrics(full) if "reward" in m]
    mb = [m for m in _metrics(part) if "reward" in m]
    assert [m["step"] for m in ma] == [m["step"] for m in mb] == [1, 2, 3, 4]
    for x, y in zip(ma, mb):
        assert x["reward"] == pytest.approx(y["reward"], abs=1e-9)
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-7)
        assert x["kl"] == pytest.approx(y["kl"], rel=1e-4, abs=1e-9), x["step"]
    return a, ma


def test_resume_with_ref_refresh_equals_uninterrupted(tiny, tmp_path):
    args = [*BASE, *REFRESH, "--model.path", tiny, "--train.max_steps", "4", "--train.save_every", "2",
            "--train.export", "false"]
    full, part = tmp_path / "full", tmp_path / "part"
    _run([*args, "--train.output_dir", str(full)])
    _run([*args, "--train.output_dir", str(part), "--train.stop_at_step", "2"])
    assert _trainer_state(part / "checkpoints" / "step-2")["extra_models"] == ["ref"]
    res = _run([*args, "--train.output_dir", str(part)])
    assert "resumed from" in res.stdout
    state = _trainer_state(full / "checkpoints" / "step-4")
    assert state["ref_refreshes"] == 4 and state["extra_models"] == ["ref"]
    weights, metrics = _assert_resume_equals(full, part, tmp_path)
    # Not vacuous: the reference moved away from the initial model, and the kl is not zero.
    start = load_file(Path(tiny) / "model.safetensors")
    moved = max((weights["ref"]["lm." + k] - v).abs().max().item() for k, v in start.items())
    assert moved > 1e-4
    assert min(m["kl"] for m in metrics[2:]) > 1e-6


def test_resume_without_saved_reference(tiny, four_steps, tmp_path):
    """A checkpoint without reference weights resumes exactly when its reference was never
    refreshed (it is the initial model; refreshes turned on at resume start from it)."""
    import shutil
    args = [*FOUR, "--model.path", tiny, "--train.export", "false"]
    plain, turned_on = four_steps, tmp_path / "turned_on"
    # Runs without refreshes do not save the reference: it is the initial model.
    for step in (2, 4):
        ckpt = plain / "checkpoints" / f"step-{step}"
        assert _trainer_state(ckpt)["extra_models"] == [] and _trainer_state(ckpt)["ref_refreshes"] == 0
        assert "ref" not in _dcp_tensors(ckpt, tmp_path)

    # Resume from step 2 with refreshes turned on.
    shutil.copytree(plain, turned_on)
    shutil.rmtree(turned_on / "checkpoints" / "step-4")
    shutil.rmtree(turned_on / "final")  # the plain run's export: this resume exports nothing
    res = _run([*args, *REFRESH, "--train.output_dir", str(turned_on)])
    assert "resumed from" in res.stdout
    ma = {m["step"]: m for m in _metrics(plain) if "reward" in m}
    mb = {m["step"]: m for m in _metrics(turned_on) if "reward" in m}
    assert sorted(mb) == [1, 2, 3, 4]
    # Step 3 still uses the initial reference (the refresh comes after the update) ...
    for k in ("reward", "loss", "kl"):
        assert mb[3][k] == pytest.approx(ma[3][k], rel=1e-4, abs=1e-9), k
    # ... step 4 the refreshed one, which the new checkpoint holds.
    assert mb[4]["reward"] == pytest.approx(ma[4]["reward"], abs=1e-9)
    assert abs(mb[4]["kl"] - ma[4]["kl"]) > 1e-3 * ma[4]["kl"]
    state = _trainer_state(turned_on / "checkpoints" / "step-4")
    assert state["ref_refreshes"] == 2 and state["extra_models"] == ["ref"]


def test_resume_with_ref_refresh_two_processes(tiny, tmp_path):
    """The same under FSDP2 with 2 processes: the sharded reference is saved and restored."""
    args = [*BASE, *REFRESH, "--model.path", tiny, "--train.max_steps", "4", "--train.save_every", "2",
            "--train.export", "false"]
    full, part = tmp_path / "full", tmp_path / "part"
    _run([*args, "--train.output_dir", str(full)], nproc=2)
    _run([*args, "--train.output_dir", str(part), "--train.stop_at_step", "2"], nproc=2)
    res = _run([*args, "--train.output_dir", str(part)], nproc=2)
    assert "resumed from" in res.stdout
    _assert_resume_equals(full, part, tmp_path)


def test_killed_save_leaves_previous_checkpoint_resumable(tmp_path):
    """A process killed in the middle of writing step-2 leaves step-1 as the newest checkpoint."""
    code = f"""
import os, torch
from r1train.run.checkpoint import CheckpointManager
from r1train.run.dist import init_distributed
info = init_distributed("cpu")
torch.manual_seed(0)
model = torch.nn.Linear(4, 3)
opt = torch.optim.AdamW(model.parameters(), lr=0.1)
model(torch.ones(2, 4)).sum().backward(); opt.step()
ckpt = CheckpointManager({str(tmp_path)!r}, info)
ckpt.save(1, model, opt, {{"note": "one"}})
torch.save(model.state_dict(), {str(tmp_path / 'expected.pt')!r})
real_save = torch.save
def dying_save(obj, f, *a, **k):
    if "rng-rank" in str(f):
        os._exit(9)  # killed after the shards were written, before the rename
    return real_save(obj, f, *a, **k)
torch.save = dying_save
with torch.no_grad():
    model.weight.add_(1.0)
ckpt.save(2, model, opt, {{"note": "two"}})
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 9, res.stderr
    assert (tmp_path / "step-2.tmp").is_dir() and not (tmp_path / "step-2").exists()

    from r1train.run.checkpoint import CheckpointManager
    from r1train.run.dist import init_distributed
    info = init_distributed("cpu")
    ckpt = CheckpointManager(tmp_path, info)
    assert ckpt.steps() == [1]
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    state = ckpt.load(ckpt.latest(), model, opt)
    assert state["step"] == 1 and state["note"] == "one"
    expected = torch.load(tmp_path / "expected.pt", weights_only=True)
    torch.testing.assert_close(model.weight.detach(), expected["weight"])
    # The next save of step 2 replaces the leftover temporary folder.
    ckpt.save(2, model, opt, {"note": "again"})
    assert ckpt.steps() == [1, 2] and not (tmp_path / "step-2.tmp").exists()


@pytest.mark.parametrize("args, option", [
    (["--rollout.group_size", "1"], "rollout.group_size"),
    (["--grpo.prompts_per_step", "3", "--grpo.micro_batch_size", "7"], "grpo.micro_batch_size"),
    (["--grpo.beta", "-0.1"], "grpo.beta"),
    (["--grpo.rewards", "accuracy,shiny"], "grpo.rewards"),
    (["--grpo.loss_type", "ppo"], "grpo.loss_type"),
    (["--grpo.nonexistent", "1"], "grpo.nonexistent"),
    (["--optim.lr", "abc"], "optim.lr"),
    (["--train.fsdp", "sometimes"], "train.fsdp"),
])
def test_bad_options_fail_at_start_naming_the_option(args, option):
    from r1train.grpo.config import GRPOJobConfig
    from r1train.run.config import ConfigError, parse_args
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        parse_args(GRPOJobConfig, args)


def test_prompts_not_divisible_by_world_size():
    from r1train.grpo.config import GRPOJobConfig
    from r1train.run.config import ConfigError
    cfg = GRPOJobConfig()
    cfg.grpo.prompts_per_step = 3
    with pytest.raises(ConfigError, match="divisible by the world size 2"):
        cfg.validate(world_size=2)


def test_missing_dataset_column_fails_naming_it(tmp_path, tiny):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "What is 1 + 1?"}\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    res = train_py("grpo", "--model.path", tiny, "--data.source", bad, "--data.schema", "gsm8k",
                   "--train.output_dir", tmp_path / "out", env=env, timeout=300)
    assert res.returncode != 0
    assert "answer" in res.stderr and "bad.jsonl" in res.stderr
