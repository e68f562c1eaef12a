"""Accuracy-reward rates on the full GSM8K test, AIME 2024 and AMC 2023 files.

For every row, a completion `<think>...</think><answer>{gold}</answer>` must score 1.0 and the
same with a wrong number (gold + 1) must score 0.0. The gold is shown bare, in `$...$` and in
`\\boxed{}`; GSM8K is also scored with its worked solution as the only gold (`answer` empty,
`solution` ending in `#### N`). Each case runs with the in-process number fast path on (the
default) and off (everything through math_verify in the worker processes).

    python bench/reward_rates.py [--data-dir ../shared/data] [--show-failures 5]

Falls back to the committed samples in tests/assets when the data directory is missing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from r1train.rewards import AnswerChecker, get_accuracy_reward, pop_reward_metrics  # noqa: E402

FORMS = {"bare": "{}", "$...$": "${}$", "\\boxed{}": "\\boxed{{{}}}"}
THINK = "<think>Let me work through the problem step by step.</think>"


def load(data_dir: Path) -> dict[str, list[dict]]:
    """Rows per dataset with `gold` (what the loader puts in `answer`) and `solution`."""
    names = {"gsm8k_test": ("gsm8k_test.jsonl", "gsm8k_test_sample.jsonl"),
             "aime24": ("aime24.jsonl", "aime24_sample.jsonl"),
             "amc23": ("amc23.jsonl", "amc23_sample.jsonl")}
    out = {}
    for name, (full, sample) in names.items():
        path = data_dir / full
        if not path.exists():
            path = ROOT / "tests" / "assets" / sample
            print(f"[{name}] {data_dir / full} missing, using the sample {path}")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        for r in rows:
            if name == "gsm8k_test":
                r["gold"], r["solution"] = r["answer"].rsplit("####", 1)[1].strip(), r["answer"]
            elif name == "amc23":
                r["gold"], r["solution"] = f"{r['answer']:g}", ""
            else:
                r["gold"] = str(r["answer"])
        out[name] = rows
    return out


def wrong_number(gold: str) -> str:
    return str(int(gold.replace(",", "")) + 1)


def rates(reward, rows: list[dict], form: str, gold_column: str) -> tuple[float, float, list]:
    """(share of right completions scoring 1.0, share of wrong ones scoring 0.0, failures)."""
    template = FORMS[form]
    right = [f"{THINK}<answer>{template.format(r['gold'])}</answer>" for r in rows]
    wrong = [f"{THINK}<answer>{template.format(wrong_number(r['gold']))}</answer>" for r in rows]
    if gold_column == "answer":
        cols = {"answer": [r["gold"] for r in rows], "solution": [r["solution"] for r in rows]}
    else:
        cols = {"answer": [""] * len(rows), "solution": [r["solution"] for r in rows]}
    r_right, r_wrong = reward(right, **cols), reward(wrong, **cols)
    golds = [r["gold"] for r in rows]
    failures = [(c, g, v) for c, g, v in zip(right, golds, r_right) if v != 1.0]
    failures += [(c, g, v) for c, g, v in zip(wrong, golds, r_wrong) if v != 0.0]
    n = len(rows)
    return sum(v == 1.0 for v in r_right) / n, sum(v == 0.0 for v in r_wrong) / n, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT.parent / "shared" / "data",
                        help="folder with gsm8k_test.jsonl, aime24.jsonl, amc23.jsonl")
    parser.add_argument("--show-failures", type=int, default=3,
                        help="failing completions to print per case")
    args = parser.parse_args()
    data = load(args.data_dir)
    cases = [("gsm8k_test", form, "answer") for form in FORMS]
    cases += [("gsm8k_test", "bare", "solution")]
    cases += [(name, form, "answer") for name in ("aime24", "amc23") for form in FORMS]
    print(f"{'dataset':<11} {'rows':>5} {'gold from':<9} {'form':<9} {'fast path':<9} "
          f"{'right->1.0':>10} {'wrong->0.0':>10} {'s':>6}")
    worst = 1.0
    for fast_path in (True, False):
        reward = get_accuracy_reward(checker=AnswerChecker(fast_path=fast_path))
        for name, form, gold_column in cases:
            rows = data[name]
            start = time.perf_counter()
            ok, bad, failures = rates(reward, rows, form, gold_column)
            seconds = time.perf_counter() - start
            worst = min(worst, ok, bad)
            print(f"{name:<11} {len(rows):>5} {gold_column:<9} {form:<9} "
                  f"{'on' if fast_path else 'off':<9} {ok:>10.2%} {bad:>10.2%} {seconds:>6.2f}")
            for completion, gold, value in failures[:args.show_failures]:
                print(f"    scored {value}: gold {gold[-40:]!r}  completion "
                      f"{completion[len(THINK):]!r}")
    print(f"worst rate: {worst:.2%}  metrics: {pop_reward_metrics()}")


if __name__ == "__main__":
    main()
