"""The response prefix (`--data.response_prefix`, issue 31): text such as `<think>` that opens the
assistant's turn of every prompt, after the chat template's generation prompt.

It is prompt: rendered after the generation prompt and tokenized with it as one string, counted in
max_prompt_tokens, never trained on. Whatever reads a completion as text reads it after the prefix:
the rewards, samples.jsonl, the held-out evaluation (eval_samples.jsonl), the inspector's group
records and rejection sampling's kept replies; completion ids and lengths stay the model's own.
The empty default leaves the prompts' token ids as they were (tests/test_golden.py: the runs'
numbers).

The strict format reward is transcribed here from the R1 tutorial's regex, independently of
rewards/format.py: a model that writes only `...</think><answer>...</answer>` after a `<think>`
prefix passes it, and fails it without the prefix."""
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from test_golden import GOLDEN, RUNS

from r1train.data.problems import check_response_prefix, encode_prompts
from r1train.data.prompts import make_conversation, render_prompt
from r1train.data.tiny import build_tiny_model, build_tiny_tokenizer
from r1train.evaluate import evaluate
from r1train.grpo.config import GRPOJobConfig
from r1train.run.config import ConfigError, help_text, parse_args
from r1train.run.dist import DistInfo
from r1train.run.sections import DataConfig, check_data
from r1train.sft.rejection import SamplingConfig, sample_and_filter
from r1train.sft.trainer import SFTJobConfig

from launch import train_py

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
ONE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
PREFIX = "<think>"


def r1_format(text: str) -> bool:
    """The tutorial's strict format check, as it is written there (without its MULTILINE)."""
    return re.match(r"^<think>.*?</think>\s*<answer>.*?</answer>$", text, re.DOTALL) is not None


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer(seed=0)


# --- the prompt -----------------------------------------------------------------------------------

def test_the_prompt_ends_with_the_generation_prompt_then_the_prefix(tok):
    chat = make_conversation("What is 2 + 3?", "Think first.")
    plain = render_prompt(tok, chat, add_generation_prompt=True)
    text = render_prompt(tok, chat, add_generation_prompt=True, response_prefix=PREFIX)
    assert plain.endswith("<|im_start|>assistant\n")  # the tiny tokenizer's (Qwen's) generation prompt
    assert text == plain + PREFIX
    # One string, tokenized whole: the ids are the tokenizer's for the whole text (here, where
    # <think> is one added token, the plain prompt's ids and that token).
    [_], [ids], dropped = encode_prompts(tok, [{"prompt": chat}], response_prefix=PREFIX)
    assert ids == tok(plain + PREFIX, add_special_tokens=False)["input_ids"] and dropped == 0
    assert ids == tok(plain, add_special_tokens=False)["input_ids"] + [tok.convert_tokens_to_ids(PREFIX)]
    # The prefix's tokens count in max_prompt_tokens.
    n = len(ids)
    assert encode_prompts(tok, [{"prompt": chat}], n, PREFIX)[2] == 0
    assert encode_prompts(tok, [{"prompt": chat}], n - 1, PREFIX)[2] == 1
    assert encode_prompts(tok, [{"prompt": chat}], n - 1)[2] == 0  # the same prompt without it fits
    # Without it, the ids are the plain prompt's, as before the option existed.
    assert encode_prompts(tok, [{"prompt": chat}])[1] == [tok(plain, add_special_tokens=False)["input_ids"]]
    with pytest.raises(ValueError, match="needs add_generation_prompt=True"):
        render_prompt(tok, chat, add_generation_prompt=False, response_prefix=PREFIX)


def test_the_option_is_typed_listed_and_refuses_an_end_of_turn(tok, tmp_path):
    assert parse_args(GRPOJobConfig, ["--data.response_prefix", "<think>"]).data.response_prefix == "<think>"
    assert parse_args(GRPOJobConfig, []).data.response_prefix == ""
    assert parse_args(SFTJobConfig, []).data.response_prefix == ""  # SFT's: the held-out prompts only
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"data": {"response_prefix": "<think>\n"}}))
    assert parse_args(GRPOJobConfig, ["--recipe", str(recipe)]).data.response_prefix == "<think>\n"
    recipe.write_text(yaml.safe_dump({"data": {"response_prefix": ["<think>"]}}))
    with pytest.raises(ConfigError, match="expected text"):
        parse_args(GRPOJobConfig, ["--recipe", str(recipe)])
    with pytest.raises(ConfigError, match=r"^--data.response_prefix=5: must be text"):
        check_data(DataConfig(response_prefix=5))
    assert "--data.response_prefix (default: '')" in help_text(GRPOJobConfig())
    # The end of a turn inside the prefix would end the reply before the model writes.
    with pytest.raises(ConfigError, match=r"^--data.response_prefix='<think><\|im_end\|>': holds '<\|im_end\|>'"):
        check_response_prefix(tok, "<think><|im_end|>", "data")
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")  # an EOS id of the model's generation config
    with pytest.raises(ConfigError, match=r"^--problems.response_prefix='<\|endoftext\|>': holds"):
        check_response_prefix(tok, "<|endoftext|>", "problems", eos_ids=[endoftext])
    check_response_prefix(tok, "<|endoftext|>", "data")  # not an end for this model
    # A template whose generation prompt opens <think> itself gets a warning, not a second silent one.
    said = []
    check_response_prefix(tok, PREFIX, "data", say=said.append)
    assert said == []
    tok2 = build_tiny_tokenizer(seed=0)
    tok2.chat_template = tok.chat_template.replace("assistant\n'", "assistant\n<think>\n'")
    assert render_prompt(tok2, make_conversation("?", "s")).endswith("assistant\n<think>\n")
    check_response_prefix(tok2, PREFIX, "data", say=said.append)
    assert len(said) == 1 and "already ends with '<think>'" in said[0]


# --- the readers of a completion, with a scripted engine --------------------------------------------

def scripted_engine(texts: list[str]):
    """`Engine.generate`'s result for every call: `texts` (cycled over the rows), each 3 tokens."""
    def generate(prompts, seeds, **kwargs):
        rows = [texts[i % len(texts)] for i in range(len(prompts))]
        ids = torch.arange(3 * len(rows)).view(len(rows), 3)
        return SimpleNamespace(texts=rows, completion_ids=ids, completion_mask=torch.ones_like(ids),
                               truncated=torch.zeros(len(rows), dtype=torch.bool),
                               lengths=torch.full((len(rows),), 3))
    return SimpleNamespace(generate=generate)


# What a model writes after a <think> prefix: the rest of the R1 format.
AFTER_PREFIX = "so 2 + 3 = 5</think><answer>5</answer>"


def test_evaluation_reads_each_completion_after_the_prefix():
    records = [{"problem": "What is 2 + 3?", "solution": "", "answer": "5"}]
    engine = scripted_engine([AFTER_PREFIX])
    res = evaluate(engine, records, [[1]], ONE, max_new_tokens=4, return_samples=1, response_prefix=PREFIX)
    assert res["format"] == float(r1_format(PREFIX + AFTER_PREFIX)) == 1.0 and res["accuracy"] == 1.0
    assert res["samples"][0]["completion"] == PREFIX + AFTER_PREFIX
    assert res["mean_length"] == 3  # the model's own tokens
    res = evaluate(engine, records, [[1]], ONE, max_new_tokens=4, return_samples=1)
    assert res["format"] == float(r1_format(AFTER_PREFIX)) == 0.0  # without it: not the format
    assert res["samples"][0]["completion"] == AFTER_PREFIX


def test_rejection_sampling_keeps_the_prefix_in_the_reply(monkeypatch):
    import r1train.sft.rejection as rejection
    monkeypatch.setattr(rejection, "check_sampling_memory", lambda *a, **k: None)
    chat = make_conversation("What is 2 + 3?", "Think first.")
    records = [{"prompt": chat, "problem": "What is 2 + 3?", "solution": "", "answer": "5"}]
    s = SamplingConfig(samples_per_prompt=2, rewards=["format", "accuracy"], require=["format", "accuracy"])
    engine = scripted_engine([AFTER_PREFIX, "no tags 5"])
    kept, stats = sample_and_filter(engine, records, [[1]], ONE, s, seed=0, response_prefix=PREFIX)
    assert stats["sample_acceptance_rate"] == 0.5  # the tagged sample passes with the prefix, the other not
    [row] = kept
    assert row["messages"] == [*chat, {"role": "assistant", "content": PREFIX + AFTER_PREFIX}]
    assert row["length"] == 3 and row["rewards"] == {"format": 1.0, "accuracy": 1.0}
    kept, stats = sample_and_filter(engine, records, [[1]], ONE, s, seed=0)
    assert kept == [] and stats["sample_acceptance_rate"] == 0.0  # without it the format fails


# --- a GRPO step of the cold-start tiny model ---------------------------------------------------------

# Records each batch of texts the rewards get, and the model's token ids beside them.
SEEN_REWARD = '''
import json
from pathlib import Path

def seen(completions, completion_ids, **columns):
    with open(Path(__file__).with_name("seen.jsonl"), "a") as f:
        for text, ids in zip(completions, completion_ids):
            f.write(json.dumps({"text": text, "ids": ids}) + "\\n")
    return [0.0] * len(completions)
'''


def test_a_grpo_step_scores_samples_and_evaluates_the_prefixed_reply(tmp_path, tok):
    (tmp_path / "seen_reward.py").write_text(SEEN_REWARD)
    out = tmp_path / "run"
    res = train_py("grpo", "--model.path", ROOT / "tests" / "assets" / "tiny-r1-sft",
                   "--data.response_prefix", PREFIX, "--data.task.max_operands", "2", "--data.task.max_value", "9",
                   "--data.num_train", "8", "--data.num_eval", "2", "--rollout.group_size", "2",
                   "--grpo.prompts_per_step", "2", "--grpo.micro_batch_size", "4", "--rollout.max_new_tokens", "24",
                   "--grpo.beta", "0", "--grpo.rewards", f"format,{tmp_path / 'seen_reward.py'}:seen",
                   "--train.max_steps", "1", "--train.eval_every", "0", "--train.save_every", "0",
                   "--train.sample_every", "1", "--train.token_records", "1", "--train.export", "false",
                   "--train.progress", "false", "--train.output_dir", out, env=ENV, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert len(seen) == 4
    for s in seen:  # the text is the prefix and the decoded tokens of the model, which hold no prefix
        assert s["text"] == PREFIX + tok.decode(s["ids"], skip_special_tokens=True)
    # The format reward is the tutorial's check of prefix + completion.
    [step] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert step["format/mean"] == pytest.approx(sum(r1_format(s["text"]) for s in seen) / len(seen))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [x["completion"] for x in samples] == [s["text"] for s in seen]
    assert all(x["format"] == float(r1_format(x["completion"])) for x in samples)
    evals = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert len(evals) == 4 and all(e["completion"].startswith(PREFIX) for e in evals)  # 2 problems, 2 evaluations
    assert all(e["format"] == float(r1_format(e["completion"])) for e in evals)
    # The inspector's group record: the prefix beside the model's tokens, which do not repeat it.
    [record] = [json.loads(line) for line in (out / "tokens.jsonl").read_text().splitlines()]
    assert record["prefix"] == PREFIX
    for c, s in zip(record["completions"], seen):
        assert len(c["tokens"]) == len(s["ids"]) == len(c["values"]["logp"])


def test_sft_trains_the_same_and_evaluates_after_the_prefix(tmp_path):
    """SFT's prefix reaches its held-out prompts only: the golden SFT run, prefix set, trains to
    the checked-in numbers (tests/assets/golden_runs.json), and its evaluation reads the prefix."""
    args, keys = RUNS["sft"]
    tiny = build_tiny_model(tmp_path / "tiny", seed=0)
    out = tmp_path / "sft"
    res = train_py(*args, "--model.path", tiny, "--data.response_prefix", PREFIX, "--sft.eval_max_new_tokens", "8",
                   "--train.output_dir", out, env={k: v for k, v in ENV.items() if k != "R1_LOGPROB_IMPL"}, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    golden = json.loads(GOLDEN.read_text())["sft"]
    assert [s["step"] for s in steps] == [g["step"] for g in golden]
    for got, want in zip(steps, golden):
        for k in keys:
            assert got[k] == pytest.approx(want[k], rel=1e-4, abs=1e-6), (got["step"], k)
    evals = [json.loads(line) for line in (out / "eval_samples.jsonl").read_text().splitlines()]
    assert evals and all(e["completion"].startswith(PREFIX) for e in evals)
    assert all(e["format"] == float(r1_format(e["completion"])) for e in evals)


def test_a_resume_refuses_another_prefix_and_takes_an_old_checkpoint_without_one(tmp_path):
    """The prefix is part of every prompt, and its tokens decide which prompts max_prompt_tokens
    drops (the data order): like the system prompt it defines the run (run/resume.py)."""
    from r1train.run.config import to_dict
    from r1train.run.resume import check_resume
    ckpt = tmp_path / "step-1"
    ckpt.mkdir()
    saved = to_dict(parse_args(GRPOJobConfig, []))
    (ckpt / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match=r"--data.response_prefix was '', now '<think>'"):
        check_resume(ckpt, parse_args(GRPOJobConfig, ["--data.response_prefix", PREFIX]), "grpo")
    del saved["data"]["response_prefix"]  # a checkpoint from before the option
    (ckpt / "config.yaml").write_text(yaml.safe_dump(saved))
    assert check_resume(ckpt, parse_args(GRPOJobConfig, []), "grpo") == []
