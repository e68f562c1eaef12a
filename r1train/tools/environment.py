"""Environments: what a multi-turn row talks to. Tools are one kind; a game or a sandbox another.

An environment is made per row (`factory(row)`), and

    reset(row) -> messages      the conversation the row starts from (the prompt)
    step(call) -> (text, done)  the answer to one tool call (calls.ToolCall), and whether the
                                episode is over (the row then ends after this tool turn)
    tools                       the registry.Tool's the model may call (their schemas go into
                                the prompt through the chat template's `tools` argument)

`ToolEnvironment` serves plain tools: its reset is the row's prompt, its step runs the call in
a ToolPool (pool.py) and is never done. `GuessingGame` below is the example of a stateful one.
A call the parser already refused (invalid JSON, unknown tool, wrong arguments) never reaches
`step`: `run_steps` answers it with its error text, so an environment only sees checked calls.
"""
from __future__ import annotations

import random
from collections.abc import Callable

from r1train.tools.calls import ToolCall, tool_error
from r1train.tools.pool import ToolPool
from r1train.tools.registry import Tool, json_schema


def local_tool(fn: Callable, name: str | None = None) -> Tool:
    """A Tool run in this process (an environment's method): no worker will load it."""
    name = name or fn.__name__
    return Tool(name=name, fn=fn, schema=json_schema(fn, name), source="")


class Environment:
    """The interface (module docstring). Subclasses set `tools` and define reset and step."""

    tools: dict[str, Tool] = {}

    def reset(self, row: dict) -> list[dict]:
        raise NotImplementedError

    def step(self, call: ToolCall) -> tuple[str, bool]:
        raise NotImplementedError

    def schemas(self) -> list[dict]:
        """The tools' schemas, for `apply_chat_template(..., tools=...)`."""
        return [t.schema for t in self.tools.values()]


class ToolEnvironment(Environment):
    """Plain tools: the row's prompt, and each call run in `pool` (module docstring)."""

    def __init__(self, tools: dict[str, Tool], pool: ToolPool, prompt_column: str = "prompt"):
        self.tools, self.pool, self.prompt_column = tools, pool, prompt_column

    def reset(self, row: dict) -> list[dict]:
        return [dict(m) for m in row[self.prompt_column]]

    def step(self, call: ToolCall) -> tuple[str, bool]:
        return self.pool.run([call])[0].text, False


def run_steps(envs: list[Environment], calls: list[ToolCall]) -> list[tuple[str, bool]]:
    """(text, done) for each row's call: refused calls get their error; the calls of
    ToolEnvironments that share a pool run as one batch there (in parallel on its workers);
    other environments step one call at a time."""
    out: list[tuple[str, bool] | None] = [None] * len(calls)
    batches: dict[int, tuple[ToolPool, list[int]]] = {}
    for i, (env, call) in enumerate(zip(envs, calls)):
        if call.error is not None:
            out[i] = (call.error, False)
        elif isinstance(env, ToolEnvironment):
            batches.setdefault(id(env.pool), (env.pool, []))[1].append(i)
        else:
            try:
                out[i] = env.step(call)
            except Exception as e:  # an environment's bug must not end the run: the model reads it
                out[i] = (tool_error(f"{call.name}: {type(e).__name__}: {e}"), False)
    for pool, rows in batches.values():
        for i, result in zip(rows, pool.run([calls[i] for i in rows])):
            out[i] = (result.text, False)
    return out  # type: ignore[return-value]


class GuessingGame(Environment):
    """Example: find a secret number from 1 to `high` with the `guess` tool; done when found.

    The secret is the row's `secret` column, or drawn from the row's `seed`."""

    def __init__(self, high: int = 100):
        self.high, self.secret, self.guesses = high, None, 0
        self.tools = {"guess": local_tool(self.guess)}

    def reset(self, row: dict) -> list[dict]:
        self.secret = int(row["secret"]) if "secret" in row else random.Random(row.get("seed", 0)).randint(1, self.high)
        self.guesses = 0
        return [{"role": "user", "content": f"I am thinking of a whole number from 1 to {self.high}. "
                                            "Find it with the guess tool."}]

    def guess(self, number: int) -> str:
        """Guess the secret number; the answer says whether it is higher, lower or found.

        Args:
            number: Your guess, a whole number.
        """
        self.guesses += 1
        if number == self.secret:
            return f"Correct: {number} found in {self.guesses} guesses."
        return "Higher." if number < self.secret else "Lower."

    def step(self, call: ToolCall) -> tuple[str, bool]:
        text = self.tools[call.name].fn(**call.arguments)
        return text, text.startswith("Correct")
