"""The generation engine's sampler (r1train/model/engine.py) against references that share none of
its code: Hugging Face `generate` on each prompt alone (no padding, no batch), softmax in float64,
and cases worked out by hand.

The model is the cold-start SFT checkpoint in tests/assets/tiny-r1-sft: unlike a random model it
writes `<think>..</think><answer>..</answer>` and ends with <|im_end|>, so EOS, stop strings and
truncation all happen at steps we can point at. It runs in float64: the tests below ask for the
same tokens from computations of other shapes (a row alone or in a padded batch, a shared or a
per-row prefill, HF's cache or the engine's), whose float32 sums, in other orders, could round
two near-equal logits apart and flip a greedy argmax or an inverse-CDF draw on another machine.
"""
from pathlib import Path

import pytest
import torch

from r1train.data.prompts import make_conversation, render_prompt
from r1train.data.task import TaskConfig, generate_problems
from r1train.model.engine import (
    filter_logits,
    generate,
    pad_prompts,
    position_ids_from_mask,
    row_uniforms,
    sample_tokens,
)
from r1train.model.policy import PolicyModel

ASSET = Path(__file__).resolve().parent / "assets" / "tiny-r1-sft"
# The task the checkpoint was trained on (configs/tiny-r1.yaml).
PROBLEMS = [p["problem"] for p in generate_problems(
    TaskConfig(min_operands=2, max_operands=3, max_value=9), 4, seed=0)]
# 'What is 5 - 4?', 'What is 6 + 6 + 7?', 'What is 2 - 1?', 'What is 8 + 1 + 6?'


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSET)
    lm = AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float64).eval()  # module docstring
    return tok, lm, PolicyModel(lm)


def _prompt(tok, i: int, system: bool = True) -> list[int]:
    # Without the system prompt a chat is ~28 tokens instead of ~105: batches mixing both
    # left-pad some rows by ~80 tokens.
    msgs = make_conversation(PROBLEMS[i]) if system else make_conversation(PROBLEMS[i], system_prompt="")
    return tok(render_prompt(tok, msgs), add_special_tokens=False)["input_ids"]


def _hf_greedy(lm, tok, prompt: list[int], max_new_tokens: int = 32) -> list[int]:
    """Hugging Face greedy decoding of one prompt alone, up to and including its first EOS."""
    ids = torch.tensor([prompt])
    out = lm.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                      do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    completion = out[0, len(prompt):].tolist()
    if tok.eos_token_id in completion:
        completion = completion[: completion.index(tok.eos_token_id) + 1]
    return completion


def _generate(tiny, prompts, seeds=None, **kw):
    tok, _, policy = tiny
    ids, mask = pad_prompts(prompts, tok.pad_token_id, "cpu")
    seeds = list(range(len(prompts))) if seeds is None else seeds
    return generate(policy, tok, ids, mask, seeds=seeds, **kw)


def _row(rollout, i: int) -> list[int]:
    """Row i's completion tokens under its mask."""
    return rollout.completion_ids[i][rollout.completion_mask[i].bool()].tolist()


# ---------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------

def test_greedy_left_padded_batch_equals_hf_generate_per_prompt(tiny):
    tok, lm, _ = tiny
    # Lengths ~107, 28, 104, 31: rows 1 and 3 are left-padded by ~80 tokens, and the rows end
    # at different steps, so finished rows keep riding along while the others decode.
    prompts = [_prompt(tok, 1), _prompt(tok, 0, system=False), _prompt(tok, 0), _prompt(tok, 3, system=False)]
    refs = [_hf_greedy(lm, tok, p) for p in prompts]
    assert all(r[-1] == tok.eos_token_id for r in refs) and len({len(r) for r in refs}) > 1
    r = _generate(tiny, prompts, max_new_tokens=32, temperature=0.0)
    steps = max(len(ref) for ref in refs)
    assert r.completion_ids.shape == r.completion_mask.shape == (4, steps)  # stops once all rows end
    for i, ref in enumerate(refs):
        assert r.completion_ids[i, : len(ref)].tolist() == ref, i
        assert r.completion_mask[i].tolist() == [1] * len(ref) + [0] * (steps - len(ref))
        assert (r.completion_ids[i, len(ref):] == tok.pad_token_id).all()
        assert r.texts[i] == tok.decode(ref, skip_special_tokens=True)
    assert not r.truncated.any()
    assert r.lengths.tolist() == [len(ref) for ref in refs]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_shared_prefill_and_compaction_give_the_plain_paths_completions(tiny, temperature):
    """Groups of one prompt (prefilled once, cache copied to its rows) whose rows end at
    different steps (finished rows leave the decode batch): the same rows as the plain path,
    which prefills every row and decodes every row to the end. Rows of a group differ in seed."""
    tok, _, _ = tiny
    prompts = [_prompt(tok, 1)] * 3 + [_prompt(tok, 0, system=False)] * 3 + [_prompt(tok, 2)] * 2
    kw = dict(seeds=[11, 12, 13, 21, 22, 23, 31, 32], max_new_tokens=32, temperature=temperature)
    fast = _generate(tiny, prompts, **kw)
    plain = _generate(tiny, prompts, share_prompts=False, compact=False, **kw)
    lengths = fast.lengths.tolist()
    assert len(set(lengths)) > 1 and fast.truncated.sum() < len(prompts), lengths  # compaction ran
    assert [_row(fast, i) for i in range(8)] == [_row(plain, i) for i in range(8)]
    assert fast.texts == plain.texts and fast.truncated.tolist() == plain.truncated.tolist()
    assert torch.equal(fast.completion_mask, plain.completion_mask)


@pytest.mark.parametrize("sync_every", [3, 8, 64])
def test_reading_the_finished_rows_every_k_steps_gives_the_same_rollout(tiny, sync_every):
    """`sync_every` k > 1 (the GPU's setting): rows that ended keep being decoded until the next
    check and compaction waits for it, yet every tensor of the rollout is the one of a check at
    every step, its width included (the steps after the last row's end are dropped), and so are
    the log-probs of the drawn tokens. k = 64 > max_new_tokens: one check, at the last step."""
    tok, _, _ = tiny
    prompts = [_prompt(tok, 1)] * 3 + [_prompt(tok, 0, system=False)] * 3 + [_prompt(tok, 2)] * 2
    for max_new in (32, 20):  # 20: some rows are truncated, the rollout is 20 wide
        kw = dict(seeds=[11, 12, 13, 21, 22, 23, 31, 32], max_new_tokens=max_new, temperature=1.0)
        every = _generate(tiny, prompts, **kw)
        lazy = _generate(tiny, prompts, sync_every=sync_every, **kw)
        assert len(set(every.lengths.tolist())) > 1
        for name in ("completion_ids", "completion_mask", "truncated", "logps"):
            assert torch.equal(getattr(lazy, name), getattr(every, name)), (max_new, name)
        assert lazy.texts == every.texts
    assert every.truncated.any() and not every.truncated.all()


def test_stop_strings_are_checked_at_every_step_whatever_sync_every(tiny):
    tok, _, _ = tiny
    prompts = [_prompt(tok, 1), _prompt(tok, 0, system=False)]
    kw = dict(max_new_tokens=32, temperature=0.0, stop_strings=["</think>"])
    every, lazy = _generate(tiny, prompts, **kw), _generate(tiny, prompts, sync_every=8, **kw)
    assert all(t.endswith("</think>") for t in tok.batch_decode([_row(every, i) for i in range(2)]))
    assert torch.equal(lazy.completion_ids, every.completion_ids) and lazy.texts == every.texts


def test_policy_logprobs_of_a_rollout_equal_hf_log_softmax(tiny):
    # The training forward of PolicyModel on a left-padded prompt + right-padded completion
    # batch (laid out as grpo/batch.py does) against each row run alone through the HF model.
    tok, lm, policy = tiny
    prompts = [_prompt(tok, 1), _prompt(tok, 2, system=False)]
    r = _generate(tiny, prompts, max_new_tokens=32, temperature=0.0)
    p, temperature = r.prompt_ids.shape[1], 0.7
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    attn = torch.cat([r.prompt_mask, r.completion_mask], 1)
    with torch.no_grad():
        logps = policy.completion_logprobs(ids, attn, position_ids_from_mask(attn), r.completion_ids, p,
                                           temperature=temperature)  # [B, T]
        for i, prompt in enumerate(prompts):
            completion = _row(r, i)
            logits = lm(torch.tensor([prompt + completion])).logits[0].double() / temperature
            # Token t of the completion is predicted at position len(prompt) - 1 + t.
            ref = logits[len(prompt) - 1: -1].log_softmax(-1)[torch.arange(len(completion)), completion]
            torch.testing.assert_close(logps[i, : len(completion)].double(), ref, rtol=1e-4, atol=1e-4)


def test_policy_logprobs_under_bf16_autocast(tiny):
    """The single-GPU trainer runs forwards under bf16 autocast. On a CPU the same autocast
    shows the path works: the LM head reaches the fused log-probs in bf16 (float32 log-probs
    out, near the float32 ones), and gradients reach the float32 parameters."""
    import copy

    tok, _, _ = tiny
    lm = copy.deepcopy(tiny[1]).float()  # autocast lowers float32 only
    policy = PolicyModel(lm)
    prompts = [_prompt(tok, 1), _prompt(tok, 2, system=False)]
    r = _generate(tiny, prompts, max_new_tokens=16, temperature=0.0)
    ids = torch.cat([r.prompt_ids, r.completion_ids], 1)
    attn = torch.cat([r.prompt_mask, r.completion_mask], 1)
    args = (ids, attn, position_ids_from_mask(attn))
    args = (*args, r.completion_ids, r.prompt_ids.shape[1])
    with torch.no_grad():
        exact = policy.completion_logprobs(*args, temperature=0.7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps = policy.completion_logprobs(*args, temperature=0.7)
    assert logps.dtype == torch.float32
    mask = r.completion_mask.bool()
    err = (logps - exact)[mask].abs()
    assert 0 < err.max() < 0.05, err.max()  # bf16 was used (measured 0.005), rounding only
    logps[mask].sum().backward()
    head = lm.get_output_embeddings().weight
    assert head.grad is not None and head.grad.dtype == torch.float32
    assert torch.isfinite(head.grad).all() and head.grad.abs().sum() > 0
    lm.zero_grad(set_to_none=True)


def test_a_rows_sample_depends_only_on_its_seed(tiny):
    tok, _, _ = tiny
    a = _prompt(tok, 0)  # 104 tokens
    kw = dict(max_new_tokens=24, temperature=1.0)
    alone = _generate(tiny, [a], seeds=[1234], **kw)
    # First row, longest prompt, next to a short prompt ...
    first = _generate(tiny, [a, _prompt(tok, 2, system=False)], seeds=[1234, 1], **kw)
    # ... and last row, left-padded by 3 behind a longer prompt, among other neighbours.
    last = _generate(tiny, [_prompt(tok, 1), _prompt(tok, 3, system=False), a], seeds=[9, 2, 1234], **kw)
    assert _row(alone, 0) == _row(first, 0) == _row(last, 2)
    assert alone.texts[0] == first.texts[0] == last.texts[2]
    # Different seeds must give different samples (here 8 seeds, same prompt).
    many = _generate(tiny, [a] * 8, seeds=list(range(8)), **kw)
    assert len({tuple(_row(many, i)) for i in range(8)}) > 1


def test_row_uniforms_are_per_seed():
    u = row_uniforms([3, 5, 3], 6, "cpu")
    assert u.shape == (3, 6) and u.dtype == torch.float64 and ((u >= 0) & (u < 1)).all()
    torch.testing.assert_close(u[0], u[2], rtol=0, atol=0)
    torch.testing.assert_close(u[1], row_uniforms([5], 6, "cpu")[0], rtol=0, atol=0)
    assert not torch.equal(u[0], u[1])


def test_default_eos_includes_the_generation_configs_ids(tiny, monkeypatch):
    tok, lm, _ = tiny
    prompt = _prompt(tok, 1)
    # '<think>6 + 6 = 12. 12 + 7 = 19.</think><answer>12</answer><|im_end|>'
    ref = _hf_greedy(lm, tok, prompt)
    # Pretend </think> were a second end-of-turn id, as Qwen2.5-Instruct's config lists two.
    other = tok.convert_tokens_to_ids("</think>")
    k = ref.index(other)
    assert k > 0 and ref[-1] == tok.eos_token_id
    monkeypatch.setattr(lm.generation_config, "eos_token_id", [tok.eos_token_id, other])
    r = _generate(tiny, [prompt], max_new_tokens=32, temperature=0.0)
    assert _row(r, 0) == ref[: k + 1] and r.completion_mask.tolist() == [[1] * (k + 1)]
    assert not r.truncated[0]
    # Explicit ids replace the default: </think> no longer ends the row.
    r = _generate(tiny, [prompt], max_new_tokens=32, temperature=0.0, eos_token_ids=[tok.eos_token_id])
    assert _row(r, 0) == ref and not r.truncated[0]
    # The tokenizer's EOS still counts when the generation config does not list it.
    monkeypatch.setattr(lm.generation_config, "eos_token_id", tok.convert_tokens_to_ids("<|im_start|>"))
    r = _generate(tiny, [prompt], max_new_tokens=32, temperature=0.0)
    assert _row(r, 0) == ref and not r.truncated[0]


def test_truncation_at_max_new_tokens(tiny):
    tok, lm, _ = tiny
    prompts = [_prompt(tok, 0), _prompt(tok, 1)]
    refs = [_hf_greedy(lm, tok, p) for p in prompts]
    n = len(refs[0])  # row 0 emits its EOS at exactly the last allowed step, row 1 does not
    assert len(refs[1]) > n
    r = _generate(tiny, prompts, max_new_tokens=n, temperature=0.0)
    assert r.completion_mask.tolist() == [[1] * n] * 2
    assert r.truncated.tolist() == [False, True]  # an EOS on the last step is a finished row
    assert r.completion_ids.tolist() == [refs[0], refs[1][:n]]
    assert r.texts == [tok.decode(ids, skip_special_tokens=True) for ids in (refs[0], refs[1][:n])]
    r = _generate(tiny, prompts, max_new_tokens=5, temperature=0.0)
    assert r.truncated.all() and r.completion_mask.tolist() == [[1] * 5] * 2
    assert r.texts == [tok.decode(ref[:5], skip_special_tokens=True) for ref in refs]


@pytest.mark.parametrize("stop_strings", [
    ["= 12", "= 15"],  # row 0 stops on "= 12", row 1 on "= 15", row 2 has neither and ends at EOS
    ["6 "],            # completes inside a token: the space of " +" (row 0) or " =" (row 1)
])
def test_stop_strings_end_the_row_where_the_string_completes(tiny, stop_strings):
    tok, lm, _ = tiny
    prompts = [_prompt(tok, 1), _prompt(tok, 3), _prompt(tok, 0)]
    refs = [_hf_greedy(lm, tok, p) for p in prompts]
    r = _generate(tiny, prompts, max_new_tokens=32, temperature=0.0, stop_strings=stop_strings)
    for i, ref in enumerate(refs):
        # Reference: the shortest prefix of the greedy completion whose text holds a stop string.
        ends = [t for t in range(len(ref)) if any(s in tok.decode(ref[: t + 1]) for s in stop_strings)]
        end = ends[0] if ends else len(ref) - 1
        assert (i < 2) == bool(ends), f"row {i}: the case no longer exercises what it claims"
        assert _row(r, i) == ref[: end + 1], i
        assert (r.completion_ids[i, end + 1:] == tok.pad_token_id).all()
    assert not r.truncated.any()


def test_the_engine_decodes_into_a_preallocated_cache(tiny):
    """The tests above compare the engine with HF `generate` through this cache: check that it
    is the one in use (not None, so not the model's own growing cache), views of one buffer."""
    import r1train.model.engine as engine

    tok, _, policy = tiny
    cache = engine.preallocated_cache(policy, capacity=4)
    assert cache is not None and all(isinstance(layer, engine.PreallocatedLayer) for layer in cache.layers)
    k = torch.randn(2, 2, 3, 8)
    layer = cache.layers[0]
    keys, _ = layer.update(k, k)
    buffer = layer.buf_k
    keys, _ = layer.update(k[:, :, :1], k[:, :, :1])
    assert layer.buf_k is buffer and keys.shape[2] == 4 and torch.equal(keys[:, :, :3], k)
    layer.batch_select_indices(torch.tensor([1, 1, 0]))
    assert torch.equal(layer.keys[0], torch.cat([k[1], k[1, :, :1]], 1))
    assert torch.equal(layer.keys[2], torch.cat([k[0], k[0, :, :1]], 1))
    with pytest.raises(RuntimeError, match="exceed the capacity 4"):
        layer.update(k[:, :, :1].repeat(3, 1, 1, 1), k[:, :, :1].repeat(3, 1, 1, 1))


def test_few_row_linears_equal_f_linear_and_are_restored(monkeypatch):
    """float64: (W @ x^T)^T equals F.linear for 1..FEW_ROWS rows, with and without a bias, on
    3-D inputs; more rows, small weights and other module types keep their forward; every
    patched forward is restored, also when the block raises."""
    import r1train.model.engine as engine

    torch.manual_seed(0)
    big = torch.nn.Linear(300, 400).double()  # 120,000 weights
    plain = torch.nn.Linear(400, 300, bias=False).double()
    head = torch.nn.Linear(300, 8).double()  # 2,400 weights: too small to gain
    model = torch.nn.Sequential(big, torch.nn.ReLU(), plain, head)
    assert big.weight.numel() >= engine.FEW_ROWS_MIN_WEIGHT > head.weight.numel()
    for rows in (1, 3, engine.FEW_ROWS, engine.FEW_ROWS + 1):
        x = torch.randn(rows, 1, 300, dtype=torch.float64)
        want = model(x)
        with engine.few_row_linears(model) as patched:
            assert patched == [big, plain]
            got = model(x)
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert all("forward" not in m.__dict__ for m in model)
    with pytest.raises(KeyError):
        with engine.few_row_linears(model):
            raise KeyError("inside")
    assert all("forward" not in m.__dict__ for m in model)
    calls = []
    monkeypatch.setattr(torch.nn.functional, "linear", lambda *a: calls.append(1) or torch.zeros(()))
    with engine.few_row_linears(model):
        big(torch.randn(engine.FEW_ROWS + 1, 300, dtype=torch.float64))  # a prefill: F.linear
    assert calls == [1]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_few_row_linears_give_the_same_completions(tiny, monkeypatch, temperature):
    """The engine's decode with every linear layer in the few-row form (the tiny model's weights
    are below the size that gets it by default, so the threshold is lowered) gives the rows of
    F.linear (in float64, as every comparison here: two summation orders)."""
    import r1train.model.engine as engine

    tok, _, policy = tiny
    monkeypatch.setattr(engine, "FEW_ROWS_MIN_WEIGHT", 0)
    calls = []
    forward = engine._few_row_forward
    monkeypatch.setattr(engine, "_few_row_forward", lambda self, x: calls.append(x.shape) or forward(self, x))
    prompts = [_prompt(tok, i % 4) for i in range(8)]
    ids, mask = pad_prompts(prompts, tok.pad_token_id, "cpu")
    kw = dict(seeds=list(range(8)), max_new_tokens=24, temperature=temperature)
    fast = generate(policy, tok, ids, mask, **kw)
    assert calls and any(shape[0] <= 8 for shape in calls)  # the decode steps went through it
    n = len(calls)
    plain = generate(policy, tok, ids, mask, few_rows=False, **kw)
    assert len(calls) == n  # and not with few_rows=False
    assert [_row(fast, i) for i in range(8)] == [_row(plain, i) for i in range(8)]


def test_stop_candidates_skip_only_rows_that_cannot_complete_a_string(tiny, monkeypatch):
    """Decoding only the rows whose new token can end a stop string stops every row where
    decoding all rows does: 16 sampled rows, against the engine with the filter turned off."""
    import r1train.model.engine as engine

    tok = tiny[0]
    stops = ["</think>", "= 1", "+ 6"]
    candidates = engine.stop_candidates(tok, stops)
    assert candidates is not None and 0 < int(candidates.sum()) < len(candidates)
    assert engine.stop_candidates(tok, ["6 "]) is None  # ends in whitespace: every token may complete it
    prompts = [_prompt(tok, i % 4) for i in range(16)]
    got = _generate(tiny, prompts, max_new_tokens=32, temperature=1.0, stop_strings=stops)
    monkeypatch.setattr(engine, "stop_candidates", lambda *args: None)
    want = _generate(tiny, prompts, max_new_tokens=32, temperature=1.0, stop_strings=stops)
    assert got.completion_ids.tolist() == want.completion_ids.tolist()
    assert got.truncated.tolist() == want.truncated.tolist()
    stopped = [any(s in t for s in stops[1:]) for t in want.texts]
    assert sum(stopped) >= 2, "too few rows stop on a string: the case checks nothing"


# ---------------------------------------------------------------------------------------------
# sample_tokens / filter_logits
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_inverse_cdf_on_a_uniform_grid_gives_the_softmax(temperature):
    # u on the regular grid (k + 0.5) / M hits token j exactly round(M * p_j) times, give or
    # take one at each CDF boundary; a sampler off by one bucket or ignoring T would miss.
    logits = torch.tensor([2.0, -1.0, 0.5, 1.0, -3.0, 0.0])
    m = 20_000
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    tokens = sample_tokens(logits.expand(m, -1), u, temperature, top_k=0, top_p=1.0)  # [M]
    counts = torch.bincount(tokens, minlength=6).double()
    expected = m * torch.softmax(logits.double() / temperature, -1)
    assert (counts - expected).abs().max() <= 1, (counts, expected)


def test_inverse_cdf_renormalises_over_the_kept_tokens():
    # top_k=2 keeps 2.0 and 1.0: p = (e^2, e^1) / (e^2 + e^1) = (0.731, 0.269), others never.
    logits = torch.tensor([2.0, -1.0, 0.5, 1.0])
    m = 10_000
    u = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    counts = torch.bincount(sample_tokens(logits.expand(m, -1), u, 1.0, top_k=2, top_p=1.0), minlength=4)
    e = torch.tensor([2.0, 1.0], dtype=torch.float64).exp()
    expected = torch.tensor([e[0], 0, 0, e[1]], dtype=torch.float64) / e.sum() * m
    assert (counts - expected).abs().max() <= 1, (counts, expected)


def test_filtered_tokens_are_never_sampled_even_at_the_ends_of_u():
    """u = 0 and u just below 1 land on the first and last kept token: a token that top-k
    removed (probability 0, so its cdf step is flat) is never picked."""
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]])  # top_k=2 keeps tokens 1 and 2 only
    for u, token in ((0.0, 1), (1.0 - 2.0**-53, 2)):
        got = sample_tokens(logits, torch.tensor([u], dtype=torch.float64), 1.0, 2, 1.0)
        assert got.tolist() == [token], (u, got)


def test_greedy_is_argmax_whatever_u():
    logits = torch.tensor([[0.1, 3.0, -2.0, 2.9], [5.0, 0.0, 4.0, 1.0]])
    for u in (0.0, 0.5, 0.999):
        assert sample_tokens(logits, torch.full((2,), u, dtype=torch.float64), 0.0, 0, 1.0).tolist() == [1, 0]


# Probabilities 0.15, 0.5, 0.05, 0.3 (shuffled, so the filter must sort and scatter back).
# Sorted: 0.5, 0.3, 0.15, 0.05 with mass before each 0, 0.5, 0.8, 0.95; nucleus filtering keeps
# a token while the mass before it is below top_p. top_p avoids the ties 0.5 / 0.8 / 0.95,
# where float rounding would decide.
@pytest.mark.parametrize("top_k,top_p,kept", [
    (0, 1.0, [0, 1, 2, 3]),
    (0, 0.4, [1]),          # 0.5 alone reaches 0.4
    (0, 0.75, [1, 3]),      # 0.5 + 0.3 = 0.8 >= 0.75: keeps the two largest
    (0, 0.85, [0, 1, 3]),   # 0.8 < 0.85, 0.95 >= 0.85: 0.05 goes
    (2, 1.0, [1, 3]),       # the two largest
    (3, 1.0, [0, 1, 3]),
    # Top-k first, then top-p on the renormalised survivors (as HF's warpers): top-2 leaves
    # 0.5 / 0.8 = 0.625 and 0.375, and 0.625 alone reaches 0.6. Over the original probs
    # (0.5 < 0.6) top-p would have kept both.
    (2, 0.6, [1]),
])
def test_filter_logits_hand_cases(top_k, top_p, kept):
    probs = torch.tensor([[0.15, 0.5, 0.05, 0.3]])
    logits = probs.log()
    out = filter_logits(logits, top_k=top_k, top_p=top_p)
    assert torch.isfinite(out[0]).nonzero()[:, 0].tolist() == kept
    torch.testing.assert_close(out[0, kept], logits[0, kept], rtol=0, atol=0)  # survivors unchanged


# ---------------------------------------------------------------------------------------------
# padding helpers
# ---------------------------------------------------------------------------------------------

def test_pad_prompts_left_pads():
    ids, mask = pad_prompts([[5, 6, 7], [8], [9, 10]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]


def test_position_ids_count_real_tokens_only():
    # Each prompt's first real token sits at position 0 whatever its padding; pads get 0
    # (masked anyway). A completion continues from there: mask [0, 1, 1, 1] -> 0, 1, 2.
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 1]])
    assert position_ids_from_mask(mask).tolist() == [[0, 1, 2, 3], [0, 0, 0, 1], [0, 0, 1, 2]]


@pytest.mark.parametrize("sync_every", [1, 4])
def test_two_fsdp_ranks_decode_in_lockstep_and_sample_what_one_process_does(tiny, tmp_path, sync_every):
    """torchrun, 2 ranks, FSDP2 over gloo (tests/engine_worker.py): rank 1's rows end long before
    rank 0's, and in the second call rank 1 has none (a dummy row); with the ranks agreeing to
    stop every step or every 4th, no rank waits forever in a collective, and each row is the one
    a single process samples from the same seed."""
    import json
    import os
    import subprocess
    import sys

    from engine_worker import CALLS

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}", "OMP_NUM_THREADS": "1"}
    out = tmp_path / "rows"
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                          str(root / "tests" / "engine_worker.py"), str(out), str(sync_every)],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    tok = tiny[0]
    for rank, calls in CALLS.items():
        got = json.loads((tmp_path / f"rows.{rank}.json").read_text())
        for (problems, seeds), rows in zip(calls, got):
            if not problems:
                assert rows is None
                continue
            alone = _generate(tiny, [_prompt(tok, i, system=i != 0) for i in problems], seeds=seeds,
                              max_new_tokens=32, temperature=1.0)
            assert rows == [_row(alone, i) for i in range(len(problems))], (rank, problems)
