"""pass@k and maj@k held-out evaluation (`--eval.samples k`, r1train/evaluate.py).

The estimator against brute-force enumeration of every k-subset of the n samples, in exact
fractions (Chen et al. 2021, Eq. 1 is the expectation over those subsets); the vote against a
hand count; the evaluation of a scripted engine against both, also split over batches, and
under torchrun on 2 processes equal to 1; the options refused naming themselves; the pipeline's
results table. tests/test_grpo_trainer.py runs the tiny model with --eval.samples (1 and 2
processes, and a resume)."""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from r1train.evaluate import evaluate, final_answer, majority_vote, pass_at_k, sample_seed
from r1train.grpo.config import GRPOJobConfig
from r1train.pipeline.report import results_table
from r1train.run.config import ConfigError, parse_args
from r1train.run.dist import DistInfo
from r1train.sft.distill import DistillJobConfig
from r1train.sft.trainer import SFTJobConfig

from eval_worker import BATCH, PROBLEMS, SAMPLES, VOTES, ScriptedEngine, prompt_ids, records, run

ROOT = Path(__file__).resolve().parents[1]
ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def enumerated_pass_at_k(n: int, c: int, k: int) -> Fraction:
    """The share of the k-subsets of n samples (the first c correct) holding a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(s < c for s in subset) for subset in subsets), len(subsets))


def test_pass_at_k_a_case_by_hand():
    # n = 5 samples, c = 2 correct, k = 2: of the C(5, 2) = 10 pairs, C(3, 2) = 3 hold only wrong
    # samples, so pass@2 = 1 - 3/10 = 0.7.
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7, abs=1e-15)
    assert pass_at_k(5, 0, 3) == 0.0 and pass_at_k(5, 3, 3) == 1.0  # n - c < k: every triple holds one
    assert pass_at_k(4, 1, 1) == 0.25  # pass@1 is c / n


def test_pass_at_k_equals_enumeration_over_all_subsets():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = enumerated_pass_at_k(n, c, k)
                assert pass_at_k(n, c, k) == pytest.approx(float(exact), abs=1e-14), (n, c, k)


def test_pass_at_k_stays_accurate_where_the_binomials_overflow():
    # C(400, 200) ~ 1e119 is past float64's exact integers; the product form never forms it.
    for n, c, k in ((400, 3, 200), (400, 100, 10), (1000, 1, 999)):
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(3, 4, 1), (3, -1, 1), (3, 1, 0), (3, 1, 4)])
def test_pass_at_k_refuses_impossible_counts(n, c, k):
    with pytest.raises(ValueError, match="pass_at_k needs"):
        pass_at_k(n, c, k)


def hand_vote(answers):
    """Count each answer's votes by hand; the most votes win, a tie goes to the answer seen first."""
    best, best_count = None, 0
    for j, a in enumerate(answers):
        if a is None or a in answers[:j]:
            continue  # no vote, or an answer counted already at its first sample
        count = sum(1 for b in answers if b == a)
        if count > best_count:
            best, best_count = j, count
    return best


def test_majority_vote_against_a_hand_count():
    assert majority_vote(["18", "7", "18", None]) == 0
    assert majority_vote(["7", "18", "18", "7"]) == 0  # a tie: 7 came first
    assert majority_vote([None, "7", "18", "18"]) == 2  # the first sample of the winning answer
    assert majority_vote([None, None]) is None and majority_vote([]) is None
    assert majority_vote([None, "5", None]) == 1  # one vote is a majority of the votes cast
    rng = random.Random(0)
    for _ in range(2000):
        answers = [rng.choice(["1", "2", "3", None]) for _ in range(rng.randint(0, 9))]
        assert majority_vote(answers) == hand_vote(answers), answers


@pytest.mark.parametrize("completion, answer", [
    ("<think>a</think><answer>18</answer>", "18"),
    ("<answer> 18.00 </answer>", "18"),
    ("<answer>1,000</answer>", "1000"),
    ("<answer>\\boxed{18}</answer>", "18"),
    ("<answer>$18$</answer>", "18"),
    ("<answer>-0.0</answer>", "0"),
    ("<answer>1e2</answer>", "1e2"),  # not a plain number: the string, as written
    ("<answer> x + 1 </answer>", "x+1"),
    ("<answer>$\\frac{1}{2}$</answer>", "\\frac{1}{2}"),
    ("<answer>the value is \\boxed{\\frac{1}{2}}</answer>", "\\frac{1}{2}"),
    ("no tags, so \\boxed{\\frac{3}{4}} and then \\boxed{7}", "7"),  # the last box
    ("no tags, the answer is 7", None),  # untagged and unboxed: no vote
    ("<answer></answer>", None),
    ("", None),
    ("<answer>\\boxed{12</answer>", "\\boxed{12"),  # an unclosed box: the span as written
])
def test_final_answer_normalizes_what_the_accuracy_reward_reads(completion, answer):
    assert final_answer(completion) == answer


def expected_from_log(log: list[tuple[int, int, str]]) -> dict:
    """pass@m by enumeration and maj@k by hand, from the scripted engine's (problem, seed, kind)."""
    kinds = {i: [kind for p, _, kind in log if p == i] for i in range(PROBLEMS)}
    assert all(len(v) == SAMPLES for v in kinds.values())
    out = {}
    for m in range(1, SAMPLES + 1):
        # enumeration with the correct samples first: only their count matters
        out[f"pass@{m}"] = float(sum(enumerated_pass_at_k(SAMPLES, v.count("right"), m)
                                     for v in kinds.values()) / PROBLEMS)
    votes = [[VOTES[k] for k in v] for v in kinds.values()]
    won = [hand_vote(v) for v in votes]
    out[f"maj@{SAMPLES}"] = sum(w is not None and v[w] == "gold" for v, w in zip(votes, won)) / PROBLEMS
    out["accuracy"] = sum(v.count("right") for v in kinds.values()) / (PROBLEMS * SAMPLES)
    out["format"] = sum(v.count("right") + v.count("wrong_a") + v.count("wrong_b")
                        for v in kinds.values()) / (PROBLEMS * SAMPLES)
    return out


def test_k_samples_per_problem_scored_against_enumeration_and_a_hand_count():
    engine = ScriptedEngine()
    result = run(engine, ONE)
    expected = expected_from_log(engine.log)
    for name, value in expected.items():
        assert result[name] == pytest.approx(value, abs=1e-12), name
    assert result["num_problems"] == PROBLEMS
    # Not vacuous: problems differ, some votes win with a wrong answer, some with none cast.
    assert 0 < expected["pass@1"] < expected[f"pass@{SAMPLES}"] < 1
    assert 0 < expected[f"maj@{SAMPLES}"] < 1
    # Each sample has its own seed, a function of (seed, problem, sample) alone.
    seeds = [s for _, s, _ in engine.log]
    assert len(set(seeds)) == PROBLEMS * SAMPLES
    assert sorted(seeds) == sorted(sample_seed(5, i, j) for i in range(PROBLEMS) for j in range(SAMPLES))
    # The completions come back in problem order, k per problem, each with its sample index.
    rows = result["samples"]
    assert [(r["problem"], r["sample"]) for r in rows] == \
        [(f"p{i}", j) for i in range(PROBLEMS) for j in range(SAMPLES)]


def test_batches_that_split_a_problems_samples_change_nothing():
    base = run(ScriptedEngine(), ONE)
    for batch_size in (1, 2, 64):
        other = evaluate(ScriptedEngine(), records(), prompt_ids(), ONE, max_new_tokens=8,
                         batch_size=batch_size, temperature=0.6, seed=5, samples=SAMPLES,
                         return_samples=PROBLEMS)
        assert other == base, batch_size
    assert BATCH % SAMPLES  # the worker's own batches cut through problems too


def test_one_sample_keeps_todays_evaluation():
    """k = 1: no pass@/maj@ entries, the seeds and batches of the single-sample evaluation, and
    the completions without a sample index."""
    engine = ScriptedEngine()
    result = evaluate(engine, records(), prompt_ids(), ONE, max_new_tokens=8, batch_size=3,
                      temperature=0.6, seed=5, return_samples=PROBLEMS)
    assert sorted(result) == ["accuracy", "accuracy_se", "format", "mean_length", "num_problems", "samples", "scores"]
    assert [s for _, s, _ in engine.log] == [5 * 1_000_003 + i for i in range(PROBLEMS)]
    assert result["num_problems"] == PROBLEMS and "sample" not in result["samples"][0]


def test_two_processes_evaluate_as_one(tmp_path):
    """torchrun, 2 ranks (gloo): rank 0 holds problems 0, 2, 4, 6 and rank 1 the others, rank 1
    idles through the last batches; every number and completion equals one process's."""
    out = tmp_path / "two.json"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          str(ROOT / "tests" / "eval_worker.py"), str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    two = json.loads(out.read_text())
    one = json.loads(json.dumps(run(ScriptedEngine(), ONE)))
    assert two == one


@pytest.mark.parametrize("config", [GRPOJobConfig, SFTJobConfig, DistillJobConfig])
@pytest.mark.parametrize("args, option", [
    (["--eval.samples", "0"], "eval.samples"),
    (["--eval.samples", "-2"], "eval.samples"),
    (["--eval.samples", "4", "--eval.temperature", "0"], "eval.temperature"),
    (["--eval.samples", "4", "--eval.temperature", "nan"], "eval.temperature"),
])
def test_bad_values_are_refused_naming_the_option(config, args, option):
    extra = ["--distill.teacher", "t"] if config is DistillJobConfig else []
    with pytest.raises(ConfigError, match=f"^--{option.replace('.', '[.]')}="):
        parse_args(config, [*args, *extra])


def test_two_eval_temperatures_are_refused_naming_both():
    both = r"--rollout\.eval_temperature=0\.7: .*--eval\.samples 4.*--eval\.temperature"
    with pytest.raises(ConfigError, match=both):
        parse_args(GRPOJobConfig, ["--eval.samples", "4", "--rollout.eval_temperature", "0.7"])
    cfg = parse_args(GRPOJobConfig, ["--eval.samples", "4", "--eval.temperature", "1.0"])
    assert (cfg.eval.samples, cfg.eval.temperature) == (4, 1.0)
    assert parse_args(GRPOJobConfig, ["--rollout.eval_temperature", "0.7"]).eval.samples == 1


def test_help_and_recipes_know_the_section(tmp_path, capsys):
    for config in (GRPOJobConfig, SFTJobConfig):  # what `train.py grpo --help` prints
        with pytest.raises(SystemExit):
            parse_args(config, ["--help"])
        printed = capsys.readouterr().out
        assert "--eval.samples (default: 1)" in printed and "--eval.temperature (default: 0.6)" in printed
    recipe = tmp_path / "r.yaml"
    recipe.write_text("eval:\n  samples: 8\n  temperature: 1.0\n")
    cfg = parse_args(SFTJobConfig, ["--recipe", str(recipe)])
    assert (cfg.eval.samples, cfg.eval.temperature) == (8, 1.0)


def test_results_table_adds_pass_and_maj_only_when_sampled():
    rows = [{"stage": "sft", "command": "sft", "accuracy": 0.25, "format": 0.5, "mean_length": 12.0,
             "wall_time_s": 3.0, "initial": {"accuracy": 0.0, "format": 0.0, "mean_length": 24.0}},
            {"stage": "grpo", "command": "grpo", "accuracy": 0.5, "format": 1.0, "mean_length": 30.0,
             "pass@1": 0.5, "pass@2": 0.625, "maj@2": 0.5, "wall_time_s": 9.0}]
    plain = results_table([{k: v for k, v in r.items() if not k.startswith(("pass@", "maj@"))} for r in rows])
    head = ["stage", "accuracy", "±", "SE", "problems", "gain", "±", "SE", "(points)", "format", "mean", "len"]
    assert plain.splitlines()[0].split() == [*head, "wall", "time"]
    table = results_table(rows).splitlines()
    assert table[0].split() == [*head, "pass@2", "maj@2", "wall", "time"]
    assert table[2].split()[-3:] == ["-", "-", "-"]  # before sft: evaluated once
    assert table[4].split() == ["grpo", "50.0%", "-", "-", "100.0%", "30.0", "62.5%", "50.0%", "9s"]
    assert len({len(line) for line in table}) == 1  # the columns line up


# ---- end to end: the committed cold-start model (47.5% greedy accuracy), right and wrong -------
TINY_SFT = ROOT / "tests" / "assets" / "tiny-r1-sft"
GRPO = ["grpo", "--model.path", str(TINY_SFT), "--rollout.group_size", "2", "--grpo.prompts_per_step", "2",
        "--grpo.micro_batch_size", "2", "--rollout.max_new_tokens", "40", "--grpo.beta", "0",
        "--train.max_steps", "1", "--train.eval_every", "0", "--data.num_eval", "7",
        "--data.task.max_operands", "3", "--data.task.max_value", "9", "--train.progress", "false",
        "--train.export", "false", "--train.save_every", "0", "--eval.samples", "4", "--eval.temperature", "1.0"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_grpo_run_with_eval_samples_writes_pass_and_maj_and_two_processes_match_one(tmp_path):
    """--eval.samples 4 on 7 held-out problems: metrics.jsonl holds eval/pass@1..4 and eval/maj@4,
    equal to enumeration and a hand count over the completions in eval_samples.jsonl (answers
    read with a regular expression here); 2 processes (4 and 3 problems) evaluate the step-0
    model as one does."""
    from launch import torchrun_py, train_py
    res = train_py(*GRPO, "--train.output_dir", str(tmp_path / "one"), env=ENV, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "pass@1" in res.stdout and "maj@4" in res.stdout  # the eval line says them too
    two = torchrun_py(*GRPO, "--train.output_dir", tmp_path / "two", env=ENV)
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]

    evals = {run: [m for m in _jsonl(tmp_path / run / "metrics.jsonl") if "eval/accuracy" in m]
             for run in ("one", "two")}
    first = evals["one"][0]
    assert [m["step"] for m in evals["one"]] == [0, 1] and evals["two"][0] == first
    names = ["accuracy", "accuracy_se", "format", "mean_length", "num_problems", "pass@1", "pass@2", "pass@3",
             "pass@4", "maj@4"]
    assert sorted(first) == sorted(["step", *(f"eval/{n}" for n in names)]) and first["eval/num_problems"] == 7
    assert sorted(evals["one"][1]) == sorted([*first, "eval/gain", "eval/gain_se"])  # since step 0

    samples = {run: [s for s in _jsonl(tmp_path / run / "eval_samples.jsonl") if s["step"] == 0]
               for run in ("one", "two")}
    assert samples["one"] == samples["two"] and len(samples["one"]) == 7 * 4
    by_problem: dict[str, list[dict]] = {}
    for s in samples["one"]:
        by_problem.setdefault(s["problem"], []).append(s)
    for m in range(1, 5):
        exact = sum(enumerated_pass_at_k(4, sum(s["accuracy"] == 1.0 for s in v), m) for v in by_problem.values())
        assert first[f"eval/pass@{m}"] == pytest.approx(float(exact / 7), abs=1e-12), m
    won = 0
    for v in by_problem.values():
        answers = [(re.findall(r"<answer>\s*(.*?)\s*</answer>", s["completion"]) or [None])[-1] for s in v]
        w = hand_vote(answers)
        won += w is not None and v[w]["accuracy"] == 1.0
    assert first["eval/maj@4"] == pytest.approx(won / 7, abs=1e-12)
    assert first["eval/accuracy"] == pytest.approx(sum(s["accuracy"] for s in samples["one"]) / 28, abs=1e-12)
    # The error bars from the same completions: a problem's score is the share of its 4 samples
    # that are right; SE = sample standard deviation / sqrt(7); the gain at step 1 paired by problem.
    def scores(step):
        rows = [s for s in _jsonl(tmp_path / "one" / "eval_samples.jsonl") if s["step"] == step]
        return [sum(s["accuracy"] == 1.0 for s in rows[4 * i:4 * i + 4]) / 4 for i in range(7)]
    assert first["eval/accuracy_se"] == pytest.approx(statistics.stdev(scores(0)) / math.sqrt(7), abs=1e-12)
    diffs = [b - a for a, b in zip(scores(0), scores(1))]
    assert evals["one"][1]["eval/gain"] == pytest.approx(statistics.fmean(diffs), abs=1e-12)
    assert evals["one"][1]["eval/gain_se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(7), abs=1e-12)
    # Not vacuous: right and wrong samples, problems solved by some samples only.
    assert 0 < first["eval/pass@1"] < first["eval/pass@4"] < 1 and 0 < first["eval/maj@4"] < 1


def test_sft_run_with_eval_samples(tmp_path):
    """SFT (and distill, its subclass) evaluates with the same option: k samples at --eval.temperature."""
    from launch import train_py
    out = tmp_path / "sft"
    res = train_py("sft", "--model.path", str(TINY_SFT), "--data.num_train", "16", "--data.num_eval", "4",
                   "--data.task.max_operands", "3", "--data.task.max_value", "9", "--sft.max_seq_len", "512",
                   "--sft.rows_per_step", "2", "--sft.eval_max_new_tokens", "40", "--train.max_steps", "1",
                   "--train.eval_every", "0", "--train.save_every", "0", "--train.export", "false",
                   "--train.progress", "false", "--eval.samples", "3", "--train.output_dir", str(out),
                   env=ENV, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    evals = [m for m in _jsonl(out / "metrics.jsonl") if "eval/accuracy" in m]
    assert [m["step"] for m in evals] == [0, 1]
    assert all({"eval/pass@1", "eval/pass@2", "eval/pass@3", "eval/maj@3"} <= set(m) for m in evals)
    assert len([s for s in _jsonl(out / "eval_samples.jsonl") if s["step"] == 0]) == 4 * 3
