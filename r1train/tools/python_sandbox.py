"""The built-in `python` tool: run the model's code in a separate, limited process.

Each call runs `python -I main.py` in a fresh, empty temporary folder that is removed afterwards,
under a supervisor process (sandbox_supervisor.py) with these limits:

    wall time        timeout_s; then every process of the run is killed
    CPU time         RLIMIT_CPU cpu_s per process (SIGXCPU, then SIGKILL one second later)
    memory           RLIMIT_AS memory_mb of address space per process (allocation -> MemoryError)
    file size        RLIMIT_FSIZE max_file_mb per file written (a larger write fails with EFBIG)
    open files       RLIMIT_NOFILE 64; no core files
    processes        at most max_processes in all: for a non-root user RLIMIT_NPROC (the user's
                     running tasks + max_processes, a hard bound); for root, whom the kernel
                     exempts from RLIMIT_NPROC, a count of the run's processes every 20 ms that
                     stops the run when exceeded (a fork loop may briefly exceed it in between)
    output           stdout and stderr together, the first 3/4 and last 1/4 of max_output_chars
    leftovers        the supervisor is a child subreaper: every process the code started, even
                     one that left its session or was orphaned, is killed when the run ends

    files            with Landlock (Linux >= 5.13): a filesystem fence (sandbox_supervisor.py
                     `_fence`): read and execute only under the Python installation and the
                     system's library folders, read and write only in its own folder and
                     /dev/null; a read of the run folder or a write anywhere else is
                     PermissionError, for root too. Landlock ABI >= 4 also refuses TCP
                     connect and bind. Without Landlock the code runs unfenced (the
                     supervisor's report says `fenced: false`).

What it does NOT isolate (it is a resource fence, not a security boundary; for untrusted models
at scale run the trainer in a container or VM without credentials):
- the network beyond TCP (UDP, raw and Unix sockets), and TCP too without Landlock ABI >= 4;
- without Landlock: reads of every file the trainer's user can read (the run folder,
  checkpoints and training data included) and writes wherever that user may (root: anywhere),
  each file bounded by max_file_mb only; with it: reads under the Python installation and
  /usr, /lib, /lib64, /bin (world-readable system files);
- other processes of the same user can be signalled, /proc can be read; system calls are not
  filtered (no seccomp), and time is real (no fake clock).
On a system other than Linux the subreaper and the process count are not available (the limits
and the wall timeout still are).
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

_SUPERVISOR = str(Path(__file__).with_name("sandbox_supervisor.py"))


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 10.0       # wall time of one run
    cpu_s: int = 10               # RLIMIT_CPU per process
    memory_mb: int = 1024         # RLIMIT_AS per process
    max_file_mb: int = 16         # RLIMIT_FSIZE
    max_processes: int = 16       # processes in all, the code's own included
    max_output_chars: int = 4000  # stdout + stderr kept
    python: str = sys.executable  # the interpreter the code runs in


def run_code(code: str, limits: Limits = Limits()) -> dict:
    """One supervised run (module docstring): the supervisor's JSON report."""
    # -I -S: the supervisor needs only the standard library, and nothing of the current folder.
    proc = subprocess.run([sys.executable, "-I", "-S", _SUPERVISOR, json.dumps(asdict(limits))],
                          input=code.encode("utf-8", "replace"), capture_output=True,
                          timeout=limits.timeout_s + 10.0)
    if proc.returncode != 0:
        raise RuntimeError(f"the python tool's supervisor failed (exit code {proc.returncode}): "
                           f"{proc.stderr.decode('utf-8', 'replace')[-500:]}")
    return json.loads(proc.stdout)


def report_text(report: dict, limits: Limits) -> str:
    """What the model reads of a run: its output, then why it ended when that was not normal."""
    notes = []
    if report["timed_out"]:
        notes.append(f"Error: the code ran longer than {limits.timeout_s:g} s and was stopped")
    elif report["processes_exceeded"]:
        notes.append(f"Error: the code started more than {limits.max_processes} processes and was stopped")
    elif report["signal"] == "SIGXCPU":
        notes.append(f"Error: the code used more than {limits.cpu_s} s of CPU time and was stopped")
    elif report["signal"] == "SIGKILL":  # RLIMIT_CPU's hard limit, or the kernel's out-of-memory killer
        notes.append(f"Error: the code was killed (SIGKILL: past {limits.cpu_s} s of CPU time, or out of memory)")
    elif report["signal"]:
        notes.append(f"Error: the code was stopped by {report['signal']}")
    elif report["exit_code"]:
        notes.append(f"[exit code {report['exit_code']}]")
    output = report["output"]
    if not output and not notes:
        return "(no output: print what you want to see)"
    return "\n".join([output.rstrip("\n")] * bool(output) + notes)


class PythonSandbox:
    """Run Python code in a fresh process and return what it prints (stdout and stderr).

    Args:
        code: A complete Python program; use print() to show results.
    """

    def __init__(self, limits: Limits = Limits()):
        self.limits = limits

    def __call__(self, code: str) -> str:
        return report_text(run_code(code, self.limits), self.limits)


python = PythonSandbox()
