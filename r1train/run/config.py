"""Typed configuration: nested dataclasses, a recipe file, and command-line overrides.

Each field's documentation is the string literal written under it in the dataclass (the
convention of this codebase); `--help` prints them with the defaults. Precedence, lowest first:
dataclass defaults < recipe file (`--recipe file.yaml|.toml`) < `--section.field value` flags.

    python train.py grpo --recipe configs/qwen2.5-0.5b-r1-zero.yaml --grpo.group_size 8
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import errno
import inspect
import json
import math
import os
import textwrap
import types
import typing
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A bad option: the message names the option and the value."""


def field_docs(cls) -> dict[str, str]:
    """Docstrings written under the fields of a dataclass (and its bases), by field name."""
    docs = {}
    for klass in reversed(cls.__mro__[:-1]):
        docs.update(_own_field_docs(klass))
    return docs


def _own_field_docs(cls) -> dict[str, str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for prev, node in zip(body, body[1:]):
        if (isinstance(prev, ast.AnnAssign) and isinstance(prev.target, ast.Name)
                and isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
                and isinstance(node.value.value, str)):
            docs[prev.target.id] = " ".join(node.value.value.split())
    return docs


def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Turn a string (command line) or a parsed recipe value into the field's type.

    A recipe value is read as the same text on the command line would be: an int option takes
    2 or 2.0 (or "2", "2.0", "1e3"), never 2.5; null is None only for an Optional option; a
    scalar given to a list option is a one-item list; a bool option takes true/false or 1/0."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    optional = origin in (typing.Union, types.UnionType) and type(None) in args
    if value is None and not optional and tp is not typing.Any:
        raise ConfigError(f"option {name}: null given, but it needs a value of type {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if optional:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError:
                continue
        raise ConfigError(f"option {name}: cannot read {value!r} as {_type_name(tp)}")
    if origin in (list, tuple):
        inner = args[0] if args else str
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()] if value.strip() else []
        elif isinstance(value, (int, float, bool)):
            value = [value]  # as `--opt 1.0` gives [1.0]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"option {name}: expected a list, got {value!r}")
        out = [_coerce(v, inner, name) for v in value]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"option {name}: expected true/false, got {value!r}")
    if tp is int:
        return _to_int(value, name)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ConfigError(f"option {name}: expected float, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"option {name}: expected float, got {value!r}") from None
    if tp is str:
        # A YAML `on`/`no` or a list would otherwise become the text "True" or "['a']".
        if isinstance(value, (bool, list, tuple, dict)):
            raise ConfigError(f"option {name}: expected text, got {value!r} (quote it in the recipe)")
        return str(value)
    if tp is typing.Any:
        return value
    raise ConfigError(f"option {name}: unsupported type {tp}")


def _to_int(value: Any, name: str) -> int:
    """An int from an int, an integral float, or text that reads as one ("3", "3.0", "1e3")."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"option {name}: expected int, got {value!r}")
    given = value
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value.strip())  # exact, however large
        except ValueError:
            pass
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"option {name}: expected int, got {value!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise ConfigError(f"option {name}: expected int, got {given!r} (not a whole number)")
    return int(value)


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp)


def set_option(cfg, dotted: str, value: Any) -> None:
    """Set `section.field` on a nested dataclass, coercing the value to the field's type."""
    obj, parts = cfg, dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(obj) or part not in {f.name for f in dataclasses.fields(obj)}:
            raise ConfigError(unknown_option_message(cfg, dotted))
        if i == len(parts) - 1:
            tp = typing.get_type_hints(type(obj))[part]
            if isinstance(value, (list, tuple)) and tp is str and _field(obj, part).metadata.get("list"):
                # A text option that holds a list (`data.source: [a.jsonl:0.7, b.jsonl:0.3]`)
                # reads a recipe's list as the command line writes it: comma-separated.
                value = ",".join(str(v) for v in value)
            if dataclasses.is_dataclass(tp):
                if not isinstance(value, dict):
                    raise ConfigError(f"option {dotted} is a section; set its fields instead")
                for k, v in value.items():
                    set_option(cfg, f"{dotted}.{k}", v)
            else:
                setattr(obj, part, _coerce(value, tp, dotted))
        else:
            obj = getattr(obj, part)


def _field(obj, name: str) -> dataclasses.Field:
    return next(f for f in dataclasses.fields(obj) if f.name == name)


def unknown_option_message(cfg, dotted: str) -> str:
    """'unknown option --x; did you mean --a.b?' with the closest option names (by the whole
    name, and by its last part alone: `--grpo.epsilonn` -> `--grpo.epsilon_low`)."""
    names = _option_names(cfg)
    last = {n.rsplit(".", 1)[-1]: n for n in names}
    close = difflib.get_close_matches(dotted, names, n=3, cutoff=0.6)
    close += [last[m] for m in difflib.get_close_matches(dotted.rsplit(".", 1)[-1], list(last), n=3,
                                                         cutoff=0.75) if last[m] not in close]
    aliases = [a for a, target in ALIASES.items() if target in names]
    close = [f"{a} (= --{ALIASES[a]})" for a in difflib.get_close_matches(dotted, aliases, n=1,
                                                                          cutoff=0.8)] + close
    hint = f"did you mean {' or '.join('--' + c for c in close[:3])}?" if close else \
        "`--help` lists every option"
    return f"unknown option --{dotted}; {hint}"


def _option_names(cfg, prefix: str = "") -> list[str]:
    names = []
    for f in dataclasses.fields(cfg):
        val = getattr(cfg, f.name)
        if dataclasses.is_dataclass(val):
            names += _option_names(val, f"{prefix}{f.name}.")
        else:
            names.append(prefix + f.name)
    return names


NAME_TOO_LONG = "a name in the path is longer than the file system allows (File name too long)"


def unusable_path(path: str | Path) -> str | None:
    """Why the file system refuses `path` outright, in words, or None (also when nothing is there).
    A name longer than it allows, or a folder on the way that cannot be searched, make
    `Path.exists()` and `is_file()` raise OSError instead of answering False: a traceback, unless
    the option is checked with this first."""
    try:
        os.stat(Path(path).expanduser())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return f"{NAME_TOO_LONG}; shorten it"
        return f"the file system refuses it: {e.strerror or e}"
    return None


def load_recipe(path: str | Path) -> dict:
    """The mapping in a recipe file (YAML, TOML or JSON). A file that cannot be read or parsed
    is a ConfigError naming the file, and the line and column where the parser stopped."""
    path = Path(path)
    if (why := unusable_path(path)) is not None:
        raise ConfigError(f"--recipe={str(path)!r}: {why}")
    if not path.is_file():
        raise ConfigError(f"recipe file not found: {path}")
    if path.suffix not in (".yaml", ".yml", ".toml", ".json"):
        raise ConfigError(f"recipe {path}: expected .yaml, .yml, .toml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"recipe {path}: not UTF-8 text ({e.reason} at byte {e.start + 1})") from None
    except OSError as e:
        raise ConfigError(f"recipe {path}: cannot read it: {e.strerror}") from None
    data = _parse_recipe(path, text)
    if not isinstance(data, dict):
        raise ConfigError(f"recipe {path}: top level must be a mapping of sections")
    return data


def _parse_recipe(path: Path, text: str) -> Any:
    """Parse by suffix; a syntax error becomes `recipe PATH: line L, column C: what`. (Parsing
    a string, YAML would name the file `<unicode string>`.)"""
    if path.suffix == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"recipe {path}: line {e.lineno}, column {e.colno}: {e.msg}") from None
    if path.suffix == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10: the same parser as the package tomli
            try:
                import tomli as tomllib
            except ModuleNotFoundError:
                raise ConfigError(f"recipe {path}: reading TOML needs Python 3.11+ or "
                                  f"`pip install tomli` (or use a YAML recipe)") from None
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:  # its message ends "(at line L, column C)"
            raise ConfigError(f"recipe {path}: {e}") from None
    import yaml
    try:
        return yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        what = " ".join(str(p) for p in (getattr(e, "context", None), getattr(e, "problem", None)) if p)
        raise ConfigError(f"recipe {path}: {where}{what or e}") from None


def error_line(error: BaseException) -> str:
    """A user error as the one line `train.py` prints before exiting with status 2: the message
    (which names the option, file, row or field), its own line breaks turned into "; "."""
    parts = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "error: " + ("; ".join(parts) or type(error).__name__)


def apply_dict(cfg, data: dict, source: str = "recipe") -> None:
    for key, value in data.items():
        try:
            set_option(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None


def split_argv(argv: list[str], help_text_fn, usage: str) -> tuple[str | None, list[tuple[str, str]]]:
    """(recipe path, [(key, value)]) from `--key value`, `--key=value` and bare `--flag`s.

    A bare flag (last, or followed by another `--option`) means true. `-h`/`--help` prints
    `help_text_fn()` and exits. The pipeline reads its command line by the same rule."""
    recipe, pairs, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(help_text_fn())
            raise SystemExit(0)
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}; options look like {usage}")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                val = argv[i + 1]
                i += 1
            elif key == "recipe":
                raise ConfigError("--recipe needs a file")
            else:
                val = "true"  # a bare flag: --wandb
        if key == "recipe":
            recipe = val
        else:
            pairs.append((key, val))
        i += 1
    return recipe, pairs


def parse_args(cls, argv: list[str], prog: str = ""):
    """Build `cls()` and apply the recipe (`--recipe PATH`) and `--a.b value` overrides.

    `prog`: the command's name, for the usage line of `--help`."""
    cfg = cls()
    usage = (f"usage: [torchrun --nproc_per_node=N] train.py {prog or '<command>'} "
             f"[--recipe FILE] [--section.field VALUE ...]\n\n"
             f"Options, with their defaults. A recipe file sets them by section, the command\n"
             f"line wins; TRL's names work too (--num_generations, --learning_rate ...: README).")
    recipe, overrides = split_argv(argv, lambda: usage + "\n" + help_text(cfg), "--section.field value")
    if recipe is not None:
        data = load_recipe(recipe)
        apply_dict(cfg, data, source=f"recipe {recipe}")
    for key, val in overrides:
        set_option(cfg, _alias(cfg, key), val)
    if hasattr(cfg, "validate"):
        cfg.validate()
    return cfg


# Option names of TRL's GRPOConfig / SFTConfig (and common Trainer arguments) that mean the
# same as one of ours: `--num_generations 8` is `--rollout.group_size 8`. Only exact matches
# of meaning are here (README, "Coming from TRL, verl or OpenRLHF").
ALIASES = {
    "num_generations": "rollout.group_size",
    "max_completion_length": "rollout.max_new_tokens",
    "temperature": "rollout.temperature",
    "top_p": "rollout.top_p",
    "top_k": "rollout.top_k",
    "max_prompt_length": "data.max_prompt_tokens",
    "epsilon": "grpo.epsilon_low",
    "epsilon_high": "grpo.epsilon_high",
    "beta": "grpo.beta",
    "num_iterations": "grpo.num_iterations",
    "loss_type": "grpo.loss_type",
    "scale_rewards": "grpo.scale_rewards",
    "mask_truncated_completions": "grpo.mask_truncated",
    "importance_sampling_level": "grpo.importance_sampling",
    "reward_weights": "grpo.reward_weights",
    "ref_model_sync_steps": "grpo.ref_refresh_steps",
    "ref_model_mixup_alpha": "grpo.ref_mix_alpha",
    "max_length": "sft.max_seq_len",
    "max_seq_length": "sft.max_seq_len",
    "packing": "sft.packing",
    "assistant_only_loss": "sft.assistant_only",
    "learning_rate": "optim.lr",
    "weight_decay": "optim.weight_decay",
    "adam_beta1": "optim.beta1",
    "adam_beta2": "optim.beta2",
    "warmup_steps": "optim.warmup_steps",
    "lr_scheduler_type": "optim.schedule",
    "max_grad_norm": "optim.max_grad_norm",
    "gradient_checkpointing": "model.gradient_checkpointing",
    "model_name_or_path": "model.path",
    "max_steps": "train.max_steps",
    "seed": "train.seed",
    "output_dir": "train.output_dir",
    "logging_steps": "train.log_every",
    "save_steps": "train.save_every",
    "eval_steps": "train.eval_every",
    "save_total_limit": "train.keep_last",
}


def _alias(cfg, key: str) -> str:
    """A TRL name (`ALIASES`) that this command has -> ours; other top-level flags that are not
    sections map to `train.<flag>` (e.g. `--wandb`)."""
    if "." in key or key in {f.name for f in dataclasses.fields(cfg)}:
        return key
    if key in ALIASES and ALIASES[key] in _option_names(cfg):
        return ALIASES[key]
    if hasattr(cfg, "train") and f"train.{key}" in _option_names(cfg):
        return f"train.{key}"
    return key


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def help_text(cfg, prefix: str = "") -> str:
    lines = []
    docs = field_docs(type(cfg))
    for f in dataclasses.fields(cfg):
        val = getattr(cfg, f.name)
        if dataclasses.is_dataclass(val):
            lines.append(f"\n[{prefix}{f.name}]")
            lines.append(help_text(val, f"{prefix}{f.name}."))
        else:
            lines.append(f"  --{prefix}{f.name} (default: {val!r})")
            doc = docs.get(f.name) or f.metadata.get("help")
            if doc:
                lines.append(textwrap.fill(" ".join(doc.split()), 96, initial_indent="      ",
                                           subsequent_indent="      "))
    return "\n".join(lines)


def format_config(cfg) -> str:
    """The resolved config as YAML, printed at start and saved next to checkpoints."""
    import yaml
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None)
