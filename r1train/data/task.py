"""The embedded reasoning task: multi-step integer arithmetic with R1-format worked solutions.

A problem is a chain such as "What is 47 + 18 - 29?". Its worked solution evaluates the chain
one operation at a time inside `<think>`, then states the result inside `<answer>`:

    <think>47 + 18 = 65. 65 - 29 = 36.</think><answer>36</answer>

Each intermediate result depends on the previous one, so a wrong carry anywhere makes the final
answer wrong: the accuracy reward has something to teach, and a tiny model on a CPU can learn it.

The tool variant (issue 33). With `mul_digits` 3 or 4 a '*' step multiplies by a 3-4 digit number,
which a tiny model cannot do in its head; with `tool_rate` > 0 that share of the cold-start
conversations has each '*' step done by the `calculator` tool, in the form a multi-turn rollout
takes (tools/calls.py): the assistant's segment ends with the call, a tool turn holds the result,
and the next segment goes on from it:

    assistant  <think>47 + 18 = 65. <tool_call>
               {"name": "calculator", "arguments": {"expression": "65 * 321"}}
               </tool_call>
    tool       20865
    assistant  65 * 321 = 20865.</think><answer>20865</answer>

Joined with the tool turns, as a rollout's completion is, the text still has one <think> block
and one <answer>: the rewards read it as they read a one-turn completion.

Train and test are disjoint by construction: a problem goes to "test" when a stable hash of its
text falls in the test bucket, so the same problem can never appear in both, whatever the seed.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass


@dataclass
class TaskConfig:
    min_operands: int = 2
    """Fewest numbers in a chain (2 means one operation)."""
    max_operands: int = 3
    """Most numbers in a chain."""
    max_value: int = 99
    """Operands are drawn from [0, max_value]."""
    ops: str = "+-"
    """Operations to draw from: any of '+', '-', '*' (a '*' operand has `mul_digits` digits at most)."""
    mul_digits: int = 1
    """A '*' operand is drawn from [0, 10**mul_digits - 1]: 1 keeps it to one digit; 3 or 4 make
    products the tiny model cannot compute in its head (the tool variant)."""
    allow_negative: bool = False
    """When False, a '-' never takes the running value below zero."""
    test_fraction: float = 0.2
    """Share of the problem space (by hash) reserved for the test split."""
    slip_rate: float = 0.0
    """Imperfect cold-start data: the share of worked solutions whose summary is sloppy, the
    <answer> repeating the value before the last step instead of the result (the reasoning in
    <think> stays right). Applies only to the SFT conversations (`messages`); answers, rewards
    and evaluation always use the true result. R1's cold-start data is small and imperfect;
    making one flaw systematic shows what a verifiable reward adds over imitation: SFT copies
    the flaw, GRPO's accuracy reward unlearns it."""
    tool_rate: float = 0.0
    """Share of the cold-start conversations (`messages`) whose '*' steps call the `calculator`
    tool (module docstring); drawn from the problem's text, so it never changes which problems
    are drawn. Answers, rewards and evaluation are unchanged; GRPO answers the calls with
    --rollout.tools calculator."""

    def __post_init__(self):
        if not 2 <= self.min_operands <= self.max_operands:
            raise ValueError(f"task: need 2 <= min_operands <= max_operands, got "
                             f"min_operands={self.min_operands}, max_operands={self.max_operands}")
        if self.max_value < 1:
            raise ValueError(f"task.max_value must be >= 1, got {self.max_value}")
        if not self.ops or set(self.ops) - set("+-*"):
            raise ValueError(f"task.ops must be a non-empty subset of '+-*', got {self.ops!r}")
        if not 1 <= self.mul_digits <= 6:
            raise ValueError(f"task.mul_digits must be in [1, 6], got {self.mul_digits}")
        if not 0.0 <= self.tool_rate <= 1.0:
            raise ValueError(f"task.tool_rate must be in [0, 1], got {self.tool_rate}")
        if not 0.0 <= self.slip_rate <= 1.0:
            raise ValueError(f"task.slip_rate must be in [0, 1], got {self.slip_rate}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"task.test_fraction must be in (0, 1), got {self.test_fraction}")


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def sample_problem(cfg: TaskConfig, rng: random.Random) -> dict:
    """One chain: its text, its worked R1-format solution, its answer, and the cold-start version
    of the solution (a sloppy summary at `cfg.slip_rate`; equal to the solution when 0)."""
    n = rng.randint(cfg.min_operands, cfg.max_operands)
    value = rng.randint(0, cfg.max_value)
    terms, steps, values = [str(value)], [], [value]
    for _ in range(n - 1):
        op = rng.choice(cfg.ops)
        if op == "*":
            b = rng.randint(0, 10 ** cfg.mul_digits - 1)
        elif op == "-" and not cfg.allow_negative:
            b = rng.randint(0, min(value, cfg.max_value))
        else:
            b = rng.randint(0, cfg.max_value)
        new = _apply(value, op, b)
        steps.append(f"{value} {op} {b} = {new}.")
        terms += [op, str(b)]
        value = new
        values.append(value)
    problem = f"What is {' '.join(terms)}?"
    completion = f"<think>{' '.join(steps)}</think><answer>{value}</answer>"
    # The slip draw happens for every problem, so slip_rate never changes which problems are drawn.
    sloppy = rng.random() < cfg.slip_rate
    cold_start = completion if not sloppy else f"<think>{' '.join(steps)}</think><answer>{values[-2]}</answer>"
    out = {"problem": problem, "completion": completion, "answer": str(value), "cold_start": cold_start}
    # Its own generator, seeded by the problem: the main one draws exactly as without tools.
    if cfg.tool_rate > 0 and "*" in terms and random.Random(f"tool {problem}").random() < cfg.tool_rate:
        out["cold_start_turns"] = tool_turns(steps, values, cold_start[cold_start.index("</think>"):])
    return out


def tool_turns(steps: list[str], values: list[int], ending: str) -> list[dict]:
    """The assistant and tool messages of a worked solution whose '*' steps call the calculator
    (module docstring); `ending`: the text after the steps ("</think><answer>..</answer>")."""
    from r1train.data.prompts import tool_calls_text

    turns, text = [], "<think>"  # the text of the segment under way
    for step, value in zip(steps, values[1:]):
        expression = step.split(" = ")[0]
        if " * " in expression:  # the segment ends with the call; the next opens with its step
            call = {"function": {"name": "calculator", "arguments": {"expression": expression}}}
            turns += [{"role": "assistant", "content": text + tool_calls_text("", [call])},
                      {"role": "tool", "content": str(value)}]
            text = ""
        text += step + " "
    return turns + [{"role": "assistant", "content": text.rstrip() + ending}]


def split_of(problem: str, test_fraction: float) -> str:
    bucket = zlib.crc32(problem.encode()) % 10_000
    return "test" if bucket < test_fraction * 10_000 else "train"


def generate_problems(cfg: TaskConfig, n: int, seed: int = 0, split: str = "train") -> list[dict]:
    """`n` distinct problems of one split, deterministic in `seed`."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{seed}-{split}")
    seen, out = set(), []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 100 * n + 10_000:
            raise ValueError(f"task: only {len(out)} distinct {split} problems found for n={n}; "
                             f"widen the task (max_value, max_operands) or ask for fewer")
        p = sample_problem(cfg, rng)
        if p["problem"] in seen or split_of(p["problem"], cfg.test_fraction) != split:
            continue
        seen.add(p["problem"])
        out.append(p)
    return out


def task_records(cfg: TaskConfig, n: int, seed: int = 0, split: str = "train",
                 system_prompt: str | None = None) -> list[dict]:
    """Problems as normalized records, the same shape the dataset loaders return."""
    from r1train.data.prompts import SYSTEM_PROMPT, make_conversation

    system_prompt = SYSTEM_PROMPT if system_prompt is None else system_prompt
    records = []
    for p in generate_problems(cfg, n, seed=seed, split=split):
        prompt = make_conversation(p["problem"], system_prompt=system_prompt)
        records.append({
            "prompt": prompt,
            "problem": p["problem"],
            "solution": p["completion"],
            "answer": p["answer"],
            "messages": prompt + p.get("cold_start_turns", [{"role": "assistant", "content": p["cold_start"]}]),
        })
    return records


_WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "garden", "rocket", "candle")


def general_chat_records(n: int, seed: int = 0) -> list[dict]:
    """Non-reasoning chat turns (R1's SFT stage 2 mixes such "general" data with reasoning data so
    the model keeps answering plainly when no reasoning is needed): no <think> block, short replies."""
    rng = random.Random(f"general-{seed}")
    records = []
    for _ in range(n):
        kind = rng.randrange(3)
        word = rng.choice(_WORDS)
        if kind == 0:
            user, reply = f"Repeat the word {word}.", word
        elif kind == 1:
            user, reply = f"Spell {word} backwards.", word[::-1]
        else:
            k = rng.randint(0, 98)
            user, reply = f"Which number comes after {k}?", str(k + 1)
        messages = [{"role": "system", "content": "You are a helpful assistant."},
                    {"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        records.append({"prompt": messages[:2], "problem": user, "solution": reply, "answer": reply,
                        "messages": messages})
    return records
