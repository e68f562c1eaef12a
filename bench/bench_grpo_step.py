"""One GRPO step split by phase, today's path against the new one side by side, and rollout
throughput of the project's generation engine against its plain path and Hugging Face
`model.generate` with the same settings, all measured in one run.

    python bench/bench_grpo_step.py [--model FOLDER] [--data FILE] [--prompts 8] [--group 8]
                                    [--max-new 64] [--rollout-rows 16,64] [--repeats 3]

The two GRPO paths, on the same model, data and seeds, their steps taking turns:
    plain   the engine's plain path (every row prefills its prompt, every row decodes to the
            longest) and padded per-row training passes (grpo.packing false): today's oracle;
    packed  the engine with shared prefill and compaction, and packed training passes (each
            prompt computed once for its group, no padding).
The generators sample at temperature 1 from the same left-padded prompts with a KV cache and
stop at the model's EOS; tokens/s counts completion tokens up to and including EOS. Times are
medians. `bench/gpu_suite.py` runs the same functions on a GPU with a Qwen2.5-0.5B-shaped model.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from r1train.run.logging import clock  # noqa: E402

# Text-only rewards: no math_verify worker, so the GPU machines need no extra package.
TEXT_REWARDS = ["format", "tag_count", "reasoning_steps", "repetition_penalty"]


def rollout_generators(policy, lm, tok, prompt_ids, prompt_mask, max_new: int, eos_ids: list[int]):
    """{name: fn() -> completion tokens}: the project's generator and HF's, same settings."""
    from r1train.model.engine import generate

    n = prompt_ids.shape[0]

    def ours(plain: bool = False, few_rows: bool = True) -> int:
        out = generate(policy, tok, prompt_ids, prompt_mask, seeds=list(range(n)),
                       max_new_tokens=max_new, temperature=1.0, eos_token_ids=eos_ids,
                       share_prompts=not plain, compact=not plain, few_rows=few_rows and not plain)
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

    return {"model.engine.generate": ours, "engine, F.linear decode": lambda: ours(few_rows=False),
            "engine, plain path": lambda: ours(plain=True), "HF model.generate": hf}


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


def time_grpo_steps(trainers: dict, repeats: int, cpu_time: bool = False) -> dict:
    """Phases of `repeats` GRPO steps per trainer after one warm-up step each, the trainers
    taking turns step by step: {name: {"phases": {phase: [seconds]}, token counts of its last
    step, peak CUDA memory}}. `cpu_time`: CPU seconds of this process instead of wall-clock
    seconds (a CPU shared with other jobs slows the wall clock, not the work done)."""
    results = {name: {"phases": {}} for name in trainers}
    for step in range(1, repeats + 2):
        for name, trainer in trainers.items():
            device, res = trainer.info.device, results[name]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            timer = time.process_time if cpu_time else (lambda: clock(device))  # noqa: B023
            trainer.step = step
            t0 = timer()
            batch, timings = trainer.rollout()
            t1 = timer()
            trainer.logprobs(batch)
            t2 = timer()
            update = trainer.update(batch)
            trainer.scheduler.step()
            total = timer() - t0
            if device.type == "cuda":
                res["peak_gib"] = max(res.get("peak_gib", 0.0), torch.cuda.max_memory_allocated() / 2**30)
            if step == 1:
                continue  # warm-up: compilation of the kernels, allocator growth
            generate = (t1 - t0) - timings["time/score"] if cpu_time else timings["time/generate"]
            for k, v in {"generate": generate, "score": timings["time/score"],
                         "old/ref log-probs": t2 - t1, "update": total - (t2 - t0), "total": total}.items():
                res["phases"].setdefault(k, []).append(v)
            prompt = int(batch.attention_mask[:, : batch.prompt_len].sum())
            distinct = set(batch.prompt_lists())
            res.update(rows=len(batch), prompt_tokens=prompt, completion_tokens=int(batch.lengths.sum()),
                       distinct_prompts=len(distinct), distinct_prompt_tokens=sum(len(p) for p in distinct))
            if "mismatch_kl" in update.get("sums", {}):  # the sampler's log-probs against the trainer's
                res.setdefault("mismatch_kl", []).append(float(update["sums"]["mismatch_kl"]) / max(
                    float(update["tokens"]), 1.0))
    return results


def top_level_ops(events) -> int:
    """The ATen operators among profiler `events` that no other ATen operator called: what the
    code itself asks for (on a GPU, each is at least one kernel launch)."""
    return sum(1 for e in events if e.name.startswith("aten::")
               and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")))


def count_operators(trainers: dict, step: int) -> str:
    """One more step per trainer under the profiler: the ATen operators each phase calls (those
    not called by another operator, backward's included), a table. Where the work is per-call
    overhead (the tiny model), time follows this count, not the token count."""
    from torch.profiler import profile

    def calls(fn):
        with profile() as prof:
            out = fn()
        return out, top_level_ops(prof.events())

    counts = {}
    for name, trainer in trainers.items():
        trainer.step = step
        (batch, _), generate = calls(trainer.rollout)
        _, logprobs = calls(lambda: trainer.logprobs(batch))  # noqa: B023
        _, update = calls(lambda: trainer.update(batch))  # noqa: B023
        counts[name] = {"generate": generate, "old/ref log-probs": logprobs, "update": update,
                        "total": generate + logprobs + update}
    names = list(counts)
    lines = ["| phase | " + " | ".join(f"{n} operators" for n in names) + " |", "| --- " * (len(names) + 1) + "|"]
    for k in counts[names[0]]:
        lines.append(f"| {k} | " + " | ".join(str(counts[n][k]) for n in names) + " |")
    return "\n".join(lines)


def format_phases(results: dict) -> str:
    """One table: each phase's median per path, and each path's ratio to the first."""
    names = list(results)
    med = {n: {k: statistics.median(v) for k, v in results[n]["phases"].items()} for n in names}
    head = "| phase | " + " | ".join(f"{n} s" for n in names) + " | " + " | ".join(
        f"{n} / {names[0]}" for n in names[1:]) + " |"
    lines = [head, "| --- " * (2 * len(names)) + "|"]
    for k in med[names[0]]:
        lines.append(f"| {k} | " + " | ".join(f"{med[n][k]:.3f}" for n in names) + " | " + " | ".join(
            f"{med[n][k] / med[names[0]][k]:.2f}x" for n in names[1:]) + " |")
    return "\n".join(lines)


def matmul_params(lm) -> tuple[int, int]:
    """(weights of the decoder layers' linear layers, weights of the output embedding)."""
    layers = sum(m.weight.numel() for m in lm.get_decoder().modules() if isinstance(m, torch.nn.Linear))
    return layers, lm.get_output_embeddings().weight.numel()


def gemm_rate(lm, tokens: int = 1024, repeats: int = 7) -> float:
    """This machine's best matmul rate (FLOP/s) at the model's MLP shapes with `tokens` rows,
    forward and backward forms alike (x W^T, g W, g^T x): the most any phase can reach."""
    from bench_logprobs import median_time

    h, i = lm.config.hidden_size, lm.config.intermediate_size
    x, w, g = torch.randn(tokens, h), torch.randn(i, h), torch.randn(tokens, i)
    forms = (lambda: x @ w.T, lambda: g @ w, lambda: g.T @ x)
    return max(2 * tokens * h * i / median_time(fn, repeats, 1, "cpu") for fn in forms)


def packed_floor(lm, res: dict, num_iterations: int) -> dict:
    """{phase: FLOP} of the weight matmuls the packed step cannot avoid: each distinct prompt
    once, each completion token once (no padding, no rows decoded past their end), the LM head
    only where a token is predicted, backward twice the forward; attention, norms, softmax,
    sampling and the log-prob kernel's recomputation left out. A lower bound of the work.
    `res`: a path's entry of `time_grpo_steps` (the token counts of its last step)."""
    layers, head = matmul_params(lm)
    d_prompt, comp = res["distinct_prompt_tokens"], res["completion_tokens"]
    decoded = comp - res["rows"]  # the prefill's last position predicts each row's first token
    generate = 2 * d_prompt * layers + 2 * res["distinct_prompts"] * head + 2 * decoded * (layers + head)
    forward = 2 * (d_prompt + decoded) * layers + 2 * comp * head
    return {"generate": generate, "old/ref log-probs": forward * (1 if num_iterations == 1 else 2),
            "update": 3 * forward * num_iterations}


def format_floor(results: dict, floor: dict, rate: float) -> str:
    """The packed path's phases against its work at this machine's best matmul rate."""
    med = {n: {k: statistics.median(v) for k, v in r["phases"].items()} for n, r in results.items()}
    lines = ["| phase (packed) | matmul GFLOP | measured s | achieved GFLOP/s | s at the best rate |",
             "| --- | --- | --- | --- | --- |"]
    for k, f in floor.items():
        lines.append(f"| {k} | {f / 1e9:.1f} | {med['packed'][k]:.3f} | {f / med['packed'][k] / 1e9:.1f} "
                     f"| {f / rate:.3f} |")
    total = sum(floor.values())
    lines.append(f"| total | {total / 1e9:.1f} | {med['packed']['total']:.3f} "
                 f"| {total / med['packed']['total'] / 1e9:.1f} | {total / rate:.3f} |")
    out = "\n".join(lines) + f"\nbest matmul rate of this machine (MLP shapes, 1024 rows): {rate / 1e9:.1f} GFLOP/s"
    if "plain" in med:
        out += (f"\nfloor of the packed step / plain step measured: {total / rate / med['plain']['total']:.2f}x; "
                f"0.4x of the plain step needs the packed step at >= "
                f"{total / rate / (0.4 * med['plain']['total']):.0%} of the best rate overall")
    return out


def grpo_trainer(args, path: str, out: Path, packed: bool, group: int):
    from r1train.data.task import TaskConfig
    from r1train.grpo.config import GRPOJobConfig
    from r1train.grpo.trainer import GRPOTrainer

    cfg = GRPOJobConfig()
    cfg.model.path = path
    if args.data:
        cfg.data.source = args.data
    else:
        cfg.data.task = TaskConfig(min_operands=3, max_operands=4, max_value=9)
    cfg.data.num_train, cfg.data.num_eval = 256, 8
    cfg.rollout.group_size, cfg.rollout.max_new_tokens = group, args.max_new
    cfg.grpo.prompts_per_step, cfg.grpo.micro_batch_size = args.prompts, args.micro_batch
    cfg.grpo.beta, cfg.grpo.num_iterations = 0.04, args.num_iterations
    cfg.grpo.packing = packed
    if packed:
        cfg.grpo.micro_batch_tokens = args.micro_batch_tokens
    cfg.grpo.rewards = ["accuracy"] + TEXT_REWARDS
    cfg.train.output_dir, cfg.train.progress = str(out), False
    trainer = GRPOTrainer(cfg)
    trainer.engine.plain = not packed
    return trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", default="8", help="G; several: 4,8 (one table each)")
    ap.add_argument("--max-new", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=8, help="grpo.micro_batch_size of both paths")
    ap.add_argument("--micro-batch-tokens", type=int, default=0,
                    help="grpo.micro_batch_tokens of the packed path (0 = micro_batch_size completions)")
    ap.add_argument("--paths", default="plain,packed", help="which GRPO paths to time (one alone: "
                    "its peak RSS is the process's)")
    ap.add_argument("--num-iterations", type=int, default=1)
    ap.add_argument("--cpu-time", action="store_true", help="time the GRPO phases in CPU seconds of this "
                    "process (a CPU shared with other jobs); score stays wall-clock")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--count-ops", action="store_true", help="one more step per path under the profiler: "
                    "ATen operators called per phase")
    ap.add_argument("--rollout-rows", default="16,64", help="rows of each rollout table ('' = none)")
    ap.add_argument("--model", default="", help="model folder (default: build the embedded tiny model)")
    ap.add_argument("--data", default="", help="a GSM8K-style .jsonl (default: the embedded task)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    from r1train.data.tiny import build_tiny_model
    from r1train.grpo.trainer import GRPOTrainer  # noqa: F401  (registers nothing; fails early if broken)
    from r1train.model.engine import pad_prompts
    from r1train.model.load import eos_token_ids, load_tokenizer
    from r1train.model.policy import PolicyModel

    tmp = Path(tempfile.mkdtemp())
    path = args.model or str(build_tiny_model(tmp / "tiny", seed=0))
    print(f"model {args.model or 'embedded tiny'}, data {args.data or 'embedded task'}, "
          f"threads {torch.get_num_threads()}")
    for group in (int(g) for g in str(args.group).split(",")):
        names = [x for x in args.paths.split(",") if x]
        trainers = {name: grpo_trainer(args, path, tmp / f"{name}-{group}", name == "packed", group)
                    for name in names or ["packed"]}
        if not names:  # rollout tables only: the trainer gave the prompts
            prompts_ids = next(iter(trainers.values())).train_ids
            del trainers
            continue
        results = time_grpo_steps(trainers, args.repeats, cpu_time=args.cpu_time)
        r = results[list(trainers)[-1]]
        print(f"\nOne GRPO step: {r['rows']} completions ({args.prompts} prompts x {group}), "
              f"max_new_tokens {args.max_new}, beta 0.04, num_iterations {args.num_iterations}, "
              f"micro_batch_size {args.micro_batch}, packed micro_batch_tokens {args.micro_batch_tokens}; "
              f"{r['prompt_tokens']} prompt tokens "
              f"(summed over rows), {r['completion_tokens']} completion tokens")
        print(("CPU seconds of this process\n" if args.cpu_time else "") + format_phases(results))
        if "packed" in trainers and not args.cpu_time:
            lm = trainers["packed"].policy.lm
            floor = packed_floor(lm, results["packed"], args.num_iterations)
            print("\nThe packed step's unavoidable matmul work at this machine's best matmul rate\n"
                  + format_floor(results, floor, gemm_rate(lm)))
        if args.count_ops:
            print("\nOperators of one more step\n" + count_operators(trainers, args.repeats + 2))
        prompts_ids = next(iter(trainers.values())).train_ids
        del trainers
    print(f"peak RSS of the process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")

    tok = load_tokenizer(path)
    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    policy = PolicyModel(lm)
    eos = eos_token_ids(tok, lm)
    for rows in [int(x) for x in args.rollout_rows.split(",") if x]:
        group = int(str(args.group).split(",")[-1])
        prompts = [p for p in prompts_ids[: max(rows // group, 1)] for _ in range(group)][:rows]
        pid, pmask = pad_prompts(prompts, tok.pad_token_id, "cpu")
        gens = rollout_generators(policy, lm, tok, pid, pmask, args.max_new, eos)
        table = time_rollouts(gens, args.repeats, "cpu")
        print(f"\nRollout: {len(prompts)} completions ({len(prompts) // group} prompts x {group}), "
              f"max_new_tokens {args.max_new}")
        print(f"{'generator':<24}{'median s':>10}{'tokens':>10}{'tokens/s':>12}{'vs HF':>8}")
        for r in table:
            print(f"{r['generator']:<24}{r['seconds']:>10.3f}{r['tokens']:>10.0f}"
                  f"{r['tokens_per_s']:>12.1f}{r['vs_hf']:>8.2f}")


if __name__ == "__main__":
    main()
