"""Under torchrun: the two GRPO steps of tests/test_step_oracle.py (its TWO_PROCESSES options),
across the ranks (FSDP2), captured for the oracle; rank 0 writes them to OUT (torch.save:
tensors, lists, numbers).

    python -m torch.distributed.run --nproc_per_node=2 tests/oracle_worker.py OUT MODEL RUN_DIR [MUTATION]

MUTATION "drop-rank-1": rank 1's loss is multiplied by 0 before its backward, so the summed
gradient lacks that rank's rows: a fault the oracle must catch.
"""
import os
import sys

import torch

import r1train.grpo.trainer as grpo_trainer

from test_step_oracle import TWO_PROCESSES, _case_trainer, capture_grpo


def main(out: str, model: str, run_dir: str, mutation: str = "") -> None:
    if mutation == "drop-rank-1":
        real = grpo_trainer.policy_loss

        def dropped(*args, **kwargs):
            loss, metrics = real(*args, **kwargs)
            return (0 * loss if torch.distributed.get_rank() == 1 else loss), metrics

        grpo_trainer.policy_loss = dropped
    elif mutation:
        raise SystemExit(f"unknown mutation {mutation!r}")
    seen = capture_grpo(_case_trainer(model, run_dir, TWO_PROCESSES))
    if torch.distributed.get_rank() == 0:
        torch.save(seen, out)
    # Both ranks leave together and skip the interpreter's teardown: about one exit in ten, rank 1
    # aborted there ("terminate called without an active exception", SIGABRT) after the work was
    # done and saved, with or without destroy_process_group.
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
