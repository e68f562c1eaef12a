"""Tests of data/prompts.py and data/loaders.py.

Expected values are read by hand off the fixture rows (tests/assets/fixtures/, written for this
project in the public datasets' column layouts) and off the real GSM8K / AIME / AMC samples.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from r1train.data import (
    SYSTEM_PROMPT,
    DatasetError,
    last_boxed,
    load_records,
    make_conversation,
    normalize_answer,
    render_prompt,
    seeded_split,
)

ASSETS = Path(__file__).parent / "assets"
FIXTURES = ASSETS / "fixtures"
SHARED_DATA = Path(__file__).parents[2] / "shared" / "data"


def read_rows(path: Path) -> list[dict]:
    text = path.read_text()
    return json.loads(text) if path.suffix == ".json" else [json.loads(l) for l in text.splitlines()]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def check_rl_prompt(record: dict, problem: str) -> None:
    assert record["prompt"] == [{"role": "system", "content": SYSTEM_PROMPT},
                                {"role": "user", "content": problem}]


# ---------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------

def test_system_prompt_is_the_tutorial_prompt_in_single_spaces():
    # The tutorial's triple-quoted text with its line breaks and indentation turned into spaces.
    assert SYSTEM_PROMPT == (
        "A conversation between User and Assistant. The user asks a question, and the Assistant "
        "solves it. The assistant first thinks about the reasoning process in the mind and then "
        "provides the user with the answer. The reasoning process and answer are enclosed within "
        "<think> </think> and <answer> </answer> tags, respectively, i.e., "
        "<think> reasoning process here </think><answer> answer here </answer>"
    )
    assert "\n" not in SYSTEM_PROMPT and "  " not in SYSTEM_PROMPT


def test_make_conversation():
    assert make_conversation("What is 2 + 3?") == [
        {"role": "system", "content": SYSTEM_PROMPT},
        {"role": "user", "content": "What is 2 + 3?"},
    ]
    assert make_conversation("Q", system_prompt="Be brief.")[0] == {"role": "system", "content": "Be brief."}
    with pytest.raises(ValueError, match="problem"):
        make_conversation("  ")


# Qwen2.5's ChatML layout, reduced to what a [system, user] prompt uses.
QWEN_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def small_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"[UNK]": 0, "<|im_start|>": 1, "<|im_end|>": 2}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    tokenizer.chat_template = chat_template
    return tokenizer


def test_render_prompt_with_a_qwen_template():
    tokenizer = small_tokenizer(QWEN_TEMPLATE)
    messages = make_conversation("What is 2 + 3?")
    assert render_prompt(tokenizer, messages) == (
        "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert render_prompt(tokenizer, messages, add_generation_prompt=False) == (
        "<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n"
        "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n"
    )
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        render_prompt(tokenizer, [messages[0], {"role": "user"}])


def test_render_prompt_without_a_template_says_so():
    with pytest.raises(ValueError, match="no chat template"):
        render_prompt(small_tokenizer(None), make_conversation("What is 2 + 3?"))


# ---------------------------------------------------------------------------------------------
# Answers
# ---------------------------------------------------------------------------------------------

def test_last_boxed_and_normalize_answer():
    assert last_boxed(r"first \boxed{2}, then $\boxed{\frac{1}{2}}$.") == r"\frac{1}{2}"  # nested braces
    assert last_boxed(r"\fbox{7}") == "7"
    assert last_boxed("no box here") == ""
    assert last_boxed(r"\boxed{unclosed") == ""
    # AMC stores floats, AIME zero-padded strings; ints print as ints.
    assert [normalize_answer(v) for v in (27.0, 0.5, -1.0, 10, " 025 ")] == ["27", "0.5", "-1", "10", "025"]
    for bad in (True, None, float("nan"), [1]):
        with pytest.raises(ValueError):
            normalize_answer(bad)


# ---------------------------------------------------------------------------------------------
# GSM8K: the real files
# ---------------------------------------------------------------------------------------------

def check_gsm8k_test(records, n_rows: int) -> None:
    assert len(records) == n_rows and records.schema == "gsm8k" and records.skipped == 0
    for r in records:
        check_rl_prompt(r, r["problem"])
        assert r["answer"] and "####" not in r["solution"]
    # Row 0 (Janet's ducks) ends "...every day at the farmer's market.\n#### 18".
    assert records[0]["answer"] == "18"
    assert records[0]["problem"].startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert records[0]["solution"].endswith("$<<9*2=18>>18 every day at the farmer\u2019s market.")


def test_gsm8k_test_sample_all_rows():
    # A file that is a test set: split="all" returns every row, no seeded split.
    check_gsm8k_test(load_records(ASSETS / "gsm8k_test_sample.jsonl", split="all"), 100)


def test_gsm8k_full_test_set_from_shared():
    path = SHARED_DATA / "gsm8k_test.jsonl"
    if not path.exists():
        pytest.skip(f"{path} is absent (../shared is not checked out)")
    records = load_records(path, split="all")
    check_gsm8k_test(records, 1319)
    # Row 146 (Johnny's legos) ends "#### 2,125": the thousands separator goes.
    assert records[146]["answer"] == "2125"


# ---------------------------------------------------------------------------------------------
# Every schema, in every file form
# ---------------------------------------------------------------------------------------------

# (fixture, schema, answers): answers read by hand off each row.
SCHEMA_CASES = [
    # last \boxed{} of the solution; row 1 boxes 2 then \frac{1}{2}; row 2 has no box
    ("numina_tir.jsonl", "numina", ["25", r"\frac{1}{2}", "", "5", "1024"]),
    # "#### 31", "#### 4,200", "#### -5"
    ("gsm8k.jsonl", "gsm8k", ["31", "4200", "-5"]),
    # MATH has no answer column: \boxed{6}, \boxed{\frac{1}{4}}, \boxed{3}
    ("math.json", "math", ["6", r"\frac{1}{4}", "3"]),
    # float answers 2.0, 0.5, 27.0, -1.0
    ("amc_like.jsonl", "math", ["2", "0.5", "27", "-1"]),
    # the answer column wins over the box; zero padding is kept
    ("aime_like.jsonl", "math", ["025", "010"]),
    # the last \boxed{} of the assistant reply; the code answer has none
    ("bespoke_stratos.json", "bespoke", ["56", ""]),
]


def expected_problem_and_solution(schema: str, row: dict) -> tuple[str, str]:
    if schema == "gsm8k":  # the worked text is everything before the "#### N" line
        return row["question"], row["answer"][: row["answer"].rindex("\n####")]
    if schema == "bespoke":
        return row["conversations"][0]["value"], row["conversations"][1]["value"]
    return row["problem"], row.get("solution", "")


@pytest.mark.parametrize("name,schema,answers", SCHEMA_CASES, ids=[c[0] for c in SCHEMA_CASES])
def test_schema_fixture_loads_to_records(name, schema, answers):
    rows = read_rows(FIXTURES / name)
    records = load_records(FIXTURES / name, split="all")
    assert records.schema == schema and len(records) == len(rows)
    assert [r["answer"] for r in records] == answers
    for record, row in zip(records, rows):
        problem, solution = expected_problem_and_solution(schema, row)
        assert (record["problem"], record["solution"]) == (problem, solution)
        if schema == "bespoke":  # SFT rows become the whole chat, under the row's own system text
            chat = [{"role": "system", "content": row["system"]},
                    {"role": "user", "content": problem},
                    {"role": "assistant", "content": solution}]
            assert record["messages"] == chat and record["prompt"] == chat[:2]
        else:
            check_rl_prompt(record, problem)
            assert "messages" not in record


def file_forms(rows: list[dict], tmp_path: Path) -> dict[str, Path]:
    """The same rows as every file form the loader reads."""
    forms = {"jsonl": write_jsonl(tmp_path / "rows.jsonl", rows)}
    forms["json-list"] = tmp_path / "list.json"
    forms["json-list"].write_text(json.dumps(rows, indent=2))
    forms["json-lines"] = write_jsonl(tmp_path / "lines.json", rows)  # what Dataset.to_json writes
    forms["json-columns"] = tmp_path / "columns.json"
    forms["json-columns"].write_text(json.dumps({k: [r[k] for r in rows] for k in rows[0]}))
    forms["parquet"] = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), forms["parquet"])
    return forms


@pytest.mark.parametrize("name", [c[0] for c in SCHEMA_CASES])
def test_every_file_form_gives_the_same_records(name, tmp_path):
    rows = read_rows(FIXTURES / name)
    reference = load_records(FIXTURES / name, split="all").records
    for form, path in file_forms(rows, tmp_path).items():
        assert load_records(path, split="all").records == reference, form


def test_real_aime_and_amc_samples():
    aime = load_records(ASSETS / "aime24_sample.jsonl", split="all")
    amc = load_records(ASSETS / "amc23_sample.jsonl", split="all")
    assert (aime.schema, len(aime), amc.schema, len(amc)) == ("math", 30, "math", 40)
    # First rows: AIME id 60 has answer "204"; AMC's Alicia-and-Beth problem has answer 27.0.
    assert aime[0]["answer"] == "204" and amc[0]["answer"] == "27"
    assert amc[0]["problem"].startswith("Cities $A$ and $B$ are $45$ miles apart.")


# ---------------------------------------------------------------------------------------------
# Splits
# ---------------------------------------------------------------------------------------------

def test_hf_snapshot_folder_gives_its_splits(tmp_path):
    rows = read_rows(FIXTURES / "numina_tir.jsonl")
    (tmp_path / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:3]), tmp_path / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[3:]), tmp_path / "data" / "test-00000-of-00001.parquet")
    (tmp_path / "README.md").write_text("not data")
    problems = [r["problem"] for r in rows]
    assert [r["problem"] for r in load_records(tmp_path)] == problems[:3]
    assert [r["problem"] for r in load_records(tmp_path, split="test")] == problems[3:]
    assert len(load_records(tmp_path, split="all")) == 5
    with pytest.raises(DatasetError, match=r"splits \['test', 'train'\] but none for split 'validation'"):
        load_records(tmp_path, split="validation")


def test_folder_of_split_named_jsonl_files(tmp_path):
    rows = read_rows(FIXTURES / "gsm8k.jsonl")
    write_jsonl(tmp_path / "train.jsonl", rows[:2])
    write_jsonl(tmp_path / "test.jsonl", rows[2:])
    assert [r["answer"] for r in load_records(tmp_path, split="train")] == ["31", "4200"]
    assert [r["answer"] for r in load_records(tmp_path, split="test")] == ["-5"]


def test_single_file_seeded_split_is_disjoint_covering_and_ordered():
    path = ASSETS / "gsm8k_test_sample.jsonl"
    everything = [r["problem"] for r in load_records(path, split="all")]
    train = [r["problem"] for r in load_records(path, split="train", test_size=0.25, seed=3)]
    test = [r["problem"] for r in load_records(path, split="test", test_size=0.25, seed=3)]
    assert (len(train), len(test)) == (75, 25)  # ceil(0.25 * 100) = 25 test rows
    assert sorted(train + test) == sorted(everything) and not set(train) & set(test)
    assert train == [p for p in everything if p in set(train)]  # file order kept
    assert train == [r["problem"] for r in load_records(path, test_size=0.25, seed=3)]  # deterministic


def test_seeded_split_sizes():
    # 0.07 of 100 is 7 (in floats 0.07 * 100 = 7.000000000000001, whose ceil is 8);
    # 0.05 of 10 = 0.5 rounds up to 1; 0.99 of 10 = 9.9 rounds up to 10.
    assert [len(seeded_split(n, f, 0)["test"]) for n, f in ((100, 0.07), (10, 0.05), (10, 0.99))] == [7, 1, 10]
    parts = seeded_split(10, 4, seed=1)
    assert len(parts["test"]) == 4 and sorted(parts["train"] + parts["test"]) == list(range(10))
    with pytest.raises(DatasetError, match="11 test rows of 10"):
        seeded_split(10, 11, 0)


def test_folder_without_split_names_is_one_pool(tmp_path):
    rows = read_rows(FIXTURES / "gsm8k.jsonl")
    write_jsonl(tmp_path / "part_a.jsonl", rows[:2])
    write_jsonl(tmp_path / "part_b.jsonl", rows[2:])
    assert len(load_records(tmp_path, split="all")) == 3
    train, test = (load_records(tmp_path, split=s, test_size=1) for s in ("train", "test"))
    assert (len(train), len(test)) == (2, 1)
    assert sorted(r["answer"] for r in [*train, *test]) == ["-5", "31", "4200"]


def test_limit_keeps_the_first_records():
    records = load_records(ASSETS / "gsm8k_test_sample.jsonl", split="all", limit=2)
    assert [r["answer"] for r in records] == ["18", "3"]  # "#### 18" (ducks), "#### 3" (robe)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

def test_unknown_schema_names_file_columns_and_schemas(tmp_path):
    path = write_jsonl(tmp_path / "odd.jsonl", [{"prompt_text": "hi", "label": 1}])
    with pytest.raises(DatasetError) as e:
        load_records(path, split="all")
    for part in ("odd.jsonl", "'prompt_text'", "'label'", "gsm8k (question, answer)",
                 "math (problem, solution|answer)", "bespoke (system, conversations)"):
        assert part in str(e.value)


def test_missing_required_column_names_file_column_and_columns_found():
    with pytest.raises(DatasetError) as e:
        load_records(FIXTURES / "numina_tir.jsonl", schema="gsm8k", split="all")
    message = str(e.value)
    assert "numina_tir.jsonl" in message and "missing required column 'question'" in message
    assert "columns found: ['problem', 'solution', 'messages']" in message


def test_bad_row_fails_with_index_and_field():
    # Line 1 is good; line 2's worked answer has no "#### N" line.
    with pytest.raises(DatasetError, match=r"gsm8k_bad_rows\.jsonl: line 2, field 'answer': no final '#### N'"):
        load_records(FIXTURES / "gsm8k_bad_rows.jsonl", split="all")


@pytest.mark.parametrize("row_index,reason", [(3, "empty"), (4, "not a string: int 7"), (5, "missing")])
def test_each_kind_of_bad_field(tmp_path, row_index, reason):
    row = read_rows(FIXTURES / "gsm8k_bad_rows.jsonl")[row_index]
    path = write_jsonl(tmp_path / "one.jsonl", [read_rows(FIXTURES / "gsm8k.jsonl")[0], row])
    with pytest.raises(DatasetError, match=f"one.jsonl: line 2, field 'question': {reason}"):
        load_records(path, split="all", schema="gsm8k")


def test_skip_drops_counts_and_reports_bad_rows(caplog):
    # Rows 1 (no ####), 3 (empty question), 4 (int question), 5 (no question) are bad: 4 of 6.
    with caplog.at_level(logging.WARNING, logger="r1train.data.loaders"):
        records = load_records(FIXTURES / "gsm8k_bad_rows.jsonl", split="all", on_bad_row="skip")
    assert records.skipped == 4 and [r["answer"] for r in records] == ["31", "-5"]
    [message] = [r.getMessage() for r in caplog.records]
    assert message.startswith("skipped 4 of 6 rows of ") and "gsm8k_bad_rows.jsonl" in message
    assert "(first: line 2, field 'answer': no final '#### N' line" in message


def test_bespoke_turns_out_of_order_is_a_bad_row(tmp_path):
    row = read_rows(FIXTURES / "bespoke_stratos.json")[0]
    swapped = dict(row, conversations=row["conversations"][::-1])
    path = write_jsonl(tmp_path / "b.jsonl", [row, swapped])
    with pytest.raises(DatasetError, match=r"line 2, field 'conversations\[0\]': expected a turn from 'user'"):
        load_records(path, split="all")
    unanswered = dict(row, conversations=row["conversations"][:1])
    with pytest.raises(DatasetError, match="line 1, field 'conversations': ends with a user turn"):
        load_records(write_jsonl(tmp_path / "c.jsonl", [unanswered]), split="all")


def test_malformed_json_line_names_file_and_line():
    with pytest.raises(DatasetError, match=r"malformed\.jsonl: line 2, malformed JSON"):
        load_records(FIXTURES / "malformed.jsonl", split="all")


def test_hub_name_offline_says_to_pass_a_local_path():
    # tests/conftest.py sets HF_DATASETS_OFFLINE=1, so nothing reaches the network.
    with pytest.raises(DatasetError, match="pass a local path"):
        load_records("no-such-org/no-such-dataset")


@pytest.mark.parametrize("kwargs,match", [
    (dict(source="./missing.jsonl"), "no such file or folder"),
    (dict(schema="sharegpt"), "schema='sharegpt'"),
    (dict(on_bad_row="ignore"), "on_bad_row='ignore'"),
    (dict(test_size=1.5), "test_size=1.5"),
    (dict(split="validation"), "names no splits"),
    (dict(limit=0), "limit=0"),
])
def test_bad_arguments(kwargs, match):
    kwargs = {"source": FIXTURES / "gsm8k.jsonl", **kwargs}
    with pytest.raises(DatasetError, match=match):
        load_records(**kwargs)


def test_unreadable_files_name_the_file(tmp_path):
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(DatasetError, match=r"broken\.parquet: not a readable parquet file"):
        load_records(tmp_path / "broken.parquet", split="all")
    (tmp_path / "latin1.jsonl").write_bytes('{"question": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DatasetError, match=r"latin1\.jsonl: line 1, not UTF-8 text"):
        load_records(tmp_path / "latin1.jsonl", split="all")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match=r"empty\.jsonl: no rows"):
        load_records(tmp_path / "empty.jsonl", split="all")
