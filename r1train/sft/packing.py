"""SFT batches: chat -> (input_ids, labels), documents packed into fixed-length rows, and the
block-diagonal causal attention that keeps packed documents apart.

The pipeline a trainer runs:

    docs = [tokenize_conversation(tokenizer, r["messages"]) for r in records]
    rows, stats = pack(docs, max_seq_len=4096)              # best-fit decreasing, stats.efficiency
    batch = collate_packed(rows[i : i + B], pad_id)         # tensors [B, L]
    out = model(**packed_model_inputs(batch, model.config._attn_implementation))
    loss = cross-entropy of out.logits[:, :-1] against batch["labels"][:, 1:]

Labels follow the Hugging Face convention: `labels[t]` is the token at `t` (or -100), and the
logits at `t` predict `labels[t + 1]`; `model(..., labels=...)` does that shift itself.

How packed documents are kept apart. A packed row holds several documents; a token may attend
only to earlier tokens of its own document, and positions restart at 0 for each document.
`packed_model_inputs` passes that masking explicitly, in the form the model's attention reads:

    "sdpa_varlen"  (model/attention.py) one causal SDPA call per document: exact by construction,
                   no [L, L] mask in memory, and attention work sum(len_i^2) rather than L^2.
                   Works on any device; the one to train with (`model.set_attn_implementation`).
    "sdpa"         a 4-D boolean block-diagonal causal mask [B, 1, L, L].
    "eager"        the same mask, additive (0 / dtype min), since eager adds it to the scores.

Why not just hand transformers the restarting `position_ids`? Transformers 5.x infers packed
documents from `position_ids` only when `attention_mask` is None *and* there is no KV cache,
and `Qwen2Model.forward` creates a cache whenever `use_cache` is true, which it is by default
(`config.use_cache`): a plain `model(input_ids, position_ids=...)` then attends across documents
without a word (measured on the tiny Qwen2: logits off by ~1.0). FlashAttention's varlen path
also reads `position_ids` only for a batch of one row. An explicit mask, or the varlen function
with explicit boundaries, does not depend on any of that.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from r1train.data.prompts import calls_in_content, render_prompt
from r1train.model.attention import VARLEN_ATTENTION, block_causal_mask, cu_seqlens, varlen_sdpa_attention  # noqa: F401

IGNORE_INDEX = -100
OVERFLOW_MODES = ("truncate", "split", "drop")
PACKED_ATTENTIONS = (VARLEN_ATTENTION, "sdpa", "eager")


# Chat -> tokens

def tokenize_conversation(
    tokenizer: Any, messages: list[dict[str, str]], assistant_only: bool = True
) -> tuple[list[int], list[int]]:
    """`messages` through the chat template as (input_ids, labels), labels -100 off the loss.

    With `assistant_only`, the loss covers each assistant reply and the end-of-turn token the
    template closes it with (Qwen: `<|im_end|>`, so the model learns to stop), not the system and
    user turns, the role headers, nor the whitespace the template puts after the end-of-turn.
    The parts come from rendering prefixes of the chat: `messages[:i]` with the generation
    prompt ends where reply i starts and `messages[:i+1]` where it ends. Each run of context is
    tokenized on its own, as generation tokenizes the prompt, then the reply after it.

    Tool use (issue 33). An assistant turn's `tool_calls` are written into its text as the
    `<tool_call>` blocks a rollout's model writes (`prompts.calls_in_content`). An assistant turn
    followed by a `tool` turn is trained up to the end of its text only: in a multi-turn rollout
    the row stops at `</tool_call>` and everything up to the next assistant header (the end of
    turn, the tool turn(s), the header) is inserted by the environment and carries no loss
    (GRPOBatch.model_mask); here it carries no label, the same tokens. A run of tool turns is
    rendered as one piece: templates that put consecutive results in one turn (Qwen2.5's
    `<tool_response>` blocks in one user turn) close that turn only after the last.
    """
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"tokenize_conversation: messages must be a non-empty list, got {messages!r:.80}")
    messages = [calls_in_content(m) if isinstance(m, dict) else m for m in messages]
    pieces: list[tuple[str, bool]] = []  # (text, trained), in order, concatenating to the full render
    rendered = ""
    for i, message in enumerate(messages):
        following = messages[i + 1].get("role") if i + 1 < len(messages) else None
        if message.get("role") == "tool" and following == "tool":
            continue  # the run of tool turns is one piece, rendered at its last
        upto = render_prompt(tokenizer, messages[: i + 1], add_generation_prompt=False)
        _check_prefix(rendered, upto, i)
        if assistant_only and message.get("role") == "assistant":
            if i == 0:
                raise ValueError("tokenize_conversation: messages[0] is an assistant turn; a reply needs a prompt")
            header = render_prompt(tokenizer, messages[:i], add_generation_prompt=True)
            _check_prefix(rendered, header, i)
            _check_prefix(header, upto, i)
            turn = upto[len(header):]
            if following == "tool":  # the row's segment ends with its text; the rest is inserted
                at = turn.find(message["content"]) if message["content"] else -1
                if at < 0:
                    raise ValueError(f"tokenize_conversation: the chat template does not write messages[{i}]'s "
                                     f"text as it is, so the end of the model's segment before its tool turn "
                                     f"cannot be found")
                reply = turn[: at + len(message["content"])]
            else:
                reply = turn.rstrip()  # "content<|im_end|>"; the "\n" after it is template glue
            pieces += [(header[len(rendered):], False), (reply, True), (turn[len(reply):], False)]
        else:
            pieces.append((upto[len(rendered):], not assistant_only))
        rendered = upto

    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in _merge_runs(pieces):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def _check_prefix(prefix: str, text: str, i: int) -> None:
    # Templates that rewrite earlier turns (e.g. drop old <think> blocks) have no stable prefix,
    # so no span of the full render belongs to one message; refuse rather than mislabel.
    if not text.startswith(prefix):
        raise ValueError(
            f"tokenize_conversation: the chat template is not append-only at messages[{i}]: rendering "
            f"messages[:{i + 1}] does not start with the render of the turns before it"
        )


def _merge_runs(pieces: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    merged: list[tuple[str, bool]] = []
    for text, trained in pieces:
        if not text:
            continue
        if merged and merged[-1][1] == trained:
            merged[-1] = (merged[-1][0] + text, trained)
        else:
            merged.append((text, trained))
    return merged


# Packing

def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices, each bin's lengths summing to at most `capacity`.

    Items go longest first (ties: lower index first), each into the open bin with the least
    room that still fits it, else into a new bin; bins are listed in the order they were opened
    and hold their items in the order they were placed. Every length must be in [1, capacity].
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (free space, bin index) of every bin, ascending
    for i in order:
        n = lengths[i]
        if not 1 <= n <= capacity:
            raise ValueError(f"best_fit_decreasing: lengths[{i}] = {n} is not in [1, capacity={capacity}]")
        k = bisect.bisect_left(room, (n, -1))  # the fullest bin that still has room for n
        if k < len(room):
            free, b = room.pop(k)
        else:
            free, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(room, (free - n, b))
    return bins


@dataclass
class PackedRow:
    """One row of up to `max_seq_len` tokens holding whole documents (or pieces of split ones)."""

    input_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    doc_lens: list[int] = field(default_factory=list)
    doc_index: list[int] = field(default_factory=list)
    """For each document of the row, its index in `pack`'s `docs` (pieces of a split repeat it)."""

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass(frozen=True)
class PackStats:
    docs: int  # documents given to `pack`
    rows: int
    max_seq_len: int
    real_tokens: int  # tokens placed in rows, after truncation / drops
    label_tokens: int  # of those, tokens with a loss (labels != -100)
    truncated: int = 0  # over-long documents cut to max_seq_len
    split: int = 0  # over-long documents cut into max_seq_len pieces
    dropped: int = 0  # over-long documents left out

    @property
    def capacity(self) -> int:
        return self.rows * self.max_seq_len

    @property
    def efficiency(self) -> float:
        """real tokens / (rows * max_seq_len): the share of a row's compute that is not padding."""
        return self.real_tokens / self.capacity if self.capacity else 0.0


def pack(
    docs: Sequence[tuple[Sequence[int], Sequence[int]]], max_seq_len: int, overflow: str = "truncate"
) -> tuple[list[PackedRow], PackStats]:
    """Best-fit-decreasing packing of (input_ids, labels) documents into rows of `max_seq_len`.

    Documents go longest first (ties: input order), each into the open row with the least room
    that still fits it, else into a new row; so the result is deterministic. In each row the
    position ids restart at 0 per document and each document's first label is -100 (the token
    before it belongs to another document, so nothing may be trained to predict it).
    A document longer than `max_seq_len` is, per `overflow`: "truncate"d to its first
    max_seq_len tokens, "split" into max_seq_len pieces (each packed as its own document), or
    "drop"ped; the counts are in the returned `PackStats`.
    """
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
        raise ValueError(f"pack: max_seq_len must be a positive int, got {max_seq_len!r}")
    if overflow not in OVERFLOW_MODES:
        raise ValueError(f"pack: overflow={overflow!r}; expected one of {OVERFLOW_MODES}")

    pieces: list[tuple[int, list[int], list[int]]] = []  # (doc index, input_ids, labels)
    truncated = split = dropped = 0
    for d, doc in enumerate(docs):
        if not isinstance(doc, (tuple, list)) or len(doc) != 2:
            raise ValueError(f"pack: docs[{d}] must be an (input_ids, labels) pair, got {type(doc).__name__}")
        ids, labels = list(doc[0]), list(doc[1])
        if not ids or len(ids) != len(labels):
            raise ValueError(f"pack: docs[{d}] has {len(ids)} input_ids and {len(labels)} labels; "
                             "expected the same non-zero number")
        if len(ids) > max_seq_len:
            if overflow == "drop":
                dropped += 1
                continue
            if overflow == "truncate":
                truncated += 1
                ids, labels = ids[:max_seq_len], labels[:max_seq_len]
            else:
                split += 1
        for start in range(0, len(ids), max_seq_len):
            piece_labels = labels[start : start + max_seq_len]
            piece_labels[0] = IGNORE_INDEX
            pieces.append((d, ids[start : start + max_seq_len], piece_labels))

    rows = []
    for bin_ in best_fit_decreasing([len(ids) for _, ids, _ in pieces], max_seq_len):
        row = PackedRow()
        for i in bin_:
            d, ids, labels = pieces[i]
            row.input_ids += ids
            row.labels += labels
            row.position_ids += range(len(ids))
            row.doc_lens.append(len(ids))
            row.doc_index.append(d)
        rows.append(row)

    stats = PackStats(
        docs=len(docs), rows=len(rows), max_seq_len=max_seq_len,
        real_tokens=sum(len(row) for row in rows),
        label_tokens=sum(label != IGNORE_INDEX for row in rows for label in row.labels),
        truncated=truncated, split=split, dropped=dropped,
    )
    return rows, stats


# Batches

def collate_packed(rows: Sequence[PackedRow], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Packed rows as tensors, right-padded to the longest row (or `pad_to`).

    input_ids, labels, position_ids, segment_ids: [B, L]. `segment_ids` numbers the documents of
    each row 0, 1, ...; the padding tail is one more segment (positions 0, 1, ..., labels -100)
    so that every query attends to at least itself and no softmax row is empty.
    """
    if not rows:
        raise ValueError("collate_packed: rows is empty")
    longest = max(len(row) for row in rows)
    L = longest if pad_to is None else pad_to
    if L < longest:
        raise ValueError(f"collate_packed: pad_to={pad_to} is shorter than the longest row ({longest} tokens)")
    input_ids = torch.full((len(rows), L), pad_id, dtype=torch.long)  # [B, L]
    labels = torch.full((len(rows), L), IGNORE_INDEX, dtype=torch.long)  # [B, L]
    position_ids = torch.zeros((len(rows), L), dtype=torch.long)  # [B, L]
    segment_ids = torch.zeros((len(rows), L), dtype=torch.long)  # [B, L]
    for b, row in enumerate(rows):
        n = len(row)
        input_ids[b, :n] = torch.tensor(row.input_ids)
        labels[b, :n] = torch.tensor(row.labels)
        position_ids[b, :n] = torch.tensor(row.position_ids)
        segment_ids[b, :n] = torch.repeat_interleave(torch.arange(len(row.doc_lens)), torch.tensor(row.doc_lens))
        position_ids[b, n:] = torch.arange(L - n)
        segment_ids[b, n:] = len(row.doc_lens)
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "segment_ids": segment_ids}


def collate_padded(docs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """One document per row, right-padded to the longest: the unpacked baseline.

    input_ids, labels, position_ids, attention_mask (1 on real tokens): [B, L]. Right padding
    comes after every real token, so causal attention alone keeps real tokens off it and the
    model may run with `attention_mask=None` (SDPA's fastest, mask-free causal path).
    """
    if not docs:
        raise ValueError("collate_padded: docs is empty")
    L = max(len(ids) for ids, _ in docs)
    input_ids = torch.full((len(docs), L), pad_id, dtype=torch.long)  # [B, L]
    labels = torch.full((len(docs), L), IGNORE_INDEX, dtype=torch.long)  # [B, L]
    attention_mask = torch.zeros((len(docs), L), dtype=torch.long)  # [B, L]
    for b, (ids, doc_labels) in enumerate(docs):
        if not ids or len(ids) != len(doc_labels):
            raise ValueError(f"collate_padded: docs[{b}] has {len(ids)} input_ids and {len(doc_labels)} labels")
        input_ids[b, : len(ids)] = torch.tensor(list(ids))
        labels[b, 1 : len(ids)] = torch.tensor(list(doc_labels)[1:])  # first label -100, as in `pack`
        attention_mask[b, : len(ids)] = 1
    position_ids = torch.arange(L).expand(len(docs), L).clone()  # [B, L]
    return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, "attention_mask": attention_mask}


def packed_model_inputs(
    batch: dict[str, torch.Tensor], attn_implementation: str, dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Keyword arguments for `model(**...)` on a `collate_packed` batch, with the block-diagonal
    causal masking in the form `attn_implementation` reads (see the module docstring).

    `dtype`: the model's compute dtype, for the additive mask of "eager". `use_cache=False`:
    a training forward has no use for a KV cache.
    """
    inputs: dict[str, Any] = {
        "input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    segment_ids = batch["segment_ids"]
    if attn_implementation == VARLEN_ATTENTION:
        inputs["cu_seqlens"] = cu_seqlens(segment_ids)
    elif attn_implementation == "sdpa":
        inputs["attention_mask"] = block_causal_mask(segment_ids)
    elif attn_implementation == "eager":
        allowed = block_causal_mask(segment_ids)
        inputs["attention_mask"] = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)
    else:
        raise ValueError(
            f"packed_model_inputs: attn_implementation={attn_implementation!r} is not one that packed "
            f"rows are masked for; expected one of {PACKED_ATTENTIONS} (model.set_attn_implementation(...))"
        )
    return inputs
