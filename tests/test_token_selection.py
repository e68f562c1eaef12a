"""The two selections of tokens whose policy term counts (grpo/loss.py): the rollout correction
(TIS / MIS importance weights pi_old / pi_sampler, Yao et al. 2025) and the high-entropy
selection ("Beyond the 80/20 Rule", Wang et al. 2025), each against a float64 transcription
written here (per-token loops, a sort), hand cases worked out in comments, and the sampler's
recorded log-probs (model/engine.py) against the trainer's on the tiny model."""
from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from r1train.grpo.batch import GRPOBatch
from r1train.grpo.config import GRPOJobConfig
from r1train.grpo.loss import entropy_mask, entropy_threshold, policy_loss, rollout_correction
from r1train.model.engine import Rollout, generate, pad_prompts, position_ids_from_mask, sample_tokens
from r1train.model.policy import PolicyModel
from r1train.run.config import ConfigError, parse_args

F64 = torch.float64
ASSET = Path(__file__).resolve().parent / "assets" / "tiny-r1-sft"


# ---------------------------------------------------------------------------------------------
# rollout_correction: per-token loops
# ---------------------------------------------------------------------------------------------

def reference_weights(old, sampler, mask, method, level, bound, bound_low=0.0):
    """w_it and the step's statistics, one token at a time (Yao et al. 2025; TRL's *_mask modes).

    rho_it = pi_old / pi_sampler of token t (level token) or of the whole completion i, the
    product of its tokens' ratios (level sequence); tis: min(rho, C); mis: rho inside
    [bound_low, C], else 0. mismatch_kl: mean over tokens of rho_t - 1 - log rho_t (k3 of
    KL(sampler || old) from the sampler's draws)."""
    N, T = old.shape
    w = torch.zeros(N, T, dtype=F64)
    kl, outside, count = 0.0, 0, 0
    for i in range(N):
        tokens = [t for t in range(T) if mask[i, t]]
        seq_log = sum(float(old[i, t]) - float(sampler[i, t]) for t in tokens)
        for t in tokens:
            log_rho = seq_log if level == "sequence" else float(old[i, t]) - float(sampler[i, t])
            rho = math.exp(log_rho) if log_rho < 700 else math.inf
            if method == "tis":
                w[i, t] = min(rho, bound)
                outside += rho > bound
            else:
                keep = bound_low <= rho <= bound
                w[i, t] = rho if keep else 0.0
                outside += not keep
            x = float(old[i, t]) - float(sampler[i, t])  # the token's own log ratio
            kl += math.exp(x) - 1 - x
            count += 1
    count = max(count, 1)
    return w, {"mismatch_kl": kl / count, "is_weight_mean": float(w.sum()) / count,
               "is_truncated_frac" if method == "tis" else "is_masked_frac": outside / count}


def test_weights_hand_case():
    # Row 0: log rho = ln 4, 0, -ln 2 (rho 4, 1, 0.5); row 1: rho 1.5, then padding.
    #   tis C=2 token:     w = [2, 1, 0.5], [1.5, 0]; truncated 1/4; mean (2+1+0.5+1.5)/4 = 1.25
    #   mis [0.6, 2]:      w = [0, 1, 0], [1.5, 0];   masked 2/4;    mean 2.5/4 = 0.625
    #   tis sequence C=2:  rho_0 = 4 * 1 * 0.5 = 2 (at the bound: kept), rho_1 = 1.5
    #   mis sequence C=1.8: row 0 masked (2 > 1.8), row 1 kept: masked 3/4, mean 1.5/4
    #   mismatch_kl = mean of rho - 1 - ln rho: (3 - ln 4) + 0 + (ln 2 - 0.5) + (0.5 - ln 1.5), / 4
    # (Padding holds log-probs whose ratio would be e^16: it must not count anywhere.)
    old = torch.tensor([[math.log(4), 0.0, -math.log(2)], [math.log(1.5), 7.0, 7.0]], dtype=F64) - 1.0
    sampler = torch.tensor([[0.0, 0.0, 0.0], [0.0, -9.0, -9.0]], dtype=F64) - 1.0
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.bool)
    kl = ((3 - math.log(4)) + (math.log(2) - 0.5) + (0.5 - math.log(1.5))) / 4

    w, m = rollout_correction(old, sampler, mask, method="tis", bound=2.0)
    torch.testing.assert_close(w, torch.tensor([[2, 1, 0.5], [1.5, 0, 0]], dtype=F64))
    assert float(m["is_truncated_frac"]) == 0.25 and float(m["is_weight_mean"]) == pytest.approx(1.25)
    assert float(m["mismatch_kl"]) == pytest.approx(kl)
    w, m = rollout_correction(old, sampler, mask, method="mis", bound=2.0, bound_low=0.6)
    torch.testing.assert_close(w, torch.tensor([[0, 1, 0], [1.5, 0, 0]], dtype=F64))
    assert float(m["is_masked_frac"]) == 0.5 and float(m["is_weight_mean"]) == pytest.approx(0.625)
    w, _ = rollout_correction(old, sampler, mask, method="tis", level="sequence", bound=2.0)
    torch.testing.assert_close(w, torch.tensor([[2, 2, 2], [1.5, 0, 0]], dtype=F64))
    w, m = rollout_correction(old, sampler, mask, method="mis", level="sequence", bound=1.8)
    torch.testing.assert_close(w, torch.tensor([[0, 0, 0], [1.5, 0, 0]], dtype=F64))
    assert float(m["is_masked_frac"]) == 0.75 and float(m["is_weight_mean"]) == pytest.approx(1.5 / 4)


def _random(seed, N=7, T=9):
    """Log ratios spread across the bounds, variable lengths, an empty row, garbage padding, and
    one row whose summed log ratio overflows exp (a sequence weight of inf before the bounds)."""
    g = torch.Generator().manual_seed(seed)
    old = -4 * torch.rand(N, T, generator=g, dtype=F64)
    sampler = old - 0.6 * torch.randn(N, T, generator=g, dtype=F64)
    lengths = torch.randint(1, T + 1, (N,), generator=g)
    lengths[1] = 0
    mask = torch.arange(T) < lengths[:, None]
    sampler[3] = old[3] - 100.0  # rho = e^100 per token; the row's product e^(100 |o_3|)
    sampler = torch.where(mask, sampler, float("nan"))  # padding: never read
    return old, sampler, mask


@pytest.mark.parametrize("method, level, bound, bound_low", [
    ("tis", "token", 2.0, 0.0), ("tis", "sequence", 1.5, 0.0), ("tis", "token", 0.9, 0.0),
    ("mis", "token", 2.0, 0.0), ("mis", "token", 1.5, 0.5), ("mis", "sequence", 3.0, 0.2)])
@pytest.mark.parametrize("seed", [0, 1])
def test_weights_match_the_per_token_loop(method, level, bound, bound_low, seed):
    old, sampler, mask = _random(seed)
    w, m = rollout_correction(old, sampler, mask, method=method, level=level, bound=bound, bound_low=bound_low)
    want_w, want_m = reference_weights(old, sampler, mask, method, level, bound, bound_low)
    torch.testing.assert_close(w, want_w, rtol=1e-12, atol=0)
    assert not w.requires_grad and set(m) == set(want_m)
    for k, v in want_m.items():
        if k == "mismatch_kl":  # row 3's e^100 tokens: compared relatively
            assert float(m[k]) == pytest.approx(v, rel=1e-12), k
        else:
            assert float(m[k]) == pytest.approx(v, abs=1e-12), k
    if method == "tis":
        assert 0 < float(m["is_truncated_frac"]) < 1  # both sides of the bound are exercised
    else:
        assert 0 < float(m["is_masked_frac"]) < 1


def test_weights_are_detached_and_in_the_trainers_dtype():
    old, sampler, mask = _random(0)
    old32 = old.float().requires_grad_(True)
    w, m = rollout_correction(old32, sampler, mask, method="tis")
    assert w.dtype == torch.float32 and not w.requires_grad
    assert all(v.dtype == torch.float32 and v.dim() == 0 for v in m.values())


# ---------------------------------------------------------------------------------------------
# the policy term weighted: a per-token loop
# ---------------------------------------------------------------------------------------------

def reference_weighted_loss(logps, old, adv, mask, weights, ref, beta, eps, loss_type, L,
                            weight_kl=False, drop_zero_weights=False):
    """-J with each token's clipped surrogate times w_it, plus beta k3 unweighted; the
    normalization counts every completion token (weighted 0 or not). `weight_kl` and
    `drop_zero_weights` are the two other readings, for the test to tell them apart."""
    N, T = logps.shape
    sums, lengths = [], []
    for i in range(N):
        tokens = [t for t in range(T) if mask[i, t] and not (drop_zero_weights and weights[i, t] == 0)]
        s = 0.0
        for t in tokens:
            r = torch.exp(logps[i, t] - old[i, t])
            clipped = min(max(r, 1 - eps), 1 + eps)
            term = weights[i, t] * -min(r * adv[i], clipped * adv[i])
            x = ref[i, t] - logps[i, t]
            kl = torch.exp(x) - x - 1
            s = s + term + beta * (weights[i, t] if weight_kl else 1.0) * kl
        sums.append(s)
        lengths.append(len(tokens))
    if loss_type == "grpo":
        return sum(s / max(n, 1) for s, n in zip(sums, lengths)) / N
    if loss_type == "dr_grpo":
        return sum(sums) / (N * L)
    return sum(sums) / max(sum(lengths), 1)


def _loss_case(seed, N=6, T=7):
    g = torch.Generator().manual_seed(seed)
    logps = -3 * torch.rand(N, T, generator=g, dtype=F64)
    old = logps + 0.3 * torch.randn(N, T, generator=g, dtype=F64)
    ref = logps + 0.3 * torch.randn(N, T, generator=g, dtype=F64)
    adv = torch.randn(N, generator=g, dtype=F64)
    mask = torch.arange(T) < torch.randint(1, T + 1, (N,), generator=g)[:, None]
    weights = torch.rand(N, T, generator=g, dtype=F64) * 2
    weights[torch.rand(N, T, generator=g) < 0.3] = 0.0  # masked tokens (MIS, the entropy selection)
    return logps, old, ref, adv, mask, weights


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_weighted_loss_and_gradient_match_the_loop(loss_type):
    logps, old, ref, adv, mask, weights = _loss_case(3)
    assert ((weights == 0) & mask).any()
    a = logps.clone().requires_grad_(True)
    loss, _ = policy_loss(a, old, adv, mask, ref_logps=ref, beta=0.1, loss_type=loss_type,
                          max_completion_length=7, token_weights=weights)
    loss.backward()
    b = logps.clone().requires_grad_(True)
    want = reference_weighted_loss(b, old, adv, mask, weights, ref, 0.1, 0.2, loss_type, 7)
    want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-14)
    # The test tells the readings apart: the KL weighted too, or tokens weighted 0 taken out of
    # the counts (verl's rejection sampling), each give another loss.
    for other in ({"weight_kl": True}, {"drop_zero_weights": True}):
        if other.get("drop_zero_weights") and loss_type == "dr_grpo":
            continue  # N L counts no tokens
        alt = reference_weighted_loss(logps, old, adv, mask, weights, ref, 0.1, 0.2, loss_type, 7, **other)
        assert abs(float(alt) - float(loss.detach())) > 1e-4, other


def test_a_token_weighted_zero_keeps_its_kl_gradient_only():
    # One row, two tokens, ratio 1, A = 1, beta = 0.5, token 0 weighted 0 ("grpo": 1/|o| = 1/2).
    # d loss / d logp_t = (w_t * -A * r_t + beta * (1 - pi_ref/pi)) / 2 with r = 1:
    #   token 0: (0 + 0.5 * (1 - e^-0.2)) / 2;  token 1: (-1 + 0.5 * (1 - e^0.3)) / 2
    logps = torch.tensor([[-1.0, -2.0]], dtype=F64, requires_grad=True)
    ref = torch.tensor([[-1.2, -1.7]], dtype=F64)
    loss, _ = policy_loss(logps, logps.detach(), torch.ones(1, dtype=F64), torch.ones(1, 2), ref_logps=ref,
                          beta=0.5, token_weights=torch.tensor([[0.0, 1.0]], dtype=F64))
    loss.backward()
    want = [0.5 * (1 - math.exp(-0.2)) / 2, (-1 + 0.5 * (1 - math.exp(0.3))) / 2]
    assert logps.grad[0].tolist() == pytest.approx(want, rel=1e-12)


def test_no_weights_and_all_ones_give_the_same_loss():
    logps, old, ref, adv, mask, _ = _loss_case(5)
    for loss_type in ("grpo", "dapo"):
        plain, m0 = policy_loss(logps, old, adv, mask, ref_logps=ref, beta=0.04, loss_type=loss_type)
        ones, m1 = policy_loss(logps, old, adv, mask, ref_logps=ref, beta=0.04, loss_type=loss_type,
                               token_weights=torch.ones_like(logps))
        assert torch.equal(plain, ones) and m0.keys() == m1.keys()


def test_token_weights_of_another_shape_are_refused():
    logps, old, ref, adv, mask, _ = _loss_case(5)
    with pytest.raises(ValueError, match="token_weights"):
        policy_loss(logps, old, adv, mask, token_weights=torch.ones(3))


# ---------------------------------------------------------------------------------------------
# entropy_threshold / entropy_mask: against a sort
# ---------------------------------------------------------------------------------------------

def sorted_selection(entropies: list[float], q: str) -> tuple[float, int]:
    """(tau, tokens kept): walk the entropies from the largest and take tokens while the share
    taken is below q (an exact fraction: q as written, "0.2" is 1/5), at least one; every token
    equal to the last one taken is kept too. `q` a decimal string."""
    order = sorted(entropies, reverse=True)
    share, taken = Fraction(q), 1
    while taken < len(order) and Fraction(taken, len(order)) < share:
        taken += 1
    tau = order[taken - 1]
    return tau, sum(1 for h in entropies if h >= tau)


@pytest.mark.parametrize("q, m, kept", [
    ("0.2", 10, 2), ("0.7", 10, 7), ("0.25", 10, 3), ("1", 10, 10), ("0", 10, 1), ("0.2", 1, 1),
    ("0.01", 1000, 10), ("0.3", 7, 3)])
def test_threshold_hand_cases(q, m, kept):
    # distinct entropies 0, 1, ..., m-1, shuffled: a share q of m tokens keeps ceil(q m) (at least 1);
    # 0.2 and 0.7 of 10 are 2 and 7 exactly, although 0.7 * 10 = 7.000000000000001 in floats
    h = torch.randperm(m, generator=torch.Generator().manual_seed(m)).to(F64)
    tau = entropy_threshold(h, float(q))
    assert float(tau) == m - kept
    assert int(entropy_mask(h[None], torch.ones(1, m), tau).sum()) == kept
    assert sorted_selection(h.tolist(), q) == (m - kept, kept)


@pytest.mark.parametrize("q", ["0.05", "0.2", "0.5", "0.9", "0.999"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mask_matches_a_sort_with_ties_and_padding(q, seed):
    g = torch.Generator().manual_seed(seed)
    N, T = 9, 11
    # Entropies on a coarse grid: many ties (the first token of a group's G completions shares
    # its prompt's distribution, so ties are the rule, not a corner case).
    entropy = torch.randint(0, 12, (N, T), generator=g).to(torch.float32) / 4
    mask = torch.arange(T) < torch.randint(0, T + 1, (N,), generator=g)[:, None]
    entropy = torch.where(mask, entropy, 99.0)  # padding holds garbage above every real entropy
    values = entropy[mask].tolist()
    tau = entropy_threshold(entropy[mask], float(q))
    want_tau, want_kept = sorted_selection(values, q)
    kept = entropy_mask(entropy, mask.float(), tau)
    assert float(tau) == want_tau
    assert int(kept.sum()) == want_kept and not (kept & ~mask).any()
    assert want_kept >= math.ceil(float(q) * len(values) - 1e-9)  # ties may keep more, never fewer
    # The threshold does not depend on how the tokens are split over ranks (the gather's order).
    perm = torch.randperm(len(values), generator=g)
    assert entropy_threshold(entropy[mask][perm], float(q)) == tau


def test_no_loss_token_keeps_nothing():
    tau = entropy_threshold(torch.zeros(0), 0.2)
    assert tau == math.inf and not entropy_mask(torch.ones(2, 3), torch.ones(2, 3), tau).any()


# ---------------------------------------------------------------------------------------------
# options
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, option", [
    (["--grpo.rollout_correction", "ice"], "grpo.rollout_correction"),
    (["--grpo.rollout_correction", "tis", "--grpo.correction_level", "geometric"], "grpo.correction_level"),
    (["--grpo.rollout_correction", "tis", "--grpo.correction_bound", "0"], "grpo.correction_bound"),
    (["--grpo.rollout_correction", "mis", "--grpo.correction_bound", "inf"], "grpo.correction_bound"),
    (["--grpo.rollout_correction", "mis", "--grpo.correction_bound_low", "2.5"], "grpo.correction_bound_low"),
    (["--grpo.rollout_correction", "tis", "--grpo.correction_bound_low", "0.5"], "grpo.correction_bound_low"),
    (["--grpo.correction_level", "sequence"], "grpo.correction_level"),  # no correction to apply it to
    (["--grpo.top_entropy_quantile", "1.5"], "grpo.top_entropy_quantile"),
    (["--grpo.top_entropy_quantile", "nan"], "grpo.top_entropy_quantile"),
])
def test_bad_options_fail_at_start_naming_the_option(args, option):
    with pytest.raises(ConfigError, match=option.replace(".", r"\.")):
        parse_args(GRPOJobConfig, args)


def test_good_options_parse():
    cfg = parse_args(GRPOJobConfig, ["--grpo.rollout_correction", "mis", "--grpo.correction_level", "sequence",
                                     "--grpo.correction_bound", "5", "--grpo.correction_bound_low", "0.5",
                                     "--grpo.top_entropy_quantile", "0.2"])
    g = cfg.grpo
    assert (g.rollout_correction, g.correction_level, g.correction_bound, g.correction_bound_low,
            g.top_entropy_quantile) == ("mis", "sequence", 5.0, 0.5, 0.2)


# ---------------------------------------------------------------------------------------------
# the sampler's log-probs (model/engine.py)
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.0, 3, 1.0),
                                                       (0.8, 0, 0.6), (1.0, 4, 0.7)])
def test_sampled_tokens_log_probs_are_those_of_the_distribution_sampled(temperature, top_k, top_p):
    # The distribution sampled is softmax(logits / T) over the tokens top_k / top_p keep,
    # renormalized: log p(y) = z_y - log sum_{kept} exp(z), z = logits / T (written out here with
    # the kept set taken from filter_logits' rule: the top_k largest, then the largest whose
    # mass before them is below top_p).
    g = torch.Generator().manual_seed(0)
    logits = 2 * torch.randn(64, 10, generator=g)
    u = torch.rand(64, generator=g, dtype=F64)
    tokens, logps = sample_tokens(logits, u, temperature, top_k, top_p, return_logps=True)
    assert torch.equal(tokens, sample_tokens(logits, u, temperature, top_k, top_p))  # same draw
    for b in range(64):
        z = logits[b].double() / temperature
        order = sorted(range(10), key=lambda j: -float(z[j]))
        kept = order[:top_k] if top_k else order
        p = torch.softmax(z[kept], -1)
        before, survivors = 0.0, []
        for j, pj in zip(kept, p.tolist()):
            if before < top_p:
                survivors.append(j)
            before += pj
        y = int(tokens[b])
        assert y in survivors
        want = float(z[y]) - math.log(sum(math.exp(float(z[j])) for j in survivors))
        assert float(logps[b]) == pytest.approx(want, abs=1e-12)


def test_greedy_draws_from_a_point_mass():
    tokens, logps = sample_tokens(torch.tensor([[0.1, 3.0, -2.0]]), torch.tensor([0.3], dtype=F64), 0.0, 0, 1.0,
                                  return_logps=True)
    assert tokens.tolist() == [1] and logps.tolist() == [0.0]


@pytest.fixture(scope="module")
def sft_policy():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSET)
    lm = AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float32).eval()
    return tok, PolicyModel(lm)


def _rollout(sft_policy, **kw) -> Rollout:
    from r1train.data.prompts import make_conversation, render_prompt
    tok, policy = sft_policy
    prompts = [tok(render_prompt(tok, make_conversation(f"What is {a} + {b}?")), add_special_tokens=False)
               ["input_ids"] for a, b in ((3, 4), (8, 1), (5, 9))]
    prompts = [p for p in prompts for _ in range(3)]  # groups of 3: shared prefill, compaction
    ids, mask = pad_prompts(prompts, tok.pad_token_id, "cpu")
    return generate(policy, tok, ids, mask, seeds=list(range(len(prompts))), max_new_tokens=40, **kw)


def _trainer_logps(sft_policy, r: Rollout, temperature: float) -> torch.Tensor:
    _, policy = sft_policy
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    attn = torch.cat([r.prompt_mask, r.completion_mask], 1)
    with torch.no_grad():
        return policy.completion_logprobs(ids, attn, position_ids_from_mask(attn), r.completion_ids,
                                          r.prompt_ids.shape[1], temperature=temperature)  # [B, T]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_the_engines_log_probs_equal_the_trainers_in_float32(sft_policy, temperature):
    """The KV-cache decode (logits of the last position, a shared prefill, compaction) and the
    training forward (every position at once, the fused log-prob kernel) compute the same
    numbers up to float32 rounding: on one process in float32 the mismatch KL is ~0."""
    r = _rollout(sft_policy, temperature=temperature)
    mask = r.completion_mask.bool()
    assert r.logps.shape == r.completion_ids.shape and r.logps.dtype == F64
    assert (r.logps[~mask] == 0).all() and len(set(r.lengths.tolist())) > 1
    trainer = _trainer_logps(sft_policy, r, temperature)
    diff = (trainer.double() - r.logps)[mask]
    assert diff.abs().max() < 1e-4, diff.abs().max()
    rho = diff.exp()
    assert float((rho - 1 - diff).mean()) < 1e-9  # the k3 mismatch KL the trainer logs
    _, m = rollout_correction(trainer, r.logps, mask, method="tis")
    assert float(m["mismatch_kl"]) < 1e-9 and float(m["is_truncated_frac"]) == 0


def test_with_top_p_the_sampler_is_a_truncated_distribution(sft_policy):
    # top_p renormalizes over the kept tokens: log pi_sampler = log pi - log(kept mass) >= log pi,
    # so rho = pi_train / pi_sampler = kept mass <= 1, < 1 where the policy is unsure.
    r = _rollout(sft_policy, temperature=1.0, top_p=0.8)
    mask = r.completion_mask.bool()
    trainer = _trainer_logps(sft_policy, r, 1.0).double()
    log_rho = (trainer - r.logps)[mask]
    assert log_rho.max() < 1e-5 and log_rho.min() < -0.01, (log_rho.max(), log_rho.min())


def test_the_batch_carries_and_slices_the_sampler_log_probs(sft_policy):
    tok, _ = sft_policy
    a, b = _rollout(sft_policy, temperature=1.0), _rollout(sft_policy, temperature=0.7)
    batch = GRPOBatch.from_rollouts([a, b], [{}] * 18, tok.pad_token_id)
    T = batch.completion_ids.shape[1]
    assert batch.sampler_logps.shape == (18, T)
    torch.testing.assert_close(batch.sampler_logps[9:, : b.logps.shape[1]], b.logps, rtol=0, atol=0)
    mb = batch.micro([10, 2])
    t = mb.completion_ids.shape[1]
    torch.testing.assert_close(mb.sampler_logps, batch.sampler_logps[[10, 2], :t], rtol=0, atol=0)
    assert (mb.sampler_logps[mb.completion_mask == 0] == 0).all()
