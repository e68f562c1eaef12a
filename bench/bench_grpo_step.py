"""One GRPO step on the embedded tiny model, split by phase, and rollout throughput of
`grpo.rollout.generate` against Hugging Face `model.generate` with the same settings, measured
side by side in one run.

    python bench/bench_grpo_step.py [--prompts 16] [--group 8] [--max-new 48] [--repeats 3]

Both generators sample at temperature 1 from the same left-padded prompts with a KV cache and
stop at EOS; tokens/s counts completion tokens up to and including EOS. Times are medians.
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="", help="model folder (default: build the embedded tiny model)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from data.task import TaskConfig
    from data.tiny import build_tiny_model
    from grpo.config import GRPOJobConfig
    from grpo.evaluate import encode_prompts
    from grpo.rollout import PolicyModel, generate, pad_prompts
    from grpo.trainer import GRPOTrainer
    from infra.model import load_tokenizer

    tmp = Path(tempfile.mkdtemp())
    path = args.model or str(build_tiny_model(tmp / "tiny", seed=0))
    tok = load_tokenizer(path)
    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    policy = PolicyModel(lm)

    from data.task import task_records
    recs = task_records(TaskConfig(min_operands=3, max_operands=4, max_value=9), args.prompts, seed=1)
    _, ids, _ = encode_prompts(tok, recs)
    prompts = [p for p in ids for _ in range(args.group)]
    pid, pmask = pad_prompts(prompts, tok.pad_token_id, "cpu")
    n = len(prompts)

    def ours():
        out = generate(policy, tok, pid, pmask, seeds=list(range(n)), max_new_tokens=args.max_new,
                       temperature=1.0, eos_token_ids=[tok.eos_token_id])
        return int(out.lengths.sum())

    def hf():
        torch.manual_seed(0)
        out = lm.generate(input_ids=pid, attention_mask=pmask, max_new_tokens=args.max_new, do_sample=True,
                          temperature=1.0, top_k=0, top_p=1.0, eos_token_id=tok.eos_token_id,
                          pad_token_id=tok.pad_token_id)
        comp = out[:, pid.shape[1]:]
        is_eos = comp == tok.eos_token_id
        first = torch.where(is_eos.any(-1), is_eos.float().argmax(-1) + 1, torch.full_like(comp[:, 0], comp.shape[1]))
        return int(first.sum())

    rows = []
    with torch.no_grad():
        for name, fn in (("grpo.rollout.generate", ours), ("HF model.generate", hf)):
            fn()  # warm-up
            times, toks = [], []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                toks.append(fn())
                times.append(time.perf_counter() - t0)
            t = statistics.median(times)
            rows.append((name, t, statistics.median(toks), statistics.median(toks) / t))
    print(f"\nRollout: {n} completions ({args.prompts} prompts x {args.group}), max_new_tokens {args.max_new}, "
          f"threads {torch.get_num_threads()}")
    print(f"{'generator':<24}{'median s':>10}{'tokens':>10}{'tokens/s':>12}{'vs HF':>8}")
    for name, t, k, r in rows:
        print(f"{name:<24}{t:>10.3f}{k:>10.0f}{r:>12.1f}{r / rows[1][3]:>8.2f}")

    cfg = GRPOJobConfig()
    cfg.model.path = path
    cfg.data.task = TaskConfig(min_operands=3, max_operands=4, max_value=9)
    cfg.data.num_train, cfg.data.num_eval = 256, 8
    cfg.rollout.group_size, cfg.rollout.max_new_tokens = args.group, args.max_new
    cfg.grpo.prompts_per_step, cfg.grpo.micro_batch_size = args.prompts, args.prompts * args.group // 4
    cfg.grpo.beta, cfg.grpo.num_iterations = 0.04, 2
    cfg.grpo.rewards = ["accuracy", "format", "tag_count", "reasoning_steps", "repetition_penalty"]
    cfg.train.output_dir, cfg.train.progress = str(tmp / "run"), False
    trainer = GRPOTrainer(cfg)
    phases = {}
    for step in range(1, args.repeats + 2):
        trainer.step = step
        t0 = time.perf_counter()
        rows_, stats = trainer.rollout_step()
        upd = trainer.update_step(rows_)
        total = time.perf_counter() - t0
        if step == 1:
            continue  # warm-up
        for k, v in {"generate": stats["time/generate"], "score": stats["time/score"],
                     "old/ref log-probs": upd["time/logprob"], "update": upd["time/update"], "total": total}.items():
            phases.setdefault(k, []).append(v)
    print(f"\nOne GRPO step: {n} completions, beta 0.04 (reference model), num_iterations 2, 5 rewards")
    print(f"{'phase':<20}{'median s':>10}{'share':>8}")
    tot = statistics.median(phases["total"])
    for k, v in phases.items():
        print(f"{k:<20}{statistics.median(v):>10.3f}{statistics.median(v) / tot:>8.1%}")


if __name__ == "__main__":
    main()
