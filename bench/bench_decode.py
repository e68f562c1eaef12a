"""The engine's decode step, eager against the static decoder (`rollout.compile_decode`) with the
decode-only forward (model/decode_forward.py) or Hugging Face's forward, on this machine.

    python bench/bench_decode.py --model <folder> --rows 16 --new 48 [--inductor]

Rows never end (no EOS id is given), so every call runs `--new` steps over all rows; ms/step is a
call's time over its steps (prefill included), best of `--repeats` after a warm-up call (which
compiles). The last column counts the ATen operators a step calls (the profiler, one 8-token call):
on a GPU each is a kernel launch at least, which is what a launch-bound step costs. On a CPU the
torch.compile backend is "eager" (tracing only) unless `--inductor` (C++ code generation, ~40 s of
compilation for SmolLM2-135M on 2 cores); the GPU figures come from bench/gpu_suite.py's `decode`
part (CUDA graphs).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "tests" / "assets" / "tiny-r1-sft"),
                   help="a Hugging Face model folder (default: the tiny model of the tests)")
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--new", type=int, default=48, help="new tokens per row")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--inductor", action="store_true", help="also the static decoder compiled by inductor")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)

    from torch.profiler import profile
    from transformers import AutoModelForCausalLM

    from r1train.data.problems import encode_prompts
    from r1train.data.task import TaskConfig, task_records
    from r1train.model.engine import SYNC_EVERY, generate, pad_prompts
    from r1train.model.load import load_tokenizer
    from r1train.model.policy import PolicyModel
    from r1train.model.static_decode import StaticDecoder
    from r1train.run.logging import clock

    from bench_grpo_step import top_level_ops

    path = args.model
    tok = load_tokenizer(path)
    dtype = torch.float32 if args.device == "cpu" else torch.bfloat16
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(args.device).eval()
    policy = PolicyModel(lm)
    _, ids, _ = encode_prompts(tok, task_records(TaskConfig(), 32, seed=1))
    pid, pmask = pad_prompts([ids[i % len(ids)] for i in range(args.rows)], tok.pad_token_id, args.device)
    eager_backend = "eager" if args.device == "cpu" else "inductor"
    decoders = {"eager engine": None,
                f"static, decode-only forward ({eager_backend})": StaticDecoder(policy, backend=eager_backend),
                f"static, HF forward ({eager_backend})": StaticDecoder(policy, backend=eager_backend, direct=False)}
    if args.inductor and args.device == "cpu":
        decoders["static, decode-only forward (inductor)"] = StaticDecoder(policy, backend="inductor")
    sync = SYNC_EVERY if args.device == "cuda" else 1
    times = {k: [] for k in decoders}
    for rep in range(args.repeats + 1):
        for name, decoder in decoders.items():  # taking turns: a change of load hits all alike
            t0 = clock(args.device)
            generate(policy, tok, pid, pmask, seeds=list(range(args.rows)), max_new_tokens=args.new,
                     temperature=1.0, eos_token_ids=[-1], decoder=decoder, sync_every=sync)
            times[name].append(clock(args.device) - t0)
    # operators a step calls (top-level ATen operators, fused generated kernels not counted):
    # on a GPU each is at least one kernel launch, the cost of a launch-bound decode step
    ops = {}
    for name, decoder in decoders.items():
        with profile() as prof:
            generate(policy, tok, pid, pmask, seeds=list(range(args.rows)), max_new_tokens=8,
                     temperature=1.0, eos_token_ids=[-1], decoder=decoder, sync_every=sync)
        ops[name] = top_level_ops(prof.events()) / 8
    base = min(times["eager engine"][1:])
    print(f"{path}: {args.rows} rows, prompts of {min(map(len, ids))}-{max(map(len, ids))} tokens, "
          f"{args.new} new tokens, {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| decode | ms/step | vs eager engine | first call s | ATen ops/step (8-token call, prefill in) |")
    print("| --- | --- | --- | --- | --- |")
    for name, t in times.items():
        best = min(t[1:])
        print(f"| {name} | {1e3 * best / args.new:.1f} | {best / base:.2f}x | {t[0]:.1f} | {ops[name]:.0f} |")


if __name__ == "__main__":
    main()
