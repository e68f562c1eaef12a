"""The rows' side of a multi-turn rollout: what the engine asks when a row's segment closes a call.

The engine (model/engine.py, model/multiturn.py) owns the tokens, the KV cache and the budget; a
`ToolEpisodes` owns, per row, its environment (environment.py), its conversation as messages and
its counts. When rows pause after `</tool_call>`, the engine calls

    answer(rows, segments, rooms) -> [(tool turn ids or None, done), ...]

with each paused row's segment (its tokens since the last tool turn) and the tokens left in its
budget. Every row's calls are read (calls.py; a `</tool_call>` that closes no block is an error
the model reads), then all calls of all rows run as one batch (`run_steps`: one pool batch, so
the decode loop waits for the slowest call only), and each row's results become the tokens the
chat template writes between two assistant turns (turns.py). A tool turn that does not fit in
the row's budget (`len(ids) >= room`, leaving no token for the model) is answered None: the row
ends, truncated, and its messages do not get it.

`episode(row, last_segment)` is the row's record once it ends: its messages (the prompt, each
segment as an assistant message with the text the model wrote, each result as a tool message),
`turns` (assistant segments), `tool_calls` and `tool_errors` (calls the model read an answer to,
and those whose answer was an error: a refused call, an exception, a timeout, a crash, or a
result text that starts with "Error: " as `tool_error` writes them), and `calls` per tool name.
"""
from __future__ import annotations

from r1train.tools.calls import CALL_CLOSE, CALL_OPEN, ToolCall, parse_tool_calls, tool_error
from r1train.tools.environment import Environment, run_steps
from r1train.tools.turns import tool_turn_ids

NO_BLOCK = tool_error(f"{CALL_CLOSE} closes no {CALL_OPEN} block; write "
                      f'{CALL_OPEN}{{"name": ..., "arguments": {{...}}}}{CALL_CLOSE}')


class ToolEpisodes:
    """Multi-turn rows' environments and conversations (module docstring).

    `envs[i]` / `messages[i]`: row i's environment and its conversation so far (the prompt's
    messages, `Environment.reset`); `schemas`: the tools' schemas for the chat template's `tools=`
    argument (None where the prompt carries them itself, `turns.tools_system_prompt`); `prefix`:
    text that ended each prompt (data.response_prefix), the start of the row's first segment."""

    close = CALL_CLOSE  # the text that ends a segment

    def __init__(self, tokenizer, envs: list[Environment], messages: list[list[dict]], *, max_turns: int,
                 schemas: list[dict] | None = None, prefix: str = ""):
        if len(envs) != len(messages):
            raise ValueError(f"ToolEpisodes: {len(envs)} environments for {len(messages)} conversations")
        self.tokenizer, self.envs, self.max_turns, self.schemas, self.prefix = \
            tokenizer, envs, max_turns, schemas, prefix
        self.messages = [[dict(m) for m in msgs] for msgs in messages]
        self.counts = [{"turns": 1, "tool_calls": 0, "tool_errors": 0, "calls": {}} for _ in envs]

    def _content(self, row: int, ids: list[int], skip_special: bool) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=skip_special)
        return (self.prefix + text) if self.counts[row]["turns"] == 1 else text

    def answer(self, rows: list[int], segments: list[list[int]], rooms: list[int]) -> list[tuple[list[int] | None,
                                                                                                   bool]]:
        contents = [self._content(r, ids, False) for r, ids in zip(rows, segments)]
        owner, envs, calls = [], [], []
        for k, (r, text) in enumerate(zip(rows, contents)):
            found = parse_tool_calls(text, self.envs[r].tools) or [ToolCall(None, error=NO_BLOCK)]
            owner += [k] * len(found)
            envs += [self.envs[r]] * len(found)
            calls += found
        answers = run_steps(envs, calls)  # one batch for every paused row
        out = []
        for k, (r, text, room) in enumerate(zip(rows, contents, rooms)):
            mine = [(c, a) for c, a, o in zip(calls, answers, owner) if o == k]
            results = [a[0] for _, a in mine]
            ids = tool_turn_ids(self.tokenizer, self.messages[r], text, results, self.schemas)
            if len(ids) >= room:
                out.append((None, False))
                continue
            self.messages[r] += [{"role": "assistant", "content": text}] + [
                {"role": "tool", "content": result} for result in results]
            n = self.counts[r]
            n["turns"] += 1
            n["tool_calls"] += len(mine)
            for call, (result, _) in mine:
                n["tool_errors"] += int(call.error is not None or result.startswith("Error: "))
                name = call.name if call.error is None else "(refused)"
                n["calls"][name] = n["calls"].get(name, 0) + 1
            out.append((ids, any(done for _, (_, done) in mine)))
        return out

    def episode(self, row: int, last_segment: list[int]) -> dict:
        """Row `row`'s record (module docstring); `last_segment`: its tokens after its last tool turn."""
        messages = list(self.messages[row])
        if last_segment:
            messages.append({"role": "assistant", "content": self._content(row, last_segment, True)})
        return {**self.counts[row], "calls": dict(self.counts[row]["calls"]), "messages": messages}


EPISODE_COLUMNS = ("turns", "tool_calls", "tool_errors", "conversation")


def with_episodes(records: list[dict], episodes: list[dict] | None) -> list[dict]:
    """Each row's record with its episode as reward columns (rewards get every column as a
    keyword list): `turns`, `tool_calls`, `tool_errors` (ints) and `conversation` (the messages,
    tool turns included). Without episodes, the records themselves."""
    if episodes is None:
        return records
    return [{**rec, "turns": e["turns"], "tool_calls": e["tool_calls"], "tool_errors": e["tool_errors"],
             "conversation": e["messages"]} for rec, e in zip(records, episodes)]
