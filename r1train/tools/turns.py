"""The text a multi-turn row gets between two of its assistant segments, as the chat template writes it.

A row stops after `</tool_call>`; the environment answers; the row goes on. What is inserted
between the model's two segments is whatever the chat template writes there: the end of the
assistant turn, the tool turn(s), and the header of the next assistant turn. For Qwen2.5's
template after a call to the calculator:

    <|im_end|>\\n<|im_start|>user\\n<tool_response>\\n408\\n</tool_response><|im_end|>\\n<|im_start|>assistant\\n

`tool_turn_text` finds it without knowing the template: it renders the conversation with the
segment as the assistant's content, once without the tool messages (no generation prompt) and
once with them (with the generation prompt), and takes the end of the assistant turn from the
first and the difference of the two. A template that renders the earlier conversation
differently once a tool message follows is refused: the row's tokens would not be the template's.

Templates without a tools branch (the embedded tiny model's ChatML) ignore `tools=`:
`template_takes_tools` says so, and `prompt_with_tools` then writes the schemas into the system
turn in Qwen2.5's words (`tools_system_prompt`).
"""
from __future__ import annotations


class ToolTemplateError(ValueError):
    """A chat template whose rendering of a tool turn cannot be appended to a row."""


def render(tokenizer, messages: list[dict], tools: list[dict] | None = None,
           add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def template_takes_tools(tokenizer, tools: list[dict]) -> bool:
    """Whether the chat template writes the tools' schemas into the prompt."""
    messages = [{"role": "user", "content": "?"}]
    return render(tokenizer, messages, tools, True) != render(tokenizer, messages, None, True)


def tool_turn_text(tokenizer, messages: list[dict], segment: str, results: list[str],
                   tools: list[dict] | None = None) -> str:
    """The text after the assistant's `segment` (which ended in tool calls) up to where the
    model writes again, with one tool message per result (module docstring)."""
    assistant = {"role": "assistant", "content": segment}
    before = render(tokenizer, messages + [assistant], tools)
    after = render(tokenizer, messages + [assistant] + [{"role": "tool", "content": r} for r in results],
                   tools, add_generation_prompt=True)
    at = before.rfind(segment)
    if at < 0 or not segment:
        raise ToolTemplateError("the chat template does not write the assistant's text as it is "
                                "(it strips or rewrites it): the row's tokens would differ from the template's")
    if not after.startswith(before):
        raise ToolTemplateError("the chat template renders the conversation before a tool turn differently once "
                                "the tool turn is added: it cannot be appended to a row")
    return before[at + len(segment):] + after[len(before):]


def tool_turn_ids(tokenizer, messages: list[dict], segment: str, results: list[str],
                  tools: list[dict] | None = None) -> list[int]:
    """`tool_turn_text` as token ids (special tokens as the text names them, no BOS added)."""
    return tokenizer.encode(tool_turn_text(tokenizer, messages, segment, results, tools), add_special_tokens=False)


def tools_system_prompt(schemas: list[dict]) -> str:
    """The tools' description for a template without a tools branch: the text Qwen2.5's template
    writes into the system turn (Hermes layout: one JSON schema a line inside <tools></tools>,
    then how to call), so a model sees its tools the same way under either template."""
    import json

    lines = "\n".join(json.dumps(s, ensure_ascii=False) for s in schemas)
    return ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n"
            f"<tools>\n{lines}\n</tools>\n\n"
            "For each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n"
            '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>')


def prompt_with_tools(tokenizer, messages: list[dict], schemas: list[dict]) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools= argument) of a prompt whose model may call `schemas`' tools: the
    template's own tools branch where it has one (messages unchanged), else the messages with
    `tools_system_prompt` after the system turn's text (a system turn added where there is none)."""
    if template_takes_tools(tokenizer, schemas):
        return [dict(m) for m in messages], schemas
    text = tools_system_prompt(schemas)
    if messages and messages[0].get("role") == "system":
        first = dict(messages[0])
        first["content"] = (first["content"] + "\n\n" + text) if first["content"] else text
        return [first] + [dict(m) for m in messages[1:]], None
    return [{"role": "system", "content": text}] + [dict(m) for m in messages], None
