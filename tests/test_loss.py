"""grpo/loss.py: hand-derived cases, a loop transcription of the equations, gradients, DAPO
gradient accumulation, and the "loss is zero at step 0" question."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from r1train.grpo.advantages import group_advantages
from r1train.grpo.loss import loss_denominator, policy_loss

F64 = torch.float64
LN2 = math.log(2.0)


# ---------------------------------------------------------------------------
# slow reference: loops over sequences i and tokens t, DeepSeekMath Eq. 3-4, DAPO Eq. 8,
# Dr. GRPO, GSPO, one scalar at a time
# ---------------------------------------------------------------------------


def reference_loss(logps, old_logps, advantages, mask, ref_logps=None, beta=0.0, epsilon_low=0.2,
                   epsilon_high=None, loss_type="grpo", importance_sampling="token",
                   kl_estimator="k3", max_completion_length=None, denominator=None):
    eps_high = epsilon_low if epsilon_high is None else epsilon_high
    N, T = logps.shape
    seq_sums, seq_lens = [], []
    for i in range(N):
        tokens = [t for t in range(T) if mask[i, t]]
        A = float(advantages[i])
        if importance_sampling in ("sequence", "gspo_token") and tokens:
            # GSPO: s_i = (pi(o_i) / pi_old(o_i)) ** (1/|o_i|)
            s_i = torch.exp(sum(logps[i, t] - old_logps[i, t] for t in tokens) / len(tokens))
        seq_sum = 0.0
        for t in tokens:
            if importance_sampling == "sequence":
                r = s_i
            elif importance_sampling == "gspo_token":
                # GSPO-token: s_it = sg[s_i] * pi(o_it) / sg[pi(o_it)], value s_i, gradient per token
                r = s_i.detach() * torch.exp(logps[i, t] - logps[i, t].detach())
            else:
                r = torch.exp(logps[i, t] - old_logps[i, t])
            clipped = min(max(r, 1 - epsilon_low), 1 + eps_high)
            term = -min(r * A, clipped * A)
            if beta:
                x = ref_logps[i, t] - logps[i, t]  # log(pi_ref / pi_theta)
                kl = {"k1": -x, "k2": 0.5 * x**2, "k3": torch.exp(x) - x - 1}[kl_estimator]
                term = term + beta * kl
            seq_sum = seq_sum + term
        seq_sums.append(seq_sum)
        seq_lens.append(len(tokens))
    total_tokens = sum(seq_lens)
    if loss_type == "grpo":
        return sum(s / max(n, 1) for s, n in zip(seq_sums, seq_lens)) / (denominator or N)
    if loss_type == "dr_grpo":
        return sum(seq_sums) / (denominator or N * max_completion_length)
    return sum(seq_sums) / (denominator or max(total_tokens, 1))  # bnpo, dapo


def random_batch(seed, N=8, T=6, dtype=F64):
    """Ratios spread over all clip regions, variable lengths, one empty completion, garbage padding."""
    g = torch.Generator().manual_seed(seed)
    logps = -3 * torch.rand(N, T, generator=g, dtype=F64)
    old_logps = logps + 0.4 * torch.randn(N, T, generator=g, dtype=F64)
    ref_logps = logps + 0.3 * torch.randn(N, T, generator=g, dtype=F64)
    advantages = torch.randn(N, generator=g, dtype=F64)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[2] = 0
    mask = torch.arange(T) < lengths.unsqueeze(-1)  # [N, T]
    logps = torch.where(mask, logps, 30.0)  # padding: exp(30 - (-30)) overflows float32
    old_logps = torch.where(mask, old_logps, -30.0)
    return [x.to(dtype) for x in (logps, old_logps, ref_logps, advantages)] + [mask]


def loss_and_grad(fn, logps, *args, **kwargs):
    logps = logps.detach().clone().requires_grad_(True)
    out = fn(logps, *args, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    (grad,) = torch.autograd.grad(loss, logps)
    return loss.detach(), grad


# ---------------------------------------------------------------------------
# hand-derived cases
# ---------------------------------------------------------------------------


def test_clip_regions_hand_case():
    # One token per completion, old_logps = 0 so r = exp(logps); eps_low 0.2, eps_high 0.28
    #  A   r     min(rA, clip(r)A)                   loss    d loss/d logp (= -rA if unclipped)
    #  +1  1.5   min(1.5, 1.28)  = 1.28  clip-high  -1.28   0
    #  +1  0.5   min(0.5, 0.8)   = 0.5   unclipped  -0.5    -0.5
    #  -1  0.5   min(-0.5, -0.8) = -0.8  clip-low    0.8    0
    #  -1  1.5   min(-1.5,-1.28) = -1.5  unclipped   1.5    1.5
    #  +1  1.1   min(1.1, 1.1)   = 1.1   unclipped  -1.1    -1.1
    #  +1  1.25  min(1.25, 1.25) = 1.25  unclipped  -1.25   -1.25  (above 1+eps_low, below 1+eps_high)
    # bnpo = token mean: (-1.28 - 0.5 + 0.8 + 1.5 - 1.1 - 1.25) / 6 = -1.83 / 6 = -0.305
    # gradient = last column / 6
    r = torch.tensor([[1.5], [0.5], [0.5], [1.5], [1.1], [1.25]], dtype=F64)
    A = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, 1.0], dtype=F64)
    mask = torch.ones(6, 1, dtype=torch.bool)
    logps = r.log().requires_grad_(True)
    loss, m = policy_loss(logps, torch.zeros_like(r), A, mask, epsilon_low=0.2, epsilon_high=0.28,
                          loss_type="bnpo")
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(-0.305, dtype=F64))
    expected_grad = torch.tensor([[0], [-0.5], [0], [1.5], [-1.1], [-1.25]], dtype=F64) / 6
    torch.testing.assert_close(logps.grad, expected_grad)
    # 1 of 6 tokens clipped low, 1 high; ratio mean (1.5+0.5+0.5+1.5+1.1+1.25)/6 = 6.35/6
    torch.testing.assert_close(m["clip_frac_low"], torch.tensor(1 / 6, dtype=F64))
    torch.testing.assert_close(m["clip_frac_high"], torch.tensor(1 / 6, dtype=F64))
    torch.testing.assert_close(m["clip_frac"], torch.tensor(2 / 6, dtype=F64))
    torch.testing.assert_close(m["ratio_mean"], torch.tensor(6.35 / 6, dtype=F64))
    assert "kl" not in m
    # epsilon_high=None is symmetric: rows 0 and 5 now clip at 1.2:
    # (-1.2 - 0.5 + 0.8 + 1.5 - 1.1 - 1.2) / 6 = -1.7 / 6, and 2 of 6 tokens clipped high
    loss, m = policy_loss(r.log(), torch.zeros_like(r), A, mask, epsilon_low=0.2, loss_type="bnpo")
    torch.testing.assert_close(loss, torch.tensor(-1.7 / 6, dtype=F64))
    torch.testing.assert_close(m["clip_frac_high"], torch.tensor(2 / 6, dtype=F64))
    # A = 0: the objective is 0 whatever r is, nothing counts as clipped
    r0 = torch.tensor([[0.5], [1.5]], dtype=F64)
    loss, m = policy_loss(r0.log(), torch.zeros_like(r0), torch.zeros(2, dtype=F64), mask[:2])
    assert loss.item() == 0.0 and m["clip_frac"].item() == 0.0


def _loss_type_case():
    # N=2, T=3, second completion has 2 tokens; old_logps = 0, all ratios unclipped (eps 0.2):
    #   o_1: A=+2, r=[1.1, 0.9, 1.0] -> token losses -rA = [-2.2, -1.8, -2.0], sum -6.0
    #   o_2: A=-1, r=[1.2, 0.95]     -> token losses -rA = [ 1.2, 0.95],       sum 2.15
    # padding holds a huge log-ratio (exp(100)) that must not leak.
    r = torch.tensor([[1.1, 0.9, 1.0], [1.2, 0.95, 1.0]], dtype=F64)
    logps = r.log()
    logps[1, 2] = 100.0
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    return logps, torch.zeros_like(logps), torch.tensor([2.0, -1.0], dtype=F64), mask


@pytest.mark.parametrize(
    "loss_type, kwargs, expected_loss, token_weights",
    [
        # grpo: (-6/3 + 2.15/2) / 2 = (-2 + 1.075) / 2 = -0.4625; weight 1/(N |o_i|) = 1/6, 1/4
        ("grpo", {}, -0.4625, (1 / 6, 1 / 4)),
        # bnpo: (-6 + 2.15) / 5 tokens = -0.77; weight 1/5
        ("bnpo", {}, -0.77, (1 / 5, 1 / 5)),
        # dr_grpo, L=4: -3.85 / (2 * 4) = -0.48125; weight 1/8
        ("dr_grpo", {"max_completion_length": 4}, -0.48125, (1 / 8, 1 / 8)),
        # dapo with the step's token count 10: -3.85 / 10 = -0.385; weight 1/10
        ("dapo", {"denominator": 10}, -0.385, (1 / 10, 1 / 10)),
        ("dapo", {"denominator": torch.tensor(10)}, -0.385, (1 / 10, 1 / 10)),
        # dapo without a step count falls back to the local 5 tokens: = bnpo
        ("dapo", {}, -0.77, (1 / 5, 1 / 5)),
        # grpo within a step of 4 sequences: the 2 sequence means sum to -0.925, / 4
        ("grpo", {"denominator": 4}, -0.23125, (1 / 12, 1 / 8)),
    ],
)
def test_loss_types_hand_case(loss_type, kwargs, expected_loss, token_weights):
    logps, old_logps, A, mask = _loss_type_case()
    logps.requires_grad_(True)
    loss, _ = policy_loss(logps, old_logps, A, mask, loss_type=loss_type, **kwargs)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(expected_loss, dtype=F64))
    # unclipped: d(-rA)/d logp = -rA, times the loss_type's per-token weight; padding gets 0
    w1, w2 = token_weights
    expected_grad = torch.tensor([[-2.2 * w1, -1.8 * w1, -2.0 * w1], [1.2 * w2, 0.95 * w2, 0.0]],
                                 dtype=F64)
    torch.testing.assert_close(logps.grad, expected_grad)


@pytest.mark.parametrize(
    "estimator, kl_value, kl_grad",
    [
        # delta = ref - logp = ln 2
        # k1 = logp - ref = -ln 2;              d/dlogp = 1
        ("k1", -LN2, 1.0),
        # k2 = 0.5 (logp - ref)^2 = 0.5 ln2^2;  d/dlogp = logp - ref = -ln 2
        ("k2", 0.5 * LN2**2, -LN2),
        # k3 = e^{ln2} - ln2 - 1 = 1 - ln 2;    d/dlogp = -e^{delta} + 1 = -1
        ("k3", 1 - LN2, -1.0),
    ],
)
def test_kl_estimators_hand_case(estimator, kl_value, kl_grad):
    # pi_theta(token) = 1/4, pi_ref = 1/2; A = 0 and r = 1 so only beta * KL remains:
    # loss = 0.5 * kl, gradient = 0.5 * dkl/dlogp (grpo mean over the single token)
    logps = torch.tensor([[math.log(0.25)]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[math.log(0.5)]], dtype=F64)
    mask = torch.ones(1, 1, dtype=torch.bool)
    A = torch.zeros(1, dtype=F64)
    loss, m = policy_loss(logps, logps.detach(), A, mask, ref_logps=ref, beta=0.5,
                          kl_estimator=estimator)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor(0.5 * kl_value, dtype=F64))
    torch.testing.assert_close(logps.grad, torch.tensor([[0.5 * kl_grad]], dtype=F64))
    torch.testing.assert_close(m["kl"], torch.tensor(kl_value, dtype=F64))
    # beta = 0 with ref_logps: KL is measured, not optimized
    loss, m = policy_loss(logps, logps.detach(), A, mask, ref_logps=ref, kl_estimator=estimator)
    assert loss.item() == 0.0
    torch.testing.assert_close(m["kl"], torch.tensor(kl_value, dtype=F64))


def test_gspo_sequence_ratio_hand_case():
    # o_1: log-ratios [ln 1.2, ln 0.8], padding ln 7 -> s_1 = sqrt(1.2 * 0.8) = sqrt(0.96) ~= 0.97980
    #      A=+1, unclipped -> every token's loss -s_1; sequence mean -s_1
    # o_2: log-ratios [ln 2]*3 -> s_2 = 2, A=+1 -> clipped at 1.28 -> -1.28, gradient 0
    # grpo: (-sqrt(0.96) - 1.28) / 2
    # d loss/d logp_1t = 1/2 * d(-s_1)/d logp_1t = -1/2 * s_1 * 1/|o_1| = -sqrt(0.96)/4
    old = torch.zeros(2, 3, dtype=F64)
    logps = torch.tensor([[math.log(1.2), math.log(0.8), math.log(7)], [LN2] * 3], dtype=F64,
                         requires_grad=True)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    A = torch.tensor([1.0, 1.0], dtype=F64)
    loss, m = policy_loss(logps, old, A, mask, epsilon_high=0.28, importance_sampling="sequence")
    loss.backward()
    s1 = math.sqrt(0.96)
    torch.testing.assert_close(loss, torch.tensor((-s1 - 1.28) / 2, dtype=F64))
    torch.testing.assert_close(logps.grad, torch.tensor([[-s1 / 4, -s1 / 4, 0], [0, 0, 0]], dtype=F64))
    # per-token metrics see s_i on every token: 3 of 5 tokens clipped high
    torch.testing.assert_close(m["clip_frac_high"], torch.tensor(0.6, dtype=F64))
    torch.testing.assert_close(m["ratio_mean"], torch.tensor((2 * s1 + 3 * 2) / 5, dtype=F64))


# ---------------------------------------------------------------------------
# random inputs against the loop reference
# ---------------------------------------------------------------------------

CONFIGS = [
    dict(loss_type=lt, importance_sampling=is_, kl_estimator=kl, beta=0.04)
    for lt, is_, kl in itertools.product(("grpo", "bnpo", "dr_grpo", "dapo"), ("token", "sequence"),
                                         ("k1", "k2", "k3"))
] + [dict(loss_type="dapo", denominator=123, beta=0.0), dict(loss_type="grpo", epsilon_high=0.28),
      dict(loss_type="grpo", denominator=20, beta=0.04)]


def _extra(cfg):
    return {"max_completion_length": 9} if cfg["loss_type"] == "dr_grpo" else {}


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_matches_reference(cfg):
    cfg = {**cfg, **_extra(cfg)}
    if cfg.get("importance_sampling") == "sequence":
        cfg["epsilon_low"] = 0.05  # sequence ratios are geometric means, closer to 1: clip tighter
    logps, old, ref, A, mask = random_batch(seed=5)
    expected_loss, expected_grad = loss_and_grad(reference_loss, logps, old, A, mask,
                                                 ref_logps=ref, **cfg)
    loss, grad = loss_and_grad(policy_loss, logps, old, A, mask, ref_logps=ref, **cfg)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)
    # float32 implementation against the float64 reference
    args32 = [x.float() for x in (logps, old, A)]
    loss32, grad32 = loss_and_grad(policy_loss, args32[0], args32[1], args32[2], mask,
                                   ref_logps=ref.float(), **cfg)
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32, expected_loss.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad32, expected_grad.float(), rtol=1e-5, atol=1e-5)
    # the random batch does exercise both clip sides, else this test would not cover clipping
    _, m = policy_loss(logps, old, A, mask, ref_logps=ref, **cfg)
    assert m["clip_frac_low"] > 0 and m["clip_frac_high"] > 0


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_sequence_ratio_equals_gspo_token(loss_type):
    # The module docstring's claim: with one advantage per completion, broadcasting s_i (gradient
    # through it) equals GSPO-token in value and gradient under every normalization.
    logps, old, ref, A, mask = random_batch(seed=5)
    kw = dict(loss_type=loss_type, epsilon_low=0.05, max_completion_length=9, ref_logps=ref, beta=0.04)
    loss, grad = loss_and_grad(policy_loss, logps, old, A, mask, importance_sampling="sequence", **kw)
    ref_loss, ref_grad = loss_and_grad(reference_loss, logps, old, A, mask,
                                       importance_sampling="gspo_token", **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cfg", CONFIGS[::3], ids=lambda c: "-".join(str(v) for v in c.values()))
def test_gradcheck(cfg):
    cfg = {**cfg, **_extra(cfg)}
    logps, old, ref, A, mask = random_batch(seed=3, N=5, T=4)
    logps.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda lp: policy_loss(lp, old, A, mask, ref_logps=ref, **cfg)[0],
                                    (logps,), eps=1e-6, atol=1e-8)


def test_metrics_are_detached_scalars():
    logps, old, ref, A, mask = random_batch(seed=5)
    logps.requires_grad_(True)
    _, m = policy_loss(logps, old, A, mask, ref_logps=ref, beta=0.1)
    assert set(m) == {"ratio_mean", "clip_frac_low", "clip_frac_high", "clip_frac", "kl"}
    for v in m.values():
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and not v.requires_grad


# ---------------------------------------------------------------------------
# "the loss is zero at step 0": old_logps == logps.detach(), beta = 0
# ---------------------------------------------------------------------------

STEP0_WEIGHTS = {
    # d loss / d logp_it = -A_i * w_i on unmasked tokens (r = 1, no clipping)
    "grpo": lambda lens, N: 1.0 / (N * lens.clamp(min=1)),
    "bnpo": lambda lens, N: torch.full_like(lens, 1.0 / lens.sum()),
    "dr_grpo": lambda lens, N: torch.full_like(lens, 1.0 / (N * 9)),
    "dapo": lambda lens, N: torch.full_like(lens, 1.0 / lens.sum()),
}


@pytest.mark.parametrize("importance_sampling", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("equal_lengths", [True, False])
def test_step0_loss_value_and_policy_gradient(loss_type, importance_sampling, equal_lengths):
    G, N, T = 4, 12, 6
    g = torch.Generator().manual_seed(5)
    A = group_advantages(torch.randn(N, generator=g, dtype=F64), G)
    logps = -3 * torch.rand(N, T, generator=g, dtype=F64)
    lengths = torch.full((N,), T) if equal_lengths else torch.randint(1, T + 1, (N,), generator=g)
    mask = torch.arange(T) < lengths.unsqueeze(-1)  # [N, T]; every completion non-empty
    kw = {"max_completion_length": 9} if loss_type == "dr_grpo" else {}
    loss, grad = loss_and_grad(policy_loss, logps, logps.detach(), A, mask, loss_type=loss_type,
                               importance_sampling=importance_sampling, **kw)
    lens = lengths.to(F64)
    # Value at r = 1 is -sum_i w_i |o_i| A_i. grpo: w_i |o_i| = 1/N, so -mean(A) = 0 for any
    # lengths since each group's advantages sum to 0. Token-level normalizations weight A_i by
    # |o_i|: zero only when all lengths are equal.
    w = STEP0_WEIGHTS[loss_type](lens, N)  # [N]
    expected_value = -(w * lens * A).sum()
    torch.testing.assert_close(loss, expected_value, rtol=1e-12, atol=1e-12)
    if loss_type == "grpo" or equal_lengths:
        torch.testing.assert_close(loss, torch.zeros((), dtype=F64), rtol=0, atol=1e-12)
    else:
        assert abs(loss.item()) > 1e-3  # honestly non-zero: longer completions weigh more
    # ... yet the gradient is the policy gradient -A_i * grad log pi with the loss_type's weights,
    # for GSPO too: d s_i = s_i/|o_i| sum_t d logp_it and |o_i| tokens share it.
    expected_grad = torch.where(mask, -(A * w).unsqueeze(-1), 0.0).expand(N, T)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-12, atol=1e-14)
    assert grad.abs().sum() > 0


# ---------------------------------------------------------------------------
# degenerate inputs: flat groups, empty completions, -inf padding
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("importance_sampling", ["token", "sequence"])
def test_no_nan_for_flat_groups_and_empty_masks(loss_type, importance_sampling):
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.0])  # both groups flat
    A = group_advantages(rewards, 3)
    assert torch.equal(A, torch.zeros(6))
    logps = -torch.rand(6, 4)
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[1] = False  # an empty completion
    mask[4, 2:] = False
    logps = torch.where(mask, logps, -torch.inf).requires_grad_(True)  # padding at -inf
    old = torch.where(mask, logps.detach() - 0.1, -torch.inf)
    ref = torch.where(mask, logps.detach() + 0.1, -torch.inf)
    kw = {"max_completion_length": 4} if loss_type == "dr_grpo" else {}
    loss, m = policy_loss(logps, old, A, mask, ref_logps=ref, beta=0.1, loss_type=loss_type,
                          importance_sampling=importance_sampling, **kw)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logps.grad).all()
    assert all(torch.isfinite(v) for v in m.values())
    assert torch.equal(logps.grad[1], torch.zeros(4))  # nothing flows into the empty completion
    # all-empty batch: 0, not 0/0
    loss, m = policy_loss(logps, old, A, torch.zeros_like(mask), ref_logps=ref, beta=0.1,
                          loss_type=loss_type, importance_sampling=importance_sampling, **kw)
    assert loss.item() == 0.0 and all(v.item() == 0.0 for v in m.values())


# ---------------------------------------------------------------------------
# DAPO: gradient accumulation reproduces the large batch
# ---------------------------------------------------------------------------


def _accumulated_grad(logps, old, A, mask, ref, splits, **kw):
    grads = []
    for rows in torch.split(torch.arange(logps.shape[0]), splits):
        _, gr = loss_and_grad(policy_loss, logps[rows], old[rows], A[rows], mask[rows],
                              ref_logps=ref[rows], **kw)
        grads.append(gr)
    return torch.cat(grads)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("importance_sampling", ["token", "sequence"])
def test_micro_batches_with_the_step_denominator_sum_to_the_full_batch(loss_type, importance_sampling):
    """Normalization in one place: each micro-batch's sum over the step's count adds up to the
    whole batch's loss and gradient, for every loss type (the trainer's accumulation)."""
    logps, old, ref, A, mask = random_batch(seed=11, N=10, T=7)
    kw = dict(beta=0.04, importance_sampling=importance_sampling, epsilon_high=0.28,
              max_completion_length=9)
    full_loss, full_grad = loss_and_grad(policy_loss, logps, old, A, mask, ref_logps=ref,
                                         loss_type=loss_type, **kw)
    # one rank: the step's counts are the batch's (the trainer all-reduces them over ranks)
    denominator = loss_denominator(loss_type, sequences=10, tokens=mask.sum(), rank_tokens=mask.sum(),
                                   world_size=1, max_completion_length=9)
    micro = _accumulated_grad(logps, old, A, mask, ref, [4, 3, 3], loss_type=loss_type,
                              denominator=denominator, **kw)
    torch.testing.assert_close(micro, full_grad, rtol=0, atol=1e-12)
    # Control: without the step's count each micro-batch is its own step, and the sum is not
    # the whole batch's gradient.
    alone = _accumulated_grad(logps, old, A, mask, ref, [4, 3, 3], loss_type=loss_type, **kw)
    assert (alone - full_grad).abs().max() > 1e-3


def test_loss_denominators_hand_worked():
    # 2 ranks, 6 sequences and 40 tokens in the step, 15 of them on this rank, L = 8
    kw = dict(sequences=6, tokens=40, rank_tokens=15, world_size=2, max_completion_length=8)
    assert loss_denominator("grpo", **kw) == 6
    assert loss_denominator("dr_grpo", **kw) == 48
    assert loss_denominator("dapo", **kw) == 40
    assert loss_denominator("bnpo", **kw) == 30  # this rank's token mean, averaged over 2 ranks


# ---------------------------------------------------------------------------
# bad arguments
# ---------------------------------------------------------------------------


def _good():
    logps, old, ref, A, mask = random_batch(seed=1, N=4, T=3)
    return dict(logps=logps, old_logps=old, advantages=A, mask=mask, ref_logps=ref)


@pytest.mark.parametrize(
    "override, match",
    [
        ({"logps": torch.zeros(4)}, r"logps must be a floating 2-D tensor.*\(4,\)"),
        ({"logps": torch.zeros(4, 3, dtype=torch.long)}, "logps must be a floating"),
        ({"old_logps": torch.zeros(4, 2)}, r"old_logps must have the shape of logps.*\(4, 2\)"),
        ({"mask": torch.ones(3, 3)}, r"mask must have the shape.*\(3, 3\)"),
        ({"ref_logps": torch.zeros(4, 4)}, r"ref_logps must have the shape.*\(4, 4\)"),
        ({"advantages": torch.zeros(4, 1)}, r"advantages must have shape \[N\].*\(4, 1\)"),
        ({"epsilon_low": -0.1}, "epsilon_low.*-0.1"),
        ({"epsilon_high": -0.2}, "epsilon_high.*-0.2"),
        ({"epsilon_low": float("nan")}, "epsilon_low.*nan"),
        ({"beta": -1.0}, "beta.*-1.0"),
        ({"beta": 0.1, "ref_logps": None}, "beta=0.1.*ref_logps"),
        ({"loss_type": "ppo"}, "loss_type.*'ppo'"),
        ({"kl_estimator": "k4"}, "kl_estimator.*'k4'"),
        ({"importance_sampling": "seq"}, "importance_sampling.*'seq'"),
        ({"loss_type": "dr_grpo"}, "dr_grpo.*max_completion_length"),
        ({"max_completion_length": 0}, "max_completion_length.*0"),
        ({"denominator": -5}, "denominator.*-5"),
        ({"denominator": torch.ones(2)}, r"denominator must be a scalar.*\(2,\)"),
        ({"logps": torch.zeros(0, 3), "old_logps": torch.zeros(0, 3), "mask": torch.ones(0, 3),
          "ref_logps": None, "advantages": torch.zeros(0)}, "N=0"),
    ],
)
def test_bad_arguments(override, match):
    kw = {**_good(), **override}
    args = [kw.pop(k) for k in ("logps", "old_logps", "advantages", "mask")]
    with pytest.raises(ValueError, match=match):
        policy_loss(*args, **kw)
