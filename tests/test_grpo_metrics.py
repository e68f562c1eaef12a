"""Logged GRPO statistics, hand-worked: rewards, with rows on which every reward abstained, and the
update's per-token means over micro-batches and ranks."""
import math

import pytest
import torch

from r1train.grpo.metrics import UPDATE_MEANS, reward_metrics, update_means, update_metrics

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


def _rank(loss, tokens, **means):
    """One rank's row for update_means: its loss share, its tokens, each statistic's sum over them."""
    return [loss, tokens, *(means.get(k, 0.0) * tokens for k in UPDATE_MEANS)]


def test_update_metrics_sum_the_loss_shares_and_weigh_each_token_once():
    # Rank 0: 3 tokens, kl mean 0.1, entropy 2, ratio 1; rank 1: 7 tokens, kl mean 0.3, entropy 1,
    # ratio 1.2, clip_frac 2/7 (2 tokens), all of them clipped low; rank 2: every row left out of
    # the loss (0 tokens).
    #   loss      -0.25 + 0.5 + 0 = 0.25 (each rank holds its share of one loss)
    #   kl        (3 * 0.1 + 7 * 0.3) / 10 = 2.4 / 10 = 0.24; the mean of the two ranks' means
    #             would be 0.2, and counting rank 2's 0 as a third mean 0.4 / 3
    #   entropy   (3 * 2 + 7 * 1) / 10 = 1.3
    #   ratio     (3 * 1 + 7 * 1.2) / 10 = 11.4 / 10 = 1.14
    #   clip_frac 2 / 10 = 0.2 = clip_frac_low; clip_frac_high 0
    m = update_means(torch.tensor([_rank(-0.25, 3, kl=0.1, entropy=2.0, ratio_mean=1.0),
                                   _rank(0.5, 7, kl=0.3, entropy=1.0, ratio_mean=1.2, clip_frac=2 / 7,
                                         clip_frac_low=2 / 7),
                                   _rank(0.0, 0)]))
    assert m["loss"] == pytest.approx(0.25)
    assert m["kl"] == pytest.approx(0.24)
    assert m["entropy"] == pytest.approx(1.3)
    assert m["ratio_mean"] == pytest.approx(1.14)
    assert m["clip_frac"] == pytest.approx(0.2) and m["clip_frac_low"] == pytest.approx(0.2)
    assert m["clip_frac_high"] == 0.0


def test_a_step_without_loss_tokens_logs_zero_means():
    # Every row of every rank left out (grpo.mask_truncated on a step where all were cut): no
    # token to average over; the means are 0 (as policy_loss's own on an all-masked batch), not NaN.
    m = update_means(torch.tensor([_rank(0.0, 0), _rank(0.0, 0)]))
    assert m == {"loss": 0.0, **dict.fromkeys(UPDATE_MEANS, 0.0)}


def test_update_metrics_divide_the_trainers_sums_by_its_tokens():
    # One process, as GRPOTrainer.update returns it: 2 passes over 5 loss tokens count 10
    # tokens; kl summed over them 1.5 -> 0.15; entropy 62 -> 6.2; ratio 10.5 -> 1.05.
    sums = dict.fromkeys(UPDATE_MEANS, 0.0) | {"kl": 1.5, "entropy": 62.0, "ratio_mean": 10.5}
    m = update_metrics({"loss": 0.125, "tokens": 10.0, "sums": sums})
    assert m["loss"] == 0.125
    assert m["kl"] == pytest.approx(0.15) and m["entropy"] == pytest.approx(6.2)
    assert m["ratio_mean"] == pytest.approx(1.05) and m["clip_frac"] == 0.0
