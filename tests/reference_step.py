"""One GRPO optimizer step and one SFT step (with distillation's token-level KL) written from the
papers, in float64, apart from the trainer.

Given the weights at the start of a step, the frozen reference's weights, each row's prompt and
sampled completion (token ids), each reward function's raw value per row, the optimizer's moments
and the options, `grpo_step` computes with plain loops over rows and Hugging Face forwards:

  r_i        = sum_f w_f R_f(o_i)                                   weighted rewards
  A_i        = (r_i - mean_G r) / (std_G r + 1e-4)   (unbiased std)   DeepSeekMath Sec. 4.1.2
             or r_i - mean of the other G-1 rewards                 RLOO
  logp_it    = log softmax(logits / temperature)[o_it]              each row alone, unpadded
  ratio_it   = exp(logp_it - old_it)                                old = logp at the step's start
  term_it    = -min(ratio A, clip(ratio, 1 - eps_low, 1 + eps_high) A) + beta k3_it
  k3_it      = exp(ref_it - logp_it) - (ref_it - logp_it) - 1       DeepSeekMath Eq. 4
  loss       = grpo:    1/N sum_i 1/|o_i| sum_t term_it             DeepSeekMath Eq. 3
               bnpo, dapo: sum_i sum_t term_it / sum_i |o_i|        DAPO Eq. 8 (one process)
               dr_grpo: sum_i sum_t term_it / (N L)                 Dr. GRPO's released code
             rows left out (grpo.mask_truncated: a row that hit max_new_tokens; grpo.drop_zero_std_groups:
             the rows of a group whose rewards are all equal) leave the sums over i and sum_i |o_i|,
             and stay in N, the completions sampled (the trainer's docstring)
  metrics    kl (k3), ratio, clip fractions (A < 0 and ratio < 1 - eps_low; A > 0 and ratio >
             1 + eps_high; either) and the entropy of softmax(logits / temperature): means over
             every token of the rows in the loss, of every pass; the loss averaged over passes
  w_it       weights of the policy term only (term_it = w_it * -min(..) + beta k3_it), the
             denominators unchanged, from two selections made at the step's start:
               rho        = exp(old_it - sampler_it), or exp(sum_t ...) per row (sequence level)
               tis        w = min(rho, C);  mis: w = rho inside [C_low, C], else 0   (Yao et al. 2025)
               entropy    w *= [H_it >= tau], tau the entropy of the k-th token from the top of
                          every kept token's entropy sorted, k = the fewest reaching a share q
                          ("Beyond the 80/20 Rule")
             logged: mismatch_kl = mean of rho_t - 1 - log rho_t (token ratios), the mean
             weight, the share truncated or masked, the share the entropy kept, and tau
  g          = d loss / d theta; |g| its global norm; g *= min(1, max_norm / (|g| + 1e-6))
  lr         = lr0 * (k + 1) / warmup (k < warmup), else lr0 (constant) or the cosine formula;
               k = training steps already taken
  AdamW      theta *= 1 - lr wd (matrices only); m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
             theta -= lr m / (1 - b1^t) / (sqrt(v / (1 - b2^t)) + 1e-8)

num_iterations passes each take the whole batch's gradient and one AdamW step, with `old` fixed
at the step's start. SFT (`sft_step`): the token-level cross-entropy of each document alone, over
every labelled token of the step, plus kl_weight times KL(teacher || student) at those tokens.
It shares nothing with the trainer's code but the model class it loads.

That class keeps some float32 inside a float64 model (Hugging Face's RMSNorm normalizes in
float32), so two correct computations of one gradient that sum in another order (packed rows vs
one row at a time) agree to ~1e-7 relative, not ~1e-15; AdamW's division by sqrt(v) blows that up
on the smallest gradient elements. `grpo_step` therefore checks the gradient and the update
separately (its docstring).
"""
from __future__ import annotations

import math
from fractions import Fraction

import torch
from transformers import AutoModelForCausalLM


def load_float64(path: str, state: dict[str, torch.Tensor] | None = None):
    """The Hugging Face model at `path` in float64, with `state` (name -> tensor) loaded over it."""
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    if state is not None:
        missing = set(dict(lm.named_parameters())) - set(state)
        assert not missing, f"no weights given for {sorted(missing)[:3]}"
        with torch.no_grad():
            for name, p in lm.named_parameters():
                p.copy_(state[name].to(torch.float64))
    lm.eval()  # dropout off, as the trainer's default
    return lm


def weighted_rewards(per_fn: list[list[float]], weights: list[float]) -> list[float]:
    return [sum(w * v for w, v in zip(weights, row)) for row in per_fn]


def group_advantages(rewards: list[float], G: int, estimator: str = "grpo") -> list[float]:
    out = []
    for k in range(0, len(rewards), G):
        group = rewards[k:k + G]
        mean = sum(group) / G
        if estimator == "rloo":
            out += [r - (sum(group) - r) / (G - 1) for r in group]
            continue
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (G - 1))
        out += [0.0 if std == 0 else (r - mean) / (std + 1e-4) for r in group]
    return out


def completion_logprobs(lm, prompt: list[int], completion: list[int], temperature: float,
                        entropy: bool = False):
    """[T] log pi(o_t | q, o_<t) of one row, alone and unpadded (and [T] entropies of pi(. | q, o_<t))."""
    ids = torch.tensor([prompt + completion])
    logits = lm(input_ids=ids).logits[0, len(prompt) - 1:-1] / temperature  # [T, V]
    every = torch.log_softmax(logits, dim=-1)  # [T, V]
    logp = every[torch.arange(len(completion)), torch.tensor(completion)]  # [T]
    if not entropy:
        return logp
    return logp, -(every.exp() * every).sum(-1).detach()


def kept_rows(rewards: list[float], truncated: list[bool], G: int, mask_truncated: bool,
              drop_zero_std_groups: bool) -> list[bool]:
    """Which rows are in the loss (module docstring)."""
    keep = []
    for k in range(0, len(rewards), G):
        flat = max(rewards[k:k + G]) == min(rewards[k:k + G])
        keep += [not (mask_truncated and t) and not (drop_zero_std_groups and flat) for t in truncated[k:k + G]]
    return keep


def lr_at(k: int, lr: float, warmup: int, max_steps: int, schedule: str, min_ratio: float) -> float:
    if k < warmup:
        return lr * (k + 1) / warmup
    if schedule == "constant":
        return lr
    progress = min(max((k - warmup) / max(1, max_steps - warmup), 0.0), 1.0)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def grpo_loss(lm, rows, advantages, old, ref, keep, *, loss_type, beta, eps_low, eps_high, temperature,
              max_new_tokens, weights=None) -> tuple[torch.Tensor, dict]:
    """The step's objective (module docstring) at lm's weights, a float64 scalar with a graph, and
    the statistics' sums over the tokens of the rows kept ("tokens": their count). `weights`:
    each row's [T] weights of the policy term (None: 1)."""
    sums, lengths = [], []
    stats = dict.fromkeys(("tokens", "kl", "ratio_mean", "clip_frac_low", "clip_frac_high", "clip_frac",
                           "entropy"), 0.0)
    weights = weights or [None] * len(rows)
    for (prompt, completion), a, old_i, ref_i, kept, w in zip(rows, advantages, old, ref, keep, weights):
        if not kept:
            continue
        logp, entropy = completion_logprobs(lm, prompt, completion, temperature, entropy=True)
        ratio = torch.exp(logp - old_i)
        clipped = ratio.clamp(1 - eps_low, 1 + eps_high)
        term = -torch.minimum(ratio * a, clipped * a)
        if w is not None:
            term = w * term
        k3 = torch.exp(ref_i - logp) - (ref_i - logp) - 1
        if beta:
            term = term + beta * k3
        sums.append(term.sum())
        lengths.append(len(completion))
        low, high = (ratio < 1 - eps_low) & (a < 0), (ratio > 1 + eps_high) & (a > 0)
        for name, x in (("tokens", torch.ones_like(logp)), ("kl", k3 if beta else torch.zeros_like(k3)),
                        ("ratio_mean", ratio), ("clip_frac_low", low), ("clip_frac_high", high),
                        ("clip_frac", low | high), ("entropy", entropy)):
            stats[name] += float(x.detach().double().sum())
    n = len(rows)
    if loss_type == "grpo":
        loss = sum(s / max(t, 1) for s, t in zip(sums, lengths)) / n
    elif loss_type in ("bnpo", "dapo"):
        loss = sum(sums) / max(sum(lengths), 1)
    elif loss_type == "dr_grpo":
        loss = sum(sums) / (n * max_new_tokens)
    else:
        raise ValueError(loss_type)
    return loss, stats


def adamw(params: dict, grads: dict, state: dict, *, lr, betas, weight_decay, decays) -> None:
    """torch.optim.AdamW's update (eps 1e-8, no amsgrad), in place; `state`: name -> (m, v, t)."""
    b1, b2 = betas
    for name, p in params.items():
        g = grads[name]
        m, v, t = state.get(name, (torch.zeros_like(p), torch.zeros_like(p), 0))
        t += 1
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        state[name] = (m, v, t)
        wd = weight_decay if decays(name) else 0.0
        new = p * (1 - lr * wd) - lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + 1e-8)
        params[name] = new


def token_selection(rows, old, sampler, keep, entropies, g) -> tuple[list, dict]:
    """Each row's [T] weights of the policy term (None everywhere when no selection is on) and
    the selection's logged means (module docstring). `sampler`: each row's [T] sampler log-probs;
    `entropies`: each row's [T] entropies at the step's start; `g`: the GRPOConfig."""
    kept_rows = [i for i in range(len(rows)) if keep[i]]
    tokens = sum(len(rows[i][1]) for i in kept_rows)
    weights = [torch.ones(len(c), dtype=torch.float64) for _, c in rows]
    logged = {}
    if sampler is not None:
        mismatch = 0.0
        for i in kept_rows:
            for t in range(len(rows[i][1])):
                x = float(old[i][t]) - float(sampler[i][t])
                mismatch += math.exp(x) - 1 - x
        logged["mismatch_kl"] = mismatch / max(tokens, 1)
    if g.rollout_correction != "none":
        outside, bounds = 0, [math.log(g.correction_bound)] + ([math.log(g.correction_bound_low)]
                                                             if g.correction_bound_low else [])
        # how near a ratio comes to a bound (in log): a ratio at rounding distance from one is a
        # coin toss between the trainer's logps and these
        logged["_bound_gap"] = min(abs(float(old[i][t]) - float(sampler[i][t]) - b) if g.correction_level == "token"
                                   else abs(sum(float(old[i][u]) - float(sampler[i][u])
                                                for u in range(len(rows[i][1]))) - b)
                                   for i in kept_rows for t in range(len(rows[i][1])) for b in bounds)
        for i in kept_rows:
            log_row = sum(float(old[i][t]) - float(sampler[i][t]) for t in range(len(rows[i][1])))
            for t in range(len(rows[i][1])):
                log_rho = log_row if g.correction_level == "sequence" else float(old[i][t]) - float(sampler[i][t])
                rho = math.exp(log_rho)
                if g.rollout_correction == "tis":
                    weights[i][t] = min(rho, g.correction_bound)
                    outside += rho > g.correction_bound
                else:
                    inside = g.correction_bound_low <= rho <= g.correction_bound
                    weights[i][t] = rho if inside else 0.0
                    outside += not inside
        logged["is_weight_mean"] = sum(float(weights[i].sum()) for i in kept_rows) / max(tokens, 1)
        name = "is_truncated_frac" if g.rollout_correction == "tis" else "is_masked_frac"
        logged[name] = outside / max(tokens, 1)
    if g.top_entropy_quantile < 1:
        every = sorted((float(h) for i in kept_rows for h in entropies[i]), reverse=True)
        share, k = Fraction(str(g.top_entropy_quantile)), 1
        while k < len(every) and Fraction(k, len(every)) < share:
            k += 1
        tau, selected = every[k - 1], 0
        for i in kept_rows:
            on = torch.tensor([float(h) >= tau for h in entropies[i]], dtype=torch.float64)
            weights[i] = weights[i] * on
            selected += int(on.sum())
        logged.update(entropy_kept_frac=selected / max(tokens, 1), entropy_threshold=tau)
        # how far tau is from the next entropy down: a gap at float rounding would make the
        # selection a coin toss between the trainer's float32-normed entropies and these
        logged["_entropy_gap"] = tau - max([h for h in every if h < tau], default=-math.inf)
    if g.rollout_correction == "none" and g.top_entropy_quantile == 1:
        weights = None
    return weights, logged


def grpo_step(path: str, pass_weights: list[dict], trainer_grads: list[dict], ref_weights: dict | None, rows,
              truncated, per_fn, reward_weights, adam_state: dict, *, G: int, k: int, cfg,
              sampler_logps: list | None = None) -> dict:
    """One training step (module docstring), checked in two independent halves per pass:

    - the objective's gradient at the weights the pass starts from (`pass_weights[i]`, name ->
      tensor), from rows, rewards and the reference alone;
    - the update those weights receive from a given gradient (`trainer_grads[i]`): norm,
      clipping, the learning rate of the schedule, AdamW. Fed the trainer's own gradient, it
      checks the trainer's update in pure float64, apart from the model's own precision.

    `rows`: [(prompt ids, completion ids)]; `truncated`: [bool] whether each row hit
    max_new_tokens; `ref_weights`: the frozen reference (None: beta 0); `adam_state`: name ->
    (m, v, t) before the step, updated; `k`: training steps already taken; `cfg`: a GRPOJobConfig
    (its numbers only); `sampler_logps`: each row's [T] log-probs under the sampler (the rollout
    correction's pi_sampler; None: no mismatch logged). Returns {"rewards", "advantages", "keep"
    (the rows in the loss), "lr", "grads", "norms" (of the objective's gradients), "given_norms"
    (of `trainer_grads`), "weights" (after each pass's update), "metrics" (the loss and the
    per-token means of the step, and the selections' logged numbers), "entropy_gap",
    "bound_gap" (`token_selection`: how far the selections are from a coin toss)}."""
    g, o, r = cfg.grpo, cfg.optim, cfg.rollout
    rewards = weighted_rewards(per_fn, reward_weights)
    advantages = group_advantages(rewards, G, g.advantage_estimator)
    keep = kept_rows(rewards, truncated, G, g.mask_truncated, g.drop_zero_std_groups)
    with torch.no_grad():
        start = load_float64(path, pass_weights[0])
        old, entropies = zip(*(completion_logprobs(start, p, c, r.temperature, entropy=True) for p, c in rows))
        ref = old
        if g.beta:
            ref_lm = load_float64(path, ref_weights)
            ref = [completion_logprobs(ref_lm, p, c, r.temperature) for p, c in rows]
    selection, logged = token_selection(rows, old, sampler_logps, keep, entropies, g)
    lr = lr_at(k, o.lr, o.warmup_steps, cfg.train.max_steps, o.schedule, o.min_lr_ratio)
    out = {"rewards": rewards, "advantages": advantages, "keep": keep, "lr": lr, "grads": [], "norms": [],
           "given_norms": [], "weights": []}
    losses, totals = [], {}
    for weights, given in zip(pass_weights, trainer_grads):
        lm = load_float64(path, weights)
        loss, stats = grpo_loss(lm, rows, advantages, old, ref, keep, loss_type=g.loss_type, beta=g.beta,
                                eps_low=g.epsilon_low, eps_high=g.epsilon_high or g.epsilon_low,
                                temperature=r.temperature, max_new_tokens=r.max_new_tokens, weights=selection)
        losses.append(float(loss.detach()))
        totals = {name: totals.get(name, 0.0) + x for name, x in stats.items()}
        loss.backward()
        grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in lm.named_parameters()}
        out["grads"].append(grads)
        out["norms"].append(math.sqrt(sum(float((x * x).sum()) for x in grads.values())))
        norm, params = apply_update(weights, given, adam_state, lr, o)
        out["given_norms"].append(norm)
        out["weights"].append(params)
    tokens = totals.pop("tokens")
    out["metrics"] = {"loss": sum(losses) / len(losses), **{name: x / tokens for name, x in totals.items()}}
    out["entropy_gap"] = logged.pop("_entropy_gap", None)
    out["bound_gap"] = logged.pop("_bound_gap", None)
    out["metrics"].update(logged)
    return out


def apply_update(weights: dict, given: dict, adam_state: dict, lr: float, o) -> tuple[float, dict]:
    """The update half (grpo_step's docstring): (the norm of `given`, the weights after clipping
    and AdamW); `o`: an OptimConfig."""
    given = {n: given.get(n, torch.zeros_like(w)).to(torch.float64) for n, w in weights.items()}
    norm = math.sqrt(sum(float((x * x).sum()) for x in given.values()))
    if o.max_grad_norm > 0:
        coef = min(1.0, o.max_grad_norm / (norm + 1e-6))
        given = {n: x * coef for n, x in given.items()}
    params = {n: w.to(torch.float64).clone() for n, w in weights.items()}
    adamw(params, given, adam_state, lr=lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay,
          decays=lambda name: params[name].dim() >= 2)
    return norm, params


def sft_loss(lm, docs, teacher=None, kl_weight: float = 0.0) -> tuple[torch.Tensor, float, int]:
    """Token-level cross-entropy of the labelled tokens over every document of the step, each
    document alone from position 0 (labels -100 carry no loss; label t is predicted at t-1):

        loss = (sum_d sum_t -log p(y_dt) + kl_weight sum_d sum_t KL(teacher_dt || student_dt)) / #tokens

    Returns (loss with its graph, the summed NLL, #tokens)."""
    nll, kl, count = 0.0, 0.0, 0
    for ids, labels in docs:
        target = torch.tensor(labels[1:])
        keep = target != -100
        if not keep.any():
            continue
        logits = lm(input_ids=torch.tensor([ids])).logits[0, :-1][keep]  # [M, V]
        logp = torch.log_softmax(logits, dim=-1)
        nll = nll - logp[torch.arange(len(logp)), target[keep]].sum()
        if kl_weight:
            with torch.no_grad():
                t_logp = torch.log_softmax(teacher(input_ids=torch.tensor([ids])).logits[0, :-1][keep], dim=-1)
            kl = kl + (t_logp.exp() * (t_logp - logp)).sum()
        count += int(keep.sum())
    return (nll + kl_weight * kl) / max(count, 1), float(nll.detach()), count


def sft_step(path: str, weights: dict, given: dict, docs, adam_state: dict, *, k: int, cfg,
             teacher_path: str | None = None, kl_weight: float = 0.0) -> dict:
    """One SFT step in the two halves of `grpo_step`: the gradient of `sft_loss` at `weights`, and
    the update `weights` receive from the gradient `given` (the trainer's). `docs`: the step's
    documents as (input_ids, labels). Returns {"loss" (mean NLL, as logged), "grads", "norm",
    "given_norm", "lr", "weights"}."""
    o = cfg.optim
    lm = load_float64(path, weights)
    teacher = load_float64(teacher_path) if kl_weight else None
    loss, nll, count = sft_loss(lm, docs, teacher, kl_weight)
    loss.backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in lm.named_parameters()}
    lr = lr_at(k, o.lr, o.warmup_steps, cfg.train.max_steps, o.schedule, o.min_lr_ratio)
    given_norm, after = apply_update(weights, given, adam_state, lr, o)
    return {"loss": nll / max(count, 1), "grads": grads, "lr": lr, "given_norm": given_norm, "weights": after,
            "norm": math.sqrt(sum(float((x * x).sum()) for x in grads.values()))}
