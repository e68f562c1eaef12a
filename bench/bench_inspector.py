"""What the inspector's per-token records cost a GRPO step: the same tiny run with records kept
every step (`--train.token_records 2 --train.sample_every 1`: the most a run can ask for) and
with none (`--train.token_records 0`), alternated A B A B ... so that drifting machine load hits
both alike. Prints the median `time/step` of each run (its first step, which warms up, left
out) and the ratio.

    python bench/bench_inspector.py [--repeats 3] [--steps 20] [--model tests/assets/tiny-r1-sft]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def step_times(model: str, steps: int, records: int) -> list[float]:
    with tempfile.TemporaryDirectory() as out:
        args = [sys.executable, str(ROOT / "train.py"), "grpo", "--model.path", model, "--train.output_dir", out,
                "--train.max_steps", str(steps), "--train.eval_every", "0", "--train.save_every", "0",
                "--train.export", "false", "--train.progress", "false", "--train.sample_every", "1",
                "--train.token_records", str(records), "--rollout.group_size", "8", "--grpo.prompts_per_step", "8",
                "--grpo.micro_batch_size", "64", "--rollout.max_new_tokens", "40", "--grpo.beta", "0.04",
                "--data.num_eval", "1", "--data.num_train", "400"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
        res = subprocess.run(args, capture_output=True, text=True, env=env)
        if res.returncode:
            raise SystemExit(res.stderr[-3000:])
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        return [r["time/step"] for r in rows if "time/step" in r][1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--model", default=str(ROOT / "tests" / "assets" / "tiny-r1-sft"))
    a = p.parse_args()
    times = {0: [], 2: []}
    for _ in range(a.repeats):
        for records in (0, 2):
            times[records].append(statistics.median(step_times(a.model, a.steps, records)))
    print("| token_records | median time/step per run (s) | median of runs (s) |")
    print("| --- | --- | --- |")
    for k, ts in times.items():
        print(f"| {k} | {', '.join(f'{t:.4f}' for t in ts)} | {statistics.median(ts):.4f} |")
    print(f"\nwith records / without: {statistics.median(times[2]) / statistics.median(times[0]):.3f}")


if __name__ == "__main__":
    main()
