"""One GRPO step on the embedded tiny model, split by phase, and rollout throughput of the
project's generation engine (`infra.engine.generate`) against its plain path (every row
prefilled, no compaction) and Hugging Face `model.generate` with the same settings, measured
side by side in one run.

    python bench/bench_grpo_step.py [--prompts 16] [--group 8] [--max-new 48] [--repeats 3]

Both generators sample at temperature 1 from the same left-padded prompts with a KV cache and
stop at EOS; tokens/s counts completion tokens up to and including EOS. Times are medians.
`bench/gpu_suite.py` runs the same functions on a GPU with a Qwen2.5-0.5B-shaped model.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from infra.logging import clock  # noqa: E402

# Text-only rewards: no math_verify worker, so the GPU machines need no extra package.
TEXT_REWARDS = ["format", "tag_count", "reasoning_steps", "repetition_penalty"]


def rollout_generators(policy, lm, tok, prompt_ids, prompt_mask, max_new: int, eos_ids: list[int]):
    """{name: fn() -> completion tokens}: the project's generator and HF's, same settings."""
    from infra.engine import generate

    n = prompt_ids.shape[0]

    def ours(plain: bool = False) -> int:
        out = generate(policy, tok, prompt_ids, prompt_mask, seeds=list(range(n)),
                       max_new_tokens=max_new, temperature=1.0, eos_token_ids=eos_ids,
                       share_prompts=not plain, compact=not plain)
        return int(out.lengths.sum())

    def hf() -> int:
        torch.manual_seed(0)
        out = lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, max_new_tokens=max_new,
                          do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          eos_token_id=eos_ids, pad_token_id=tok.pad_token_id)
        comp = out[:, prompt_ids.shape[1]:]
        is_eos = torch.isin(comp, torch.tensor(eos_ids, device=comp.device))
        first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1,
                            torch.full_like(comp[:, 0], comp.shape[1]))
        return int(first.sum())

    return {"infra.engine.generate": ours, "engine, plain path": lambda: ours(plain=True),
            "HF model.generate": hf}


@torch.no_grad()
def time_rollouts(generators: dict, repeats: int, device) -> list[dict]:
    """Median time of each generator after one warm-up call; rows {generator, seconds, tokens,
    tokens_per_s, vs_hf}. The generators take turns, so a change of load hits both alike."""
    for fn in generators.values():
        fn()  # warm-up
    times = {k: [] for k in generators}
    toks = {k: [] for k in generators}
    for _ in range(repeats):
        for name, fn in generators.items():
            t0 = clock(device)
            toks[name].append(fn())
            times[name].append(clock(device) - t0)
    rows = []
    for name in generators:
        t, k = statistics.median(times[name]), statistics.median(toks[name])
        rows.append({"generator": name, "seconds": t, "tokens": k, "tokens_per_s": k / t})
    hf = next(r for r in rows if r["generator"].startswith("HF"))["tokens_per_s"]
    for r in rows:
        r["vs_hf"] = r["tokens_per_s"] / hf
    return rows


def time_grpo_steps(trainer, repeats: int) -> dict:
    """Phases of `repeats` GRPO steps after one warm-up step: {phase: [seconds]}, plus token
    counts of the last step (prompt, completion, padded) and the peak CUDA memory."""
    device = trainer.info.device
    phases: dict[str, list[float]] = {}
    counts = {}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for step in range(1, repeats + 2):
        trainer.step = step
        t0 = clock(device)
        batch, timings = trainer.rollout()
        t1 = clock(device)
        trainer.logprobs(batch)
        t2 = clock(device)
        trainer.update(batch)
        trainer.scheduler.step()
        total = clock(device) - t0
        if step == 1:
            continue  # warm-up: compilation of the kernels, allocator growth
        for k, v in {"generate": timings["time/generate"], "score": timings["time/score"],
                     "old/ref log-probs": t2 - t1, "update": total - (t2 - t0), "total": total}.items():
            phases.setdefault(k, []).append(v)
        prompt = int(batch.attention_mask[:, : batch.prompt_len].sum())
        counts = {"rows": len(batch), "prompt_tokens": prompt, "completion_tokens": int(batch.lengths.sum())}
    if device.type == "cuda":
        counts["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return {"phases": phases, **counts}


def format_phases(result: dict) -> str:
    phases = result["phases"]
    tot = statistics.median(phases["total"])
    lines = ["| phase | median s | share |", "| --- | --- | --- |"]
    for k, v in phases.items():
        lines.append(f"| {k} | {statistics.median(v):.3f} | {statistics.median(v) / tot:.1%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="", help="model folder (default: build the embedded tiny model)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from data.task import TaskConfig, task_records
    from data.tiny import build_tiny_model
    from grpo.config import GRPOJobConfig
    from grpo.trainer import GRPOTrainer
    from infra.engine import pad_prompts
    from infra.evaluate import encode_prompts
    from infra.model import load_tokenizer
    from infra.policy import PolicyModel

    tmp = Path(tempfile.mkdtemp())
    path = args.model or str(build_tiny_model(tmp / "tiny", seed=0))
    tok = load_tokenizer(path)
    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    policy = PolicyModel(lm)

    recs = task_records(TaskConfig(min_operands=3, max_operands=4, max_value=9), args.prompts, seed=1)
    _, ids, _ = encode_prompts(tok, recs)
    prompts = [p for p in ids for _ in range(args.group)]
    pid, pmask = pad_prompts(prompts, tok.pad_token_id, "cpu")
    gens = rollout_generators(policy, lm, tok, pid, pmask, args.max_new, [tok.eos_token_id])
    rows = time_rollouts(gens, args.repeats, "cpu")
    print(f"\nRollout: {len(prompts)} completions ({args.prompts} prompts x {args.group}), "
          f"max_new_tokens {args.max_new}, threads {torch.get_num_threads()}")
    print(f"{'generator':<24}{'median s':>10}{'tokens':>10}{'tokens/s':>12}{'vs HF':>8}")
    for r in rows:
        print(f"{r['generator']:<24}{r['seconds']:>10.3f}{r['tokens']:>10.0f}"
              f"{r['tokens_per_s']:>12.1f}{r['vs_hf']:>8.2f}")

    cfg = GRPOJobConfig()
    cfg.model.path = path
    cfg.data.task = TaskConfig(min_operands=3, max_operands=4, max_value=9)
    cfg.data.num_train, cfg.data.num_eval = 256, 8
    cfg.rollout.group_size, cfg.rollout.max_new_tokens = args.group, args.max_new
    cfg.grpo.prompts_per_step, cfg.grpo.micro_batch_size = args.prompts, args.prompts * args.group // 4
    cfg.grpo.beta, cfg.grpo.num_iterations = 0.04, 2
    cfg.grpo.rewards = ["accuracy"] + TEXT_REWARDS
    cfg.train.output_dir, cfg.train.progress = str(tmp / "run"), False
    result = time_grpo_steps(GRPOTrainer(cfg), args.repeats)
    print(f"\nOne GRPO step: {result['rows']} completions, beta 0.04 (reference model), "
          f"num_iterations 2, 5 rewards")
    print(format_phases(result))


if __name__ == "__main__":
    main()
