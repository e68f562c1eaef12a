"""The run folder: nothing the project did not write is deleted, replaced or appended to; starting
over never mixes two runs; logs survive a torn write and a resume truncates every per-step log."""
import json
import os
import shutil
from pathlib import Path

import pytest

from r1train.data.tiny import build_tiny_model, ensure_tiny_model
from r1train.run.config import ConfigError
from r1train.run.dist import init_distributed

from launch import train_py

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
GRPO = ["--rollout.group_size", "4", "--grpo.prompts_per_step", "2", "--grpo.micro_batch_size", "8",
        "--rollout.max_new_tokens", "8", "--grpo.beta", "0", "--grpo.rewards", "accuracy,repetition_penalty",
        "--optim.warmup_steps", "0", "--data.num_train", "16", "--data.num_eval", "2",
        "--train.eval_every", "0", "--train.progress", "false", "--train.sample_every", "1"]


def _grpo(tiny, out, *extra, ok=True):
    res = train_py("grpo", *GRPO, "--model.path", tiny, "--train.output_dir", out, *extra, env=ENV)
    if ok:
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def _rows(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def _steps(path, key="reward"):
    return [r["step"] for r in _rows(path) if key in r]


# ---------------------------------------------------------------- 3. foreign files
def test_tiny_model_build_never_deletes_a_foreign_file(tmp_path):
    target = tmp_path / "tiny-model"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"tiny-model holds keep\.txt"):
        ensure_tiny_model(target, seed=0)
    assert (target / "keep.txt").read_text() == "mine"

    shutil.rmtree(target)
    ensure_tiny_model(target, seed=0)
    (target / "keep.txt").write_text("mine")
    assert ensure_tiny_model(target, seed=0) == target  # same build: reused as it is
    with pytest.raises(ValueError, match=r"keep\.txt"):  # another seed would rebuild: refused
        ensure_tiny_model(target, seed=1)
    assert (target / "keep.txt").read_text() == "mine"
    (target / "keep.txt").unlink()
    ensure_tiny_model(target, seed=1)  # only the build's own files: replaced
    assert json.loads((target / "tiny_model.json").read_text())["seed"] == 1


def test_a_killed_tiny_model_build_leaves_nothing_after_the_next_build(tmp_path):
    """A build killed outright leaves `tiny-model.tmp-<pid>`: the next build removes it once that
    process is gone, and keeps a live process's (a build under way)."""
    import subprocess
    import sys
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()
    for pid in (dead, str(os.getppid())):  # the parent: alive, and not this build's own name
        (tmp_path / f"tiny-model.tmp-{pid}").mkdir()
        (tmp_path / f"tiny-model.tmp-{pid}" / "model.safetensors").write_bytes(b"half")
    ensure_tiny_model(tmp_path / "tiny-model", seed=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-model", f"tiny-model.tmp-{os.getppid()}"]


def test_embedded_model_in_a_foreign_folder_is_a_config_error(tmp_path):
    from r1train.model.load import resolve_model_path
    (tmp_path / "tiny-model").mkdir()
    (tmp_path / "tiny-model" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"tiny-model holds keep\.txt"):
        resolve_model_path("embedded", tmp_path, init_distributed("cpu"))
    assert (tmp_path / "tiny-model" / "keep.txt").exists()


def test_export_never_replaces_a_foreign_final_folder(tmp_path, tiny):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1train.run.checkpoint import export_hf
    model = AutoModelForCausalLM.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    info, out = init_distributed("cpu"), tmp_path / "final"
    export_hf(model, model.config, tok, out, info)
    export_hf(model, model.config, tok, out, info)  # its own export, listed in its manifest: replaced
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    (out / "model.bin").write_bytes(b"a user's weights")
    with pytest.raises(ConfigError, match=r"final holds model\.bin"):
        export_hf(model, model.config, tok, out, info)
    assert (out / "model.bin").read_bytes() == b"a user's weights"


def test_every_exported_file_gets_the_mode_of_a_new_file(tmp_path, tiny):
    """model.safetensors was 0600 (safetensors writes through a private temporary file) while
    its siblings were 0644: each file now has 0o666 less the umask."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from r1train.run.checkpoint import export_hf
    model = AutoModelForCausalLM.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        old = os.umask(umask)
        try:
            export_hf(model, model.config, tok, tmp_path / f"final-{umask:o}", init_distributed("cpu"))
        finally:
            os.umask(old)
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (tmp_path / f"final-{umask:o}").iterdir()}
        assert "model.safetensors" in modes and set(modes.values()) == {oct(mode)}, modes


def test_the_embedded_model_gets_the_mode_of_a_new_file(tmp_path):
    """The same for `tiny-model/` (and the GGUF cache, written the same way: model/gguf.py)."""
    old = os.umask(0o022)
    try:
        folder = build_tiny_model(tmp_path / "tiny-model")
    finally:
        os.umask(old)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {"0o644"}, modes


def test_foreign_files_are_moved_aside_or_refused_never_deleted_or_appended(tiny, tmp_path):
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "final" / "model.bin").write_bytes(b"a user's weights")
    (out / "metrics.jsonl").write_text("my notes, not JSON\n")
    res = _grpo(tiny, out, "--train.max_steps", "2", "--train.save_every", "2")
    old = [p for p in out.iterdir() if p.name.startswith("old-")]
    assert len(old) == 1 and f"moved the earlier run's files in {out} to {old[0]}" in res.stdout
    assert (old[0] / "final" / "model.bin").read_bytes() == b"a user's weights"
    assert (old[0] / "metrics.jsonl").read_text() == "my notes, not JSON\n"
    assert _steps(out / "metrics.jsonl") == [1, 2]  # the new run's rows only, all of them JSON

    # Resuming would replace final/ and prune step folders: a foreign file there is refused.
    (out / "final" / "notes.txt").write_text("mine")
    res = _grpo(tiny, out, "--train.max_steps", "3", ok=False)
    assert res.returncode == 2 and f"{out / 'final'} holds notes.txt" in res.stderr, res.stderr[-2000:]
    (out / "final" / "notes.txt").unlink()
    (out / "checkpoints" / "step-2" / "notes.txt").write_text("mine")
    res = _grpo(tiny, out, "--train.max_steps", "3", ok=False)
    assert res.returncode == 2 and f"{out / 'checkpoints' / 'step-2'} holds notes.txt" in res.stderr
    assert (out / "checkpoints" / "step-2" / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------- 4. starting over
def test_starting_over_moves_the_earlier_run_aside_and_never_mixes_with_it(tiny, tmp_path):
    out = tmp_path / "run"
    _grpo(tiny, out, "--train.max_steps", "4", "--train.save_every", "2", "--train.export", "false")
    res = _grpo(tiny, out, "--train.resume", "false", "--train.max_steps", "3", "--train.save_every", "1",
                "--train.export", "false")
    assert "starting a new run (--train.resume false)" in res.stdout
    old = next(p for p in out.iterdir() if p.name.startswith("old-"))
    assert sorted(p.name for p in (old / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert _steps(old / "metrics.jsonl") == [1, 2, 3, 4]
    # The new run's newest checkpoints are its own (the old code pruned them against step-4).
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2", "step-3"]
    assert "max_steps: 3" in (out / "checkpoints" / "step-3" / "config.yaml").read_text()
    assert _steps(out / "metrics.jsonl") == [1, 2, 3]

    res = _grpo(tiny, out, "--train.max_steps", "4", "--train.export", "false")
    assert f"resumed from {out / 'checkpoints' / 'step-3'} at step 3" in res.stdout
    assert _steps(out / "metrics.jsonl") == [1, 2, 3, 4]


# ---------------------------------------------------------------- 6. torn logs
def test_truncation_drops_later_steps_and_torn_lines(tmp_path, capsys):
    from r1train.run.logging import MetricsLogger
    (tmp_path / "metrics.jsonl").write_text(
        '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.4}\n{"step": 3, "loss": 0.3}\n{"step": 4, "lo')
    (tmp_path / "samples.jsonl").write_text(
        "".join(json.dumps({"step": s, "completion": f"c{s}{i}"}) + "\n" for s in (1, 2, 3) for i in range(2)))
    MetricsLogger(tmp_path, enabled=True).truncate_after(2)
    assert _rows(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5}, {"step": 2, "loss": 0.4}]
    assert [r["completion"] for r in _rows(tmp_path / "samples.jsonl")] == ["c10", "c11", "c20", "c21"]
    assert "dropped 1 unreadable line" in capsys.readouterr().out


def test_resume_survives_a_torn_metrics_line_and_logs_each_step_once(tiny, tmp_path):
    out = tmp_path / "run"
    # A run that logged step 3, then died before saving it (its checkpoint is gone) in the middle
    # of writing a line.
    _grpo(tiny, out, "--train.max_steps", "4", "--train.save_every", "2", "--train.stop_at_step", "3")
    shutil.rmtree(out / "checkpoints" / "step-3")
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "reward": 0.')
    res = _grpo(tiny, out, "--train.max_steps", "4", "--train.save_every", "2")
    assert f"resumed from {out / 'checkpoints' / 'step-2'} at step 2" in res.stdout
    assert _steps(out / "metrics.jsonl") == [1, 2, 3, 4]
    samples = _steps(out / "samples.jsonl", key="completion")
    per_step = {s: samples.count(s) for s in set(samples)}
    assert sorted(per_step) == [1, 2, 3, 4] and len(set(per_step.values())) == 1, per_step


# ---------------------------------------------------------------- 7. links
def _linked_checkpoints(tmp_path, keep_last=1):
    """A real checkpoint `elsewhere/checkpoints/step-1` (the user's, kept outside the run) and a
    run whose `checkpoints/step-1` is a link to it; returns (manager, model, optimizer, target,
    the target's files and bytes)."""
    import torch

    from r1train.run.checkpoint import CheckpointManager
    info = init_distributed("cpu")
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    CheckpointManager(tmp_path / "elsewhere" / "checkpoints", info).save(1, model, opt, {})
    target = tmp_path / "elsewhere" / "checkpoints" / "step-1"
    ckpt = CheckpointManager(tmp_path / "run" / "checkpoints", info, keep_last=keep_last)
    ckpt.root.mkdir(parents=True)
    (ckpt.root / "step-1").symlink_to(target)
    return ckpt, model, opt, target, {p.name: p.read_bytes() for p in target.iterdir()}


def test_a_linked_checkpoint_folder_is_never_pruned_and_is_refused_at_start(tmp_path):
    """With keep_last 1 the prune renamed the link step-1 to step-1.deleting, then rmtree raised
    "Cannot call rmtree on a symbolic link", at that save and at every later start."""
    from r1train.run.checkpoint import CheckpointManager
    from r1train.run.loop import open_run
    ckpt, model, opt, target, files = _linked_checkpoints(tmp_path)
    ckpt.save(2, model, opt, {})  # the prune leaves the link alone: it is not the run's folder
    assert (ckpt.root / "step-1").is_symlink() and ckpt.steps() == [2]
    out = ckpt.root.parent
    for name, what in (("step-1", "a checkpoint folder"), ("step-3.damaged", "a checkpoint folder")):
        if name != "step-1":
            (ckpt.root / name).symlink_to(target)
        with pytest.raises(ConfigError, match=rf"^{ckpt.root / name} is a symbolic link \(to {target}\) where "
                                              rf"the project keeps {what}.* Remove the link \(rm {ckpt.root / name};"):
            open_run(CheckpointManager(ckpt.root, ckpt.info), out, resume=True, tag="test")
        (ckpt.root / name).unlink()
    (out / "final").symlink_to(target)  # the export would be replaced through it
    with pytest.raises(ConfigError, match=rf"^{out / 'final'} is a symbolic link .* keeps the exported model"):
        open_run(CheckpointManager(ckpt.root, ckpt.info), out, resume=True, tag="test")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == files  # never touched


def test_leftover_links_are_unlinked_at_start_their_targets_untouched(tmp_path):
    """The state the old prune left behind (step-1.deleting a link), and links where a save's or
    an export's scratch goes: unlinked at the next start, which then resumes."""
    from r1train.run.checkpoint import CheckpointManager
    from r1train.run.loop import open_run
    ckpt, model, opt, target, files = _linked_checkpoints(tmp_path)
    (ckpt.root / "step-1").unlink()
    ckpt.save(2, model, opt, {})
    out, junk = ckpt.root.parent, tmp_path / "elsewhere" / "junk"
    junk.mkdir()
    (junk / "mine.txt").write_text("mine")
    (ckpt.root / "step-1.deleting").symlink_to(target)
    (ckpt.root / "step-3.tmp").symlink_to(junk)
    (out / "final.tmp").symlink_to(junk)
    path = open_run(CheckpointManager(ckpt.root, ckpt.info), out, resume=True, tag="test")
    assert path == ckpt.root / "step-2"
    assert sorted(p.name for p in ckpt.root.iterdir()) == ["step-2"] and not os.path.lexists(out / "final.tmp")
    assert {p.name: p.read_bytes() for p in target.iterdir()} == files and (junk / "mine.txt").read_text() == "mine"


def test_a_linked_checkpoint_is_refused_in_one_line_from_the_command_line(tiny, tmp_path):
    out, kept = tmp_path / "run", tmp_path / "kept"
    _grpo(tiny, kept, "--train.max_steps", "1", "--train.export", "false")
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "step-1").symlink_to(kept / "checkpoints" / "step-1")
    res = _grpo(tiny, out, "--train.max_steps", "2", "--train.keep_last", "1", ok=False)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr[-3000:]
    assert f"{out / 'checkpoints' / 'step-1'} is a symbolic link" in res.stderr
    assert sorted(p.name for p in (kept / "checkpoints" / "step-1").iterdir()) == [
        ".metadata", "__0_0.distcp", "config.yaml", "manifest.json", "rng-rank0.pt", "trainer_state.pt"]


def test_a_linked_log_or_lock_is_refused_never_written_through(tiny, tmp_path):
    """A resumed run appends to metrics.jsonl (and writes config.yaml, run.lock): through a link
    it changed a file outside the output folder."""
    out, elsewhere = tmp_path / "run", tmp_path / "elsewhere.jsonl"
    _grpo(tiny, out, "--train.max_steps", "1", "--train.export", "false")
    os.replace(out / "metrics.jsonl", elsewhere)
    (out / "metrics.jsonl").symlink_to(elsewhere)
    before = elsewhere.read_bytes()
    res = _grpo(tiny, out, "--train.max_steps", "2", "--train.export", "false", ok=False)
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr[-3000:]
    assert f"{out / 'metrics.jsonl'} is a symbolic link (to {elsewhere}) where the project keeps its " \
           f"metrics.jsonl" in res.stderr
    assert elsewhere.read_bytes() == before

    os.unlink(out / "metrics.jsonl")
    os.replace(out / "run.lock", elsewhere)
    (out / "run.lock").symlink_to(elsewhere)
    res = _grpo(tiny, out, "--train.max_steps", "2", "--train.export", "false", ok=False)
    assert res.returncode == 2 and f"{out / 'run.lock'} is a symbolic link" in res.stderr, res.stderr[-3000:]
