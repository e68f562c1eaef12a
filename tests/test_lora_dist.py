"""LoRA under FSDP2 (torchrun, gloo, CPU) on the tiny model: two processes, with activation
checkpointing, train the adapters that one process trains. Each rank holds a shard of the frozen
base and of every A and B; gradients exist for A and B only and FSDP reduce-scatters those (a
unit whose parameters mix frozen and trainable is allowed by FSDP2: it reduces what has a
gradient). The clipped norm, AdamW over the adapters, the reference pass with adapters off, the
merged export, the PEFT adapter export and the reference refresh must all come out as in one process,
and an adapter-only checkpoint of one process resumes on two."""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from launch import torchrun_py, train_py

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

# As tests/test_lora_training.py: 4 steps, so that the adapters (B = 0 at step 0, no advantage at
# step 1) move the policy off the base and the KL to the adapters-off reference is not 0; the
# reference is refreshed at step 2 (each rank copies its shards of A and B into the reference
# slot), so the KL of step 4 is to the policy of step 2.
GRPO = ["--model.lora_rank", "4", "--model.lora_alpha", "8", "--rollout.group_size", "4",
        "--grpo.prompts_per_step", "4", "--grpo.micro_batch_size", "4", "--rollout.prompts_per_generation", "1",
        "--rollout.max_new_tokens", "12", "--grpo.rewards", "accuracy,repetition_penalty,language_consistency",
        "--grpo.beta", "0.04", "--optim.lr", "1e-2", "--optim.warmup_steps", "0", "--optim.max_grad_norm", "0.1",
        "--data.num_train", "64", "--data.num_eval", "2", "--train.eval_every", "0", "--train.progress", "false",
        "--train.max_steps", "4", "--train.save_every", "2", "--train.export_adapter", "true",
        "--grpo.ref_refresh_steps", "2", "--grpo.ref_mix_alpha", "1"]


def _run(*args, nproc=1):
    res = train_py("grpo", *args, env=ENV, timeout=300) if nproc == 1 else \
        torchrun_py("grpo", *args, nproc=nproc, env=ENV, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if "reward" in line]


@pytest.fixture(scope="module")
def one(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-one")
    _run(*GRPO, "--model.path", tiny, "--train.output_dir", str(out))
    return out


def test_two_processes_with_checkpointing_match_one(tiny, one, tmp_path):
    two = tmp_path / "two"
    res = _run(*GRPO, "--model.path", tiny, "--train.output_dir", str(two), "--model.gradient_checkpointing", "true",
               nproc=2)
    assert "world size 2" in res.stdout and "FSDP2 on" in res.stdout
    m1, m2 = _metrics(one), _metrics(two)
    assert len(m1) == len(m2) == 4
    assert max(m["kl"] for m in m1) > 1e-6  # not vacuous: the reference pass (adapters off) differs
    assert max(m["grad_norm"] for m in m1) > 0.1  # ... and the clip at 0.1 binds
    for a, b in zip(m1, m2):
        for k in ("reward", "loss", "kl", "grad_norm", "clip_frac", "entropy"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), k
    # The merged export: the same weights, and not the base's.
    f1, f2 = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    start = load_file(Path(tiny) / "model.safetensors")
    assert f1.keys() == f2.keys() and max((f1[k] - start[k]).abs().max().item() for k in start) > 1e-4
    for k in f1:
        torch.testing.assert_close(f2[k], f1[k], rtol=1e-4, atol=1e-6, msg=k)
    # The PEFT adapter export, gathered from the ranks' shards: every A and B whole.
    a1 = load_file(one / "final-adapter" / "adapter_model.safetensors")
    a2 = load_file(two / "final-adapter" / "adapter_model.safetensors")
    assert a1.keys() == a2.keys() and all(a1[k].shape == a2[k].shape for k in a1)
    for k in a1:
        torch.testing.assert_close(a2[k], a1[k], rtol=1e-4, atol=1e-6, msg=k)


def test_two_processes_resume_one_process_adapter_checkpoint(tiny, one, tmp_path):
    """The one-process run's step-2 checkpoint (adapters and their moments only) resumed on two
    ranks, each loading its shard of every A and B onto the base it loaded itself: the run ends
    where the uninterrupted one-process run did."""
    import shutil

    part = tmp_path / "part"
    part.mkdir()
    shutil.copytree(one / "checkpoints" / "step-2", part / "checkpoints" / "step-2")
    shutil.copy(one / "metrics.jsonl", part / "metrics.jsonl")
    res = _run(*GRPO, "--model.path", tiny, "--train.output_dir", str(part), nproc=2)
    assert "resumed from" in res.stdout and "at step 2" in res.stdout
    f1, f2 = load_file(one / "final" / "model.safetensors"), load_file(part / "final" / "model.safetensors")
    for k in f1:
        torch.testing.assert_close(f2[k], f1[k], rtol=1e-4, atol=1e-6, msg=k)
    assert [m["loss"] for m in _metrics(part)] == pytest.approx([m["loss"] for m in _metrics(one)], rel=1e-4,
                                                                abs=1e-7)
