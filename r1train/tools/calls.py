"""Tool calls in a completion, read in the Qwen / Hermes format, and checked against the schemas.

A model trained with Qwen2.5's (Hermes-style) chat template calls a tool by writing

    <tool_call>
    {"name": "calculator", "arguments": {"expression": "12 * 34"}}
    </tool_call>

one block per call (several blocks in one turn are several calls, run in order). Model output is
hostile input: `parse_tool_calls` never raises. A block that is not valid JSON, names no tool or
an unknown one, or whose arguments are not an object or do not match the tool's schema (an
argument missing, unknown, or of the wrong JSON type) becomes a call with an `error`: its result
is that error text, which the model reads in the tool turn as it would read a result. An opened
`<tool_call>` never closed is no call (the engine stops a row at `</tool_call>`, so an unclosed
block is a turn that ended otherwise).
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE), re.DOTALL)
MAX_CALL_CHARS = 100_000  # a longer block is refused unread (bounds the JSON parser's time)
MAX_CALLS = 16  # per turn; further blocks are refused


@dataclass
class ToolCall:
    name: str | None                  # the tool named, None when the block names none
    arguments: dict[str, Any] = field(default_factory=dict)
    error: str | None = None          # set: the call is not run, this is its result
    text: str = ""                    # the block's text between the tags, as the model wrote it

    def message(self) -> dict:
        """The call as a chat template's assistant `tool_calls` entry (OpenAI's layout)."""
        return {"type": "function", "function": {"name": self.name or "", "arguments": self.arguments}}


def tool_error(message: str) -> str:
    """The text a tool turn holds when a call failed (what the model reads)."""
    return f"Error: {message}"


_PYTHON_TYPES = {"string": str, "boolean": bool, "object": dict, "array": list, "null": type(None)}


def _json_type_ok(value: Any, kind: str) -> bool:
    """Whether a parsed JSON value has JSON type `kind` (a bool is no integer, as in JSON Schema)."""
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return kind in _PYTHON_TYPES and isinstance(value, _PYTHON_TYPES[kind])


def schema_error(value: Any, schema: dict, where: str) -> str | None:
    """Why `value` does not match `schema` (the subset registry.type_schema writes), or None."""
    if "anyOf" in schema:
        if all(schema_error(value, s, where) for s in schema["anyOf"]):
            return f"{where} does not match any of its types"
        return None
    kinds = schema.get("type")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
    if kinds and not any(_json_type_ok(value, k) for k in kinds):
        return f"{where} must be {' or '.join(kinds)}, got {json.dumps(value)[:80]}"
    if "enum" in schema and value not in schema["enum"]:
        return f"{where} must be one of {json.dumps(schema['enum'])}"
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            if (why := schema_error(item, schema["items"], f"{where}[{i}]")):
                return why
    if isinstance(value, dict) and isinstance(schema.get("additionalProperties"), dict):
        for key, item in value.items():
            if (why := schema_error(item, schema["additionalProperties"], f"{where}[{key!r}]")):
                return why
    return None


def arguments_error(arguments: Any, parameters: dict) -> str | None:
    """Why a call's arguments do not fit a tool's `parameters` schema, or None."""
    if not isinstance(arguments, dict):
        return f"arguments must be a JSON object, got {type(arguments).__name__ if arguments is not None else 'null'}"
    properties = parameters.get("properties", {})
    unknown = [k for k in arguments if k not in properties]
    if unknown:
        return f"unknown argument {unknown[0]!r}; the arguments are: {', '.join(properties) or 'none'}"
    missing = [k for k in parameters.get("required", []) if k not in arguments]
    if missing:
        return f"missing argument {missing[0]!r}"
    for key, value in arguments.items():
        if (why := schema_error(value, properties[key], f"argument {key!r}")):
            return why
    return None


def _read_call(block: str, tools: dict) -> ToolCall:
    text = block.strip()
    if len(text) > MAX_CALL_CHARS:
        return ToolCall(None, error=tool_error(f"tool call of {len(text)} characters (at most {MAX_CALL_CHARS})"),
                        text=text[:200])
    try:
        call = json.loads(text)
    except Exception as e:  # JSONDecodeError, RecursionError (deep nesting), ...
        return ToolCall(None, error=tool_error(f"the tool call is not valid JSON ({type(e).__name__}: {e}); "
                                               'write {"name": ..., "arguments": {...}}'), text=text)
    if not isinstance(call, dict):
        return ToolCall(None, error=tool_error('a tool call is a JSON object {"name": ..., "arguments": {...}}'),
                        text=text)
    name = call.get("name")
    if not isinstance(name, str) or not name:
        return ToolCall(None, error=tool_error('the tool call has no "name"'), text=text)
    arguments = call.get("arguments", {})
    if name not in tools:
        return ToolCall(name, arguments if isinstance(arguments, dict) else {},
                        error=tool_error(f"unknown tool {name[:80]!r}; the tools are: {', '.join(tools)}"), text=text)
    why = arguments_error(arguments, tools[name].parameters)
    if why:
        return ToolCall(name, arguments if isinstance(arguments, dict) else {},
                        error=tool_error(f"{name}: {why}"), text=text)
    return ToolCall(name, arguments, text=text)


def parse_tool_calls(text: str, tools: dict) -> list[ToolCall]:
    """Every closed `<tool_call>` block of `text`, in order, read and checked against `tools`
    (name -> registry.Tool). Never raises (module docstring); at most MAX_CALLS calls are read."""
    calls = []
    for i, match in enumerate(_BLOCK.finditer(text)):
        if i == MAX_CALLS:
            calls.append(ToolCall(None, error=tool_error(f"more than {MAX_CALLS} tool calls in one turn; "
                                                         "the rest were not run")))
            break
        calls.append(_read_call(match.group(1), tools))
    return calls
