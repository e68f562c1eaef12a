"""Bring your own rewards, data and prompts (issue 17): rewards by reference (module, file, name=)
and as Python callables, every column of a row given to them, the conversational layouts (TRL,
verl, OpenRLHF) and a column mapping, the system prompt and templates without a system role,
weighted sources, and one-line refusals before any model loads.

Fixtures are written into tmp_path in each layout. The training tests run one GRPO step of the
tiny model (beta 0: no reference model) from the command line, from a pipeline recipe and from
Python."""
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from r1train.data import SYSTEM_PROMPT, DatasetError, load_records
from r1train.data.mixing import mix_records, parse_sources, shares
from r1train.data.prompts import merge_system_turn, render_prompt
from r1train.grpo.config import GRPOJobConfig
from r1train.rewards import RewardError, get_reward_functions, score_completions
from r1train.run.config import ConfigError, parse_args
from r1train.sft.rejection import RejectionJobConfig

from launch import train_py

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
TINY_SFT = ROOT / "tests" / "assets" / "tiny-r1-sft"

# One step of the tiny model, as small as GRPO allows: 2 prompts x 2 completions of 6 tokens.
STEP = ["--rollout.group_size", "2", "--grpo.prompts_per_step", "2", "--grpo.micro_batch_size", "4",
        "--rollout.max_new_tokens", "6", "--grpo.beta", "0", "--train.max_steps", "1",
        "--train.eval_every", "0", "--data.num_eval", "1", "--train.progress", "false",
        "--train.save_every", "0", "--train.export", "false"]

# A reward that reads an extra column of the dataset (`hint`) and the token ids.
REWARD_FILE = '''
def brevity(completions, hint, completion_ids, **columns):
    assert all(h.startswith("hint-") for h in hint), hint  # the extra column arrives
    return [1.0 / (1 + len(ids)) for ids in completion_ids]

NOT_A_FUNCTION = 3
'''


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def qa_rows(n: int = 12) -> list[dict]:
    return [{"question": f"What is {i} + {i}?", "answer": str(2 * i), "hint": f"hint-{i}"} for i in range(n)]


@pytest.fixture
def byo(tmp_path):
    """A folder with a reward file and a {question, answer, hint} data file."""
    (tmp_path / "my_rewards.py").write_text(REWARD_FILE)
    write_jsonl(tmp_path / "qa.jsonl", qa_rows())
    return tmp_path


def _train(*args, cwd=None):
    return train_py(*args, env=ENV, timeout=300, cwd=cwd)


def _one_line_error(res) -> str:
    assert res.returncode == 2, res.stdout[-2000:] + res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    [line] = [l for l in res.stderr.splitlines() if l.startswith("error: ")]
    return line


def _metrics(out: Path) -> list[dict]:
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines() if l.strip()]


# --- layouts ------------------------------------------------------------------------------------

USER = {"role": "user", "content": "What is 2 + 3?"}
OWN_SYSTEM = {"role": "system", "content": "Answer briefly."}
R1_SYSTEM = {"role": "system", "content": SYSTEM_PROMPT}

# (rows, load_records arguments, layout, answer, prompt): each layout users of TRL, verl and
# OpenRLHF bring, with the columns and a column the layout does not read (kept for rewards).
LAYOUTS = {
    "trl-prompt-messages": ([{"prompt": [USER], "ground_truth": "5", "level": 1}], {},
                            "conversational", "5", [R1_SYSTEM, USER]),
    "trl-prompt-own-system": ([{"prompt": [OWN_SYSTEM, USER], "answer": 5}], {},
                              "conversational", "5", [OWN_SYSTEM, USER]),
    "trl-prompt-string": ([{"prompt": "What is 2 + 3?", "solution": r"2 + 3 = \boxed{5}"}], {},
                          "conversational", "5", [R1_SYSTEM, USER]),
    "verl": ([{"data_source": "gsm8k", "prompt": [USER], "ability": "math",
               "reward_model": {"style": "rule", "ground_truth": "5"}, "extra_info": {"index": 0}}], {},
             "verl", "5", [R1_SYSTEM, USER]),
    "messages-sft": ([{"messages": [OWN_SYSTEM, USER, {"role": "assistant", "content": r"\boxed{5}"}]}], {},
                     "messages", "5", [OWN_SYSTEM, USER]),
    "input-target-mapped": ([{"input": "What is 2 + 3?", "target": "5"}],
                            {"columns": ["problem=input", "answer=target"]}, "math", "5", [R1_SYSTEM, USER]),
    "nested-mapped": ([{"q": "What is 2 + 3?", "meta": {"gold": 5}}],
                      {"columns": {"problem": "q", "answer": "meta.gold"}}, "math", "5", [R1_SYSTEM, USER]),
    "question-bare-answer": ([{"question": "What is 2 + 3?", "answer": "5", "hint": "hint-0"}], {},
                             "qa", "5", [R1_SYSTEM, USER]),
    "no-system-prompt": ([{"question": "What is 2 + 3?", "answer": "5"}], {"system_prompt": ""},
                         "qa", "5", [USER]),
    "gsm8k-still-gsm8k": ([{"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"}], {},
                          "gsm8k", "5", [R1_SYSTEM, USER]),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_each_layout_loads(name, tmp_path):
    rows, kwargs, layout, answer, prompt = LAYOUTS[name]
    for path in (write_jsonl(tmp_path / "rows.jsonl", rows), tmp_path / "rows.parquet"):
        if path.suffix == ".parquet":  # nested columns as parquet structs, as verl writes them
            pq.write_table(pa.Table.from_pylist(rows), path)
        records = load_records(path, split="all", **kwargs)
        assert records.schema == layout, path
        [record] = records.records
        assert (record["answer"], record["prompt"], record["problem"]) == (answer, prompt, USER["content"])
    if layout == "messages":
        assert record["messages"] == rows[0]["messages"]  # SFT trains on the chat as it is
    if name in ("trl-prompt-messages", "verl", "question-bare-answer"):
        extra = {"trl-prompt-messages": {"level": 1}, "question-bare-answer": {"hint": "hint-0"},
                 "verl": {"data_source": "gsm8k", "ability": "math", "extra_info": {"index": 0}}}[name]
        assert {k: record[k] for k in extra} == extra  # columns the layout does not read stay


def test_an_explicit_schema_wins_and_gsm8k_keeps_refusing_a_bare_answer(tmp_path):
    path = write_jsonl(tmp_path / "qa.jsonl", qa_rows(2))
    assert load_records(path, split="all").schema == "qa"
    with pytest.raises(DatasetError, match=r"qa\.jsonl: line 1, field 'answer': no final '#### N'"):
        load_records(path, split="all", schema="gsm8k")


def test_layout_refusals_name_file_columns_and_what_is_accepted(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"input": "hi", "target": "1"}])
    with pytest.raises(DatasetError) as e:
        load_records(path, split="all")
    for part in ("odd.jsonl", "columns found: ['input', 'target']", "conversational (prompt, ground_truth|answer",
                 "verl (prompt, reward_model)", "messages (messages)", "--data.columns"):
        assert part in str(e.value)
    with pytest.raises(DatasetError, match=r"odd\.jsonl: --data\.columns problem=question: no column "
                                           r"'question'; columns found: \['input', 'target'\]"):
        load_records(path, split="all", columns=["problem=question", "answer=target"])
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": [USER, {"role": "assistant", "content": "5"}],
                                                "answer": "5"}])
    with pytest.raises(DatasetError, match=r"bad\.jsonl: line 1, field 'prompt': does not end with"):
        load_records(bad, split="all")


def test_system_prompt_from_a_file_and_the_option_checks(tmp_path):
    (tmp_path / "system.txt").write_text("Think, then answer.\n")
    cfg = parse_args(GRPOJobConfig, ["--data.system_prompt", f"@{tmp_path / 'system.txt'}"])
    from r1train.data.problems import train_records
    [first, *_] = train_records(cfg.data, 0)  # the embedded task takes it too
    assert first["prompt"][0] == {"role": "system", "content": "Think, then answer."}
    for args, message in [
        (["--data.system_prompt", "@/no/such/file.txt"], r"--data\.system_prompt='@/no/such/file\.txt': cannot read"),
        (["--data.columns", "problem"], r"--data\.columns='problem': expected <column>=<column of the file>"),
        (["--data.columns", "question_text=q"], r"--data\.columns='question_text=q': 'question_text' is not a column"),
        (["--data.source", "a.jsonl:0.5,b.jsonl:-1"], r"--data\.source='b\.jsonl:-1': the weight must be"),
        (["--data.source", "a.jsonl:0.5,b.jsonl"], r"--data\.source='a\.jsonl:0\.5,b\.jsonl': give every source a weight"),
        (["--model.chat_template", "/no/such.jinja"], r"--model\.chat_template='/no/such\.jinja': no such file"),
        (["--model.system_role", "drop"], r"--model\.system_role='drop': must be one of auto, merge, error"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse_args(GRPOJobConfig, args)


# --- templates without a system role ------------------------------------------------------------

# Gemma's template refuses a system turn, as this one does.
GEMMA_LIKE = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
              "{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def test_a_template_without_a_system_role_gets_the_system_text_in_the_user_turn(tmp_path):
    from r1train.data.problems import encode_prompts
    from r1train.model.load import load_tokenizer
    template = tmp_path / "gemma.jinja"
    template.write_text(GEMMA_LIKE)
    tok = load_tokenizer(str(TINY_SFT), chat_template=str(template))
    prompt = [OWN_SYSTEM, USER]
    text = render_prompt(tok, prompt)
    assert text == "<start_of_turn>user\nAnswer briefly.\n\nWhat is 2 + 3?<end_of_turn>\n<start_of_turn>model\n"
    [kept], [ids], _ = encode_prompts(tok, [{"prompt": prompt}])
    assert tok.decode(ids) == text
    assert merge_system_turn([OWN_SYSTEM]) == [] and merge_system_turn([USER]) == [USER]
    with pytest.raises(ConfigError, match=r"--model\.system_role=error: the chat template of .*gemma\.jinja"):
        load_tokenizer(str(TINY_SFT), chat_template=str(template), system_role="error")
    # A template with a system role is left alone, unless merging is asked for.
    assert render_prompt(load_tokenizer(str(TINY_SFT)), prompt).count("Answer briefly.") == 1
    merged = render_prompt(load_tokenizer(str(TINY_SFT), system_role="merge"), prompt)
    assert "Answer briefly.\n\nWhat is 2 + 3?" in merged


def test_a_distillation_teacher_takes_its_own_chat_template(tmp_path):
    """A teacher whose tokenizer has no chat template: the error names the teacher's option
    (--model.chat_template is the student's), and with it the teacher samples its traces."""
    import shutil
    teacher = tmp_path / "teacher"
    shutil.copytree(TINY_SFT, teacher)
    template = teacher / "chat_template.jinja"
    shutil.move(template, tmp_path / "template.jinja")
    args = ["distill", "--model.path", str(TINY_SFT), "--distill.teacher", str(teacher), "--data.num_train", "4",
            "--problems.num_train", "4", "--problems.num_eval", "0", "--data.num_eval", "0",
            "--sampling.samples_per_prompt", "2", "--sampling.max_new_tokens", "48", "--sampling.require", "",
            "--sft.max_seq_len", "256", "--sft.rows_per_step", "2", "--train.max_steps", "1",
            "--train.eval_every", "0", "--train.export", "false"]
    msg = _one_line_error(_train(*args, "--train.output_dir", str(tmp_path / "a")))
    assert "has no chat template" in msg and "--distill.teacher_chat_template" in msg, msg
    res = _train(*args, "--distill.teacher_chat_template", str(tmp_path / "template.jinja"),
                 "--train.output_dir", str(tmp_path / "b"))
    # The teacher (the cold-start model: ~22-token answers that end) wrote its traces with the
    # template it was given, and the student trained on them.
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    assert "[distill] teacher kept" in res.stdout and "chat template" not in res.stderr, res.stdout[-2000:]


# --- rewards ------------------------------------------------------------------------------------

def test_reward_references_load_and_wrong_ones_name_module_file_or_attribute(byo, monkeypatch):
    monkeypatch.syspath_prepend(str(byo))  # as PYTHONPATH would: the module form is then importable
    ref = f"{byo / 'my_rewards.py'}:brevity"
    names = [n for n, _, _ in get_reward_functions(["accuracy", ref, "short=my_rewards:brevity"])]
    assert names == ["accuracy", "brevity", "short"]
    for rewards, message in [
        ("accuracy,no_such_pkg.rewards:f", r"no module named 'no_such_pkg' on sys\.path"),
        (f"accuracy,{byo / 'missing.py'}:f", r"no such file .*missing\.py"),
        (f"accuracy,{ref}_typo", r"my_rewards\.py has no attribute 'brevity_typo'; its functions: brevity"),
        (f"accuracy,{byo / 'my_rewards.py'}:NOT_A_FUNCTION", r"'NOT_A_FUNCTION' is a int, not a function"),
        (f"accuracy,{ref},brevity=my_rewards:brevity", r"names a reward twice"),
        ("accuracy,brevety", r"unknown reward; valid names: .*or a function as module:function"),
    ]:
        with pytest.raises(ConfigError, match=r"--grpo\.rewards.*" + message):
            parse_args(GRPOJobConfig, ["--grpo.rewards", rewards])
    # rejection-sample and distill share the check; `require` may name a custom reward.
    cfg = parse_args(RejectionJobConfig, ["--sampling.rewards", f"format,{ref}", "--sampling.require", "brevity"])
    assert cfg.sampling.require == ["brevity"]


def test_every_column_reaches_the_reward_and_bad_outputs_name_the_function():
    seen = {}

    def reads(completions, **columns):
        seen.update(columns)
        return [0.5] * len(completions)

    def short(completions, **columns):
        return [1.0]

    def words(completions, **columns):
        return ["good"] * len(completions)

    records = [{"prompt": [USER], "problem": "p", "solution": "", "answer": "5", "difficulty": d} for d in (1, 2)]
    scores = score_completions([("reads", reads, 1.0)], ["a", "b"], records, [[1], [2, 3]])
    assert scores.tolist() == [[0.5], [0.5]]
    assert seen["difficulty"] == [1, 2] and seen["completion_ids"] == [[1], [2, 3]]
    with pytest.raises(RewardError, match=r"reward 'short' \(.*short\) returned 1 values for 2 completions"):
        score_completions([("short", short, 1.0)], ["a", "b"], records, [[1], [2]])
    with pytest.raises(RewardError, match=r"reward 'words' \(.*words\) returned 'good' \(str\) for completion 0"):
        score_completions([("words", words, 1.0)], ["a", "b"], records, [[1], [2]])


def test_a_file_reward_trains_from_the_command_line_with_its_extra_column(byo, tiny_model):
    out = byo / "run"
    res = _train("grpo", *STEP, "--model.path", tiny_model, "--data.source", byo / "qa.jsonl",
                 "--grpo.rewards", "accuracy,my_rewards.py:brevity", "--train.output_dir", out, cwd=byo)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    [step] = [m for m in _metrics(out) if "reward" in m]
    assert 0 < step["brevity/mean"] <= 0.5 and "accuracy/mean" in step
    assert yaml.safe_load((out / "config.yaml").read_text())["grpo"]["rewards"] == ["accuracy", "my_rewards.py:brevity"]


def test_a_file_reward_trains_from_a_recipe(byo, tiny_model):
    recipe = {"output_dir": str(byo / "pipe"), "model": tiny_model, "stages": [{
        "name": "rl", "command": "grpo", "options": {
            "data": {"source": [f"{byo / 'qa.jsonl'}:0.5", "embedded:0.5"], "num_train": 20, "num_eval": 1},
            "rollout": {"group_size": 2, "max_new_tokens": 6},
            "grpo": {"prompts_per_step": 2, "micro_batch_size": 4, "beta": 0.0,
                     "rewards": ["format", f"short={byo / 'my_rewards.py'}:brevity"]},
            "train": {"max_steps": 1, "eval_every": 0, "save_every": 0, "progress": False}}}]}
    (byo / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    res = _train("pipeline", "--recipe", byo / "recipe.yaml")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "data mix of 2 sources, " in res.stdout  # each source's rows are reported
    [step] = [m for m in _metrics(byo / "pipe" / "rl") if "reward" in m]
    assert "short/mean" in step
    saved = yaml.safe_load((byo / "pipe" / "rl" / "config.yaml").read_text())
    assert saved["grpo"]["rewards"] == ["format", f"short={byo / 'my_rewards.py'}:brevity"]


def hint_length(completions, hint, **columns):
    """A reward given from Python: reads the dataset's extra column."""
    return [float(len(h)) for h in hint]


def test_python_callables_train_and_the_saved_config_names_them(byo, tiny_model):
    from r1train.grpo.trainer import GRPOTrainer
    cfg = parse_args(GRPOJobConfig, [*STEP, "--model.path", tiny_model, "--data.source", str(byo / "qa.jsonl"),
                                     "--train.output_dir", str(byo / "py")])
    GRPOTrainer(cfg, reward_funcs=["format", hint_length, ("neg", lambda completions, **c: [-1.0] * len(completions))]).train()
    [step] = [m for m in _metrics(byo / "py") if "reward" in m]
    assert step["hint_length/mean"] >= len("hint-0") and step["neg/mean"] == -1.0
    saved = yaml.safe_load((byo / "py" / "config.yaml").read_text())["grpo"]["rewards"]
    # A function that loads by name is recorded as its reference; a lambda as where it was made.
    here = test_python_callables_train_and_the_saved_config_names_them.__name__
    assert saved == ["format", f"hint_length={__name__}:hint_length", f"neg=python:{__name__}.{here}.<locals>.<lambda>"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from r1train.data.tiny import build_tiny_model
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0))


# --- one-line refusals before any model loads ----------------------------------------------------

def test_refusals_are_one_line_and_come_before_the_model(byo):
    nothing = byo / "no-such-model"  # would fail if anything tried to load it
    line = _one_line_error(_train("grpo", "--model.path", nothing, "--grpo.rewards", "accuracy,my_rewards.py:brevty",
                                  "--train.output_dir", byo / "a", cwd=byo))
    assert line.startswith("error: --grpo.rewards: reward 'my_rewards.py:brevty': my_rewards.py has no attribute 'brevty'")
    odd = write_jsonl(byo / "odd.jsonl", [{"input": "hi", "target": "1"}])
    line = _one_line_error(_train("grpo", "--model.path", nothing, "--data.source", odd,
                                  "--train.output_dir", byo / "b"))
    assert line.startswith(f"error: {odd}: unknown schema; columns found: ['input', 'target']")
    # SFT's mix: a non-chat file used to mix in 0 rows without a word.
    line = _one_line_error(_train("sft", "--model.path", nothing, "--data.mix_source", byo / "qa.jsonl",
                                  "--data.mix_fraction", "0.2", "--data.num_train", "8",
                                  "--train.output_dir", byo / "c"))
    assert line == (f"error: --data.mix_source='{byo / 'qa.jsonl'}': gave no conversation to mix in: its 12 rows "
                    f"are 'qa' problems without an assistant reply; the mix needs chat data (the bespoke or "
                    f"messages layout)")


# --- mixing -------------------------------------------------------------------------------------

def test_weighted_sources_mix_in_their_shares(tmp_path):
    assert parse_sources("a.jsonl:0.7,b.jsonl:0.3") == [("a.jsonl", 0.7), ("b.jsonl", 0.3)]
    assert parse_sources("org/data") == [("org/data", None)]
    assert shares(10, [0.7, 0.3]) == [7, 3] and shares(5, [1, 1, 1]) == [2, 2, 1]
    a = [{"id": f"a{i}"} for i in range(8)]
    b = [{"id": f"b{i}"} for i in range(2)]
    pool, lines = mix_records([("a", a, 0.5), ("b", b, 0.5)], seed=0)
    ids = [r["id"] for r in pool]
    assert len(pool) == 10 and sum(i.startswith("a") for i in ids) == 5
    assert sorted(set(i for i in ids if i.startswith("b"))) == ["b0", "b1"]  # b repeats to fill its share
    assert lines == ["a: 5 rows (weight 0.5, 8 in the source)", "b: 5 rows (weight 0.5, 2 in the source, repeated)"]
    assert mix_records([("a", a, 0.5), ("b", b, 0.5)], seed=0)[0] == pool  # seeded
    from r1train.data.problems import held_out_records, train_records
    write_jsonl(tmp_path / "a.jsonl", qa_rows(20))
    cfg = parse_args(GRPOJobConfig, ["--data.source", f"{tmp_path / 'a.jsonl'}:3,embedded:1", "--data.num_train", "5",
                                     "--data.num_eval", "4"])
    said = []
    train = train_records(cfg.data, 0, say=said.append)
    assert len(train) == 18 + 5 and sum("hint" in r for r in train) == 17  # 23 * 3/4 -> 17 of a's 18
    assert "data mix of 2 sources" in said[0]
    assert sum("hint" in r for r in held_out_records(cfg.data, 0)) == 2  # a's 2 held-out rows, then embedded
