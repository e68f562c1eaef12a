"""A scripted engine for tests/test_eval_passk.py, and (run as a script) its k-sample evaluation
on every rank of a torchrun, rank 0 writing the result to OUT as JSON:

    python -m torch.distributed.run --nproc_per_node=2 tests/eval_worker.py OUT

The engine's completions are drawn from each row's seed alone, as the real engine's are: right,
wrong (two different wrong answers, one of them also written boxed), or empty. The golds are
plain numbers, so every verdict takes the accuracy reward's in-process fast path (no verifier
worker starts).
"""
import json
import os
import random
import sys
from types import SimpleNamespace

import torch

from r1train.evaluate import evaluate

PROBLEMS, SAMPLES, BATCH, SEED = 7, 4, 3, 5  # 7 problems: 2 ranks hold 4 and 3, and batches of 3 rows split problems
KINDS = ("right", "right", "wrong_a", "wrong_b", "boxed_wrong_a", "empty")
# The answer each kind votes for (None: no vote); "boxed_wrong_a" writes wrong_a's answer differently.
VOTES = {"right": "gold", "wrong_a": "a", "wrong_b": "b", "boxed_wrong_a": "a", "empty": None}


def records() -> list[dict]:
    return [{"problem": f"p{i}", "solution": "", "answer": str(10 + i)} for i in range(PROBLEMS)]


def prompt_ids() -> list[list[int]]:
    return [[i] for i in range(PROBLEMS)]  # the engine reads the problem back from its prompt


class ScriptedEngine:
    """`generate` as Engine's: one completion per (prompt, seed), None for a rank with no rows.
    `log` keeps (problem, seed, kind) of every completion."""

    def __init__(self):
        self.golds = [r["answer"] for r in records()]
        self.log: list[tuple[int, int, str]] = []

    def generate(self, prompts, seeds, *, max_new_tokens, temperature):
        assert len(prompts) == len(seeds) and temperature > 0
        if not prompts:
            return None
        texts = []
        for (problem,), seed in zip(prompts, seeds):
            kind = random.Random(seed).choice(KINDS)
            self.log.append((problem, seed, kind))
            gold = self.golds[problem]
            texts.append({"right": f"<think>so</think><answer>{gold}</answer>",
                          "wrong_a": "<think>so</think><answer>1</answer>",
                          "wrong_b": "<think>so</think><answer>2</answer>",
                          "boxed_wrong_a": "<answer>\\boxed{1.0}</answer>",
                          "empty": ""}[kind])
        return SimpleNamespace(texts=texts, lengths=torch.tensor([len(t) for t in texts]))


def run(engine, info) -> dict:
    return evaluate(engine, records(), prompt_ids(), info, max_new_tokens=8, batch_size=BATCH,
                    temperature=0.6, seed=SEED, samples=SAMPLES, return_samples=PROBLEMS)


if __name__ == "__main__":
    from r1train.run.dist import init_distributed
    info = init_distributed("cpu")
    result = run(ScriptedEngine(), info)
    if info.rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    torch.distributed.barrier()
    sys.stdout.flush()
    os._exit(0)  # as tests/oracle_worker.py: skip the teardown that sometimes aborts rank 1
