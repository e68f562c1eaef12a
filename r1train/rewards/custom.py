"""Rewards the user brings: Python functions named by reference, or given as callables.

A reward entry (`--grpo.rewards`, `--sampling.rewards`, a recipe's `rewards:` list) is one of

    accuracy                      a built-in name (rewards/__init__.py)
    my_pkg.rewards:brevity        a function of an importable module (sys.path: installed
                                  packages, PYTHONPATH; the working directory is not searched)
    path/to/rewards.py:brevity    a function of a Python file, loaded from that path
    short=my_pkg.rewards:brevity  either, under another metric name (`short/mean` in metrics)
    rm:path/to/folder             a reward model: a sequence-classification model's scalar
                                  logit (reward_model.py); metric name `rm` unless `name=rm:...`

and, from Python, a callable (`GRPOTrainer(cfg, reward_funcs=[brevity])`) or a
`(name, callable)` pair. A reward keeps the built-ins' calling convention,
`fn(completions, **columns) -> list[float | None]`, where `columns` holds every column of the
batch's records (extra dataset columns included) and `completion_ids`. Its metric name is the
function's name (for a reference, the attribute's), unless `name=` says otherwise.

Loading a file executes it: that is the code the user named. A file is loaded once per process
(keyed by its resolved path), as an import would be.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import math
import numbers
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")
PYTHON = "python"  # the target of a recorded callable: `name=python:module.qualname`
FILE_MODULE = "r1_user_rewards_"  # the module name of a reward file loaded by path, before its hash
RM = "rm"  # the target of a reward model: `[name=]rm:path/to/folder` (its default metric name too)


class RewardError(ValueError):
    """A reward function that cannot be loaded, or that broke the calling convention."""


def is_reference(entry: str) -> bool:
    """`module:fn` or `file.py:fn` (optionally `name=...`), as opposed to a built-in name."""
    return ":" in entry


def split_reference(entry: str) -> tuple[str, str, str]:
    """`[name=]target:attribute` -> (metric name, target, attribute). No import happens here."""
    name, eq, ref = entry.partition("=")
    if not eq:
        name, ref = "", entry
    whole = ref.strip().startswith((PYTHON + ":", RM + ":"))  # what follows is a qualname or a path
    target, _, attribute = ref.strip().partition(":") if whole else ref.strip().rpartition(":")
    target, attribute, name = target.strip(), attribute.strip(), name.strip()
    if not target or not attribute:
        raise RewardError(f"reward {entry!r}: expected module:function, path/to/file.py:function or rm:path/to/folder")
    name = name or (RM if target == RM else attribute.rsplit(".", 1)[-1])
    if not NAME.match(name):
        raise RewardError(f"reward {entry!r}: metric name {name!r} must be letters, digits, '_', '.' or '-'")
    return name, target, attribute


def entry_name(entry: Any) -> str:
    """The metric name of a reward entry: the built-in name, the reference's name, the
    callable's `__name__` (a `(name, fn)` pair: its name)."""
    if isinstance(entry, tuple):
        return str(entry[0])
    if callable(entry):
        return getattr(entry, "__name__", type(entry).__name__)
    return split_reference(entry)[0] if is_reference(entry) else entry


def entry_text(entry: Any) -> str:
    """How a reward entry is recorded in the run's config: a string as given; a callable as the
    reference that loads it, `name=module:qualname`, or where it cannot be loaded by name (a
    lambda, a function inside a function, one of `__main__`) as `name=python:module.qualname`:
    either says which code scored the run, and the config checks pass on both."""
    if isinstance(entry, str):
        return entry
    name, fn = entry if isinstance(entry, tuple) else (entry_name(entry), entry)
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", type(fn).__name__)
    if module in ("__main__", "?") or "<" in qualname:
        return f"{name}={PYTHON}:{module}.{qualname}"
    return f"{name}={module}:{qualname}"


def reward_model_folder(entry: Any) -> str | None:
    """The folder of a reward-model entry `[name=]rm:path/to/folder`; None for any other entry."""
    if not isinstance(entry, str) or not is_reference(entry):
        return None
    _, target, folder = split_reference(entry)
    return folder if target == RM else None


def from_python(entry: str) -> bool:
    """A config's record of a callable given from Python (`name=python:...`): not loadable."""
    return is_reference(entry) and split_reference(entry)[1] == PYTHON


def _is_file(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target


def _load_file(entry: str, target: str, what: str = "reward"):
    path = Path(target).expanduser()
    if not path.is_file():
        raise RewardError(f"{what} {entry!r}: no such file {target} (from {Path.cwd()})")
    path = path.resolve()
    key = FILE_MODULE + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, path)
    if spec is None or spec.loader is None:
        raise RewardError(f"{what} {entry!r}: {path} cannot be loaded as Python (expected a .py file)")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # before executing it, as import does (dataclasses look it up)
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[key]
        raise RewardError(f"{what} {entry!r}: loading file {path} failed: {type(e).__name__}: {e}") from None
    return module


# The project's modules before they moved into the r1train package, and where each is now;
# configs and recipes written before then may name them in reward references.
_OLD_INFRA = {"loop": "run.loop", "checkpoint": "run.checkpoint", "resume": "run.resume",
              "logging": "run.logging", "dist": "run.dist", "config": "run.config", "sections": "run.sections",
              "dcp_safe": "run.dcp_safe", "run_folder": "run.folder", "gguf": "model.gguf",
              "policy": "model.policy", "attention": "model.attention", "engine": "model.engine",
              "static_decode": "model.static_decode", "model": "model.load", "evaluate": "evaluate"}
_OLD_PACKAGES = ("grpo", "sft", "kernels", "data", "rewards", "pipeline")


def moved_module(target: str) -> str | None:
    """Where the project's module `target` (its name before the r1train package) is now, or None
    when `target` is no such name."""
    top, _, rest = target.partition(".")
    if top == "infra" and rest in _OLD_INFRA:
        return "r1train." + _OLD_INFRA[rest]
    if top in _OLD_PACKAGES:
        try:
            return "r1train." + target if importlib.util.find_spec("r1train." + target) else None
        except ModuleNotFoundError:  # a parent of the name is no package
            return None
    return None


def _load_module(entry: str, target: str, what: str = "reward"):
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        moved = moved_module(target)
        if moved:  # a config written before the project became one package (e.g. a resumed run's)
            raise RewardError(f"{what} {entry!r}: module {target!r} is now {moved!r} (this project's modules "
                              f"moved into the r1train package): write {entry.replace(target, moved, 1)!r}") from None
        if e.name and (target == e.name or target.startswith(e.name + ".")):
            raise RewardError(f"{what} {entry!r}: no module named {e.name!r} on sys.path (the working "
                              f"directory is not searched: install it, set PYTHONPATH, or name the "
                              f"file as path/to/file.py:function)") from None
        raise RewardError(f"{what} {entry!r}: importing module {target!r} failed: {e}") from None
    except Exception as e:
        raise RewardError(f"{what} {entry!r}: importing module {target!r} failed: "
                          f"{type(e).__name__}: {e}") from None


def load_reference(entry: str) -> tuple[str, Callable]:
    """(metric name, function) of a reference; RewardError naming the module, file or attribute."""
    name, target, attribute = split_reference(entry)
    if target == PYTHON:
        raise RewardError(f"reward {entry!r}: a function that was given from Python (reward_funcs=) "
                          f"cannot be loaded by this name; pass it again, or name it as module:function")
    if target == RM:
        raise RewardError(f"reward {entry!r}: a reward model, not a function (rewards/reward_model.py)")
    return name, load_attribute(entry, target, attribute)


def load_attribute(entry: str, target: str, attribute: str, what: str = "reward") -> Callable:
    """The callable `attribute` (dotted) of a module or a .py file `target`; RewardError naming
    `what` (a reward, a tool: tools/registry.py loads user tools with it), the entry and the cause."""
    module = _load_file(entry, target, what) if _is_file(target) else _load_module(entry, target, what)
    where = target if _is_file(target) else f"module {target!r}"
    fn = module
    for part in attribute.split("."):
        if not hasattr(fn, part):
            found = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
            raise RewardError(f"{what} {entry!r}: {where} has no attribute {attribute!r}; its functions: "
                              f"{', '.join(found[:12]) or 'none'}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise RewardError(f"{what} {entry!r}: {where}: {attribute!r} is a {type(fn).__name__}, not a function")
    return fn


def describe(fn: Callable) -> str:
    """Where a reward function comes from, for messages: `module.qualname`, or for a function of
    a file loaded by path, `path/to/file.py:qualname`."""
    module = getattr(fn, "__module__", None) or "?"
    qualname = getattr(fn, "__qualname__", type(fn).__name__)
    file = getattr(sys.modules.get(module), "__file__", None) if module.startswith(FILE_MODULE) else None
    return f"{file}:{qualname}" if file else f"{module}.{qualname}"


def checked_values(name: str, fn: Callable, values: Any, n: int) -> list[float | None]:
    """A reward's output as a list of n floats or None; RewardError naming the function when it
    returned something else (wrong length, a non-number, NaN or an infinity, a bool). NaN is
    refused rather than read as "no opinion": that is None, and a NaN is more often a bug (0/0)."""
    label = f"reward {name!r} ({describe(fn)})"
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise RewardError(f"{label} returned a {type(values).__name__}; it must return a list of "
                          f"{n} floats (None = no opinion), one per completion")
    values = list(values)
    if len(values) != n:
        raise RewardError(f"{label} returned {len(values)} values for {n} completions; it must "
                          f"return one float (or None) per completion")
    out = []
    for i, v in enumerate(values):
        if v is not None and (isinstance(v, bool) or not isinstance(v, numbers.Real)
                              or not math.isfinite(float(v))):
            raise RewardError(f"{label} returned {v!r} ({type(v).__name__}) for completion {i}; "
                              f"expected a finite float, or None for no opinion")
        out.append(None if v is None else float(v))
    return out
