"""Logged GRPO reward statistics, hand-worked, with rows on which every reward abstained."""
import math

import pytest
import torch

from r1train.grpo.metrics import reward_metrics, update_metrics

NAN = math.nan


def _metrics(per_fn_rows: list[list[float]], weights: list[float], names: list[str], G: int):
    """reward_metrics on rows as the trainer builds them (total reward 0.0 where all abstain)."""
    per_fn = torch.tensor(per_fn_rows, dtype=torch.float64)  # [N, F]
    totals = [sum(w * v for w, v in zip(weights, vals) if not math.isnan(v)) for vals in per_fn_rows]
    n = len(per_fn_rows)
    return reward_metrics(per_fn, torch.tensor(totals, dtype=torch.float64), torch.full((n,), 3.0),
                          torch.zeros(n, dtype=torch.bool), names, G)


def test_reward_statistics_skip_rows_without_any_opinion():
    # G = 4, one reward (accuracy). Group A: [1, 1, 1, 0]; group B: [1, 0, -, -]; group C:
    # every row abstains (an unparseable gold, say).
    #   reward: mean over the 6 valid rows = (3 + 1) / 6 = 2/3 (the 6 placeholders would give 1/3)
    #   group stds (unbiased): A: mean 3/4, sum of squares 3 * 1/16 + 9/16 = 3/4, var 3/4 / 3
    #     = 1/4, std 1/2; B: [1, 0] -> var 1/2, std sqrt(1/2); C: fewer than 2 valid -> 0
    #   reward_std = (1/2 + sqrt(1/2) + 0) / 3
    #   frac_reward_zero_std: only C has no signal -> 1/3 (B has two different valid rewards)
    m = _metrics([[1], [1], [1], [0], [1], [0], [NAN], [NAN], [NAN], [NAN], [NAN], [NAN]],
                 [1.0], ["accuracy"], G=4)
    assert m["reward"] == pytest.approx(2 / 3)
    assert m["reward_std"] == pytest.approx((0.5 + math.sqrt(0.5)) / 3)
    assert m["frac_reward_zero_std"] == pytest.approx(1 / 3)
    assert m["accuracy/mean"] == pytest.approx(4 / 6)


def test_one_opinion_is_enough_for_a_row_to_count():
    # Two rewards, weights 1 and 0.5. Rows: (1, -) -> 1; (-, 1) -> 0.5; (0, 0) -> 0;
    # (-, -) -> abstains. One group of 4: valid totals [1, 0.5, 0]: mean 1/2, var
    # ((1/2)^2 + 0 + (1/2)^2) / 2 = 1/4, std 1/2.
    m = _metrics([[1, NAN], [NAN, 1], [0, 0], [NAN, NAN]], [1.0, 0.5], ["accuracy", "format"],
                 G=4)
    assert m["reward"] == pytest.approx(0.5)
    assert m["reward_std"] == pytest.approx(0.5)
    assert m["frac_reward_zero_std"] == 0.0
    assert m["accuracy/mean"] == pytest.approx(0.5) and m["format/mean"] == pytest.approx(0.5)


def test_no_valid_row_at_all_gives_nan_reward_not_zero():
    m = _metrics([[NAN]] * 4, [1.0], ["accuracy"], G=4)
    assert math.isnan(m["reward"]) and m["reward_std"] == 0.0 and m["frac_reward_zero_std"] == 1.0
    assert torch.isnan(torch.tensor(m["accuracy/mean"]))


def test_update_metrics_sum_the_loss_and_average_the_means():
    # One process: the loss is the whole step's (each rank would hold a share of it and the
    # shares add up); the per-token statistics are means, averaged over ranks (here one).
    m = update_metrics({"loss": -0.25, "kl": 0.5, "clip_frac": 0.1, "clip_frac_low": 0.05,
                        "clip_frac_high": 0.05, "ratio_mean": 1.0, "entropy": 2.0}, world_size=1)
    assert m["loss"] == -0.25 and m["kl"] == 0.5 and m["entropy"] == 2.0
