"""The GPU suite: one command that checks and measures the GPU path in about 8 minutes on one
H100/H200, and writes a markdown report with the GPU, the versions and the date.

    python bench/gpu_suite.py --out bench/gpu_suite.md       # on a GPU machine
    python bench/gpu_suite.py --dry-run --out /tmp/s.md      # CPU, tiny shapes, ~1 minute

Each part runs in its own subprocess under its own time limit, so that a crash, a hang or a
CUDA error in one part does not hide the others:

  tests     the CUDA tests (`pytest -k cuda`): compiled Triton kernels against float64
  logprobs  the fused kernels' launch shapes timed at N=16384, H=896, V=151,936 in bf16;
            then bench/bench_logprobs.py at that shape, T = 1.0 and 0.7, with the fastest:
            time and peak memory against eager and a plain cuBLAS matmul, checked against the
            kernels issue's targets
  model     a Qwen2.5-0.5B-shaped model (its config, random weights: nothing to download)
            and a tokenizer whose vocabulary fills its 151,936-row embedding; used below
  grpo      GRPO steps of the trainer itself on that model, FSDP2 over NCCL in one process
            (`--train.fsdp always`), bf16: time by phase, tokens/s, peak memory; then again
            with a reference model (beta 0.04) and gradient checkpointing; the plain path;
            without FSDP
  rollout   completion tokens/s of r1train.model.engine.generate against HF `generate` at 64 and 256
            rows (bf16 weights, sampling at T = 1, the same prompts)
  sft       packed SFT steps of the trainer (rows of 4096 tokens, varlen attention, autocast
            bf16): tokens/s and peak memory; and one forward+backward of the same rows with the
            dense block-mask SDPA instead, for comparison
  decode    the engine's decode step at 16, 64 and 256 rows (prompts of ~110 tokens, 192 new
            tokens: contexts up to ~300), eager and compiled (over the decode-only forward of
            model/decode_forward.py, and at 64 rows over HF's forward too), against HF
            `generate` at 64 rows; then a profile of compiled steps: GPU kernels, graph
            launches and host syncs per step
  compiled  the compiled decode (`rollout.compile_decode`: CUDA graphs over a static cache)
            against the eager one: GRPO steps of the trainer (no FSDP), then its greedy rows
            against the eager engine's in float32; after the others, so that its compilation
            cannot cost them their time
  main      the main job, `torchrun --nproc_per_node=1 train.py`, on the GPU: wall time and
            its table of held-out results

The report ends with a block of `key: value` lines (`decode_ms_64`, `rollout_vs_hf_64`,
`grpo_generate_share`, `main_job_wall_s`, ...) so that runs compare at a glance. Without
`--out` it is written to bench/gpu/<date>-<gpu>.md. Issue 28's run (about 9 minutes):

    python bench/gpu_suite.py --parts tests,model,decode,compiled,main --budget 570

It needs only torch, triton, transformers, tokenizers, safetensors, pyyaml and pytest: the GRPO
rewards are text-only ones and the data is the embedded task, so the lent GPU machines (which
lack datasets, math-verify and gguf, and cannot download) run it as they are.
`--dry-run` runs every part on the CPU with tiny shapes (the test suite does, so that the suite
cannot rot); `tests` then only collects the CUDA tests, and `logprobs` skips the tile sweep.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

# Qwen2.5-0.5B(-Instruct)'s config.json, less what does not change the compute.
QWEN25_05B = dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
                  rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
                  vocab_size=151_936)
QWEN25_TOKENS = 151_665  # tokens of its tokenizer; the embedding table is padded past them
DRY_MODEL = dict(QWEN25_05B, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)
DRY_TOKENS = 1000

# name: (time limit in seconds, needs the model part). Run in this order.
PARTS = {
    "tests": (150, False),
    "logprobs": (150, False),
    "model": (90, False),
    "grpo": (200, True),
    "rollout": (110, True),
    "sft": (90, True),
    "decode": (250, True),
    "compiled": (200, True),
    "main": (240, False),
}


# ----------------------------------------------------------------------------------------
# helpers shared by the parts
# ----------------------------------------------------------------------------------------
def device(dry: bool) -> str:
    return "cpu" if dry else "cuda"


def model_dir(workdir: Path) -> Path:
    return workdir / "qwen2.5-0.5b-shaped"


def md_table(header: list[str], rows: list[list]) -> str:
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def build_wide_tokenizer(path: Path, size: int):
    """The embedded tokenizer (Qwen's special tokens and chat template), its vocabulary filled
    up to `size` ids with placeholder entries `<x{id}>`, so that any id the model samples
    decodes, as with a real 151k tokenizer. Encoding never produces the placeholders."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from r1train.data.tiny import build_tiny_tokenizer

    tiny = build_tiny_tokenizer(0)
    spec = json.loads(tiny.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    for i in range(len(tiny), size):  # after the added tokens (<think> ...), which keep their ids
        vocab[f"<x{i}>"] = i
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                  eos_token=tiny.eos_token, pad_token=tiny.pad_token,
                                  bos_token=None, unk_token=None,
                                  clean_up_tokenization_spaces=False)
    tok.chat_template = tiny.chat_template
    tok.save_pretrained(path)
    return tok


# ----------------------------------------------------------------------------------------
# the parts: each returns {"table": markdown, "checks": [...], "notes": [...]}
# ----------------------------------------------------------------------------------------
def part_tests(dry: bool, workdir: Path) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_kernels.py",
           "tests/test_decode_forward.py", "-k", "cuda", "-rs"] + (["--collect-only"] if dry else [])
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    out = res.stdout + res.stderr
    summary = [ln for ln in out.splitlines() if ln.strip()][-1:] or ["(no output)"]
    collected = sum(1 for ln in out.splitlines() if "::test_cuda" in ln)
    ok = res.returncode == 0 and (collected > 0 if dry else " passed" in summary[0]
                                  and "failed" not in summary[0] and "error" not in summary[0])
    if not ok:
        print(out[-6000:])
    return {"table": f"`{' '.join(cmd[2:])}`: {summary[0]}",
            "checks": [{"name": "CUDA tests " + ("collected" if dry else "pass"),
                        "value": summary[0], "target": "all pass", "ok": ok}]}


# Launch shapes the fused kernels are timed with (BLOCK_N, BLOCK_V, BLOCK_K, warps, stages).
TILE_CANDIDATES = [(128, 128, 64, 8, 3), (64, 128, 64, 4, 4), (64, 128, 64, 4, 3),
                   (64, 128, 64, 4, 5), (64, 256, 64, 4, 3), (64, 256, 64, 8, 3),
                   (64, 128, 128, 4, 3), (64, 64, 64, 4, 4), (128, 256, 64, 8, 3),
                   (128, 128, 64, 8, 4), (64, 128, 64, 8, 4), (128, 64, 64, 4, 4)]


def tile_sweep(N: int, H: int, V: int) -> tuple[str, tuple, tuple]:
    """Time the fused kernels per candidate launch shape at [N, H] x [V, H] in bf16: the table,
    and the fastest shapes for the forward kernel and for the backward's logit-gradient kernel
    (fwd+bwd minus fwd of the same shape)."""
    from r1train.kernels.triton_logprobs import TILES, Tiles, triton_linear_logprobs

    from bench_logprobs import make_inputs, median_time

    h, w, y, g, _ = make_inputs(N, H, V, torch.bfloat16, "cuda")
    hg, wg = h.detach().requires_grad_(), w.detach().requires_grad_()
    candidates = list(dict.fromkeys([TILES[16, "forward"], TILES[16, "backward"],
                                     *(Tiles(*c) for c in TILE_CANDIDATES)]))
    rows, fwd, bwd = [], {}, {}
    for tiles in candidates:
        try:
            def fwd_only():
                with torch.no_grad():
                    return triton_linear_logprobs(h, w, y, blocks=tiles)

            def fwd_bwd():
                return torch.autograd.grad(triton_linear_logprobs(hg, wg, y, blocks=tiles),
                                           (hg, wg), g)
            tf, tb = median_time(fwd_only, 5, 2, "cuda"), median_time(fwd_bwd, 5, 2, "cuda")
        except Exception as e:  # a shape that does not compile (shared memory) is a result too
            rows.append([str(tuple(tiles)), f"failed: {type(e).__name__}: {str(e)[:80]}", "", "", ""])
            continue
        fwd[tiles], bwd[tiles] = tf, tb - tf
        rows.append([str(tuple(tiles)), tf * 1e3, tb * 1e3, (tb - tf) * 1e3,
                     f"{2 * N * H * V / tf / 1e12:.0f}"])
    best_f, best_b = min(fwd, key=fwd.get), min(bwd, key=bwd.get)
    table = md_table(["tiles (BN, BV, BK, warps, stages)", "fwd ms", "fwd+bwd ms", "bwd ms",
                      "fwd TFLOP/s"], rows)
    return table + (f"\n\nN={N}, H={H}, V={V}, bf16, T=1; medians of 5 after 2 warm-ups. "
                    f"Project defaults: forward {tuple(TILES[16, 'forward'])}, backward "
                    f"{tuple(TILES[16, 'backward'])}; fastest here: forward {tuple(best_f)}, "
                    f"backward {tuple(best_b)}."), best_f, best_b


def part_logprobs(dry: bool, workdir: Path) -> dict:
    """The tile sweep, then bench_logprobs with the fastest tiles (said in the report)."""
    import r1train.kernels.triton_logprobs as triton_kernels

    from bench_logprobs import check_targets, format_table, parse_args, run_cpu, run_gpu

    sweep = ""
    if dry:
        args = parse_args(["--device", "cpu", "--tiny", "--no-compile", "--threads", "1"])
        rows = run_cpu(args)
    else:
        sweep, best_f, best_b = tile_sweep(16384, 896, 151_936)
        triton_kernels.TILES[16, "forward"], triton_kernels.TILES[16, "backward"] = best_f, best_b
        args = parse_args(["--ns", "16384", "--hs", "896", "--temperatures", "1.0", "0.7",
                           "--variants", "eager", "chunked", "triton_logits", "triton_fused",
                           "logits_kernel"])
        rows = run_gpu(args)
        sweep = (sweep + f"\n\nThe table below runs triton_fused with forward tiles "
                 f"{tuple(best_f)} and backward tiles {tuple(best_b)}.\n\n")
    checks = [{"name": f"{c['name']} (N={c['N']}, T={c['T']})", "value": c["value"],
               "target": c["target"], "ok": c["ok"]} for c in check_targets(rows, args)]
    return {"table": sweep + format_table(rows, args), "checks": checks}


def part_model(dry: bool, workdir: Path) -> dict:
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    path = model_dir(workdir)
    shape, tokens = (DRY_MODEL, DRY_TOKENS) if dry else (QWEN25_05B, QWEN25_TOKENS)
    t0 = time.perf_counter()
    tok = build_wide_tokenizer(path, tokens)
    cfg = Qwen2Config(bos_token_id=None, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(0)
    with torch.device(device(dry)):
        lm = Qwen2ForCausalLM(cfg)
    lm.generation_config = GenerationConfig(eos_token_id=tok.eos_token_id,
                                            pad_token_id=tok.pad_token_id, bos_token_id=None)
    lm.to(torch.bfloat16).save_pretrained(path)
    n = sum(p.numel() for p in lm.parameters())
    return {"table": f"{n / 1e6:.1f}M parameters ({', '.join(f'{k}={v}' for k, v in shape.items())}); "
                     f"tokenizer of {len(tok)} tokens; built and saved in "
                     f"{time.perf_counter() - t0:.1f} s", "checks": []}


def part_grpo(dry: bool, workdir: Path) -> dict:
    from r1train.grpo.config import GRPOJobConfig
    from r1train.grpo.trainer import GRPOTrainer

    from bench_grpo_step import TEXT_REWARDS, time_grpo_steps

    prompts, group, max_new, micro = (2, 2, 8, 2) if dry else (8, 8, 192, 16)
    rows, checks = [], []
    runs = (("FSDP2, policy only", "always", 0.0, False, True),
            ("FSDP2, + reference (beta 0.04), gradient checkpointing", "always", 0.04, True, True),
            ("the same, plain path (engine plain, padded passes)", "always", 0.04, True, False),
            ("no FSDP (autocast bf16), policy only", "auto", 0.0, False, True))
    for name, fsdp, beta, ckpt, packed in runs:
        cfg = GRPOJobConfig()
        cfg.model.path, cfg.model.gradient_checkpointing = str(model_dir(workdir)), ckpt
        cfg.data.num_train, cfg.data.num_eval = 64, 4
        cfg.rollout.group_size, cfg.rollout.max_new_tokens = group, max_new
        cfg.grpo.prompts_per_step, cfg.grpo.micro_batch_size = prompts, micro
        cfg.grpo.beta, cfg.grpo.rewards = beta, TEXT_REWARDS
        cfg.train.device, cfg.train.fsdp, cfg.train.progress = device(dry), fsdp, False
        cfg.grpo.packing = packed
        cfg.train.output_dir = str(workdir / f"grpo-{len(rows)}")
        try:
            trainer = GRPOTrainer(cfg)
            trainer.engine.plain = not packed
            assert trainer.info.distributed == (fsdp == "always"), "FSDP2 should be on iff always"
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            r = time_grpo_steps({name: trainer}, repeats=1 if dry else 2)[name]
        except Exception as e:  # the other runs still go
            traceback.print_exc()
            rows.append([name, f"failed: {type(e).__name__}: {str(e)[:200]}"] + [""] * 8)
            checks.append({"name": f"GRPO steps, {name}", "value": "failed", "target": "runs",
                           "ok": False})
            continue
        finally:
            trainer = None
            gc.collect()
        med = {k: statistics.median(v) for k, v in r["phases"].items()}
        tokens = r["prompt_tokens"] + r["completion_tokens"]
        rows.append([name, r["rows"], f"{r['prompt_tokens'] / r['rows']:.0f} + "
                     f"{r['completion_tokens'] / r['rows']:.0f}", med["generate"],
                     med["old/ref log-probs"], med["update"], med["total"],
                     f"{r['completion_tokens'] / med['generate']:.0f}",
                     f"{tokens / med['update']:.0f}", f"{r.get('peak_gib', float('nan')):.1f}"])
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else "none"
    checks.append({"name": "GRPO steps under FSDP2", "value": f"process group {backend}",
                   "target": "nccl" if not dry else "gloo", "ok": backend == ("gloo" if dry else "nccl")})
    table = md_table(["run", "completions", "tokens/row (prompt + completion)", "generate s",
                      "old/ref logps s", "update s", "step s", "generated tok/s",
                      "update tok/s", "peak GiB"], rows)
    note = (f"{prompts} prompts x {group} completions, up to {max_new} new tokens, micro-batches "
            f"of {micro}, num_iterations 1, rewards {', '.join(TEXT_REWARDS)}; medians of "
            f"{1 if dry else 2} steps after a warm-up step. update tok/s counts prompt and "
            f"completion tokens of the forward + backward.")
    return {"table": table + "\n\n" + note, "checks": checks}


def part_rollout(dry: bool, workdir: Path) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from transformers import AutoModelForCausalLM

    from r1train.data.problems import encode_prompts
    from r1train.data.task import TaskConfig, task_records
    from r1train.model.engine import pad_prompts
    from r1train.model.load import eos_token_ids, load_tokenizer
    from r1train.model.policy import PolicyModel

    from bench_grpo_step import rollout_generators, time_rollouts

    dev = device(dry)
    path = str(model_dir(workdir))
    tok = load_tokenizer(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if not dry else torch.float32)
    lm = lm.to(dev).eval()
    policy = PolicyModel(lm)
    _, ids, _ = encode_prompts(tok, task_records(TaskConfig(), 32, seed=1))
    max_new = 8 if dry else 128
    rows = []
    for n in ((4, 8) if dry else (64, 256)):
        pid, pmask = pad_prompts([ids[i % len(ids)] for i in range(n)], tok.pad_token_id, dev)
        gens = rollout_generators(policy, lm, tok, pid, pmask, max_new, eos_token_ids(tok, lm))
        if not dry:  # does cuDNN's per-shape attention plan cost decoding what it cost SFT?
            ours = gens["model.engine.generate"]

            def ours_no_cudnn():
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                                  SDPBackend.MATH]):
                    return ours()
            gens["model.engine.generate, cuDNN SDPA off"] = ours_no_cudnn
        for r in time_rollouts(gens, repeats=2, device=dev):
            rows.append([n, r["generator"], r["seconds"], f"{r['tokens']:.0f}",
                         f"{r['tokens_per_s']:.0f}", f"{r['vs_hf']:.2f}"])
    note = (f"prompts of {min(map(len, ids))}-{max(map(len, ids))} tokens (the R1 system prompt), "
            f"{max_new} new tokens, temperature 1, bf16 weights, no FSDP; medians of 2 after a "
            f"warm-up, the generators taking turns.")
    return {"table": md_table(["rows", "generator", "median s", "tokens", "tokens/s", "vs HF"],
                              rows) + "\n\n" + note, "checks": []}


def part_decode(dry: bool, workdir: Path) -> dict:
    """Decode steps of the engine, eager and compiled, at 16 / 64 / 256 rows; HF `generate` at
    64; a profile of compiled steps. A step's time is a generate call's time over its steps
    (prefill included: ~1% of a 192-token call); rows run to the end (random weights rarely
    sample the EOS id). The engine reads which rows are done every SYNC_EVERY steps, as
    `Engine` does on a GPU."""
    from transformers import AutoModelForCausalLM

    from r1train.data.problems import encode_prompts
    from r1train.data.task import TaskConfig, task_records
    from r1train.model.engine import SYNC_EVERY, generate, pad_prompts
    from r1train.model.load import eos_token_ids, load_tokenizer
    from r1train.model.policy import PolicyModel
    from r1train.model.static_decode import StaticDecoder
    from r1train.run.logging import clock

    dev = device(dry)
    path = str(model_dir(workdir))
    tok = load_tokenizer(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if dry else torch.bfloat16)
    policy = PolicyModel(lm.to(dev).eval())
    eos = eos_token_ids(tok, lm)
    _, ids, _ = encode_prompts(tok, task_records(TaskConfig(), 32, seed=1))
    max_new, sizes = (8, (2, 4)) if dry else (192, (16, 64, 256))
    backend = "eager" if dry else "inductor"
    direct, via_hf = StaticDecoder(policy, backend=backend), StaticDecoder(policy, backend=backend, direct=False)

    def call(n, decoder=None, new=max_new):
        pid, pmask = pad_prompts([ids[i % len(ids)] for i in range(n)], tok.pad_token_id, dev)
        t0 = clock(dev)
        out = generate(policy, tok, pid, pmask, seeds=list(range(n)), max_new_tokens=new, temperature=1.0,
                       eos_token_ids=eos, decoder=decoder, sync_every=SYNC_EVERY if dev == "cuda" else 1)
        return clock(dev) - t0, out.completion_ids.shape[1], int(out.lengths.sum())

    def hf(n, new):
        pid, pmask = pad_prompts([ids[i % len(ids)] for i in range(n)], tok.pad_token_id, dev)
        torch.manual_seed(0)
        t0 = clock(dev)
        out = lm.generate(input_ids=pid, attention_mask=pmask, max_new_tokens=new, do_sample=True,
                          temperature=1.0, top_k=0, top_p=1.0, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        return clock(dev) - t0, out.shape[1] - pid.shape[1], None

    eager, fast = "eager engine", "compiled, decode-only forward"
    fns = {eager: lambda n, new: call(n, None, new), fast: lambda n, new: call(n, direct, new), "HF generate": hf,
           "compiled, HF forward": lambda n, new: call(n, via_hf, new)}
    short = 8 if dry else 64  # new tokens at 16 and 256 rows, one timed call: the part's time goes to 64 rows
    n64 = sizes[1]
    rows, ms, keys, tables, errors = [], {}, {}, {"timings": ""}, []

    def save():  # what is measured so far: kept if the part runs out of time (`run_part`)
        done = [r + [f"{ms[(eager, r[0])] / ms[(r[1], r[0])]:.2f}x" if {(eager, r[0]), (r[1], r[0])} <= set(ms)
                     else ""] for r in rows]
        tables["timings"] = md_table(["rows", "decode", "best s", "steps", "ms/step", "eager engine / this"],
                                     done) + "\n\n" + note
        keys.update({f"decode_ms_{n}" + ("" if name == fast else "_eager"): v for (name, n), v in ms.items()
                     if name in (eager, fast)})
        keys.update({f"hf_generate_ms_{n}": v for (name, n), v in ms.items() if name == "HF generate"})
        if ("HF generate", n64) in ms and (fast, n64) in ms:
            keys[f"rollout_vs_hf_{n64}"] = ms[("HF generate", n64)] / ms[(fast, n64)]
        save_partial(workdir, "decode", {"table": "\n\n".join(tables.values()), "keys": keys})

    def measure(name, n, new=max_new, repeats=2):
        """Time one variant; a failure (a compilation error, say) is reported and the part goes
        on: the other variants' figures still come back from a scarce GPU session."""
        try:
            fns[name](n, new)  # warm-up: compiles the bucket's graph
            t, steps, _ = min(fns[name](n, new) for _ in range(repeats))
        except Exception:
            traceback.print_exc()
            errors.append(f"{name}, {n} rows:\n{traceback.format_exc()[-1500:]}")
            tables["errors"] = "Failed:\n\n```\n" + "\n".join(errors) + "\n```"
            rows.append([n, name, "failed", "", ""])
            return
        ms[(name, n)] = 1e3 * t / steps
        rows.append([n, name, f"{t:.2f}", steps, f"{ms[(name, n)]:.2f}"])

    note = (f"ms/step = a generate call's time over its steps (best of 2 after a warm-up call that compiles; "
            f"at {sizes[0]} and {sizes[-1]} rows one call of {short} tokens after the warm-up), "
            f"prompts of {min(map(len, ids))}-{max(map(len, ids))} tokens, {max_new} new tokens, "
            f"temperature 1, {'float32 (dry run: torch.compile backend eager)' if dry else 'bf16'}; "
            f"in the order measured (the part may run out of time: what comes first matters most).")
    for name in (eager, fast, "HF generate"):  # the figures first
        measure(name, n64)
    save()
    if (fast, n64) in ms:  # the compiled step works: what it launches
        tables["profile"] = profile_steps(lambda: call(n64, direct, new=16), 16, dev, n64, keys)
        save()
    for n in (sizes[0],) + sizes[2:]:
        for name in (eager, fast):
            measure(name, n, short, repeats=1)
        save()
    measure("compiled, HF forward", n64)
    save()
    step_ms, vs_hf = keys.get(f"decode_ms_{n64}"), keys.get(f"rollout_vs_hf_{n64}")
    checks = [{"name": f"decode step at {n64} rows (compiled), ms", "target": "<= 4.0",
               "value": "failed" if step_ms is None else step_ms,
               "ok": None if dry else step_ms is not None and step_ms <= 4.0},
              {"name": f"rollout of {n64} x {max_new} against HF generate", "target": ">= 5x",
               "value": "failed" if vs_hf is None else vs_hf,
               "ok": None if dry else vs_hf is not None and vs_hf >= 5}]
    status = {"status": f"failed ({len(errors)} variant(s), the table says which)"} if errors else {}
    return {**status, "table": "\n\n".join(tables.values()), "checks": checks, "keys": keys}


def profile_steps(fn, steps: int, dev: str, rows: int, keys: dict) -> str:
    """Run `fn` (a generate call of `steps` tokens) under the profiler: per step, the GPU
    kernels, CUDA graph launches, host syncs, memcpy calls and top-level ATen operators."""
    from torch.profiler import ProfilerActivity, profile

    from bench_grpo_step import top_level_ops

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
    with profile(activities=activities) as prof:
        fn()
    events = prof.events()
    count = {
        "GPU kernels": sum(1 for e in events if e.device_type.name == "CUDA"),
        "CUDA graph launches": sum(1 for e in events if e.name == "cudaGraphLaunch"),
        "host syncs": sum(1 for e in events if e.name in ("cudaStreamSynchronize", "cudaDeviceSynchronize",
                                                          "cudaEventSynchronize")),
        "memcpy calls": sum(1 for e in events if e.name in ("cudaMemcpyAsync", "cudaMemcpy")),
        "top-level ATen ops": top_level_ops(events),
    }
    keys[f"kernels_per_step_{rows}"] = count["GPU kernels"] / steps
    keys[f"host_syncs_per_step_{rows}"] = count["host syncs"] / steps
    return md_table([f"per step (compiled, decode-only forward, {rows} rows; a {steps}-token call, prefill "
                     f"included)", "count"], [[k, f"{v / steps:.1f}"] for k, v in count.items()])


def save_partial(workdir: Path, name: str, result: dict) -> None:
    """A part's results so far, read by the suite if the part runs out of time."""
    tmp = workdir / f"{name}.partial.json.tmp"
    tmp.write_text(json.dumps(result, default=str))
    tmp.replace(workdir / f"{name}.partial.json")


def part_main(dry: bool, workdir: Path) -> dict:
    """The main job as README's first line runs it, in one process on this GPU (dry: a
    two-step GRPO stage on the CPU, to check the plumbing)."""
    out = workdir / "main-job"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(ROOT / "train.py"), "--output_dir", str(out)]
    if dry:
        for stage in ("sft", "grpo"):
            cmd += [f"--{stage}.train.max_steps", "2", f"--{stage}.data.num_eval", "4"]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"the main job failed (exit code {res.returncode}):\n{log[-3000:]}")
    results = out / "results.txt"
    table = results.read_text().strip() if results.exists() else "(no results.txt)"
    acc = {}
    for line in table.splitlines():
        words = line.split()
        if len(words) > 2 and words[-1].endswith("s") and "%" in line:
            acc[words[0]] = float(line.split("%")[0].split()[-1])
    keys = {"main_job_wall_s": wall, **{f"main_job_{k}_accuracy": v for k, v in acc.items() if k in ("sft", "grpo")}}
    return {"table": f"`torchrun --nproc_per_node=1 train.py` in {wall:.0f} s:\n\n```\n{table}\n```",
            "checks": [], "keys": keys}


def part_compiled(dry: bool, workdir: Path) -> dict:
    """The compiled decode (`rollout.compile_decode`, CUDA graphs) against the engine's eager
    decode: GRPO steps of the trainer (the grpo part's run without FSDP, eager and compiled, taking
    turns), then its greedy rows against the eager engine's in float32. Last and in its own
    process, so that compilation time or a failure cannot cost the other parts their numbers."""
    from r1train.data.problems import encode_prompts
    from r1train.data.task import TaskConfig, task_records
    from r1train.grpo.config import GRPOJobConfig
    from r1train.grpo.trainer import GRPOTrainer

    from bench_grpo_step import TEXT_REWARDS, format_phases, time_grpo_steps

    dev, path = device(dry), str(model_dir(workdir))
    prompts, group, max_new, micro = (2, 2, 8, 2) if dry else (8, 8, 192, 16)
    trainers = {}
    for name, compiled in (("eager decode", False), ("compiled decode", True)):
        cfg = GRPOJobConfig()
        cfg.model.path = path
        cfg.data.num_train, cfg.data.num_eval = 64, 4
        cfg.rollout.group_size, cfg.rollout.max_new_tokens = group, max_new
        cfg.grpo.prompts_per_step, cfg.grpo.micro_batch_size = prompts, micro
        cfg.grpo.beta, cfg.grpo.rewards = 0.0, TEXT_REWARDS
        cfg.train.device, cfg.train.progress = dev, False
        cfg.rollout.compile_decode = compiled and not dry
        cfg.train.output_dir = str(workdir / f"compiled-grpo-{compiled}")
        trainers[name] = GRPOTrainer(cfg)
        if compiled and dry:  # traced without code generation on the CPU
            trainers[name].engine.decoder = make_decoder(trainers[name].policy, dry)
    t0 = time.perf_counter()
    results = time_grpo_steps(trainers, repeats=1 if dry else 2)
    r = results["compiled decode"]
    out = [format_phases(results),
           f"GRPO steps, no FSDP (autocast bf16), policy only: {prompts} prompts x {group}, up to "
           f"{max_new} new tokens ({r['completion_tokens']} generated in the last step), micro-batches of "
           f"{micro}; medians of {1 if dry else 2} steps after a warm-up step (the compiled one compiles "
           f"its graphs there), the two trainers' steps taking turns; {time.perf_counter() - t0:.0f} s in all."]
    lm = trainers["eager decode"].policy.lm
    tok = trainers["eager decode"].tokenizer
    del trainers
    gc.collect()
    _, ids, _ = encode_prompts(tok, task_records(TaskConfig(), 32, seed=1))
    share = {name: statistics.median(res["phases"]["generate"]) / statistics.median(res["phases"]["total"])
             for name, res in results.items()}
    checks = [compiled_decode_check(lm, tok, ids, dev, dry),
              {"name": "generation's share of a GRPO step (compiled decode)", "value": share["compiled decode"],
               "target": "<= 0.5", "ok": None if dry else share["compiled decode"] <= 0.5}]
    keys = {"grpo_generate_share": share["compiled decode"], "grpo_generate_share_eager": share["eager decode"],
            "grpo_step_s": statistics.median(r["phases"]["total"])}
    for name, tag in (("compiled decode", ""), ("eager decode", "_eager")):  # sampler vs trainer (k3 KL)
        if results[name].get("mismatch_kl"):
            keys[f"grpo_mismatch_kl{tag}"] = statistics.median(results[name]["mismatch_kl"])
    return {"table": "\n\n".join(out), "checks": checks, "keys": keys}


def compiled_decode_check(lm, tok, ids: list, dev: str, dry: bool) -> dict:
    """Greedy rows of the compiled decode against the eager engine's, in float32 (random weights
    give flat logits: in bf16 a rounding would flip near-ties; float32 keeps them apart)."""
    import copy

    from r1train.model.engine import generate, pad_prompts
    from r1train.model.policy import PolicyModel

    policy = PolicyModel(copy.deepcopy(lm).float())
    n, max_new = (4, 8) if dry else (16, 32)
    pid, pmask = pad_prompts([ids[i % len(ids)] for i in range(n)], tok.pad_token_id, dev)
    kw = dict(seeds=list(range(n)), max_new_tokens=max_new, temperature=0.0)
    fast = generate(policy, tok, pid, pmask, decoder=make_decoder(policy, dry), **kw)
    eager = generate(policy, tok, pid, pmask, **kw)
    same = sum(torch.equal(a, b) for a, b in zip(fast.completion_ids, eager.completion_ids))
    return {"name": f"compiled decode: greedy rows equal to the eager engine's (float32, {max_new} tokens)",
            "value": f"{same}/{n}", "target": f">= {n - 1}/{n}", "ok": same >= n - 1}


def make_decoder(policy, dry: bool):
    """The engine's compiled decoder (CUDA graphs on a GPU); on the CPU dry run, traced without
    code generation (inductor would compile for minutes)."""
    from r1train.model.static_decode import StaticDecoder

    return StaticDecoder(policy, backend="eager" if dry else "inductor")


def part_sft(dry: bool, workdir: Path) -> dict:
    from bench_packing import doc_lengths

    from r1train.run.logging import clock
    from r1train.sft.packing import VARLEN_ATTENTION, collate_packed, pack, packed_model_inputs
    from r1train.sft.trainer import SFTJobConfig, SFTTrainer

    dev = device(dry)
    seq, rows_per_step, steps = (128, 2, 1) if dry else (4096, 8, 3)
    # default SDPA backend choice, then with cuDNN's attention off (it builds a plan per new
    # shape, and packed documents bring new lengths every step)
    variants = [("default SDPA backends", True)] + ([] if dry else [("cuDNN SDPA off", False)])
    total_steps = 1 + steps * len(variants) + (0 if dry else 1)  # warm-up, timed, profiled
    cfg = SFTJobConfig()
    cfg.model.path = str(model_dir(workdir))
    cfg.sft.max_seq_len, cfg.sft.rows_per_step, cfg.sft.rows_per_micro_batch = seq, rows_per_step, 2
    cfg.data.num_eval = 0
    cfg.train.device, cfg.train.progress = dev, False
    cfg.train.output_dir = str(workdir / "sft")
    trainer = SFTTrainer(cfg)
    # Long-tailed documents (bench/bench_packing.py's lognormal, median 1024 tokens), random ids,
    # every token a label, replace the embedded task's short chats.
    vocab = trainer.hf_config.vocab_size
    lengths = doc_lengths(rows_per_step * 4 * total_steps, mu=6.93 if not dry else 3.5, sigma=0.8,
                          lo=16, hi=seq, seed=0)
    gen = torch.Generator().manual_seed(0)
    docs = [(ids, ids) for ids in (torch.randint(3, vocab, (n,), generator=gen).tolist()
                                   for n in lengths)]
    trainer.rows, stats = pack(docs, seq, overflow="truncate")
    trainer.rows = trainer.rows[: rows_per_step * total_steps]  # each step new rows, no epoch wrap
    trainer._training_attention()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer.step = 1
    trainer.train_step()  # warm-up
    rows, step_notes = [], []
    for label, cudnn in variants:
        if torch.cuda.is_available():
            torch.backends.cuda.enable_cudnn_sdp(cudnn)
        times, tokens = [], []
        for _ in range(steps):
            trainer.step += 1
            t0 = clock(dev)
            m = trainer.train_step()
            times.append(clock(dev) - t0)
            tokens.append(m["tokens"])
        rows.append([f"trainer step, sdpa_varlen, {label}", rows_per_step, statistics.median(times),
                     f"{statistics.median(tokens) / statistics.median(times):.0f}",
                     f"{peak_gib():.1f}"])
        step_notes.append(f"{label}: " + ", ".join(f"{t:.2f}" for t in times) + " s")
    profile = ""
    if torch.cuda.is_available():
        torch.backends.cuda.enable_cudnn_sdp(True)
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile
        trainer.step += 1
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            trainer.train_step()
            torch.cuda.synchronize()
        profile = ("\n\nOne trainer step (default backends) under torch.profiler, top ops by self "
                   "CPU time:\n\n```\n" + prof.key_averages().table(
                       sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50)
                   + "```\n")
    docs_per_row = statistics.mean(len(r.doc_lens) for r in trainer.rows)
    step_times = "; ".join(step_notes)
    # The same micro-batch, forward + backward, per attention implementation.
    lm, model = trainer.lm, trainer.model
    batch = collate_packed(trainer.rows[:2], trainer.tokenizer.pad_token_id)
    labels = batch["labels"].to(dev)
    for impl in (VARLEN_ATTENTION, "sdpa"):
        lm.set_attn_implementation(impl)
        inputs = {k: (v.to(dev) if torch.is_tensor(v) else v)
                  for k, v in packed_model_inputs(batch, impl).items()}
        ids, pos = inputs.pop("input_ids"), inputs.pop("position_ids")
        mask = inputs.pop("attention_mask", None)

        def fwd_bwd():
            with trainer.autocast():
                logps = model.label_logprobs(ids, pos, labels, attention_mask=mask, **inputs)
            (-logps.mean()).backward()
            model.zero_grad(set_to_none=True)
        fwd_bwd()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        ts = []
        for _ in range(1 if dry else 3):
            t0 = clock(dev)
            fwd_bwd()
            ts.append(clock(dev) - t0)
        t = statistics.median(ts)
        rows.append([f"fwd+bwd of 2 rows, {impl}" + (" (block mask)" if impl == "sdpa" else ""),
                     2, t, f"{int((labels[:, 1:] != -100).sum()) / t:.0f}", f"{peak_gib():.1f}"])
    note = (f"rows of {seq} tokens, {rows_per_step} rows a step in micro-batches of 2, packing "
            f"efficiency {stats.efficiency:.1%}, {docs_per_row:.1f} documents a row; autocast bf16, "
            f"no FSDP; trainer steps: median of {steps}, each on new rows, after a warm-up step "
            f"({step_times}).")
    return {"table": md_table(["what", "rows", "median s", "label tok/s", "peak GiB"], rows)
                     + "\n\n" + note + profile, "checks": []}


# ----------------------------------------------------------------------------------------
# the orchestrator
# ----------------------------------------------------------------------------------------
def run_part(name: str, args) -> None:
    """In the part's own process: run it and write its result as JSON."""
    fn = globals()[f"part_{name}"]
    t0 = time.perf_counter()
    try:
        res = {"status": "ok", **fn(args.dry_run, Path(args.workdir))}
    except Exception:
        traceback.print_exc()
        res = {"status": "failed", "error": traceback.format_exc()[-3000:]}
    res["seconds"] = time.perf_counter() - t0
    Path(args.result).write_text(json.dumps(res, default=str))
    if name == "grpo":
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def versions() -> dict:
    import transformers

    try:
        import triton
        triton_v = triton.__version__
    except ImportError:
        triton_v = "not installed"
    out = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "python": platform.python_version(), "torch": torch.__version__,
           "cuda": torch.version.cuda or "none", "triton": triton_v,
           "transformers": transformers.__version__}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        try:
            out["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    else:
        out["gpu"] = f"none (CPU, {os.cpu_count()} cores)"
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="", help="where to write the markdown report (default: "
                   "bench/gpu/<date>-<gpu>.md; a dry run: gpu_suite.md)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {list(PARTS)}")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes: check the code paths")
    p.add_argument("--budget", type=float, default=600, help="seconds for the whole suite")
    p.add_argument("--workdir", default="", help="scratch folder (default: a fresh temporary one)")
    p.add_argument("--part", default="", help="run one part in this process (used by the suite)")
    p.add_argument("--result", default="", help="where --part writes its JSON result")
    args = p.parse_args(argv)
    if args.part:
        run_part(args.part, args)
        return 0

    parts = [x for x in args.parts.split(",") if x]
    unknown = [x for x in parts if x not in PARTS]
    if unknown:
        p.error(f"--parts: unknown {unknown}; choose from {list(PARTS)}")
    if not args.dry_run and not torch.cuda.is_available():
        p.error("no CUDA GPU here; run with --dry-run to check the code paths on the CPU")
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gpu_suite-"))
    workdir.mkdir(parents=True, exist_ok=True)
    path = os.pathsep.join(x for x in (str(ROOT), os.environ.get("PYTHONPATH", "")) if x)
    env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    if args.dry_run:
        env["OMP_NUM_THREADS"] = "1"
    deadline = time.monotonic() + args.budget
    results: dict[str, dict] = {}
    for name in (n for n in PARTS if n in parts):
        limit, needs_model = PARTS[name]
        if needs_model and results.get("model", {}).get("status") != "ok" \
                and not (model_dir(workdir) / "config.json").exists():
            results[name] = {"status": "skipped (no model: the model part did not run or failed)"}
            continue
        left = deadline - time.monotonic()
        if left < 20:
            results[name] = {"status": "skipped (the suite's --budget is spent)"}
            continue
        result_file = workdir / f"{name}.json"
        result_file.unlink(missing_ok=True)
        (workdir / f"{name}.partial.json").unlink(missing_ok=True)
        cmd = [__file__, "--part", name, "--workdir", str(workdir), "--result", str(result_file)]
        cmd += ["--dry-run"] if args.dry_run else []
        # The GRPO part runs as torchrun launches the trainer: one process, rendezvous over TCP.
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=1"] if name == "grpo" else [sys.executable]
        print(f"== {name} (limit {min(limit, left):.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(launcher + cmd, cwd=ROOT, env=env, timeout=min(limit, left),
                                  capture_output=True, text=True)
            log = proc.stdout + proc.stderr
            res = json.loads(result_file.read_text()) if result_file.exists() else \
                {"status": f"failed (exit code {proc.returncode}, no result)", "error": log[-3000:]}
        except subprocess.TimeoutExpired as e:
            log = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            res = {"status": f"timed out after {min(limit, left):.0f} s", "error": log[-3000:]}
            partial = workdir / f"{name}.partial.json"
            if partial.exists():  # what the part measured before its time ran out
                res.update(json.loads(partial.read_text()))
                res["table"] = f"(timed out: what it measured before)\n\n{res.get('table', '')}"
        res.setdefault("seconds", time.perf_counter() - t0)
        (workdir / f"{name}.log").write_text(log)
        results[name] = res
        print(f"   {res['status']} in {res['seconds']:.0f} s", flush=True)
        if res["status"] != "ok":
            print(log[-4000:], flush=True)

    v = versions()
    report = format_report(v, results, args)
    print("\n" + report)
    out = Path(args.out or ("gpu_suite.md" if args.dry_run else default_report_path(v)))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(report)
    print(f"report written to {out}")
    failed = [n for n, r in results.items() if r["status"] != "ok"]
    return 1 if failed else 0


def default_report_path(v: dict) -> Path:
    """bench/gpu/<date>-<gpu>.md, e.g. bench/gpu/2026-12-07-nvidia-h100-80gb-hbm3.md."""
    gpu = "".join(c if c.isalnum() else "-" for c in v["gpu"].lower()).strip("-")
    while "--" in gpu:
        gpu = gpu.replace("--", "-")
    return ROOT / "bench" / "gpu" / f"{v['date'][:10]}-{gpu}.md"


def format_report(v: dict, results: dict, args) -> str:
    lines = [f"### GPU suite, {v['date']}" + (" (dry run, CPU)" if args.dry_run else ""), "",
             f"GPU: {v['gpu']}" + (f", driver {v['driver']}" if v.get("driver") else "")
             + f"; torch {v['torch']} (CUDA {v['cuda']}), triton {v['triton']}, transformers "
             f"{v['transformers']}, Python {v['python']}.",
             f"Command: `python bench/gpu_suite.py{' --dry-run' if args.dry_run else ''}"
             f" --parts {args.parts}`", "",
             md_table(["part", "status", "seconds"],
                      [[n, r["status"], f"{r.get('seconds', 0):.0f}"] for n, r in results.items()])]
    checks = [c for r in results.values() for c in r.get("checks", [])]
    if checks:
        def fmt(x):
            return f"{x:.2f}" if isinstance(x, float) else str(x)
        lines += ["", md_table(["check", "measured", "target", "met"],
                               [[c["name"], fmt(c["value"]), c["target"],
                                 {True: "yes", False: "**no**", None: "n/a"}[c["ok"]]]
                                for c in checks])]
    for name, r in results.items():
        if r.get("table"):
            lines += ["", f"#### {name}", "", r["table"]]
        elif r.get("error"):
            lines += ["", f"#### {name}: {r['status']}", "", "```", r["error"].strip()[-2000:], "```"]
    # the run at a glance, last: every part's keys, and each part's status
    keys = {f"{n}_status": r["status"] for n, r in results.items()}
    for r in results.values():
        keys.update(r.get("keys", {}))
    lines += ["", "```text"] + [f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}"
                                for k, v in keys.items()] + ["```"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
