"""Multi-turn rows (issue 33): completions made of the model's segments and the tool turns the
engine inserted between them.

The loss learns from the model's own tokens only: `GRPOBatch.model_mask` is 0 on inserted tokens,
and the loss, its |o_i| and token counts, GSPO's sequence ratio and the KL must then be those of
the model's tokens alone (a float64 per-token transcription of DeepSeekMath Eq. 3 below), the
gradient on the logits that predict an inserted token exactly 0, and the inserted tokens still
context (packed and padded passes read them).
"""
import json
import math
import os
from pathlib import Path

import pytest
import torch

from r1train.data.prompts import make_conversation, render_prompt
from r1train.grpo.batch import GRPOBatch
from r1train.grpo.loss import loss_denominator, policy_loss
from r1train.model.engine import Rollout, generate, pad_prompts
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


# ---------------------------------------------------------------------------------------------
# The engine's multi-turn rows
# ---------------------------------------------------------------------------------------------
# The cold-start SFT checkpoint writes <think>..</think><answer>..</answer><|im_end|>, in float64
# (as tests/test_rollout.py: computations of other shapes must not flip a greedy argmax).

ROOT = Path(__file__).resolve().parents[1]
ASSET = ROOT / "tests" / "assets" / "tiny-r1-sft"
PROBLEMS = ["What is 5 - 4?", "What is 6 + 6 + 7?", "What is 2 - 1?", "What is 8 + 1 + 6?", "What is 3 + 9?"]


@pytest.fixture(scope="module")
def tiny():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSET)
    lm = AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float64).eval()
    return tok, PolicyModel(lm)


def _prompts(tok, n=len(PROBLEMS)) -> list[list[int]]:
    # rows of two lengths (with and without the system prompt): left padding and holes together
    return [tok(render_prompt(tok, make_conversation(q, **({} if i % 2 else {"system_prompt": ""}))),
                add_special_tokens=False)["input_ids"] for i, q in enumerate(PROBLEMS[:n])]


class FixedTurns:
    """Turns that pause a row at `close` and insert row i's `inserts[i]` (a tool turn of the
    engine's point of view), for the engine's mechanics with the model writing freely."""

    def __init__(self, inserts, close="</think>", max_turns=3):
        self.inserts, self.close, self.max_turns, self.asked = inserts, close, max_turns, []

    def answer(self, rows, segments, rooms):
        self.asked.append(list(rows))
        return [(self.inserts[r] if len(self.inserts[r]) < room else None, False) for r, room in zip(rows, rooms)]

    def episode(self, row, last_segment):
        return {"last": last_segment}


def _run(policy, tok, prompts, seeds, turns=None, plain=False, **kw):
    ids, mask = pad_prompts(prompts, tok.pad_token_id, "cpu")
    return generate(policy, tok, ids, mask, seeds=seeds, turns=turns, share_prompts=not plain, compact=not plain,
                    few_rows=not plain, **{"max_new_tokens": 60, "temperature": 0.0, **kw})


def _row(r: Rollout, i: int) -> tuple[list[int], list[int]]:
    n = int(r.completion_mask[i].sum())
    return r.completion_ids[i, :n].tolist(), r.model_mask[i, :n].tolist()


def _inserts(tok):
    return [tok.encode(x) for x in ["\nnote 1\n", "\nA longer note: 17 and 23\n", "\n", "\nx = 9\n", "\nok\n"]]


@pytest.mark.parametrize("plain", [False, True])
def test_cache_continuation_equals_rerunning_the_conversation(tiny, plain):
    """Greedy: after each tool turn, the row's next segment is what the model writes when the
    whole conversation so far (prompt, segments, tool turns) is given to it as one prompt."""
    tok, policy = tiny
    prompts = _prompts(tok)
    turns = FixedTurns(_inserts(tok))
    r = _run(policy, tok, prompts, list(range(5)), turns, plain)
    assert len(turns.asked) >= 2 and any(len(a) > 1 for a in turns.asked)  # rows pause at different steps
    checked = 0
    for i, prompt in enumerate(prompts):
        ids, written = _row(r, i)
        starts = [j for j in range(1, len(ids)) if written[j] and not written[j - 1]]  # a segment after a tool turn
        for j in starts:
            end = next((k for k in range(j, len(ids)) if not written[k]), len(ids))
            again = _run(policy, tok, [prompt + ids[:j]], [0], max_new_tokens=end - j)
            assert again.completion_ids[0, : end - j].tolist() == ids[j:end], (i, j)
            checked += 1
        # the inserted tokens are the tool turn, whole, after each </think>
        runs = [ids[j:next((k for k in range(j, len(ids)) if written[k]), len(ids))]
                for j in range(1, len(ids)) if not written[j] and written[j - 1]]
        assert all(x == turns.inserts[i] for x in runs)
    assert checked >= 4


def test_without_a_tool_call_a_multiturn_row_is_the_single_turn_row_bit_for_bit(tiny):
    tok, policy = tiny
    prompts = _prompts(tok)
    seeds = [11, 12, 13, 14, 15]
    for plain in (False, True):
        single = _run(policy, tok, prompts, seeds, None, plain, temperature=1.0)
        turns = FixedTurns(_inserts(tok), close="</tool_call>")
        multi = _run(policy, tok, prompts, seeds, turns, plain, temperature=1.0)
        assert not turns.asked
        for name in ("completion_ids", "completion_mask", "truncated", "logps"):
            assert torch.equal(getattr(multi, name), getattr(single, name)), name
        assert torch.equal(multi.model_mask, multi.completion_mask) and multi.texts == single.texts
        assert single.model_mask is None and single.episodes is None


def test_a_rows_samples_do_not_depend_on_the_other_rows_tool_turns(tiny):
    """Sampled at temperature 1: each row alone, the rows together, in another order: the same
    tokens (each row draws by its own count of model tokens, whatever the others insert)."""
    tok, policy = tiny
    prompts, seeds, inserts = _prompts(tok), [101, 102, 103, 104, 105], _inserts(tok)
    together = _run(policy, tok, prompts, seeds, FixedTurns(inserts), temperature=1.0)
    order = [3, 0, 4, 2, 1]
    shuffled = _run(policy, tok, [prompts[k] for k in order], [seeds[k] for k in order],
                    FixedTurns([inserts[k] for k in order]), temperature=1.0)
    paused = 0
    for i in range(5):
        alone = _run(policy, tok, [prompts[i]], [seeds[i]], FixedTurns([inserts[i]]), temperature=1.0)
        assert _row(alone, 0) == _row(together, i) == _row(shuffled, order.index(i)), i
        n = int(alone.completion_mask[0].sum())
        torch.testing.assert_close(alone.logps[0, :n], together.logps[i, :n], rtol=1e-9, atol=1e-12)
        paused += 0 in _row(alone, 0)[1]
    assert paused >= 2


def test_budget_and_max_turns(tiny):
    """max_new_tokens counts model and inserted tokens; a tool turn that leaves no room ends the
    row truncated, without it; the max_turns-th segment's call ends the row, unanswered."""
    tok, policy = tiny
    prompts = _prompts(tok, 2)
    long = tok.encode("\n" + "note " * 30)  # 60 tokens or so: never fits in 40
    r = _run(policy, tok, prompts, [0, 1], FixedTurns([long, long]), max_new_tokens=40)
    for i in range(2):
        ids, written = _row(r, i)
        assert all(written) and tok.decode(ids).endswith("</think>") and bool(r.truncated[i])
    # max_turns = 1: the first </think> ends the row, not truncated
    r = _run(policy, tok, prompts, [0, 1], FixedTurns(_inserts(tok), max_turns=1))
    for i in range(2):
        ids, written = _row(r, i)
        assert all(written) and tok.decode(ids).endswith("</think>") and not bool(r.truncated[i])
    # a budget that ends rows in the middle of a later segment: the lengths stay within it
    turns = FixedTurns(_inserts(tok))
    r = _run(policy, tok, _prompts(tok), list(range(5)), turns, max_new_tokens=24)
    assert int(r.completion_mask.sum(-1).max()) <= 24 and turns.asked
    for i in range(5):
        ids, written = _row(r, i)
        assert (r.logps[i, :len(ids)][torch.tensor(written) == 0] == 0).all()
        if len(ids) == 24:
            assert bool(r.truncated[i])


def test_stop_strings_are_looked_for_in_the_models_segment_only(tiny):
    """A tool turn that holds a stop string does not end the row: the string must be the model's."""
    tok, policy = tiny
    prompts = _prompts(tok)
    turns = FixedTurns([tok.encode("\n</answer>\n")] * 5)
    r = _run(policy, tok, prompts, list(range(5)), turns, stop_strings=["</answer>"])
    plain = _run(policy, tok, prompts, list(range(5)), None, stop_strings=["</answer>"])
    assert turns.asked
    for i in range(5):
        ids, written = _row(r, i)
        if 0 in written:  # the row went on after its tool turn, and ended at its own stop or EOS
            assert written[-1] == 1
            last = ids[max(k for k in range(len(ids)) if not written[k]) + 1:]
            assert tok.decode(last).endswith("</answer>") or ids[-1] == tok.eos_token_id or len(ids) == 60
        else:  # no </think>: the row is the single-turn one
            assert ids == plain.completion_ids[i, :int(plain.completion_mask[i].sum())].tolist()


def test_a_compiled_decoder_is_refused_with_tools(tiny):
    tok, policy = tiny
    ids, mask = pad_prompts(_prompts(tok, 1), tok.pad_token_id, "cpu")
    with pytest.raises(ValueError, match="rollout.compile_decode"):
        generate(policy, tok, ids, mask, seeds=[0], max_new_tokens=4, decoder=object(), turns=FixedTurns([[1]]))


class Scripted(torch.nn.Module):
    """A "model" that writes row i's `scripts[i]` tokens first (its logits forced), then lets the
    policy write freely. The plain path (no shared prefill, no compaction) keeps rows in place,
    so row i is always row i here; the real tokens fed since the prompt say where a row is."""

    def __init__(self, policy, scripts):
        super().__init__()
        self.policy, self.lm, self.scripts, self.fed = policy, policy.lm, scripts, None

    def next_token_logits(self, input_ids, attention_mask, position_ids, cache=None):
        logits, cache = self.policy.next_token_logits(input_ids, attention_mask, position_ids, cache=cache)
        if self.fed is None:  # the prefill
            self.fed = [0] * len(self.scripts)
        else:
            width = input_ids.shape[1]
            self.fed = [n + int(attention_mask[i, -width:].sum()) for i, n in enumerate(self.fed)]
        for i, script in enumerate(self.scripts):
            if self.fed[i] < len(script):
                logits[i] = float("-inf")
                logits[i, script[self.fed[i]]] = 0.0
        return logits, cache


def _call(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


@pytest.mark.parametrize("pooled, qwen", [(False, False), (True, False), (False, True)])
def test_a_scripted_tool_call_gets_the_templates_tool_turn(tiny, pooled, qwen):
    """Rows that call the calculator (through a worker pool, or an in-process environment), name
    an unknown tool, write invalid JSON, close no block, or call nothing: the tokens between the
    segments are the chat template's tool turn, the conversation rendered by the template is the
    row's tokens, and the episode counts what happened. Under the tiny model's ChatML (no tools
    branch: the schemas in the system turn) and under Qwen2.5's template (its tools branch; tool
    results inside a user turn)."""
    import copy

    from test_tools import QWEN_TOOLS_TEMPLATE

    from r1train.tools import Environment, ToolEnvironment, ToolPool, load_tools
    from r1train.tools.calculator import calculator
    from r1train.tools.environment import local_tool
    from r1train.tools.episodes import ToolEpisodes
    from r1train.tools.turns import prompt_with_tools

    class Calculator(Environment):  # the calculator, in this process
        tools = {"calculator": local_tool(calculator)}

        def step(self, call):
            return calculator(**call.arguments), False

    tok, policy = tiny
    if qwen:
        tok = copy.deepcopy(tok)
        tok.chat_template = QWEN_TOOLS_TEMPLATE
    texts = [_call('{"name": "calculator", "arguments": {"expression": "12*34"}}'),
             "<think>hm</think>" + _call('{"name": "calc", "arguments": {}}'),
             "",  # writes freely: no call
             _call("not json"),
             "the end</tool_call>"]
    results = ["408", "Error: unknown tool 'calc'; the tools are: calculator", None,
               None, 'Error: </tool_call> closes no <tool_call> block; write <tool_call>{"name": ..., "arguments": '
                     '{...}}</tool_call>']
    schemas = [t.schema for t in load_tools("calculator").values()]
    messages, tools = zip(*(prompt_with_tools(tok, [{"role": "user", "content": q}], schemas) for q in PROBLEMS))
    tools = tools[0]
    assert (tools is not None) == qwen  # ChatML: the schemas went into a system turn instead
    assert qwen or all(m[0]["role"] == "system" and '"name": "calculator"' in m[0]["content"] for m in messages)
    prompts = [tok.apply_chat_template(m, tools=tools, tokenize=False, add_generation_prompt=True) for m in messages]
    assert all('"name": "calculator"' in p for p in prompts)
    prompt_ids = [tok.encode(p, add_special_tokens=False) for p in prompts]
    pool = ToolPool(load_tools("calculator"), n_workers=2) if pooled else None
    try:
        envs = [ToolEnvironment(load_tools("calculator"), pool) if pooled else Calculator() for _ in texts]
        episodes = ToolEpisodes(tok, envs, list(messages), max_turns=2, schemas=tools)
        model = Scripted(policy, [tok.encode(t, add_special_tokens=False) for t in texts])
        r = _run(model, tok, prompt_ids, list(range(5)), episodes, plain=True, max_new_tokens=300)
    finally:
        if pool is not None:
            pool.close()
    whole_checked = 0
    for i, text in enumerate(texts):
        ids, written = _row(r, i)
        ep = r.episodes[i]
        if not text:
            assert all(written) and ep["turns"] == 1 and ep["tool_calls"] == 0
            continue
        seg = len(tok.encode(text, add_special_tokens=False))
        assert written[:seg] == [1] * seg and written[seg] == 0
        after = next((k for k in range(seg, len(ids)) if written[k]), len(ids))
        assert tok.decode(ids[:seg]) == text
        result = ep["messages"][-2 if ep["messages"][-1]["role"] == "assistant" else -1]["content"]
        if results[i] is not None:
            assert result == results[i]
        else:
            assert result.startswith("Error: the tool call is not valid JSON")
        # The template's rendering of [prompt, the segment, the tool message] + the next header is
        # the row's tokens, read as text.
        conversation = messages[i] + [{"role": "assistant", "content": text}, {"role": "tool", "content": result}]
        rendered = tok.apply_chat_template(conversation, tools=tools, tokenize=False, add_generation_prompt=True)
        assert tok.decode(prompt_ids[i] + ids[:after], skip_special_tokens=False) == rendered
        assert ep["messages"][:len(conversation)] == conversation
        if i == 0:  # written by hand from each template's layout
            assert tok.decode(ids[seg:after], skip_special_tokens=False) == (
                "<|im_end|>\n<|im_start|>user\n<tool_response>\n408\n</tool_response><|im_end|>\n"
                "<|im_start|>assistant\n" if qwen else
                "<|im_end|>\n<|im_start|>tool\n408<|im_end|>\n<|im_start|>assistant\n")
        assert ep["turns"] == 2 and ep["tool_calls"] == 1 and ep["tool_errors"] == int(i != 0)
        assert ep["calls"] == ({"calculator": 1} if i == 0 else {"(refused)": 1})
        assert (r.logps[i, seg:after] == 0).all() and (r.logps[i, :seg] == 0).all()  # forced: log 1
        # The whole episode, rendered, is the row: the template closes the final segment (with
        # <|im_end|> where the budget cut it) and adds its newline.
        whole = tok.decode(prompt_ids[i] + ids, skip_special_tokens=False)
        close = "\n" if ids[-1] == tok.eos_token_id else "<|im_end|>\n"
        if "<|im_start|>" not in tok.decode(ids[after:], skip_special_tokens=False):  # no special token to skip
            assert tok.apply_chat_template(ep["messages"], tools=tools, tokenize=False) == whole + close
            whole_checked += 1
        # The reward text: segments without special tokens, tool turns as the template wrote them.
        assert r.texts[i].startswith(text + tok.decode(ids[seg:after], skip_special_tokens=False))
    assert whole_checked >= 1


# ---------------------------------------------------------------------------------------------
# Training runs with tools
# ---------------------------------------------------------------------------------------------
# A random tiny model never writes a tool call, so the runs below script one: the reward file
# they name (imported by every process of the run, in validation) wraps the engine's `generate`
# so that each multi-turn row first writes CALL (logits forced, the plain path), then samples
# freely. The tool is a user function in the same file, run by each rank's worker pool; the
# reward reads the trajectory's columns.

RUN_FILE = '''
import torch

import r1train.model.engine as engine

CALL = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'


def add(a: int, b: int) -> str:
    """Add two whole numbers.

    Args:
        a: The first number.
        b: The second number.
    """
    return str(a + b)


def tool_reward(completions, tool_calls, tool_errors, turns, conversation, **columns):
    """1 per answered call whose result the conversation holds, minus errors; + 0.1 a turn; and
    the distinct characters of the reply's end, in thousandths (rows differ: advantages)."""
    return [sum(m["role"] == "tool" and m["content"] == "5" for m in conv) - e + 0.1 * t + 1e-3 * len(set(c[-20:]))
            for c, conv, e, t in zip(completions, conversation, tool_errors, turns)]


class Scripted(torch.nn.Module):
    def __init__(self, policy, script):
        super().__init__()
        self.policy, self.lm, self.script, self.fed = policy, policy.lm, script, None

    def next_token_logits(self, input_ids, attention_mask, position_ids, cache=None):
        logits, cache = self.policy.next_token_logits(input_ids, attention_mask, position_ids, cache=cache)
        width = input_ids.shape[1]
        self.fed = [0] * len(logits) if self.fed is None else [
            n + int(attention_mask[i, -width:].sum()) for i, n in enumerate(self.fed)]
        for i, n in enumerate(self.fed):
            if n < len(self.script):
                logits[i] = float("-inf")
                logits[i, self.script[n]] = 0.0
        return logits, cache


_generate = engine.generate


def scripted_generate(model, tokenizer, *args, turns=None, **kw):
    if turns is None:
        return _generate(model, tokenizer, *args, **kw)
    kw.update(share_prompts=False, compact=False, few_rows=False)
    script = tokenizer.encode(CALL, add_special_tokens=False)
    return _generate(Scripted(model, script), tokenizer, *args, turns=turns, **kw)


engine.generate = scripted_generate
'''


@pytest.fixture(scope="module")
def tool_run(tmp_path_factory):
    from r1train.data.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tools")
    (root / "run_file.py").write_text(RUN_FILE)
    model = build_tiny_model(root / "model", seed=0)
    f = root / "run_file.py"
    return [
        "--model.path", str(model), "--rollout.tools", f"{f}:add", "--rollout.max_turns", "3",
        "--grpo.rewards", f"{f}:tool_reward", "--data.system_prompt", "",
        "--data.max_prompt_tokens", "1000", "--rollout.group_size", "4", "--grpo.prompts_per_step", "2",
        "--grpo.micro_batch_size", "4", "--rollout.max_new_tokens", "90", "--grpo.beta", "0.04",
        "--optim.lr", "1e-3", "--optim.warmup_steps", "0", "--data.num_train", "16", "--data.num_eval", "2",
        "--train.eval_every", "0", "--train.progress", "false", "--train.sample_every", "2",
        "--train.token_records", "1"]


def _train(args, nproc=1):
    from launch import torchrun_py, train_py

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    if nproc == 1:
        res = train_py("grpo", *args, env=env, timeout=600)
    else:
        res = torchrun_py("grpo", *args, nproc=nproc, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return res


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_tools_two_processes_match_one_and_resume_matches_uninterrupted(tool_run, tmp_path):
    from safetensors.torch import load_file

    args = [*tool_run, "--train.max_steps", "2", "--train.save_every", "1"]
    _train([*args, "--train.output_dir", str(tmp_path / "one")])
    _train([*args, "--train.output_dir", str(tmp_path / "two")], nproc=2)
    _train([*args, "--train.output_dir", str(tmp_path / "part"), "--train.stop_at_step", "1"])
    assert "resumed from" in _train([*args, "--train.output_dir", str(tmp_path / "part")]).stdout
    one = _metrics(tmp_path / "one")
    steps = [m for m in one if "reward" in m]
    assert len(steps) == 2
    for m in steps:  # every row called once, was answered, and wrote on
        assert m["tools/calls_mean"] == 1.0 and m["tools/add/calls"] == 1.0 and m["tools/errors"] == 0.0
        assert m["turns/mean"] >= 2.0 and m["tool_reward/mean"] >= 1.2
        assert m["model_tokens/mean"] < m["completion_length/mean"]  # the tool turns are not the model's
    # The run inspector names the inserted tokens: exactly the tool turn after the call.
    records = [json.loads(line) for line in (tmp_path / "one" / "tokens.jsonl").read_text().splitlines()]
    for c in records[0]["completions"]:
        text = "".join(t for t, why in zip(c["tokens"], c["why"]) if why == "tool turn (inserted, no loss)")
        assert text == "<|im_end|>\n<|im_start|>tool\n5<|im_end|>\n<|im_start|>assistant\n", text
        assert all(m == (why == "") for m, why in zip(c["values"]["loss_mask"], c["why"]))
    start = load_file(Path(tool_run[1]) / "model.safetensors")
    weights = {run: load_file(tmp_path / run / "final" / "model.safetensors") for run in ("one", "two", "part")}
    assert max((weights["one"][k] - start[k]).abs().max().item() for k in start) > 1e-4
    for k in start:
        torch.testing.assert_close(weights["two"][k], weights["one"][k], rtol=1e-4, atol=1e-6, msg=k)
        torch.testing.assert_close(weights["part"][k], weights["one"][k], rtol=1e-5, atol=1e-7, msg=k)
    for run in ("two", "part"):
        other = [m for m in _metrics(tmp_path / run) if "reward" in m]
        assert [m["step"] for m in other] == [1, 2]
        for x, y in zip(steps, other):
            for key in ("reward", "tools/calls_mean", "turns/mean", "model_tokens/mean", "completion_length/mean"):
                assert x[key] == pytest.approx(y[key], abs=1e-9), (run, key)
            assert x["loss"] == pytest.approx(y["loss"], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("args, option, why", [
    (["--rollout.tools", "abacus"], "rollout.tools", "unknown tool 'abacus'"),
    (["--rollout.tools", "nowhere.py:fn"], "rollout.tools", "nowhere.py"),
    (["--rollout.max_turns", "2"], "rollout.max_turns", "needs --rollout.tools"),
    (["--rollout.tool_workers", "3"], "rollout.tool_workers", "needs --rollout.tools"),
    (["--rollout.tools_prompt", "false"], "rollout.tools_prompt", "needs --rollout.tools"),
    (["--rollout.tools", "calculator", "--rollout.max_turns", "0"], "rollout.max_turns", ">= 1"),
    (["--rollout.tools", "calculator", "--rollout.tool_timeout_s", "nan"], "rollout.tool_timeout_s", "> 0"),
    (["--rollout.tools", "calculator", "--rollout.compile_decode", "true"], "rollout.compile_decode",
     "does not take --rollout.tools"),
])
def test_tool_options_are_refused_naming_themselves(args, option, why):
    from r1train.grpo.config import GRPOJobConfig
    from r1train.run.config import ConfigError, parse_args

    with pytest.raises(ConfigError, match=rf"--{option.replace('.', '[.]')}.*{why.replace('.', '[.]')}"):
        parse_args(GRPOJobConfig, args)
    parse_args(GRPOJobConfig, ["--rollout.tools", "calculator,python", "--rollout.max_turns", "2",
                               "--rollout.tools_prompt", "false"])  # fine


def test_a_template_that_rewrites_a_call_is_refused_at_start(tool_run, tmp_path):
    """A chat template that does not write the assistant's text as it is (here: it drops the
    tool-call tags) cannot have tool turns appended to a row: the run stops before any step,
    naming --rollout.tools."""
    import shutil

    from r1train.grpo.config import GRPOJobConfig
    from r1train.grpo.trainer import GRPOTrainer
    from r1train.run.config import ConfigError, parse_args

    model = tmp_path / "model"
    shutil.copytree(tool_run[1], model)
    template = (model / "chat_template.jinja").read_text()
    (model / "chat_template.jinja").write_text(template.replace("message['content']",
                                                                "message['content'] | replace('<tool_call>', '')"))
    args = [*tool_run, "--model.path", str(model), "--train.max_steps", "1", "--train.output_dir", str(tmp_path / "r")]
    with pytest.raises(ConfigError, match=r"--rollout[.]tools: the chat template .* does not write the assistant's"):
        GRPOTrainer(parse_args(GRPOJobConfig, args))


def test_sft_evaluates_with_tools_as_grpo_runs_them(tool_run, tmp_path):
    """--sft.eval_tools: the SFT stage's held-out evaluation runs multi-turn rows, as its GRPO
    stage will: the scripted model's call is answered by the user tool (2 + 3 -> a tool turn with
    "5") and the row goes on."""
    from launch import train_py

    f = tool_run[tool_run.index("--rollout.tools") + 1].split(":")[0]
    args = ["--model.path", tool_run[1], "--data.num_train", "8", "--data.num_eval", "2", "--data.system_prompt", "",
            "--sft.max_seq_len", "256", "--sft.rows_per_step", "2", "--sft.eval_max_new_tokens", "80",
            "--train.max_steps", "1", "--train.eval_every", "0", "--train.save_every", "0",
            "--train.progress", "false", "--train.export", "false"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = train_py("sft", *args, "--sft.eval_tools", f"{f}:add", "--sft.eval_max_turns", "3",
                   "--train.output_dir", str(tmp_path), env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "evaluation with tools: add" in res.stdout
    samples = [json.loads(line) for line in (tmp_path / "eval_samples.jsonl").read_text().splitlines()]
    assert sorted(s["step"] for s in samples) == [0, 0, 1, 1]  # before and after the step, 2 problems each
    call = '<tool_call>{"name": "add", "arguments": {"a": 2, "b": 3}}</tool_call>'  # RUN_FILE's script
    for s in samples:
        assert s["completion"].startswith(call), s["completion"][:200]
        rest = s["completion"][len(call):]
        assert "5" in rest[:60] and "tool" in rest[:60], rest[:200]  # the template's tool turn with the result


@pytest.mark.parametrize("args, option, why", [
    (["--sft.eval_max_turns", "2"], "sft.eval_max_turns", "needs --sft.eval_tools"),
    (["--sft.eval_tools_prompt", "false"], "sft.eval_tools_prompt", "needs --sft.eval_tools"),
    (["--sft.eval_tools", "calculator", "--sft.eval_max_turns", "0"], "sft.eval_max_turns", ">= 1"),
    (["--sft.eval_tools", "no_such_tool"], "sft.eval_tools", "no_such_tool"),
])
def test_sft_eval_tool_options_are_refused_naming_themselves(args, option, why):
    from r1train.run.config import ConfigError, parse_args
    from r1train.sft.trainer import SFTJobConfig

    with pytest.raises(ConfigError, match=rf"--{option.replace('.', '[.]')}.*{why}"):
        parse_args(SFTJobConfig, args)
    parse_args(SFTJobConfig, ["--sft.eval_tools", "calculator", "--sft.eval_max_turns", "2",
                              "--sft.eval_tools_prompt", "false"])  # fine
