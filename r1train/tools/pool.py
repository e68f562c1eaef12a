"""Tool calls run in worker processes, each with a wall timeout; a worker that overruns is killed.

A thread cannot be stopped, so a tool that hangs would hold a thread forever; a process can be
killed. As in the verifier pool (rewards/verifier_pool.py), workers are fresh interpreters
(`python -I -c`, fork+exec: no copy of the trainer's torch threads or locks), each in its own
session, that read length-prefixed JSON frames on stdin and answer on stdout, and exit on EOF.
A worker loads the tools itself from their entries (registry.load_tools), so tools given from
Python must be importable by name.

`ToolPool.run(calls)` runs a batch of parsed calls (calls.py) on up to `n_workers` workers, one
call per worker at a time, and returns one `ToolResult` per call, in order. Every outcome is a
text the model reads; none raises:

    a call that failed to parse or check   its error text, not sent to a worker
    the tool returns a str                 the text, cut at max_result_chars (the cut is said)
    the tool returns something else        "Error: ... returned a list, not a str"
    the tool raises                        "Error: <tool>: <ExceptionType>: <message>"
    the tool runs past timeout_s           "Error: ... timed out"; the worker's process group is
                                           killed and a fresh worker starts
    the worker dies (os._exit, a crash)    "Error: ... crashed"; a fresh worker starts

What a tool prints goes nowhere: it is not its result (Python-level prints are dropped, C-level
writes to fd 1 and 2 go to /dev/null). A worker's address
space is bounded by `memory_limit_mb` (RLIMIT_AS; 0 = unbounded), so a tool that allocates too
much fails with MemoryError instead of swapping the machine.
"""
from __future__ import annotations

import atexit
import io
import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass

from r1train.rewards import verifier_pool
from r1train.rewards.verifier_pool import split_frames
from r1train.tools.calls import ToolCall, tool_error

_BOOT = ("import json, sys; sys.path[:] = json.loads(sys.argv[1]); "
         "from r1train.tools.pool import serve; serve(json.loads(sys.argv[2]), json.loads(sys.argv[3]))")


@dataclass
class ToolResult:
    text: str        # what the tool turn holds
    error: bool      # the call failed (parse, check, exception, timeout, crash, non-str result)
    seconds: float = 0.0


def cut_text(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, ending with how many were cut."""
    if len(text) <= limit:
        return text
    kept = max(limit - len(f"\n[... {len(text)} characters cut]"), 0)
    return text[:kept] + f"\n[... {len(text) - kept} characters cut]"


# ---------------------------------------------------------------------------------- the worker

def _write_frame(out, obj) -> None:
    data = json.dumps(obj).encode("utf-8")
    out.write(len(data).to_bytes(4, "big") + data)
    out.flush()


def _read_exact(stream, n: int) -> bytes | None:
    data = b""
    while len(data) < n:
        chunk = stream.read(n - len(data))
        if not chunk:
            return None
        data += chunk
    return data


class _Sink(io.TextIOBase):
    """A text stream that keeps nothing: what a tool prints is not its result."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return len(text)


def _call(tools: dict, name: str, arguments: dict, max_chars: int) -> tuple[bool, str]:
    """(ok, text) of one call, inside the worker."""
    try:
        result = tools[name].fn(**arguments)
    except BaseException as e:  # SystemExit and KeyboardInterrupt from a tool are its failures too
        return False, tool_error(cut_text(f"{name}: {type(e).__name__}: {e}", max_chars))
    if not isinstance(result, str):
        return False, tool_error(f"{name} returned a {type(result).__name__}, not a str")
    return True, cut_text(result, max_chars)


def serve(sources: list[str], config: dict) -> None:
    """Worker main loop: load the tools, then answer [job_id, name, arguments] frames."""
    out = os.fdopen(os.dup(1), "wb")
    limit_mb = int(config.get("memory_limit_mb", 0))
    if limit_mb > 0:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (limit_mb << 20, limit_mb << 20))
    from r1train.tools.registry import load_tools
    tools = load_tools(sources)  # an error here goes to stderr, and the parent sees EOF before "ready"
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    sys.stdout = sys.stderr = _Sink()
    _write_frame(out, ["ready", os.getpid()])
    stdin = sys.stdin.buffer
    while (header := _read_exact(stdin, 4)) is not None:
        body = _read_exact(stdin, int.from_bytes(header, "big"))
        if body is None:
            return
        job_id, name, arguments = json.loads(body)
        ok, text = _call(tools, name, arguments, int(config["max_result_chars"]))
        _write_frame(out, [job_id, ok, text])


# ---------------------------------------------------------------------------------- the parent

def _worker_path() -> list[str]:
    """The parent's import path, absolute, current folder left out (verifier_pool._worker_path),
    with the project's own folder."""
    path = verifier_pool._worker_path()
    # the project's own folder, wherever the parent imported it from
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return path if root in path else [root, *path]


class _Worker:
    def __init__(self, sources: list[str], config: dict, start_timeout_s: float):
        self.proc = subprocess.Popen([sys.executable, "-I", "-u", "-c", _BOOT, json.dumps(_worker_path()),
                                      json.dumps(sources), json.dumps(config)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
                                     start_new_session=True)
        self.fd = self.proc.stdout.fileno()
        self.buffer = bytearray()
        self.ready = False
        self.job: int | None = None   # the call in flight
        self.started = 0.0
        self.deadline = time.monotonic() + start_timeout_s

    def send(self, frame: list) -> None:
        data = json.dumps(frame).encode("utf-8")
        self.proc.stdin.write(len(data).to_bytes(4, "big") + data)  # an idle worker reads: no stall
        self.proc.stdin.flush()

    def receive(self) -> tuple[list, bool]:
        chunk = os.read(self.fd, 1 << 16)
        self.buffer += chunk
        return split_frames(self.buffer), not chunk

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the worker and whatever it started in its group
        except (ProcessLookupError, PermissionError):
            pass
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                f.close()
            except OSError:
                pass


class ToolPoolError(RuntimeError):
    """A tool worker that could not start (a tool that fails to load in a fresh interpreter)."""


class ToolPool:
    """Workers that run tool calls with a timeout each (module docstring). Not thread-safe:
    one `run` at a time."""

    def __init__(self, tools: dict, n_workers: int = 2, timeout_s: float = 30.0, max_result_chars: int = 4000,
                 memory_limit_mb: int = 4096, start_timeout_s: float = 60.0):
        if n_workers < 1 or not timeout_s > 0 or max_result_chars < 1:
            raise ValueError(f"ToolPool: n_workers >= 1, timeout_s > 0 and max_result_chars >= 1, got "
                             f"{n_workers}, {timeout_s}, {max_result_chars}")
        self.tools, self.n_workers, self.timeout_s = tools, n_workers, timeout_s
        self.max_result_chars, self.start_timeout_s = max_result_chars, start_timeout_s
        self.sources = [t.source for t in tools.values()]
        self.config = {"max_result_chars": max_result_chars, "memory_limit_mb": memory_limit_mb}
        self.workers: list[_Worker] = []
        self.events = {"timeouts": 0, "crashes": 0, "restarts": 0}
        self._pid = os.getpid()
        atexit.register(self.close)

    def _spawn(self) -> _Worker:
        return _Worker(self.sources, self.config, self.start_timeout_s)

    def _restart(self, i: int) -> None:
        self.workers[i].kill()
        self.workers[i] = self._spawn()
        self.events["restarts"] += 1

    def run(self, calls: list[ToolCall]) -> list[ToolResult]:
        """One result per call, in order (module docstring)."""
        results: list[ToolResult | None] = [None] * len(calls)
        queue = deque()
        for j, call in enumerate(calls):
            if call.error is not None:
                results[j] = ToolResult(call.error, True)
            else:
                queue.append(j)
        if not queue:
            return results  # type: ignore[return-value]
        if os.getpid() != self._pid:  # a forked child: those pipes are the parent's
            self.workers, self._pid = [], os.getpid()
        while len(self.workers) < self.n_workers:
            self.workers.append(self._spawn())
        try:
            return self._run(calls, results, queue)
        except BaseException:  # a worker that failed to start, KeyboardInterrupt, ...
            # a worker still holding a call of this batch would answer it into the next one
            self.close()
            raise

    def _run(self, calls: list[ToolCall], results: list, queue: deque) -> list[ToolResult]:
        remaining = len(queue)
        while remaining:
            now = time.monotonic()
            for i, w in enumerate(self.workers):
                if queue and w.ready and w.job is None:
                    j = queue.popleft()
                    try:
                        w.send([j, calls[j].name, calls[j].arguments])
                    except OSError:  # died while idle
                        queue.appendleft(j)
                        self.events["crashes"] += 1
                        self._restart(i)
                        continue
                    w.job, w.started, w.deadline = j, now, now + self.timeout_s
            waiting = [w for w in self.workers if w.job is not None or not w.ready]
            wait_s = max(0.0, min(w.deadline for w in waiting) - now)
            poller = select.poll()
            for w in waiting:
                poller.register(w.fd, select.POLLIN)
            readable = {fd for fd, _ in poller.poll(math.ceil(wait_s * 1000))}
            for i, w in enumerate(self.workers):
                if w not in waiting:
                    continue
                if w.fd in readable:
                    frames, eof = w.receive()
                    for frame in frames:
                        if frame[0] == "ready":
                            w.ready = True
                        elif frame[0] == w.job:
                            results[w.job] = ToolResult(frame[2], not frame[1], time.monotonic() - w.started)
                            w.job = None
                            remaining -= 1
                    if eof:
                        if not w.ready:
                            raise ToolPoolError(f"a tool worker exited while loading the tools {self.sources} "
                                                f"(exit code {w.proc.wait()}); its error is above")
                        if w.job is not None:
                            name = calls[w.job].name
                            results[w.job] = ToolResult(tool_error(f"{name} crashed (its process exited with "
                                                                   f"code {w.proc.wait()})"), True,
                                                        time.monotonic() - w.started)
                            remaining -= 1
                            w.job = None
                        self.events["crashes"] += 1
                        self._restart(i)
                        continue
                if time.monotonic() >= w.deadline and (w.job is not None or not w.ready):
                    if not w.ready:
                        raise ToolPoolError(f"a tool worker was not ready after {self.start_timeout_s:g} s")
                    name = calls[w.job].name
                    results[w.job] = ToolResult(tool_error(f"{name} timed out after {self.timeout_s:g} s"), True,
                                                time.monotonic() - w.started)
                    remaining -= 1
                    w.job = None
                    self.events["timeouts"] += 1
                    self._restart(i)
        return results  # type: ignore[return-value]

    def close(self) -> None:
        if os.getpid() == self._pid:
            for w in self.workers:
                w.kill()
        self.workers = []

    def __enter__(self) -> ToolPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
