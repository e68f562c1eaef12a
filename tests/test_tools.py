"""Tests of r1train/tools/: schemas, the chat templates' rendering of tools, hostile tool calls,
the worker pool's bounds, the calculator and the python sandbox (issue 33, the tool layer).

Expected values are written out by hand (schemas, rendered templates) or computed by an
independent oracle (the calculator against Python's own arithmetic on random expressions;
schemas against transformers' `get_json_schema` where the two conventions agree). The hostile
cases run with low limits (1-2 s timeouts, 256 MB, 8 processes), so that a broken bound fails
the test quickly instead of hurting the machine.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal, Optional

import pytest

from r1train.tools import (
    GuessingGame,
    ToolCall,
    ToolEnvironment,
    ToolPool,
    ToolSpecError,
    json_schema,
    load_tool,
    load_tools,
    parse_tool_calls,
    python_sandbox,
    run_steps,
)
from r1train.tools.calculator import MAX_BITS, CalculatorError, calculator, evaluate
from r1train.tools.python_sandbox import Limits, PythonSandbox, report_text, run_code
from r1train.tools.sandbox_supervisor import landlock_abi

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "assets" / "tiny-r1-sft"
LOW = Limits(timeout_s=2.0, cpu_s=1, memory_mb=256, max_file_mb=1, max_processes=8, max_output_chars=400)


# ---------------------------------------------------------------------------------------------
# Schemas
# ---------------------------------------------------------------------------------------------

def lookup(query: str, limit: int, scale: float, exact: bool, tags: list[str], lang: Literal["en", "de"],
           note: Optional[str] = None) -> str:
    """Search the notes for a query.

    Longer text after the first paragraph is not the description.

    Args:
        query: What to look for.
        limit: How many notes at most,
            counted after the filter.
        scale (float): A weight.
        exact: Whole words only.
        tags: Tags to keep.
        lang: The language.
        note: An optional note.

    Returns:
        The notes, one a line.
    """
    return query


def test_schema_from_signature_and_docstring():
    # Written by hand from the function above: hints -> JSON types, the first paragraph, Args: lines
    # (the continuation line joined), required = the arguments without a default.
    assert json_schema(lookup) == {"type": "function", "function": {
        "name": "lookup", "description": "Search the notes for a query.",
        "parameters": {"type": "object", "properties": {
            "query": {"type": "string", "description": "What to look for."},
            "limit": {"type": "integer", "description": "How many notes at most, counted after the filter."},
            "scale": {"type": "number", "description": "A weight."},
            "exact": {"type": "boolean", "description": "Whole words only."},
            "tags": {"type": "array", "items": {"type": "string"}, "description": "Tags to keep."},
            "lang": {"type": "string", "enum": ["en", "de"], "description": "The language."},
            "note": {"type": ["string", "null"], "description": "An optional note."}},
            "required": ["query", "limit", "scale", "exact", "tags", "lang"]}}}


def area(width: float, height: float, unit: str = "m") -> str:
    """Area of a rectangle.

    Args:
        width: The width.
        height: The height.
        unit: The unit.
    """
    return f"{width * height} {unit}^2"


def test_schema_agrees_with_transformers_get_json_schema():
    # An independent implementation of the same convention (Hugging Face's, for chat templates).
    from transformers.utils import get_json_schema
    expected = get_json_schema(area)
    assert expected["function"].pop("return") == {"type": "string"}  # the result's type: no template shows it
    assert json_schema(area) == expected


def test_builtin_schemas_and_user_tools(tmp_path):
    tools = load_tools("calculator,python")
    assert list(tools) == ["calculator", "python"]
    assert tools["calculator"].parameters == {"type": "object", "required": ["expression"], "properties": {
        "expression": {"type": "string", "description": 'The expression, e.g. "(1234 * 5678) - 9 ** 3".'}}}
    assert tools["python"].parameters["properties"]["code"]["type"] == "string"
    f = tmp_path / "my_tools.py"
    f.write_text('def shout(text: str) -> str:\n    """Upper-case a text."""\n    return text.upper()\n')
    tool = load_tool(f"{f}:shout")
    assert tool.name == "shout" and tool.fn("ab") == "AB" and tool.source == f"{f}:shout"
    assert load_tool(f"loud={f}:shout").name == "loud"
    assert load_tool("r1train.tools.calculator:calculator").fn("2*3") == "6"  # module:fn
    assert load_tool(area).source == f"{__name__}:area"  # a callable: the name workers load it by


@pytest.mark.parametrize("entry, why", [
    ("calculater", "unknown tool 'calculater'; built-in tools: calculator, python"),
    ("no/such/file.py:fn", "no such file no/such/file.py"),
    ("no_such_module_xyz:fn", "no module named 'no_such_module_xyz'"),
    ("r1train.tools.calculator:missing", "has no attribute 'missing'"),
    ("r1train.tools.calculator:MAX_BITS", "is a int, not a function"),
    (":fn", "expected a built-in name"),
    ("1bad=r1train.tools.calculator:calculator", "tool name '1bad'"),
])
def test_bad_tool_entries_are_refused_naming_the_option(entry, why):
    with pytest.raises(ToolSpecError) as e:
        load_tool(entry)
    assert str(e.value).startswith(f"--rollout.tools={entry!r}: ") and why in str(e.value)


def no_doc(x: int) -> str:
    return str(x)


def no_hint(x) -> str:
    """Doc."""
    return str(x)


def star(*xs: int) -> str:
    """Doc."""
    return str(xs)


def test_functions_without_what_the_schema_needs_are_refused():
    for fn, why in ((no_doc, "has no docstring"), (no_hint, "argument 'x' has no type hint"),
                    (star, "argument 'xs' is variadic positional")):
        with pytest.raises(ToolSpecError, match=why):
            load_tool(fn)
    with pytest.raises(ToolSpecError, match="must be a function of an importable module"):
        load_tool(lambda x: x)
    with pytest.raises(ToolSpecError, match="names tool 'calculator' twice"):
        load_tools(["calculator", "calculator"])


# ---------------------------------------------------------------------------------------------
# The chat templates
# ---------------------------------------------------------------------------------------------

# Qwen2.5-Instruct's tool layout, reduced to what these tests render: the tools as JSON lines in
# <tools></tools> in the system turn, assistant tool calls as <tool_call> blocks, tool results
# as <tool_response> blocks inside one user turn per run of tool messages.
QWEN_TOOLS_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls or [] %}{%- set tool_call = tool_call.function %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_tools_in_the_prompt_of_a_qwen_template_and_not_of_the_tiny_models():
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    tools = load_tools("calculator")
    schemas = [t.schema for t in tools.values()]
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "12*34?"}]
    # The tiny model's own template is ChatML without a tools branch: the tools are silently left
    # out (a multi-turn rollout with it has to put them into the system prompt itself).
    plain = tokenizer.apply_chat_template(messages, tools=schemas, tokenize=False, add_generation_prompt=True)
    assert "calculator" not in plain and plain == tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True)
    tokenizer.chat_template = QWEN_TOOLS_TEMPLATE
    text = tokenizer.apply_chat_template(messages, tools=schemas, tokenize=False, add_generation_prompt=True)
    schema_line = json.dumps(schemas[0], ensure_ascii=False)  # jinja's tojson: the same JSON text
    assert text == ("<|im_start|>system\nBe brief.\n\n# Tools\n\nYou may call one or more functions to assist with "
                    "the user query.\n\nYou are provided with function signatures within <tools></tools> XML "
                    f"tags:\n<tools>\n{schema_line}\n</tools>\n\nFor each function call, return a json object with "
                    "function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
                    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
                    "<|im_start|>user\n12*34?<|im_end|>\n<|im_start|>assistant\n")
    # A whole turn: the call the model wrote, read back, re-rendered as the template writes it.
    completion = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12*34"}}\n</tool_call>'
    (call,) = parse_tool_calls(completion, tools)
    turn = messages + [{"role": "assistant", "content": "", "tool_calls": [call.message()]},
                       {"role": "tool", "content": calculator(**call.arguments)}]
    text = tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n" + completion + "<|im_end|>\n<|im_start|>user\n<tool_response>\n"
                         "408\n</tool_response><|im_end|>\n<|im_start|>assistant\n")


# ---------------------------------------------------------------------------------------------
# Hostile model output
# ---------------------------------------------------------------------------------------------

def block(body: str) -> str:
    return f"<tool_call>\n{body}\n</tool_call>"


def typed(a: int, b: float, flag: bool, items: list[int], mode: Literal["x", "y"] = "x") -> str:
    """A tool with typed arguments."""
    return "ok"


@pytest.mark.parametrize("body, why", [
    ('{"name": "calculator", "arguments": {"expression": "1+1"', "is not valid JSON"),
    ("[" * 40_000 + "]" * 40_000, "is not valid JSON (RecursionError"),
    ("[" * 60_000 + "]" * 60_000, "tool call of 120000 characters (at most 100000)"),
    ('"calculator"', "a tool call is a JSON object"),
    ('{"arguments": {"expression": "1"}}', 'has no "name"'),
    ('{"name": 7, "arguments": {}}', 'has no "name"'),
    ('{"name": "rm_rf", "arguments": {}}', "unknown tool 'rm_rf'; the tools are: calculator, typed"),
    ('{"name": "calculator", "arguments": "1+1"}', "arguments must be a JSON object, got str"),
    ('{"name": "calculator", "arguments": null}', "arguments must be a JSON object, got null"),
    ('{"name": "calculator", "arguments": {}}', "missing argument 'expression'"),
    ('{"name": "calculator", "arguments": {"expression": "1", "x": 1}}', "unknown argument 'x'"),
    ('{"name": "calculator", "arguments": {"expression": 12}}', "argument 'expression' must be string, got 12"),
    ('{"name": "typed", "arguments": {"a": true, "b": 1, "flag": true, "items": []}}', "'a' must be integer"),
    ('{"name": "typed", "arguments": {"a": 1.5, "b": 1, "flag": true, "items": []}}', "'a' must be integer"),
    ('{"name": "typed", "arguments": {"a": 1, "b": NaN, "flag": true, "items": []}}', "'b' must be number"),
    ('{"name": "typed", "arguments": {"a": 1, "b": 1, "flag": 1, "items": []}}', "'flag' must be boolean"),
    ('{"name": "typed", "arguments": {"a": 1, "b": 1, "flag": true, "items": [1, "2"]}}', "'items'[1] must be integer"),
    ('{"name": "typed", "arguments": {"a": 1, "b": 1, "flag": true, "items": [], "mode": "z"}}', "one of"),
])
def test_hostile_calls_become_error_text(body, why):
    tools = {**load_tools("calculator"), **load_tools([typed])}
    (call,) = parse_tool_calls("I will call it. " + block(body) + " done", tools)
    assert call.error is not None and call.error.startswith("Error: ") and why in call.error, call.error


def test_well_formed_calls_are_read_in_order():
    tools = {**load_tools("calculator"), **load_tools([typed])}
    text = (block('{"name": "typed", "arguments": {"a": 1, "b": 2, "flag": false, "items": [3], "mode": "y"}}')
            + " then " + block('{"name": "calculator", "arguments": {"expression": "2"}}') + " <tool_call>{unclosed")
    calls = parse_tool_calls(text, tools)
    assert [(c.name, c.arguments, c.error) for c in calls] == [
        ("typed", {"a": 1, "b": 2, "flag": False, "items": [3], "mode": "y"}, None),
        ("calculator", {"expression": "2"}, None)]
    assert parse_tool_calls("no calls here </tool_call>", tools) == []
    many = parse_tool_calls(block('{"name": "calculator", "arguments": {"expression": "1"}}') * 20, tools)
    assert len(many) == 17 and many[-1].error.startswith("Error: more than 16 tool calls")


def test_random_garbage_between_the_tags_never_raises():
    rng = random.Random(0)
    alphabet = list('{}[]":,\\ 0123456789.eE-+truefalsnameargumentscalculator\n\x00\u00e9')
    tools = load_tools("calculator")
    for _ in range(2000):
        body = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        calls = parse_tool_calls(block(body), tools)
        assert len(calls) == 1 and (calls[0].error is None) == (calls[0].name == "calculator")


# ---------------------------------------------------------------------------------------------
# The worker pool: tools that raise, hang, flood, return non-text or die
# ---------------------------------------------------------------------------------------------

HOSTILE_TOOLS = '''
import os, time

def fine(x: int) -> str:
    """Echo."""
    return f"got {x}"

def raises(x: int) -> str:
    """Raise."""
    raise KeyError(f"no key {x}")

def hangs(x: int) -> str:
    """Hang."""
    while True:
        time.sleep(0.01)

def prints(x: int) -> str:
    """Print 100 MB."""
    print("p" * 100_000_000)
    os.write(1, b"q" * 10_000_000)
    return "printed"

def big(x: int) -> str:
    """Return 100 MB."""
    return "b" * 100_000_000

def not_text(x: int) -> str:
    """Return a list."""
    return [x]

def dies(x: int) -> str:
    """Exit the process."""
    os._exit(3)

def exits(x: int) -> str:
    """sys.exit."""
    raise SystemExit(2)
'''


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    path = tmp_path_factory.mktemp("tools") / "hostile_tools.py"
    path.write_text(HOSTILE_TOOLS)
    names = ["fine", "raises", "hangs", "prints", "big", "not_text", "dies", "exits"]
    tools = load_tools([f"{path}:{n}" for n in names])
    with ToolPool(tools, n_workers=2, timeout_s=1.5, max_result_chars=300, memory_limit_mb=1024) as pool:
        yield tools, pool


def run_one(pool, name, x=1):
    (result,) = pool.run([ToolCall(name, {"x": x})])
    return result


def test_a_tool_that_raises_or_exits_is_an_error_with_the_exception(hostile):
    _, pool = hostile
    r = run_one(pool, "raises", 7)
    assert r.error and r.text == "Error: raises: KeyError: 'no key 7'"
    assert run_one(pool, "exits").text == "Error: exits: SystemExit: 2"
    assert run_one(pool, "fine", 5).text == "got 5"  # the same worker goes on


def test_a_tool_that_hangs_is_stopped_at_its_timeout_and_the_pool_goes_on(hostile, capfd):
    _, pool = hostile
    restarts = pool.events["restarts"]
    t = time.monotonic()
    results = pool.run([ToolCall("hangs", {"x": 1}), ToolCall("hangs", {"x": 2}), ToolCall("fine", {"x": 3})])
    elapsed = time.monotonic() - t
    # two workers: both hanging calls run at once, the third call waits for a fresh worker
    assert [r.text for r in results[:2]] == ["Error: hangs timed out after 1.5 s"] * 2
    assert results[2].text == "got 3" and not results[2].error
    assert 1.5 <= elapsed < 8.0, elapsed  # stopped at the timeout, not left to hang (loose: slow CI machines)
    assert pool.events["restarts"] == restarts + 2


def test_a_tool_that_dies_is_an_error_and_its_worker_is_replaced(hostile):
    _, pool = hostile
    r = run_one(pool, "dies")
    assert r.error and r.text == "Error: dies crashed (its process exited with code 3)"
    assert run_one(pool, "fine", 9).text == "got 9"


def test_floods_and_non_text_results(hostile, capfd):
    _, pool = hostile
    t = time.monotonic()
    assert run_one(pool, "prints").text == "printed"  # what a tool prints is not its result ...
    out, err = capfd.readouterr()
    assert len(out) + len(err) < 1000  # ... and does not reach the trainer's output
    big = run_one(pool, "big").text
    kept = len(big) - len(big.lstrip("b"))
    assert big == "b" * kept + f"\n[... {100_000_000 - kept} characters cut]" and 250 < kept and len(big) <= 300
    assert run_one(pool, "not_text").text == "Error: not_text returned a list, not a str"
    assert time.monotonic() - t < 10.0


# ---------------------------------------------------------------------------------------------
# The calculator
# ---------------------------------------------------------------------------------------------

def random_expression(rng: random.Random, depth: int) -> str:
    if depth == 0 or rng.random() < 0.3:
        value = rng.choice([rng.randint(0, 9999), rng.randint(0, 99), round(rng.uniform(0, 100), 2)])
        return str(value)
    op = rng.choice(["+", "-", "*", "/", "//", "%", "**", "neg", "()"])
    if op == "neg":
        return f"-{random_expression(rng, depth - 1)}"
    if op == "()":
        return f"({random_expression(rng, depth - 1)})"
    if op == "**":  # small exponents, so that Python's own answer is cheap to get
        return f"({random_expression(rng, depth - 1)}) ** {rng.randint(0, 4)}"
    return f"{random_expression(rng, depth - 1)} {op} {random_expression(rng, depth - 1)}"


def test_calculator_equals_python_on_random_expressions():
    rng = random.Random(0)
    compared = refused = 0
    for _ in range(3000):
        expr = random_expression(rng, 4)
        try:
            expected = eval(compile(expr, "<test>", "eval"), {"__builtins__": {}})  # the oracle: Python itself
        except (ZeroDivisionError, OverflowError):
            with pytest.raises(CalculatorError):
                evaluate(expr)
            refused += 1
            continue
        if isinstance(expected, complex) or (isinstance(expected, int) and expected.bit_length() > MAX_BITS):
            continue
        got = evaluate(expr)
        assert type(got) is type(expected) and (got == expected or (got != got and expected != expected)), expr
        assert calculator(expr) == (repr(expected) if isinstance(expected, float) else str(expected))
        compared += 1
    assert compared > 2000 and refused > 10


@pytest.mark.parametrize("expr", ["9**9**9", "2**100000", "10**5000", "(-3)**99999999999", "7**7**7**7"])
def test_calculator_refuses_huge_powers_at_once(expr):
    t = time.monotonic()
    with pytest.raises(CalculatorError, match="more than 4096 bits"):
        evaluate(expr)
    assert time.monotonic() - t < 0.5  # refused before computing: 9**9**9 would take hours


@pytest.mark.parametrize("expr, why", [
    ("__import__('os').system('true')", "found Call"), ("x + 1", "found Name"), ("'a' * 3", "a str constant"),
    ("(1).real", "found Attribute"), ("1 if 1 else 2", "found IfExp"), ("1 < 2", "found Compare"),
    ("1 << 5", "found BinOp"), ("[1][0]", "found Subscript"), ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"), ("1e308 * 10", "not a finite number"), ("10.0 ** 400", "too large"),
    ("(-8) ** 0.5", "not a real number"), ("0 ** -1", "negative power"), ("1 +", "cannot parse"),
    ("(" * 400 + "1" + ")" * 400, "cannot parse"), ("1" * 1001, "more than 1000 characters"),
    ("2 ** 4000 * 2 ** 4000", "intermediate result"),
])
def test_calculator_refuses_what_is_not_arithmetic(expr, why):
    with pytest.raises(CalculatorError, match=why.replace("(", r"\(")):
        evaluate(expr)


def test_calculator_exact_values():
    assert calculator("(1234 * 5678) - 9 ** 3") == "7005923"  # 7006652 - 729
    assert calculator("7 / 2") == "3.5" and calculator("-7 // 2") == "-4" and calculator("-7 % 3") == "2"
    assert calculator("2 ** -1") == "0.5" and calculator("-(2) ** 2") == "-4"
    assert calculator("2 ** 4095") == str(2 ** 4095)


# ---------------------------------------------------------------------------------------------
# The python sandbox
# ---------------------------------------------------------------------------------------------

def left_behind() -> list[str]:
    """Command lines of live processes that run a sandbox's main.py."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "r1-python-" in cmd and "main.py" in cmd:
            out.append(cmd)
    return out


def test_python_runs_code_and_reports_errors():
    python = PythonSandbox(LOW)
    assert python("print(sum(i * i for i in range(10)))") == "285"
    assert python("raise ValueError('boom')").endswith('File "main.py", line 1, in <module>\n'
                                                       "    raise ValueError('boom')\nValueError: boom\n[exit code 1]")
    assert python("x = 1") == "(no output: print what you want to see)"
    assert python("import os; print(os.listdir('.'), os.getcwd().endswith('/work'))") == "[] True"


def test_python_loops_forever_sleeps_forever():
    # 1 s of CPU within a 6 s wall limit: the CPU limit ends it even on a loaded machine
    limits = Limits(**{**LOW.__dict__, "timeout_s": 6.0})
    report = run_code("while True: pass", limits)
    assert report["signal"] in ("SIGXCPU", "SIGKILL") and not report["timed_out"]
    assert report_text(report, limits) in (
        "Error: the code used more than 1 s of CPU time and was stopped",
        "Error: the code was killed (SIGKILL: past 1 s of CPU time, or out of memory)")
    t = time.monotonic()
    text = PythonSandbox(LOW)("import time\nprint('start', flush=True)\nwhile True: time.sleep(0.05)")
    assert text == "start\nError: the code ran longer than 2 s and was stopped"
    assert 2.0 <= time.monotonic() - t < 6.0  # stopped at its 2 s, not left to loop
    assert left_behind() == []


def test_python_allocating_10_gb_gets_a_memory_error():
    text = PythonSandbox(LOW)("x = bytearray(10 * 2**30)")
    assert text.endswith("MemoryError\n[exit code 1]")


def test_python_output_is_cut():
    t = time.monotonic()
    text = PythonSandbox(LOW)("import sys\nsys.stdout.write('a' * 100_000_000)\nprint('END')")
    assert text.startswith("a" * 300) and "[... 99999604 bytes cut ...]" in text and text.endswith("aEND")
    assert time.monotonic() - t < 10.0


FORK_LOOP = """
import os, time
for i in range(200):  # bounded: the test cannot run away even if the sandbox's bound fails
    if os.fork() == 0:
        if i % 2:
            os.setsid()  # leaves the session: a process-group kill would miss it
        time.sleep(30)
        os._exit(0)
print("all forked")
time.sleep(30)
"""


def test_python_forking_repeatedly_is_stopped_and_nothing_is_left():
    t = time.monotonic()
    report = run_code(FORK_LOOP, LOW)
    assert report["processes_exceeded"] and not report["timed_out"]
    assert time.monotonic() - t < 10.0  # its children sleep 30 s: stopped, not waited for
    # Root is exempt from RLIMIT_NPROC: then the count is checked every 20 ms and may overshoot.
    assert report["processes_peak"] > LOW.max_processes and (os.geteuid() != 0 or report["processes_peak"] < 200)
    assert "all forked" not in report["output"]
    assert left_behind() == []


def test_python_writes_in_its_folder_are_removed_and_files_are_bounded(tmp_path):
    code = ("open('inside.txt', 'w').write('x' * 100)\nimport os\n"
            "try:\n    open('big.bin', 'wb').write(b'x' * (2 << 20))\nexcept OSError as e:\n    print(e.strerror)\n")
    assert PythonSandbox(LOW)(code) == "File too large"  # RLIMIT_FSIZE at 1 MB
    assert not [p for p in Path("/tmp").glob("r1-python-*")]


@pytest.mark.skipif(not landlock_abi(), reason="this kernel has no Landlock: the python tool runs unfenced")
def test_the_python_sandbox_fences_the_files_and_tcp(tmp_path):
    """With Landlock the code reads no run folder, writes nothing outside its own folder (root
    too: the test suite runs as root in CI), connects no TCP socket, and still runs Python and
    its standard library."""
    secret = tmp_path / "run" / "config.yaml"
    secret.parent.mkdir()
    secret.write_text("api_key: hunter2")
    outside = tmp_path / "outside.txt"
    code = (f"import json, os, socket\n"
            f"for what, act in (('read', lambda: open({str(secret)!r}).read()),\n"
            f"                  ('write', lambda: open({str(outside)!r}, 'w').write('written')),\n"
            f"                  ('list', lambda: os.listdir({str(tmp_path)!r})),\n"
            f"                  ('tcp', lambda: socket.create_connection(('127.0.0.1', 9), timeout=1))):\n"
            f"    try:\n        act()\n        print(what, 'allowed')\n"
            f"    except OSError as e:\n        print(what, type(e).__name__)\n"
            f"open('mine.txt', 'w').write('x')\nprint(json.dumps(open('mine.txt').read()))\n")
    report = run_code(code, LOW)
    assert report["fenced"] is True
    lines = report["output"].splitlines()
    assert lines[:3] == ["read PermissionError", "write PermissionError", "list PermissionError"]
    assert lines[3] == ("tcp PermissionError" if landlock_abi() >= 4 else lines[3]) and lines[4] == '"x"'
    assert not outside.exists()


def test_what_the_python_sandbox_does_not_isolate_without_landlock(tmp_path, monkeypatch):
    """Documented in python_sandbox.py: without Landlock the code runs as the trainer's user,
    reads the run folder and writes outside its own folder. The supervisor is run here with
    Landlock reported absent, to keep that sentence honest on kernels that have it."""
    secret = tmp_path / "run" / "config.yaml"
    secret.parent.mkdir()
    secret.write_text("api_key: hunter2")
    outside = tmp_path / "outside.txt"
    code = f"print(open({str(secret)!r}).read())\nopen({str(outside)!r}, 'w').write('written')"
    supervisor = Path(python_sandbox.__file__).with_name("sandbox_supervisor.py")
    run = ("import runpy, sys; sys.argv = sys.argv[1:]; g = runpy.run_path(sys.argv[0], run_name='sup');"
           "g['landlock_abi'].__globals__['landlock_abi'] = lambda: 0; g['main']()")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", run, str(supervisor),
                           json.dumps(dataclasses.asdict(LOW))], input=code.encode(), capture_output=True,
                          timeout=60)
    report = json.loads(proc.stdout)
    assert report["fenced"] is False and report["output"].strip() == "api_key: hunter2"
    assert outside.read_text() == "written"


# ---------------------------------------------------------------------------------------------
# Environments
# ---------------------------------------------------------------------------------------------

def test_guessing_game_by_binary_search():
    env = GuessingGame(high=100)
    messages = env.reset({"secret": 37})
    assert messages[0]["role"] == "user" and env.schemas()[0]["function"]["name"] == "guess"
    low, high, done, turns = 1, 100, False, 0
    while not done:
        guess = (low + high) // 2
        (call,) = parse_tool_calls(block(json.dumps({"name": "guess", "arguments": {"number": guess}})), env.tools)
        ((text, done),) = run_steps([env], [call])
        low, high = (guess + 1, high) if text == "Higher." else (low, guess - 1) if text == "Lower." else (low, high)
        turns += 1
    assert text == f"Correct: 37 found in {turns} guesses." and turns <= 7
    (bad,) = parse_tool_calls(block('{"name": "guess", "arguments": {"number": "37"}}'), env.tools)
    assert run_steps([env], [bad]) == [("Error: guess: argument 'number' must be integer, got \"37\"", False)]


def test_tool_environment_runs_the_calls_of_many_rows_in_one_batch():
    tools = load_tools("calculator")
    with ToolPool(tools, n_workers=2, timeout_s=5) as pool:
        envs = [ToolEnvironment(tools, pool) for _ in range(3)]
        assert envs[0].reset({"prompt": [{"role": "user", "content": "q"}]}) == [{"role": "user", "content": "q"}]
        calls = [parse_tool_calls(block(json.dumps({"name": "calculator", "arguments": {"expression": e}})),
                                  tools)[0] for e in ("2*3", "1/0", "bad(")]
        assert run_steps(envs, calls) == [
            ("6", False), ("Error: calculator: CalculatorError: division by zero", False),
            ("Error: calculator: CalculatorError: cannot parse the expression: SyntaxError", False)]


# ---------------------------------------------------------------------------------------------
# The inserted tool turn
# ---------------------------------------------------------------------------------------------

def test_the_inserted_tool_turn_is_the_templates_rendering():
    from transformers import AutoTokenizer

    from r1train.tools.turns import ToolTemplateError, template_takes_tools, tool_turn_ids, tool_turn_text
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    schemas = [t.schema for t in load_tools("calculator").values()]
    assert not template_takes_tools(tokenizer, schemas)  # the tiny model's ChatML has no tools branch
    tokenizer.chat_template = QWEN_TOOLS_TEMPLATE
    assert template_takes_tools(tokenizer, schemas)
    messages = [{"role": "user", "content": "12*34 and 5+6?"}]
    segment = ("<think>two products</think>" + block('{"name": "calculator", "arguments": {"expression": "12*34"}}')
               + block('{"name": "calculator", "arguments": {"expression": "5+6"}}'))
    # Written by hand from Qwen2.5's layout: the assistant turn closes, one user turn holds both
    # responses, and the next assistant turn opens.
    expected = ("<|im_end|>\n<|im_start|>user\n<tool_response>\n408\n</tool_response>\n<tool_response>\n11\n"
                "</tool_response><|im_end|>\n<|im_start|>assistant\n")
    assert tool_turn_text(tokenizer, messages, segment, ["408", "11"], schemas) == expected
    # As tokens: the prompt, the model's segment and the inserted turn, each tokenized alone, are
    # the tokens of the whole conversation rendered at once (no merge across the boundaries).
    prompt = tokenizer.apply_chat_template(messages, tools=schemas, tokenize=False, add_generation_prompt=True)
    ids = (tokenizer.encode(prompt, add_special_tokens=False) + tokenizer.encode(segment, add_special_tokens=False)
           + tool_turn_ids(tokenizer, messages, segment, ["408", "11"], schemas))
    whole = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": segment},
                                                      {"role": "tool", "content": "408"},
                                                      {"role": "tool", "content": "11"}],
                                          tools=schemas, tokenize=False, add_generation_prompt=True)
    assert ids == tokenizer.encode(whole, add_special_tokens=False)
    tokenizer.chat_template = QWEN_TOOLS_TEMPLATE.replace("'\\n' + message.content", "'\\n' + message.content | trim")
    with pytest.raises(ToolTemplateError, match="does not write the assistant's text as it is"):
        tool_turn_text(tokenizer, messages, " " + segment, ["408", "11"], schemas)
