"""Rewards (docs/algorithm.md §5.1): answer extraction, math-verify grading, the time-limited Grader, every
reward function against hand-computed values, weighted sums and the registry.

Rewards take decoded text, so no tokenizer is involved here.
"""

from __future__ import annotations

import math
import os
import time

import numpy as np
import pytest

from gtpo_jax.rewards import (
    GradeResult,
    Grader,
    RewardInput,
    compute_rewards,
    extract_boxed,
    get_reward,
    grade_answer,
    register_reward,
    registered_rewards,
)


def scripted_grade(text: str, gold: str) -> GradeResult:
    """Injected grade_fn (top level, so workers can unpickle it): `hang`, `crash` and `raise`
    misbehave; anything else is right iff it equals the gold."""
    if text == "hang":
        time.sleep(60)
    if text == "crash":
        os._exit(3)
    if text == "raise":
        raise RuntimeError("grader bug")
    return GradeResult(text == gold, "ok", text)


@pytest.fixture(scope="module")
def grader():
    with Grader(num_workers=2, timeout_s=10.0) as g:
        yield g


# -- extraction ----------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
    (r"\boxed{\frac{\sqrt{3}}{2}} done", r"\frac{\sqrt{3}}{2}"),  # nested braces
    (r"first \boxed{1} then \boxed{2} finally \boxed{ 3 }", "3"),  # the last box, stripped
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are content
    (r"\boxed{\left\{ x \right.}", r"\left\{ x \right."),  # an unbalanced escaped brace
    (r"\boxed {7}", "7"),
    (r"\fbox{8}", "8"),
    (r"\boxed{4} and then a cut \boxed{\frac{1}{", "4"),  # an unclosed box is skipped
    (r"\boxed 5", None),  # no braces: not an answer
    ("the answer is 5", None),
    (r"\boxed{}", ""),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# -- math-verify equivalence ---------------------------------------------------------------------

EQUIVALENT = [
    (r"\boxed{0.5}", r"\frac{1}{2}"),
    (r"\boxed{\dfrac12}", r"\frac{1}{2}"),
    (r"\boxed{1/2}", r"\frac{1}{2}"),
    (r"\boxed{\sqrt{12}}", r"2\sqrt{3}"),
    (r"\boxed{2\sqrt3}", r"2\sqrt{3}"),
    (r"\boxed{(1,5]}", "(1, 5]"),
    (r"\boxed{10}", r"10^{\circ}"),
    (r"\boxed{18.0}", "18"),
    (r"\boxed{(3, \pi/2)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{\{2, 1\}}", r"\{1, 2\}"),
    (r"\boxed{14/3}", r"\frac{14}{3}"),
    (r"\boxed{2^{1009}}", "$2^{1009}$"),  # golds that carry their own delimiters
    (r"\boxed{36}", r"\$36"),  # an escaped dollar is currency, not a delimiter
    (r"\boxed{70,000}", "70000"),
    (r"\boxed{(-\infty, 2) \cup (3, \infty)}", r"(-\infty,2)\cup(3,\infty)"),
]
WRONG = [
    (r"\boxed{3\sqrt{2}}", r"2\sqrt{3}"),
    (r"\boxed{(1,5)}", "(1, 5]"),
    (r"\boxed{[1,5]}", "(1, 5]"),
    (r"\boxed{4.67}", r"\frac{14}{3}"),
    (r"\boxed{19}", "18"),
    (r"\boxed{q - p}", "p - q"),
    (r"\boxed{1} ... \boxed{2}", "1"),  # only the last box counts
]


def test_grading_equivalence(grader):
    results = grader.grade(EQUIVALENT + WRONG)
    assert [r.correct for r in results] == [True] * len(EQUIVALENT) + [False] * len(WRONG), results
    assert all(r.status == "ok" for r in results)


def test_grading_no_answer_in_process():
    assert grade_answer("the answer is 18", "18") == GradeResult(False, "no_answer", None)
    assert grade_answer(r"\boxed{}", "18").status == "no_answer"
    assert grade_answer(r"\boxed{18}", "18").correct


# -- the Grader's failure handling ---------------------------------------------------------------

def test_grader_timeout_and_crash_score_zero_and_are_counted():
    items = [("a", "a"), ("hang", "x"), ("b", "c"), ("crash", "x"), ("d", "d"), ("raise", "x"), ("e", "e")]
    with Grader(num_workers=2, timeout_s=1.0, grade_fn=scripted_grade) as g:
        t0 = time.monotonic()
        results = g.grade(items)
        elapsed = time.monotonic() - t0
        assert [r.status for r in results] == ["ok", "timeout", "ok", "error", "ok", "error", "ok"]
        assert [r.correct for r in results] == [True, False, False, False, True, False, True]
        assert elapsed < 8, elapsed  # the hang cost one time limit, not 60 s
        assert "died" in results[3].detail and "RuntimeError" in results[5].detail
        # the killed / crashed workers were replaced: the grader keeps working
        assert [r.correct for r in g.grade([("f", "f"), ("g", "h")])] == [True, False]
        assert dict(g.counts) == {"ok": 6, "no_answer": 0, "timeout": 1, "error": 2}


def test_grader_in_process_timeout():
    g = Grader(num_workers=0, timeout_s=0.3, grade_fn=scripted_grade)
    results = g.grade([("hang", "x"), ("raise", "x"), ("a", "a")])
    assert [r.status for r in results] == ["timeout", "error", "ok"]
    assert results[2].correct
    g.close()
    with pytest.raises(RuntimeError, match="closed"):
        g.grade([("a", "a")])


def test_grader_rejects_unpicklable_grade_fn():
    with pytest.raises(ValueError, match="picklable"):
        Grader(num_workers=1, grade_fn=lambda t, g: GradeResult(True, "ok"))


# -- reward functions ----------------------------------------------------------------------------

def inp(text: str = "", *, n: int = 10, truncated: bool = False, steps=None, b: int = 4, max_new: int = 100):
    return RewardInput(text=text, ground_truth="1", num_tokens=n, truncated=truncated, step_map=steps,
                       block_size=b, max_new_tokens=max_new)


def call(name: str, x: RewardInput, correct=None, **params) -> float:
    return get_reward(name).fn(x, correct, params)


def test_accuracy_and_binary():
    assert call("accuracy", inp(), True) == 1.0 and call("accuracy", inp(), False) == 0.0
    assert call("binary", inp(), True) == 1.0 and call("binary", inp(), False) == -1.0


def test_cosine():
    def formula(t, big_t, correct):
        v0, vt = (1.0, 0.5) if correct else (-0.5, 0.0)
        return v0 - (v0 - vt) * (1 - math.cos(math.pi * t / big_t)) / 2

    assert call("cosine", inp(n=0), True) == pytest.approx(1.0)
    assert call("cosine", inp(n=0), False) == pytest.approx(-0.5)
    assert call("cosine", inp(n=50), True) == pytest.approx(0.75)  # halfway: mean of 1.0 and 0.5
    assert call("cosine", inp(n=50), False) == pytest.approx(-0.25)
    assert call("cosine", inp(n=30), True) == pytest.approx(formula(30, 100, True))
    assert call("cosine", inp(n=30), False) == pytest.approx(formula(30, 100, False))
    assert call("cosine", inp(n=100), True) == -0.5 and call("cosine", inp(n=150), False) == -0.5  # at the limit
    assert call("cosine", inp(n=30), True, cosine_max_len=60) == pytest.approx(0.75)  # T from the params
    assert call("cosine", inp(n=60), True, cosine_max_len=60) == -0.5
    with pytest.raises(ValueError, match="cosine_max_len"):
        call("cosine", inp(max_new=0), True)


@pytest.mark.parametrize("text, fmt, think", [
    ("<think>reasoning</think>", 1, 0),
    ("<think>a\nb</think>  \n", 1, 0),
    ("<think>a</think><|im_end|>", 1, 0),  # the stop token is not content
    ("<think>a</think> the answer is 3", 0, 0),
    ("reasoning</think>\n", 0, 1),  # the prompt ended in <think>
    ("reasoning</think> answer", 0, 0),
    ("<think>a</think><think>b</think>", 0, 0),
    (" <think>a</think>", 0, 0),
    ("no tags", 0, 0),
])
def test_format_rewards(text, fmt, think):
    assert call("format", inp(text)) == fmt
    assert call("think_format", inp(text)) == think


def test_boxed_and_repetition():
    assert call("boxed", inp(r"so \boxed{3}")) == 0.1
    assert call("boxed", inp(r"so \boxed 3")) == 0.0
    assert call("repetition", inp("a b c d e")) == 0.0  # all distinct
    assert call("repetition", inp("a b")) == 0.0  # no 3-gram
    # "a b a b a b": 3-grams aba, bab, aba, bab -> 2 distinct of 4
    assert call("repetition", inp("a b a b a b")) == pytest.approx(-0.5)
    # "x x x x x": 3 grams, 1 distinct
    assert call("repetition", inp("x x x x x")) == pytest.approx(-(1 - 1 / 3))


def test_soft_overlong():
    # max 100, cache 50 (default): free up to 50, −1 at 100
    assert call("soft_overlong", inp(n=40)) == 0.0
    assert call("soft_overlong", inp(n=50)) == 0.0
    assert call("soft_overlong", inp(n=75)) == pytest.approx(-0.5)
    assert call("soft_overlong", inp(n=100)) == pytest.approx(-1.0)
    assert call("soft_overlong", inp(n=90), overlong_cache=20) == pytest.approx(-(90 - 80) / 20)


def test_speed():
    steps = np.array([1, 1, 2, 2, 2, 3, 4, 4])  # 8 tokens over 4 forwards
    assert call("speed", inp(steps=steps, b=4), True) == pytest.approx(8 / 4 / 4)
    assert call("speed", inp(steps=steps, b=4), False) == 0.0
    assert call("speed", inp(steps=[1, 2, 3], b=4), True) == pytest.approx(1 / 4)
    assert call("speed", inp(steps=None), True) == 0.0


# -- weighted sums, registry ---------------------------------------------------------------------

def test_compute_rewards_weighted_sum(grader):
    steps = np.array([1, 1, 2, 2])
    inputs = [
        RewardInput(r"<think>x</think> \boxed{\frac{1}{2}}", "0.5", 10, False, steps, 4, 100),
        RewardInput(r"\boxed{3}", "4", 60, False, steps, 4, 100),
        RewardInput(r"\boxed{4}", "4", 100, True, steps, 4, 100),  # right but cut: wrong
        RewardInput("no answer", "4", 20, False, steps, 4, 100),
    ]
    weights = {"accuracy": 1.0, "boxed": 2.0, "speed": 0.5, "soft_overlong": 1.0}
    total, parts, metrics = compute_rewards(inputs, weights, grader)
    np.testing.assert_allclose(parts["accuracy"], [1, 0, 0, 0])
    np.testing.assert_allclose(parts["boxed"], [0.1, 0.1, 0.1, 0])
    np.testing.assert_allclose(parts["speed"], [0.5, 0, 0, 0])
    np.testing.assert_allclose(parts["soft_overlong"], [0, -0.2, -1, 0], atol=1e-6)
    expected = parts["accuracy"] + 2 * parts["boxed"] + 0.5 * parts["speed"] + parts["soft_overlong"]
    np.testing.assert_allclose(total, expected, atol=1e-6)
    np.testing.assert_allclose(total, [1.45, 0.0, -0.8, 0.0], atol=1e-6)
    assert metrics["correct"].tolist() == [True, False, False, False]
    assert metrics["grader/ok"] == 2 and metrics["grader/no_answer"] == 1 and metrics["truncated"] == 1


class _NoGrading:
    def grade(self, pairs):
        raise AssertionError("no configured reward needs correctness: the grader must not run")


def test_grader_runs_only_when_needed():
    inputs = [RewardInput("a b a b a", "1", 5), RewardInput("<think>x</think>", "1", 5)]
    total, parts, metrics = compute_rewards(inputs, {"repetition": 1.0, "format": 0.5}, _NoGrading())
    np.testing.assert_allclose(total, [-(1 - 2 / 3), 0.5], atol=1e-6)
    assert metrics["correct"] is None
    with pytest.raises(ValueError, match="need a Grader"):
        compute_rewards(inputs, {"accuracy": 1.0}, None)


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match=r"unknown reward function 'acuracy'.*accuracy.*binary"):
        compute_rewards([], {"acuracy": 1.0})
    with pytest.raises(ValueError, match=r"unknown reward_params \['cosine_maxlen'\].*cosine_max_len"):
        compute_rewards([], {"cosine": 1.0}, cosine_maxlen=10)
    with pytest.raises(ValueError, match="no reward functions"):
        compute_rewards([], {})


def test_custom_reward_registration(grader):
    @register_reward("test_short_and_right", needs_correct=True, params=("short_len",), replace=True)
    def short_and_right(x: RewardInput, correct, params) -> float:
        return float(bool(correct) and x.num_tokens <= params.get("short_len", 5))

    assert "test_short_and_right" in registered_rewards()
    with pytest.raises(ValueError, match="already registered"):
        register_reward("accuracy")(short_and_right)
    inputs = [RewardInput(r"\boxed{2}", "2", 3), RewardInput(r"\boxed{2}", "2", 30), RewardInput(r"\boxed{1}", "2", 3)]
    total, parts, _ = compute_rewards(inputs, {"test_short_and_right": 2.0, "binary": 1.0}, grader, short_len=10)
    np.testing.assert_allclose(parts["test_short_and_right"], [1, 0, 0])
    np.testing.assert_allclose(total, [3, 1, -1])
