"""SFT throughput: packed rows vs padded batches, forward + backward of a small Qwen2.

    python bench/bench_packing.py                   # defaults: < 3 minutes on 2 CPU cores
    python bench/bench_packing.py --quick           # a few seconds (the test suite runs this)
    python bench/bench_packing.py --results bench/RESULTS.md   # also append the table there

Documents. Lengths (in tokens) are long-tailed like Bespoke-Stratos-17k's chats: lognormal with
median exp(MU) = 1024 and SIGMA = 0.8 (mean ~1410, ~4% of draws above 4096), rounded and clipped
to [64, 4096], seeded. These parameters are a stand-in chosen to match that shape, not fitted
to the dataset. Token ids are random; every token is a label.

Methods, on the same documents (so the same real tokens):
  packed  best-fit-decreasing rows of --max-seq-len (sft/packing.py `pack`), --rows-per-step
          rows a step, block-diagonal causal attention through "sdpa_varlen" (one causal SDPA
          call per document).
  padded  one document per row in data order, right-padded to the longest of its batch, stock
          "sdpa" with no mask (right padding never reaches a real token under causal
          attention: the fastest correct baseline). Batch size = documents per packed step on
          average, so both do the same real tokens per step.
  dense   (with --dense) packed rows through stock "sdpa" and a [B, 1, L, L] block mask: what
          packing costs without a varlen kernel.

Time: each step is forward + backward (mean cross-entropy), after one untimed warm-up step per
method; the methods' steps are interleaved so that load from other processes hits all alike.
Real tokens/s = real tokens / summed step time. Efficiency = real tokens / tokens computed.
Threads. The default is one torch thread. The 2 cores of the CPU machine are shared with other
processes; two threads then oversubscribe them, and OpenMP's barriers make each parallel kernel
wait for a descheduled thread, which hurts the many small per-document SDPA calls of "packed"
far more than the few large padded ones (measured at load ~3.5: packed 931 real tokens/s with 2
threads, 3091 with 1). `--threads 2` on an idle machine uses both cores. The 1-minute load
average is printed with the table.
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from r1train.data.tiny import TINY_MODEL_CONFIG  # noqa: E402
from r1train.sft.packing import (  # noqa: E402
    VARLEN_ATTENTION,
    best_fit_decreasing,
    collate_packed,
    collate_padded,
    pack,
    packed_model_inputs,
)

MU, SIGMA = math.log(1024), 0.8  # lognormal of document lengths: median 1024 tokens
MIN_LEN, MAX_LEN = 64, 4096
BESPOKE_ROWS = 16_710  # rows of Bespoke-Stratos-17k: the packing efficiency is also taken at that scale
QUICK = dict(docs=16, max_seq_len=256, mu=math.log(64), min_len=8, max_len=256, layers=2, full_scale=2000)


def doc_lengths(n: int, mu: float, sigma: float, lo: int, hi: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [min(hi, max(lo, round(rng.lognormvariate(mu, sigma)))) for _ in range(n)]


def make_model(args: argparse.Namespace):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = {**TINY_MODEL_CONFIG, "max_position_embeddings": args.max_seq_len,
              "num_hidden_layers": args.layers, "hidden_size": args.hidden,
              "intermediate_size": 3 * args.hidden}
    torch.manual_seed(args.seed)
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=args.vocab, **config))


def build_steps(args: argparse.Namespace):
    lengths = doc_lengths(args.docs, args.mu, args.sigma, args.min_len, args.max_len, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    docs = []
    for n in lengths:
        ids = torch.randint(3, args.vocab, (n,), generator=gen).tolist()
        docs.append((ids, ids))
    rows, stats = pack(docs, args.max_seq_len, overflow="truncate")
    packed = [collate_packed(rows[i : i + args.rows_per_step], pad_id=0, pad_to=args.max_seq_len)
              for i in range(0, len(rows), args.rows_per_step)]
    per_step = max(1, round(len(docs) / len(packed)))
    padded = [collate_padded(docs[i : i + per_step], pad_id=0) for i in range(0, len(docs), per_step)]
    return lengths, stats, packed, padded, per_step


def step_fn(model, method: str):
    def run(batch) -> float:
        start = time.perf_counter()
        if method == "padded":
            out = model(input_ids=batch["input_ids"], labels=batch["labels"], use_cache=False)
        else:
            out = model(**packed_model_inputs(batch, model.config._attn_implementation), labels=batch["labels"])
        out.loss.backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start
    return run


def measure(args: argparse.Namespace) -> tuple[list[dict], dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return _measure(args)
    finally:  # the test suite calls main() in its own process
        torch.set_num_threads(threads)


def _measure(args: argparse.Namespace) -> tuple[list[dict], dict]:
    load_before = os.getloadavg()[0]
    lengths, stats, packed, padded, per_step = build_steps(args)
    model = make_model(args)
    methods = {"packed": (VARLEN_ATTENTION, packed), "padded": ("sdpa", padded)}
    if args.dense:
        methods["dense"] = ("sdpa", packed)
    seconds = {m: 0.0 for m in methods}
    done = {m: 0 for m in methods}
    for m, (impl, steps) in methods.items():  # warm-up, untimed
        model.set_attn_implementation(impl)
        step_fn(model, m)(steps[0])
    # Interleave: always run the method that is least far through its steps.
    while any(done[m] < len(methods[m][1]) for m in methods):
        m = min((m for m in methods if done[m] < len(methods[m][1])), key=lambda m: done[m] / len(methods[m][1]))
        impl, steps = methods[m]
        model.set_attn_implementation(impl)
        seconds[m] += step_fn(model, m)(steps[done[m]])
        done[m] += 1

    real = sum(min(n, args.max_seq_len) for n in lengths)
    table = []
    for m, (impl, steps) in methods.items():
        computed = sum(b["input_ids"].numel() for b in steps)
        table.append(dict(method=m, attention=impl, steps=len(steps), batch=steps[0]["input_ids"].shape[0],
                          real_tokens=real, computed_tokens=computed, efficiency=real / computed,
                          seconds=seconds[m], tokens_per_s=real / seconds[m]))
    # Packing efficiency at the dataset's scale: bins of lengths only, no tokens needed.
    many = doc_lengths(args.full_scale, args.mu, args.sigma, args.min_len, args.max_len, args.seed + 1)
    bins = best_fit_decreasing(many, args.max_seq_len)
    info = dict(docs=len(lengths), mean_len=sum(lengths) / len(lengths), max_len=max(lengths),
                rows=stats.rows, pack_efficiency=stats.efficiency, truncated=stats.truncated,
                padded_batch=per_step, full_docs=len(many), full_mean=sum(many) / len(many),
                full_rows=len(bins), full_efficiency=sum(many) / (len(bins) * args.max_seq_len),
                load=(load_before, os.getloadavg()[0]))
    return table, info


def format_table(table: list[dict], info: dict) -> str:
    base = next(r for r in table if r["method"] == "padded")["tokens_per_s"]
    lines = ["| method | attention | steps x batch | real tokens | computed tokens | efficiency | "
             "seconds | real tokens/s | vs padded |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in table:
        lines.append(f"| {r['method']} | {r['attention']} | {r['steps']} x {r['batch']} | {r['real_tokens']} | "
                     f"{r['computed_tokens']} | {r['efficiency']:.1%} | {r['seconds']:.1f} | "
                     f"{r['tokens_per_s']:.0f} | {r['tokens_per_s'] / base:.2f}x |")
    lines.append(f"\n{info['docs']} documents, mean {info['mean_len']:.0f} tokens, longest {info['max_len']}; "
                 f"packed into {info['rows']} rows at {info['pack_efficiency']:.1%} efficiency "
                 f"({info['truncated']} truncated); padded batches of {info['padded_batch']} documents.\n"
                 f"Packing efficiency at dataset scale: {info['full_docs']} documents of the same distribution "
                 f"(mean {info['full_mean']:.0f} tokens) -> {info['full_rows']} rows, {info['full_efficiency']:.1%}.\n"
                 f"1-minute load average before / after: {info['load'][0]:.1f} / {info['load'][1]:.1f} "
                 "(other processes share the cores; small parallel kernels suffer most from that).")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"a few-second run: {QUICK}")
    p.add_argument("--docs", type=int, default=64, help="number of documents")
    p.add_argument("--max-seq-len", type=int, default=MAX_LEN, help="packed row length")
    p.add_argument("--mu", type=float, default=MU, help="lognormal mu of document lengths (ln tokens)")
    p.add_argument("--sigma", type=float, default=SIGMA, help="lognormal sigma of document lengths")
    p.add_argument("--min-len", type=int, default=MIN_LEN, help="shortest document (clip)")
    p.add_argument("--max-len", type=int, default=MAX_LEN, help="longest document (clip)")
    p.add_argument("--rows-per-step", type=int, default=1, help="packed rows per step")
    p.add_argument("--layers", type=int, default=TINY_MODEL_CONFIG["num_hidden_layers"], help="decoder layers")
    p.add_argument("--hidden", type=int, default=TINY_MODEL_CONFIG["hidden_size"], help="hidden size (MLP: 3x)")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary size")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1: see 'Threads' in the module docstring)")
    p.add_argument("--dense", action="store_true", help="also run packed rows with a dense [L, L] mask")
    p.add_argument("--full-scale", type=int, default=BESPOKE_ROWS,
                   help="documents for the dataset-scale packing efficiency (lengths only)")
    p.add_argument("--seed", type=int, default=0, help="seed of lengths, tokens and weights")
    p.add_argument("--results", type=Path, default=None, help="append the table to this markdown file")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> tuple[list[dict], dict]:
    args = parse_args(argv)
    table, info = measure(args)
    text = format_table(table, info)
    print(text)
    if args.results is not None:
        command = "python bench/bench_packing.py " + " ".join(a for a in (argv or sys.argv[1:]) if a)
        section = (f"\n## Packing (SFT)\n\n{datetime.date(2026, 11, 23)}, device: CPU (2 cores, shared), "
                   f"{args.threads} torch thread(s); tiny Qwen2 ({args.layers} layers, hidden {args.hidden}), "
                   "float32, forward + backward.\n"
                   f"Command: `{command}`\n\n{text}\n")
        with open(args.results, "a", encoding="utf-8") as f:
            f.write(section)
    return table, info


if __name__ == "__main__":
    main()
