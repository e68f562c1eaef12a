"""A stage's tools: what GRPO's rollouts (rollout.tools) and an SFT stage's held-out evaluation
(sft.eval_tools) need to run multi-turn rows, set up once per rank.

`StageTools(names, tokenizer, ...)` loads the tools, starts this rank's worker pool and checks,
at start, that the chat template can write a tool turn after an assistant segment (a template
that rewrites the history once a tool turn follows fails here, not mid-run). Then:

    prompts(records)   the records with the tools' schemas in their prompts: through the chat
                       template's `tools=` argument where it has one (`template_schemas` is then
                       what the template gets, for the tool turns too), else in the system turn;
                       as they are with `schemas_in_prompt` false (a model SFT-taught its calls)
    episodes(records)  a `ToolEpisodes` for rows of `records`, one environment each, the engine's
                       `generate(..., turns=...)` argument
"""
from __future__ import annotations

from r1train.data.prompts import MERGE_SYSTEM, merge_system_turn
from r1train.run.config import ConfigError
from r1train.tools.environment import ToolEnvironment
from r1train.tools.episodes import ToolEpisodes
from r1train.tools.pool import ToolPool
from r1train.tools.registry import ToolSpecError, load_tools
from r1train.tools.turns import ToolTemplateError, prompt_with_tools, tool_turn_text


def as_rendered(messages: list[dict], tokenizer) -> list[dict]:
    """A prompt's messages as `render_prompt` gives them to the template (a system turn merged
    into the user turn where the template has no system role)."""
    return merge_system_turn(messages) if getattr(tokenizer, MERGE_SYSTEM, False) else messages


class StageTools:
    """The tools of one stage on one rank (module docstring). `option`: the option that named
    them (--rollout.tools, --sft.eval_tools), for errors; `model_path`: the model whose chat
    template is checked; `prefix`: the text that ends each prompt (data.response_prefix);
    `sample`: a prompt's messages to check the template with (a one-line user turn if None)."""

    def __init__(self, names: list[str], tokenizer, *, max_turns: int, timeout_s: float, workers: int,
                 schemas_in_prompt: bool, prefix: str, option: str, model_path: str,
                 sample: list[dict] | None = None):
        try:
            self.tools = load_tools(names)
        except ToolSpecError as e:
            raise ConfigError(f"{option}: {e}") from None
        self.tokenizer, self.max_turns, self.prefix = tokenizer, max_turns, prefix
        self.schemas_in_prompt = schemas_in_prompt
        self.schemas = [t.schema for t in self.tools.values()]
        self.template_schemas = None  # what the template's tools= argument gets (None: not used)
        if schemas_in_prompt:
            self.template_schemas = prompt_with_tools(tokenizer, [{"role": "user", "content": "?"}], self.schemas)[1]
        first = self.prompts([{"prompt": sample or [{"role": "user", "content": "?"}]}])[0]["prompt"]
        try:
            tool_turn_text(tokenizer, as_rendered(first, tokenizer),
                           prefix + "<tool_call>\n{}\n</tool_call>", ["?"], self.template_schemas)
        except ToolTemplateError as e:
            raise ConfigError(f"{option}: the chat template of --model.path={model_path!r}: {e}") from None
        self.pool = ToolPool(self.tools, n_workers=workers, timeout_s=timeout_s)

    @property
    def names(self) -> list[str]:
        return list(self.tools)

    def describe(self) -> str:
        """The start-up line: the tools, where their schemas are, the turns."""
        where = "not in the prompts" if not self.schemas_in_prompt else \
            f"in the {'template' if self.template_schemas else 'system prompt'}"
        return f"{', '.join(self.tools)} (schemas {where}), at most {self.max_turns} turns"

    def prompts(self, records: list[dict]) -> list[dict]:
        if not self.schemas_in_prompt:
            return records
        return [{**rec, "prompt": prompt_with_tools(self.tokenizer, rec["prompt"], self.schemas)[0]} for rec in records]

    def episodes(self, records: list[dict]) -> ToolEpisodes:
        envs = [ToolEnvironment(self.tools, self.pool) for _ in records]
        messages = [as_rendered(env.reset(rec), self.tokenizer) for env, rec in zip(envs, records)]
        return ToolEpisodes(self.tokenizer, envs, messages, max_turns=self.max_turns,
                            schemas=self.template_schemas, prefix=self.prefix)
