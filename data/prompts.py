"""The R1 prompt: the system prompt of DeepSeek-R1-Zero and the chat built around a problem.

The system prompt is the one of the R1 tutorial's "Prompt Template" section (after Table 1 of the
DeepSeek-R1 paper). The tutorial writes it as an indented triple-quoted string, so its copy
carries newlines, runs of indentation and a trailing newline into every prompt; here the same
words are joined with single spaces and nothing trails the last tag.
"""
from __future__ import annotations

from typing import Any

SYSTEM_PROMPT = (
    "A conversation between User and Assistant. The user asks a question, and the Assistant "
    "solves it. The assistant first thinks about the reasoning process in the mind and then "
    "provides the user with the answer. The reasoning process and answer are enclosed within "
    "<think> </think> and <answer> </answer> tags, respectively, i.e., "
    "<think> reasoning process here </think><answer> answer here </answer>"
)


def make_conversation(problem: str, system_prompt: str = SYSTEM_PROMPT) -> list[dict[str, str]]:
    """The prompt of one RL example: `[system, user]` chat messages.

    The policy continues this chat with `<think> ... </think><answer> ... </answer>`; the
    rewards read that continuation, never the prompt.
    """
    if not isinstance(problem, str) or not problem.strip():
        raise ValueError(f"make_conversation: problem must be a non-empty string, got {problem!r:.80}")
    if not isinstance(system_prompt, str):
        raise ValueError(f"make_conversation: system_prompt must be a string, got {system_prompt!r:.80}")
    return [
        {"role": "system", "content": system_prompt},
        {"role": "user", "content": problem},
    ]


def render_prompt(tokenizer: Any, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    """The prompt text the model sees: `messages` through the tokenizer's own chat template.

    With `add_generation_prompt=True` the text ends with the assistant header (for Qwen:
    `<|im_start|>assistant\\n`), so generation starts inside the assistant turn.
    """
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
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
