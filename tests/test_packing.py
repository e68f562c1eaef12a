"""SFT packing: chat labels, best-fit-decreasing rows, collation, and the proof that packed
documents do not see each other (loss and gradients of a packed row = the documents run alone)."""
from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest
import torch

from r1train.data.tiny import build_tiny_model
from r1train.sft.packing import (
    IGNORE_INDEX,
    VARLEN_ATTENTION,
    best_fit_decreasing,
    block_causal_mask,
    collate_packed,
    collate_padded,
    cu_seqlens,
    pack,
    packed_model_inputs,
    tokenize_conversation,
)

ROOT = Path(__file__).resolve().parents[1]
X = IGNORE_INDEX


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_packing") / "model")


@pytest.fixture(scope="session")
def tokenizer(tiny_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_path)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# tokenize_conversation

def test_labels_cover_the_reply_and_its_end_of_turn_only(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "<think>\n2+3=5\n</think>\n<answer>\n5\n</answer>"},
    ]
    ids, labels = tokenize_conversation(tokenizer, messages)
    # The ChatML render, cut by hand where the loss starts and stops: the prompt up to and with
    # the assistant header is context; the reply and its <|im_end|> are trained; the template's
    # "\n" after <|im_end|> is not.
    prompt = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+3?<|im_end|>\n"
              "<|im_start|>assistant\n")
    reply = "<think>\n2+3=5\n</think>\n<answer>\n5\n</answer><|im_end|>"
    p, r, t = encode(tokenizer, prompt), encode(tokenizer, reply), encode(tokenizer, "\n")
    assert ids == p + r + t
    assert labels == [X] * len(p) + r + [X] * len(t)
    assert labels[len(p) + len(r) - 1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.decode(ids) == prompt + reply + "\n"


def test_every_assistant_turn_of_a_multi_turn_chat_is_trained(tokenizer):
    messages = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "times 3?"},
        {"role": "assistant", "content": "6"},
    ]
    ids, labels = tokenize_conversation(tokenizer, messages)
    parts = [  # (text, trained), written out from the ChatML template
        ("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n<|im_start|>assistant\n", False),
        ("2<|im_end|>", True),
        ("\n<|im_start|>user\ntimes 3?<|im_end|>\n<|im_start|>assistant\n", False),
        ("6<|im_end|>", True),
        ("\n", False),
    ]
    want_ids, want_labels = [], []
    for text, trained in parts:
        part = encode(tokenizer, text)
        want_ids += part
        want_labels += part if trained else [X] * len(part)
    assert (ids, labels) == (want_ids, want_labels)
    assert tokenizer.decode([t for t in labels if t != X]) == "2<|im_end|>6<|im_end|>"


def test_assistant_only_false_trains_every_token(tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    ids, labels = tokenize_conversation(tokenizer, messages, assistant_only=False)
    assert ids == encode(tokenizer, "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n")
    assert labels == ids


def test_bad_conversations_are_refused(tokenizer, tiny_path):
    with pytest.raises(ValueError, match="non-empty list"):
        tokenize_conversation(tokenizer, [])
    with pytest.raises(ValueError, match=r"messages\[0\] is an assistant turn"):
        tokenize_conversation(tokenizer, [{"role": "assistant", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[1\]"):
        tokenize_conversation(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant"}])
    from transformers import AutoTokenizer

    last_only = AutoTokenizer.from_pretrained(tiny_path)
    last_only.chat_template = "{{ messages[-1]['content'] }}"  # rewrites, does not append
    with pytest.raises(ValueError, match=r"not append-only at messages\[1\]"):
        tokenize_conversation(last_only, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])


# pack

def numbered_docs(lengths):
    """Document d of length n: ids 100*d + t, every token a label, so placement is readable."""
    return [([100 * d + t for t in range(n)], [100 * d + t for t in range(n)]) for d, n in enumerate(lengths)]


LENGTHS = [9, 12, 45, 2, 9, 5]  # docs 0..5; doc 2 is longer than a row of 20


def test_pack_truncate_hand_example():
    rows, stats = pack(numbered_docs(LENGTHS), max_seq_len=20, overflow="truncate")
    # Doc 2 -> its first 20 tokens. Longest first: d2 20, d1 12, d0 9, d4 9, d5 5, d3 2.
    #   d2 -> row0 (free 0); d1 -> row1 (free 8); d0: no row has 9 free -> row2 (free 11);
    #   d4 -> row2 (free 2); d5 -> row1 (the only one with 5 free; free 3);
    #   d3 (2): rows with room: row1 (3), row2 (2) -> best fit row2 (free 0).
    assert [row.doc_index for row in rows] == [[2], [1, 5], [0, 4, 3]]
    assert [row.doc_lens for row in rows] == [[20], [12, 5], [9, 9, 2]]
    # 57 real tokens = 20 + 12 + 9 + 9 + 5 + 2 in 3 rows of 20 -> 57 / 60 = 0.95; every
    # document loses its first label: 57 - 6 = 51 label tokens.
    assert (stats.docs, stats.rows, stats.real_tokens, stats.label_tokens) == (6, 3, 57, 51)
    assert (stats.truncated, stats.split, stats.dropped, stats.capacity) == (1, 0, 0, 60)
    assert stats.efficiency == pytest.approx(0.95)
    row = rows[1]
    assert row.input_ids == [100 + t for t in range(12)] + [500 + t for t in range(5)]
    assert row.position_ids == list(range(12)) + list(range(5))
    assert row.labels == [X] + [100 + t for t in range(1, 12)] + [X] + [500 + t for t in range(1, 5)]


def test_pack_split_hand_example_is_best_fit_not_first_fit():
    rows, stats = pack(numbered_docs(LENGTHS), max_seq_len=20, overflow="split")
    # Doc 2 -> pieces of 20, 20, 5 (tokens 0-19, 20-39, 40-44). Longest first:
    #   p0 -> row0, p1 -> row1 (both full); d1 12 -> row2 (free 8); d0 9 -> row3 (free 11);
    #   d4 9 -> row3 (free 2); p2 5 -> row2 (free 3); d5 5: nothing has 5 free -> row4 (15);
    #   d3 2: free 3 (row2), 2 (row3), 15 (row4) -> best fit row3. (First fit would pick row2.)
    assert [row.doc_index for row in rows] == [[2], [2], [1, 2], [0, 4, 3], [5]]
    # 82 real tokens in 5 rows of 20 = 0.82; 8 pieces lose their first label: 74.
    assert (stats.rows, stats.real_tokens, stats.label_tokens, stats.split, stats.truncated) == (5, 82, 74, 1, 0)
    assert stats.efficiency == pytest.approx(0.82)
    assert rows[2].input_ids[12:] == [240, 241, 242, 243, 244]  # the third piece, positions restart
    assert rows[2].position_ids == list(range(12)) + list(range(5))
    assert rows[2].labels[12:] == [X, 241, 242, 243, 244]
    assert rows[1].labels == [X] + list(range(221, 240))


def test_pack_drop_hand_example():
    rows, stats = pack(numbered_docs(LENGTHS), max_seq_len=20, overflow="drop")
    # Without doc 2: d1 -> row0 (8); d0 -> row1 (11); d4 -> row1 (2); d5 -> row0 (3); d3 -> row1 (0).
    assert [row.doc_index for row in rows] == [[1, 5], [0, 4, 3]]
    # 37 real tokens / 40 = 0.925; 5 documents: 32 label tokens.
    assert (stats.rows, stats.real_tokens, stats.label_tokens, stats.dropped) == (2, 37, 32, 1)
    assert stats.efficiency == pytest.approx(0.925)


def test_pack_is_deterministic_and_keeps_every_token():
    rng = random.Random(0)
    lengths = [rng.randint(1, 64) for _ in range(300)]
    docs = numbered_docs(lengths)
    rows, stats = pack(docs, max_seq_len=64)
    assert [r.doc_index for r in rows] == [r.doc_index for r in pack(docs, max_seq_len=64)[0]]
    assert sorted(d for row in rows for d in row.doc_index) == list(range(300))
    assert all(len(row) <= 64 for row in rows)
    assert stats.real_tokens == sum(lengths)
    for row in rows:
        start = 0
        for d, n in zip(row.doc_index, row.doc_lens):
            assert row.input_ids[start : start + n] == docs[d][0]
            assert row.labels[start] == X
            start += n


def test_best_fit_decreasing_bins_fit():
    rng = random.Random(1)
    lengths = [rng.randint(1, 100) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 100)
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 100 for b in bins)
    assert best_fit_decreasing([], 10) == []
    with pytest.raises(ValueError, match=r"lengths\[1\] = 11"):
        best_fit_decreasing([3, 11], 10)


def test_pack_refuses_bad_input():
    with pytest.raises(ValueError, match="max_seq_len"):
        pack(numbered_docs([3]), max_seq_len=0)
    with pytest.raises(ValueError, match="overflow='wrap'"):
        pack(numbered_docs([3]), max_seq_len=8, overflow="wrap")
    with pytest.raises(ValueError, match=r"docs\[1\] has 2 input_ids and 1 labels"):
        pack([([1], [1]), ([1, 2], [1])], max_seq_len=8)
    with pytest.raises(ValueError, match=r"docs\[0\] has 0 input_ids"):
        pack([([], [])], max_seq_len=8)


# collate and masks

def test_collate_packed_pads_as_its_own_segment():
    rows, _ = pack(numbered_docs(LENGTHS), max_seq_len=20, overflow="truncate")
    batch = collate_packed(rows[1:], pad_id=7)  # rows of 17 ([d1 12, d5 5]) and 20 ([d0 9, d4 9, d3 2])
    assert {k: tuple(v.shape) for k, v in batch.items()} == {k: (2, 20) for k in
                                                            ("input_ids", "labels", "position_ids", "segment_ids")}
    assert batch["input_ids"][0, 17:].tolist() == [7, 7, 7]
    assert batch["labels"][0, 17:].tolist() == [X, X, X]
    assert batch["position_ids"][0].tolist() == list(range(12)) + list(range(5)) + [0, 1, 2]
    assert batch["segment_ids"][0].tolist() == [0] * 12 + [1] * 5 + [2] * 3
    assert batch["segment_ids"][1].tolist() == [0] * 9 + [1] * 9 + [2] * 2
    # Flattened starts: row 0 at 0, 12, 17 (padding); row 1 at 20, 29, 38; then 2 * 20.
    assert cu_seqlens(batch["segment_ids"]) == [0, 12, 17, 20, 29, 38, 40]
    assert collate_packed(rows[1:], pad_id=7, pad_to=24)["input_ids"].shape == (2, 24)
    with pytest.raises(ValueError, match="pad_to=16"):
        collate_packed(rows[1:], pad_id=7, pad_to=16)


def test_block_causal_mask_small_case():
    mask = block_causal_mask(torch.tensor([[0, 0, 1, 1, 1]]))
    # Causal inside {0, 1} and inside {2, 3, 4}; nothing across.
    want = torch.tensor([[1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0],
                         [0, 0, 1, 0, 0],
                         [0, 0, 1, 1, 0],
                         [0, 0, 1, 1, 1]], dtype=torch.bool)
    assert mask.shape == (1, 1, 5, 5)
    assert torch.equal(mask[0, 0], want)


def test_collate_padded():
    batch = collate_padded([([5, 6, 7], [X, 6, 7]), ([1, 2, 3, 4, 5], [1, 2, 3, 4, 5])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0, 0], [1, 2, 3, 4, 5]]
    assert batch["labels"].tolist() == [[X, 6, 7, X, X], [X, 2, 3, 4, 5]]  # first label -100, as in pack
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["position_ids"].tolist() == [list(range(5))] * 2


# Packed row == documents alone

def ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum over t with labels[t+1] != -100 of -log softmax(logits[t])[labels[t+1]], in float64."""
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1)  # [B, T-1, V]
    target = labels[:, 1:]  # [B, T-1]
    keep = target != X
    picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [B, T-1]
    return -(picked * keep).sum()


@pytest.fixture(scope="session")
def model_and_docs(tiny_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_path, dtype=torch.float32)
    chats = [  # four documents of different lengths; two with loss on every token
        ("What is 2+3?", "<think>\n2+3=5\n</think>\n<answer>\n5\n</answer>", True),
        ("Add 17 and 25.", "<think>\n17+25=42\n</think>\n<answer>\n42\n</answer>", False),
        ("hi", "<answer>\nhello\n</answer>", True),
        ("How many legs have 3 cats and 2 birds in total?",
         "<think>\n3*4=12 and 2*2=4, so 12+4=16\n</think>\n<answer>\n16\n</answer>", False),
    ]
    docs = [tokenize_conversation(tokenizer, [{"role": "system", "content": "Be brief."},
                                              {"role": "user", "content": q},
                                              {"role": "assistant", "content": a}], assistant_only=only)
            for q, a, only in chats]
    return model, docs


def separate_loss_and_grads(model, docs):
    """The reference: each document alone, plain causal attention, positions 0..n-1."""
    model.set_attn_implementation("sdpa")
    model.zero_grad(set_to_none=True)
    total = 0.0
    for ids, labels in docs:
        labels = [X] + list(labels[1:])  # nothing predicts a document's first token
        loss = ce_sum(model(torch.tensor([ids]), use_cache=False).logits, torch.tensor([labels]))
        loss.backward()
        total += loss.item()
    return total, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("attn", [VARLEN_ATTENTION, "sdpa", "eager"])
def test_packed_row_loss_and_grads_equal_separate_documents(model_and_docs, tokenizer, attn):
    model, docs = model_and_docs
    lengths = [len(ids) for ids, _ in docs]
    assert len(set(lengths)) == 4
    rows, stats = pack(docs, max_seq_len=sum(lengths) + 5)
    assert stats.rows == 1 and len(rows[0].doc_lens) == 4
    want_loss, want_grads = separate_loss_and_grads(model, docs)

    batch = collate_packed(rows, tokenizer.pad_token_id, pad_to=sum(lengths) + 5)  # 5 padding tokens
    model.set_attn_implementation(attn)
    model.zero_grad(set_to_none=True)
    loss = ce_sum(model(**packed_model_inputs(batch, attn)).logits, batch["labels"])
    loss.backward()
    assert loss.item() == pytest.approx(want_loss, rel=1e-5)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, want_grads[name], rtol=1e-5, atol=1e-5, msg=name)
    model.set_attn_implementation("sdpa")


def test_without_the_block_mask_documents_leak(model_and_docs, tokenizer):
    # The same packed row under plain causal attention (one segment for the whole row): tokens
    # see the documents before them, so the loss moves far beyond the 1e-5 of the test above.
    model, docs = model_and_docs
    rows, _ = pack(docs, max_seq_len=sum(len(ids) for ids, _ in docs))
    batch = collate_packed(rows, tokenizer.pad_token_id)
    want_loss, _ = separate_loss_and_grads(model, docs)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        causal = block_causal_mask(torch.zeros_like(batch["segment_ids"]))
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=causal)
    assert abs(ce_sum(out.logits, batch["labels"]).item() - want_loss) > 1e-2


def test_varlen_attention_needs_boundaries_and_known_implementations(model_and_docs, tokenizer):
    model, docs = model_and_docs
    batch = collate_packed(pack(docs[:2], max_seq_len=200)[0], tokenizer.pad_token_id)
    model.set_attn_implementation(VARLEN_ATTENTION)
    try:
        with pytest.raises(ValueError, match="needs cu_seqlens"):
            model(input_ids=batch["input_ids"], use_cache=False)
        with pytest.raises(ValueError, match="crosses the end of row 0"):
            L = batch["input_ids"].shape[1]
            model(input_ids=batch["input_ids"].repeat(2, 1), use_cache=False, cu_seqlens=[0, L + 1, 2 * L])
    finally:
        model.set_attn_implementation("sdpa")
    with pytest.raises(ValueError, match="flash_attention_2"):
        packed_model_inputs(batch, "flash_attention_2")


# bench

def test_bench_quick_runs(capsys):
    spec = importlib.util.spec_from_file_location("bench_packing", ROOT / "bench" / "bench_packing.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    table, info = bench.main(["--quick"])
    by_method = {row["method"]: row for row in table}
    assert set(by_method) == {"packed", "padded"}
    assert by_method["packed"]["real_tokens"] == by_method["padded"]["real_tokens"]
    assert by_method["packed"]["efficiency"] > by_method["padded"]["efficiency"]
    assert by_method["packed"]["efficiency"] == pytest.approx(info["pack_efficiency"])
    assert "| packed | sdpa_varlen |" in capsys.readouterr().out
