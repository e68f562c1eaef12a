"""Tools: Python functions a model may call, and the JSON schemas that describe them to it.

A tool is a function `fn(**arguments) -> str`. A tool entry (`--rollout.tools`) is one of

    calculator                  a built-in name (BUILTINS below: calculator.py, python_sandbox.py)
    my_pkg.tools:search         a function of an importable module (as a reward reference is:
    path/to/tools.py:search     rewards/custom.py loads both), or of a Python file
    find=my_pkg.tools:search    either, under another tool name

and, from Python, a function (its module must be importable by name: the tool workers load it
again by that name, pool.py). The model sees each tool as the JSON schema that Hugging Face
chat templates take in `apply_chat_template(..., tools=[...])` (OpenAI's function format):

    {"type": "function", "function": {"name": "search", "description": "...",
     "parameters": {"type": "object", "properties": {"query": {"type": "string",
     "description": "..."}}, "required": ["query"]}}}

built from the signature and the docstring (`json_schema`): type hints give the JSON types, the
docstring's first paragraph the description, and a Google-style `Args:` block the description
of each argument. The schema is also what a call's arguments are checked against (calls.py).
Every argument needs a type hint and the function a docstring: the model knows a tool by them.
"""
from __future__ import annotations

import inspect
import re
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from r1train.rewards.custom import FILE_MODULE, RewardError, load_attribute

OPTION = "rollout.tools"
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
BUILTINS = ("calculator", "python")


class ToolSpecError(ValueError):
    """A tool entry that cannot be loaded or described; the message names the option and entry."""


def _refuse(entry: Any, why: str) -> ToolSpecError:
    return ToolSpecError(f"--{OPTION}={entry!r}: {why}")


@dataclass(frozen=True)
class Tool:
    name: str
    fn: Callable[..., str]
    schema: dict   # {"type": "function", "function": {...}} (module docstring)
    source: str    # how a worker process loads it again: a built-in name or module/file reference

    @property
    def parameters(self) -> dict:
        return self.schema["function"]["parameters"]


_JSON_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean", dict: "object",
               list: "array", tuple: "array", type(None): "null"}


def type_schema(hint: Any) -> dict:
    """The JSON schema of a type hint: int, float, str, bool, None, list[X], tuple[X, ...],
    dict[str, X], Literal[...], X | Y and Optional[X]. ValueError for anything else."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _JSON_TYPES:
        return {"type": _JSON_TYPES[hint]}
    if origin is typing.Literal:
        kinds = {type(a) for a in args}
        if len(kinds) != 1 or next(iter(kinds)) not in (int, float, str, bool):
            raise ValueError(f"Literal{list(args)} must hold values of one type (int, float, str or bool)")
        return {"type": _JSON_TYPES[next(iter(kinds))], "enum": list(args)}
    if origin in (typing.Union, types.UnionType):
        parts = [type_schema(a) for a in args]
        if all(set(p) == {"type"} and isinstance(p["type"], str) for p in parts):
            return {"type": [p["type"] for p in parts]}  # e.g. int | None -> ["integer", "null"]
        return {"anyOf": parts}
    if origin in (list, tuple):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            raise ValueError(f"{hint}: only tuple[X, ...] is supported (a JSON array of one type)")
        return {"type": "array", "items": type_schema(args[0])} if args else {"type": "array"}
    if origin is dict:
        if args and args[0] is not str:
            raise ValueError(f"{hint}: JSON object keys are strings")
        return {"type": "object", "additionalProperties": type_schema(args[1])} if args else {"type": "object"}
    raise ValueError(f"type hint {hint!r} has no JSON type (int, float, str, bool, list, dict, Literal, X | None)")


_SECTION = re.compile(r"^\s*(Args|Arguments|Parameters|Returns|Return|Yields|Raises|Examples?|Notes?)\s*:\s*$")
_ARG = re.compile(r"^(\*{0,2}\w+)\s*(\([^)]*\))?\s*:\s*(.*)$")


def parse_docstring(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {argument: description}) of a Google-style docstring. The description is
    the first paragraph, joined into one line; an argument's lines of `Args:` are joined too."""
    lines = inspect.cleandoc(doc).splitlines()
    head = []
    for line in lines:
        if not line.strip() or _SECTION.match(line):
            break
        head.append(line.strip())
    described: dict[str, str] = {}
    start = next((i for i, line in enumerate(lines) if _SECTION.match(line)
                  and _SECTION.match(line).group(1) in ("Args", "Arguments", "Parameters")), None)
    if start is not None:
        indent, current = None, None
        for line in lines[start + 1:]:
            if not line.strip():
                continue
            depth = len(line) - len(line.lstrip())
            if depth == 0:  # the next section (or text after the block)
                break
            indent = depth if indent is None else indent
            match = _ARG.match(line.strip())
            if depth == indent and match:
                current = match.group(1).lstrip("*")
                described[current] = match.group(3).strip()
            elif current is not None:  # a continuation line
                described[current] = (described[current] + " " + line.strip()).strip()
    return " ".join(head), described


def json_schema(fn: Callable, name: str | None = None) -> dict:
    """The chat-template schema of `fn` (module docstring); ValueError saying what is missing."""
    name = name or getattr(fn, "__name__", type(fn).__name__)
    # an object with __call__ (a configured tool, e.g. python_sandbox.PythonSandbox): its method's signature
    target = fn if inspect.isroutine(fn) else fn.__call__
    doc = inspect.getdoc(fn) or inspect.getdoc(target)
    if not doc or not doc.strip():
        raise ValueError("has no docstring: its first line tells the model what the tool does")
    description, arg_docs = parse_docstring(doc)
    try:
        signature = inspect.signature(target)
        hints = typing.get_type_hints(target)
    except (TypeError, ValueError, NameError) as e:
        raise ValueError(f"its signature cannot be read: {e}") from None
    properties, required = {}, []
    for p in signature.parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise ValueError(f"argument {p.name!r} is {p.kind.description}: a tool is called as fn(**arguments)")
        if p.name not in hints:
            raise ValueError(f"argument {p.name!r} has no type hint (the schema's JSON type comes from it)")
        try:
            prop = type_schema(hints[p.name])
        except ValueError as e:
            raise ValueError(f"argument {p.name!r}: {e}") from None
        if p.name in arg_docs:
            prop["description"] = arg_docs[p.name]
        properties[p.name] = prop
        if p.default is p.empty:
            required.append(p.name)
    parameters = {"type": "object", "properties": properties, "required": required}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


def _builtin(name: str) -> Callable:
    if name == "calculator":
        from r1train.tools.calculator import calculator
        return calculator
    from r1train.tools.python_sandbox import python
    return python


def _source_of(fn: Callable, entry: Any) -> str:
    """The reference a worker process loads a callable by; ToolSpecError where there is none."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", None)
    if not module or not qualname or module == "__main__" or "<" in qualname:
        raise _refuse(entry, "a tool given from Python must be a function of an importable module "
                             "(not __main__, a lambda or a nested function): tool workers load it by name")
    if module.startswith(FILE_MODULE):  # a function of a file loaded by path: load that file again
        module = getattr(sys.modules.get(module), "__file__", module)
    return f"{module}:{qualname}"


def load_tool(entry: str | Callable | tuple[str, Callable]) -> Tool:
    """One tool from an entry (module docstring); ToolSpecError naming --rollout.tools and it."""
    if isinstance(entry, tuple) or callable(entry):
        name, fn = entry if isinstance(entry, tuple) else (getattr(entry, "__name__", None), entry)
        source = _source_of(fn, entry)
        source = f"{name}={source}" if name != getattr(fn, "__name__", None) else source
    elif isinstance(entry, str):
        name, eq, ref = entry.strip().partition("=")
        if not eq:
            name, ref = "", entry.strip()
        if ":" in ref:
            target, _, attribute = ref.rpartition(":")
            if not target.strip() or not attribute.strip():
                raise _refuse(entry, "expected a built-in name, module:function or path/to/file.py:function")
            try:
                fn = load_attribute(entry, target.strip(), attribute.strip(), what="tool")
            except RewardError as e:
                raise _refuse(entry, str(e)) from None
            name = name.strip() or attribute.strip().rsplit(".", 1)[-1]
        elif ref in BUILTINS:
            fn, name = _builtin(ref), name.strip() or ref
        else:
            raise _refuse(entry, f"unknown tool {ref!r}; built-in tools: {', '.join(BUILTINS)}, or a function "
                                 f"as module:function or path/to/file.py:function")
        source = entry.strip()
    else:
        raise _refuse(entry, f"a tool is a name or a function, not a {type(entry).__name__}")
    if not isinstance(name, str) or not NAME.match(name):
        raise _refuse(entry, f"tool name {name!r} must be 1-64 letters, digits, '_' or '-', not starting with a digit")
    try:
        schema = json_schema(fn, name)
    except ValueError as e:
        raise _refuse(entry, f"tool {name!r} {e}") from None
    return Tool(name=name, fn=fn, schema=schema, source=source)


def load_tools(entries) -> dict[str, Tool]:
    """Tools by name from a list of entries (or one comma-separated string); refuses repeats."""
    if isinstance(entries, str):
        entries = [e for e in entries.split(",") if e.strip()]
    tools: dict[str, Tool] = {}
    for entry in entries:
        tool = load_tool(entry)
        if tool.name in tools:
            raise _refuse(entry, f"names tool {tool.name!r} twice (rename one as name=module:function)")
        tools[tool.name] = tool
    return tools
