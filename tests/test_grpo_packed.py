"""Packed GRPO passes (grpo.packing) against the padded per-row pass they replace.

A micro-batch packed into one row, each distinct prompt once and then its completions, must give
the log-probs of the padded rows `[prompt, completion i]` (float32, 1e-5) and their gradients
(1e-4 relative; the prompt's gradient is the sum over the completions that read it). The
trainer-level gradient checks, per loss type, are in test_grpo_update.py.
"""
import pytest
import torch
import torch.nn.functional as F

from r1train.data.tiny import TINY_MODEL_CONFIG
from r1train.grpo.batch import GRPOBatch, PackedRows, split_to, token_budget_micro_batches
from r1train.model.attention import attention_implementation, prefix_causal_mask, varlen_sdpa_attention
from r1train.model.engine import pad_prompts
from r1train.model.policy import PolicyModel

# ---------------------------------------------------------------- the attention itself

def test_prefixed_segments_match_the_dense_mask():
    """Segments [10 | 4 | 6 | 3 | 5 | 2]: segments 1, 2 continue 0; 4, 5 continue 3. Grouped-query
    heads (4 query, 2 key/value), against SDPA with the dense mask, in float64."""
    torch.manual_seed(0)
    cu, prefix_of = [0, 10, 14, 20, 23, 28, 30], [-1, 0, 0, -1, 3, 3]
    L = cu[-1]
    q = torch.randn(1, 4, L, 8, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, L, 8, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, L, 8, dtype=torch.float64, requires_grad=True)
    got = varlen_sdpa_attention(None, q, k, v, None, cu_seqlens=cu, prefix_of=prefix_of)[0]  # [1, L, H, D]
    mask = prefix_causal_mask(cu, prefix_of, L)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got.square().sum(), (q, k, v))
    g_want = torch.autograd.grad(want.square().sum(), (q, k, v))
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
    # Hand check of the mask: a token of segment 2 sees the prompt (0..9) and itself causally,
    # never segment 1 (10..13).
    row = mask[0, 0, 15]  # the second token of segment 2
    assert row[:10].all() and not row[10:14].any() and row[14:16].all() and not row[16:].any()


@pytest.mark.parametrize("prefix_of, why", [
    ([-1, 2, -1], "an earlier segment"),
    ([-1, 0, 1], "no prefix itself"),
])
def test_bad_prefixes_are_refused(prefix_of, why):
    q = k = v = torch.zeros(1, 2, 9, 4)
    with pytest.raises(ValueError, match=why):
        varlen_sdpa_attention(None, q, k, v, None, cu_seqlens=[0, 3, 6, 9], prefix_of=prefix_of)


# ---------------------------------------------------------------- the layout

def test_packed_layout_by_hand():
    """Rows 0 and 2 share prompt [5, 6, 7]; row 1 has prompt [8, 9]:

        ids       5 6 7 | 1 2 | 3 | 8 9 | 4 4 4
        segment   0       1     2   3     4        (1, 2 continue 0; 4 continues 3)
        position  0 1 2 | 3 4 | 3 | 0 1 | 2 3 4
    Row 0's token 1 (id 1) is predicted at position 2 (the prompt's last), token 2 at 3."""
    packed = PackedRows.build([[5, 6, 7], [8, 9], [5, 6, 7]], [[1, 2], [4, 4, 4], [3]], width=3)
    assert packed.input_ids.tolist() == [[5, 6, 7, 1, 2, 3, 8, 9, 4, 4, 4]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 4]]
    assert packed.cu_seqlens == [0, 3, 5, 6, 8, 11]
    assert packed.prefix_of == [-1, 0, 0, -1, 3]
    assert packed.targets.tolist() == [1, 2, 3, 4, 4, 4]
    assert packed.sources.tolist() == [2, 3, 2, 7, 8, 9]
    assert packed.scatter(torch.arange(1.0, 7.0)).tolist() == [[1, 2, 0], [4, 5, 6], [3, 0, 0]]


# ---------------------------------------------------------------- against the padded pass

def _model(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=96, **{**TINY_MODEL_CONFIG, "attention_dropout": 0.0})
    lm = Qwen2ForCausalLM(cfg).float()
    lm.set_attn_implementation("sdpa")
    return PolicyModel(lm)


def _batch(groups: int, group_size: int, seed: int = 0, pad: int = 0) -> GRPOBatch:
    """Groups with prompts of 5-12 tokens and completions of 1-9 tokens, padded as a rollout is."""
    g = torch.Generator().manual_seed(seed)
    prompts, completions = [], []
    for _ in range(groups):
        prompt = torch.randint(3, 96, (int(torch.randint(5, 13, (1,), generator=g)),), generator=g).tolist()
        for _ in range(group_size):
            prompts.append(prompt)
            completions.append(torch.randint(3, 96, (int(torch.randint(1, 10, (1,), generator=g)),),
                                             generator=g).tolist())
    p_ids, p_mask = pad_prompts(prompts, pad, "cpu")  # [N, P] left-padded
    T = max(len(c) for c in completions)
    c_ids = torch.full((len(completions), T), pad, dtype=torch.long)
    c_mask = torch.zeros(len(completions), T, dtype=torch.long)
    for i, c in enumerate(completions):
        c_ids[i, :len(c)], c_mask[i, :len(c)] = torch.tensor(c), 1
    return GRPOBatch(input_ids=torch.cat([p_ids, c_ids], 1), attention_mask=torch.cat([p_mask, c_mask], 1),
                     prompt_len=p_ids.shape[1], completion_ids=c_ids, completion_mask=c_mask,
                     truncated=torch.zeros(len(prompts), dtype=torch.bool), texts=[""] * len(prompts),
                     records=[{}] * len(prompts))


def _padded(policy, batch, temperature):
    return policy.completion_logprobs(batch.input_ids, batch.attention_mask, batch.position_ids,
                                      batch.completion_ids, batch.prompt_len, temperature=temperature,
                                      return_entropy=True)


def _packed(policy, batch, temperature):
    packed = batch.packed()
    out = policy.packed_logprobs(packed.input_ids, packed.position_ids, packed.sources, packed.targets,
                                 temperature=temperature, return_entropy=True, **packed.attention())
    return tuple(packed.scatter(o) for o in out)


@pytest.mark.parametrize("groups, group_size, temperature", [(3, 4, 1.0), (2, 5, 0.7), (5, 1, 1.0)])
def test_packed_logprobs_and_gradients_equal_the_padded_rows(groups, group_size, temperature):
    policy = _model()
    batch = _batch(groups, group_size, seed=groups)
    mask = batch.completion_mask.bool()
    weights = torch.randn(batch.completion_ids.shape, generator=torch.Generator().manual_seed(1))

    grads = {}
    for name, fn in (("padded", _padded), ("packed", _packed)):
        policy.zero_grad(set_to_none=True)
        logps, entropy = fn(policy, batch, temperature)  # [N, T] each
        grads[name] = (logps, entropy)
        ((logps * weights)[mask].sum() + entropy[mask].sum()).backward()
        grads[name] += ({n: p.grad.clone() for n, p in policy.named_parameters()},)
    (lp_a, ent_a, g_a), (lp_b, ent_b, g_b) = grads["padded"], grads["packed"]
    torch.testing.assert_close(lp_b[mask], lp_a[mask], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ent_b[mask], ent_a[mask], rtol=1e-5, atol=1e-5)
    assert (lp_b[~mask] == 0).all()  # no token there: nothing computed
    for n, grad in g_a.items():
        scale = grad.abs().max().clamp(min=1e-12)
        torch.testing.assert_close(g_b[n], grad, rtol=1e-4, atol=1e-4 * scale, msg=n)
    # The packed row holds each prompt once.
    packed = batch.packed()
    assert len(packed) == batch.attention_mask[:, :batch.prompt_len].sum() // group_size + mask.sum()


def test_packed_pass_leaves_the_generation_attention_alone():
    policy = _model()
    batch = _batch(2, 2)
    with torch.no_grad():
        _packed(policy, batch, 1.0)
    assert policy.lm.config._attn_implementation == "sdpa"
    with attention_implementation(policy.lm, "eager"):
        assert policy.lm.config._attn_implementation == "eager"
    assert policy.lm.config._attn_implementation == "sdpa"


# ---------------------------------------------------------------- token-budget micro-batches

def test_token_budget_counts_a_prompt_once_per_micro_batch():
    """Prompts a (10 tokens) x 3 rows, b (4 tokens) x 2 rows; completions 5, 5, 5, 3, 20. Budget 22:
    [0, 1] = 10 + 5 + 5 = 20 (row 2 would make 25); [2, 3] = 15 + 7 = 22; [4] = 24 > 22 alone."""
    prompts = [("a",) * 10] * 3 + [("b",) * 4] * 2
    lengths = [5, 5, 5, 3, 20]
    assert token_budget_micro_batches(range(5), prompts, lengths, 22) == [[0, 1], [2, 3], [4]]
    assert token_budget_micro_batches(range(5), prompts, lengths, 1000) == [[0, 1, 2, 3, 4]]


def test_split_to_gives_every_rank_the_same_number_of_forwards():
    assert split_to([[0, 1, 2, 3], [4]], 2) == [[0, 1, 2, 3], [4]]
    assert split_to([[0, 1, 2, 3], [4]], 3) == [[0, 1], [2, 3], [4]]
    assert split_to([[0, 1, 2], [3, 4]], 5) == [[0], [1], [2], [3], [4]]
    with pytest.raises(ValueError, match="6 micro-batches from 5 rows"):
        split_to([[0, 1, 2], [3, 4]], 6)

