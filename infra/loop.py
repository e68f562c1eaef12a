"""The end of a training step, shared by the GRPO and SFT trainers: evaluate, save, or stop.

A run stops early when SIGTERM/SIGINT arrives (a preempted job) or at `--train.stop_at_step`
(tests of preemption and resume). Either way it saves a checkpoint and exits cleanly, and the
same command resumes it. The signal handler only sets a flag: the step in flight finishes, then
every rank agrees to stop after the same step, since a rank that left alone would leave the
others waiting forever in their next collective.

The trainers call, after each step and in this order:
    if eval_due(step, train): run_eval()
    save, stop = save_and_stop(step, train, device, stop_requested)
so that a signal arriving during the evaluation still stops the run after this step.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from infra.dist import DistInfo, all_reduce_sum, init_distributed
from infra.logging import say, write_jsonl

if TYPE_CHECKING:  # infra must not import the trainers' packages at run time
    from grpo.config import TrainConfig


def start_run(cfg, tag: str) -> tuple[DistInfo, Path]:
    """Process group, config check for this world size, seed, output folder, config printout."""
    from infra.config import format_config

    info = init_distributed(cfg.train.device, cfg.train.fsdp)
    cfg.validate(info.world_size)
    torch.manual_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(format_config(cfg))  # the run's options, at the top
        print(f"[{tag}] world size {info.world_size}, device {info.device}, FSDP2 "
              f"{'on' if info.distributed else 'off'}\n{format_config(cfg)}", flush=True)
    return info, out


def epoch_order(n: int, seed: int, start: int, count: int) -> list[int]:
    """Items start..start+count-1 of an endless stream of seeded permutations of range(n), one
    permutation per epoch; a pure function of its arguments, so a resumed run reads on where it
    stopped. Each permutation touched is drawn once."""
    out, pos = [], start
    while pos < start + count:
        epoch, i = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        take = min(n - i, start + count - pos)
        out += perm[i:i + take].tolist()
        pos += take
    return out


def eval_due(step: int, train: TrainConfig) -> bool:
    """Evaluate every `eval_every` steps, except the last: the trainer evaluates it after the loop."""
    return bool(train.eval_every) and step % train.eval_every == 0 and step < train.max_steps


def save_and_stop(step: int, train: TrainConfig, device: torch.device,
                  stop_requested: bool) -> tuple[bool, bool]:
    """(save, stop) after `step`. Collective: every rank calls it after every step.

    Stop when any rank got a signal or `step` is `stop_at_step`; save every `save_every` steps
    and before stopping.
    """
    flag = torch.tensor([float(stop_requested or step == train.stop_at_step)], device=device)
    stop = all_reduce_sum(flag).item() > 0
    save = bool(train.save_every and step % train.save_every == 0) or stop
    return save, stop


def record_eval(trainer, tag: str, res: dict) -> dict:
    """Stamp an evaluation with the trainer's step, keep it in its history, print and log it."""
    samples = res.pop("samples", None)
    res["step"] = trainer.step
    if samples and trainer.main:  # every held-out completion with its verdicts, per evaluation
        write_jsonl(trainer.out / "eval_samples.jsonl", [{"step": trainer.step, **x} for x in samples])
    trainer.eval_history.append(res)
    if trainer.main:
        say(f"[{tag}] eval step {trainer.step}: accuracy {res['accuracy']:.3f} format "
              f"{res['format']:.3f} mean length {res['mean_length']:.1f}")
    trainer.logger.log({f"eval/{k}": v for k, v in res.items() if k != "step"}, trainer.step)
    return res


@contextmanager
def stop_signals(handler: Callable[[int, object], None]) -> Iterator[None]:
    """Route SIGTERM and SIGINT to `handler(signum, frame)` inside the block; restore the old ones."""
    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
