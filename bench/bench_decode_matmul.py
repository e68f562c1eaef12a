"""A decode step's matrix products on the CPU: `F.linear` (x @ W^T) against the engine's
few-row form (W @ x^T)^T (`r1train.model.engine.few_row_linears`), side by side in one run.

Rows are a decode step's live rows (one token each). Per weight shape, and for all the matrices
of one decode step of a SmolLM2-135M-shaped model (30 layers of q, k, v, o, gate, up, down, then
the 576 x 49,152 output embedding), each a distinct random float32 matrix so that the step reads
its weights from memory as a real one does. Medians of --repeats after a warm-up; the two forms
alternate.

    python bench/bench_decode_matmul.py [--rows 1,16,64,128] [--threads 2]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from r1train.model.engine import few_row_linears  # noqa: E402

# SmolLM2-135M: hidden 576, MLP 1536, 3 KV heads of 64, 30 layers, vocabulary 49,152
HIDDEN, MLP, KV, LAYERS, VOCAB = 576, 1536, 192, 30, 49152
LAYER_SHAPES = [("q/o", HIDDEN, HIDDEN), ("k/v", HIDDEN, KV), ("gate/up", HIDDEN, MLP), ("down", MLP, HIDDEN)]


def _linears(shapes: list[tuple[int, int]]) -> nn.ModuleList:
    with torch.no_grad():
        return nn.ModuleList(nn.Linear(k, n, bias=False) for k, n in shapes)


def _time(fn) -> float:
    """Seconds of one call of `fn`, after an untimed one."""
    fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _pair(model: nn.ModuleList, inputs: list[torch.Tensor], repeats: int) -> tuple[float, float]:
    """(F.linear s, few-row s) for one pass over `model` with `inputs` (one per layer)."""
    def run():
        for layer, x in zip(model, inputs):
            layer(x)
    times = {"linear": [], "few": []}
    for _ in range(repeats):  # alternate, so that drift in the machine hits both
        times["linear"].append(_time(run))
        with few_row_linears(model):
            times["few"].append(_time(run))
    return statistics.median(times["linear"]), statistics.median(times["few"])


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,16,64,128")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"torch {torch.__version__}, {args.threads} threads, float32, medians of {args.repeats}\n")
    print("| weight (in x out) | rows | F.linear ms | (W @ x^T)^T ms | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for name, k, n in [*LAYER_SHAPES, ("output embedding", HIDDEN, VOCAB)]:
        count = 1 if n == VOCAB else 16  # 16 distinct matrices: out of the cache, as in a model
        model = _linears([(k, n)] * count)
        for r in rows:
            a, b = _pair(model, [torch.randn(r, 1, k)] * count, args.repeats)
            print(f"| {name} {k} x {n} | {r} | {a / count * 1e3:.3f} | {b / count * 1e3:.3f} | {b / a:.2f}x |")
    shapes = [(HIDDEN, HIDDEN), (HIDDEN, KV), (HIDDEN, KV), (HIDDEN, HIDDEN), (HIDDEN, MLP), (HIDDEN, MLP),
              (MLP, HIDDEN)] * LAYERS + [(HIDDEN, VOCAB)]
    model = _linears(shapes)
    print("\n| one decode step, SmolLM2-135M shapes | rows | F.linear ms | (W @ x^T)^T ms | ratio |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        inputs = [torch.randn(r, 1, k) for k, _ in shapes]
        a, b = _pair(model, inputs, args.repeats)
        print(f"| {len(shapes)} matrices | {r} | {a * 1e3:.1f} | {b * 1e3:.1f} | {b / a:.2f}x |")


if __name__ == "__main__":
    main()
