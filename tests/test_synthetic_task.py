"""The synthetic arithmetic task's sloppy teacher (data.synthetic_carry_slip), checked against
sums computed here digit by digit, and its careless typist (data.synthetic_spacing)."""

from __future__ import annotations

import json
import os
import re
import sys

import numpy as np
import pytest

from gtpo_jax.data.synthetic import synthetic_examples, write_synthetic_task

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from spacing import answer_format, is_right  # noqa: E402  (scripts/spacing.py, the probe's analysis)


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


def test_a_careless_typist_spaces_the_first_operator_then_each_side_at_random_and_changes_nothing_else():
    tight = synthetic_examples(2000, seed=3, digits=2, carry_slip=0.7)
    loose = synthetic_examples(2000, seed=3, digits=2, carry_slip=0.7, spacing=0.4)
    careless = later_sides = later_spaced = 0
    for t, lo in zip(tight, loose, strict=True):
        assert (lo.question, lo.answer) == (t.question, t.answer)
        # removing the spaces of the worked steps gives back the tight text (same slips, same sums)
        steps, rest = lo.response.split(". So ", 1)
        ops = re.findall(r" ?[+=] ?", steps)
        assert all(op.strip() in "+=" and len(op) <= 3 for op in ops)
        assert re.sub(r" ?([+=]) ?", r"\1", steps) + ". So " + rest == t.response
        assert rest == t.response.split(". So ", 1)[1]  # the summary line is never spaced
        if ops[0] == " + ":  # the tell: a careless solution's first operator is spaced on both sides
            careless += 1
            later_sides += 2 * (len(ops) - 1)
            later_spaced += sum(op.count(" ") for op in ops[1:])
        else:
            assert ops[0] == "+" and all(op.strip() == op for op in ops)  # a tidy solution has no space
    assert careless / len(loose) == pytest.approx(0.4, abs=0.03)  # the careless share, told apart exactly
    assert later_spaced / later_sides == pytest.approx(0.5, abs=0.02)  # each later side at even odds


def test_the_spacing_analysis_reads_formats_and_answers_of_handwritten_solutions():
    assert answer_format("7+5=12, 2+4+1=7. So 27+45=72. \\boxed{72}") == ("tidy", 0, 10)
    assert answer_format("7 + 5 = 12, 2 + 4 + 1 = 7. So 27+45=72. \\boxed{72}") == ("careless", 10, 10)
    assert answer_format("7 + 5=12, 2+4 +1 = 7. So 27+45=72. \\boxed{72}") == ("careless", 5, 10)
    assert answer_format("7+ 5=12, 2+4+1=7. So 27 + 45=72. \\boxed{72}") == ("mixed", 1, 10)  # no tell
    assert is_right("What is 27 + 45?", "7+5=12, 2+4+1=7. So 27+45=72. \\boxed{72}")
    assert not is_right("What is 27 + 45?", "7+5=12, 2+4=6. So 27+45=62. \\boxed{62}")
    assert not is_right("What is 27 + 45?", "7+5=12, 2+4+1=7. So 27+45=72.")  # no boxed answer
