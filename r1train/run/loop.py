"""The one training loop. GRPO and SFT are `Trainer`s: they build their model, data and step, and
the loop here runs them (STYLE 13; torchtitan's `Trainer.train`):

    resume (or start clean) -> evaluate step 0 -> for each step:
        train_step -> scheduler -> non-finite policy -> log -> evaluate? -> save? / stop?
    -> final evaluation -> save -> export (and, with --train.export_adapter, the LoRA adapters)

A subclass provides `train_step()` (one optimizer step, its metrics), `evaluate()` (held-out
results or None), and what its checkpoints hold besides the model and optimizer
(`trainer_state` / `load_trainer_state`, `checkpoint_models`). Everything else is decided here,
once, the same way for both stages:

- Resume takes the newest intact checkpoint (`open_run`), refuses options that define another
  run and applies the rest (`run/resume.py`); a clean start moves an earlier run aside.
- Stopping: SIGTERM/SIGINT or `--train.stop_at_step` save a checkpoint and exit cleanly; the same
  command resumes. The handler only sets a flag, and every rank agrees on it in a collective.
  torchrun SIGKILLs its workers 30 s after forwarding a SIGTERM (`--shutdown-timeout`), often
  less than a step of a real model, so the stages also look at the flag at safe points inside a
  step before its first optimizer update (`stop_point`): generation (the engine's per-token
  agreement), after scoring, between micro-batches. The model, optimizer and scheduler then
  still hold the previous step, which is saved; the interrupted step is redone on resume.
- Non-finite updates: a step whose loss or gradient norm is not finite is skipped (`optimizer_step`);
  `--train.max_nonfinite` of them in a row stop the run, the last checkpoint intact. An update
  that made a parameter non-finite cannot be undone: the run stops at once, before anything
  non-finite is saved or exported.
- The last step is evaluated once: a run resumed from its final step reuses that evaluation.
"""
from __future__ import annotations

import json
import os
import signal
import time
import weakref
from contextlib import closing, contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterator

import torch

from r1train.evaluate import paired_gain
from r1train.model.memory import set_mmap_threshold
from r1train.run.checkpoint import CheckpointManager, export_adapter, export_hf
from r1train.run.config import format_config, to_dict
from r1train.run.dist import DistInfo, all_reduce_sum, barrier, init_distributed
from r1train.run.folder import (
    EXPORTS,
    FolderLock,
    check_checkpoint_folders,
    check_export_folder,
    check_log_links,
    lock_folder,
    move_old_run_aside,
    on_main,
    remove_leftovers,
)
from r1train.run.logging import MetricsLogger, ProgressBar, clock, say, step_line, write_jsonl
from r1train.run.optim import (
    NonFiniteParameters,  # noqa: F401 - what optimizer_step raises, importable from here as before
    build_optimizer,
    build_scheduler,
    check_finite_params,
    grad_norm_and_clip,
)
from r1train.run.resume import apply_optimizer_options, check_resume

REPEAT_WINDOW_S = 2.0
"""A second stop signal sooner than this after the first is the same request, not an escalation."""


class StepInterrupted(Exception):
    """Every rank agreed to stop before the step's first optimizer update."""


class StepFailed(StepInterrupted):
    """A rank's step failed before its first update (a user's reward raised or hung): every rank
    stops as for a signal, the previous step saved, then raises `error`."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class Trainer:
    tag = "train"
    step_keys: tuple[str, ...] = ("loss", "grad_norm", "lr")  # printed every log_every steps
    bar_key = "loss"

    def __init__(self, cfg):
        self.cfg = cfg
        self.info, self.out, self.folder_lock = start_run(cfg, self.tag)
        weakref.finalize(self, self.folder_lock.release)  # a trainer built but never trained
        self.main = self.info.is_main
        # One GPU computes in bf16 through autocast; FSDP through its MixedPrecisionPolicy. A
        # float64 model computes in float64.
        cuda_alone = self.info.device.type == "cuda" and not self.info.distributed \
            and getattr(getattr(cfg, "model", None), "dtype", "auto") != "float64"
        self.autocast: Callable = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cuda_alone \
            else nullcontext
        self.step = 0
        self.nonfinite_in_row = 0
        self.stop_requested = False
        self.first_signal_at = 0.0
        self.eval_history: list[dict] = []
        self.first_scores: list[float] | None = None  # per-problem scores of the run's first evaluation

    def setup_training(self, model, hf_config, tokenizer, lora_base: dict | None = None) -> None:
        """After the subclass built its (sharded) model: optimizer, schedule, checkpoints, logs.
        `lora_base`: with LoRA, the base model's identity (`model.load.lora_base`): checkpoints
        then hold the adapters only, with it."""
        cfg, o = self.cfg, self.cfg.optim
        self.model, self.hf_config, self.tokenizer, self.lora_base = model, hf_config, tokenizer, lora_base
        # What trains: every parameter, or with LoRA the adapters' alone (the base is frozen).
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.trainable, o.lr, o.weight_decay, (o.beta1, o.beta2))
        self.scheduler = build_scheduler(self.optimizer, warmup_steps=o.warmup_steps,
                                         max_steps=cfg.train.max_steps, schedule=o.schedule,
                                         min_lr_ratio=o.min_lr_ratio)
        self.ckpt = CheckpointManager(self.out / "checkpoints", self.info, cfg.train.keep_last)
        self.logger = MetricsLogger(self.out, self.main, cfg.train.wandb_project if cfg.train.wandb else None,
                                    config=to_dict(cfg))

    # ---------------------------------------------------------------- for the subclasses
    def train_step(self) -> dict:
        raise NotImplementedError

    def evaluate(self) -> dict | None:
        return None

    def trainer_state(self) -> dict:
        return {}

    def load_trainer_state(self, state: dict, checkpoint: Path) -> None:
        pass

    def final_result(self) -> dict:
        """Entries of the run's result besides the final evaluation."""
        return {}

    def checkpoint_models(self, saving: bool) -> dict | None:
        """Models checkpointed besides the trained one ({name: module}), when saving or loading."""
        return None

    def stop_point(self, failure: Exception | None = None) -> None:
        """A safe point before the step's first update: raise StepInterrupted if any rank got a
        stop signal, StepFailed if any rank passes a `failure`. Collective: every rank calls it at
        the same points."""
        flags = torch.tensor([float(self.stop_requested), float(failure is not None)], device=self.info.device)
        stop, failed = (all_reduce_sum(flags) > 0).tolist()
        if failed:
            raise StepFailed(failure or RuntimeError(f"[{self.tag}] step {self.step} failed on another rank "
                                                     f"(its error is in that rank's output)"))
        if stop:
            raise StepInterrupted

    def optimizer_step(self, loss: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """Clip, then step unless the loss or the gradient norm is non-finite on any rank (the
        gradients are dropped then). Returns (gradient norm before clipping, stepped)."""
        norm = grad_norm_and_clip(self.trainable, self.cfg.optim.max_grad_norm)
        finite = (torch.isfinite(norm) & torch.isfinite(loss.detach())).float().reshape(1)
        stepped = all_reduce_sum(finite.to(self.info.device)).item() == self.info.world_size
        if stepped:
            self.optimizer.step()
            check_finite_params(self.trainable, self.step, self.ckpt, self.info.device, self.tag)
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach(), stepped

    # ---------------------------------------------------------------- the loop
    def train(self) -> dict:
        with self.folder_lock:  # released when the run ends, however it ends
            return self._train()

    def _train(self) -> dict:
        t = self.cfg.train
        self._resume()
        # Exits in reverse order: the old signal handlers come back, then the logger closes.
        with closing(self.logger), stop_signals(self._on_signal):
            if self.step == 0:
                self._evaluate()
            bar = ProgressBar(t.max_steps, self.tag, enabled=self.main and t.progress, start=self.step)
            while self.step < t.max_steps:
                self.step += 1
                t0 = clock(self.info.device)
                try:
                    metrics = self.train_step()
                except StepInterrupted as e:
                    bar.close()
                    stopped = self._stop_before_update(failed=isinstance(e, StepFailed))
                    if isinstance(e, StepFailed):
                        raise e.error from None
                    return stopped
                self.scheduler.step()
                self._count_nonfinite(metrics)
                dt = clock(self.info.device) - t0
                metrics.update({"lr": self.scheduler.get_last_lr()[0], "time/step": dt,
                                "tokens_per_s": metrics.get("tokens", 0.0) / max(dt, 1e-9)})
                self.logger.log(metrics, self.step)
                if self.main and self.step % t.log_every == 0:
                    say(step_line(self.step, t.max_steps, metrics, [*self.step_keys, "lr", "time/step"]))
                bar.update(1, f"{self.bar_key}={metrics.get(self.bar_key, float('nan')):.3f}")
                if t.eval_every and self.step % t.eval_every == 0 and self.step < t.max_steps:
                    self._evaluate()  # the last step is evaluated after the loop
                if self._save_and_stop():
                    bar.close()
                    if self.main:
                        say(f"[{self.tag}] stopped at step {self.step}; resume with the same command")
                    return {"stopped": True, "step": self.step}
            bar.close()
            # A run resumed from its last step may have evaluated it already (killed during the
            # export, or run again once finished): reuse that result rather than log it twice.
            done = bool(self.eval_history) and self.eval_history[-1]["step"] == self.step
            final = (self.eval_history[-1] if done else self._evaluate()) or {}
            self.save()
            if t.export:
                export_hf(self.model, self.hf_config, self.tokenizer, self.out / "final", self.info,
                          prefix="lm.", config_text=format_config(self.cfg))
                if self.main:
                    say(f"[{self.tag}] exported {self.out / 'final'}")
            if t.export_adapter:  # LoRA's A and B alone, in PEFT's format (checked at start: LoRA is on)
                export_adapter(self.model, self.hf_config, self.out / "final-adapter", self.info, prefix="lm.",
                               tokenizer=self.tokenizer)
                if self.main:
                    say(f"[{self.tag}] exported the LoRA adapters to {self.out / 'final-adapter'}")
            result = {**final, **self.final_result(), "eval_history": self.eval_history}
            if self.eval_history:
                result["initial"] = self.eval_history[0]
            return result

    def save(self) -> None:
        state = {"scheduler": self.scheduler.state_dict(), "nonfinite_in_row": self.nonfinite_in_row,
                 "eval_history": json.dumps(self.eval_history), "first_scores": json.dumps(self.first_scores),
                 **self.trainer_state()}
        self.ckpt.save(self.step, self.model, self.optimizer, state, format_config(self.cfg),
                       extra_models=self.checkpoint_models(saving=True), lora_base=self.lora_base)

    def _resume(self) -> None:
        latest = open_run(self.ckpt, self.out, self.cfg.train.resume, self.tag, format_config(self.cfg))
        if latest is None:
            return
        changed = check_resume(latest, self.cfg, self.tag)  # refuses a different run's options
        state = self.ckpt.load(latest, self.model, self.optimizer,
                               extra_models=self.checkpoint_models(saving=False), lora_base=self.lora_base)
        self.scheduler.load_state_dict(state["scheduler"])
        apply_optimizer_options(self.optimizer, self.scheduler, self.cfg.optim)
        self.step = int(state["step"])
        self.nonfinite_in_row = int(state["nonfinite_in_row"])
        self.eval_history = json.loads(state["eval_history"])
        # Checkpoints written before the scores were kept: later evaluations report no gain.
        self.first_scores = json.loads(state.get("first_scores", "null"))
        self.logger.truncate_after(self.step)
        self.load_trainer_state(state, latest)
        if self.main:
            say(f"[{self.tag}] resumed from {latest} at step {self.step}")
            for line in changed:
                say(line)

    def _on_signal(self, signum, frame):
        """The first SIGTERM/SIGINT asks for a stop at the next safe point, with a checkpoint. A
        second one, later than `REPEAT_WINDOW_S`, exits at once and saves nothing: the way out of
        a step that does not reach a safe point (a reward stuck in C code). Within the window it
        is the same request twice: a launcher forwarding the signal the terminal already sent
        (Ctrl-C reaches torchrun and its workers, and torchrun passes it on)."""
        now = time.monotonic()
        if self.stop_requested:
            if now - self.first_signal_at < REPEAT_WINDOW_S:
                return
            last = self.ckpt.latest() if hasattr(self, "ckpt") else None
            os.write(2, f"\n[{self.tag}] signal {signum} again: exiting now, saving nothing; the last "
                        f"checkpoint is {last or 'none'}\n".encode())
            os._exit(128 + signum)
        self.stop_requested, self.first_signal_at = True, now
        if self.main:
            say(f"\n[{self.tag}] signal {signum}: saving a checkpoint at the next safe point, then exiting "
                f"(a second signal exits at once, saving nothing)")

    def _evaluate(self) -> dict | None:
        """Held-out evaluation now: stamped with the step, kept, printed, logged (completions in
        eval_samples.jsonl). After the run's first evaluation, with `gain` and `gain_se`: the
        accuracy gained since that one, paired on the same problems (evaluate.paired_gain)."""
        res = self.evaluate()
        if res is None:
            return None
        samples = res.pop("samples", None)
        scores = res.pop("scores", None)
        if self.first_scores is None and not self.eval_history:
            self.first_scores = scores
        elif scores is not None and self.first_scores is not None and len(scores) == len(self.first_scores):
            res["gain"], res["gain_se"] = paired_gain(self.first_scores, scores)
        res["step"] = self.step
        if samples and self.main:
            write_jsonl(self.out / "eval_samples.jsonl", [{"step": self.step, **x} for x in samples])
        self.eval_history.append(res)
        if self.main:
            extra = [n for n in res if n.startswith(("pass@", "maj@"))]  # k > 1: pass@1..pass@k, maj@k
            extra = "".join(f" {n} {res[n]:.3f}" for n in extra[:1] + extra[-2:])  # pass@1, pass@k, maj@k
            se = f" ± {res['accuracy_se']:.3f}" if "accuracy_se" in res else ""
            gain = f", {res['gain']:+.3f} ± {res['gain_se']:.3f} since step 0" if "gain" in res else ""
            say(f"[{self.tag}] eval step {self.step}: accuracy {res['accuracy']:.3f}{se} "
                f"({res['num_problems']} problems{gain}) format {res['format']:.3f} "
                f"mean length {res['mean_length']:.1f}{extra}")
        self.logger.log({f"eval/{k}": v for k, v in res.items() if k != "step"}, self.step)
        return res

    def _count_nonfinite(self, metrics: dict) -> None:
        if not metrics.get("skipped_update"):
            self.nonfinite_in_row = 0
            return
        self.nonfinite_in_row += 1
        if self.main:
            say(f"[{self.tag}] step {self.step}: non-finite loss or gradient norm, update skipped "
                f"({self.nonfinite_in_row}/{self.cfg.train.max_nonfinite} in a row)")
        if self.nonfinite_in_row >= self.cfg.train.max_nonfinite:
            raise RuntimeError(
                f"[{self.tag}] {self.nonfinite_in_row} non-finite updates in a row at step {self.step}; "
                f"stopping. The last checkpoint in {self.ckpt.root} is intact. Lower --optim.lr, "
                f"check the data (and rewards) for NaN, or raise --train.max_nonfinite.")

    def _save_and_stop(self) -> bool:
        """Save every `save_every` steps and before stopping; stop when any rank got a signal
        or this is `stop_at_step`. Collective: every rank calls it after every step."""
        t = self.cfg.train
        stop = stop_agreed(self.stop_requested or self.step == t.stop_at_step, self.info.device)
        if (t.save_every and self.step % t.save_every == 0) or stop:
            self.save()
        return stop

    def _stop_before_update(self, failed: bool = False) -> dict:
        """A signal (or a failure) stopped step N before its first update: model, optimizer and
        scheduler still hold step N-1, which is saved unless it was saved or resumed already."""
        self.step -= 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.step > 0 and self.ckpt.last_saved != self.step:
            self.save()
        if self.main:
            saved = f"checkpoint of step {self.step} in {self.ckpt.root}" if self.step else "nothing to save"
            why = "a failure" if failed else "signal"
            say(f"[{self.tag}] stopped by {why} during step {self.step + 1}, before its update: {saved}; "
                f"resume with the same command{' once it is fixed' if failed else ''}")
        return {"stopped": True, "step": self.step}


# ---------------------------------------------------------------- helpers of the loop
def start_run(cfg, tag: str) -> tuple[DistInfo, Path, FolderLock]:
    """Process group, config check for this world size, seed, the output folder and its lock
    (`run/folder.py`; the caller releases it when the run is done), config printout."""
    info = init_distributed(cfg.train.device, cfg.train.fsdp, timeout_s=cfg.train.collective_timeout_s)
    cfg.validate(info.world_size)
    if info.device.type == "cpu":
        set_mmap_threshold(cfg.train.malloc_mmap_threshold)
    torch.manual_seed(cfg.train.seed)
    out = Path(cfg.train.output_dir)
    lock = lock_folder(out, info, tag)  # before the data and the model: a run that cannot save stops now
    if info.is_main:
        print(f"[{tag}] world size {info.world_size}, device {info.device}, FSDP2 "
              f"{'on' if info.distributed else 'off'}\n{format_config(cfg)}", flush=True)
    return info, out, lock


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


def stop_agreed(requested: bool, device: torch.device) -> bool:
    """Did any rank get a stop signal? Collective: every rank calls it at the same points."""
    flag = torch.tensor([float(requested)], device=device)
    return all_reduce_sum(flag).item() > 0


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
    resumed run may delete or replace (`checkpoints/step-N/`, the exports) is checked to hold only
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
            check_log_links(out)
    on_main(info, tidy)
    path = ckpt.resume_point() if resume else None
    if path is not None:
        def check_exports():
            for name in EXPORTS:
                check_export_folder(out / name)
        on_main(info, check_exports)
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
