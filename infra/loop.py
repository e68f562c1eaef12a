"""The end of a training step, shared by the GRPO and SFT trainers: evaluate, save, or stop;
and the start of a run: resume from the newest intact checkpoint, or start clean.

A run stops early when SIGTERM/SIGINT arrives (a preempted job) or at `--train.stop_at_step`
(tests of preemption and resume). Either way it saves a checkpoint and exits cleanly, and the
same command resumes it. The signal handler only sets a flag; every rank agrees on it in a
collective (a rank that left alone would leave the others waiting forever in their next one).

torchrun SIGKILLs its workers 30 s after forwarding a SIGTERM (`--shutdown-timeout`), often less
than a step of a real model. So the trainers also look at the flag at safe points inside a step,
before its first optimizer update: during generation (in the per-token agreement that generation
already makes), between micro-batches, after scoring. The model, optimizer and scheduler then
still hold the previous step, which is saved (`stop_before_update`); the interrupted step is
redone on resume. After the first update of a step the step runs to its end.

The trainers call, after each step and in this order:
    if eval_due(step, train): run_eval()
    save, stop = save_and_stop(step, train, device, stop_requested)
so that a signal arriving during the evaluation still stops the run after this step.

After each optimizer update they call `check_finite_params`: an update that made a parameter
NaN/Inf (e.g. an overflowing learning rate) cannot be undone, so the run stops there with the last
checkpoint intact, before anything non-finite is saved or exported.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from infra.dist import DistInfo, all_reduce_sum, barrier, init_distributed
from infra.logging import say, write_jsonl
from infra.run_folder import check_checkpoint_folders, check_export_folder, move_old_run_aside, on_main, \
    remove_leftovers

if TYPE_CHECKING:  # infra must not import the trainers' packages at run time
    from grpo.config import TrainConfig


def start_run(cfg, tag: str) -> tuple[DistInfo, Path]:
    """Process group, config check for this world size, seed, output folder, config printout."""
    from infra.config import ConfigError, format_config

    if not cfg.train.collective_timeout_s > 0:
        raise ConfigError(f"--train.collective_timeout_s={cfg.train.collective_timeout_s}: must be > 0")
    info = init_distributed(cfg.train.device, cfg.train.fsdp, timeout_s=cfg.train.collective_timeout_s)
    cfg.validate(info.world_size)
    torch.manual_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
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


def open_run(ckpt, out: Path, resume: bool, tag: str, config_text: str = "") -> Path | None:
    """The checkpoint to resume from (the newest intact one), or None for a clean start. Collective.

    First the leftovers of interrupted saves, prunes and exports are removed, and every folder a
    resumed run may delete or replace (`checkpoints/step-N/`, `final/`) is checked to hold only
    the project's files (ConfigError naming the file otherwise). A clean start over an earlier
    run (`--train.resume false`, or nothing to resume) moves that run's checkpoints, logs and
    export to `<out>/old-<date>-<time>/`: a new run never prunes, appends to or resumes from an
    old one. Then `config_text`, the options this run goes on with, is written to `<out>/config.yaml`.
    """
    info = ckpt.info

    def tidy():
        remove_leftovers(out, ckpt.root)
        if resume:
            check_checkpoint_folders(ckpt.root)
    on_main(info, tidy)
    path = ckpt.resume_point() if resume else None
    if path is not None:
        on_main(info, lambda: check_export_folder(out / "final"))
    else:
        moved = on_main(info, lambda: move_old_run_aside(out))
        if moved is not None:
            why = "--train.resume false" if not resume else "no checkpoint to resume from"
            print(f"[{tag}] starting a new run ({why}): moved the earlier run's files in {out} to {moved}",
                  flush=True)
    if config_text and info.is_main:
        (out / "config.yaml").write_text(config_text)  # the run's options, at the top of its folder
    barrier()
    return path


class StepInterrupted(Exception):
    """Every rank agreed to stop before the step's first optimizer update."""


def stop_agreed(requested: bool, device: torch.device) -> bool:
    """Did any rank get a stop signal? Collective: every rank calls it at the same points."""
    flag = torch.tensor([float(requested)], device=device)
    return all_reduce_sum(flag).item() > 0


def generation_all_done(device: torch.device, requested: Callable[[], bool]) -> Callable[[bool], bool]:
    """`all_done` for `grpo.rollout.generate`: stop when every rank is done, or as soon as any rank
    got a stop signal; one all-reduce per token, as the plain agreement (FSDP ranks must run the
    same number of forwards). The caller then raises StepInterrupted after `stop_agreed`."""
    def all_done(local_done: bool) -> bool:
        flags = torch.tensor([0.0 if local_done else 1.0, float(requested())], device=device)
        running, stopping = all_reduce_sum(flags).tolist()
        return running == 0 or stopping > 0
    return all_done


def stop_before_update(trainer, tag: str) -> dict:
    """A signal stopped step N before its first update: model, optimizer and scheduler still hold
    step N-1, which is saved unless this process saved or resumed it already. The result is the
    trainers' early-stop result; the same command resumes at step N."""
    trainer.step -= 1
    trainer.optimizer.zero_grad(set_to_none=True)
    if trainer.step > 0 and trainer.ckpt.last_saved != trainer.step:
        trainer.save()
    if trainer.main:
        saved = f"checkpoint of step {trainer.step} in {trainer.ckpt.root}" if trainer.step else "nothing to save"
        say(f"[{tag}] stopped by signal during step {trainer.step + 1}, before its update: {saved}; "
            f"resume with the same command")
    return {"stopped": True, "step": trainer.step}


class NonFiniteParameters(RuntimeError):
    """An optimizer update made a parameter NaN or infinite."""


def check_finite_params(params, step: int, ckpt, device: torch.device, tag: str) -> None:
    """Raise NonFiniteParameters on every rank when any rank holds a NaN/Inf parameter. Collective.

    One `isfinite().all()` per parameter (this rank's shard under FSDP2), no copy of the weights:
    cheap next to the update it follows. The loss and gradient-norm guard cannot see this case:
    a finite gradient times an overflowing learning rate (`--optim.lr 1e39` is a finite double but
    inf in float32) gives finite loss and gradients and infinite weights."""
    bad = torch.zeros(1, device=device)
    for p in params:
        local = p.to_local() if hasattr(p, "to_local") else p
        bad += (~torch.isfinite(local.detach())).any().float()
    if all_reduce_sum(bad).item() > 0:
        last = ckpt.latest()
        raise NonFiniteParameters(
            f"[{tag}] step {step}: the optimizer update made parameters non-finite (NaN/Inf); stopping "
            f"before anything is saved or exported. The last checkpoint is intact: "
            f"{last if last else f'none yet in {ckpt.root}'}. Lower --optim.lr (or --optim.max_grad_norm)")
