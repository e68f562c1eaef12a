"""Multi-turn rows (issue 33): completions made of the model's segments and the tool turns the
engine inserted between them.

The loss learns from the model's own tokens only: `GRPOBatch.model_mask` is 0 on inserted tokens,
and the loss, its |o_i| and token counts, GSPO's sequence ratio and the KL must then be those of
the model's tokens alone (a float64 per-token transcription of DeepSeekMath Eq. 3 below), the
gradient on the logits that predict an inserted token exactly 0, and the inserted tokens still
context (packed and padded passes read them).
"""
import math

import pytest
import torch

from r1train.grpo.batch import GRPOBatch
from r1train.grpo.loss import loss_denominator, policy_loss
from r1train.model.engine import Rollout, pad_prompts
from r1train.model.policy import PolicyModel

# ---------------------------------------------------------------------------------------------
# The loss over the model's tokens
# ---------------------------------------------------------------------------------------------


def _tiny_policy(dtype=torch.float64) -> PolicyModel:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from r1train.data.tiny import TINY_MODEL_CONFIG
    torch.manual_seed(0)
    lm = Qwen2ForCausalLM(Qwen2Config(vocab_size=96, **TINY_MODEL_CONFIG)).to(dtype)
    lm.config._attn_implementation = "sdpa"
    return PolicyModel(lm)


def _multiturn_batch(seed: int = 0) -> GRPOBatch:
    """Two groups of 3 rows. Completion runs (M = model, I = inserted):
        row 0  M4 I3 M2        row 1  M5              row 2  M2 I4 M3 I2 M1
        row 3  M3 I2 M2        row 4  M1 I5 M4        row 5  M6 (one token of padding after)"""
    g = torch.Generator().manual_seed(seed)
    runs = [[4, -3, 2], [5], [2, -4, 3, -2, 1], [3, -2, 2], [1, -5, 4], [6]]
    prompts = [torch.randint(3, 96, (n,), generator=g).tolist() for n in (5, 7)]
    prompts = [prompts[0]] * 3 + [prompts[1]] * 3
    T = max(sum(abs(r) for r in row) for row in runs) + 1
    rollouts = []
    for p, row in zip(prompts, runs):
        ids = torch.randint(3, 96, (1, T), generator=g)
        c_mask = torch.zeros(1, T, dtype=torch.long)
        m_mask = torch.zeros(1, T, dtype=torch.long)
        at = 0
        for r in row:
            c_mask[0, at:at + abs(r)] = 1
            m_mask[0, at:at + abs(r)] = int(r > 0)
            at += abs(r)
        ids = ids.masked_fill(c_mask == 0, 0)
        p_ids, p_mask = pad_prompts([p], 0, "cpu")
        logps = torch.where(m_mask > 0, -torch.rand(1, T, generator=g, dtype=torch.float64), 0.0)
        rollouts.append(Rollout(p_ids, p_mask, ids, c_mask, torch.zeros(1, dtype=torch.bool), [""], logps,
                                model_mask=m_mask))
    batch = GRPOBatch.from_rollouts(rollouts, [{}] * 6, pad_id=0)
    batch.advantages = torch.tensor([1.0, -0.5, 0.25, -1.0, 2.0, 0.5], dtype=torch.float64)
    batch.loss_weight = torch.ones(6, dtype=torch.float64)
    return batch


def reference_loss(logps, old_logps, ref_logps, advantages, completion_mask, model_mask, *, loss_type,
                   importance_sampling, beta, eps=0.2):
    """-J of DeepSeekMath Eq. 3 (k3 KL, Eq. 4) with per-token Python loops in float64, over the
    tokens the model wrote (completion_mask and model_mask both 1); GSPO's s_i for "sequence"."""
    N, T = completion_mask.shape
    own = [[t for t in range(T) if completion_mask[i, t] and model_mask[i, t]] for i in range(N)]
    total_tokens = sum(len(o) for o in own)
    total = 0.0
    for i in range(N):
        A = float(advantages[i])
        s = math.exp(sum(float(logps[i, t] - old_logps[i, t]) for t in own[i]) / len(own[i]))
        row = 0.0
        for t in own[i]:
            r = s if importance_sampling == "sequence" else math.exp(float(logps[i, t] - old_logps[i, t]))
            term = -min(r * A, min(max(r, 1 - eps), 1 + eps) * A)
            d = float(ref_logps[i, t] - logps[i, t])
            term += beta * (math.exp(d) - d - 1)
            row += term
        total += row / len(own[i]) if loss_type == "grpo" else row
    return total / (N if loss_type == "grpo" else total_tokens)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("loss_type, importance_sampling", [("grpo", "token"), ("dapo", "token"),
                                                             ("grpo", "sequence"), ("bnpo", "token")])
def test_the_loss_learns_from_model_tokens_only(packed, loss_type, importance_sampling):
    policy = _tiny_policy()
    batch = _multiturn_batch()
    own = (batch.completion_mask * batch.model_mask).bool()
    inserted = (batch.completion_mask * (1 - batch.model_mask)).bool()
    assert inserted.sum() == 3 + 4 + 2 + 2 + 5 and torch.equal(batch.loss_mask.bool(), own)

    # Log-probs as the trainer takes them (packed or padded pass), and from explicit logits.
    if packed:
        rows = batch.packed()
        logps = rows.scatter(policy.packed_logprobs(rows.input_ids, rows.position_ids, rows.sources, rows.targets,
                                                    **rows.attention()))  # [N, T]
    else:
        logps = policy.completion_logprobs(batch.input_ids, batch.attention_mask, batch.position_ids,
                                           batch.completion_ids, batch.prompt_len)  # [N, T]
    logits = policy.lm(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits  # [N, P + T, V]
    logits.retain_grad()
    P = batch.prompt_len
    explicit = logits[:, P - 1:-1].log_softmax(-1).gather(-1, batch.completion_ids[..., None])[..., 0]  # [N, T]
    # Inserted tokens are context: the packed or padded pass equals the full-sequence forward.
    torch.testing.assert_close(torch.where(own, logps, 0.0), torch.where(own, explicit, 0.0))

    g = torch.Generator().manual_seed(3)
    old = (explicit.detach() + 0.1 * torch.randn(explicit.shape, generator=g, dtype=torch.float64))
    ref = (explicit.detach() + 0.1 * torch.randn(explicit.shape, generator=g, dtype=torch.float64))
    # Inserted positions hold garbage in old/ref: the loss must never read them.
    old, ref = old.masked_fill(inserted, 1e3), ref.masked_fill(inserted, -1e3)
    tokens = batch.loss_mask.sum()
    denominator = loss_denominator(loss_type, sequences=len(batch), tokens=tokens, rank_tokens=tokens,
                                   world_size=1)
    loss, _ = policy_loss(explicit, old, batch.advantages, batch.loss_mask, ref_logps=ref, beta=0.04,
                          loss_type=loss_type, importance_sampling=importance_sampling, denominator=denominator)
    want = reference_loss(explicit.detach(), old, ref, batch.advantages, batch.completion_mask, batch.model_mask,
                          loss_type=loss_type, importance_sampling=importance_sampling, beta=0.04)
    assert abs(loss.detach().item() - want) < 1e-12 * max(1.0, abs(want))
    loss.backward()
    grad = logits.grad[:, P - 1:-1]  # [N, T, V]: the logits that predict completion token t
    assert (grad[inserted] == 0).all()  # exactly: no loss, KL or ratio term on an inserted token
    assert (grad[own].abs().sum(-1) > 0).all()


def test_model_mask_of_ones_is_the_single_turn_loss_bit_for_bit():
    batch = _multiturn_batch()
    single = GRPOBatch(**{**batch.__dict__, "model_mask": None})
    ones = GRPOBatch(**{**batch.__dict__, "model_mask": torch.ones_like(batch.completion_mask)})
    assert torch.equal(single.loss_mask, ones.loss_mask)
    assert torch.equal(single.loss_mask, batch.completion_mask.float())
    # A micro-batch keeps its rows' model mask, trimmed as the completion mask is.
    mb = batch.micro([2, 4])
    assert torch.equal(mb.model_mask, batch.model_mask[[2, 4], :mb.completion_mask.shape[1]])
    assert mb.loss_mask.sum() == (2 + 3 + 1) + (1 + 4)
