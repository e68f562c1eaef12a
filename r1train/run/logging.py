"""Progress output and metrics: a progress bar with ETA (tqdm) and one line per step on rank 0,
`metrics.jsonl` for machines, JSONL sample dumps, and wandb when asked for (never required).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm


def clock(device=None) -> float:
    """`time.perf_counter()` once the device's queued work is done: CUDA kernels run
    asynchronously, so a phase timed without this is charged to whichever phase syncs next."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _fmt(v) -> str:
    if isinstance(v, float):
        if v != v or math.isinf(v):
            return str(v)
        return f"{v:.4g}"
    return str(v)


_BAR: "ProgressBar | None" = None  # the bar on the terminal now, if any


def say(message: str) -> None:
    """Print a line to stdout without tearing the progress bar: on a terminal tqdm clears the bar
    (on stderr), the line is printed, and the bar is drawn again below it."""
    if _BAR is not None:
        tqdm.write(message, file=sys.stdout)
    else:
        print(message)
    sys.stdout.flush()


class ProgressBar:
    """tqdm's bar (rate, ETA, the last step's key metric) on stderr when it is a terminal; when
    stderr is a log file, tqdm's same line printed whole every few seconds instead of redrawn with
    carriage returns. Lines printed meanwhile go through `say`."""

    def __init__(self, total: int, desc: str, enabled: bool = True, start: int = 0, every_s: float = 5.0):
        global _BAR
        self.total, self.desc, self.enabled, self.every_s = total, desc, enabled, every_s
        self.n, self.start = start, start
        self.t0 = self._last = time.time()
        self._postfix = ""
        self.tty = sys.stderr.isatty()
        self.bar = None
        if enabled and self.tty:
            self.bar = tqdm(total=total, initial=start, desc=desc, file=sys.stderr, dynamic_ncols=True,
                            unit="step")
            _BAR = self

    def update(self, n: int = 1, postfix: str = "") -> None:
        self.n += n
        self._postfix = postfix
        if self.bar is not None:
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(n)
            return
        now = time.time()
        if self.enabled and (now - self._last >= self.every_s or self.n >= self.total):
            # `initial`: the rate counts this process's steps only (a resumed run's earlier ones
            # took no time here)
            line = tqdm.format_meter(self.n, self.total, now - self.t0, prefix=self.desc, ascii=True,
                                     unit="step", postfix=self._postfix or None, initial=self.start)
            sys.stderr.write(line + "\n")
            sys.stderr.flush()
            self._last = now

    def close(self) -> None:
        global _BAR
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if _BAR is self:
            _BAR = None


def finite_or_none(value):
    """`value` with every NaN/inf float inside it replaced by None: JSON has no NaN, and a bare
    `NaN` in a .jsonl file breaks strict readers (jq, JavaScript, pandas' `lines=True` in some
    modes). A metric with no value this step (every reward None) is `null`."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def json_line(row: dict) -> str:
    """One strict-JSON line (no NaN or Infinity tokens) for a .jsonl log."""
    return json.dumps(finite_or_none(row), ensure_ascii=False, allow_nan=False) + "\n"


PER_STEP_LOGS = ("metrics.jsonl", "samples.jsonl", "eval_samples.jsonl", "tokens.jsonl")
"""The logs of an output folder with rows stamped by step; a resumed run truncates each to its step."""


def truncate_jsonl(path: str | os.PathLike, step: int) -> int:
    """Keep the rows of the JSONL file `path` whose "step" is <= `step`; return how many lines
    were dropped as unreadable (not a JSON object with a numeric step: a torn write).

    Rewritten to a temporary file and renamed over the old one, so a crash during the truncation
    leaves either file whole."""
    path = Path(path)
    if not path.exists():
        return 0
    keep, torn = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row_step = json.loads(line).get("step", 0)
        except (ValueError, AttributeError):
            torn += 1
            continue
        if not isinstance(row_step, (int, float)):
            torn += 1
        elif row_step <= step:
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)
    return torn


class MetricsLogger:
    """Appends one JSON object per step to `metrics.jsonl`; mirrors to wandb when enabled."""

    def __init__(self, out_dir: str | os.PathLike, enabled: bool, wandb_project: str | None = None,
                 run_name: str | None = None, config: dict | None = None):
        self.enabled = enabled
        self.path = Path(out_dir) / "metrics.jsonl"
        self.wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if wandb_project:
            try:
                import wandb
            except ImportError as e:
                raise ValueError("--train.wandb was set but wandb is not installed") from e
            # Offline when there is no network: the run syncs later with `wandb sync`.
            os.environ.setdefault("WANDB_MODE", "offline" if not os.environ.get("WANDB_API_KEY") else "online")
            self.wandb = wandb.init(project=wandb_project, name=run_name, config=config,
                                    dir=str(self.path.parent))

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                                for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json_line(row))
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def truncate_after(self, step: int) -> None:
        """On resume, drop the rows logged after the checkpoint from every per-step log in the
        folder (`PER_STEP_LOGS`), so that the resumed steps appear once; a torn last line (a crash
        in the middle of a write) is dropped too, and said."""
        if not self.enabled:
            return
        for name in PER_STEP_LOGS:
            path = self.path.parent / name
            torn = truncate_jsonl(path, step)
            if torn:
                print(f"[log] {path}: dropped {torn} unreadable line(s), left by a write that a crash "
                      f"cut short", flush=True)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def step_line(step: int, total: int, metrics: dict, keys: list[str]) -> str:
    parts = [f"step {step}/{total}"]
    parts += [f"{k}={_fmt(metrics[k])}" for k in keys if k in metrics]
    return " ".join(parts)


def write_jsonl(path: str | os.PathLike, rows: list[dict], append: bool = True) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json_line(r))
