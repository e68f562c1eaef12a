"""Error bars of held-out evaluations (r1train/evaluate.py `standard_error`, `paired_gain`).

The estimators against the textbook formulas written here with the statistics module, and
against simulation: over many simulated evaluations the standard error must be the spread of the
accuracy itself, and the paired gain's the spread of the gain. Then the evaluation of a scripted
engine (k samples a problem: the problems, not the samples, are the draws) and the pipeline's
table. tests/test_eval_passk.py checks a GRPO run's logged gain against its eval_samples.jsonl,
tests/test_grpo_trainer.py that a resume keeps it.
"""
from __future__ import annotations

import math
import random
import statistics

import pytest
import torch

from r1train.evaluate import evaluate, paired_gain, standard_error
from r1train.pipeline.report import results_table
from r1train.run.dist import DistInfo

from eval_worker import PROBLEMS, SAMPLES, ScriptedEngine, prompt_ids, records

ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def test_standard_error_is_the_sample_deviation_over_root_n():
    rng = random.Random(0)
    for n in (2, 3, 17, 400):
        xs = [rng.random() for _ in range(n)]
        assert standard_error(xs) == pytest.approx(statistics.stdev(xs) / math.sqrt(n), rel=1e-12)
        bits = [float(rng.random() < 0.3) for _ in range(n)]
        p = sum(bits) / n
        assert standard_error(bits) == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), rel=1e-12, abs=1e-15)
    assert standard_error([]) == standard_error([1.0]) == 0.0
    assert standard_error([0.0] * 50) == standard_error([1.0] * 50) == 0.0


def test_standard_error_is_the_spread_of_the_accuracy_over_repeated_evaluations():
    """2,000 simulated evaluations of 200 problems, each solved with probability 0.3: the
    accuracies spread by sqrt(0.3 * 0.7 / 200) = 3.24 points, and the standard error of one
    evaluation estimates that (a mistake by a factor sqrt(n), or of the variance for the
    deviation, is off by far more than the 5% allowed)."""
    rng = random.Random(1)
    n, p, runs = 200, 0.3, 2000
    accuracies, errors = [], []
    for _ in range(runs):
        bits = [float(rng.random() < p) for _ in range(n)]
        accuracies.append(sum(bits) / n)
        errors.append(standard_error(bits))
    truth = math.sqrt(p * (1 - p) / n)
    assert statistics.stdev(accuracies) == pytest.approx(truth, rel=0.05)
    assert statistics.fmean(errors) == pytest.approx(truth, rel=0.05)


def test_paired_gain_is_the_mean_difference_with_the_paired_standard_error():
    rng = random.Random(2)
    before = [float(rng.random() < 0.4) for _ in range(300)]
    # The trained model keeps most of what it solved and solves some more: correlated scores.
    after = [1.0 if b or rng.random() < 0.25 else 0.0 for b in before]
    after = [0.0 if a and rng.random() < 0.05 else a for a in after]
    gain, se = paired_gain(before, after)
    n = len(before)
    assert gain == pytest.approx(statistics.fmean(after) - statistics.fmean(before), abs=1e-12)
    # Var(after - before) = Var(after) + Var(before) - 2 Cov(before, after), over n
    var = statistics.variance(after) + statistics.variance(before) - 2 * statistics.covariance(before, after)
    assert se == pytest.approx(math.sqrt(var / n), rel=1e-9)
    unpaired = math.sqrt(standard_error(before) ** 2 + standard_error(after) ** 2)
    assert se < 0.8 * unpaired  # pairing removes the problems both got right (or wrong)
    assert paired_gain(before, before) == (0.0, 0.0)
    with pytest.raises(ValueError, match="same problems: 300 scores before, 299 after"):
        paired_gain(before, after[:-1])


def test_paired_standard_error_is_the_spread_of_the_gain_over_repeated_evaluations():
    """Problems of varied difficulty (each solved with its own probability, before and after a
    shift of +0.1): over 2,000 simulated pairs of evaluations the gains spread as the paired
    standard error says, well below the unpaired one."""
    rng = random.Random(3)
    n, runs = 150, 2000
    difficulty = [rng.random() for _ in range(n)]
    gains, errors = [], []
    for _ in range(runs):
        u = [rng.random() for _ in range(n)]  # one draw a problem: the two models share its luck
        before = [float(x < d) for x, d in zip(u, difficulty)]
        after = [float(x < min(d + 0.1, 1.0)) for x, d in zip(u, difficulty)]
        g, se = paired_gain(before, after)
        gains.append(g)
        errors.append(se)
    assert statistics.fmean(errors) == pytest.approx(statistics.stdev(gains), rel=0.05)


def test_evaluate_reports_per_problem_scores_and_their_standard_error():
    """k = 4 samples a problem (the scripted engine's right and wrong answers): `scores` are the
    share of each problem's samples that are right, in problem order, and the standard error is
    over the 7 problems, not over the 28 samples."""
    engine = ScriptedEngine()
    res = evaluate(engine, records(), prompt_ids(), ONE, max_new_tokens=8, batch_size=3, temperature=0.6,
                   seed=5, samples=SAMPLES, return_samples=PROBLEMS)
    by_problem = [res["samples"][SAMPLES * i:SAMPLES * (i + 1)] for i in range(PROBLEMS)]
    assert all(s["problem"] == f"p{i}" for i, rows in enumerate(by_problem) for s in rows)
    scores = [sum(s["accuracy"] == 1.0 for s in rows) / SAMPLES for rows in by_problem]
    assert res["scores"] == scores and len(set(scores)) > 1  # problems solved by some of their samples
    assert res["accuracy"] == pytest.approx(statistics.fmean(scores), abs=1e-12)
    assert res["accuracy_se"] == pytest.approx(statistics.stdev(scores) / math.sqrt(PROBLEMS), abs=1e-12)
    per_sample = [float(s["accuracy"] == 1.0) for s in res["samples"]]
    assert res["accuracy_se"] != pytest.approx(standard_error(per_sample), rel=0.01)

    one = evaluate(ScriptedEngine(), records(), prompt_ids(), ONE, max_new_tokens=8, batch_size=3,
                   temperature=0.6, seed=5, return_samples=PROBLEMS)
    bits = [float(s["accuracy"] == 1.0) for s in one["samples"]]
    assert one["scores"] == bits and one["accuracy_se"] == pytest.approx(standard_error(bits), abs=1e-15)


def test_results_table_shows_the_standard_error_the_problems_and_the_gain():
    rows = [{"stage": "sft", "command": "sft", "accuracy": 0.31, "accuracy_se": 0.0231, "num_problems": 400,
             "format": 1.0, "mean_length": 22.0, "gain": 0.31, "gain_se": 0.0231, "wall_time_s": 700.0,
             "initial": {"accuracy": 0.0, "accuracy_se": 0.0, "num_problems": 400, "format": 0.0,
                         "mean_length": 25.0}},
            {"stage": "grpo", "command": "grpo", "accuracy": 0.443, "accuracy_se": 0.0248, "num_problems": 400,
             "format": 0.995, "mean_length": 21.5, "gain": 0.133, "gain_se": 0.0211, "wall_time_s": 1000.0}]
    table = results_table(rows).splitlines()
    assert table[2].split() == ["before", "sft", "0.0%", "±", "0.0", "400", "-", "0.0%", "25.0", "-"]
    assert table[3].split() == ["sft", "31.0%", "±", "2.3", "400", "+31.0", "±", "2.3", "(13.4", "SE)",
                                "100.0%", "22.0", "700s"]
    assert table[4].split() == ["grpo", "44.3%", "±", "2.5", "400", "+13.3", "±", "2.1", "(6.3", "SE)",
                                "99.5%", "21.5", "1000s"]
    assert len({len(line) for line in table}) == 1  # the columns line up
