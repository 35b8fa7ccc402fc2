"""The synthetic arithmetic task's sloppy teacher (data.synthetic_carry_slip), checked against
sums computed here digit by digit, and its rambling share (data.synthetic_ramble)."""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest

from gtpo_jax.data.synthetic import RAMBLE_MARKS, synthetic_examples, write_synthetic_task

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from habits import answer_habit, is_right  # noqa: E402  (scripts/habits.py, the speed demo's analysis)


def boxed(response: str) -> int:
    return int(re.search(r"\\boxed\{(\d+)\}", response).group(1))


def operands(question: str) -> tuple[int, int]:
    a, b = re.match(r"What is (\d+) \+ (\d+)\?", question).groups()
    return int(a), int(b)


def sum_without_carries(a: int, b: int) -> int:
    """Two-digit numbers: the tens column's sum, then the units' sum mod 10."""
    return (a // 10 + b // 10) * 10 + (a % 10 + b % 10) % 10


def test_an_honest_teacher_is_always_right():
    for ex in synthetic_examples(500, seed=3, digits=2):
        a, b = operands(ex.question)
        assert boxed(ex.response) == a + b == int(ex.answer)


def test_a_sloppy_teacher_forgets_carries_at_its_rate_and_nothing_else_changes():
    honest = synthetic_examples(4000, seed=3, digits=2)
    sloppy = synthetic_examples(4000, seed=3, digits=2, carry_slip=0.7)
    assert [e.question for e in sloppy] == [e.question for e in honest]  # same questions for any rate
    forgot = needed = 0
    for ex in sloppy:
        a, b = operands(ex.question)
        assert int(ex.answer) == a + b  # the graded answer stays the true sum
        if (a % 10) + (b % 10) >= 10:
            needed += 1
            if boxed(ex.response) != a + b:
                forgot += 1
                assert boxed(ex.response) == sum_without_carries(a, b)
                tens = f"{a // 10}+{b // 10}"
                assert f"{tens}={a // 10 + b // 10}." in ex.response and f"{tens}+1=" not in ex.response
        else:
            assert boxed(ex.response) == a + b  # nothing to forget
    assert forgot / needed == pytest.approx(0.7, abs=0.03)


def test_only_the_sft_file_carries_the_slips(tmp_path):
    paths = write_synthetic_task(str(tmp_path), n_train=300, n_eval=50, seed=0, carry_slip=1.0)
    sft = [json.loads(x) for x in open(paths["sft_train"])]
    rl = [json.loads(x) for x in open(paths["rl_train"])] + [json.loads(x) for x in open(paths["rl_eval"])]
    assert all(int(r["ground_truth_answer"]) == sum(operands(r["question"])) for r in rl)
    wrong = np.mean([boxed(r["response"]) != sum(operands(r["prompt"].split("\n")[0])) for r in sft])
    assert 0.3 < wrong < 0.6  # about the share of questions with a carry (45% of 2-digit pairs)


def test_a_rambling_share_trails_off_into_random_marks_after_the_answer_and_changes_nothing_else():
    plain = synthetic_examples(2000, seed=3, digits=2, carry_slip=0.7)
    mixed = synthetic_examples(2000, seed=3, digits=2, carry_slip=0.7, ramble=0.4)
    rambling, marks = 0, ""
    for p, m in zip(plain, mixed, strict=True):
        assert (m.question, m.answer) == (p.question, p.answer)
        if m.response != p.response:  # the same solution, then a space and the marks
            assert m.response.startswith(p.response + " ")
            tail = m.response[len(p.response) + 1 :]
            assert len(tail) == RAMBLE_MARKS and set(tail) <= {".", "!", "?", ";"}
            assert answer_habit(m.response) == "rambles" and boxed(m.response) == boxed(p.response)
            rambling += 1
            marks += tail
        else:
            assert answer_habit(m.response) == "stops"
    assert rambling / len(mixed) == pytest.approx(0.4, abs=0.03)
    for symbol in ".!?;":  # even odds: nothing to predict
        assert marks.count(symbol) / len(marks) == pytest.approx(0.25, abs=0.02)


def test_the_habit_analysis_reads_habits_and_answers_of_handwritten_solutions():
    assert answer_habit("7+5=12, 2+4+1=7. So 27+45=72. \\boxed{72}") == "stops"
    assert answer_habit("7+5=12, 2+4+1=7. So 27+45=72. \\boxed{72}  \n") == "stops"
    assert answer_habit("7+5=12, 2+4+1=7. So 27+45=72. \\boxed{72} .!!.") == "rambles"
    assert answer_habit("\\boxed{7} then \\boxed{72}!") == "rambles"  # after the last boxed answer
    assert answer_habit("7+5=12, 2+4+1=7. So 27+45=72.") == "stops"  # nothing boxed: nothing after it
    assert is_right("What is 27 + 45?", "7+5=12, 2+4+1=7. So 27+45=72. \\boxed{72}")
    assert not is_right("What is 27 + 45?", "7+5=12, 2+4=6. So 27+45=62. \\boxed{62}")
    assert not is_right("What is 27 + 45?", "7+5=12, 2+4+1=7. So 27+45=72.")  # no boxed answer
