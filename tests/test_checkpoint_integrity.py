"""Checkpoints that can be trusted: a planted pickle never runs, a damaged checkpoint is reported by
path and the previous one is used, a full disk is reported as such and cleaned up, interrupted
saves and prunes leave nothing behind that a later run would trip on.

Most tests drive `CheckpointManager` in this process on a small model (fast); one runs the GRPO
trainer end to end to show the same from the command line."""
import errno
import io
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from r1train.run.checkpoint import CheckpointError, CheckpointManager
from r1train.run.config import ConfigError
from r1train.run.dist import init_distributed
from r1train.run.folder import read_manifest, write_manifest

from launch import train_py

ROOT = Path(__file__).resolve().parents[1]


class _Planted:
    """A pickle that runs a shell command when loaded: what a hostile run folder would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _setup(tmp_path, steps=(1, 2)):
    """A Linear model and AdamW, one checkpoint per step in `steps` (the weights move between them);
    returns (manager, model, optimizer, {step: weights at that save})."""
    info = init_distributed("cpu")
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)  # 16 KB of weights: a 4 KB flip stays inside the shard
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    ckpt = CheckpointManager(tmp_path / "checkpoints", info, keep_last=3)
    saved = {}
    for step in steps:
        model(torch.ones(2, 64)).sum().backward()
        opt.step()
        opt.zero_grad()
        ckpt.save(step, model, opt, {"note": step})
        saved[step] = model.weight.detach().clone()
    return ckpt, model, opt, saved


def _fresh(ckpt):
    """A new model and optimizer, as a resumed run builds them, and a new manager."""
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    return CheckpointManager(ckpt.root, ckpt.info, keep_last=3), model, opt


def _plant(ckpt_dir: Path, marker: Path, forge_manifest: bool) -> None:
    (ckpt_dir / ".metadata").write_bytes(pickle.dumps(_Planted(marker)))
    if forge_manifest:  # an attacker who also rewrites the manifest: only the unpickler stands
        write_manifest(ckpt_dir)


@pytest.mark.parametrize("forge_manifest", [False, True])
def test_planted_metadata_pickle_never_runs_and_resume_falls_back(tmp_path, capsys, forge_manifest):
    ckpt, _, _, saved = _setup(tmp_path)
    marker = tmp_path / "pwned"
    _plant(ckpt.root / "step-2", marker, forge_manifest)
    capsys.readouterr()

    ckpt2, model, opt = _fresh(ckpt)
    path = ckpt2.resume_point()
    out = capsys.readouterr().out
    assert not marker.exists(), "the planted pickle ran"
    assert path == ckpt.root / "step-1"
    assert str(ckpt.root / "step-2" / ".metadata") in out and "WARNING" in out
    if forge_manifest:
        assert "posix.system is not a checkpoint metadata type" in out
    # Set aside, out of the way of the resumed run's own step 2.
    assert not (ckpt.root / "step-2").exists() and (ckpt.root / "step-2.damaged").is_dir()
    assert ckpt2.load(path, model, opt)["note"] == 1
    torch.testing.assert_close(model.weight.detach(), saved[1])


def test_loading_a_planted_checkpoint_directly_refuses_without_running_it(tmp_path):
    """`load` itself, even without `resume_point`'s checks, unpickles nothing but DCP's types."""
    ckpt, _, _, _ = _setup(tmp_path)
    marker = tmp_path / "pwned"
    _plant(ckpt.root / "step-2", marker, forge_manifest=True)
    ckpt2, model, opt = _fresh(ckpt)
    with pytest.raises(Exception, match="posix.system"):
        ckpt2.load(ckpt.root / "step-2", model, opt)
    assert not marker.exists()


def test_non_tensor_checkpoint_items_are_read_weights_only(tmp_path):
    """DCP's default planner reads non-tensor items (param groups) with weights_only=False."""
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    from r1train.run.dcp_safe import SafeLoadPlanner
    marker = tmp_path / "pwned"
    buf = io.BytesIO()
    torch.save(_Planted(marker), buf)
    for planner, runs in ((SafeLoadPlanner(), False), (DefaultLoadPlanner(), True)):
        planner.flatten_state_dict, planner.state_dict = False, {}
        item = type("ReadItem", (), {"dest_index": type("I", (), {"fqn": "x"})()})()
        buf.seek(0)
        if runs:  # the unsafe default really would run it: the check above is not vacuous
            planner.load_bytes(item, buf)
        else:
            with pytest.raises(pickle.UnpicklingError):
                planner.load_bytes(item, buf)
        assert marker.exists() == runs
        marker.unlink(missing_ok=True)


def _flip(path: Path):
    data = bytearray(path.read_bytes())
    start = len(data) // 4
    data[start:start + 4096] = bytes(b ^ 0xFF for b in data[start:start + 4096])
    path.write_bytes(bytes(data))


DAMAGE = {
    "flip 4 KB": _flip,
    "truncate": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "empty": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_is_reported_and_the_previous_one_used(tmp_path, capsys, damage):
    ckpt, _, _, saved = _setup(tmp_path)
    shard = ckpt.root / "step-2" / "__0_0.distcp"
    assert shard.stat().st_size > 3 * 16384
    DAMAGE[damage](shard)
    capsys.readouterr()
    ckpt2, model, opt = _fresh(ckpt)
    path = ckpt2.resume_point()
    out = capsys.readouterr().out
    assert path == ckpt.root / "step-1"
    assert f"{shard} " in out and "resuming from the previous complete checkpoint" in out, out
    state = ckpt2.load(path, model, opt)
    assert state["step"] == 1
    torch.testing.assert_close(model.weight.detach(), saved[1])
    assert not torch.equal(saved[1], saved[2])  # step 2 really held other weights


def test_every_checkpoint_damaged_refuses_to_start_over_silently(tmp_path):
    ckpt, _, _, _ = _setup(tmp_path)
    for step in (1, 2):
        _flip(ckpt.root / f"step-{step}" / "__0_0.distcp")
    with pytest.raises(ConfigError, match=r"no intact checkpoint .*--train\.resume false"):
        _fresh(ckpt)[0].resume_point()
    assert sorted(p.name for p in ckpt.root.iterdir()) == ["step-1", "step-2"]  # nothing moved


def test_checkpoint_without_manifest_is_not_resumed_until_vouched_for(tmp_path, capsys):
    """A checkpoint from before manifests: reported, skipped; `write_manifest` vouches for it."""
    ckpt, _, _, _ = _setup(tmp_path, steps=(1, 2))
    (ckpt.root / "step-2" / "manifest.json").unlink()
    assert _fresh(ckpt)[0].resume_point() == ckpt.root / "step-1"
    assert "manifest.json is missing" in capsys.readouterr().out
    shutil.move(ckpt.root / "step-2.damaged", ckpt.root / "step-2")
    write_manifest(ckpt.root / "step-2")
    assert _fresh(ckpt)[0].resume_point() == ckpt.root / "step-2"


def test_manifest_lists_every_file_with_size_and_sha256(tmp_path):
    import hashlib
    ckpt, _, _, _ = _setup(tmp_path, steps=(1,))
    folder = ckpt.root / "step-1"
    manifest = read_manifest(folder)
    names = sorted(p.name for p in folder.iterdir() if p.name != "manifest.json")
    assert sorted(manifest) == names and {".metadata", "__0_0.distcp", "trainer_state.pt",
                                          "rng-rank0.pt", "config.yaml"} <= set(names)
    for n in names:
        data = (folder / n).read_bytes()
        assert manifest[n] == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class _FullDisk(io.FileIO):
    """A file on a disk with `budget` bytes left: the write that does not fit raises ENOSPC."""
    budget = 0

    def write(self, b):
        n = len(memoryview(b))
        if n > _FullDisk.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _FullDisk.budget -= n
        return super().write(b)


def _full_disk_stream(self, path, mode):
    import contextlib

    @contextlib.contextmanager
    def stream():
        with io.BufferedWriter(_FullDisk(str(path), "w")) as f:
            yield f
    return stream()


@pytest.mark.parametrize("where", ["dcp shard", "trainer state"])
def test_disk_full_during_save_reports_enospc_and_removes_the_temporary_folder(tmp_path, monkeypatch, where):
    import torch.distributed.checkpoint.filesystem as dcp_fs

    import r1train.run.checkpoint as checkpoint
    ckpt, model, opt, _ = _setup(tmp_path, steps=(1,))
    _FullDisk.budget = 600
    if where == "dcp shard":
        monkeypatch.setattr(dcp_fs.FileSystem, "create_stream", _full_disk_stream)
    else:  # torch.save of our own small files, through a Python file on the full disk
        real_open = open
        monkeypatch.setattr(checkpoint, "open", lambda p, mode="r", *a, **k:
                            io.BufferedWriter(_FullDisk(str(p), "w")) if "trainer_state" in str(p)
                            else real_open(p, mode, *a, **k), raising=False)
    with pytest.raises(CheckpointError) as exc:
        ckpt.save(2, model, opt, {"note": 2})
    msg = str(exc.value)
    tmp = ckpt.root / "step-2.tmp"
    assert "No space left on device (ENOSPC)" in msg and str(tmp) in msg, msg
    assert str(ckpt.root / "step-1") in msg and "untouched" in msg
    assert not tmp.exists() and not (ckpt.root / "step-2").exists()
    assert ckpt.steps() == [1] and ckpt.verify(ckpt.root / "step-1") == []


def test_interrupted_saves_and_prunes_leave_nothing_behind(tmp_path, monkeypatch):
    """A prune renames step-N to step-N.deleting before deleting it: cut short, it never leaves a
    half-deleted step-N/; the next start removes .deleting and .tmp leftovers."""
    import r1train.run.checkpoint as checkpoint
    from r1train.run.loop import open_run
    ckpt, model, opt, _ = _setup(tmp_path, steps=(1, 2))
    ckpt.keep_last = 1
    real_rmtree = shutil.rmtree

    def dying_rmtree(path, *a, **k):  # the process dies half-way through deleting step-1
        if str(path).endswith("step-1.deleting") and Path(path).exists():
            os.remove(Path(path) / "__0_0.distcp")
            raise KeyboardInterrupt
        return real_rmtree(path, *a, **k)
    monkeypatch.setattr(checkpoint.shutil, "rmtree", dying_rmtree)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save(3, model, opt, {"note": 3})
    monkeypatch.undo()
    assert not (ckpt.root / "step-1").exists() and (ckpt.root / "step-1.deleting").is_dir()
    (ckpt.root / "step-4.tmp").mkdir()  # and a save that died before its rename
    (ckpt.root / "step-4.tmp" / "__0_0.distcp").write_bytes(b"partial")
    (tmp_path / "final.tmp").mkdir()  # and an export that died
    assert ckpt.steps() == [2, 3]
    path = open_run(CheckpointManager(ckpt.root, ckpt.info), tmp_path, resume=True, tag="test")
    assert path == ckpt.root / "step-3"
    assert sorted(p.name for p in ckpt.root.iterdir()) == ["step-2", "step-3"]
    assert not (tmp_path / "final.tmp").exists()


def test_grpo_resume_skips_damaged_and_planted_checkpoints_naming_them(tmp_path):
    """End to end: the trainer resumes from step 1 when step 2's shard has 4 KB flipped (the issue
    saw a silent resume with wrong weights), and when step 2 carries a planted pickle."""
    from r1train.data.tiny import build_tiny_model
    tiny = str(build_tiny_model(tmp_path / "tiny", seed=0))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = ["--model.path", tiny, "--rollout.group_size", "4", "--grpo.prompts_per_step", "2",
            "--grpo.micro_batch_size", "8", "--rollout.max_new_tokens", "8", "--grpo.beta", "0",
            "--grpo.rewards", "accuracy,repetition_penalty", "--optim.warmup_steps", "0",
            "--data.num_train", "16", "--data.num_eval", "2", "--train.eval_every", "0",
            "--train.progress", "false", "--train.save_every", "1", "--train.export", "false"]

    def run(out, *extra):
        res = train_py("grpo", *args, "--train.output_dir", out, *extra, env=env)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        return res.stdout

    flipped, planted = tmp_path / "flipped", tmp_path / "planted"
    run(flipped, "--train.max_steps", "2")
    shutil.copytree(flipped, planted)
    shard = flipped / "checkpoints" / "step-2" / "__0_0.distcp"
    _flip(shard)
    marker = tmp_path / "pwned"
    _plant(planted / "checkpoints" / "step-2", marker, forge_manifest=True)
    for out, named in ((flipped, shard), (planted, planted / "checkpoints" / "step-2" / ".metadata")):
        stdout = run(out, "--train.max_steps", "3")
        assert f"{named} " in stdout and "resumed from" in stdout, stdout[-3000:]
        assert f"resumed from {out / 'checkpoints' / 'step-1'} at step 1" in stdout
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-2.damaged", "step-3"]
    assert not marker.exists()
