"""One AdamW step over a model's parameters, PyTorch's three implementations side by side:
the per-tensor loop (`foreach=False`, PyTorch's default for CPU tensors), `foreach=True` and
`fused=True` (what `r1train.run.optim.build_optimizer` picks on CPU and CUDA). Same parameter
groups and hyper-parameters as the trainers; random gradients of the parameters' shapes.
Medians of --repeats steps after two warm-up steps; the implementations take turns.

    python bench/bench_optimizer.py [--model FOLDER] [--repeats 7]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

IMPLS = {"loop (foreach=False)": {"foreach": False}, "foreach=True": {"foreach": True},
         "fused=True": {"fused": True}}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="", help="model folder (default: build the embedded tiny model)")
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM

    from r1train.data.tiny import build_tiny_model
    from r1train.run.optim import build_optimizer

    path = args.model or str(build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", seed=0))
    params = [p for p in AutoModelForCausalLM.from_pretrained(path).parameters()]
    gen = torch.Generator().manual_seed(0)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    # the trainers' parameter groups (matrices decay, vectors do not); fresh dicts for each
    # optimizer, which writes its settings into them
    trainers = build_optimizer(params, 1e-6, 0.01, (0.9, 0.99)).param_groups
    opts = {name: torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in trainers],
                                    lr=1e-6, betas=(0.9, 0.99), eps=1e-8, **kw)
            for name, kw in IMPLS.items()}
    for opt in opts.values():  # warm-up: the state's allocation, then one ordinary step
        opt.step()
        opt.step()
    times = {name: [] for name in opts}
    for _ in range(args.repeats):
        for name, opt in opts.items():
            t0 = time.perf_counter()
            opt.step()
            times[name].append(time.perf_counter() - t0)
    print(f"model {args.model or 'embedded tiny'}: {len(params)} tensors, "
          f"{sum(p.numel() for p in params):,} parameters, {torch.get_num_threads()} threads")
    loop = statistics.median(times[next(iter(opts))])
    print("| AdamW | median ms | vs loop |\n| --- | --- | --- |")
    for name, t in times.items():
        m = statistics.median(t)
        print(f"| {name} | {m * 1e3:.1f} | {m / loop:.2f}x |")


if __name__ == "__main__":
    main()
