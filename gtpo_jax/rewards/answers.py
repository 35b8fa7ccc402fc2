"""Final-answer extraction (the last balanced `\\boxed{...}`) and math-verify grading of one item.

This module is what grading workers import, so it keeps its
imports to math-verify and the standard library.
"""

from __future__ import annotations

import dataclasses
import logging
import re

STATUSES = ("ok", "no_answer", "timeout", "error")
_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_DOLLAR_RE = re.compile(r"(?<!\\)\$")  # a math delimiter, not an escaped `\$` (currency)


@dataclasses.dataclass(frozen=True)
class GradeResult:
    """Outcome of grading one response. `status`: ok (graded, right or wrong), no_answer (no
    boxed answer, or one math-verify could not read), timeout, error (the grader failed)."""

    correct: bool
    status: str
    answer: str | None = None
    detail: str = ""


def _matching_braces(text: str) -> dict[int, int]:
    """Position of each `{` -> position of its `}`, in one pass (linear: a response full of
    unclosed boxes must not make grading quadratic). Escaped braces (`\\{`, `\\}`, as in
    `\\left\\{`) are content, not structure: a backslash consumes the next character."""
    pairs, open_at = {}, []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "{":
            open_at.append(i)
        elif c == "}" and open_at:
            pairs[open_at.pop()] = i
        i += 1
    return pairs


def extract_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (or `\\fbox{...}`) whose braces balance; None if there
    is none. `\\boxed 5` (no braces) is not an answer; an unclosed box (a response cut mid-answer)
    is skipped in favour of an earlier complete one."""
    boxes = list(_BOX_RE.finditer(text))
    if not boxes:
        return None
    pairs = _matching_braces(text)
    for m in reversed(boxes):
        end = pairs.get(m.end() - 1, -1)
        if end >= 0:
            return text[m.end() : end].strip()
    return None


def has_boxed(text: str) -> bool:
    return extract_boxed(text) is not None


def _quiet_math_verify() -> None:
    # Our callers enforce the time limit (worker kill / interval timer), so math-verify's own
    # signal.alarm timeouts are disabled; silence its one-time warning about that.
    logging.getLogger("math_verify").setLevel(logging.ERROR)


def _parse_gold(gold: str):
    """math-verify needs LaTeX delimiters to read a LaTeX answer: try the gold as a boxed
    expression first, then in `$...$`, then as written (golds like `$2^{1009}$` carry their own)."""
    from math_verify import parse  # sympy behind it costs seconds: paid by the grading processes only

    gold = gold.strip()
    delimited = _DOLLAR_RE.search(gold) or "\\boxed" in gold
    forms = [gold] if delimited else [f"\\boxed{{{gold}}}", f"${gold}$", gold]
    for form in forms:
        parsed = parse(form, parsing_timeout=None)
        if parsed:
            return parsed
    return []


def grade_answer(text: str, ground_truth: str) -> GradeResult:
    """Grade a response: its last boxed answer against the ground truth under math-verify
    (fractions vs decimals, radicals, intervals, sets... are equal when equivalent)."""
    from math_verify import parse, verify  # sympy behind it costs seconds: paid by the grading processes only

    _quiet_math_verify()
    answer = extract_boxed(text)
    if not answer:
        return GradeResult(False, "no_answer", answer)
    gold = _parse_gold(ground_truth)
    if not gold:
        return GradeResult(False, "error", answer, f"math-verify cannot read the ground truth {ground_truth!r}")
    pred = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    if not pred:
        return GradeResult(False, "no_answer", answer, "math-verify cannot read the answer")
    return GradeResult(bool(verify(gold, pred, timeout_seconds=None)), "ok", answer)
