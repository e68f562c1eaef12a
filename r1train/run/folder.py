"""What the project owns in an output folder, and the rules for touching it.

A run writes into `--train.output_dir`: `checkpoints/step-N/`, `metrics.jsonl`, `samples.jsonl`,
`eval_samples.jsonl`, `config.yaml`,
`final/` (the export) and, for the embedded model, `tiny-model/`. Some of these are replaced or
deleted later (a checkpoint pruned, an export redone), so the project must know that what it is
about to delete is its own. The rules:

- A folder the project replaces as a whole (`final/`) carries a `manifest.json`, written last,
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
- The project never follows a symbolic link out of the output folder: a link where it keeps a
  folder it replaces or deletes (`checkpoints/step-N/` and its `.damaged` form, `final/`) is
  refused at start like a foreign file, and a link left where its scratch goes (`.tmp`,
  `.deleting`) is unlinked, its target untouched (`remove_scratch`). Deleting through the link
  would reach files elsewhere, and `shutil.rmtree` refuses a link anyway: a pruned link used to
  fail every later start. (`checkpoints/` itself may be a link: the checkpoints live there.)

The manifest uses SHA-256 so that a user can check a file by hand (`sha256sum`). Hashing reads
every byte once: about 0.6 GB/s per process on a busy 2-core CPU box, done by every rank on its
own share of the files.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from r1train.run.config import ConfigError
from r1train.run.dist import DistInfo, broadcast_object

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "r1-from-scratch manifest 1"

# Files the checkpointer writes into step-N/: DCP's shards and metadata (and the metadata's
# temporary name while DCP writes it), then ours.
CHECKPOINT_FILE = re.compile(
    r"^(\.metadata|__\d+\.metadata|(__\d+)?\.metadata\.tmp|__\d+_\d+\.distcp"
    r"|trainer_state\.pt|rng-rank\d+\.pt|config\.yaml|manifest\.json)$")
CHECKPOINT_DIR = re.compile(r"^step-(\d+)(\.tmp|\.deleting|\.damaged)?$")

# An earlier run, as a new run in the same folder would otherwise mix with it.
RUN_FILES = ("checkpoints", "metrics.jsonl", "samples.jsonl", "eval_samples.jsonl", "config.yaml", "final")


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


def remove_scratch(path: Path, ignore_errors: bool = False) -> None:
    """Remove the project's scratch folder `path` (`step-N.tmp`, `.deleting`, `final.tmp`); a
    link in its place is unlinked, never followed: its target is not the project's."""
    if os.path.islink(path):
        os.unlink(path)
    elif path.exists():
        shutil.rmtree(path, ignore_errors=ignore_errors)


def check_export_folder(folder: Path) -> None:
    """`final/` is replaced by the next export: every file in it must be listed in its manifest."""
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
    (`final.tmp`) left behind; a checkpoint leftover holding a foreign file is refused instead,
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
    tmp = out / "final.tmp"
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
