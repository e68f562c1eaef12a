"""grpo/advantages.py: hand-derived cases, then random inputs against a loop transcription."""
from __future__ import annotations

import math
import statistics

import pytest
import torch

from r1train.grpo.advantages import combine_rewards, group_advantages, rloo_advantages, zero_std_groups

NAN = float("nan")


# ---------------------------------------------------------------------------
# slow references, straight from the formulas (python floats, exact-ish statistics module)
# ---------------------------------------------------------------------------


def ref_group_advantages(rewards, G, scale, eps, valid=None):
    """A_i = (r_i - mean_group) / (std + eps), std unbiased; invalid rows 0 and left out."""
    valid = valid or [True] * len(rewards)
    batch = [r for r, v in zip(rewards, valid) if v]
    batch_std = statistics.stdev(batch)
    out = []
    for g in range(len(rewards) // G):
        rows = range(g * G, (g + 1) * G)
        grp = [rewards[i] for i in rows if valid[i]]
        mu = statistics.fmean(grp)
        if scale == "group":
            denom = statistics.stdev(grp) + eps
        elif scale == "batch":
            denom = batch_std + eps
        else:
            denom = 1.0
        out += [(rewards[i] - mu) / denom if valid[i] else 0.0 for i in rows]
    return out


def ref_rloo(rewards, G):
    """A_i = r_i - 1/(G-1) sum_{j != i} r_j."""
    out = []
    for g in range(len(rewards) // G):
        grp = rewards[g * G:(g + 1) * G]
        for i, r in enumerate(grp):
            others = [x for j, x in enumerate(grp) if j != i]
            out.append(r - sum(others) / (G - 1))
    return out


# ---------------------------------------------------------------------------
# hand-derived cases
# ---------------------------------------------------------------------------


def test_group_scale_hand_case():
    # group 0 = [1, 0, 0, 0]: mean 0.25, deviations [0.75, -0.25, -0.25, -0.25],
    #   unbiased var = (0.5625 + 3 * 0.0625) / 3 = 0.25, std = 0.5
    #   -> eps=0: A = [1.5, -0.5, -0.5, -0.5]; eps=1e-4: deviations / 0.5001
    # group 1 = [0.1]*4: equal rewards -> exactly 0
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64)
    A = group_advantages(r, 4, eps=0.0)
    torch.testing.assert_close(A[:4], torch.tensor([1.5, -0.5, -0.5, -0.5], dtype=torch.float64))
    A = group_advantages(r, 4)
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=torch.float64) / 0.5001
    torch.testing.assert_close(A[:4], expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(A[4:], torch.zeros(4, dtype=torch.float64))


def test_batch_and_none_scale_hand_case():
    # batch = [1, 0, 0, 0, 0.1, 0.1, 0.1, 0.1]: mean 1.4/8 = 0.175
    #   squared deviations: 0.825^2 = 0.680625, 3 * 0.175^2 = 0.091875, 4 * 0.075^2 = 0.0225
    #   sum 0.795, unbiased var 0.795/7, std = sqrt(0.795/7) ~= 0.33700
    # "batch": group-0 deviations [0.75, -0.25, -0.25, -0.25] / (std + 1e-4); group 1 stays 0
    # "none": deviations themselves
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64)
    dev = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0], dtype=torch.float64)
    A = group_advantages(r, 4, scale="batch")
    torch.testing.assert_close(A, dev / (math.sqrt(0.795 / 7) + 1e-4), rtol=1e-12, atol=1e-12)
    A = group_advantages(r, 4, scale="none")
    torch.testing.assert_close(A, dev, rtol=1e-12, atol=1e-12)


def test_rloo_hand_case():
    # [1, 0, 0, 0]: A_0 = 1 - (0+0+0)/3 = 1; A_j = 0 - (1+0+0)/3 = -1/3
    # [3, 1]: A_0 = 3 - 1 = 2, A_1 = 1 - 3 = -2
    r = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    expected = torch.tensor([1, -1 / 3, -1 / 3, -1 / 3], dtype=torch.float64)
    torch.testing.assert_close(rloo_advantages(r, 4), expected)
    r = torch.tensor([3.0, 1.0, 5.0, 5.0], dtype=torch.float64)
    expected = torch.tensor([2.0, -2.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(rloo_advantages(r, 2), expected)


def test_zero_std_groups_hand_case():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5])
    assert zero_std_groups(r, 3).tolist() == [True, False, True]
    # With rows 3 and 5 marked "no opinion", group 1 is [1] alone: no spread -> zero-std.
    valid = torch.tensor([True, True, True, False, True, False, True, True, True])
    assert zero_std_groups(r, 3, valid).tolist() == [True, True, True]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("value", [0.1, 1 / 3, 0.7, -2.3, 1e6 + 0.1])
def test_equal_rewards_give_exactly_zero(dtype, value):
    # (0.1 + 0.1 + 0.1) / 3 != 0.1 in float64: naive r - mean leaves residue for some values,
    # which /(0 + eps) would amplify; the guarantee must be exact anyway.
    G = 3
    r = torch.tensor([value] * G + [0.0, 1.0, 0.0], dtype=dtype)
    for A in (
        group_advantages(r, G, scale="group"),
        group_advantages(r, G, scale="batch"),
        group_advantages(r, G, scale="none"),
        rloo_advantages(r, G),
    ):
        assert torch.equal(A[:G], torch.zeros(G, dtype=dtype))
        assert not torch.isnan(A).any()
        assert A[G:].abs().sum() > 0
    # A batch in which every group is flat: batch std is 0 too, still no NaN.
    flat = torch.full((6,), value, dtype=dtype)
    for scale in ("group", "batch", "none"):
        assert torch.equal(group_advantages(flat, G, scale=scale), torch.zeros(6, dtype=dtype))


def test_combine_rewards_ignores_nan():
    # weights [1, 0.5]:
    #   [1, NaN]   -> 1*1            = 1    (valid)
    #   [NaN, NaN] -> 0 placeholder         (no opinion)
    #   [0.5, 2]   -> 0.5 + 0.5*2    = 1.5  (valid)
    #   [NaN, 1]   -> 0.5*1          = 0.5  (valid)
    R = torch.tensor([[1.0, NAN], [NAN, NAN], [0.5, 2.0], [NAN, 1.0]])
    rewards, valid = combine_rewards(R, [1.0, 0.5])
    torch.testing.assert_close(rewards, torch.tensor([1.0, 0.0, 1.5, 0.5]))
    assert valid.tolist() == [True, False, True, True]
    # A zero weight on a NaN column must not leak NaN (0 * NaN = NaN).
    rewards, valid = combine_rewards(R, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(rewards, torch.tensor([1.0, 0.0, 0.5, 0.0]))
    assert valid.tolist() == [True, False, True, True]


def test_no_opinion_rows_get_zero_advantage():
    # group 0 (G=4): combined rewards [1, -, 0, 1] with row 1 having no opinion.
    #   stats over [1, 0, 1]: mean 2/3, deviations [1/3, -2/3, 1/3],
    #   unbiased var (1/9 + 4/9 + 1/9) / 2 = 1/3 -> A = dev / sqrt(1/3) = [0.57735, -1.1547, 0.57735]
    # group 1: only one row with an opinion -> nothing to compare with -> all 0
    R = torch.tensor([[1.0], [NAN], [0.0], [1.0], [NAN], [NAN], [0.4], [NAN]], dtype=torch.float64)
    rewards, valid = combine_rewards(R, [1.0])
    A = group_advantages(rewards, 4, eps=0.0, valid=valid)
    s = math.sqrt(1 / 3)
    expected = torch.tensor([1 / 3 / s, 0, -2 / 3 / s, 1 / 3 / s, 0, 0, 0, 0], dtype=torch.float64)
    torch.testing.assert_close(A, expected, rtol=1e-12, atol=1e-12)
    # RLOO over valid rows of group 0 (G=3): A_0 = 1 - (0+1)/2 = 0.5, A_2 = 0 - 1 = -1, A_3 = 0.5
    torch.testing.assert_close(
        rloo_advantages(rewards, 4, valid=valid),
        torch.tensor([0.5, 0, -1, 0.5, 0, 0, 0, 0], dtype=torch.float64),
    )
    # NaN may sit in the placeholder of an invalid row without reaching the output.
    A = group_advantages(torch.where(valid, rewards, NAN), 4, eps=0.0, valid=valid)
    torch.testing.assert_close(A, expected, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# random inputs against the references
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
@pytest.mark.parametrize("G", [2, 3, 8])
def test_group_advantages_match_reference(scale, G):
    g = torch.Generator().manual_seed(1000 * G + len(scale))
    r = torch.randn(5 * G, generator=g, dtype=torch.float64)
    expected = torch.tensor(ref_group_advantages(r.tolist(), G, scale, 1e-4), dtype=torch.float64)
    torch.testing.assert_close(group_advantages(r, G, scale=scale), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(
        group_advantages(r.float(), G, scale=scale), expected.float(), rtol=1e-5, atol=1e-5
    )
    # Group-normalized advantages sum to 0 in every group (what makes the step-0 loss vanish).
    sums = group_advantages(r, G, scale=scale).view(-1, G).sum(-1)
    torch.testing.assert_close(sums, torch.zeros_like(sums), rtol=0, atol=1e-12)


def test_group_advantages_with_valid_match_reference():
    g = torch.Generator().manual_seed(7)
    G = 6
    r = torch.randn(4 * G, generator=g, dtype=torch.float64)
    valid = torch.rand(4 * G, generator=g) > 0.3
    valid[:G] = True  # keep at least two valid rows per group so stdev exists in the reference
    valid[G:2 * G] = torch.tensor([True, False, True, False, False, False])
    valid[2 * G:] |= torch.tensor([True, True, False, False, False, False]).repeat(2)
    for scale in ("group", "batch", "none"):
        expected = ref_group_advantages(r.tolist(), G, scale, 1e-4, valid.tolist())
        A = group_advantages(r, G, scale=scale, valid=valid)
        expected = torch.tensor(expected, dtype=torch.float64)
        torch.testing.assert_close(A, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("G", [2, 4, 7])
def test_rloo_matches_reference(G):
    g = torch.Generator().manual_seed(G)
    r = torch.randn(3 * G, generator=g, dtype=torch.float64)
    expected = torch.tensor(ref_rloo(r.tolist(), G), dtype=torch.float64)
    torch.testing.assert_close(rloo_advantages(r, G), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(rloo_advantages(r.float(), G), expected.float(), rtol=1e-5, atol=1e-5)


def test_integer_rewards_are_accepted():
    # 0/1 correctness rewards often arrive as ints: [1, 0] -> mean 0.5, std sqrt(0.5)
    A = group_advantages(torch.tensor([1, 0]), 2, eps=0.0)
    torch.testing.assert_close(A, torch.tensor([0.5, -0.5]) / math.sqrt(0.5))


# ---------------------------------------------------------------------------
# bad arguments
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [group_advantages, rloo_advantages, zero_std_groups])
def test_bad_group_arguments(fn):
    r = torch.zeros(6)
    for bad in (1, 0, -2, 2.0, True):
        with pytest.raises(ValueError, match="group_size"):
            fn(r, bad)
    with pytest.raises(ValueError, match="not divisible by group_size=4"):
        fn(r, 4)
    with pytest.raises(ValueError, match=r"rewards must be a 1-D tensor.*\(2, 3\)"):
        fn(r.view(2, 3), 3)
    with pytest.raises(ValueError, match="valid"):
        fn(r, 3, valid=torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid"):
        fn(r, 3, valid=torch.ones(6))
    with pytest.raises(ValueError, match=r"rewards\[2\] is NaN"):
        fn(torch.tensor([0.0, 1.0, NAN, 0.0]), 2)


def test_bad_scale_and_eps():
    with pytest.raises(ValueError, match="scale.*'std'"):
        group_advantages(torch.zeros(4), 2, scale="std")
    with pytest.raises(ValueError, match="eps.*-0.1"):
        group_advantages(torch.zeros(4), 2, eps=-0.1)


def test_bad_combine_arguments():
    with pytest.raises(ValueError, match=r"per_function must be a 2-D tensor.*\(4,\)"):
        combine_rewards(torch.zeros(4), [1.0])
    with pytest.raises(ValueError, match=r"weights.*F=2.*\(3,\)"):
        combine_rewards(torch.zeros(4, 2), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="weights must be finite"):
        combine_rewards(torch.zeros(4, 2), [1.0, NAN])
