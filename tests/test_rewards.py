"""rewards: format, tag_count, reasoning_steps, cosine, repetition, language, overlong,
the registry and the edge inputs every reward must survive. Expected values are derived by hand
in the comments. Accuracy itself (math_verify, timeouts, datasets): test_rewards_accuracy.py."""
from __future__ import annotations

import math

import pytest

from r1train.rewards import (
    REWARD_NAMES,
    RewardConfig,
    format_reward,
    get_cosine_scaled_reward,
    get_repetition_penalty_reward,
    get_reward_functions,
    get_soft_overlong_punishment,
    language_consistency_reward,
    reasoning_steps_reward,
    tag_count_reward,
)


def chat(text):
    return [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------------------
# format / tag_count / reasoning_steps
# ---------------------------------------------------------------------------


def test_format_reward_strict_pattern():
    completions = [
        "<think>a\nb</think><answer>4</answer>",        # canonical -> 1
        "<think>a</think> \n <answer>4</answer>",       # \s* between the blocks -> 1
        "<think>a</think><answer>4</answer>\n",         # `$` allows one final newline -> 1
        "x<think>a</think><answer>4</answer>",          # text before <think> -> 0
        "<think>a</think><answer>4</answer>",           # (chat form, below) -> 1
        "<answer>4</answer>",                           # no think block -> 0
        "<think>a</think>",                             # no answer block -> 0
    ]
    inputs = completions[:4] + [chat(completions[4])] + completions[5:]
    assert format_reward(inputs) == [1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]


def test_format_reward_rejects_text_after_answer_tutorial_multiline_looseness():
    # Tutorial passed re.MULTILINE: `$` then matches at the end of the </answer> line, so a
    # completion that keeps talking after its answer passed. Strict: 0.
    assert format_reward(["<think>a</think><answer>4</answer>\nmore text"]) == [0.0]


def test_tag_count_partial_credit():
    completions = [
        "<think>r</think><answer>4</answer>",            # all four well placed -> 1.0
        "<think>r</think>",                              # <think>, </think> -> 0.5
        "<answer>4</answer>",                            # <answer>, </answer> -> 0.5
        "so <think>r</think><answer>4</answer> ok",      # <think> not first, </answer> not
                                                         # last -> 0.5
        "<think>r</think><answer>4</answer><think>",     # <think> twice: 0; </think> followed
                                                         # by <think>: 0; <answer> followed by
                                                         # <think>: 0; </answer> not last: 0 -> 0
        "<think><answer>4</answer></think>",             # <think> 0.25; </think> 0.25 (no
                                                         # <think> after it); <answer> has
                                                         # </think> after it: 0; </answer> not
                                                         # last: 0 -> 0.5
        "plain text",                                    # -> 0
    ]
    assert tag_count_reward(completions) == [1.0, 0.5, 0.5, 0.5, 0.0, 0.5, 0.0]


def test_reasoning_steps_counts_markers():
    # "Step 1:" + "Step 2:" -> 2 markers -> 2/3
    two = "Step 1: add.\nStep 2: divide."
    # "First," "Next," "Finally," -> 3 -> 1.0; with "1." and "\n-" too -> 5 -> min(1, 5/3) = 1.0
    many = "1. First, add.\n- Next, divide.\nFinally, done."
    # one "\n*" bullet -> 1/3
    one = "Plan:\n* add"
    assert reasoning_steps_reward([two, many, one, "no steps"]) == \
        [pytest.approx(2 / 3), 1.0, pytest.approx(1 / 3), 0.0]


# ---------------------------------------------------------------------------
# cosine (plain-number answers: settled by the in-process fast path, no worker)
# ---------------------------------------------------------------------------

RIGHT = "<answer>7</answer>"   # 18 characters
WRONG = "<answer>8</answer>"


def test_cosine_values_by_token_length():
    # r = lo + (hi - lo)(1 + cos(pi p)) / 2 with p = min(1, L / 1000)
    # correct (lo .8, hi 1):  L=0 -> 1.0; L=500 -> .8 + .2 * .5 = 0.9; L=1000 -> 0.8
    # wrong (lo -.1, hi -.5): L=0 -> -0.5; L=500 -> -.1 - .4 * .5 = -0.3; L=1000 -> -0.1
    fn = get_cosine_scaled_reward()
    comps = [RIGHT] * 3 + [WRONG] * 3
    ids = [[], [0] * 500, [0] * 1000] * 2
    out = fn(comps, answer=["7"] * 6, completion_ids=ids)
    assert out == pytest.approx([1.0, 0.9, 0.8, -0.5, -0.3, -0.1], abs=1e-12)


def test_cosine_needs_no_accuracy_rewards_argument_tutorial_bug():
    # Tutorial: cosine_scaled_reward(completions, solution, accuracy_rewards, **kw), and no
    # trainer passes accuracy_rewards -> TypeError. Ours computes correctness itself.
    fn = get_cosine_scaled_reward()
    out = fn([RIGHT, WRONG], solution=["#### 7", "#### 7"])
    # no completion_ids -> characters: L = 18, p = 0.018, (1 + cos(0.018 pi)) / 2 = 0.99920...
    half = (1 + math.cos(math.pi * 0.018)) / 2
    assert out == pytest.approx([0.8 + 0.2 * half, -0.1 - 0.4 * half], abs=1e-12)


def test_cosine_measures_tokens_not_characters_tutorial_bug():
    # Tutorial: gen_len = len(content), characters, whatever the tokenizer. Same text, token
    # lengths 0 and 1000 -> 1.0 and 0.8 (with characters both would be 18 -> equal).
    fn = get_cosine_scaled_reward()
    out = fn([RIGHT, RIGHT], answer=["7", "7"], completion_ids=[[], [1] * 1000])
    assert out == pytest.approx([1.0, 0.8], abs=1e-12)


def test_cosine_clamps_progress_beyond_max_len():
    # Unclamped, L = 2000 gives cos(2 pi) = 1: a very long correct answer would score 1.0 like
    # an empty one. Clamped p = 1: 0.8 (correct), -0.1 (wrong).
    fn = get_cosine_scaled_reward()
    out = fn([RIGHT, WRONG], answer=["7", "7"], completion_ids=[[0] * 2000] * 2)
    assert out == pytest.approx([0.8, -0.1], abs=1e-12)


def test_cosine_length_unit_and_gold_policy():
    chars = get_cosine_scaled_reward(max_len=36, length_unit="chars")
    # chars ignores completion_ids: L = 18 of 36 -> p = 0.5 -> 0.9
    assert chars([RIGHT], answer=["7"], completion_ids=[[0] * 999]) == pytest.approx([0.9])
    with pytest.raises(ValueError, match="completion_ids"):
        get_cosine_scaled_reward(length_unit="tokens")([RIGHT], answer=["7"])
    # unparseable gold "" under neutral -> 0.0, under skip -> None
    assert get_cosine_scaled_reward()([RIGHT], answer=[""]) == [0.0]
    assert get_cosine_scaled_reward(unparseable_gold="skip")([RIGHT], answer=[""]) == [None]
    with pytest.raises(ValueError, match="max_len"):
        get_cosine_scaled_reward(max_len=0)


# ---------------------------------------------------------------------------
# repetition penalty
# ---------------------------------------------------------------------------


def test_repetition_factory_returns_the_reward_tutorial_bug():
    # Tutorial: `return get_repetition_penalty_reward` (the factory itself).
    fn = get_repetition_penalty_reward(ngram_size=3, max_penalty=-0.1)
    assert fn is not get_repetition_penalty_reward
    # "a b c a b c": trigrams abc, bca, cab, abc -> total 4, unique 3 -> -0.1 * (1 - 3/4)
    assert fn(["a b c a b c"]) == pytest.approx([-0.025])


def test_repetition_values():
    fn = get_repetition_penalty_reward(ngram_size=2, max_penalty=-1.0)
    # "x x x x": bigrams (x,x) * 3 -> unique 1 of 3 -> -(1 - 1/3) = -2/3
    # "A a b": lowercased "a a b" -> (a,a), (a,b) -> unique 2 of 2 -> 0
    # "one": fewer words than n -> 0; "" -> 0
    assert fn(["x x x x", "A a b", "one", ""]) == pytest.approx([-2 / 3, 0.0, 0.0, 0.0])


def test_repetition_rejects_positive_penalty():
    with pytest.raises(ValueError, match="max_penalty"):
        get_repetition_penalty_reward(max_penalty=0.5)
    with pytest.raises(ValueError, match="ngram_size"):
        get_repetition_penalty_reward(ngram_size=0)


# ---------------------------------------------------------------------------
# soft overlong (DAPO Eq. 13)
# ---------------------------------------------------------------------------


def test_soft_overlong_piecewise():
    # L_max = 10, L_cache = 4 -> 0 up to 6, then (6 - L) / 4, -1 beyond 10:
    # L=5 -> 0; 6 -> 0; 8 -> -0.5; 10 -> -1; 11 -> -1
    fn = get_soft_overlong_punishment(max_completion_length=10, cache_length=4)
    ids = [[0] * n for n in (5, 6, 8, 10, 11)]
    assert fn(["x"] * 5, completion_ids=ids) == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])
    # character fallback: "abcdefg" has 7 characters -> (6 - 7) / 4 = -0.25
    assert fn(["abcdefg"]) == pytest.approx([-0.25])
    with pytest.raises(ValueError, match="cache_length"):
        get_soft_overlong_punishment(max_completion_length=4, cache_length=4)


# ---------------------------------------------------------------------------
# language consistency
# ---------------------------------------------------------------------------

EN_PROMPT = [{"role": "system", "content": "Answer in tags."},
             {"role": "user", "content": "How many eggs are left?"}]
ZH_PROMPT = [{"role": "system", "content": "Answer in tags."},
             {"role": "user", "content": "还剩下多少个鸡蛋？"}]


def test_language_consistency_shares():
    comps = [
        "<think>Three eggs are left.</think><answer>3</answer>",  # Latin only -> 1.0
        "<think>还剩三个。</think><answer>3</answer>",              # CJK only -> 0.0
        "<think>Left 还剩</think><answer>3</answer>",              # 4 Latin + 2 CJK -> 4/6
        "<think>$\\frac{x}{y}$ 还剩</think>",                      # math removed: 2 CJK -> 0.0
    ]
    out = language_consistency_reward(comps, prompt=[EN_PROMPT] * 4)
    assert out == pytest.approx([1.0, 0.0, 4 / 6, 0.0])
    # Chinese prompt: the same completions score the CJK share: 0, 1, 2/6, 1
    out = language_consistency_reward(comps, prompt=[ZH_PROMPT] * 4)
    assert out == pytest.approx([0.0, 1.0, 2 / 6, 1.0])


def test_language_consistency_falls_back_to_problem_and_abstains():
    # no prompt column -> `problem`; a problem without letters -> None; a completion without
    # letters -> None (share undefined)
    out = language_consistency_reward(["eggs", "eggs", "<answer>3</answer>"],
                                      problem=["还剩多少？", "1 + 1 = ?", "How many?"])
    assert out == [0.0, None, None]


# ---------------------------------------------------------------------------
# registry, config, and inputs every reward must survive
# ---------------------------------------------------------------------------


def test_registry_names_weights_and_errors():
    rewards = get_reward_functions(["format", "tag_count"], weights=[2.0, 0.5])
    assert [(n, w) for n, _, w in rewards] == [("format", 2.0), ("tag_count", 0.5)]
    assert [w for _, _, w in get_reward_functions("format,cosine")] == [1.0, 1.0]
    with pytest.raises(ValueError, match="valid names.*accuracy"):
        get_reward_functions(["accuracy", "bogus"])
    with pytest.raises(ValueError, match="weights has 1"):
        get_reward_functions(["format", "tag_count"], weights=[1.0])
    with pytest.raises(ValueError, match="unparseable_gold"):
        RewardConfig(unparseable_gold="ignore")
    with pytest.raises(ValueError, match="repetition_max_penalty"):
        RewardConfig(repetition_max_penalty=0.1)


def test_registry_builds_from_config():
    config = RewardConfig(cosine_max_len=36, length_unit="chars", repetition_ngram_size=1,
                          repetition_max_penalty=-1.0, overlong_max_length=20,
                          overlong_cache_length=4)
    fns = {n: fn for n, fn, _ in get_reward_functions(list(REWARD_NAMES), config)}
    assert fns["cosine"]([RIGHT], answer=["7"]) == pytest.approx([0.9])  # 18/36 -> 0.9
    assert fns["repetition_penalty"](["a a"]) == pytest.approx([-0.5])   # unigrams: 1 of 2
    # 18 characters, L_max 20, L_cache 4 -> (16 - 18) / 4 = -0.5
    assert fns["soft_overlong"]([RIGHT]) == pytest.approx([-0.5])


@pytest.mark.parametrize("name", [n for n in REWARD_NAMES if n != "accuracy"])
def test_every_reward_survives_edge_inputs(name):
    # accuracy has the same check in test_rewards_accuracy.py, next to its other worker tests.
    _, fn, _ = get_reward_functions([name])[0]
    comps = ["", "no tags at all", "<think>ünïcödé 思考 мысль</think><answer>7</answer>",
             chat("<think>x</think><answer>7</answer>"), chat(""), [], "<answer>", "\x00\ud800"]
    n = len(comps)
    out = fn(comps, answer=["7"] * n, solution=[""] * n, problem=["Q?"] * n,
             prompt=[EN_PROMPT] * n, unrelated_column=list(range(n)))
    assert len(out) == n
    assert all(v is None or (isinstance(v, float) and math.isfinite(v)) for v in out)


def test_bad_completion_types_raise_clear_errors():
    with pytest.raises(ValueError, match=r"completions\[1\]"):
        format_reward(["ok", 42])
    with pytest.raises(ValueError, match="single string"):
        format_reward("<think>a</think><answer>b</answer>")
    with pytest.raises(ValueError, match="column 'completion_ids' has 1 items"):
        get_soft_overlong_punishment(10, 4)(["a", "b"], completion_ids=[[1]])
