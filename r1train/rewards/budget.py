"""A user's reward function, run with a time budget, its own copy of the batch, and a way out.

The built-in rewards are bounded by construction (accuracy: per-answer and per-batch timeouts in
worker processes). A function the user brings (custom.py) is arbitrary code: it can hang, raise,
or write into the lists it is given. `UserReward` wraps one so that

- it is checked when loaded: a function that cannot take `fn(completions, **columns)` (say
  `os:system`) is refused at start, not at step 1 after the model loaded;
- each call gets fresh lists: a reward that edits `completions` (or a column) changes neither
  what later rewards score nor what `samples.jsonl` records;
- a call that runs past `--rewards.custom_timeout_s` is abandoned with RewardError naming the
  function and the batch; one that raises is named too, with the first row that raises alone;
- a stop signal (SIGTERM/SIGINT) during a call abandons it at once (RewardInterrupted), after
  the trainer's own handler has noted the stop: the trainer then saves its last completed step.

How the call is bounded: it runs on the main thread, as a direct call would (a reward may use
`signal.alarm` itself, as math_verify does, which works only there), and a watchdog thread sends
the main thread SIGUSR1 when the budget is spent; the handler raises `_Expired` inside the
reward's Python code. `_Expired` is a BaseException, so a reward's own `except Exception` does not
swallow it, and the watchdog repeats it every second until the call unwinds. What no Python-level
mechanism can interrupt is a C call that never returns (a regex backtracking forever holds the
interpreter): the budget and the first signal then wait for it, and only a second signal (which
exits at once, `run/loop.py`) or SIGKILL ends the run. SIGUSR1 that is not the watchdog's (a
scheduler's warning) is passed to the handler that was there before.
"""
from __future__ import annotations

import inspect
import math
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

from r1train.rewards.custom import RewardError, describe

RECORD_COLUMNS = ("solution", "answer", "problem", "prompt")
"""Columns every batch carries ("" where a record lacks one), whatever the dataset's columns."""
STANDARD_COLUMNS = (*RECORD_COLUMNS, "completion_ids")
"""Keyword arguments every reward receives (`score_completions`)."""

DEFAULT_CUSTOM_TIMEOUT_S = 120.0


class RewardInterrupted(Exception):
    """A stop signal arrived while a user's reward ran; its result was dropped."""


class _Expired(BaseException):
    """Raised inside a reward by the watchdog's signal: the call's budget is spent."""


def signature_of(name: str, fn: Callable) -> inspect.Signature | None:
    """`fn`'s signature, checked to take `fn(completions, **columns)`: RewardError when it cannot
    take the completions or a standard column. A parameter for a column of the user's own data
    may be required (the data's columns are checked at the first call); None when Python cannot
    read the signature (some C functions)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        sig.bind_partial([], **dict.fromkeys(STANDARD_COLUMNS, []))
    except TypeError as e:
        raise RewardError(f"reward {name!r} ({describe(fn)}{sig}) cannot be called as fn(completions, "
                          f"**columns): {e}. A reward takes the completions and keyword arguments, e.g. "
                          f"def {name.replace('-', '_')}(completions, **kwargs) -> list[float | None]") from None
    return sig


def _fresh(columns: dict[str, list]) -> dict[str, list]:
    """New lists for one call: strings and numbers are immutable and shared; a token list, or a
    column value that is itself a container, is copied."""
    out = {}
    for k, col in columns.items():
        out[k] = [list(v) if isinstance(v, (list, tuple)) else (dict(v) if isinstance(v, dict) else v)
                  for v in col]
    return out


class UserReward:
    """A user's reward function with a time budget per call (None: unbounded), fresh lists per
    call, and errors that name it. Called like the function it wraps."""

    def __init__(self, name: str, fn: Callable, timeout_s: float | None):
        self.signature = signature_of(name, fn)
        self.name, self.fn, self.timeout_s = name, fn, timeout_s
        self.__name__ = name
        self.__module__ = getattr(fn, "__module__", None) or "?"
        self.__qualname__ = getattr(fn, "__qualname__", type(fn).__name__)

    def __call__(self, completions: list[str], **columns) -> Any:
        label = f"reward {self.name!r} ({describe(self.fn)})"
        if self.signature is not None:
            try:
                self.signature.bind(completions, **columns)
            except TypeError as e:
                raise RewardError(f"{label} cannot take the batch's columns ({', '.join(columns)}): {e}") from None
        try:
            return _bounded(self.fn, list(completions), _fresh(columns), self.timeout_s)
        except _Expired:
            raise RewardError(f"{label} did not return within --rewards.custom_timeout_s="
                              f"{self.timeout_s:g} s on a batch of {len(completions)} completions; raise the "
                              f"budget if it is legitimately slow") from None
        except (RewardInterrupted, RewardError, KeyboardInterrupt):
            raise
        except Exception as e:  # noqa: BLE001 - the user's code; named and re-raised as one line
            row = self._failing_row(completions, columns, e)
            where = f"on completion {row} of the batch ({_snippet(columns, row)})" if row is not None \
                else f"on a batch of {len(completions)} completions"
            raise RewardError(f"{label} raised {type(e).__name__}: {e} {where}") from e

    def _failing_row(self, completions: list[str], columns: dict, error: Exception) -> int | None:
        """The first row that raises the same exception type alone, probed within one budget;
        None when no single row does (the failure needs the whole batch) or the budget runs out."""
        deadline = time.monotonic() + (self.timeout_s or math.inf)
        for i in range(len(completions)):
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                _bounded(self.fn, [completions[i]], _fresh({k: v[i:i + 1] for k, v in columns.items()}),
                         None if math.isinf(left) else left)
            except _Expired:
                return None
            except type(error):
                return i
            except Exception:  # noqa: BLE001 - another failure of the same row: not the one reported
                continue
        return None


def _snippet(columns: dict, row: int) -> str:
    problem = str((columns.get("problem") or [""] * (row + 1))[row])
    return f"problem {problem[:60]!r}{'...' if len(problem) > 60 else ''}"


def _bounded(fn: Callable, completions: list[str], columns: dict, timeout_s: float | None):
    """fn(completions, **columns) on this (main) thread; `_Expired` raised inside it after
    `timeout_s`; RewardInterrupted when SIGTERM/SIGINT arrives meanwhile, after the handler that
    was installed before (the trainer's, which notes the stop) has run. Off the main thread
    signals cannot be used: the call is made unbounded."""
    if threading.current_thread() is not threading.main_thread():
        return fn(completions, **columns)
    state = {"active": True, "expired": False}
    main_id = threading.get_ident()
    done = threading.Event()

    def watchdog():
        if timeout_s is None or done.wait(timeout_s):
            return
        state["expired"] = True
        while state["active"] and not done.is_set():
            signal.pthread_kill(main_id, signal.SIGUSR1)
            done.wait(1.0)

    previous = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}

    def on_usr1(signum, frame):
        if state["active"] and state["expired"]:
            raise _Expired
        if callable(previous[signal.SIGUSR1]):
            previous[signal.SIGUSR1](signum, frame)

    def on_stop(signum, frame):
        before = previous[signum]
        if before == signal.SIG_IGN:
            return
        if callable(before):
            before(signum, frame)  # the trainer's handler: notes the stop (or exits, on a second)
        else:  # SIG_DFL (or a C handler): the process would have ended here
            raise SystemExit(128 + signum)
        if state["active"]:
            raise RewardInterrupted(f"signal {signum} while a reward ran")

    signal.signal(signal.SIGUSR1, on_usr1)
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    thread = threading.Thread(target=watchdog, name="reward-watchdog", daemon=True)
    thread.start()
    try:
        return fn(completions, **columns)
    finally:
        state["active"] = False
        done.set()
        for s, h in previous.items():
            signal.signal(s, h)
        thread.join(timeout=5.0)
