"""Rewards under hostile completions (issue 13, items 2, 11, 12, 13): the answer-checking worker
does not import from the current directory; an answer left unverified when the batch budget runs
out is not cached as wrong; the format, tag and language checks are linear in the completion
length and decide exactly what the tutorial's regexes decide; the batch budget is finite by
default."""
from __future__ import annotations

import itertools
import math
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import r1train.rewards.accuracy as accuracy
from r1train.rewards import (
    AnswerChecker,
    RewardConfig,
    format_reward,
    get_accuracy_reward,
    get_reward_functions,
    pop_reward_metrics,
)
from r1train.rewards.language import script_counts
from r1train.rewards.math_answer import CORRECT
from r1train.rewards.verifier_pool import VerifierPool

ROOT = Path(__file__).resolve().parents[1]
HOSTILE = "<answer>\\boxed{9^{9^{9^{9}}}}</answer>"  # sympy works on it for minutes
HALF = "<think>2/4 = 1/2</think><answer>\\frac{2}{4}</answer>"  # right for gold \frac{1}{2}


@pytest.fixture(scope="module")
def pool():
    with VerifierPool() as p:
        p.run([("1", "1", True)], timeout_s=60.0)  # a ready worker before any budget starts
        yield p


# --- item 2: the worker runs isolated from the current directory -------------------------------

def test_worker_does_not_import_a_planted_math_verify(tmp_path, monkeypatch):
    """A `math_verify.py` in the folder the user trains from would shadow the real one in a
    worker started with `python -c` (which puts the current directory first on sys.path): it
    ran there and wrote its marker, then the worker died at start-up."""
    marker = tmp_path / "planted-code-ran"
    (tmp_path / "math_verify.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.chdir(tmp_path)
    with VerifierPool() as fresh:  # a worker started from the planted folder
        checker = AnswerChecker(pool=fresh, fast_path=False, cache_size=0)
        # 2/4 = 1/2 needs math_verify itself (not a plain number): the real one answered.
        assert checker.check(["\\frac{1}{2}"], [HALF]) == [CORRECT]
    assert not marker.exists()


# --- item 11: a verdict never computed is not cached -------------------------------------------

def test_answer_abandoned_by_the_batch_budget_is_verified_next_time(pool):
    """One worker: HOSTILE holds it past the 1 s batch budget (its own bound is 60 s), so the
    right answer queued behind it is never verified and scores 0 for this batch. Asked again,
    it must be verified (1.0), not served the abandoned 0 from the cache."""
    checker = AnswerChecker(timeout_s=60.0, batch_timeout_s=1.0, fast_path=False, pool=pool)
    reward = get_accuracy_reward(checker=checker)
    pop_reward_metrics()
    assert reward([HOSTILE, HALF], answer=["5", "\\frac{1}{2}"]) == [0.0, 0.0]
    checker.batch_timeout_s = None  # time to finish now: the (restarted) worker may still be starting
    assert reward([HALF], answer=["\\frac{1}{2}"]) == [1.0]
    metrics = pop_reward_metrics()
    assert metrics["accuracy/abandoned"] == 2.0 and "accuracy/cache_hits" not in metrics


def test_timed_out_answer_is_still_cached(pool):
    """A timeout is a verdict (the answer had its whole bound): cached, so `cosine` after
    `accuracy` does not wait on the same hostile answer twice."""
    checker = AnswerChecker(timeout_s=1.0, fast_path=False, pool=pool)
    reward = get_accuracy_reward(checker=checker)
    pop_reward_metrics()
    assert reward([HOSTILE], answer=["5"]) == [0.0]
    assert reward([HOSTILE], answer=["5"]) == [0.0]
    metrics = pop_reward_metrics()
    assert metrics["accuracy/timeouts"] == 1.0 and metrics["accuracy/cache_hits"] == 1.0


# --- item 13: the batch budget is finite by default --------------------------------------------

class _RecordingPool:
    """Stands in for the shared pool: records the budget it is given, answers WRONG."""

    def __init__(self):
        self.budgets = []

    def run(self, jobs, timeout_s, n_workers=1, budget_s=None):
        self.budgets.append(budget_s)
        return [1] * len(jobs)

    def pop_events(self):
        return {}


def test_default_config_bounds_each_batch(monkeypatch):
    """Built from the default RewardConfig, the accuracy reward hands the pool a finite batch
    budget (was None: 256 hostile answers took 708 s in one step)."""
    recorder = _RecordingPool()
    monkeypatch.setattr(accuracy, "shared_pool", lambda: recorder)
    [(_, reward, _)] = get_reward_functions(["accuracy"], RewardConfig())
    assert reward(["<answer>\\frac{3}{4}</answer>"], answer=["1"]) == [0.0]
    [budget] = recorder.budgets
    assert budget is not None and math.isfinite(budget) and budget > 0
    assert AnswerChecker().batch_timeout_s == budget  # the same default without a config


# --- item 12: linear format, tag and language checks, equal to the tutorial's regexes ----------

TUTORIAL_FORMAT = re.compile(r"^<think>.*?</think>\s*<answer>.*?</answer>$", re.DOTALL)
FORMAT_PIECES = ["<think>", "</think>", "<answer>", "</answer>", " ", "\n", "x"]


def test_format_equals_the_tutorial_regex_on_every_short_arrangement():
    """Every sequence of up to 4 pieces between each of 2 openings and 3 endings (16,806 texts:
    tags out of order, repeated, missing, whitespace between and after), and longer random ones."""
    middles = ["".join(p) for n in range(5) for p in itertools.product(FORMAT_PIECES, repeat=n)]
    rng = random.Random(0)
    middles += ["".join(rng.choices(FORMAT_PIECES, k=rng.randint(5, 14))) for _ in range(3000)]
    texts = [start + middle + end for start in ("", "<think>")
             for end in ("", "</answer>", "</answer>\n") for middle in middles]
    expected = [1.0 if TUTORIAL_FORMAT.match(text) else 0.0 for text in texts]
    assert 1000 < sum(expected) < len(texts) - 1000  # both outcomes are well represented
    for text, got, want in zip(texts, format_reward(texts), expected):
        assert got == want, repr(text)


def test_format_hand_worked_cases():
    assert format_reward([
        "<think>a</think><answer>b</answer>",       # 1: the format
        "<think>a</think> \n <answer>b</answer>\n",  # 1: whitespace between, one final newline
        "<think>a</think><answer>b</answer>\n\n",    # 0: `$` allows one final newline only
        "<think></think><answer></answer>",          # 1: empty parts
        "<think><answer></think></answer>",          # 0: no </think> followed by <answer>
        " <think>a</think><answer>b</answer>",       # 0: must open with <think>
    ]) == [1.0, 1.0, 0.0, 1.0, 0.0, 0.0]


def _old_script_counts(text: str) -> dict[str, int]:
    """language.script_counts as it was: the noise regex run on the raw text."""
    from r1train.rewards import language
    letters = "".join(language._LETTER_RE.findall(language._NOISE_RE.sub(" ", text)))
    counts = {name: len(rx.findall(letters)) for name, rx in language._SCRIPT_RES.items()}
    counts["other"] = len(letters) - sum(counts.values())
    return counts


LANGUAGE_PIECES = ["$", "$$", "\\(", "\\)", "\\[", "\\]", "\\frac", "\\", "ab", "中", " ", "<think>"]


def test_language_counts_equal_the_unblanked_regex():
    """Every sequence of up to 4 pieces (22,621 texts: openers with and without closers, in any
    order, inside and outside `$...$`), and some longer random ones."""
    texts = ["".join(p) for n in range(5) for p in itertools.product(LANGUAGE_PIECES, repeat=n)]
    rng = random.Random(0)
    texts += ["".join(rng.choices(LANGUAGE_PIECES, k=rng.randint(5, 16))) for _ in range(5000)]
    for text in texts:
        assert script_counts(text) == _old_script_counts(text), repr(text)


HOSTILE_TEXT_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[1])
    from r1train.rewards import format_reward, language_consistency_reward, tag_count_reward
    think_answer = "<think>" + "</think><answer>" * 48000   # 768,007 characters
    print(format_reward([think_answer]), tag_count_reward([think_answer]),
          language_consistency_reward(["\\\\(" * 384000, "\\\\[" * 384000 + "ab"],
                                      problem=["hello", "hello"]))
""")


def test_text_rewards_on_hostile_completions_are_linear():
    """768k-character completions that made the old regexes scan to the end from every tag.

    No timing in the assertion but one bound on the whole subprocess, sized so it cannot flake
    either way: the linear checks take about 0.05 s here (bench/bench_rewards.py), so 60 s is
    > 1000x headroom for a slow or loaded machine; the old quadratic regex needed about 9.5 s
    for 96k characters, so about 600 s for the format reward alone at 768k (8x the length, 64x
    the time), and a machine 10x faster than this one would still need 60 s.
    Hand-worked values: the first text opens with <think> but never closes </answer> (format
    0); its <think> is the one opening tag (0.25) but </think> and <answer> occur 48,000 times
    and </answer> never (tag_count 0.25). The openers are blanked and no letter is left (None);
    `ab` after the brackets is Latin like the prompt "hello" (1.0)."""
    res = subprocess.run([sys.executable, "-c", HOSTILE_TEXT_SCRIPT, str(ROOT)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split("\n")[0] == "[0.0] [0.25] [None, 1.0]"
