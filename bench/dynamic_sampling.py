"""Held-out accuracy of the main job's GRPO stage with and without DAPO dynamic sampling.

Both runs start from the main job's SFT export (tests/assets/tiny-r1-sft, what `python train.py`
trains in its first stage) and run the recipe's GRPO stage (configs/tiny-r1.yaml) with the same
seed, evaluated every `--eval-every` steps on the recipe's 200 held-out problems; the only
difference is `--grpo.dynamic_sampling` (and its cap). Prints one table: held-out accuracy per
evaluation, then the mean share of zero-signal groups in the trained batch, generation rounds per
step and wall time.

    python bench/dynamic_sampling.py [--steps 100] [--eval-every 10] [--seeds 0] [--out /tmp/ds]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SFT_MODEL = ROOT / "tests" / "assets" / "tiny-r1-sft"


def run(out: Path, seed: int, steps: int, eval_every: int, dynamic: bool, rounds: int) -> tuple[list[dict], float]:
    """One pipeline run whose SFT stage is marked done (its export is the committed one)."""
    (out / "sft").mkdir(parents=True, exist_ok=True)
    (out / "sft" / "stage.json").write_text(json.dumps(
        {"stage": "sft", "command": "sft", "model": str(SFT_MODEL), "wall_time_s": 0.0}))
    args = [sys.executable, str(ROOT / "train.py"), "--output_dir", str(out),
            "--grpo.train.max_steps", str(steps), "--grpo.train.eval_every", str(eval_every),
            "--grpo.train.save_every", "0", "--grpo.train.seed", str(seed), "--grpo.train.progress", "false"]
    if dynamic:
        args += ["--grpo.grpo.dynamic_sampling", "true", "--grpo.grpo.max_generation_rounds", str(rounds)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    res = subprocess.run(args, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(res.stdout[-2000:] + res.stderr[-3000:])
    rows = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    return rows, time.time() - t0


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--seeds", default="0", help="comma-separated")
    p.add_argument("--rounds", type=int, default=4, help="--grpo.max_generation_rounds")
    p.add_argument("--out", default="/tmp/dynamic-sampling-bench")
    a = p.parse_args()
    results = {}
    for seed in map(int, a.seeds.split(",")):
        for dynamic in (False, True):
            name = f"{'dynamic' if dynamic else 'plain'}-seed{seed}"
            rows, wall = run(Path(a.out) / name, seed, a.steps, a.eval_every, dynamic, a.rounds)
            results[name] = (rows, wall)
            print(f"[bench] {name}: {wall:.0f} s", flush=True)
    names = list(results)
    steps = sorted({r["step"] for rows, _ in results.values() for r in rows if "eval/accuracy" in r})
    print("\n| step | " + " | ".join(names) + " |")
    print("| --- |" + " --- |" * len(names))
    for s in steps:
        cells = []
        for n in names:
            acc = [r["eval/accuracy"] for r in results[n][0] if r["step"] == s and "eval/accuracy" in r]
            cells.append(f"{acc[-1]:.3f}" if acc else "")
        print(f"| {s} | " + " | ".join(cells) + " |")
    train = {n: [r for r in rows if "reward" in r] for n, (rows, _) in results.items()}
    lines = (("zero-signal share of trained groups (mean)", lambda rs: mean([r["frac_reward_zero_std"] for r in rs])),
             ("steps with a zero-signal group", lambda rs: sum(r["frac_reward_zero_std"] > 0 for r in rs)),
             ("generation rounds per step (mean)", lambda rs: mean([r.get("dynamic/rounds", 1.0) for r in rs])),
             ("train accuracy/mean, last 10 steps", lambda rs: mean([r["accuracy/mean"] for r in rs[-10:]])))
    for label, f in lines:
        print(f"| {label} | " + " | ".join(f"{f(train[n]):.3g}" for n in names) + " |")
    print("| wall time (s) | " + " | ".join(f"{results[n][1]:.0f}" for n in names) + " |")


if __name__ == "__main__":
    main()
