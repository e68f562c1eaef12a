"""The supervisor of one `python` tool run (python_sandbox.py): standard library only, run by path.

argv[1] is a JSON object of limits; the code arrives on stdin; one JSON object goes to stdout:
{"output", "exit_code", "signal", "timed_out", "processes_exceeded", "processes_peak", "cut"}. The supervisor

1. marks itself a child subreaper (Linux prctl), so every process the code starts, even one
   that leaves its session or whose parent died, stays its descendant and can be found;
2. writes the code to <tmp>/main.py and runs `python -I <tmp>/main.py` in the empty folder
   <tmp>/work, in a new session, stdin closed, with setrlimit limits (CPU seconds, address
   space, file size, open files, no core files; RLIMIT_NPROC for a non-root user);
3. reads stdout and stderr (one pipe) and keeps the first and last part of at most
   `max_output_chars`, until the process exits or the wall timeout; meanwhile counts the
   processes under it and stops everything when there are more than `max_processes` (for root,
   RLIMIT_NPROC does not bind: the kernel exempts uid 0, so this count is root's bound, checked
   every POLL_S, so a fast fork loop may briefly exceed it);
4. kills every descendant (SIGKILL, repeated until none is left) and removes <tmp>.
"""
import ctypes
import json
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

POLL_S = 0.02
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER = 1, 36


def _prctl(option: int, value: int) -> bool:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux
        return False


def descendants(root: int) -> list[int]:
    """Pids of every live process under `root`, from /proc (zombies included)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # exited meanwhile
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])  # fields after "(comm)": state ppid ...
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            out.append(pid)
            todo.append(pid)
    return out


def own_child_dead(pid: int) -> bool:
    """Whether a process is a zombie (exited, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rindex(b")") + 2:].split()[0] == b"Z"


def _user_tasks() -> int:
    """Threads (tasks) of this real uid: what RLIMIT_NPROC counts against."""
    uid, n = os.getuid(), 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    n += len(os.listdir(f"/proc/{entry}/task"))
            except OSError:
                continue
    return n


def kill_all(root: int, own_child: int) -> None:
    """SIGKILL every descendant of `root` until none is left; reap the orphans it inherited
    (`own_child`, the Popen's process, is left for Popen to reap: it needs its exit status)."""
    for _ in range(1000):
        pids = descendants(root)
        if not pids or pids == [own_child] and own_child_dead(own_child):
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for pid in pids:  # orphans reparented to this subreaper are its children: reap them
            if pid == own_child:
                continue
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
        time.sleep(0.001)


def _limits(cfg: dict, nproc: int | None):
    def apply() -> None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # the supervisor killed: the code dies with it
        cpu = max(1, int(cfg["cpu_s"]))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))  # SIGXCPU, then SIGKILL
        memory = cfg["memory_mb"] << 20
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
        size = cfg["max_file_mb"] << 20
        resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        if nproc is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
    return apply


class _Output:
    """The first 3/4 and the last 1/4 of at most `limit` characters of a stream, and the count cut."""

    def __init__(self, limit: int):
        self.head_limit, self.tail_limit = limit - limit // 4, limit // 4
        self.head, self.tail, self.total = bytearray(), bytearray(), 0

    def add(self, data: bytes) -> None:
        self.total += len(data)
        room = self.head_limit - len(self.head)
        self.head += data[:max(room, 0)]
        data = data[max(room, 0):]
        if data and self.tail_limit:
            self.tail = (self.tail + data)[-self.tail_limit:]

    def text(self) -> tuple[str, int]:
        cut = self.total - len(self.head) - len(self.tail)
        head = self.head.decode("utf-8", "replace")
        tail = self.tail.decode("utf-8", "replace")
        return (head + (f"\n[... {cut} bytes cut ...]\n" if cut else "") + tail), cut


def _force(function, path, _exc) -> None:
    """rmtree's retry for what the code made unremovable (a folder without write permission)."""
    try:
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
        function(path)
    except OSError:
        pass


def main() -> None:
    cfg = json.loads(sys.argv[1])
    code = sys.stdin.buffer.read()
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    root = tempfile.mkdtemp(prefix="r1-python-")
    work = os.path.join(root, "work")
    os.mkdir(work)
    main_py = os.path.join(root, "main.py")
    with open(main_py, "wb") as f:
        f.write(code)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    nproc = None if os.geteuid() == 0 else _user_tasks() + cfg["max_processes"]
    out = _Output(cfg["max_output_chars"])
    result = {"timed_out": False, "processes_exceeded": False, "processes_peak": 0}
    proc = subprocess.Popen([cfg["python"], "-I", main_py], cwd=work, env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            close_fds=True, preexec_fn=_limits(cfg, nproc))
    fd = proc.stdout.fileno()
    try:
        deadline = time.monotonic() + cfg["timeout_s"]
        next_count, open_pipe = 0.0, True
        while proc.poll() is None:
            now = time.monotonic()
            if now >= deadline:
                result["timed_out"] = True
                break
            if now >= next_count:  # the count of processes (module docstring, 3.)
                next_count = now + POLL_S
                count = len(descendants(os.getpid()))
                result["processes_peak"] = max(result["processes_peak"], count)
                if count > cfg["max_processes"]:
                    result["processes_exceeded"] = True
                    break
            if not open_pipe:
                time.sleep(POLL_S / 4)
            elif select.select([fd], [], [], min(POLL_S, max(deadline - now, 0)))[0]:
                data = os.read(fd, 1 << 16)
                out.add(data)
                open_pipe = bool(data)  # EOF: the code closed its output (it may still run)
    finally:
        kill_all(os.getpid(), proc.pid)
        proc.wait()
        # every writer is dead now: what is left in the pipe ends in EOF
        while open_pipe and (data := os.read(fd, 1 << 16)):
            out.add(data)
        proc.stdout.close()
        shutil.rmtree(root, onerror=_force)
    text, cut = out.text()
    text = text.replace(root + os.sep, "")  # tracebacks name main.py, not the temporary folder
    code = proc.returncode
    result.update(output=text, cut=cut, exit_code=code if code >= 0 else None,
                  signal=signal.Signals(-code).name if code < 0 else None)
    sys.stdout.write(json.dumps(result))


if __name__ == "__main__":
    main()
