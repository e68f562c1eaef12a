"""Bad options of rejection-sample and distill fail at start, naming the option; sampling reads
only the training split; recipe values are coerced as the same text on the command line is."""
import json
import os
from pathlib import Path

import pytest

from r1train.grpo.config import GRPOJobConfig
from r1train.run.config import ConfigError, parse_args
from r1train.sft.distill import DistillJobConfig
from r1train.sft.rejection import RejectionJobConfig

from launch import train_py

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY_SFT = ROOT / "tests" / "assets" / "tiny-r1-sft"

# (arguments, what the error must say): the option, then the reason.
BAD_SAMPLING = [
    (["--sampling.require", "format,acuracy"], r"--sampling\.require=\['acuracy'\]: unknown reward"),
    (["--sampling.require", "accuracy,formatt"], r"--sampling\.require=\['formatt'\]: unknown reward"),
    (["--sampling.rewards", "format,acc", "--sampling.require", "format"], r"--sampling\.rewards=\['acc'\]: unknown"),
    (["--sampling.rewards", "format,format", "--sampling.require", "format"], r"--sampling\.rewards=.*twice"),
    (["--sampling.rewards", "", "--sampling.require", ""], r"--sampling\.rewards=\[\]: needs at least one"),
    (["--sampling.samples_per_prompt", "0"], r"--sampling\.samples_per_prompt=0: must be >= 1"),
    (["--sampling.prompts_per_batch", "0"], r"--sampling\.prompts_per_batch=0: must be >= 1"),
    (["--sampling.max_new_tokens", "0"], r"--sampling\.max_new_tokens=0: must be >= 1"),
    (["--sampling.num_prompts", "-1"], r"--sampling\.num_prompts=-1: must be >= 0"),
    (["--sampling.top_p", "0"], r"--sampling\.top_p=0\.0: must be in \(0, 1\]"),
    (["--sampling.top_p", "1.5"], r"--sampling\.top_p=1\.5: must be in \(0, 1\]"),
    (["--sampling.temperature", "0"], r"--sampling\.temperature=0\.0: must be > 0"),
    (["--sampling.reward_weights", "1"], r"--sampling\.reward_weights=\[1\.0\]: needs one weight per reward"),
    (["--sampling.reward_weights", "1,nan"], r"--sampling\.reward_weights=.*finite"),
    (["--sampling.output", "/x/kept.json"], r"--sampling\.output='/x/kept\.json': must be a \.jsonl path"),
]
# Cases rejection-sample already refused before the check was shared with distill.
ALREADY_CHECKED = {"--sampling.samples_per_prompt 0", "--sampling.temperature 0", "--sampling.reward_weights 1"}
NEW_FOR_REJECTION = [c for c in BAD_SAMPLING if " ".join(c[0]) not in ALREADY_CHECKED]


@pytest.mark.parametrize("args,message", BAD_SAMPLING, ids=[" ".join(a) for a, _ in BAD_SAMPLING])
def test_distill_checks_the_sampling_section(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(DistillJobConfig, [*args, "--distill.teacher", "some/teacher"])


@pytest.mark.parametrize("args,message", NEW_FOR_REJECTION, ids=[" ".join(a) for a, _ in NEW_FOR_REJECTION])
def test_rejection_checks_the_sampling_section(args, message):
    with pytest.raises(ConfigError, match=message):
        parse_args(RejectionJobConfig, args)


def test_distill_refuses_a_sampling_output_it_would_ignore():
    with pytest.raises(ConfigError, match=r"--sampling\.output='t\.jsonl': not used by distill"):
        parse_args(DistillJobConfig, ["--distill.teacher", "some/teacher", "--sampling.output", "t.jsonl"])


def test_bad_sampling_option_stops_distill_before_the_teacher_loads(tmp_path):
    """Through train.py: exit code 2 and the option in the message, although the teacher does
    not exist (so nothing was loaded before the check)."""
    res = train_py("distill", "--distill.teacher", tmp_path / "no-such-teacher", "--sampling.require",
                   "accuracy,formatt", "--train.output_dir", tmp_path / "out", env=ENV, timeout=300)
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "error: --sampling.require=['formatt']: unknown reward" in res.stderr, res.stderr[-2000:]


# --- sampling reads only the training split ---------------------------------------------------

def _gsm8k_row(question: str, answer: int) -> str:
    return json.dumps({"question": question, "answer": f"w\n#### {answer}"}) + "\n"


def test_train_records_reads_only_the_train_split(tmp_path):
    from r1train.data.problems import train_records
    only = tmp_path / "only-train"
    only.mkdir()
    (only / "train.jsonl").write_text("".join(_gsm8k_row(f"What is {i} + 1?", i + 1) for i in range(5)))
    cfg = RejectionJobConfig()
    cfg.data.source, cfg.data.schema = str(only), "gsm8k"
    assert [r["answer"] for r in train_records(cfg.data, seed=0)] == ["1", "2", "3", "4", "5"]


def test_rejection_sample_runs_on_a_train_only_source(tmp_path):
    """A folder with only train.jsonl (no test split) works; a prompt longer than
    --data.max_prompt_tokens is dropped with a count (3 short prompts are 104 tokens with the
    system prompt, the long one 278)."""
    src = tmp_path / "src"
    src.mkdir()
    rows = [_gsm8k_row(f"What is {i} + 1?", i + 1) for i in range(3)]
    rows.append(_gsm8k_row("What is " + " + ".join(["1"] * 60) + "?", 60))
    (src / "train.jsonl").write_text("".join(rows))
    out, kept_path = tmp_path / "out", tmp_path / "kept" / "set.jsonl"
    res = train_py("rejection-sample", "--model.path", TINY_SFT, "--data.source", src, "--data.schema", "gsm8k",
                   "--data.max_prompt_tokens", "200", "--sampling.samples_per_prompt", "2",
                   "--sampling.max_new_tokens", "48", "--sampling.require", "format", "--sampling.output", kept_path,
                   "--train.output_dir", out, env=ENV, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "[rejection] dropped 1 prompts longer than 200 tokens" in res.stdout
    stats = json.loads((out / "rejection_stats.json").read_text())
    assert stats["prompts"] == 3 and stats["dropped_long_prompts"] == 1 and stats["samples"] == 6
    assert stats["kept"] == len(kept_path.read_text().splitlines()) >= 1


# --- recipe values are read as the same text on the command line ------------------------------

def _recipe(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("option,text", [("train.max_steps", "2.5"), ("rollout.group_size", "7.9")])
def test_recipe_float_for_an_int_option_names_option_and_file(tmp_path, option, text):
    section, name = option.split(".")
    recipe = _recipe(tmp_path, f"{section}:\n  {name}: {text}\n")
    with pytest.raises(ConfigError, match=rf"recipe {recipe}: option {option}: expected int, got {text}"):
        parse_args(GRPOJobConfig, ["--recipe", recipe])
    recipe = _recipe(tmp_path, f"{section}:\n  {name}: 4.0\n")  # a whole number is fine
    assert getattr(getattr(parse_args(GRPOJobConfig, ["--recipe", recipe]), section), name) == 4


def test_recipe_null_is_an_error_unless_the_option_is_optional(tmp_path):
    recipe = _recipe(tmp_path, "train:\n  output_dir: null\n")
    with pytest.raises(ConfigError, match=rf"recipe {recipe}: option train\.output_dir: null given"):
        parse_args(GRPOJobConfig, ["--recipe", recipe])
    recipe = _recipe(tmp_path, "rewards:\n  accuracy_batch_timeout_s: null\n")
    assert parse_args(GRPOJobConfig, ["--recipe", recipe]).rewards.accuracy_batch_timeout_s is None


def test_recipe_yaml_boolean_for_a_text_option_is_an_error(tmp_path):
    recipe = _recipe(tmp_path, "optim:\n  schedule: off\n")  # YAML 1.1 reads `off` as false
    with pytest.raises(ConfigError, match=rf"recipe {recipe}: option optim\.schedule: expected text, got False"):
        parse_args(GRPOJobConfig, ["--recipe", recipe])


@pytest.mark.parametrize("option,text", [
    ("train.max_steps", "2.5"), ("train.max_steps", "inf"), ("train.max_steps", "12345678901234567891"),
    ("train.resume", "0"), ("train.resume", "1"), ("rollout.stop_strings", "42"),
])
def test_recipe_and_command_line_read_a_value_alike(tmp_path, option, text):
    """The same text gives the same value, or the same refusal, from a recipe and a flag."""
    section, name = option.split(".")
    recipe = _recipe(tmp_path, f"{section}:\n  {name}: {text}\n")

    def read(args):
        try:
            cfg = parse_args(GRPOJobConfig, args)
        except ConfigError as e:
            assert option in str(e)
            return "refused"
        return getattr(getattr(cfg, section), name)

    from_recipe, from_flag = read(["--recipe", recipe]), read([f"--{option}", text])
    assert from_recipe == from_flag and type(from_recipe) is type(from_flag)
