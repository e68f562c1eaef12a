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

Where the kernel has Landlock (Linux >= 5.13, an unprivileged LSM; `landlock_abi`), the code also
runs behind a filesystem fence applied just before it starts (`_fence`): it may read and
execute under the Python installation and the system's library folders (/usr, /lib, /lib64,
/bin, /etc/ld.so.cache), read and write in its own folder <tmp>/work and /dev/null, and nothing
else: a write outside its folder or a read of the run folder fails with PermissionError, root
or not. With Landlock ABI >= 4 it may not connect or bind TCP sockets either. Without Landlock
the code runs unfenced (the report says `fenced: false`).
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
PR_SET_PDEATHSIG, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 1, 36, 38
# Landlock (include/uapi/linux/landlock.h): syscalls 444-446 on every architecture
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION, RULE_PATH_BENEATH = 1, 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_TRUNCATE, FS_IOCTL_DEV = 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
READ_ONLY = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR


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


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, 0 without Landlock (older kernel, not Linux, disabled)."""
    try:
        abi = ctypes.CDLL(None, use_errno=True).syscall(SYS_CREATE_RULESET, None, 0, CREATE_RULESET_VERSION)
    except (OSError, AttributeError):
        return 0
    return max(abi, 0)


class _PathBeneath(ctypes.Structure):
    _pack_ = 1  # struct landlock_path_beneath_attr is packed: u64 allowed_access, s32 parent_fd
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _fence(abi: int, read_only: list[str], read_write: list[str], devices: list[str]) -> None:
    """Restrict this process and its future children with Landlock: read and execute beneath
    `read_only`, everything beneath `read_write`, read and write the files `devices`; with ABI
    >= 4 no TCP bind or connect. Raises OSError if the kernel refuses (the run must not go on
    unfenced when the fence was expected)."""
    libc = ctypes.CDLL(None, use_errno=True)
    handled = (1 << 13) - 1  # ABI 1: execute ... make_sym
    handled |= (1 << 13) if abi >= 2 else 0  # refer
    handled |= FS_TRUNCATE if abi >= 3 else 0
    handled |= FS_IOCTL_DEV if abi >= 5 else 0
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    attr = (ctypes.c_uint64 * 2)(handled, net)
    ruleset = libc.syscall(SYS_CREATE_RULESET, ctypes.byref(attr), ctypes.sizeof(attr) if net else 8, 0)
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    file_rights = FS_READ_FILE | FS_WRITE_FILE | (handled & (FS_TRUNCATE | FS_IOCTL_DEV))
    try:
        for paths, rights in ((read_only, READ_ONLY), (read_write, handled), (devices, file_rights)):
            for path in paths:
                try:
                    fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
                except OSError:  # a library folder this system does not have
                    continue
                try:
                    file_only = FS_EXECUTE | FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE | FS_IOCTL_DEV
                    rule = _PathBeneath(rights if os.path.isdir(path) else rights & file_only, fd)  # files: file rights
                    if libc.syscall(SYS_ADD_RULE, ruleset, RULE_PATH_BENEATH, ctypes.byref(rule), 0) < 0:
                        raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
                finally:
                    os.close(fd)
        if not _prctl(PR_SET_NO_NEW_PRIVS, 1):
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")
        if libc.syscall(SYS_RESTRICT_SELF, ruleset, 0) < 0:
            raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    finally:
        os.close(ruleset)


def fence_paths(cfg: dict, root: str, work: str) -> tuple[list[str], list[str], list[str]]:
    """(read-only, read-write, device files) of the fence: the interpreter's installation (the
    folder above its bin/ as named, which for a virtual environment is the environment with its
    pyvenv.cfg and site-packages, and the same for the real executable the name points to), the
    system's library folders, <tmp> (main.py) read-only, <tmp>/work writable. (This process runs
    with -S, so its own sys.prefix is the base installation, never the environment.)"""
    named = os.path.abspath(cfg["python"])
    real = os.path.realpath(cfg["python"])
    read_only = sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                        os.path.dirname(os.path.dirname(named)), os.path.dirname(os.path.dirname(real)),
                        "/usr", "/lib", "/lib64", "/bin", "/etc/ld.so.cache", root})
    return read_only, [work], ["/dev/null"]


def _limits(cfg: dict, nproc: int | None, fence=None):
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
        if fence is not None:  # last: after it the rlimits could not be read from /proc anyway
            _fence(*fence)
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
    abi = landlock_abi()
    fence = (abi, *fence_paths(cfg, root, work)) if abi else None
    result = {"timed_out": False, "processes_exceeded": False, "processes_peak": 0, "fenced": bool(abi)}
    try:
        proc = subprocess.Popen([cfg["python"], "-I", main_py], cwd=work, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                                close_fds=True, preexec_fn=_limits(cfg, nproc, fence))
    except subprocess.SubprocessError as e:  # the fence (or a limit) could not be applied: run nothing
        shutil.rmtree(root, onerror=_force)
        result.update(output=f"the sandbox could not start the code: {e}", cut=0, exit_code=None, signal=None)
        sys.stdout.write(json.dumps(result))
        return
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
