"""Per-token log-probs of an LM head: eager vs chunked PyTorch vs compiled vs Triton.

    python bench/bench_logprobs.py                       # GPU sweep: N x H x T, bfloat16
    python bench/bench_logprobs.py --device cpu          # N=2048, H=896, V=151,936, float32
    python bench/bench_logprobs.py --tiny --no-compile   # a few seconds, any device
    python bench/bench_logprobs.py --device cpu --n 512 --h 576 --v 49152 --variants chunked \
        --no-compile --entropy --budgets 128 16 8        # the chunked path's CPU tile budget

Variants (all compute log p(target) of softmax((h W^T) / T), see kernels/logprobs.py):
  eager          matmul -> float -> /T -> log_softmax -> gather
  chunked        the chunked autograd.Function (impl="torch"), tiles from the default budget
  chunked:B      the same with tiles from a budget of B MiB (`--budgets`, CPU)
  compiled       torch.compile of the chunked path
  triton_logits  cuBLAS logits h @ W^T, then the Triton row kernel (GPU)
  triton_fused   the fused Triton kernel, no [N, V] tensor (GPU)
  logits_kernel  the Triton row kernel alone on given logits, for GB/s (GPU)
  mm             a plain [N, H] x [H, V] matmul: the throughput yardstick

Modes: "fwd" runs under no_grad (old-policy and reference log-probs); "fwd+bwd" also takes
gradients for hidden and weight (logits for logits_kernel) against a fixed upstream gradient.

Time: median of --reps calls after --warmup calls (CUDA events on GPU, perf_counter on CPU).
Work: 2NHV flops forward and 8NHV forward+backward (forward, recomputed forward, two gradient
matmuls) for every variant, a nominal count so that rows compare at equal work; "vs mm" is
that TFLOP/s over the plain matmul's, measured in the same run. logits_kernel reports GB/s
(N*V elements read forward; read, read and written forward+backward) against a device copy.
Peak memory, above the inputs: on GPU torch.cuda.max_memory_allocated over one call minus
what was allocated before it. On CPU each variant runs in a fresh subprocess; after a warm-up
call, the peak RSS of one call (VmHWM, reset by writing 5 to /proc/self/clear_refs) minus the
RSS before it, with glibc's mmap threshold pinned at 64 KiB (MALLOC_MMAP_THRESHOLD_) so freed
buffers leave the RSS at once instead of being kept by malloc (Linux only). On CPU the times
come from this process, all variants called in turn each repetition, so that load from other
work on a shared machine lands on every variant alike.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from r1train.kernels.logprobs import (  # noqa: E402  (the repository root is on sys.path just now)
    fused_linear_logprobs,
    tile_shape,
    token_logprobs,
    torch_linear_logprobs,
)

CPU_VARIANTS = ("eager", "chunked", "compiled")
GPU_VARIANTS = ("eager", "chunked", "compiled", "triton_logits", "triton_fused",
                "logits_kernel")
MODES = ("fwd", "fwd+bwd")


# ----------------------------------------------------------------------------------------
# one measured call
# ----------------------------------------------------------------------------------------
def make_inputs(N: int, H: int, V: int, dtype: torch.dtype, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    h = torch.randn(N, H, generator=gen, device=device, dtype=dtype)  # [N, H]
    w = torch.randn(V, H, generator=gen, device=device, dtype=dtype).div_(H ** 0.5)  # [V, H]
    y = torch.randint(0, V, (N,), generator=gen, device=device)  # [N]
    g = torch.randn(N, generator=gen, device=device)  # [N] upstream gradient of the logps
    g_ent = torch.randn(N, generator=gen, device=device)  # [N] ... and of the entropies
    return h, w, y, g, g_ent


def make_step(variant: str, mode: str, inputs, temperature: float, entropy: bool):
    """A zero-argument callable running `variant` once in `mode`."""
    h, w, y, g, g_ent = inputs
    if variant == "mm":
        return lambda: h @ w.T
    tiles = None
    if variant.startswith("chunked:"):  # an explicit tile budget, in MiB
        tiles = tile_shape(h.shape[0], w.shape[0], int(variant.partition(":")[2]) * 2**20, h.element_size())
    if variant == "logits_kernel":
        logits = (h @ w.T).detach()  # an input here, not part of the measured call
        params = [logits.requires_grad_(mode == "fwd+bwd")]
        fn = lambda x: token_logprobs(x, y, temperature, entropy, impl="triton")  # noqa: E731
    else:
        params = [h.detach().requires_grad_(mode == "fwd+bwd"),
                  w.detach().requires_grad_(mode == "fwd+bwd")]
        if variant == "compiled":
            compiled = torch.compile(torch_linear_logprobs)
            fn = lambda a, b: compiled(a, b, y, temperature, entropy)  # noqa: E731
        elif tiles is not None:
            fn = lambda a, b: torch_linear_logprobs(a, b, y, temperature, entropy, tiles=tiles)  # noqa: E731
        elif variant == "triton_logits":
            fn = lambda a, b: token_logprobs(a @ b.T, y, temperature, entropy,  # noqa: E731
                                             impl="triton")
        else:
            impl = {"eager": "eager", "chunked": "torch", "triton_fused": "triton"}[variant]
            fn = lambda a, b: fused_linear_logprobs(a, b, y, temperature, entropy,  # noqa: E731
                                                    impl=impl)
    if mode == "fwd":
        def step():
            with torch.no_grad():
                return fn(*params)
        return step

    def step():
        out = fn(*params)
        outs, grads = ((out[0], out[1]), (g, g_ent)) if entropy else ((out,), (g,))
        return torch.autograd.grad(outs, params, grads)
    return step


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_time(step, reps: int, warmup: int, device: str) -> float:
    for _ in range(warmup):
        step()
    _sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _proc_status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def peak_bytes(step, device: str) -> int:
    """Peak memory of one call above what was in use before it (module docstring)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _proc_status_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        out = step()
        peak = (_proc_status_kb("VmHWM") - base) * 1024
    del out
    return peak


def measure(variant: str, mode: str, inputs, args, temperature: float) -> dict:
    step = make_step(variant, mode, inputs, temperature, args.entropy)
    t = median_time(step, args.reps, args.warmup, args.device)  # warms up compile and caches
    return {"variant": variant, "mode": mode, "T": temperature, "time_s": t,
            "peak_bytes": peak_bytes(step, args.device)}


# ----------------------------------------------------------------------------------------
# CPU: memory in one fresh subprocess per variant, time interleaved in this process
# ----------------------------------------------------------------------------------------
def worker(args) -> None:
    """Peak memory of one call of `args.worker`, after a warm-up call, per mode and T."""
    inputs = make_inputs(args.n, args.h, args.v, getattr(torch, args.dtype), "cpu")
    for T in args.temperatures:
        for mode in (("fwd",) if args.worker == "mm" else MODES):
            step = make_step(args.worker, mode, inputs, T, args.entropy)
            step()
            print("RESULT " + json.dumps({"variant": args.worker, "mode": mode, "T": T,
                                          "peak_bytes": peak_bytes(step, "cpu")}), flush=True)


def run_cpu(args) -> list[dict]:
    variants = ("mm",) + tuple(v for v in args.variants if v in CPU_VARIANTS) \
        + tuple(f"chunked:{b}" for b in args.budgets)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    peaks = {}
    for variant in variants:
        cmd = [sys.executable, __file__, "--worker", variant, *args.argv]
        res = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if res.returncode != 0:
            raise RuntimeError(f"memory worker for {variant} failed:\n{res.stderr[-3000:]}")
        for line in res.stdout.splitlines():
            if line.startswith("RESULT "):
                r = json.loads(line[len("RESULT "):])
                peaks[r["variant"], r["mode"], r["T"]] = r["peak_bytes"]
    # Round-robin over the variants, so that a change of load on a shared machine hits all
    # of them alike instead of whichever happened to run at that moment.
    inputs = make_inputs(args.n, args.h, args.v, getattr(torch, args.dtype), "cpu")
    keys = [(v, m, T) for T in args.temperatures for v in variants
            for m in (("fwd",) if v == "mm" else MODES)]
    steps = {k: make_step(k[0], k[1], inputs, k[2], args.entropy) for k in keys}
    for _ in range(args.warmup):
        for step in steps.values():
            step()
    times = {k: [] for k in keys}
    for _ in range(args.reps):
        for k, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t0)
    return [{"variant": v, "mode": m, "T": T, "time_s": statistics.median(times[v, m, T]),
             "peak_bytes": peaks[v, m, T]} for v, m, T in keys]


# ----------------------------------------------------------------------------------------
# GPU: everything in this process
# ----------------------------------------------------------------------------------------
def copy_gbps(reps: int) -> float:
    x = torch.empty(2**28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    t = median_time(lambda: y.copy_(x), reps, 3, "cuda")
    return 2 * x.numel() * 4 / t / 1e9  # read + write


def run_gpu(args) -> list[dict]:
    rows, copy = [], copy_gbps(args.reps)
    print(f"# device copy: {copy:.0f} GB/s")
    for N in args.ns:
        for H in args.hs:
            inputs = make_inputs(N, H, args.v, getattr(torch, args.dtype), "cuda")
            for T in args.temperatures:
                for variant in ("mm",) + tuple(args.variants):
                    for mode in (("fwd",) if variant == "mm" else MODES):
                        try:
                            r = measure(variant, mode, inputs, args, T)
                        except torch.cuda.OutOfMemoryError:
                            r = {"variant": variant, "mode": mode, "T": T, "time_s": None,
                                 "peak_bytes": None}
                        torch.cuda.empty_cache()
                        r.update(N=N, H=H, copy_gbps=copy)
                        rows.append(r)
            del inputs
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------
def format_table(rows: list[dict], args) -> str:
    """The markdown table of `rows`, then one line per variant: its time and memory over eager's."""
    esize = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    lines = ["| N | H | T | variant | mode | time ms | peak MiB | TFLOP/s | vs mm | GB/s | vs copy |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        N, H = r.get("N", args.n), r.get("H", args.h)
        if r["time_s"] is None:
            lines.append(f"| {N} | {H} | {r['T']} | {r['variant']} | {r['mode']} | OOM | | | | | |")
            continue
        mm = next(x for x in rows if x["variant"] == "mm" and x["T"] == r["T"]
                  and x.get("N") == r.get("N") and x.get("H") == r.get("H"))
        mm_tflops = 2 * N * H * args.v / mm["time_s"] / 1e12
        flops = (2 if r["mode"] == "fwd" else 8) * N * H * args.v
        tflops = flops / r["time_s"] / 1e12
        gbps = vs_copy = ""
        if r["variant"] == "logits_kernel":
            tflops_s, vs_mm = "", ""
            moved = (1 if r["mode"] == "fwd" else 3) * N * args.v * esize
            gbps = f"{moved / r['time_s'] / 1e9:.0f}"
            vs_copy = f"{moved / r['time_s'] / 1e9 / r['copy_gbps']:.2f}"
        else:
            tflops_s, vs_mm = f"{tflops:.3f}", f"{tflops / mm_tflops:.2f}"
        lines.append(f"| {N} | {H} | {r['T']} | {r['variant']} | {r['mode']} "
                     f"| {r['time_s'] * 1e3:.1f} | {r['peak_bytes'] / 2**20:.1f} | {tflops_s} "
                     f"| {vs_mm} | {gbps} | {vs_copy} |")
    budgets = [f"chunked:{b}" for b in args.budgets]
    pairs = [(v, "eager") for v in ("chunked", "compiled", "triton_fused", *budgets)]
    pairs += [(v, "chunked") for v in budgets]
    for other, against in pairs:
        for r in rows:
            if r["variant"] != other or r["time_s"] is None:
                continue
            base = next((x for x in rows if x["variant"] == against and x["mode"] == r["mode"]
                         and x["T"] == r["T"] and x.get("N") == r.get("N")
                         and x.get("H") == r.get("H") and x["time_s"] is not None), None)
            if base is not None:
                lines.append(f"{other}/{against} N={r.get('N', args.n)} H={r.get('H', args.h)} "
                             f"T={r['T']} {r['mode']}: time {r['time_s'] / base['time_s']:.2f}x, "
                             f"peak memory {r['peak_bytes'] / max(base['peak_bytes'], 1):.2f}x")
    return "\n".join(lines)


# The GPU targets of the fused kernel (the kernels issue), against eager and a plain matmul.
TARGETS = (
    ("triton_fused fwd+bwd peak memory / eager's", "fwd+bwd", "peak", "<=", 0.10),
    ("triton_fused fwd time / eager's", "fwd", "time", "<=", 0.80),
    ("triton_fused fwd+bwd time / eager's", "fwd+bwd", "time", "<=", 1.20),
    ("triton_fused fwd rate / plain matmul's", "fwd", "vs_mm", ">=", 0.50),
)
LOGITS_KERNEL_TARGET = 0.60  # the row kernel on given logits: bytes/s over a device copy's


def check_targets(rows: list[dict], args) -> list[dict]:
    """One row per target and measured shape: {name, N, H, T, value, target, ok}."""
    out = []
    esize = torch.empty(0, dtype=getattr(torch, args.dtype)).element_size()
    for r in rows:
        if r["variant"] == "logits_kernel" and r["time_s"] is not None and "copy_gbps" in r:
            moved = (1 if r["mode"] == "fwd" else 3) * r["N"] * args.v * esize
            value = moved / r["time_s"] / 1e9 / r["copy_gbps"]
            out.append({"name": f"logits_kernel {r['mode']} bytes/s / device copy's", "N": r["N"],
                        "H": r["H"], "T": r["T"], "value": value,
                        "target": f">= {LOGITS_KERNEL_TARGET}", "ok": value >= LOGITS_KERNEL_TARGET})
        if r["variant"] != "triton_fused" or r["time_s"] is None:
            continue
        same = [x for x in rows if x["T"] == r["T"] and x.get("N") == r.get("N")
                and x.get("H") == r.get("H") and x["time_s"] is not None]
        eager = next((x for x in same if x["variant"] == "eager" and x["mode"] == r["mode"]), None)
        mm = next((x for x in same if x["variant"] == "mm"), None)
        for name, mode, what, op, target in TARGETS:
            if mode != r["mode"]:
                continue
            if what == "vs_mm":
                flops = 2 if mode == "fwd" else 8  # nominal, as in the table
                value = None if mm is None else flops * mm["time_s"] / (2 * r["time_s"])
            elif eager is None:
                value = None
            elif what == "peak":
                value = r["peak_bytes"] / max(eager["peak_bytes"], 1)
            else:
                value = r["time_s"] / eager["time_s"]
            ok = None if value is None else (value <= target if op == "<=" else value >= target)
            out.append({"name": name, "N": r.get("N", args.n), "H": r.get("H", args.h), "T": r["T"],
                        "value": value, "target": f"{op} {target}", "ok": ok})
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   choices=["cpu", "cuda"], help="where to run (default: cuda if present)")
    p.add_argument("--n", type=int, default=2048, help="tokens on CPU (GPU: --ns)")
    p.add_argument("--h", type=int, default=896, help="hidden size on CPU (GPU: --hs)")
    p.add_argument("--v", type=int, default=151_936, help="vocabulary size (Qwen2.5)")
    p.add_argument("--ns", type=int, nargs="+", default=[2048, 8192, 16384], help="GPU tokens")
    p.add_argument("--hs", type=int, nargs="+", default=[896, 3584], help="GPU hidden sizes")
    p.add_argument("--temperatures", type=float, nargs="+", default=None,
                   help="sampling temperatures (default: 1.0 0.7 on GPU, 1.0 on CPU)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="input dtype (default: bfloat16 on GPU, float32 on CPU)")
    p.add_argument("--entropy", action="store_true", help="also return (and backprop) entropy")
    p.add_argument("--variants", nargs="+", default=None, help="subset of the variants")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    p.add_argument("--budgets", type=int, nargs="+", default=[],
                   help="CPU: also the chunked path with tiles from each of these budgets, MiB")
    p.add_argument("--reps", type=int, default=None, help="timed calls (default 10 GPU, 3 CPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed calls first (3 GPU, 1 CPU)")
    p.add_argument("--tiny", action="store_true", help="N=64, H=32, V=1000, 2 reps: a smoke run")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the CPU memory workers
    gpu = args.device == "cuda"
    args.temperatures = args.temperatures or ([1.0, 0.7] if gpu else [1.0])
    args.dtype = args.dtype or ("bfloat16" if gpu else "float32")
    args.reps = args.reps or (10 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
    args.variants = args.variants or list(GPU_VARIANTS if gpu else CPU_VARIANTS)
    if args.no_compile:
        args.variants = [v for v in args.variants if v != "compiled"]
    if args.tiny:
        args.n, args.h, args.v, args.ns, args.hs, args.reps = 64, 32, 1000, [64], [32], 2
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)
    where = torch.cuda.get_device_name() if args.device == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads"
    print(f"# {where}; torch {torch.__version__}; {args.dtype}; V={args.v}; "
          f"entropy={args.entropy}; median of {args.reps} after {args.warmup} warm-up")
    rows = run_gpu(args) if args.device == "cuda" else run_cpu(args)
    print(format_table(rows, args))


if __name__ == "__main__":
    main()
