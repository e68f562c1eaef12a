"""Time-bounded math_verify: worker processes that are killed and restarted when a job overruns.

Why processes and not math_verify's own timeout: math_verify 0.9 bounds `parse`/`verify` with
`signal.alarm`, which raises `ValueError` off the main thread (trainers score rewards from worker
threads) and cannot interrupt a long C call (a big-integer power inside sympy). A process can
always be killed. Why `subprocess` and not `multiprocessing`: the worker is started by
fork+exec of a fresh interpreter that runs `math_answer.py` by path, so it never forks a parent
whose torch holds threads or locks, never re-imports the trainer's `__main__` (as spawn and
forkserver do), and never imports torch. Workers live in their own session so a Ctrl-C aimed
at the trainer does not kill them mid-batch, exit on EOF of stdin when the trainer dies, and are
shut down at interpreter exit.

Scheduling: each worker holds at most one chunk of jobs, which it answers one by one; each job
gets `timeout_s` from the moment the previous answer (or the chunk) arrived. On overrun the
worker is killed, the job scores TIMEOUT, the rest of its chunk goes back to the queue and a
fresh worker starts in the background. A worker's start-up is bounded separately.
"""
from __future__ import annotations

import atexit
import json
import math
import os
import select
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from r1train.rewards.math_answer import ABANDONED, CRASHED, TIMEOUT

_WORKER_FILE = str(Path(__file__).with_name("math_answer.py"))
# Load the worker module by path: `-m rewards...` would import rewards/__init__ (and maybe torch).
# The import path comes in argv[2] (see _worker_path), set before anything else is imported.
_BOOT = ("import json, sys; sys.path[:] = json.loads(sys.argv[2]); import importlib.util as u; "
         "s = u.spec_from_file_location('r1_math_worker', sys.argv[1]); m = u.module_from_spec(s); "
         "s.loader.exec_module(m); m.serve()")
_MAX_CHUNK = 16


class VerifierStartupError(RuntimeError):
    """A verifier worker died or hung before it was ready (e.g. math_verify is not installed)."""


def split_frames(buffer: bytearray) -> list:
    """The complete frames (4-byte big-endian length, then JSON) at the start of `buffer`,
    decoded and removed from it; a partial frame stays for the next read."""
    frames = []
    while len(buffer) >= 4:
        n = int.from_bytes(buffer[:4], "big")
        if len(buffer) < 4 + n:
            break
        frames.append(json.loads(buffer[4:4 + n]))
        del buffer[:4 + n]
    return frames


def _worker_path() -> list[str]:
    """The parent's import path, absolute, without the current directory.

    `python -c` would put the current directory first on the worker's path, so a
    `math_verify.py` in the folder a user trains from would run in the worker; `-I` (isolated
    mode, Python 3.4+, unlike `-P` which needs 3.11) leaves it out, and also PYTHONPATH and the
    user site-packages, which this list brings back as the parent resolved them. The current
    directory is left out of the list too (the parent's first entry under `python -c` / `-m`):
    the worker needs only the standard library and math_verify.
    """
    cwd = os.getcwd()
    path = []
    for p in sys.path:
        p = os.path.abspath(p) if p else cwd
        if p != cwd and p not in path and os.path.exists(p):
            path.append(p)
    return path


class _Worker:
    """One worker process and the parent's view of it (its chunk in flight, its deadline)."""

    def __init__(self, memory_limit_mb: int, start_timeout_s: float):
        env = dict(os.environ, R1_VERIFIER_MEMORY_MB=str(memory_limit_mb))
        # -I: isolated from the current directory and PYTHON* variables; -u: unbuffered pipes.
        self.proc = subprocess.Popen([sys.executable, "-I", "-u", "-c", _BOOT, _WORKER_FILE,
                                      json.dumps(_worker_path())],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                                     close_fds=True, start_new_session=True)
        self.fd = self.proc.stdout.fileno()
        self.buffer = bytearray()
        self.ready = False
        self.inflight: deque[int] = deque()
        self.deadline = time.monotonic() + start_timeout_s

    def send(self, jobs: list) -> None:
        data = json.dumps(jobs).encode("utf-8")
        # Only sent to an idle worker, which is blocked reading stdin: this write cannot stall.
        self.proc.stdin.write(len(data).to_bytes(4, "big") + data)
        self.proc.stdin.flush()

    def receive(self) -> tuple[list, bool]:
        """Frames now readable (call after poll), and whether the worker closed its end."""
        chunk = os.read(self.fd, 1 << 16)
        self.buffer += chunk
        return split_frames(self.buffer), not chunk

    def close_stdin(self) -> None:
        try:
            self.proc.stdin.close()  # EOF: an idle worker exits by itself
        except OSError:
            pass

    def close(self, grace_s: float = 0.0) -> None:
        self.close_stdin()
        try:
            self.proc.wait(timeout=grace_s) if grace_s > 0 else None
        except subprocess.TimeoutExpired:
            pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class VerifierPool:
    """A set of verifier workers; `run(jobs, timeout_s, n_workers)` scores jobs with a bound.

    Thread-safe: concurrent `run` calls are served one after the other. A job is a tuple
    `(gold, span, tagged)` for `math_answer.check_answer`; the result is its outcome code, or
    TIMEOUT / CRASHED / ABANDONED. Counters of each, and of restarts: `pop_events()`.
    """

    def __init__(self, memory_limit_mb: int = 4096, start_timeout_s: float = 120.0):
        self.memory_limit_mb = memory_limit_mb
        self.start_timeout_s = start_timeout_s
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._pid = os.getpid()
        # Separate lock: reading the counters must not wait for a batch in progress.
        self._events_lock = threading.Lock()
        self._events = {"timeouts": 0, "abandoned": 0, "worker_crashes": 0,
                        "worker_restarts": 0}

    def _count(self, event: str) -> None:
        with self._events_lock:
            self._events[event] += 1

    def _spawn(self) -> _Worker:
        return _Worker(self.memory_limit_mb, self.start_timeout_s)

    def _restart(self, i: int) -> None:
        self._workers[i].close()
        self._workers[i] = self._spawn()
        self._count("worker_restarts")

    def run(self, jobs: list[tuple[str, str | None, bool]], timeout_s: float,
            n_workers: int = 1, budget_s: float | None = None) -> list[int]:
        """Outcome codes of `jobs`, each bounded by `timeout_s`; with `budget_s`, jobs still
        unfinished that long after the call starts score ABANDONED (a batch full of hostile
        answers costs at most `budget_s`, not `len(jobs) * timeout_s / n_workers`). ABANDONED
        is not a verdict: the job may be fine and merely queued behind hostile ones."""
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {n_workers!r}")
        with self._lock:
            if os.getpid() != self._pid:  # forked child: those pipes belong to the parent
                self._workers, self._pid = [], os.getpid()
            while len(self._workers) < n_workers:
                self._workers.append(self._spawn())
            end = time.monotonic() + budget_s if budget_s is not None else float("inf")
            try:
                return self._run_locked(jobs, timeout_s, n_workers, end)
            except BaseException:  # start-up failure, KeyboardInterrupt, ...
                # A worker still holding jobs of this batch would answer them into the next
                # one; a worker that never became ready may be broken. Drop both.
                unsettled = [w for w in self._workers if w.inflight or not w.ready]
                self._workers = [w for w in self._workers if w not in unsettled]
                for w in unsettled:
                    w.close()
                raise

    def _run_locked(self, jobs: list, timeout_s: float, n_workers: int,
                    end: float) -> list[int]:
        results: list[int | None] = [None] * len(jobs)
        queue = deque(range(len(jobs)))
        remaining = len(jobs)
        active = range(n_workers)
        while remaining:
            now = time.monotonic()
            if now >= end:
                return self._abandon(active, queue, results)
            idle = [i for i in active if self._workers[i].ready and not self._workers[i].inflight]
            for i in idle:
                if not queue:
                    break
                # Spread what is left over the idle workers, in chunks that keep the pipe short.
                k = min(_MAX_CHUNK, max(1, -(-len(queue) // len(idle))))
                ids = [queue.popleft() for _ in range(min(k, len(queue)))]
                w = self._workers[i]
                try:
                    w.send([[j, *jobs[j]] for j in ids])
                except OSError:  # died while idle: requeue and replace
                    queue.extendleft(reversed(ids))
                    self._count("worker_crashes")
                    self._restart(i)
                    continue
                w.inflight.extend(ids)
                w.deadline = now + timeout_s
            busy = [i for i in active if self._workers[i].inflight or not self._workers[i].ready]
            wait_s = max(0.0, min(min(self._workers[i].deadline for i in busy), end) - now)
            # poll, not select: a trainer with many open files has fds beyond select's 1024.
            poller = select.poll()
            for i in busy:
                poller.register(self._workers[i].fd, select.POLLIN)
            readable = {fd for fd, _ in poller.poll(math.ceil(wait_s * 1000))}
            for i in busy:
                w = self._workers[i]
                if w.fd in readable:
                    frames, eof = w.receive()
                    for frame in frames:
                        if frame[0] == "ready":
                            w.ready = True
                            continue
                        job_id, code = frame
                        if w.inflight and w.inflight[0] == job_id:
                            w.inflight.popleft()
                            results[job_id] = code
                            remaining -= 1
                            w.deadline = time.monotonic() + timeout_s
                    if eof:
                        if not w.ready:
                            raise VerifierStartupError(
                                f"verifier worker exited during start-up (exit code "
                                f"{w.proc.wait()}); its stderr is above. Is math_verify "
                                f"importable by {sys.executable}?")
                        remaining -= self._fail_head(i, queue, results, CRASHED, "worker_crashes")
                        continue
                if time.monotonic() >= w.deadline and (w.inflight or not w.ready):
                    if not w.ready:
                        raise VerifierStartupError(
                            f"verifier worker not ready after {self.start_timeout_s:.0f} s")
                    remaining -= self._fail_head(i, queue, results, TIMEOUT, "timeouts")
        return results  # type: ignore[return-value]

    def _abandon(self, active: range, queue: deque, results: list) -> list[int]:
        """Batch budget spent: every unfinished job scores ABANDONED; busy workers restart."""
        for i in active:
            w = self._workers[i]
            if w.inflight:
                queue.extend(w.inflight)
                w.inflight.clear()
                self._restart(i)
        for j in queue:
            results[j] = ABANDONED
            self._count("abandoned")
        return results

    def _fail_head(self, i: int, queue: deque, results: list, code: int, event: str) -> int:
        """Score the job a worker was on as `code`, requeue the rest of its chunk, restart it."""
        w = self._workers[i]
        n_failed = 0
        if w.inflight:
            results[w.inflight.popleft()] = code
            n_failed = 1
            queue.extendleft(reversed(w.inflight))
            w.inflight.clear()
        self._count(event)
        self._restart(i)
        return n_failed

    def pop_events(self) -> dict[str, int]:
        """Counters of timeouts, abandoned jobs, crashes and restarts since the last call."""
        with self._events_lock:
            events = self._events
            self._events = dict.fromkeys(events, 0)
        return events

    def close(self) -> None:
        """Stop all workers (EOF, then kill after a short grace). Never blocks for long: at exit
        a daemon thread may still be inside `run`, so the lock is only waited for a few seconds."""
        locked = self._lock.acquire(timeout=5.0)
        try:
            if os.getpid() == self._pid:
                for w in self._workers:  # EOF to all first, so they exit in parallel
                    w.close_stdin()
                for w in self._workers:
                    w.close(grace_s=1.0)
            self._workers = []
        finally:
            if locked:
                self._lock.release()

    def __enter__(self) -> VerifierPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_SHARED: VerifierPool | None = None
_SHARED_LOCK = threading.Lock()


def shared_pool() -> VerifierPool:
    """The process-wide pool used by the reward functions (closed at interpreter exit)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = VerifierPool()
            atexit.register(_SHARED.close)
        return _SHARED


def _after_fork_in_child() -> None:
    # A lock held by another thread at fork time would stay held forever in the child.
    global _SHARED, _SHARED_LOCK
    _SHARED_LOCK = threading.Lock()
    if _SHARED is not None:
        _SHARED._lock = threading.Lock()
        _SHARED._events_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
