"""What the project owns in an output folder, and the rules for touching it.

A run writes into `--train.output_dir`: `checkpoints/step-N/`, `metrics.jsonl`, `samples.jsonl`,
`eval_samples.jsonl`, `tokens.jsonl` (per-token records, inspector/records.py), `config.yaml`,
`final/` (the export), `final-adapter/` (the LoRA adapters in PEFT's format, with
`--train.export_adapter`) and, for the embedded model, `tiny-model/`. Some of these are replaced or
deleted later (a checkpoint pruned, an export redone), so the project must know that what it is
about to delete is its own. The rules:

- A folder the project replaces as a whole (`final/`, `final-adapter/`) carries a `manifest.json`, written last,
  listing every file with its size and SHA-256. A file the manifest does not list was put there by
  someone else: the run refuses to start, naming the folder and the file.
- A checkpoint folder (`step-N/`, and its `.tmp`, `.deleting`, `.damaged` forms) holds only names
  the checkpointer writes (`CHECKPOINT_FILE`); any other file in it is refused the same way. Its
  manifest is the integrity check of `run/checkpoint.py`.
- A new run never appends to or prunes an earlier run: starting over (`--train.resume false`, or
  no checkpoint to resume) moves the earlier run's files (`RUN_FILES`) into
  `<output_dir>/old-<date>-<time>/`, and says so. Nothing is deleted.
- Names ending in `.tmp` / `.deleting` next to the project's folders are the project's scratch
  (an interrupted save, export or prune) and are removed at the next start.
- One run at a time: a run (and a pipeline, on its own folder) holds `run.lock` for its whole
  life (`FolderLock`), and a second run into the same folder is refused, naming the holder.
- The project never follows a symbolic link out of the output folder: a link where it keeps a
  folder it replaces or deletes (`checkpoints/step-N/` and its `.damaged` form, the exports) is
  refused at start like a foreign file, and a link left where its scratch goes (`.tmp`,
  `.deleting`) is unlinked, its target untouched (`remove_scratch`). Deleting through the link
  would reach files elsewhere, and `shutil.rmtree` refuses a link anyway: a pruned link used to
  fail every later start. (`checkpoints/` itself may be a link: the checkpoints live there.)

The manifest uses SHA-256 so that a user can check a file by hand (`sha256sum`). Hashing reads
every byte once: about 0.6 GB/s per process on a busy 2-core CPU box, done by every rank on its
own share of the files.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from r1train.run.config import NAME_TOO_LONG, ConfigError
from r1train.run.dist import DistInfo, broadcast_object

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "r1-from-scratch manifest 1"

# Files the checkpointer writes into step-N/: DCP's shards and metadata (and the metadata's
# temporary name while DCP writes it), then ours.
CHECKPOINT_FILE = re.compile(
    r"^(\.metadata|__\d+\.metadata|(__\d+)?\.metadata\.tmp|__\d+_\d+\.distcp"
    r"|trainer_state\.pt|rng-rank\d+\.pt|config\.yaml|manifest\.json)$")
CHECKPOINT_DIR = re.compile(r"^step-(\d+)(\.tmp|\.deleting|\.damaged)?$")

EXPORTS = ("final", "final-adapter")
"""The exported folders, each replaced as a whole by the next export (`check_export_folder`)."""

# An earlier run, as a new run in the same folder would otherwise mix with it.
RUN_FILES = ("checkpoints", "metrics.jsonl", "samples.jsonl", "eval_samples.jsonl", "tokens.jsonl", "config.yaml",
             *EXPORTS)


def files_under(folder: Path) -> list[str]:
    """Every file below `folder`, as sorted POSIX paths relative to it."""
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())


def file_digest(path: Path, chunk: int = 1 << 22) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex) of one file, read once in 4 MiB chunks."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return size, h.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file (or a folder's entries) to disk: a rename is only as durable as what it names."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(folder: Path, entries: dict[str, tuple[int, str]] | None = None) -> Path:
    """Write `folder/manifest.json` listing `entries` (name -> (size, sha256)); every file of the
    folder, digested now, when None. Callers write it last, after every file it lists is complete.

    Also the way to vouch for a checkpoint written before manifests existed:
    `python -c "from run.folder import write_manifest; write_manifest(Path('.../step-N'))"`.
    """
    folder = Path(folder)
    if entries is None:
        entries = {n: file_digest(folder / n) for n in files_under(folder) if n != MANIFEST}
    body = {"format": MANIFEST_FORMAT, "algorithm": "sha256",
            "files": {n: {"size": s, "sha256": d} for n, (s, d) in sorted(entries.items())}}
    path = folder / MANIFEST
    with open(path, "w") as f:
        f.write(json.dumps(body, indent=1))
        f.flush()
        os.fsync(f.fileno())
    return path


def read_manifest(folder: Path) -> dict[str, dict]:
    """name -> {"size", "sha256"} of `folder/manifest.json`; ValueError naming the file when it
    is missing or not a manifest (JSON only: a manifest never unpickles anything)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise ValueError(f"{path} is missing (an interrupted save, or written before manifests)")
    try:
        body = json.loads(path.read_text())
        files = body["files"]
        assert body.get("format") == MANIFEST_FORMAT and isinstance(files, dict)
        assert all(isinstance(v["size"], int) and isinstance(v["sha256"], str) for v in files.values())
    except Exception:
        raise ValueError(f"{path} is not a readable manifest (damaged)") from None
    return files


def manifest_problems(folder: Path, manifest: dict[str, dict], names: list[str]) -> list[str]:
    """What is wrong with files `names` of `folder` against `manifest`, one line each, naming the
    file; [] when they are intact. The size is checked first: a truncated file costs no hashing."""
    problems = []
    for name in names:
        path, want = Path(folder) / name, manifest[name]
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        size = path.stat().st_size
        if size != want["size"]:
            problems.append(f"{path} has {size} bytes, the manifest says {want['size']} (truncated or damaged)")
        elif file_digest(path)[1] != want["sha256"]:
            problems.append(f"{path} does not match its SHA-256 in the manifest (damaged)")
    return problems


def foreign_file(folder: Path, owned: Callable[[str], bool]) -> str | None:
    """The first file below `folder` that `owned(relative name)` does not claim, or None."""
    if not folder.is_dir():
        return None
    return next((n for n in files_under(folder) if not owned(n)), None)


def refuse_foreign(folder: Path, name: str, what: str) -> ConfigError:
    return ConfigError(f"{folder} holds {name}, which this project did not write ({what}); it would be "
                       f"deleted or replaced. Move it out of {folder}, or use another --train.output_dir")


def refuse_link(path: Path, what: str) -> ConfigError:
    return ConfigError(f"{path} is a symbolic link (to {os.readlink(path)}) where the project keeps {what}, "
                       f"which it replaces or deletes; it never follows a link out of the output folder. "
                       f"Remove the link (rm {path}; what it points to is kept) or put a copy in its place, "
                       f"or use another --train.output_dir")


APPENDED_FILES = tuple(n for n in RUN_FILES if n not in ("checkpoints", *EXPORTS))
"""The run's files that a resumed run appends to or rewrites in place."""


def check_log_links(out: Path) -> None:
    """A resumed run appends to its logs and rewrites config.yaml: a link in one's place would
    have it write through to a file outside the output folder."""
    for name in APPENDED_FILES:
        if (out / name).is_symlink():
            raise refuse_link(out / name, f"its {name}")


def remove_scratch(path: Path, ignore_errors: bool = False) -> None:
    """Remove the project's scratch folder `path` (`step-N.tmp`, `.deleting`, `final.tmp`); a
    link in its place is unlinked, never followed: its target is not the project's."""
    if os.path.islink(path):
        os.unlink(path)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=ignore_errors)


def check_export_folder(folder: Path) -> None:
    """An export (`final/`, `final-adapter/`) is replaced by the next one: every file in it must be
    listed in its manifest."""
    if folder.is_symlink():
        raise refuse_link(folder, "the exported model")
    if not folder.exists():
        return
    try:
        listed = set(read_manifest(folder)) | {MANIFEST}
    except ValueError:
        listed = set()
    name = foreign_file(folder, lambda n: n in listed)
    if name is not None:
        raise refuse_foreign(folder, name, "not in its manifest.json")


def check_checkpoint_folders(root: Path) -> None:
    """Every `step-N*` folder under `root` may be pruned or replaced: it must hold only the
    checkpointer's files."""
    if not root.is_dir():
        return
    for d in sorted(root.iterdir()):
        if d.is_symlink() and CHECKPOINT_DIR.match(d.name):
            raise refuse_link(d, "a checkpoint folder")
        if d.is_dir() and CHECKPOINT_DIR.match(d.name):
            name = foreign_file(d, lambda n: CHECKPOINT_FILE.match(n) is not None)
            if name is not None:
                raise refuse_foreign(d, name, "not a checkpoint file")


def remove_leftovers(out: Path, ckpt_root: Path) -> list[Path]:
    """Remove what interrupted saves (`step-N.tmp`), prunes (`step-N.deleting`) and exports
    (`final.tmp`, `final-adapter.tmp`) left behind; a checkpoint leftover holding a foreign file is refused instead,
    and a link is unlinked (`remove_scratch`)."""
    gone = []
    if ckpt_root.is_dir():
        for d in sorted(ckpt_root.iterdir()):
            m = CHECKPOINT_DIR.match(d.name)
            if d.is_symlink() and m and m.group(2) in (".tmp", ".deleting"):
                remove_scratch(d)
                gone.append(d)
            elif d.is_dir() and m and m.group(2) in (".tmp", ".deleting"):
                name = foreign_file(d, lambda n: CHECKPOINT_FILE.match(n) is not None)
                if name is not None:
                    raise refuse_foreign(d, name, "not a checkpoint file")
                shutil.rmtree(d)
                gone.append(d)
    for name in EXPORTS:
        tmp = out / f"{name}.tmp"
        if tmp.is_dir() or tmp.is_symlink():
            remove_scratch(tmp)
            gone.append(tmp)
    return gone


def move_old_run_aside(out: Path) -> Path | None:
    """Move an earlier run's files (`RUN_FILES`) into a new `out/old-<date>-<time>/`; its path, or
    None when there was nothing. A rename within one filesystem: instant, nothing copied or lost."""
    present = [n for n in RUN_FILES if (out / n).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest, k = out / f"old-{stamp}", 1
    while dest.exists():
        k += 1
        dest = out / f"old-{stamp}-{k}"
    dest.mkdir(parents=True)
    for n in present:
        os.replace(out / n, dest / n)
    fsync_path(out)
    return dest


LOCK_FILE = "run.lock"


class FolderLock:
    """`<folder>/run.lock`, held with `flock` for as long as a run writes into the folder.

    The kernel drops an flock when its process dies, however it dies (SIGKILL, OOM, a lost
    node), so a crash leaves no stale lock to clear by hand; the file itself stays, holding the
    last holder's pid and host for the message a refused run prints. On NFS, Linux maps flock to
    a POSIX lock that the server arbitrates, so ranks and runs on other nodes see it too.

    Only one process of a run takes it (rank 0; the others wait on `on_main`). A process that
    holds it already (a pipeline's stages, a test running trainers one after another) takes it
    again: the holds are counted and the file is unlocked when the last is released.
    """

    _held: dict[str, list] = {}  # resolved folder -> [fd, count]

    def __init__(self, folder: Path, what: str, option: str = "--train.output_dir"):
        self.folder, self.what, self.key = Path(folder), what, str(Path(folder).resolve())
        self.released = False
        held = FolderLock._held.get(self.key)
        if held is not None:
            held[1] += 1
            return
        path = self.folder / LOCK_FILE
        if path.is_symlink():  # the holder's note would be written through it
            raise refuse_link(path, "the run's lock")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # no O_TRUNC: the holder's note stays
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise ConfigError(f"{self.folder} is in use by another run ({holder}), which holds {path}: two "
                              f"runs in one folder would overwrite each other's checkpoints and logs. Wait "
                              f"for it to finish or stop it, or use another {option}") from None
        note = {"pid": os.getpid(), "host": socket.gethostname(), "what": what,
                "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(note) + "\n").encode(), 0)
        FolderLock._held[self.key] = [fd, 1]

    @classmethod
    def inert(cls, folder: Path) -> "FolderLock":
        """What the ranks other than 0 hold: nothing to release."""
        lock = cls.__new__(cls)
        lock.folder, lock.what, lock.key, lock.released = Path(folder), "", "", True
        return lock

    def __enter__(self) -> "FolderLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def release(self) -> None:
        """Drop this hold (idempotent); the file is unlocked when no hold of this process is left."""
        if self.released:
            return
        self.released = True
        held = FolderLock._held.get(self.key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del FolderLock._held[self.key]
            os.close(held[0])  # closing the descriptor releases the flock


def _read_holder(fd: int) -> str:
    try:
        note = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {note['pid']} on host {note['host']}, {note.get('what', 'a run')} started {note['started']}"
    except (ValueError, KeyError, TypeError, OSError):
        return "a process that has not yet written its pid"


def lock_folder(folder: Path, info: DistInfo, what: str, option: str = "--train.output_dir") -> FolderLock:
    """Rank 0 makes sure it can write in `folder` (`folder_problem`) and takes its lock; every rank
    raises if it cannot or another run holds it. Collective. The other ranks get an inert lock, so
    that every rank releases alike."""
    def take():
        if (why := folder_problem(Path(folder))) is not None:
            raise ConfigError(f"{option}={str(folder)!r}: {why}; name a folder this run can create and write in")
        return FolderLock(folder, what, option)
    return on_main(info, take) or FolderLock.inert(folder)


def on_main(info: DistInfo, fn: Callable[[], object]):
    """Run `fn` on rank 0 only and share its failure: every rank raises, so that no rank is left
    waiting in a collective for one that gave up. Returns fn's result on rank 0, None elsewhere."""
    err, result, failure = None, None, None
    if info.is_main:
        try:
            result = fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            failure = e
            err = (isinstance(e, ConfigError), str(e))
    err = broadcast_object(err)
    if failure is not None:
        raise failure
    if err is not None:
        raise ConfigError(err[1]) if err[0] else RuntimeError(f"on rank 0: {err[1]}")
    return result


def folder_problem(path: Path) -> str | None:
    """Why `path` cannot be a folder this process writes in, in words, or None: it is created (with
    its parents) and a probe file is written and deleted in it. Checked before anything loads, so
    that a file in the way, a folder without write permission, a read-only file system or a name
    too long for the file system stop a run at once, not at its first save or export."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as e:
        if e.errno == errno.ENAMETOOLONG:
            return NAME_TOO_LONG
        # mkdir names the folder it was making, not the file in the way
        blocker = next((p for p in (path, *path.parents) if os.path.isfile(p)), None)
        if blocker is not None:
            return "it is a file, not a folder" if blocker == path else f"{blocker} is a file, not a folder"
        return f"cannot create it or write in it: {e.strerror or e}"
    return None


def new_file_mode() -> int:
    """The mode `open()` gives a new file in this process: 0o666 less the umask (0o644 under 022)."""
    try:
        with open("/proc/self/status") as f:  # Linux shows the umask without changing it
            for line in f:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)  # elsewhere it is read by setting it, and put back at once
    os.umask(mask)
    return 0o666 & ~mask


def give_new_file_modes(folder: Path) -> None:
    """Every file below `folder` gets the mode `open()` gives a new file (`new_file_mode`).
    safetensors writes through a private temporary file (mode 0600) renamed into place, so
    `model.safetensors` alone came out unreadable to the group and others, unlike its siblings."""
    mode = new_file_mode()
    for p in Path(folder).rglob("*"):
        if p.is_file() and not p.is_symlink():
            os.chmod(p, mode)
