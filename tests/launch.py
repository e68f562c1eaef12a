"""`python train.py ARGS` for the tests, without paying the imports on every launch.

A launch of train.py spends ~9 s on this kind of machine importing torch and transformers
(transformers' model modules alone pull in ~3,000 modules: torch._dynamo, torch.distributed.tensor,
scipy, sympy), while a tiny-model run trains for a second or two, and the suite launches train.py
dozens of times. `train_py` runs each launch in a new process forked from a server process that
imported those modules once (multiprocessing's forkserver: the server is a fresh interpreter that
only imports, so no torch thread pool or lock is ever forked). The child then does what
`python train.py ARGS` does: its own environment, working directory, `sys.argv`, stdout and
stderr (file descriptors 1 and 2, so child processes and C code write there too), `train.main`,
the exit status `python` would give (SystemExit's code; 1 and a traceback for an uncaught
exception), atexit handlers, and a timeout that kills it.

What differs from a fresh interpreter: the modules in PRELOAD were imported before the child's
environment was set. None of the project's modules reads the environment at import time;
OpenMP read the thread count when torch loaded, so the child applies OMP_NUM_THREADS itself.
Tests whose subject is the interpreter itself (the command line and `--help`, the main job as a
user types it, a fresh process loading an export) and every torchrun launch still start a real
`python`.
"""
from __future__ import annotations

import atexit
import multiprocessing
import os
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What a run imports, beyond the standard library: the trainers, transformers' model and
# tokenizer modules the tests load (Llama: the tiny model and SmolLM2; Qwen2: the hub format).
PRELOAD = ["r1train.cli", "r1train.pipeline", "r1train.grpo.trainer", "r1train.sft.trainer", "r1train.sft.rejection",
           "r1train.sft.distill", "r1train.sft.cold_start", "r1train.run.checkpoint", "r1train.model.gguf",
           "r1train.data.tiny", "r1train.rewards.accuracy",
           "transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2",
           "transformers.tokenization_utils_fast", "safetensors.torch"]

_context = None


def _server():
    global _context
    if _context is None:
        if str(ROOT) not in sys.path:  # the server imports r1train from the repository root
            sys.path.insert(0, str(ROOT))
        _context = multiprocessing.get_context("forkserver")
        _context.set_forkserver_preload(PRELOAD)
    return _context


def _exit_status(e: SystemExit) -> int:
    """The status `python` gives a SystemExit (None: 0; an int: itself; anything else is printed)."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def _child(args: list[str], env: dict, cwd: str | None, out: str, err: str) -> None:
    """In the forked process: become `python train.py *args`, then exit with its status."""
    sys.stdout.flush(), sys.stderr.flush()
    for fd, path in ((1, out), (2, err)):
        f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.environ.clear()
    os.environ.update(env)
    if cwd is not None:
        os.chdir(cwd)
    sys.argv = [str(ROOT / "train.py"), *args]
    sys.path.insert(0, str(ROOT))  # a script's own folder comes first on its path
    status = 0
    try:
        import torch
        if env.get("OMP_NUM_THREADS"):  # OpenMP read it when torch loaded in the server
            torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
        from r1train.cli import main
        main(args)
    except SystemExit as e:
        status = _exit_status(e)
    except BaseException:
        traceback.print_exc()
        status = 1
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(status)


def train_py(*args, env: dict | None = None, cwd=None, timeout: float = 600) -> subprocess.CompletedProcess:
    """What `subprocess.run([python, train.py, *args], capture_output=True, text=True, env=env,
    cwd=cwd, timeout=timeout)` returns, from a process forked from the preloaded server. Raises
    subprocess.TimeoutExpired past `timeout` seconds, after killing the process."""
    args = [str(a) for a in args]
    env = dict(os.environ if env is None else env)
    cwd = None if cwd is None else str(cwd)
    with tempfile.TemporaryDirectory() as tmp:
        out, err = os.path.join(tmp, "stdout"), os.path.join(tmp, "stderr")
        proc = _server().Process(target=_child, args=(args, env, cwd, out, err), daemon=False)
        proc.start()
        proc.join(timeout)
        if proc.exitcode is None:
            proc.kill()
            proc.join()
            raise subprocess.TimeoutExpired([sys.executable, "train.py", *args], timeout,
                                            output=Path(out).read_text(errors="replace"),
                                            stderr=Path(err).read_text(errors="replace"))
        stdout, stderr = (Path(p).read_text(errors="replace") for p in (out, err))
    # A child killed by a signal reports -N, as subprocess does.
    return subprocess.CompletedProcess([sys.executable, "train.py", *args], proc.exitcode, stdout, stderr)


def torchrun_py(*args, nproc: int = 2, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=nproc train.py *args` in a real interpreter (each
    rank a fresh process), captured as `train_py` captures its run."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(ROOT / "train.py"), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
