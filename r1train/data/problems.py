"""A data section in, a stage's problems out: the one place where the command line's data options
become records (the layouts of schemas.py, through loaders.py, mixing.py and the embedded task)
and prompts become token ids.

    load_problems(d, seed)          RL problems (GRPO, rejection sampling, distillation): the
                                    training problems and the held-out ones, as `Problems`
    load_conversations(d, seed)     SFT: training conversations and held-out problems
    training_prompts / encode_prompts   records -> chat-template prompts -> token ids

A response prefix (`--data.response_prefix`, e.g. `<think>`) opens the assistant's turn of every
prompt: the prompt text is the chat template's rendering, generation prompt included, followed by
the prefix, tokenized as one string (so the tokens at the boundary are the ones the tokenizer
gives the whole text, as it would for a chat whose reply begins with the prefix). The prefix is
prompt: the model continues after it and is never trained on it. Whoever reads a completion as
text (the rewards, samples.jsonl, the held-out evaluation, rejection sampling's kept replies)
reads the prefix in front of it (`prompts.with_prefix`), as if the model had written it; the
token-level data (completion ids, log-probs, lengths, the loss) stay the model's own tokens.

Held-out means never trained on: one rule for every stage (`loaders.load_held_out`): the same
source's test split, or the other side of training's seeded cut; another source's test split,
else all of its rows.
"""
from __future__ import annotations

import dataclasses

import torch

from r1train.data.loaders import load_held_out, load_records
from r1train.data.mixing import mix_records, parse_sources, shares
from r1train.data.prompts import make_conversation, render_prompt, resolve_system_prompt
from r1train.data.task import general_chat_records, task_records
from r1train.run.config import ConfigError
from r1train.run.sections import EMBEDDED, DataConfig


@dataclasses.dataclass
class Problems:
    """The problems of one data section: records with `prompt`, `problem`, `solution`, `answer`."""
    train: list[dict]
    held_out: list[dict]


def load_problems(d: DataConfig, seed: int, say=None, held_out: bool = True, option: str = "data") -> Problems:
    """Training and held-out problems of an RL data section (`option`: its name on the command
    line), checked for the columns the rewards read. Called before any model loads, so that a bad
    file or row fails in seconds. `say` (a print function, or None) gets a line about a mix of
    sources; `held_out=False` for stages that only sample (rejection sampling, distillation)."""
    train = train_records(d, seed, say=say)
    for col in ("prompt", "solution", "answer"):
        if train and col not in train[0]:
            raise ConfigError(f"--{option}.source={d.source!r}: records lack column {col!r}")
    return Problems(train, held_out_records(d, seed) if held_out else [])


def _single(d: DataConfig, source: str) -> DataConfig:
    return dataclasses.replace(d, source=source)


def _load_train(d: DataConfig, seed: int) -> list[dict]:
    system_prompt = resolve_system_prompt(d.system_prompt)
    if d.source == EMBEDDED:
        return task_records(d.task, d.num_train, seed=seed, split="train", system_prompt=system_prompt)
    return list(load_records(d.source, schema=d.schema, split=d.train_split, on_bad_row=d.on_bad_row,
                             test_size=d.test_size, seed=seed, system_prompt=system_prompt,
                             columns=d.columns).records)


def train_records(d: DataConfig, seed: int, say=None) -> list[dict]:
    """The training problems of a data section (GRPO prompts, rejection sampling, distillation).
    Several weighted sources (`a.jsonl:0.7,b.jsonl:0.3`) are mixed by data/mixing.py; `say`
    (a print function, or None) then gets one line per source."""
    parts = parse_sources(d.source)
    if len(parts) == 1:
        return _load_train(_single(d, parts[0][0]), seed)
    pool, lines = mix_records([(s, _load_train(_single(d, s), seed), w) for s, w in parts], seed)
    if say is not None:
        say(f"data mix of {len(parts)} sources, {len(pool)} problems: {'; '.join(lines)}")
    return pool


def held_out_records(d: DataConfig, seed: int) -> list[dict]:
    """The first `num_eval` held-out problems of a data section (module docstring). Of several
    weighted sources without an `eval_source`: each one's held-out problems, in the share of
    its weight."""
    system_prompt = resolve_system_prompt(d.system_prompt)
    parts = parse_sources(d.source)
    if len(parts) > 1 and not d.eval_source:
        counts = shares(d.num_eval, [w for _, w in parts])
        return [r for (s, _), n in zip(parts, counts)
                for r in held_out_records(dataclasses.replace(d, source=s, num_eval=n), seed)]
    source = parts[0][0] if len(parts) == 1 else d.source  # several: evaluated on eval_source alone
    if source == EMBEDDED:
        return task_records(d.task, d.num_eval, seed=seed, split="test", system_prompt=system_prompt)
    return list(load_held_out(source, d.eval_source, train_split=d.train_split,
                              eval_split=d.eval_split, schema=d.schema, on_bad_row=d.on_bad_row,
                              test_size=d.test_size, seed=seed, system_prompt=system_prompt,
                              columns=d.columns).records[: d.num_eval])


def training_prompts(tokenizer, records: list[dict], d: DataConfig, option: str, tag: str,
                     main: bool, eos_ids: list[int] | None = None,
                     tools: list[dict] | None = None) -> tuple[list[dict], list[list[int]], int]:
    """`encode_prompts` for training or sampling, with the data section's response prefix:
    refuses a source left with no prompt, says how many were dropped for length. `eos_ids`: the
    ids that end a completion (`Engine.eos_token_ids`), which the prefix must not hold; `tools`:
    the schemas the chat template writes into each prompt (rollout.tools)."""
    check_system_prompt_length(tokenizer, records, d, option)
    say = (lambda line: print(f"[{tag}] {line}", flush=True)) if main else None
    check_response_prefix(tokenizer, d.response_prefix, option, eos_ids, say=say)
    kept, ids, dropped = encode_prompts(tokenizer, records, d.max_prompt_tokens, d.response_prefix, tools)
    if not kept:
        raise ConfigError(f"--{option}.source={d.source!r}: no prompts left (dropped {dropped} longer than "
                          f"--{option}.max_prompt_tokens={d.max_prompt_tokens})")
    if main and dropped:
        print(f"[{tag}] dropped {dropped} prompts longer than {d.max_prompt_tokens} tokens", flush=True)
    return kept, ids, dropped


def check_system_prompt_length(tokenizer, records: list[dict], d: DataConfig, option: str) -> None:
    """Refuse a system prompt that alone makes a prompt longer than `max_prompt_tokens`, naming
    the option, when the records use it. Every prompt with it would be dropped, and the error would
    blame `--data.source` after the whole set was rendered and tokenized (a minute for 20 prompts
    with a 5 MB system prompt); here one prompt is: the shortest one that carries it."""
    system_prompt = resolve_system_prompt(d.system_prompt)
    if not system_prompt or not d.max_prompt_tokens:
        return
    if not any(r["prompt"][0].get("role") == "system" and r["prompt"][0].get("content") == system_prompt
               for r in records):  # the prompts bring their own system turns
        return
    text = render_prompt(tokenizer, make_conversation("?", system_prompt), add_generation_prompt=True,
                         response_prefix=d.response_prefix)
    n = len(tokenizer(text, add_special_tokens=False)["input_ids"])
    if n > d.max_prompt_tokens:
        given = d.system_prompt if d.system_prompt.startswith("@") else \
            f"{d.system_prompt[:40]}... ({len(d.system_prompt)} characters)"
        raise ConfigError(f"--{option}.system_prompt={given!r}: a prompt with it is {n} tokens at least, more "
                          f"than --{option}.max_prompt_tokens={d.max_prompt_tokens}: every prompt would be "
                          f"dropped. Shorten it, or raise --{option}.max_prompt_tokens")


def check_response_prefix(tokenizer, prefix: str, option: str, eos_ids: list[int] | None = None,
                          say=None) -> None:
    """Refuse a response prefix that holds the text of a token that ends a completion (the
    tokenizer's EOS, or any of `eos_ids`: Qwen's `<|im_end|>`): the assistant's turn would be over
    before the model writes a token. `say` (print, or None) gets a warning when the chat template's
    generation prompt already ends with the prefix (templates of reasoning models that open
    `<think>` themselves): the prompt would then hold it twice."""
    if not prefix:
        return
    ids = {tokenizer.eos_token_id, *(eos_ids or ())} - {None}
    for i in sorted(ids):
        end = tokenizer.decode([i], skip_special_tokens=False)
        if end and end in prefix:
            raise ConfigError(f"--{option}.response_prefix={prefix!r}: holds {end!r}, which ends a completion; the "
                              f"prefix opens the assistant's reply (e.g. '<think>'), it cannot end it")
    if say is not None:
        header = render_prompt(tokenizer, make_conversation("?", "s"), add_generation_prompt=True)
        if prefix.strip() and header.rstrip().endswith(prefix.strip()):
            say(f"warning: the chat template's generation prompt already ends with {prefix.strip()!r}; "
                f"--{option}.response_prefix={prefix!r} adds it a second time")


def encode_prompts(tokenizer, records: list[dict], max_prompt_tokens: int | None = None, response_prefix: str = "",
                   tools: list[dict] | None = None):
    """Render each record's prompt ([system, user] chat) with the chat template (`render_prompt`:
    merged into the user turn where the template has no system role), followed by
    `response_prefix`, and tokenize the whole text as one string (module docstring).

    Returns (kept records, their token lists, number dropped for length: the prefix's tokens count).
    """
    kept, ids, dropped = [], [], 0
    for r in records:
        text = render_prompt(tokenizer, r["prompt"], add_generation_prompt=True, response_prefix=response_prefix,
                             tools=tools)
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        if max_prompt_tokens and len(toks) > max_prompt_tokens:
            dropped += 1
            continue
        kept.append(r)
        ids.append(toks)
    return kept, ids, dropped


def load_conversations(d, seed: int, say=None) -> tuple[list[list[dict]], list[dict]]:
    """SFT's data section (`d`: sft.trainer.SFTDataConfig) -> training conversations (message
    lists) and held-out problems (records with answers): held out only where `eval_source` names
    them, or the embedded task's test side; a chat set has no answers to score otherwise.

    `say` (a print function, or None) gets how many conversations each source gave."""
    system_prompt = resolve_system_prompt(d.system_prompt)
    if d.source == EMBEDDED:
        train = [r["messages"] for r in task_records(d.task, d.num_train, seed=seed, split="train",
                                                     system_prompt=system_prompt)]
    else:
        loaded = load_records(d.source, schema=d.schema, split=d.split, on_bad_row=d.on_bad_row,
                              test_size=d.test_size, seed=seed, system_prompt=system_prompt,
                              columns=d.columns)
        missing = [i for i, r in enumerate(loaded.records) if "messages" not in r]
        if missing:
            raise ConfigError(f"--data.source={d.source!r}: its rows are {loaded.schema!r} problems, without "
                              f"an assistant reply (record {missing[0] + 1}); SFT needs chat data: the "
                              f"bespoke or messages layout (data/schemas.py)")
        train = [r["messages"] for r in loaded.records]
    report = [f"{len(train)} from --data.source={d.source!r}"]
    if d.mix_source and d.mix_fraction > 0:
        if d.mix_source == EMBEDDED:
            mix = [r["messages"] for r in general_chat_records(1000, seed=seed)]
        else:
            loaded = load_records(d.mix_source, split="all", on_bad_row=d.on_bad_row)
            mix = [r["messages"] for r in loaded.records if "messages" in r]
            if not mix:
                raise ConfigError(f"--data.mix_source={d.mix_source!r}: gave no conversation to mix in: its "
                                  f"{len(loaded)} rows are {loaded.schema!r} problems without an assistant "
                                  f"reply; the mix needs chat data (the bespoke or messages layout)")
        want = int(round(len(train) * d.mix_fraction / (1 - d.mix_fraction)))
        g = torch.Generator().manual_seed(seed)
        train += [mix[i] for i in torch.randint(len(mix), (want,), generator=g).tolist()]
        report.append(f"{want} drawn from --data.mix_source={d.mix_source!r} ({len(mix)} there"
                      f"{'; --data.mix_fraction is too small for so few' if not want else ''})")
    if say is not None:
        say(f"conversations: {'; '.join(report)}")
    if d.eval_source:
        evals = load_held_out(d.source, d.eval_source, train_split=d.split, schema=d.schema,
                              on_bad_row=d.on_bad_row, test_size=d.test_size,
                              seed=seed, system_prompt=system_prompt,
                              columns=d.columns).records[: d.num_eval]
    elif d.source == EMBEDDED:
        evals = task_records(d.task, d.num_eval, seed=seed, split="test", system_prompt=system_prompt)
    else:
        evals = []
    return train, list(evals)
