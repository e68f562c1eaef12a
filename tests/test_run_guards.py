"""Nothing lost, nothing hung (issue 35): one run per folder, and the user's reward code bounded.

- Two runs into one `--train.output_dir`: the second is refused naming the first's pid and host,
  and the first finishes with each step once in metrics.jsonl. A killed run leaves no stale lock.
- A user's reward that never returns: SIGTERM stops the run within seconds, the last step saved
  and resumable; without a signal, `--rewards.custom_timeout_s` ends it, named, the step before
  saved. A second signal (not a launcher's echo of the first) exits at once, saving nothing.
- A reward that raises is named with the row that raises; one that writes into `completions`
  changes nothing another reward or samples.jsonl sees; NaN is refused like inf; a function that
  cannot take `fn(completions, **columns)` is refused when loaded; metrics.jsonl is strict JSON.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from r1train.rewards import RewardError, get_reward_functions, score_completions
from r1train.run.config import ConfigError
from r1train.run.folder import LOCK_FILE, FolderLock
from r1train.run.logging import MetricsLogger, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
BASE = ["--rollout.group_size", "4", "--grpo.prompts_per_step", "2", "--grpo.micro_batch_size", "8",
        "--grpo.beta", "0", "--optim.warmup_steps", "0", "--data.num_train", "16", "--data.num_eval", "2",
        "--train.eval_every", "0", "--train.progress", "false", "--train.export", "false",
        "--rollout.max_new_tokens", "16"]

# A reward that hangs (in Python, as a stuck network call would) from its k-th call on, k read
# from `hang_at` next to it (one call a training step), after writing `entered`; `stubborn` also
# swallows whatever is raised inside it.
REWARDS = textwrap.dedent('''
    import time
    from pathlib import Path
    HERE = Path(__file__).parent
    CALLS = [0]

    def hangs(completions, **kwargs):
        CALLS[0] += 1
        at = HERE / "hang_at"
        if at.exists() and CALLS[0] >= int(at.read_text()):
            (HERE / "entered").touch()
            time.sleep(3600)
        return [0.0] * len(completions)

    def waits(completions, **kwargs):
        while not (HERE / "go").exists():
            time.sleep(0.05)
        return [0.0] * len(completions)

    def stubborn(completions, **kwargs):
        (HERE / "entered").touch()
        while True:
            try:
                time.sleep(3600)
            except BaseException:
                pass
''')


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "user_rewards.py"
    path.write_text(REWARDS)
    return path


class Run:
    """`train.py grpo` in the background, its output collected line by line."""

    def __init__(self, args: list[str]):
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "grpo", *args], env=ENV,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, done, what: str, timeout: float = 240) -> None:
        end = time.time() + timeout
        while not done():
            if self.proc.poll() is not None or time.time() > end:
                self.proc.kill()
                pytest.fail(f"never saw {what}:\n{self.output[-3000:]}")
            time.sleep(0.1)

    def finish(self, timeout: float = 240) -> int:
        rc = self.proc.wait(timeout=timeout)
        self.reader.join(timeout=10)
        return rc


def train_steps(out: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def checkpoints(out: Path) -> list[str]:
    root = out / "checkpoints"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


# --- one run per folder --------------------------------------------------------------------------

def test_a_second_run_into_a_busy_folder_is_refused_and_the_first_finishes(tiny, tmp_path, rewards_file):
    out = tmp_path / "run"
    args = [*BASE, "--model.path", tiny, "--train.max_steps", "6", "--train.output_dir", str(out),
            "--grpo.rewards", f"format,{rewards_file}:waits"]
    first = Run(args)
    first.wait_for(lambda: "world size" in first.output, "the first run's start")  # it holds the lock
    # The first run waits in its first step until `go`: still running whatever this machine's pace.
    second = subprocess.run([sys.executable, str(ROOT / "train.py"), "grpo", *args], env=ENV,
                            capture_output=True, text=True, timeout=240)
    assert second.returncode == 2, second.stderr[-3000:]
    err = second.stderr.strip().splitlines()
    assert len(err) == 1 and f"pid {first.proc.pid} on host" in err[0] and "in use by another run" in err[0], err
    (rewards_file.parent / "go").touch()
    assert first.finish() == 0, first.output[-3000:]
    assert train_steps(out) == [1, 2, 3, 4, 5, 6]
    assert not list(out.glob("old-*")), "the second run moved the first one's files"


def test_the_lock_goes_with_its_process_however_it_ends(tmp_path):
    """A holder killed with SIGKILL leaves no stale lock (the kernel drops an flock with its
    process); while it lives, the refusal names its pid."""
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from r1train.run.folder import FolderLock
        FolderLock(Path({str(tmp_path)!r}), "grpo")
        print("held", flush=True)
        time.sleep(600)
    """)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {holder.pid} on host .*grpo started"):
            FolderLock(tmp_path, "grpo")
    finally:
        holder.kill()
        holder.wait()
    with FolderLock(tmp_path, "grpo") as lock:  # taken at once, no manual step
        inner = FolderLock(tmp_path, "sft")  # the same process again (a pipeline's stage): counted
        inner.release()
        assert FolderLock._held[lock.key][1] == 1
    assert lock.key not in FolderLock._held and (tmp_path / LOCK_FILE).exists()


def test_a_pipeline_into_a_busy_folder_is_refused_before_any_stage(tmp_path):
    out = tmp_path / "pipeline"
    out.mkdir()
    with FolderLock(out, "pipeline"):  # this process: the first run
        res = subprocess.run([sys.executable, str(ROOT / "train.py"), "pipeline", "--recipe",
                              str(ROOT / "configs" / "tiny-r1.yaml"), "--output_dir", str(out)],
                             env=ENV, capture_output=True, text=True, timeout=240)
    assert res.returncode == 2, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stderr.count("\n") == 1 and f"pid {os.getpid()} on host" in res.stderr
    assert res.stderr.strip().endswith("or use another --output_dir")
    assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # no stage started


# --- a reward that never returns -----------------------------------------------------------------

def test_sigterm_during_a_hung_reward_stops_with_the_last_step_saved(tiny, tmp_path, rewards_file):
    out = tmp_path / "run"
    (rewards_file.parent / "hang_at").write_text("3")
    args = [*BASE, "--model.path", tiny, "--train.max_steps", "4", "--train.output_dir", str(out),
            "--train.save_every", "1", "--grpo.rewards", f"format,{rewards_file}:hangs"]
    run = Run(args)
    run.wait_for((rewards_file.parent / "entered").exists, "the reward hanging")
    time.sleep(0.5)
    run.proc.send_signal(signal.SIGTERM)
    t0 = time.time()
    assert run.finish(timeout=60) == 0, run.output[-3000:]
    assert time.time() - t0 < 15, "the hung reward held the run"  # its budget is 120 s
    assert "stopped by signal during step 3, before its update" in run.output, run.output[-3000:]
    assert checkpoints(out) == ["step-1", "step-2"] and train_steps(out) == [1, 2]
    resume(args, out, rewards_file, 2)
    assert train_steps(out) == [1, 2, 3, 4]


def test_a_reward_past_its_budget_is_named_and_the_step_before_is_saved(tiny, tmp_path, rewards_file):
    out = tmp_path / "run"
    (rewards_file.parent / "hang_at").write_text("2")
    args = [*BASE, "--model.path", tiny, "--train.max_steps", "3", "--train.output_dir", str(out),
            "--train.save_every", "0", "--grpo.rewards", f"format,{rewards_file}:hangs",
            "--rewards.custom_timeout_s", "2"]
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "grpo", *args], env=ENV,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: step 2: reward 'hangs' ({rewards_file}:hangs) did not "
                                               f"return within --rewards.custom_timeout_s=2 s"), res.stderr[-3000:]
    # Step 1 is saved although save_every is 0: nothing done before the failure is lost.
    assert checkpoints(out) == ["step-1"] and train_steps(out) == [1]
    resume(args, out, rewards_file, 1)
    assert train_steps(out) == [1, 2, 3]


def resume(args: list[str], out: Path, rewards_file: Path, step: int) -> None:
    """The same command, the reward fixed, goes on from `step`'s checkpoint."""
    (rewards_file.parent / "hang_at").unlink()
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "grpo", *args], env=ENV,
                         capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{step}'}" in res.stdout


def test_a_second_signal_exits_at_once_and_an_echo_does_not(tiny, tmp_path, rewards_file):
    """`stubborn` swallows what the first signal raises in it, so the run cannot reach a safe
    point. A repeat within the window (torchrun forwarding the terminal's Ctrl-C) is the same
    request; a later one exits with 128 + signal, saving nothing."""
    out = tmp_path / "run"
    run = Run([*BASE, "--model.path", tiny, "--train.max_steps", "2", "--train.output_dir", str(out),
               "--grpo.rewards", f"format,{rewards_file}:stubborn"])
    run.wait_for((rewards_file.parent / "entered").exists, "the reward hanging")
    run.proc.send_signal(signal.SIGINT)
    time.sleep(0.2)
    run.proc.send_signal(signal.SIGTERM)  # an echo
    time.sleep(3.0)
    assert run.proc.poll() is None, run.output[-3000:]
    run.proc.send_signal(signal.SIGTERM)
    assert run.finish(timeout=20) == 128 + signal.SIGTERM
    assert "signal 15 again: exiting now, saving nothing; the last checkpoint is none" in run.output
    assert checkpoints(out) == []


# --- what a reward may do to the batch, and what it may return -----------------------------------

def test_a_reward_that_raises_is_named_with_the_row():
    def picky(completions, answer, **kwargs):
        return [float(int(a)) for a in answer]  # "x" is no integer

    (name, fn, _), = get_reward_functions([picky])
    with pytest.raises(RewardError, match=r"reward 'picky' \(.*test_run_guards\.test_a_reward_that_raises_is_"
                                          r"named_with_the_row\.<locals>\.picky\) raised ValueError: invalid literal"
                                          r".* on completion 2 of the batch \(problem 'third'\)"):
        score_completions([(name, fn, 1.0)], ["a", "b", "c", "d"],
                          [{"problem": p, "answer": a} for p, a in zip(["1st", "2nd", "third", "4th"], "12x4")],
                          [[1], [2], [3], [4]])


def test_each_reward_gets_its_own_copy_of_the_batch():
    seen = []

    def vandal(completions, completion_ids, answer, **kwargs):
        completions[:] = ["<think>x</think><answer>1</answer>"] * len(completions)
        completion_ids[0].append(99)
        answer[0] = "changed"
        return [0.0] * len(completions)

    def witness(completions, completion_ids, answer, **kwargs):
        seen.append((list(completions), [list(i) for i in completion_ids], list(answer)))
        return [0.0] * len(completions)

    texts, ids, records = ["no tags here", "none here"], [[1, 2], [3]], [{"answer": "7"}, {"answer": "8"}]
    rewards = get_reward_functions([vandal, "format", witness])
    scores = score_completions(rewards, texts, records, ids)
    assert scores[:, 1].tolist() == [0.0, 0.0]  # format scored what the model wrote
    assert seen == [(["no tags here", "none here"], [[1, 2], [3]], ["7", "8"])]
    assert texts == ["no tags here", "none here"] and ids == [[1, 2], [3]] and records[0]["answer"] == "7"


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_and_inf_from_a_reward_are_refused(value):
    def broken(completions, **kwargs):
        return [0.5, value]

    with pytest.raises(RewardError, match=rf"reward 'broken' .* returned {value!r} \(float\) for completion 1; "
                                          r"expected a finite float, or None for no opinion"):
        score_completions(get_reward_functions([broken]), ["a", "b"], [{}, {}], [[1], [2]])


def test_a_function_that_cannot_be_a_reward_is_refused_when_loaded(tiny, tmp_path):
    with pytest.raises(RewardError, match=r"reward 'system' \(posix\.system\(command\)\) cannot be called as "
                                          r"fn\(completions, \*\*columns\)"):
        get_reward_functions(["os:system"])
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "grpo", *BASE, "--model.path", tiny,
                          "--train.output_dir", str(out), "--grpo.rewards", "accuracy,os:system"],
                         env=ENV, capture_output=True, text=True, timeout=240)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-3000:]
    assert res.stderr.startswith("error: --grpo.rewards: reward 'system'")
    assert "eval step 0" not in res.stdout  # refused before the model generated anything


def test_metrics_and_samples_are_strict_json(tmp_path):
    MetricsLogger(tmp_path, enabled=True).log({"reward": math.nan, "kl": math.inf, "loss": 0.5}, step=1)
    write_jsonl(tmp_path / "samples.jsonl", [{"step": 1, "scores": [math.nan, 1.0, -math.inf]}])

    def strict(token):
        raise AssertionError(f"{token} is not JSON")
    assert json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=strict) == \
        {"step": 1, "reward": None, "kl": None, "loss": 0.5}
    assert json.loads((tmp_path / "samples.jsonl").read_text(), parse_constant=strict) == \
        {"step": 1, "scores": [None, 1.0, None]}


def test_weights_that_overflow_the_reward_stop_the_run_naming_them(tiny, tmp_path):
    """1e308 * 1 + 1e308 * 1 is inf: the step's advantages would be NaN and every update skipped.
    `always_one` gives each completion reward 1 from both functions."""
    (tmp_path / "ones.py").write_text("def always_one(completions, **kwargs):\n    return [1.0] * len(completions)\n")
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), "grpo", *BASE, "--model.path", tiny,
                          "--train.output_dir", str(tmp_path / "run"), "--train.max_steps", "1",
                          "--grpo.rewards", f"a={tmp_path / 'ones.py'}:always_one,b={tmp_path / 'ones.py'}:always_one",
                          "--grpo.reward_weights", "1e308,1e308"], env=ENV, capture_output=True, text=True, timeout=240)
    assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr[-3000:]
    assert res.stderr.startswith("error: step 1: the weighted reward of completion 0 is inf (rewards [1.0, 1.0] "
                                 "weighted by --grpo.reward_weights [1e+308, 1e+308]); scale the weights down")


def test_every_rank_of_a_torchrun_job_is_refused_by_a_held_folder(tiny, tmp_path):
    """Rank 0 takes the lock for its run; when another run holds it, every rank stops with the
    refusal (none is left waiting in a collective for rank 0)."""
    out = tmp_path / "run"
    out.mkdir()
    with FolderLock(out, "grpo"):
        res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                              str(ROOT / "train.py"), "grpo", *BASE, "--model.path", tiny,
                              "--grpo.micro_batch_size", "4", "--train.output_dir", str(out)],
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0
    assert res.stderr.count(f"in use by another run (pid {os.getpid()} on host") == 2, res.stderr[-3000:]
    assert not (out / "checkpoints").exists()
