"""Tools a model calls during a rollout, and the environments that answer it (issue 33).

    registry.py          a tool = `fn(**arguments) -> str`: built-ins by name, user tools as
                         module:fn / file.py:fn; JSON schemas from signature + docstring
    calls.py             `<tool_call>{...}</tool_call>` blocks read out of a completion and
                         checked against the schemas; hostile output becomes error text
    pool.py              worker processes that run calls, each with a wall timeout
    calculator.py        built-in `calculator`: arithmetic on an `ast` tree, no eval
    python_sandbox.py    built-in `python`: code in a limited process (and what it does not isolate)
    sandbox_supervisor.py  the supervisor process of one `python` run (standard library only)
    environment.py       reset(row) -> messages, step(call) -> (text, done); ToolEnvironment; an example
    turns.py             the text (tokens) a row gets between two assistant segments, from the template
    episodes.py          the rows' side of a multi-turn rollout: calls answered in one batch, tool
                         turns as tokens, each row's messages and counts (the engine asks it)

Nothing here imports torch: workers start in a fraction of a second.
"""
from r1train.tools.calls import ToolCall, parse_tool_calls, tool_error
from r1train.tools.environment import Environment, GuessingGame, ToolEnvironment, run_steps
from r1train.tools.pool import ToolPool, ToolResult
from r1train.tools.registry import BUILTINS, Tool, ToolSpecError, json_schema, load_tool, load_tools

__all__ = ["BUILTINS", "Environment", "GuessingGame", "Tool", "ToolCall", "ToolEnvironment", "ToolPool",
           "ToolResult", "ToolSpecError", "json_schema", "load_tool", "load_tools", "parse_tool_calls",
           "run_steps", "tool_error"]
