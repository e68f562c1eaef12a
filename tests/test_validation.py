"""Validation and error reporting (issue 13, items 14 and 15): every bad value is refused at
start, before any model or data loads, naming the option; every user error (option, recipe,
data file or row, model path) is one line `error: ...` with exit status 2; rows are counted from
1 ("line N" of a JSON-lines file); `--data.on_bad_row skip` also covers lines that are not JSON,
not UTF-8 or not objects."""
from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import pytest

from r1train.data import DatasetError, load_records
from r1train.grpo.config import GRPOJobConfig
from r1train.run.config import ConfigError, parse_args
from r1train.sft.distill import DistillJobConfig
from r1train.sft.rejection import RejectionJobConfig
from r1train.sft.trainer import SFTJobConfig

from launch import train_py

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}

# --- item 14: bad values fail at start, naming the option ---------------------------------------

# (arguments, the option the one-line error must name). Each was accepted before, or failed
# later without naming the option: log_every 0 divided by zero after step 1, top_k -5 crashed
# in sampling, inf / NaN passed `x <= 0` style checks (NaN <= 0 is False), duplicate rewards
# and an unknown device failed after the model loaded.
GRPO_BAD = [
    (["--train.log_every", "0"], "train.log_every"),
    (["--rollout.top_k", "-5"], "rollout.top_k"),
    (["--train.save_every", "-1"], "train.save_every"),
    (["--train.sample_every", "-3"], "train.sample_every"),
    (["--train.eval_every", "-1"], "train.eval_every"),
    (["--optim.warmup_steps", "-1"], "optim.warmup_steps"),
    (["--optim.max_grad_norm", "nan"], "optim.max_grad_norm"),
    (["--optim.lr", "nan"], "optim.lr"),
    (["--optim.lr", "inf"], "optim.lr"),
    (["--optim.beta2", "1"], "optim.beta2"),
    (["--rollout.temperature", "inf"], "rollout.temperature"),
    (["--rollout.eval_temperature", "-1"], "rollout.eval_temperature"),
    (["--grpo.beta", "nan"], "grpo.beta"),
    (["--grpo.epsilon_low", "nan"], "grpo.epsilon_low"),
    (["--grpo.epsilon_low", "5"], "grpo.epsilon_low"),
    (["--grpo.rewards", "accuracy,format,accuracy"], "grpo.rewards"),
    (["--grpo.reward_weights", "1,nan"], "grpo.reward_weights"),
    (["--grpo.ref_refresh_steps", "-2"], "grpo.ref_refresh_steps"),
    (["--train.device", "tpu"], "train.device"),
    (["--rewards.accuracy_timeout_s", "nan"], "rewards.accuracy_timeout_s"),
    (["--rewards.accuracy_batch_timeout_s", "-1"], "rewards.accuracy_batch_timeout_s"),
    (["--rewards.unparseable_gold", "drop"], "rewards.unparseable_gold"),
    (["--rewards.cosine_max_len", "0"], "rewards.cosine_max_len"),
    (["--data.schema", "sharegpt"], "data.schema"),
    (["--data.test_size", "nan"], "data.test_size"),
    (["--data.task.max_value", "0"], "data.task.max_value"),
    (["--model.embedded_size", "huge"], "model.embedded_size"),
]
SFT_BAD = [
    (["--train.log_every", "0"], "train.log_every"),
    (["--optim.lr", "nan"], "optim.lr"),
    (["--optim.max_grad_norm", "nan"], "optim.max_grad_norm"),
    (["--optim.warmup_steps", "-5"], "optim.warmup_steps"),
    (["--train.device", "tpu"], "train.device"),
    (["--train.save_every", "-1"], "train.save_every"),
    (["--sft.epochs", "nan"], "sft.epochs"),
    (["--sft.rows_per_step", "0"], "sft.rows_per_step"),
    (["--data.on_bad_row", "ignore"], "data.on_bad_row"),
    (["--data.schema", "sharegpt"], "data.schema"),
]
REJECTION_BAD = [
    (["--sampling.temperature", "inf"], "sampling.temperature"),
    (["--train.device", "tpu"], "train.device"),
    (["--data.on_bad_row", "ignore"], "data.on_bad_row"),
    (["--data.test_size", "0"], "data.test_size"),
    (["--model.dtype", "float16"], "model.dtype"),
]
DISTILL_BAD = [
    (["--distill.kl_weight", "nan"], "distill.kl_weight"),
    (["--problems.schema", "sharegpt"], "problems.schema"),
    (["--sampling.temperature", "inf"], "sampling.temperature"),
    (["--train.log_every", "0"], "train.log_every"),
    (["--optim.lr", "inf"], "optim.lr"),
]
CASES = ([(GRPOJobConfig, a, o) for a, o in GRPO_BAD] + [(SFTJobConfig, a, o) for a, o in SFT_BAD]
         + [(RejectionJobConfig, a, o) for a, o in REJECTION_BAD]
         + [(DistillJobConfig, [*a, "--distill.teacher", "t"], o) for a, o in DISTILL_BAD])


@pytest.mark.parametrize("cls,args,option", CASES,
                         ids=[f"{c.__name__}:{' '.join(a[:2])}" for c, a, _ in CASES])
def test_bad_value_is_refused_naming_the_option(cls, args, option):
    with pytest.raises(ConfigError) as e:
        parse_args(cls, args)
    assert f"--{option}" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda_is_refused_at_start():
    with pytest.raises(ConfigError, match=r"--train\.device='cuda': CUDA is not available"):
        parse_args(GRPOJobConfig, ["--train.device", "cuda"])


def test_valid_edge_values_still_pass():
    """0 means "off" or "only at the end" for these; the defaults validate in every command."""
    parse_args(GRPOJobConfig, ["--train.save_every", "0", "--train.sample_every", "0",
                               "--train.eval_every", "0", "--optim.max_grad_norm", "0",
                               "--optim.warmup_steps", "0", "--rollout.top_k", "0",
                               "--rewards.accuracy_batch_timeout_s", "none"])
    parse_args(SFTJobConfig, [])
    parse_args(RejectionJobConfig, [])
    parse_args(DistillJobConfig, ["--distill.teacher", "t"])


# --- item 15: one line, exit status 2, for every user error -------------------------------------

def _train(*args, cwd=None):
    return train_py(*args, env=ENV, timeout=300, cwd=cwd)


def _one_line_error(res) -> str:
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    [line] = [l for l in res.stderr.splitlines() if l.startswith("error: ")]
    return line


def test_data_errors_are_one_line_and_come_before_the_model(tmp_path):
    """A bad row (line 3 of the file: line 2 is blank) fails with its file and line, exit 2,
    although --model.path names no model: the data was read first (before, the model loaded
    first and this run ended in a tokenizer traceback; a data error was a traceback too)."""
    data = tmp_path / "gsm8k.jsonl"
    data.write_text(json.dumps({"question": "What is 1 + 1?", "answer": "2\n#### 2"}) + "\n\n"
                    + json.dumps({"question": "What is 2 + 2?", "answer": "four"}) + "\n")
    for command in ("grpo", "sft"):
        res = _train(command, "--model.path", tmp_path / "no-such-model", "--data.source", data,
                     "--train.output_dir", tmp_path / command)
        assert _one_line_error(res) == \
            f"error: {data}: line 3, field 'answer': no final '#### N' line: ...'four'"
    missing = _train("grpo", "--data.source", tmp_path / "missing.jsonl",
                     "--train.output_dir", tmp_path / "out")
    assert _one_line_error(missing) == f"error: no such file or folder: {tmp_path / 'missing.jsonl'}"


def test_bad_option_and_model_path_are_one_line(tmp_path):
    line = _one_line_error(_train("grpo", "--train.log_every", "0", "--train.max_steps", "1",
                                  "--train.output_dir", tmp_path / "grpo"))
    assert line.startswith("error: --train.log_every=0: must be >= 1")
    line = _one_line_error(_train("rejection-sample", "--model.path", tmp_path / "nothing",
                                  "--data.source", ROOT / "tests/assets/gsm8k_test_sample.jsonl",
                                  "--train.output_dir", tmp_path / "out"))
    assert line.startswith(f"error: cannot load a tokenizer from '{tmp_path / 'nothing'}'")


@pytest.mark.parametrize("suffix,text,where", [
    (".yaml", "train:\n  max_steps: 3\n   bad: [\n", "line 3, column 7: mapping values are not allowed here"),
    (".toml", "[train]\nmax_steps = \n", "Invalid value (at line 2, column 13)"),
    (".json", '{"train": {"max_steps": 3,}}', "line 1, column 27: Expecting property name"),
])
def test_recipe_syntax_error_names_file_line_and_column(tmp_path, suffix, text, where):
    recipe = tmp_path / f"recipe{suffix}"
    recipe.write_text(text)
    with pytest.raises(ConfigError) as e:
        parse_args(GRPOJobConfig, ["--recipe", str(recipe)])
    assert str(e.value).startswith(f"recipe {recipe}: {where}"), str(e.value)
    assert "<unicode string>" not in str(e.value)


def test_recipe_syntax_error_through_train_py(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("stages:\n  - name: a\n    command: grpo\n  options: {\n")
    line = _one_line_error(_train("pipeline", "--recipe", recipe))
    assert line.startswith(f"error: recipe {recipe}: line "), line


# --- item 15: rows counted from 1, on_bad_row skip covers unreadable lines ---------------------

GOOD = {"question": "What is 1 + 1?", "answer": "1 + 1 = 2\n#### 2"}


def _mixed_file(tmp_path) -> Path:
    """Lines: 1 good, 2 blank, 3 not JSON, 4 latin-1 bytes, 5 a JSON array, 6 null, 7 good."""
    path = tmp_path / "mixed.jsonl"
    good = json.dumps(GOOD).encode()
    path.write_bytes(b"\n".join([good, b"", b'{"question": "x", ', '{"question": "caf\u00e9"}'.encode("latin-1"),
                                 b"[1, 2]", b"null", good]) + b"\n")
    return path


def test_skip_covers_malformed_non_utf8_and_non_object_lines(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="r1train.data.loaders"):
        records = load_records(_mixed_file(tmp_path), split="all", on_bad_row="skip")
    assert len(records) == 2 and records.skipped == 4  # lines 3, 4, 5 and 6
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith("skipped 4 of 6 rows of ") and "(first: line 3, malformed JSON" in message


@pytest.mark.parametrize("line,reason", [
    ("line 3", "malformed JSON: Expecting property name enclosed in double quotes"),
])
def test_error_names_the_first_unreadable_line(tmp_path, line, reason):
    with pytest.raises(DatasetError) as e:
        load_records(_mixed_file(tmp_path), split="all")
    assert str(e.value).startswith(f"{tmp_path / 'mixed.jsonl'}: {line}, {reason}"), str(e.value)


@pytest.mark.parametrize("content,expected", [
    # `{"question": "caf` is 17 bytes, so the latin-1 é is byte 18
    (b'{"question": "caf\xe9"}\n', "line 1, not UTF-8 text (invalid continuation byte at byte 18 of the line)"),
    (b"\n\n[1, 2]\n", "line 3, a JSON array, expected an object"),
    (b"null\n", "line 1, a JSON null, expected an object"),
])
def test_each_unreadable_line_is_named(tmp_path, content, expected):
    path = tmp_path / "one.jsonl"
    path.write_bytes(content)
    with pytest.raises(DatasetError) as e:
        load_records(path, split="all")
    assert str(e.value) == f"{path}: {expected}"


def test_rows_of_a_json_array_count_from_one(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps([GOOD, dict(GOOD, answer="no final line"), GOOD]))
    with pytest.raises(DatasetError, match=r"rows\.json: row 2, field 'answer': no final"):
        load_records(path, split="all")


def test_all_lines_unreadable_with_skip_says_so(tmp_path):
    path = tmp_path / "junk.jsonl"
    path.write_text("not json\n{also not\n")
    with pytest.raises(DatasetError, match=r"junk\.jsonl: no readable row; first: line 1, malformed JSON"):
        load_records(path, split="all", on_bad_row="skip")


# --- issue 35: the last tracebacks, one line each ------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_only(tmp_path_factory) -> Path:
    """A model folder with the tiny tokenizer and no weights: a run that gets past the tokenizer
    fails loading the model, so an error about the tokenizer proves it came first."""
    from r1train.data.tiny import build_tiny_tokenizer
    folder = tmp_path_factory.mktemp("tokenizer-only")
    build_tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.mark.parametrize("template,why", [
    ("{% for m in messages %}{{ m.content }\n", "not a valid Jinja template: unexpected '}' (line 1)"),
    ("{{ raise_exception('roles must alternate') }}",
     "rendering a sample system + user prompt raised TemplateError: roles must alternate"),
    ("{% if false %}x{% endif %}", "renders an empty prompt for a sample system + user conversation "
                                   "(add_generation_prompt=True); the template must write the messages "
                                   "and the assistant header"),
], ids=["invalid-jinja", "raises", "renders-empty"])
def test_a_broken_chat_template_is_one_line_before_the_model_loads(tmp_path, tokenizer_only, template, why):
    """Before: a traceback at the first prompt, after the model loaded; an empty prompt only in
    generation ("cannot reshape tensor of 0 elements")."""
    path = tmp_path / "template.jinja"
    path.write_text(template)
    line = _one_line_error(_train("grpo", "--model.path", tokenizer_only, "--model.chat_template", path,
                                  "--train.output_dir", tmp_path / "out"))
    assert line == f"error: --model.chat_template={str(path)!r}: {why}"


LONG = "x" * 300  # one name longer than any common file system's NAME_MAX (255)
CANNOT_WRITE = "; name a folder this run can create and write in"
TOO_LONG = "a name in the path is longer than the file system allows (File name too long)"


@pytest.mark.parametrize("option,path,why", [
    ("--train.output_dir", "a-file", "it is a file, not a folder" + CANNOT_WRITE),
    ("--train.output_dir", "a-file/out", "{tmp}/a-file is a file, not a folder" + CANNOT_WRITE),
    ("--train.output_dir", LONG, TOO_LONG + CANNOT_WRITE),
    ("--train.output_dir", "read-only/out", "cannot create it or write in it: Permission denied" + CANNOT_WRITE),
    ("--data.source", LONG + ".jsonl", TOO_LONG + "; shorten it"),
    ("--model.chat_template", LONG + ".jinja", TOO_LONG + "; shorten it"),
    ("--recipe", LONG + ".yaml", TOO_LONG + "; shorten it"),
], ids=["output-is-a-file", "output-under-a-file", "output-name-too-long", "output-read-only",
        "source-name-too-long", "template-name-too-long", "recipe-name-too-long"])
def test_a_path_the_file_system_refuses_is_one_line_naming_the_option(tmp_path, option, path, why):
    """Before: FileExistsError from mkdir, and OSError (ENAMETOOLONG) from Path.exists()/is_dir(),
    each a traceback; a read-only output folder failed at the first save."""
    (tmp_path / "a-file").write_text("")
    (tmp_path / "read-only").mkdir(mode=0o555)
    if path.startswith("read-only") and os.access(tmp_path / "read-only", os.W_OK):
        pytest.skip("this process writes in a read-only folder anyway (root; `setpriv --bounding-set "
                    "-dac_override` runs it as root)")
    line = _one_line_error(_train("grpo", "--train.output_dir", tmp_path / "out", option, tmp_path / path))
    assert line == f"error: {option}={str(tmp_path / path)!r}: {why.format(tmp=tmp_path)}"


def test_source_weights_that_overflow_are_one_line_naming_the_option(tmp_path):
    """Before: `cannot convert float NaN to integer` (inf / inf) from the mix, a traceback; a sum
    that stays finite could still overflow `total * weight` (inf, OverflowError)."""
    from r1train.data.mixing import shares
    sources = f"{tmp_path / 'a.jsonl'}:1e308,{tmp_path / 'b.jsonl'}:1e308"
    for name in ("a", "b"):
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(GOOD) + "\n")
    line = _one_line_error(_train("grpo", "--data.source", sources, "--train.output_dir", tmp_path / "out"))
    assert line == (f"error: --data.source={sources!r}: the weights add up to more than the largest float; only "
                    f"their ratios count, so scale them down (a.jsonl:0.7,b.jsonl:0.3)")
    assert shares(18, [1e308, 1.0]) == [18, 0] and shares(5, [1, 1, 1]) == [2, 2, 1]


def test_a_system_prompt_longer_than_a_prompt_may_be_is_blamed_by_name(tmp_path):
    """Before: `--data.source='embedded': no prompts left (dropped 20 longer than ...)`, after every
    prompt was rendered and tokenized (a minute with a 5 MB system prompt)."""
    system = tmp_path / "system.txt"
    system.write_text("Think step by step. " * 20)
    line = _one_line_error(_train("grpo", "--data.system_prompt", f"@{system}", "--data.max_prompt_tokens", "40",
                                  "--data.num_train", "20", "--train.output_dir", tmp_path / "out"))
    assert re.fullmatch(rf"error: --data\.system_prompt='@{re.escape(str(system))}': a prompt with it is \d+ "
                        rf"tokens at least, more than --data\.max_prompt_tokens=40: every prompt would be "
                        rf"dropped\. Shorten it, or raise --data\.max_prompt_tokens", line), line



def test_sft_with_nothing_left_to_learn_from_is_refused(tmp_path):
    """A system prompt that fills --sft.max_seq_len cuts every assistant turn away: the run trained
    on loss 0, gradient 0 for minutes (a 100 kB prompt: 4 min 45 s) and exited 0."""
    system = tmp_path / "system.txt"
    system.write_text("Think step by step. " * 60)  # ~300 tokens of the tiny tokenizer at least
    line = _one_line_error(_train("sft", "--data.system_prompt", f"@{system}", "--sft.max_seq_len", "128",
                                  "--train.max_steps", "2", "--train.output_dir", tmp_path / "out"))
    assert line == ("error: --sft.max_seq_len=128: no token to learn from is left: every conversation's trained "
                    "turns lie past its first 128 tokens (a long --data.system_prompt?). Raise --sft.max_seq_len, "
                    "shorten the prompts, or use --sft.overflow split")
    assert not (tmp_path / "out" / "checkpoints").exists()