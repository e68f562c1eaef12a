"""A neural reward model as a reward (issue 30): `--grpo.rewards accuracy,rm:<folder>`.

The reward model is built here as a user's would be exported: a tiny LlamaForSequenceClassification
(num_labels=1) with the project's tiny tokenizer, written by save_pretrained as safetensors. Every
expected score is the model's logit computed in this file, in float64, on a conversation rendered
here by hand (ChatML as the tiny template writes it, or the documented plain rendering), never
through the code under test.
"""
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from r1train.data.prompts import SYSTEM_PROMPT
from r1train.grpo.config import GRPOJobConfig
from r1train.rewards import RewardConfig, get_reward_functions, pop_reward_metrics
from r1train.rewards.custom import entry_name, reward_model_folder
from r1train.rewards.reward_model import RewardModel
from r1train.run.config import ConfigError, parse_args
from r1train.run.sections import check_rewards

from launch import torchrun_py, train_py

SYSTEM = {"role": "system", "content": SYSTEM_PROMPT}
COMPLETIONS = ["<think>2 plus 3 is 5</think><answer>5</answer>", "the answer is 7",
               "<think>first add then subtract</think><answer>12</answer> finally", "6",
               "so we multiply each of the total " * 3, "<answer>0</answer>"]


def conversation(problem: str) -> list[dict]:
    return [SYSTEM, {"role": "user", "content": problem}]


PROMPTS = [conversation(f"What is {i} + {2 * i}?") for i in range(len(COMPLETIONS))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny policy model; its tokenizer is the project's tiny tokenizer."""
    from r1train.data.tiny import build_tiny_model
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


def save_rm(folder: Path, tokenizer_from: Path, num_labels: int = 1, cls: str = "LlamaForSequenceClassification",
            safetensors: bool = True, max_positions: int = 256) -> Path:
    """A tiny Llama reward model and the tiny tokenizer, saved as a user's export would be. The
    score head is drawn larger than the default init so that scores differ between inputs."""
    import transformers
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    cfg = transformers.LlamaConfig(vocab_size=(len(tok) + 63) // 64 * 64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                   max_position_embeddings=max_positions, num_labels=num_labels,
                                   pad_token_id=tok.pad_token_id, bos_token_id=None, eos_token_id=tok.eos_token_id)
    torch.manual_seed(1)
    model = getattr(transformers, cls)(cfg)
    if hasattr(model, "score"):
        torch.nn.init.normal_(model.score.weight, std=2.0)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    if not safetensors:  # the pickled format of older exports (transformers 5 writes safetensors only)
        from safetensors.torch import load_file
        torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
        (folder / "model.safetensors").unlink()
    return folder


@pytest.fixture(scope="module")
def rm(tiny, tmp_path_factory):
    return save_rm(tmp_path_factory.mktemp("rm") / "rm", tiny)


def direct_scores(folder: Path, texts: list[str], add_special_tokens: bool = False, max_tokens: int = 0,
                  keep_first: bool = False) -> list[float]:
    """The reward model's logit on each text, one text at a time, in float64, loaded here."""
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    tok = AutoTokenizer.from_pretrained(folder)
    model = LlamaForSequenceClassification.from_pretrained(folder, dtype=torch.float64).eval()
    out = []
    for text in texts:
        ids = tok(text, add_special_tokens=add_special_tokens)["input_ids"]
        if max_tokens and len(ids) > max_tokens:
            ids = ids[:1] + ids[-(max_tokens - 1):] if keep_first else ids[-max_tokens:]
        with torch.no_grad():
            out.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    return out


def chatml(messages: list[dict]) -> str:
    """The tiny tokenizer's template, written out: one closed block per message, no generation prompt."""
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)


def plain(messages: list[dict]) -> str:
    """The documented rendering without a chat template."""
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages)


def with_reply(prompt: list[dict], completion: str) -> list[dict]:
    return [*prompt, {"role": "assistant", "content": completion}]


def assert_scores(got: list[float], want: list[float], rtol: float = 1e-5, atol: float = 1e-5) -> None:
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               rtol=rtol, atol=atol)


def rm_reward(entry: str, **options):
    [(name, fn, _)] = get_reward_functions([entry], RewardConfig(**options))
    return name, fn


# --- what is scored ------------------------------------------------------------------------------

def test_the_reward_is_the_models_logit_on_the_conversation_its_template_renders(rm):
    name, fn = rm_reward(f"rm:{rm}")
    got = fn(COMPLETIONS, prompt=PROMPTS, answer=[""] * len(COMPLETIONS))
    want = direct_scores(rm, [chatml(with_reply(p, c)) for p, c in zip(PROMPTS, COMPLETIONS)])
    assert name == "rm"
    assert_scores(got, want)
    assert max(want) - min(want) > 0.1  # the scores differ, so a wrong pairing would show
    # It can fail: the conversation without its system turn, or with an assistant header left open
    # after it (a generation prompt), scores otherwise.
    for wrong in (chatml(with_reply(PROMPTS[0][1:], COMPLETIONS[0])),
                  chatml(with_reply(PROMPTS[0], COMPLETIONS[0])) + "<|im_start|>assistant\n"):
        assert abs(direct_scores(rm, [wrong])[0] - got[0]) > 1e-3
    # A prompt given as a string is one user turn; a batch without prompts scores the reply alone.
    question = [{"role": "user", "content": "What is 2 + 2?"}]
    assert_scores(fn(["4"], prompt=["What is 2 + 2?"]), direct_scores(rm, [chatml(with_reply(question, "4"))]))
    assert_scores(fn(["4"]), direct_scores(rm, [chatml(with_reply([], "4"))]))


def test_batches_score_as_one_sequence_at_a_time(rm):
    texts, prompts = COMPLETIONS * 3, PROMPTS * 3
    one = rm_reward(f"rm:{rm}", rm_batch_size=1)[1](texts, prompt=prompts)
    for size in (3, 8, 64):
        many = rm_reward(f"rm:{rm}", rm_batch_size=size)[1](texts, prompt=prompts)
        assert_scores(many, one, atol=1e-6)
    # The order of the batch does not matter either: each score belongs to its own row.
    order = [5, 2, 0, 4, 1, 3]
    shuffled = rm_reward(f"rm:{rm}", rm_batch_size=4)[1]([COMPLETIONS[i] for i in order],
                                                          prompt=[PROMPTS[i] for i in order])
    assert_scores(shuffled, [one[i] for i in order], atol=1e-6)


def test_without_a_chat_template_the_plain_rendering_is_scored(rm, tmp_path):
    bare = shutil.copytree(rm, tmp_path / "bare")
    (bare / "chat_template.jinja").unlink()
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    got = rm_reward(f"rm:{bare}")[1](COMPLETIONS[:3], prompt=PROMPTS[:3])
    want = direct_scores(bare, [plain(with_reply(p, c)) for p, c in zip(PROMPTS[:3], COMPLETIONS[:3])],
                         add_special_tokens=True)
    assert plain(with_reply(PROMPTS[0], "5")).endswith("?\n\nAssistant: 5")
    assert_scores(got, want)


def test_bfloat16_weights_score_close_to_float32(rm):
    texts, prompts = COMPLETIONS, PROMPTS
    full = rm_reward(f"rm:{rm}")[1](texts, prompt=prompts)
    half = rm_reward(f"rm:{rm}", rm_dtype="bfloat16")[1]
    assert next(half.model.parameters()).dtype == torch.bfloat16
    scores = half(texts, prompt=prompts)
    # bf16 keeps 8 bits of mantissa: through two layers and a large score head, within 20% here
    assert_scores(scores, full, rtol=0.2, atol=0.2)
    assert scores != full


def test_long_inputs_are_cut_from_the_left_and_counted(rm, tmp_path):
    texts = [chatml(with_reply(p, c)) for p, c in zip(PROMPTS, COMPLETIONS)]
    pop_reward_metrics()
    model = rm_reward(f"rm:{rm}")[1]
    assert model.max_tokens == 256  # the smaller of max_position_embeddings (256) and model_max_length (1024)
    fn = rm_reward(f"rm:{rm}", rm_max_tokens=40)[1]
    got = fn(COMPLETIONS, prompt=PROMPTS)
    assert_scores(got, direct_scores(rm, texts, max_tokens=40))
    # Every conversation here carries the R1 system prompt (over 40 tokens): each one is cut, and
    # cutting changes the score (the test can fail).
    assert pop_reward_metrics() == {"rm/truncated": float(len(COMPLETIONS))}
    assert abs(got[0] - direct_scores(rm, texts[:1])[0]) > 1e-3
    # A leading BOS (here: a tokenizer whose BOS is <|im_start|>, the first token of the template) is kept.
    with_bos = shutil.copytree(rm, tmp_path / "bos")
    config = json.loads((with_bos / "tokenizer_config.json").read_text())
    (with_bos / "tokenizer_config.json").write_text(json.dumps({**config, "bos_token": "<|im_start|>"}))
    got = rm_reward(f"rm:{with_bos}", rm_max_tokens=40)[1](COMPLETIONS, prompt=PROMPTS)
    assert_scores(got, direct_scores(with_bos, texts, max_tokens=40, keep_first=True))
    pop_reward_metrics()


def test_no_gradient_reaches_the_reward_model(rm):
    fn = rm_reward(f"rm:{rm}")[1]
    assert isinstance(fn, RewardModel) and not fn.model.training
    with torch.enable_grad():
        values = fn(COMPLETIONS, prompt=PROMPTS)
    assert all(isinstance(v, float) for v in values)
    assert all(not p.requires_grad and p.grad is None for p in fn.model.parameters())


# --- entries and refusals ------------------------------------------------------------------------

def test_entries_name_the_metric_and_the_folder():
    assert entry_name("rm:/models/rm") == "rm" and reward_model_folder("rm:/models/rm") == "/models/rm"
    assert entry_name("judge=rm:runs/a:b") == "judge" and reward_model_folder("judge=rm:runs/a:b") == "runs/a:b"
    assert reward_model_folder("my_pkg.rewards:brevity") is None and reward_model_folder("accuracy") is None


def _refusal(option_names: list[str]) -> str:
    with pytest.raises(ConfigError) as e:
        check_rewards("grpo.rewards", option_names)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_refusals_name_the_option_and_the_folder(rm, tiny, tmp_path):
    missing = tmp_path / "nothing"
    assert _refusal(["accuracy", f"rm:{missing}"]).startswith(f"--grpo.rewards: reward 'rm:{missing}': {missing}: "
                                                              f"no such folder (a reward model is a local Hugging Face")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert f"{empty}: has no config.json" in _refusal([f"rm:{empty}"])
    assert f"{tiny}: is Qwen2ForCausalLM, not a sequence-classification model" in _refusal([f"rm:{tiny}"])
    two = save_rm(tmp_path / "two", tiny, num_labels=2)
    assert f"{two}: has num_labels=2; a reward model has one output" in _refusal([f"rm:{two}"])
    pickled = save_rm(tmp_path / "pickled", tiny, safetensors=False)
    assert f"{pickled}: has no .safetensors weights" in _refusal([f"rm:{pickled}"])
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(rm / f, no_tokenizer / f)
    assert f"{no_tokenizer}: has no tokenizer" in _refusal([f"rm:{no_tokenizer}"])
    assert "names a reward twice" in _refusal([f"rm:{rm}", f"rm:{rm}"])
    check_rewards("grpo.rewards", ["accuracy", f"rm:{rm}", f"second=rm:{rm}"])  # named apart: accepted


def test_the_job_refuses_bad_reward_model_options_at_parse(rm, tmp_path):
    base = ["--grpo.rewards", f"accuracy,rm:{rm}", "--train.output_dir", str(tmp_path / "run")]
    assert parse_args(GRPOJobConfig, base).rewards.rm_batch_size == 8
    for option, value, shown, why in (("rm_batch_size", "0", "0", "must be >= 1"),
                                      ("rm_max_tokens", "-1", "-1", "must be >= 0"),
                                      ("rm_dtype", "float16", "'float16'", "must be one of float32, bfloat16"),
                                      ("rm_device", "tpu", "'tpu'", "must be cpu, cuda or cuda:N")):
        with pytest.raises(ConfigError) as e:
            parse_args(GRPOJobConfig, [*base, f"--rewards.{option}", value])
        assert str(e.value).startswith(f"--rewards.{option}={shown}: {why}"), str(e.value)
    with pytest.raises(ConfigError, match=f"--grpo.rewards: reward 'rm:{tmp_path}': {tmp_path}: has no config.json"):
        parse_args(GRPOJobConfig, ["--grpo.rewards", f"rm:{tmp_path}"])


def test_a_recipe_with_a_reward_model_passes_validation(rm, tmp_path):
    from r1train.pipeline import check_recipe

    def recipe(rewards):
        return {"output_dir": str(tmp_path / "pipe"), "stages": [{
            "name": "rl", "command": "grpo", "options": {"grpo": {"rewards": rewards, "reward_weights": [1.0, 0.5]}}}]}

    [stage] = check_recipe(recipe(["accuracy", f"rm:{rm}"]), {})
    assert stage["name"] == "rl"
    with pytest.raises(ConfigError, match=r"stage rl \(grpo\): --grpo.rewards: reward 'rm:/no/rm': /no/rm: no such"):
        check_recipe(recipe(["accuracy", "rm:/no/rm"]), {})


# --- in training ---------------------------------------------------------------------------------

def test_a_grpo_step_scores_with_the_reward_model_weighted_and_leaves_it_untouched(rm, tiny, tmp_path, capsys):
    from safetensors.torch import load_file

    from r1train.grpo.trainer import GRPOTrainer

    out = tmp_path / "run"
    cfg = parse_args(GRPOJobConfig, [
        "--model.path", str(tiny), "--rollout.group_size", "2", "--grpo.prompts_per_step", "2",
        "--grpo.micro_batch_size", "4", "--rollout.max_new_tokens", "8", "--grpo.beta", "0", "--optim.lr", "1e-2",
        "--train.max_steps", "1", "--train.eval_every", "0", "--data.num_eval", "1", "--train.progress", "false",
        "--train.save_every", "0", "--train.export", "false", "--train.sample_every", "1",
        "--grpo.rewards", f"accuracy,rm:{rm}", "--grpo.reward_weights", "1,0.5", "--train.output_dir", str(out)])
    trainer = GRPOTrainer(cfg)
    pop_reward_metrics()  # what earlier tests counted
    trainer.train()
    assert f"[grpo] reward 'rm': LlamaForSequenceClassification from {rm}, 0.0M parameters in float32 on cpu, " \
           f"inputs of at most 256 tokens, 8 per forward" in capsys.readouterr().out
    [step] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"rm/mean"' in line]
    assert math.isfinite(step["rm/mean"]) and step["rewards/rm/truncated"] == 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    want = direct_scores(rm, [chatml(with_reply(conversation(s["problem"]), s["completion"])) for s in samples])
    assert [s["rm"] for s in samples] == pytest.approx(want, rel=1e-5, abs=1e-5)
    assert step["rm/mean"] == pytest.approx(sum(want) / len(want), rel=1e-5, abs=1e-5)
    assert [s["reward"] for s in samples] == pytest.approx([s["accuracy"] + 0.5 * s["rm"] for s in samples])
    # The policy's update left the reward model as it was loaded: no gradient, the same weights.
    [model] = [fn.model for _, fn, _ in trainer.rewards if isinstance(fn, RewardModel)]
    saved = load_file(rm / "model.safetensors")
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    assert all(torch.equal(t, saved[k]) for k, t in model.state_dict().items() if k in saved) and len(saved) > 0
    assert yaml.safe_load((out / "config.yaml").read_text())["grpo"]["rewards"] == ["accuracy", f"rm:{rm}"]


def test_two_processes_and_a_resume_score_as_one_uninterrupted_run(rm, tiny, tmp_path):
    """The reward model on 2 processes (each rank scores its own groups) and across a resume
    gives the per-step rewards, losses and gradient norms of one uninterrupted process."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["grpo", "--model.path", str(tiny), "--rollout.group_size", "2", "--grpo.prompts_per_step", "2",
            "--grpo.micro_batch_size", "2", "--rollout.max_new_tokens", "8", "--grpo.beta", "0", "--optim.lr", "1e-2",
            "--optim.warmup_steps", "0", "--train.max_steps", "3", "--train.eval_every", "0", "--data.num_eval", "1",
            "--train.progress", "false", "--train.save_every", "1", "--train.export", "false",
            "--grpo.rewards", f"format,rm:{rm}", "--grpo.reward_weights", "1,2"]

    def metrics(out: Path) -> list[dict]:
        return [m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "reward" in m]

    one, two, resumed = tmp_path / "one", tmp_path / "two", tmp_path / "resumed"
    for res in (train_py(*args, "--train.output_dir", one, env=env),
                torchrun_py(*args, "--train.output_dir", two, env=env),
                train_py(*args, "--train.output_dir", resumed, "--train.stop_at_step", "1", env=env),
                train_py(*args, "--train.output_dir", resumed, env=env)):
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    base = metrics(one)
    assert [m["step"] for m in base] == [1, 2, 3] and len({m["rm/mean"] for m in base}) > 1
    for other in (two, resumed):
        got = metrics(other)
        assert [m["step"] for m in got] == [1, 2, 3]
        for a, b in zip(base, got):
            for k in ("rm/mean", "reward", "loss", "grad_norm"):
                assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (other.name, a["step"], k)
