"""Datasets of the R1 recipe, read into one record layout, with errors that say what is wrong.

`load_records(source)` reads a Hugging Face dataset name, a `.jsonl` / `.json` / `.parquet` file,
or a folder of them, and returns `Records`: one dict per problem with

    prompt    [system, user] chat messages (what the policy is asked),
    problem   the user text,
    solution  the worked solution, or "",
    answer    the final answer as a string (what the accuracy reward compares against), or "",
    messages  SFT schemas only: the whole chat [system, user, assistant, ...].

Layouts (schemas), detected from the columns or chosen with `schema=`, and the `columns=`
mapping that renames a file's columns first: data/schemas.py (bespoke, numina, verl,
conversational, messages, math, gsm8k, qa). Columns a layout does not read stay in the record
for reward functions. Several sources with weights (`a.jsonl:0.7,b.jsonl:0.3`): data/mixing.py.

Splits. A source that names its splits (an HF dataset; a folder whose files are named like
`train-00000-of-00001.parquet`, `data/test.jsonl`) gives them as they are, and `split="all"`
gives every file. A single file, or a folder with no split-named file, is one pool of rows:
`split="all"` returns all of it (the call for a file that is a test set, e.g. GSM8K's
test.jsonl), and "train" / "test" return the two sides of a seeded split that is disjoint,
covers the pool and keeps file order within each side.

Held-out problems. `load_held_out(source, eval_source, ...)` is the one rule both trainers
evaluate by: the same source (or none given) -> its "test" split, or for an unsplit source the
test side of the very seeded split training used; another source -> its "test" split if it has
one, else all of its rows.

Departures from the tutorial: its `validate_dataset` prints warnings and goes on; here a bad
file raises `DatasetError`, and a bad row raises or, with `on_bad_row="skip"`, is dropped,
counted and reported once per file. A bad row is also a line of a JSON-lines file that is not
JSON, not UTF-8 text, or not an object. Errors name rows as people count them: "line N" of a
JSON-lines file (blank lines count), "row N" (from 1) of a JSON array, parquet file or hub split. NuminaMath's `messages` column (tool-integrated solutions
without <think> tags) is required for detection but dropped, as the tutorial drops it.
"""
from __future__ import annotations

import json
import logging
import math
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any, Iterator

from r1train.data.prompts import SYSTEM_PROMPT
from r1train.data.schemas import (
    ROW_FUNCTIONS,
    SCHEMAS,
    DatasetError,
    _BadRow,
    describe_schemas,
    map_columns,
    parse_column_map,
    pick_schema,
    with_extra_columns,
)

log = logging.getLogger(__name__)


DATA_SUFFIXES = (".jsonl", ".json", ".parquet")
# Names that mark a folder's files as split files (HF hub layouts use these).
SPLIT_NAMES = ("train", "test", "validation", "valid", "val", "dev", "eval")


@dataclass
class Records:
    """The normalized rows of one split of one source."""

    records: list[dict[str, Any]]
    schema: str
    source: str
    split: str
    skipped: int = 0
    """Bad rows dropped from this split (only with on_bad_row="skip")."""

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.records)

    def __getitem__(self, i):
        return self.records[i]


@dataclass
class _Table:
    name: str  # a file path, or "hub-name[split]"
    columns: list[str]
    rows: list[Any]  # dicts, or a _BadRow for a line that could not be read as an object
    outcomes: list[Any] = field(default_factory=list)  # per row: a record, or a _BadRow
    labels: list[str] = field(default_factory=list)  # per row: "line 3" or "row 3", for errors

    def __post_init__(self) -> None:
        self.labels = self.labels or [f"row {i}" for i in range(1, len(self.rows) + 1)]


# Sources -> tables

_JSON_TYPES = {dict: "object", list: "array", str: "string", int: "number", float: "number",
               bool: "boolean", type(None): "null"}


def _rows_to_table(name: str, rows: list[Any], labels: list[str] | None = None) -> _Table:
    columns: dict[str, None] = {}  # insertion-ordered union of keys: rows of a JSON file may differ
    for i, row in enumerate(rows):
        if isinstance(row, _BadRow):
            continue
        if not isinstance(row, dict):
            rows[i] = _BadRow(None, f"a JSON {_JSON_TYPES.get(type(row), type(row).__name__)}, "
                                    f"expected an object")
            continue
        columns.update(dict.fromkeys(row))
    return _Table(name, list(columns), rows, labels=labels or [])


def _json_lines(data: bytes) -> tuple[list[Any], list[str]]:
    """Rows of JSON-lines bytes, and their labels ("line N", blank lines counted). A line that is
    not UTF-8 or not JSON becomes a _BadRow, so that on_bad_row decides, as for a bad field."""
    rows, labels = [], []
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue
        labels.append(f"line {lineno}")
        try:
            line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")  # a BOM may open the file
        except UnicodeDecodeError as e:
            rows.append(_BadRow(None, f"not UTF-8 text ({e.reason} at byte {e.start + 1} of the line)"))
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            rows.append(_BadRow(None, f"malformed JSON: {e.msg} (column {e.colno})"))
    return rows, labels


def _read_file(path: Path) -> _Table:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq  # a dependency of `datasets`

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow's errors do not all name the file
            raise DatasetError(f"{path}: not a readable parquet file: {e}") from e
        return _Table(str(path), table.column_names, table.to_pylist())
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read it: {e.strerror}") from None
    if path.suffix == ".jsonl":
        return _rows_to_table(str(path), *_json_lines(data))
    # A .json file is one document, or JSON lines (as Dataset.to_json writes them): a bad line of
    # the latter is a bad row; a document that cannot be read is a bad file.
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start + 1})") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg != "Extra data":
            raise DatasetError(f"{path}: malformed JSON on line {e.lineno}: {e.msg} (column {e.colno})") from None
        return _rows_to_table(str(path), *_json_lines(data))
    if isinstance(rows, dict):
        lists = [v for v in rows.values() if isinstance(v, list)]
        if rows and len(lists) == len(rows) and len({len(v) for v in lists}) == 1:  # column-oriented
            rows = [dict(zip(rows, values)) for values in zip(*rows.values())]
        else:  # a one-row JSON-lines file
            rows = [rows]
    if not isinstance(rows, list):
        raise DatasetError(f"{path}: a JSON {_JSON_TYPES.get(type(rows), type(rows).__name__)}, "
                           f"expected an array of objects (or JSON lines)")
    return _rows_to_table(str(path), rows)


def _split_tokens(path: Path, root: Path) -> set[str]:
    # "data/train-00000-of-00001.parquet" -> {"data", "train", "00000", "of", "00001"}
    return set(re.split(r"[^0-9a-z]+", str(path.relative_to(root).with_suffix("")).lower()))


def _folder_files(root: Path) -> tuple[list[Path], dict[Path, set[str]], set[str]]:
    """The data files of a folder, the name tokens of each, and the split names they use."""
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix in DATA_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(root).parts)  # .cache, .git
    )
    if not files:
        raise DatasetError(f"folder {root} holds no {'/'.join(DATA_SUFFIXES)} file")
    tokens = {p: _split_tokens(p, root) for p in files}
    return files, tokens, {s for p in files for s in tokens[p] & set(SPLIT_NAMES)}


def _open_folder(root: Path, split: str) -> tuple[list[_Table], bool]:
    files, tokens, named = _folder_files(root)
    if not named:  # no split names: every file is part of one pool, split by seed
        return [_read_file(p) for p in files], True
    chosen = files if split == "all" else [p for p in files if split in tokens[p]]
    if not chosen:
        raise DatasetError(
            f"folder {root} has files for splits {sorted(named)} but none for split {split!r}; "
            f"pass one of those, split='all', or a single file to split it by seed"
        )
    return [_read_file(p) for p in chosen], False


def _load_hub(name: str, split: str) -> dict:
    import datasets

    try:
        return datasets.load_dataset(name) if split == "all" else {split: datasets.load_dataset(name, split=split)}
    except Exception as e:  # offline, unknown name, unknown split: all end the same way for the user
        raise DatasetError(
            f"could not load Hugging Face dataset {name!r} (split {split!r}): {type(e).__name__}: {e}. "
            "Without network access, download it elsewhere and pass a local path instead: a "
            ".jsonl/.json/.parquet file, or a folder such as a hub snapshot"
        ) from e


def _open_hub(name: str, split: str) -> list[_Table]:
    return [_Table(f"{name}[{s}]", ds.column_names, ds.to_list()) for s, ds in _load_hub(name, split).items()]


def _open_source(source: str | Path, split: str) -> tuple[list[_Table], bool]:
    """The tables of `source` for `split`, and whether they still need a seeded split."""
    path = Path(source).expanduser()
    if path.is_dir():
        return _open_folder(path, split)
    if path.is_file():
        if path.suffix not in DATA_SUFFIXES:
            raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; expected {DATA_SUFFIXES}")
        return [_read_file(path)], True
    if _looks_local(source):
        raise DatasetError(f"no such file or folder: {source}")
    return _open_hub(str(source), split), False


def _looks_local(source: str | Path) -> bool:
    """A source that is meant as a local path (not a hub name), whether or not it exists."""
    return isinstance(source, Path) or Path(source).suffix in DATA_SUFFIXES or str(source).startswith(("/", ".", "~"))


def split_names(source: str | Path) -> list[str]:
    """The splits `source` names: an HF dataset's, or those in a folder's file names; [] for a
    single file or a folder without split-named files (one pool, split by seed)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return sorted(_folder_files(path)[2])
    if path.is_file() or _looks_local(source):
        return []
    return sorted(_load_hub(str(source), "all"))  # cached after the first load


def seeded_split(n: int, test_size: float | int, seed: int) -> dict[str, list[int]]:
    """Indices of the "train" and "test" sides of `n` rows: disjoint, covering, each sorted.

    A float `test_size` is a fraction, rounded up (any positive fraction gives >= 1 test row);
    it is read as the decimal it prints as, so 0.07 of 100 rows is 7, not ceil(7.000000000000001) = 8.
    """
    n_test = test_size if isinstance(test_size, int) else math.ceil(Fraction(str(test_size)) * n)
    if not 0 <= n_test <= n:
        raise DatasetError(f"test_size={test_size} asks for {n_test} test rows of {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    return {"test": sorted(order[:n_test]), "train": sorted(order[n_test:])}


def _check_args(schema, split, on_bad_row, test_size, seed, system_prompt, limit) -> None:
    if schema != "auto" and schema not in SCHEMAS:
        raise DatasetError(f"schema={schema!r}: expected 'auto' or one of: {describe_schemas()}")
    if not isinstance(split, str) or not split:
        raise DatasetError(f"split={split!r}: expected a split name such as 'train', 'test' or 'all'")
    if on_bad_row not in ("error", "skip"):
        raise DatasetError(f"on_bad_row={on_bad_row!r}: expected 'error' or 'skip'")
    fraction_ok = isinstance(test_size, float) and 0.0 < test_size < 1.0
    count_ok = isinstance(test_size, int) and not isinstance(test_size, bool) and test_size >= 0
    if not (fraction_ok or count_ok):
        raise DatasetError(f"test_size={test_size!r}: expected a fraction in (0, 1) or a row count >= 0")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DatasetError(f"seed={seed!r}: expected an int")
    if not isinstance(system_prompt, str):
        raise DatasetError(f"system_prompt={system_prompt!r:.60}: expected a string")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DatasetError(f"limit={limit!r}: expected None or a positive int")


def load_records(
    source: str | Path,
    *,
    schema: str = "auto",
    split: str = "train",
    on_bad_row: str = "error",
    test_size: float | int = 0.1,
    seed: int = 0,
    system_prompt: str = SYSTEM_PROMPT,
    limit: int | None = None,
    columns: dict[str, str] | list[str] | None = None,
    strict_columns: bool = True,
) -> Records:
    """Read `split` of `source` (HF dataset name, data file or folder) into normalized records.

    `schema`: "auto" or one of SCHEMAS. `split`: a split the source names, or for an unsplit
    source "train" / "test" (seeded split with `test_size`, a fraction or a count, and `seed`)
    or "all". `on_bad_row`: "error" raises on the first bad row of any file read (also one on
    the other side of a seeded split, so train and test fail alike); "skip" drops bad rows,
    counts them in `Records.skipped` and logs one warning per file. `limit`: first N records.
    `columns`: {record column: file column} (or ["problem=question", ...]) renaming columns
    before detection; `strict_columns=False` skips the entries whose column a file lacks.
    `system_prompt`: opens RL prompts (data/schemas.py says which layouts); "" for none.
    """
    _check_args(schema, split, on_bad_row, test_size, seed, system_prompt, limit)
    try:
        columns = parse_column_map(columns)
    except ValueError as e:
        raise DatasetError(f"columns={e}") from None
    tables, unsplit = _open_source(source, split)
    if unsplit and split not in ("train", "test", "all"):
        raise DatasetError(f"split={split!r}: {source} names no splits; expected 'train', 'test' or 'all'")

    schemas = {}
    for table in tables:
        if not table.rows:
            raise DatasetError(f"{table.name}: no rows")
        # Lines that are not objects say nothing of the columns: refuse them before the schema.
        unreadable = [i for i, row in enumerate(table.rows) if isinstance(row, _BadRow)]
        if unreadable and (on_bad_row == "error" or len(unreadable) == len(table.rows)):
            first = unreadable[0]
            none_left = "" if on_bad_row == "error" else "no readable row; first: "
            raise DatasetError(f"{table.name}: {none_left}{table.labels[first]}, {table.rows[first]}")
        if columns:
            table.columns, table.rows = map_columns(table.name, table.columns, table.rows, columns,
                                                    strict=strict_columns)
        layout = schemas[table.name] = pick_schema(table.name, table.columns, table.rows, schema)
        to_record = ROW_FUNCTIONS[layout]
        for i, row in enumerate(table.rows):
            try:
                if isinstance(row, _BadRow):
                    raise row
                table.outcomes.append(with_extra_columns(to_record(row, table.columns, system_prompt),
                                                         row, layout))
            except _BadRow as bad:
                if on_bad_row == "error":
                    raise DatasetError(f"{table.name}: {table.labels[i]}, {bad}") from None
                table.outcomes.append((table.labels[i], bad))
    if len(set(schemas.values())) > 1:
        raise DatasetError(f"{source}: files of different schemas in one split: {schemas}")

    # Rows of all tables form one pool; an unsplit pool is cut by seed, on row positions, so the
    # cut does not move when a bad row is skipped.
    pool = [(table, i) for table in tables for i in range(len(table.rows))]
    if unsplit and split != "all":
        pool = [pool[k] for k in seeded_split(len(pool), test_size, seed)[split]]

    records, skipped = [], 0
    for table in tables:
        outcomes = [table.outcomes[i] for t, i in pool if t is table]
        bad = [o for o in outcomes if isinstance(o, tuple)]  # (label, _BadRow)
        records += [o for o in outcomes if not isinstance(o, tuple)]
        if bad:
            skipped += len(bad)
            log.warning(f"skipped {len(bad)} of {len(outcomes)} rows of {table.name} "
                        f"(first: {bad[0][0]}, {bad[0][1]})")
    if limit is not None:
        records = records[:limit]
    return Records(records, next(iter(schemas.values())), str(source), split, skipped)


def _same_source(a: str | Path, b: str | Path) -> bool:
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()  # "data/x.jsonl" and "./data/x.jsonl" are one file
    return str(a) == str(b)


def load_held_out(
    source: str | Path,
    eval_source: str | Path = "",
    *,
    train_split: str = "train",
    eval_split: str = "auto",
    schema: str = "auto",
    on_bad_row: str = "error",
    test_size: float | int = 0.1,
    seed: int = 0,
    system_prompt: str = SYSTEM_PROMPT,
    columns: dict[str, str] | list[str] | None = None,
) -> Records:
    """The held-out problems of a run that trains on `train_split` of `source`; the one rule
    every trainer evaluates by:

    - `eval_source` empty or the same as `source`: the other side of the training data: the
      source's own "test" split when it names splits, else the "test" side of the seeded split
      that training cut with the same `test_size` and `seed`. Never a row that training reads:
      raises when `train_split` is "all" or the eval split itself.
    - another source with a "test" split (an HF dataset such as AI-MO/NuminaMath-TIR, a folder
      holding test.jsonl): that split.
    - another source without one (a single file such as GSM8K's test.jsonl, an unsplit folder,
      an HF test set published as one "train" split): all of its rows. The whole file is held
      out; cutting it by seed would evaluate only a `test_size` sliver of it.

    `eval_split` other than "auto" names the split of the eval source instead. `schema` is the
    training source's: it applies to the same source, while another source's columns are
    detected (train on Bespoke chats, evaluate on NuminaMath problems); `columns` applies to
    another source where it has the columns named.
    """
    same = not eval_source or _same_source(eval_source, source)
    src = source if same else eval_source
    if eval_split == "auto":
        eval_split = "test" if same or "test" in split_names(src) else "all"
    if same and train_split in ("all", eval_split):
        raise DatasetError(
            f"{source}: training reads split {train_split!r} of it and evaluation split {eval_split!r}: "
            f"nothing would be held out; train on 'train', or evaluate another source"
        )
    return load_records(src, schema=schema if same else "auto", split=eval_split, on_bad_row=on_bad_row,
                        test_size=test_size, seed=seed, system_prompt=system_prompt, columns=columns,
                        strict_columns=same)
