"""Two FSDP2 ranks (gloo) generating with the engine, for tests/test_rollout.py:

    python -m torch.distributed.run --nproc_per_node=2 tests/engine_worker.py OUT SYNC_EVERY

Rank 0 samples rows that run ~27 tokens, rank 1 rows that end at ~14, then a second call in which
rank 1 has no prompt at all; the ranks must run the same number of forwards (FSDP), agreeing on
when to stop at every SYNC_EVERY-th step. Each rank writes its completions to OUT.<rank>.json.
"""
import copy
import json
import sys

import torch

from r1train.model.engine import Engine
from r1train.model.policy import PolicyModel
from r1train.run.dist import decoder_layers, init_distributed, shard_model

from test_rollout import ASSET, _prompt

CALLS = {0: [([1, 1, 1], [11, 12, 13]), ([2, 2], [31, 32])],
         1: [([0, 0, 0], [21, 22, 23]), ([], [])]}  # (problem of each row, seeds) per call


def main(out: str, sync_every: int) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = init_distributed("cpu")
    tok = AutoTokenizer.from_pretrained(ASSET)
    lm = AutoModelForCausalLM.from_pretrained(ASSET, dtype=torch.float64).eval()
    policy = PolicyModel(copy.deepcopy(lm))
    shard_model(policy, decoder_layers(policy.lm), info)
    engine = Engine(policy, tok, info)
    engine.sync_every = sync_every
    rows = []
    for problems, seeds in CALLS[info.rank]:
        prompts = [_prompt(tok, i, system=i != 0) for i in problems]
        r = engine.generate(prompts, seeds, max_new_tokens=32, temperature=1.0)
        rows.append(None if r is None else [ids[m.bool()].tolist() for ids, m in zip(r.completion_ids,
                                                                                     r.completion_mask)])
    with open(f"{out}.{info.rank}.json", "w") as f:
        json.dump(rows, f)
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
