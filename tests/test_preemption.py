"""Faults under torchrun, with 2 processes (gloo) on the tiny model.

- SIGTERM to torchrun in the middle of a step that takes longer than torchrun's grace period
  (`--shutdown-timeout`, 30 s by default; 15 s here) still leaves a checkpoint: the trainer stops at
  the next safe point inside the step and saves the previous step. The old trainer finished the
  step first and was SIGKILLed before saving anything.
- A frozen rank (SIGSTOP: alive, silent) fails the run after `--train.collective_timeout_s`, not
  after the process group's 30 minutes.
"""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
BASE = ["--rollout.group_size", "8", "--grpo.prompts_per_step", "2", "--grpo.micro_batch_size", "8",
        "--grpo.beta", "0", "--grpo.rewards", "accuracy,repetition_penalty", "--optim.warmup_steps", "0",
        "--data.num_train", "16", "--data.num_eval", "2", "--train.eval_every", "0",
        "--train.progress", "false", "--train.export", "false", "--train.save_every", "0"]


class _Torchrun:
    """torchrun with 2 workers in the background; stdout+stderr collected line by line."""

    def __init__(self, args: list[str], torchrun_args: list[str]):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
               *torchrun_args, str(ROOT / "train.py"), "grpo", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=ENV, start_new_session=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float) -> None:
        end = time.time() + timeout
        while text not in self.output:
            if self.proc.poll() is not None or time.time() > end:
                self.kill()
                pytest.fail(f"never printed {text!r}:\n{self.output[-4000:]}")
            time.sleep(0.2)

    def worker(self, rank: int) -> int:
        """pid of the worker process with this RANK (a child of the torchrun agent)."""
        for pid in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split():
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            if f"RANK={rank}".encode() in env:
                return int(pid)
        raise AssertionError(f"no worker with RANK={rank}")

    def finish(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"torchrun still running after {timeout} s:\n{self.output[-4000:]}")
        self.reader.join(timeout=10)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the session started for this torchrun only
            self.proc.wait()


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_sigterm_mid_step_saves_within_torchrun_grace_period(tiny, tmp_path):
    from r1train.run.checkpoint import CheckpointManager
    from r1train.run.dist import init_distributed
    out = tmp_path / "run"
    # A real slow step: 16 completions of up to 700 tokens, ~35 s per step on 2 busy CPU cores,
    # most of it generation. torchrun is told to SIGKILL 15 s after forwarding the SIGTERM.
    # No held-out evaluation (--data.num_eval 0): at step 0 it would decode 700 tokens too, ~15 s
    # before step 1 that this test does not look at.
    run = _Torchrun([*BASE, "--model.path", tiny, "--rollout.max_new_tokens", "700", "--data.num_eval", "0",
                     "--train.max_steps", "3", "--train.output_dir", str(out)], ["--shutdown-timeout", "15"])
    run.wait_for("step 1/3", timeout=420)
    # Step 2 starts as soon as step 1's line is out. How long its generation takes depends on the
    # machine (2.7 s to ~35 s measured) and on when the untrained model's rows end, so the signal
    # goes out at once: past step 1's stop check (the line comes first), early in step 2.
    time.sleep(0.3)
    run.proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    run.finish(timeout=120)
    took = time.time() - t0
    assert "[grpo] stopped by signal during step 2, before its update" in run.output, run.output[-4000:]
    ckpt = CheckpointManager(out / "checkpoints", init_distributed("cpu"))
    assert ckpt.steps() == [1], run.output[-4000:]
    assert ckpt.verify(out / "checkpoints" / "step-1") == []
    assert took < 15, f"{took:.1f} s: past torchrun's grace period"
    assert "step 2/3" not in run.output


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_frozen_rank_fails_the_run_after_the_collective_timeout(tiny, tmp_path):
    run = _Torchrun([*BASE, "--model.path", tiny, "--rollout.max_new_tokens", "8", "--train.max_steps", "1000",
                     "--train.collective_timeout_s", "10", "--train.output_dir", str(tmp_path / "run")],
                    ["--shutdown-timeout", "5"])
    run.wait_for("step 1/1000", timeout=420)
    frozen = run.worker(1)
    os.kill(frozen, signal.SIGSTOP)  # alive but silent: its peers wait for it in a collective
    t0 = time.time()
    try:
        # Rank 0 fails, torchrun sees it and SIGTERMs the frozen worker: that SIGTERM stays pending
        # on a stopped process, which is how we know the run was ended. torchrun would then wait
        # 30 s of its own (not --shutdown-timeout) before it SIGKILLs a worker that cannot stop;
        # that wait is torchrun's, not the trainer's, so the test kills the frozen worker itself.
        while not _pending(frozen, signal.SIGTERM):
            if run.proc.poll() is not None or time.time() - t0 > 300:
                break
            time.sleep(0.2)
        took = time.time() - t0
    finally:
        try:
            os.kill(frozen, signal.SIGKILL)
        except ProcessLookupError:
            pass
    rc = run.finish(timeout=120)
    assert rc != 0
    # gloo's own words for a collective that waited the whole 10 s for the frozen peer
    assert "Timed out waiting 10000ms" in run.output, run.output[-4000:]
    assert took < 120, f"{took:.0f} s to notice a frozen rank with a 10 s collective timeout"


def _pending(pid: int, sig: int) -> bool:
    """Whether `sig` waits, undelivered, for the (stopped) process `pid`."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    masks = [int(line.split()[1], 16) for line in status.splitlines() if line.startswith(("ShdPnd:", "SigPnd:"))]
    return any(m & (1 << (sig - 1)) for m in masks)
