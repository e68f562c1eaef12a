"""The command line a new user meets: --help, TRL's option names, suggestions for typos, and a
progress bar that printed lines do not tear."""
import io
import subprocess
import sys
from pathlib import Path

import pytest

from r1train.grpo.config import GRPOJobConfig
from r1train.run.config import ConfigError, parse_args
from r1train.sft.trainer import SFTJobConfig

ROOT = Path(__file__).resolve().parents[1]


def _help(*args):
    res = subprocess.run([sys.executable, str(ROOT / "train.py"), *args, "--help"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_help_lists_the_commands_and_each_command_has_a_usage_line():
    top = _help()
    assert top.startswith("usage:")
    for command in ("grpo", "sft", "rejection-sample", "distill", "pipeline"):
        assert f"\n  {command} " in top, command
    grpo = _help("grpo")
    assert grpo.startswith("usage: [torchrun --nproc_per_node=N] train.py grpo ")
    assert "--rollout.group_size (default: 8)" in grpo


def test_trl_names_are_aliases_where_the_meaning_is_the_same():
    cfg = parse_args(GRPOJobConfig, ["--num_generations", "4", "--max_completion_length", "64",
                                     "--epsilon", "0.3", "--learning_rate", "2e-6",
                                     "--grpo.prompts_per_step", "4", "--grpo.micro_batch_size", "4"])
    assert (cfg.rollout.group_size, cfg.rollout.max_new_tokens) == (4, 64)
    assert (cfg.grpo.epsilon_low, cfg.optim.lr) == (0.3, 2e-6)
    assert parse_args(SFTJobConfig, ["--max_seq_length", "1024"]).sft.max_seq_len == 1024
    # an alias of a section this command lacks is an unknown option, not a silent no-op
    with pytest.raises(ConfigError, match="unknown option --num_generations"):
        parse_args(SFTJobConfig, ["--num_generations", "4"])


@pytest.mark.parametrize("typo, hint", [
    ("--grpo.epsilonn", "did you mean --grpo.epsilon_low"),
    ("--rollout.group_sise", "did you mean --rollout.group_size"),
    ("--num_generation", "did you mean --num_generations (= --rollout.group_size)"),
])
def test_unknown_options_get_a_suggestion(typo, hint):
    with pytest.raises(ConfigError) as e:
        parse_args(GRPOJobConfig, [typo, "1"])
    assert hint in str(e.value) and len(str(e.value)) < 200  # one suggestion line, not 90 names


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_lines_said_during_a_bar_do_not_tear_it(monkeypatch, capsys):
    from r1train.run import logging as log
    err = _Terminal()
    monkeypatch.setattr(sys, "stderr", err)
    bar = log.ProgressBar(4, "grpo")
    bar.update(1, "reward=0.500")
    drawn = err.getvalue()
    log.say("step 1/4 reward=0.5")
    after = err.getvalue()[len(drawn):]
    # the bar is wiped (\r + blanks + \r) before the line and drawn again after it, with the step
    # count and the key metric
    wipe, _, redrawn = after.partition("\r\r")
    assert wipe.startswith("\r") and wipe[1:].strip(" ") == "" and len(wipe) > 10, repr(after)
    assert redrawn.startswith("grpo:") and "1/4" in redrawn and "reward=0.500" in redrawn, repr(after)
    assert capsys.readouterr().out == "step 1/4 reward=0.5\n"
    bar.close()
    assert log._BAR is None and err.getvalue().endswith("\n")


def test_a_bar_on_a_log_file_prints_whole_lines_now_and_then(monkeypatch):
    from r1train.run import logging as log
    err = io.StringIO()  # not a terminal
    monkeypatch.setattr(sys, "stderr", err)
    bar = log.ProgressBar(3, "sft", every_s=3600, start=1)  # resumed at step 1
    bar.update(1, "loss=2.000")
    assert err.getvalue() == ""  # within every_s: nothing
    bar.update(1, "loss=1.500")  # the last step: always a line
    bar.close()
    [line] = err.getvalue().splitlines()
    assert "\r" not in err.getvalue() and line.startswith("sft:") and "3/3" in line and "loss=1.500" in line


def test_the_tests_preloaded_launcher_reports_what_python_reports():
    """tests/launch.py runs most of the suite's train.py launches in processes forked from a
    server that imported torch and transformers once: a user error comes back from it as from
    `python train.py` (status, stdout and stderr)."""
    from launch import train_py

    args = ["grpo", "--grpo.epsilonn", "0.2"]
    real = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, timeout=300)
    forked = train_py(*args, timeout=300)
    assert real.returncode == 2 and "did you mean --grpo.epsilon_low" in real.stderr, real.stderr[-2000:]
    assert (forked.returncode, forked.stdout, forked.stderr) == (real.returncode, real.stdout, real.stderr)
