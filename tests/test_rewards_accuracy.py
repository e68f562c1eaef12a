"""rewards accuracy: answer and gold forms, the tutorial's bare-answer bug, time bounds on
hostile input from the main thread and a worker thread, worker crashes, metrics, and the rates
on the committed GSM8K / AIME 2024 / AMC 2023 samples (full files: bench/reward_rates.py)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import r1train.rewards.verifier_pool as verifier_pool
from r1train.rewards import AnswerChecker, RewardConfig, get_accuracy_reward, get_reward_functions, pop_reward_metrics
from r1train.rewards.verifier_pool import VerifierPool, VerifierStartupError

ASSETS = Path(__file__).parent / "assets"
HOSTILE = "<answer>\\boxed{9^{9^{9^{9}}}}</answer>"
BOUND_S = 1.5


@pytest.fixture(scope="module")
def pool():
    with VerifierPool() as p:
        p.run([("1", "1", True)], timeout_s=60.0)  # start-up is not part of any bound below
        yield p


def rewards(pool, fast_path=True, policy="neutral", timeout_s=5.0, **kw):
    checker = AnswerChecker(timeout_s=timeout_s, fast_path=fast_path, pool=pool, **kw)
    return get_accuracy_reward(policy, checker)


def read_jsonl(name):
    return [json.loads(line) for line in (ASSETS / name).read_text().splitlines()]


# ---------------------------------------------------------------------------
# forms of the answer and of the gold
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("fast_path", [True, False])
def test_answer_forms(pool, fast_path):
    fn = rewards(pool, fast_path)
    comps = [
        "<think>r</think><answer>14</answer>",                   # bare -> 1
        "<think>r</think><answer>$14$</answer>",                 # $...$ -> 1
        "<think>r</think><answer>\\boxed{14}</answer>",          # boxed in tags -> 1
        "So the result is \\boxed{14}.",                         # boxed, no tags -> 1
        "<answer>14 dollars</answer>",                           # number in words -> 1
        "<answer>1,4</answer>",                                  # not 14 -> 0
        "<answer>15</answer>",                                   # wrong -> 0
        "<answer>3</answer> wait <answer>14</answer>",           # last block counts -> 1
        "<answer>14</answer> wait <answer>3</answer>",           # last block counts -> 0
        "The answer is 14",                                      # no tags, no box -> 0
        "<answer>14",                                            # unclosed tag -> 0
    ]
    expected = [1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert fn(comps, answer=["14"] * len(comps)) == expected


def test_bare_answer_in_tags_tutorial_bug(pool):
    # Tutorial: parse(content, LatexExtractionConfig(try_extract_without_anchor=False, ...))
    # finds nothing in "<answer>14</answer>" (no $, no \boxed), so a correct bare answer scored 0.
    from math_verify import LatexExtractionConfig, parse
    tutorial = parse("<answer>14</answer>", extraction_mode="first_match",
                     extraction_config=[LatexExtractionConfig(boxed_match_priority=0,
                                                              try_extract_without_anchor=False)])
    assert tutorial == []
    fn = rewards(pool, fast_path=False)  # through math_verify, not the Decimal shortcut
    assert fn(["<answer>14</answer>", "<answer>\\frac{1}{2}</answer>"],
              answer=["14", "0.5"]) == [1.0, 1.0]


@pytest.mark.parametrize("fast_path", [True, False])
def test_a_numeric_question_answered_with_the_calculation_is_wrong(pool, fast_path):
    """The reward hack SmolLM2 found under R1-Zero GRPO (bench/RESULTS.md): the question's own
    expression in <answer>, which sympy evaluates to the gold. A number gold wants the value."""
    fn = rewards(pool, fast_path)
    comps = ["<answer>25 + 10 - 7</answer>", "<answer> 25 + 10 - 7 </answer>", "<answer>$(25 + 10) - 7$</answer>",
             "<answer>\\boxed{4 \\times 7}</answer>", "<answer>28</answer>", "<answer>28.0</answer>",
             "<answer>56/2</answer>"]
    # the calculation -> 0 however it is written; the value -> 1; a fraction is a value -> 1
    assert fn(comps, answer=["28"] * len(comps)) == [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    # Where the gold is itself an expression, math_verify's equivalence decides as before.
    assert fn(["<answer>1 + 1</answer>"], answer=["1 + 1"]) == [1.0]


def test_symbolic_equivalence(pool):
    fn = rewards(pool)
    comps = ["<answer>0.5</answer>", "<answer>1/2</answer>", "<answer>\\dfrac{2}{4}</answer>",
             "<answer>\\frac{1}{3}</answer>", "<answer>2\\sqrt{3}</answer>",
             "<answer>\\sqrt{12}</answer>", "<answer>x = 5</answer>"]
    golds = ["\\frac{1}{2}"] * 4 + ["\\sqrt{12}", "2\\sqrt{3}", "5"]
    # 0.5 = 1/2 = 2/4; 1/3 != 1/2; 2 sqrt(3) = sqrt(12) both ways; x = 5 -> its right side 5
    assert fn(comps, answer=golds) == [1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0]


def test_gold_forms(pool):
    fn = rewards(pool)
    worked = "We add: $3 + 4 = 7$, so the total is $\\boxed{7}$."
    cols = {
        # answer column first when it is a non-empty string; else the solution column
        "answer": ["7", "", "", None, 27.0, "025"],
        "solution": ["ignored", worked, "3 + 4 = <<3+4=7>>7\n#### 7", "#### 1,000", "", ""],
    }
    comps = ["<answer>7</answer>", "<answer>7</answer>", "<answer>$7$</answer>",
             "<answer>1000</answer>", "<answer>27</answer>", "<answer>25</answer>"]
    # worked solution -> boxed 7; GSM8K "#### 7"; "#### 1,000" = 1000; AMC float 27.0 -> "27";
    # AIME "025" = 25
    assert fn(comps, **cols) == [1.0] * 6
    with pytest.raises(ValueError, match="'answer' or 'solution'"):
        fn(comps, problem=["q"] * 6)


def test_unparseable_gold_policies_and_metrics(pool):
    pop_reward_metrics()
    comps = ["<answer>1</answer>", "<answer>1</answer>", "", "no tags"]
    golds = ["", "yes", "1", "1"]
    # "" and "yes" (a word, no math) cannot be parsed -> 0.5 (neutral) / None (skip);
    # "" and "no tags" have no answer -> 0.0
    assert rewards(pool)(comps, answer=golds) == [0.5, 0.5, 0.0, 0.0]
    assert rewards(pool, policy="skip")(comps, answer=golds) == [None, None, 0.0, 0.0]
    metrics = pop_reward_metrics()
    assert metrics["accuracy/gold_unparseable"] == 4.0  # two per call, two calls
    assert metrics["accuracy/no_answer"] == 4.0
    assert pop_reward_metrics() == {}
    with pytest.raises(ValueError, match="unparseable_gold"):
        get_accuracy_reward("drop")


def test_accuracy_survives_edge_inputs(pool):
    fn = rewards(pool)
    comps = ["", "no tags at all", "<think>ünïcödé 思考</think><answer>七</answer>",
             [{"role": "assistant", "content": "<think>x</think><answer>7</answer>"}],
             [{"role": "assistant", "content": None}], [], "<answer>", "\x00\ud800"]
    assert fn(comps, answer=["7"] * 8, unrelated=list(range(8))) == \
        [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]


# ---------------------------------------------------------------------------
# time bounds, crashes, pool
# ---------------------------------------------------------------------------

def _timed_hostile(pool):
    """The hostile answer through the accuracy reward: (its score, seconds, the pool's workers before)."""
    fn = rewards(pool, timeout_s=BOUND_S)
    pool.run([("1", "1", True)], timeout_s=60.0)  # wait for a ready worker before the clock
    before = list(pool._workers)
    start = time.monotonic()
    out = fn([HOSTILE], answer=["5"])
    return out, time.monotonic() - start, before


def _assert_bounded(out, elapsed, before, after):
    """What a bounded hostile answer leaves behind, in events rather than a window of seconds
    (which a loaded machine overruns): the job ran into its bound and was scored a timeout; the
    call then neither waited for the computation (the worker that ran it was killed) nor for its
    replacement's start-up (a replacement that started in the background, not yet seen ready: only
    a call reading its pipe marks it so)."""
    assert out == [0.0]
    # The deadline counts from the job's send, after the clock started: never under the bound.
    assert elapsed >= BOUND_S, elapsed
    # A call that waited for 9^9^9^9 would not come back at all; 60 s is past any stall of a
    # loaded machine.
    assert elapsed < BOUND_S + 60, elapsed
    metrics = pop_reward_metrics()
    assert metrics["accuracy/timeouts"] == 1.0 and metrics["accuracy/worker_restarts"] == 1.0
    ran, *others = before  # one job: worker 0 ran it
    assert ran.proc.returncode == -signal.SIGKILL
    assert after[0] is not ran and not after[0].ready and after[1:] == others


def test_hostile_answer_bounded_on_main_thread(pool):
    assert threading.current_thread() is threading.main_thread()
    pop_reward_metrics()
    out, elapsed, before = _timed_hostile(pool)
    _assert_bounded(out, elapsed, before, list(pool._workers))


def test_hostile_answer_bounded_on_worker_thread(pool):
    pop_reward_metrics()
    box = []
    thread = threading.Thread(target=lambda: box.append(_timed_hostile(pool)), daemon=True)
    thread.start()
    thread.join(timeout=BOUND_S + 60)
    assert not thread.is_alive(), "accuracy reward hung on a worker thread"
    _assert_bounded(*box[0], list(pool._workers))


def test_batch_continues_after_a_timeout(pool):
    # the hostile item sits between normal ones: they are requeued on a fresh worker
    fn = rewards(pool, fast_path=False, timeout_s=BOUND_S)
    comps = ["<answer>$5$</answer>", HOSTILE, "<answer>\\frac{10}{2}</answer>",
             "<answer>6</answer>"]
    assert fn(comps, answer=["5"] * 4) == [1.0, 0.0, 1.0, 0.0]


def test_crashed_worker_is_replaced(pool):
    pool.run([("2", "2", True)], timeout_s=30.0)
    for w in pool._workers:  # kill every idle worker behind the pool's back
        os.kill(w.proc.pid, signal.SIGKILL)
        w.proc.wait()
    pool.pop_events()
    assert pool.run([("2", "2", True), ("2", "3", True)], timeout_s=30.0) == [0, 1]
    assert pool.pop_events()["worker_crashes"] >= 1


def test_pool_matches_single_worker(pool):
    jobs = [(str(k), f"\\frac{{{2 * k}}}{{2}}", True) for k in range(12)]
    jobs += [(str(k), str(k + 1), True) for k in range(12)]
    single = pool.run(jobs, timeout_s=30.0, n_workers=1)
    assert single == [0] * 12 + [1] * 12  # k = 2k/2 correct; k vs k + 1 wrong
    assert pool.run(jobs, timeout_s=30.0, n_workers=2) == single


def test_worker_that_cannot_start_raises_instead_of_hanging(monkeypatch):
    monkeypatch.setattr(verifier_pool, "_WORKER_FILE", "/nonexistent/math_answer.py")
    with VerifierPool(start_timeout_s=30.0) as flaky:
        with pytest.raises(VerifierStartupError, match="start-up"):
            flaky.run([("1", "1", True)], timeout_s=1.0)
        monkeypatch.undo()  # the broken worker was dropped: the next call starts a good one
        assert flaky.run([("1", "1", True)], timeout_s=30.0) == [0]


def test_worker_starts_while_parent_torch_has_threads():
    # Workers are fork+exec'd fresh interpreters: live intra-op threads (and the locks they
    # hold) in the parent cannot deadlock them, as a plain fork() could.
    torch = pytest.importorskip("torch")
    torch.set_num_threads(2)
    stop = threading.Event()

    def spin():
        x = torch.randn(128, 128)
        while not stop.is_set():
            x @ x
            time.sleep(0.002)
    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        with VerifierPool() as fresh:
            box = []
            caller = threading.Thread(
                target=lambda: box.append(fresh.run([("2", "\\frac{4}{2}", True)], 30.0)))
            caller.start()
            caller.join(timeout=90)
            assert box == [[0]]  # 4/2 = 2: CORRECT
    finally:
        stop.set()
        spinner.join()


EXIT_SCRIPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from r1train.rewards import AnswerChecker, get_accuracy_reward
from r1train.rewards.verifier_pool import shared_pool
fn = get_accuracy_reward(checker=AnswerChecker(fast_path=False))
assert fn(["<answer>$1$</answer>"], answer=["1"]) == [1.0]
print(" ".join(str(w.proc.pid) for w in shared_pool()._workers), flush=True)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _gone(pid):
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state == "Z"  # exited, waiting to be reaped by its new parent


@pytest.mark.parametrize("how", ["exit", "kill"])
def test_workers_end_with_the_trainer(how, tmp_path):
    # normal exit: atexit closes the pool; SIGKILL: no atexit, workers see EOF and leave
    script = tmp_path / "trainer.py"
    script.write_text(EXIT_SCRIPT.format(root=str(Path(__file__).parents[1])))
    proc = subprocess.run([sys.executable, str(script), how], capture_output=True, text=True,
                          timeout=120)
    pids = [int(p) for p in proc.stdout.split()]
    assert pids, proc.stderr
    deadline = time.monotonic() + 10
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in pids), f"workers {pids} outlived the trainer ({how})"


def test_registry_accuracy_and_cosine_share_verdicts():
    pop_reward_metrics()
    fns = dict((n, f) for n, f, _ in get_reward_functions(
        ["accuracy", "cosine"], RewardConfig(accuracy_fast_path=False)))
    comps, gold = ["<answer>\\frac{6}{3}</answer>"], ["2"]
    assert fns["accuracy"](comps, answer=gold) == [1.0]
    # correct, L = 8 + 11 + 9 = 28 characters of 1000: 0.8 + 0.1 (1 + cos(0.028 pi))
    assert fns["cosine"](comps, answer=gold) == \
        pytest.approx([0.8 + 0.1 * (1 + math.cos(0.028 * math.pi))])
    metrics = pop_reward_metrics()
    assert metrics["accuracy/verified"] == 1.0 and metrics["accuracy/cache_hits"] == 1.0


# ---------------------------------------------------------------------------
# rates on the committed samples
# ---------------------------------------------------------------------------

def _rates(fn, golds, answer_forms, wrong):
    comps, wrongs, cols = [], [], []
    for gold, shown in golds:
        for form in answer_forms:
            comps.append(f"<think>Work it out.</think><answer>{form.format(shown)}</answer>")
            wrongs.append(f"<think>Work it out.</think><answer>{form.format(wrong(shown))}"
                          f"</answer>")
            cols.append(gold)
    right = fn(comps, answer=cols)
    bad = fn(wrongs, answer=cols)
    return sum(r == 1.0 for r in right) / len(right), sum(r == 0.0 for r in bad) / len(bad)


def _plus_one(shown):
    return str(int(shown.replace(",", "")) + 1)


@pytest.mark.parametrize("fast_path", [True, False])
def test_rates_on_samples(pool, fast_path):
    fn = rewards(pool, fast_path)
    gsm = [r["answer"].rsplit("####", 1)[1].strip() for r in read_jsonl("gsm8k_test_sample.jsonl")]
    ok, wrong = _rates(fn, [(g, g) for g in gsm], ["{}"], _plus_one)
    assert ok >= 0.99 and wrong >= 0.99, ("gsm8k", ok, wrong)
    forms = ["{}", "${}$", "\\boxed{{{}}}"]
    aime = [r["answer"] for r in read_jsonl("aime24_sample.jsonl")]
    amc = [f"{r['answer']:g}" for r in read_jsonl("amc23_sample.jsonl")]
    for name, golds in (("aime24", aime), ("amc23", amc)):
        ok, wrong = _rates(fn, [(g, g) for g in golds], forms, _plus_one)
        assert ok >= 0.99 and wrong >= 0.99, (name, ok, wrong)


def test_gsm8k_worked_solution_as_gold(pool):
    # a loader that left `answer` empty: the gold is the worked solution ending in "#### N"
    rows = read_jsonl("gsm8k_test_sample.jsonl")
    fn = rewards(pool)
    finals = [r["answer"].rsplit("####", 1)[1].strip() for r in rows]
    out = fn([f"<answer>{f}</answer>" for f in finals], answer=[""] * len(rows),
             solution=[r["answer"] for r in rows])
    assert sum(out) / len(out) >= 0.99
