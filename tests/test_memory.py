"""The start-up memory estimate (model/memory.py): its arithmetic against a hand computation, and
settings that cannot fit refused in one line before anything generates.

Measured against reality (peak RSS minus the RSS of the process once torch and transformers
are imported, over the initial evaluation and one GRPO step on a 2-core CPU, beta 0.04, float32,
evaluation on 8 prompts):
- embedded tiny model, 4 prompts x group_size 64, max_new_tokens 128, micro_batch_size 32:
  estimate 267 MB, measured 455 MB (the update's allocator slack, at this size);
- the same with group_size 256 (the KV cache the largest part): estimate 541 MB, measured 721 MB;
- SmolLM2-135M-Instruct, 2 prompts x group_size 8, max_new_tokens 64, micro_batch_size 8:
  estimate 4.0 GB, measured 3.2 GB.
One packed forward and backward alone (SmolLM2-135M shapes, a 150-token prompt and 8 or 16
completions of 128 tokens): estimate 2.6 / 4.3 GB, measured 2.2 / 4.0 GB; with gradient
checkpointing 1.06 / 1.40 GB, measured 1.15 / 1.63 GB.
"""
import os
from pathlib import Path

import pytest
import torch

from r1train.data.tiny import build_tiny_model
from r1train.model.memory import (
    ROW_BYTES,
    SAMPLING_BYTES,
    MemoryEstimate,
    ModelShape,
    available_memory,
    check_memory,
    estimate_memory,
    packed_micro_tokens,
)
from r1train.run.config import ConfigError

from launch import train_py

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

# 1,000 float32 parameters; 2 layers of hidden 8, MLP 16, 2 KV heads of 4 dims; 10 words.
SHAPE = ModelShape(params=1000, param_bytes=4, layers=2, hidden=8, intermediate=16, kv_heads=2, head_dim=4,
                   vocab=10)
ROWS = dict(gen_rows=6, prompt_tokens=5, new_tokens=3, compute_bytes=4, step_rows=6, micro_tokens=20)


def test_the_estimate_is_the_hand_computation():
    assert (SAMPLING_BYTES, ROW_BYTES) == (24, 24)
    est = estimate_memory(SHAPE, reference=True, **ROWS)
    # weights 1000 * 4 = 4000, the reference as much, AdamW two moments 8000; the batch
    # 6 rows * (5 + 3) positions * 40 bytes = 1920
    assert (est.weights, est.reference, est.optimizer, est.batch) == (4000, 4000, 8000, 1920)
    # KV cache: keys and values of 2 layers * 2 heads * 4 dims * 4 bytes = 128 bytes a position,
    # plus 24 of row bookkeeping, * 6 rows * 8 positions = 7296; sampling 6 rows * 10 words * 24
    assert est.generation == {"KV cache": 7296, "sampling": 1440}
    # activations (12 * 8 + 3 * 16 + 4 * 2 * 4) * 4 bytes = 704 a token and layer, * 2 layers *
    # 20 tokens = 28160; the log-prob tile 20 tokens * 10 words * 8 bytes = 1600
    assert est.update == {"gradients": 4000, "activations": 28160, "log-prob tile": 1600}
    # 4000 + 4000 + 8000 + 1920 + the larger phase, the update's 33760
    assert est.total == 51680

    # Gradient checkpointing: 4 hidden vectors per layer (4 * 2 * 8 * 4 = 256) and one layer (704)
    ckpt = estimate_memory(SHAPE, gradient_checkpointing=True, **ROWS)
    assert ckpt.update["activations"] == 20 * (256 + 704) and ckpt.reference == 0
    # FSDP over 2 ranks: each holds half of the weights, moments and gradients; generation
    # gathers the whole policy in the compute dtype (1000 * 4)
    fsdp = estimate_memory(SHAPE, reference=True, world_size=2, sharded=True, **ROWS)
    assert (fsdp.weights, fsdp.reference, fsdp.optimizer, fsdp.update["gradients"]) == (2000, 2000, 4000, 2000)
    assert fsdp.generation["gathered weights"] == 4000
    # Generation only (rejection sampling): no optimizer, batch or update
    gen = estimate_memory(SHAPE, train=False, **ROWS)
    assert gen.total == 4000 + 7296 + 1440 and gen.update == {}


def test_with_lora_adam_and_gradients_count_the_adapters_only():
    from dataclasses import replace
    est = estimate_memory(replace(SHAPE, trainable=50), reference=False, **ROWS)
    # the weights all stay (1000 * 4 = 4000); AdamW 2 * 50 * 4 = 400, gradients 50 * 4 = 200
    assert (est.weights, est.optimizer, est.update["gradients"]) == (4000, 400, 200)


def test_the_shape_of_a_model_counts_what_trains(tmp_path):
    from transformers import AutoModelForCausalLM

    from r1train.model.lora import apply_lora, lora_parameters
    lm = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "tiny"))
    full = ModelShape.of(lm)
    assert full.trainable == full.params
    apply_lora(lm, rank=4, alpha=16)
    lora = ModelShape.of(lm)
    assert lora.trainable == sum(p.numel() for p in lora_parameters(lm)) == lora.params - full.params


def test_micro_batch_tokens():
    # 8 completions of a group of 8: its prompt once (at most one more when they straddle two)
    assert packed_micro_tokens(8, 8, 100, 50) == 8 * 50 + 2 * 100
    assert packed_micro_tokens(8, 2, 100, 50) == 8 * 50 + 5 * 100
    assert packed_micro_tokens(8, 8, 100, 50, packing=False) == 8 * 150
    assert packed_micro_tokens(8, 8, 100, 50, micro_batch_tokens=1000) == 1000
    assert packed_micro_tokens(8, 8, 100, 50, micro_batch_tokens=64) == 150  # a long one alone


def test_check_refuses_naming_the_largest_parts_options_and_prints_otherwise():
    est = MemoryEstimate(weights=1e9, generation={"KV cache": 30e9, "sampling": 1e9},
                         update={"activations": 2e9}, held=1e9)
    advice = {"generation": "lower --rollout.group_size", "update": "lower --grpo.micro_batch_size",
              "weights": "use a smaller model"}
    with pytest.raises(ConfigError) as e:
        check_memory(est, 20e9, "grpo", advice)
    assert str(e.value) == (
        "[grpo] these settings need about 32.0 GB of memory and 21.0 GB is available: weights 1.0 GB + the larger "
        "of generation (KV cache 30.0 GB + sampling 1.0 GB) or update (activations 2.0 GB) = 32.0 GB. The "
        "generation is the largest part: lower --rollout.group_size")
    lines = []
    check_memory(est, 40e9, "grpo", advice, say=lines.append)
    assert lines == ["[grpo] memory estimate per process: weights 1.0 GB + the larger of generation (KV cache "
                     "30.0 GB + sampling 1.0 GB) or update (activations 2.0 GB) = 32.0 GB; 41.0 GB available"]
    check_memory(est, None, "grpo", advice)  # free memory unknown: not checked
    with pytest.raises(ConfigError, match=r"need about 64\.0 GB .* for each of 2 processes"):
        check_memory(est, 40e9, "grpo", advice, processes=2)  # two CPU ranks share the host


def _refused(res, option):
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    line = res.stderr.strip()
    assert len(line.splitlines()) == 1 and " these settings need about " in line, line
    assert "KV cache" in line and f"lower {option}" in line, line
    return line


# Without a reading of free memory the check is skipped, and these runs would really try.
needs_free_memory = pytest.mark.skipif(available_memory(torch.device("cpu")) is None,
                                       reason="free memory unknown here (no /proc/meminfo)")


@needs_free_memory
def test_a_huge_group_size_is_refused_in_one_line_before_anything_generates(tiny, tmp_path):
    args = ["--model.path", tiny, "--grpo.prompts_per_step", "2", "--grpo.micro_batch_size", "2",
            "--rollout.max_new_tokens", "8", "--grpo.beta", "0", "--data.num_train", "16", "--data.num_eval", "2",
            "--train.progress", "false", "--train.export", "false", "--optim.warmup_steps", "0"]
    out = tmp_path / "run"
    res = train_py("grpo", *args, "--rollout.group_size", "100000", "--train.output_dir", out, env=ENV)
    assert _refused(res, "--rollout.group_size").startswith("error: [grpo] these settings need about ")
    assert "eval step" not in res.stdout and not (out / "metrics.jsonl").exists()

    res = train_py("grpo", *args, "--rollout.group_size", "2", "--train.max_steps", "1", "--train.output_dir", out,
                   env=ENV)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.count("[grpo] memory estimate per process: weights ") == 1


@needs_free_memory
def test_rejection_sampling_shares_the_check(tiny, tmp_path):
    res = train_py("rejection-sample", "--model.path", tiny, "--train.output_dir", tmp_path / "rs",
                   "--data.num_train", "8", "--sampling.samples_per_prompt", "1000000", env=ENV)
    assert _refused(res, "--sampling.samples_per_prompt").startswith("error: [rejection] these settings")


MAPPED_PROBE = r"""
import ctypes, sys
import torch
from r1train.model.memory import set_mmap_threshold

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
print("set", set_mmap_threshold(int(sys.argv[1])))
big = torch.ones(16 << 20, dtype=torch.uint8)  # mapped (over glibc's first threshold), then freed:
del big                                        # glibc's sliding threshold becomes 16 MiB
before = libc.mallinfo2().hblks
buf = torch.ones(2 << 20, dtype=torch.uint8)
print("mapped", libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(not hasattr(__import__("ctypes").CDLL(None), "mallinfo2"), reason="needs glibc >= 2.33")
@pytest.mark.parametrize("threshold, env, mapped", [
    (1 << 20, {}, 1),  # a 2 MiB buffer gets its own mapping: freed, it goes back to the system
    (0, {}, 0),  # glibc's sliding threshold: the 2 MiB buffer comes from the heap
    (1 << 20, {"MALLOC_MMAP_THRESHOLD_": str(32 << 20)}, 0),  # the environment's choice is kept
])
def test_the_mmap_threshold_maps_large_buffers_on_their_own(threshold, env, mapped):
    """train.malloc_mmap_threshold (model/memory.py): after a 16 MiB buffer was freed, a 2 MiB one
    is mapped on its own (mallinfo2's mapped-chunk count goes up by one) with the 1 MiB default,
    and comes from the heap with glibc's own sliding threshold or where MALLOC_MMAP_THRESHOLD_
    is set."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-c", MAPPED_PROBE, str(threshold)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"set {threshold > 0 and not env}" in res.stdout
    assert f"mapped {mapped}" in res.stdout, res.stdout


def test_the_mmap_threshold_option_is_checked():
    from r1train.grpo.config import GRPOJobConfig
    from r1train.run.config import parse_args

    for value in ("-1", str((32 << 20) + 1)):
        with pytest.raises(ConfigError, match=r"--train[.]malloc_mmap_threshold.*32 MiB"):
            parse_args(GRPOJobConfig, ["--train.malloc_mmap_threshold", value])
    assert parse_args(GRPOJobConfig, ["--train.malloc_mmap_threshold", "0"]).train.malloc_mmap_threshold == 0
