"""The R1 prompt: the system prompt of DeepSeek-R1-Zero and the chat built around a problem.

The system prompt is the one of the R1 tutorial's "Prompt Template" section (after Table 1 of the
DeepSeek-R1 paper). The tutorial writes it as an indented triple-quoted string, so its copy
carries newlines, runs of indentation and a trailing newline into every prompt; here the same
words are joined with single spaces and nothing trails the last tag.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>"
)


def resolve_system_prompt(value: str) -> str:
    """The system prompt an option gives: its text, or with `@path` the text of that file
    (stripped); "" for none. ValueError naming the file when it cannot be read."""
    if not value.startswith("@"):
        return value
    path = Path(value[1:]).expanduser()
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{value!r}: cannot read {path}: {getattr(e, 'strerror', None) or e}") from None


def make_conversation(problem: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The prompt of one RL example: `[system, user]` chat messages.

    The policy continues this chat with `<think> ... </think><answer> ... </answer>`; the
    rewards read that continuation, never the prompt. An empty `system_prompt` gives `[user]`.
    """
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"make_conversation: problem must be a non-empty string, got {problem!r:.80}")
    if not isinstance(system_prompt, str):
        raise ValueError(f"make_conversation: system_prompt must be a string, got {system_prompt!r:.80}")
    user = {"role": "user", "content": problem}
    return [{"role": "system", "content": system_prompt}, user] if system_prompt else [user]


# Set on a tokenizer (`model.load.load_tokenizer`) whose chat template has no system role.
MERGE_SYSTEM = "r1_merge_system_turn"


def merge_system_turn(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """[system, user, ...] -> [user, ...] with the system text and a blank line opening the user
    turn, as Gemma's own template does when it is given a system message; a lone system turn
    (a prefix SFT renders) is dropped: it has no user turn to join yet."""
    if not messages or messages[0].get("role") != "system":
        return messages
    system, rest = messages[0]["content"], messages[1:]
    if not rest or rest[0].get("role") != "user" or not system:
        return rest
    return [{**rest[0], "content": f"{system}\n\n{rest[0]['content']}"}, *rest[1:]]


def template_has_system_role(tokenizer: Any) -> bool:
    """Does the chat template render a system turn? False when it raises on one (Gemma: "System
    role not supported") or leaves its text out."""
    probe = "r1-system-probe"
    try:
        text = tokenizer.apply_chat_template([{"role": "system", "content": probe},
                                              {"role": "user", "content": "hi"}], tokenize=False)
    except Exception:  # jinja2's TemplateError, or whatever the template's raise_exception gives
        return False
    return probe in text


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True,
                  response_prefix: str = "", tools: list[dict] | None = None) -> str:
    """The prompt text the model sees: `messages` through the tokenizer's own chat template.

    With `add_generation_prompt=True` the text ends with the assistant header (for Qwen:
    `<|im_start|>assistant\\n`), so generation starts inside the assistant turn, and then with
    `response_prefix` (`--data.response_prefix`, e.g. `<think>`): text that opens the assistant's
    reply as if the model had written it, so that the model continues from there. A tokenizer
    marked `MERGE_SYSTEM` (its template has no system role) gets the system text merged into
    the first user turn (`merge_system_turn`). `tools`: the tools' schemas, for a template
    with a tools branch (rollout.tools; tools/turns.py `prompt_with_tools`).
    """
    if response_prefix and not add_generation_prompt:
        raise ValueError("render_prompt: a response_prefix opens the assistant's turn, so it needs "
                         "add_generation_prompt=True")
    # A base (non-Instruct) tokenizer has no template; transformers would then raise a message
    # about Jinja that does not say what to do, so this check says it first.
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(
            f"render_prompt: tokenizer {name!r} has no chat template (tokenizer.chat_template is "
            "empty); use an -Instruct tokenizer or set tokenizer.chat_template to a Jinja template "
            "such as Qwen's ChatML one"
        )
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"render_prompt: messages must be a non-empty list of dicts, got {messages!r:.80}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise ValueError(
                f"render_prompt: messages[{i}] must be a dict with string 'role' and 'content', "
                f"got {message!r:.80}"
            )
    if getattr(tokenizer, MERGE_SYSTEM, False):
        messages = merge_system_turn(messages)
        if not messages:
            return ""
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt, **({"tools": tools} if tools else {})
    ) + response_prefix


def tool_calls_text(content: str, tool_calls: list[dict]) -> str:
    """An assistant message's text with its `tool_calls` (OpenAI's layout, `{"function": {"name",
    "arguments"}}`) written out as `<tool_call>` blocks, byte for byte as Qwen2.5's template writes
    them after the content (one block a call, each after a newline; arguments as jinja's `tojson`,
    i.e. `json.dumps(..., ensure_ascii=False)`). This project's rollouts keep a call in the
    assistant's text, as the model wrote it (tools/calls.py reads it back); SFT data with
    `tool_calls` becomes that text too, so every template, with or without a tools branch (the
    tiny model's ChatML drops `tool_calls`), trains the tokens a rollout samples."""
    import json

    blocks = []
    for call in tool_calls:
        function = call.get("function", call)
        arguments = function["arguments"]
        if isinstance(arguments, str):  # OpenAI sends arguments as a JSON string
            arguments = json.loads(arguments)
        blocks.append('<tool_call>\n{"name": "' + function["name"] + '", "arguments": '
                      + json.dumps(arguments, ensure_ascii=False) + "}\n</tool_call>")
    return "\n".join(([content] if content else []) + blocks)


def calls_in_content(message: dict) -> dict:
    """`message` with its `tool_calls`, if any, moved into its content (`tool_calls_text`)."""
    if not message.get("tool_calls"):
        return message
    out = {k: v for k, v in message.items() if k != "tool_calls"}
    out["content"] = tool_calls_text(message.get("content") or "", message["tool_calls"])
    return out


def with_prefix(response_prefix: str, completions: list[str]) -> list[str]:
    """Completions as text, each after the response prefix that ended its prompt (`render_prompt`):
    the reply as the rewards, the samples and the evaluation read it, as if the model had written
    the prefix too."""
    return [response_prefix + c for c in completions] if response_prefix else list(completions)
