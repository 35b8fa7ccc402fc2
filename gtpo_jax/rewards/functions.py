"""Reward functions (docs/algorithm.md §5.1), their registry, and the weighted sum the GTPO trainer uses.

A reward function is `fn(inp: RewardInput, correct: bool | None, params: Mapping) -> float`;
`correct` is None for functions registered without `needs_correct` (grading is the expensive
part, so it runs only when some configured function needs it). `params` holds the
`gtpo.reward_params` of the config; each function declares the names it reads, so a misspelt
parameter is an error instead of a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from gtpo_jax.rewards.answers import STATUSES, has_boxed

RewardFn = Callable[["RewardInput", "bool | None", Mapping[str, Any]], float]


@dataclasses.dataclass
class RewardInput:
    text: str  # decoded response
    ground_truth: str
    num_tokens: int  # response length in tokens
    truncated: bool = False  # cut at max_new_tokens
    step_map: Any = None  # per-token forward index (docs/algorithm.md §2); None/empty when unknown
    block_size: int = 4
    max_new_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class RewardFunction:
    name: str
    fn: RewardFn
    needs_correct: bool
    params: tuple[str, ...]


_REGISTRY: dict[str, RewardFunction] = {}


def register_reward(name: str, *, needs_correct: bool = False, params: Sequence[str] = (), replace: bool = False):
    """Decorator registering `fn(inp, correct, params) -> float` under `name` (usable in
    `gtpo.rewards`). `params`: the reward_params keys it reads."""

    def decorator(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and not replace:
            raise ValueError(f"a reward named {name!r} is already registered (pass replace=True to override it)")
        _REGISTRY[name] = RewardFunction(name, fn, needs_correct, tuple(params))
        return fn

    return decorator


def registered_rewards() -> dict[str, RewardFunction]:
    return dict(_REGISTRY)


def get_reward(name: str) -> RewardFunction:
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward function {name!r}; registered: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


# -- built-in rewards (docs/algorithm.md §5.1) ----------------------------------------------------------------

@register_reward("accuracy", needs_correct=True)
def accuracy_reward(inp: RewardInput, correct: bool | None, params: Mapping[str, Any]) -> float:
    return 1.0 if correct else 0.0


@register_reward("binary", needs_correct=True)
def binary_reward(inp: RewardInput, correct: bool | None, params: Mapping[str, Any]) -> float:
    return 1.0 if correct else -1.0


@register_reward("cosine", needs_correct=True, params=("cosine_max_len",))
def cosine_reward(inp: RewardInput, correct: bool | None, params: Mapping[str, Any]) -> float:
    """Length-aware: short right answers score most, short wrong ones least; −0.5 at the limit."""
    big_t = int(params.get("cosine_max_len") or inp.max_new_tokens)
    if big_t <= 0:
        raise ValueError("cosine reward needs cosine_max_len (reward_params) or RewardInput.max_new_tokens > 0")
    t = min(int(inp.num_tokens), big_t)
    if t >= big_t:
        return -0.5
    v0, vt = (1.0, 0.5) if correct else (-0.5, 0.0)
    return v0 - (v0 - vt) * (1.0 - math.cos(math.pi * t / big_t)) / 2.0


_FORMAT_RE = re.compile(r"<think>(?:(?!</?think>).)*</think>\s*", re.DOTALL)
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")


def _strip_end_tokens(text: str) -> str:
    """The turn's stop tokens are not content (a decoder may or may not keep them in the text)."""
    end = len(text.rstrip())
    changed = True
    while changed:  # moves an index instead of slicing: linear however many stop tokens there are
        changed = False
        for tok in _END_TOKENS:
            if text.endswith(tok, 0, end):
                end -= len(tok)
                while end and text[end - 1].isspace():
                    end -= 1
                changed = True
    return text[:end]


@register_reward("format")
def format_reward(inp: RewardInput, correct: bool | None, params: Mapping[str, Any]) -> float:
    """1 if the text is exactly one `<think>…</think>` followed only by whitespace."""
    return 1.0 if _FORMAT_RE.fullmatch(_strip_end_tokens(inp.text)) else 0.0


@register_reward("think_format")
def think_format_reward(inp: RewardInput, correct: bool | None, params: Mapping[str, Any]) -> float:
    """`format` for prompts that already end in `<think>` (the response starts inside it)."""
    return 1.0 if _FORMAT_RE.fullmatch("<think>" + _strip_end_tokens(inp.text)) else 0.0


@register_reward("boxed")
def boxed_reward(inp: RewardInput, correct: bool | None, params: Mapping[str, Any]) -> float:
    return 0.1 if has_boxed(inp.text) else 0.0


@register_reward("repetition")
def repetition_reward(inp: RewardInput, correct: bool | None, params: Mapping[str, Any]) -> float:
    """−(1 − distinct word 3-grams / all 3-grams); 0 for texts under three words."""
    words = inp.text.split()
    grams = list(zip(words, words[1:], words[2:]))
    if not grams:
        return 0.0
    return -(1.0 - len(set(grams)) / len(grams))


@register_reward("soft_overlong", params=("overlong_max_len", "overlong_cache"))
def soft_overlong_reward(inp: RewardInput, correct: bool | None, params: Mapping[str, Any]) -> float:
    """DAPO's soft length penalty: 0 up to max − cache, then linear down to −1 at max."""
    max_len = int(params.get("overlong_max_len") or inp.max_new_tokens)
    if max_len <= 0:
        raise ValueError("soft_overlong needs overlong_max_len (reward_params) or RewardInput.max_new_tokens > 0")
    cache = float(params.get("overlong_cache") or max_len / 2)
    return min(0.0, -(inp.num_tokens - (max_len - cache)) / cache)


@register_reward("speed", needs_correct=True)
def speed_reward(inp: RewardInput, correct: bool | None, params: Mapping[str, Any]) -> float:
    """Tokens per forward over the block size, for a correct response only (rewards parallel decoding)."""
    steps = [] if inp.step_map is None else np.asarray(inp.step_map).reshape(-1).tolist()
    if not correct or not steps:
        return 0.0
    return len(steps) / len(set(steps)) / inp.block_size


# -- the weighted sum ----------------------------------------------------------------------------

def compute_rewards(inputs: Sequence[RewardInput], weights: Mapping[str, float], grader=None, *,
                    need_correct: bool = False, **params) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """Total reward Σ weight·reward per input, the unweighted parts by name, and metrics.

    Grades with `grader` (a `Grader`) only when a configured reward needs correctness or
    `need_correct` asks for it (the trainer's DAPO filter does). A truncated response is never
    graded and counts as wrong (docs/algorithm.md §5.1: accuracy 0 when cut). metrics: `correct` (bool array, or
    None when not graded), `grader/<status>` counts for this call, `truncated`, `grade_s`.
    """
    if not weights:
        raise ValueError("no reward functions configured (gtpo.rewards is empty)")
    fns = [get_reward(name) for name in weights]
    known = {p for f in fns for p in f.params}
    unknown = sorted(set(params) - known)
    if unknown:
        allowed = ", ".join(sorted(known)) or "none"
        raise ValueError(f"unknown reward_params {unknown} for rewards {list(weights)}; they read: {allowed}")
    metrics: dict = {f"grader/{s}": 0 for s in STATUSES}
    metrics.update(truncated=int(sum(bool(i.truncated) for i in inputs)), grade_s=0.0, correct=None)
    correct: list[bool | None] = [None] * len(inputs)
    if need_correct or any(f.needs_correct for f in fns):
        if grader is None:
            raise ValueError(f"rewards {[f.name for f in fns if f.needs_correct]} need a Grader; none was given")
        t0 = time.perf_counter()
        todo = [i for i, inp in enumerate(inputs) if not inp.truncated]
        results = grader.grade([(inputs[i].text, inputs[i].ground_truth) for i in todo]) if todo else []
        correct = [False] * len(inputs)
        for i, r in zip(todo, results):
            correct[i] = bool(r.correct)
            metrics[f"grader/{r.status}"] = metrics.get(f"grader/{r.status}", 0) + 1
        metrics["grade_s"] = time.perf_counter() - t0
        metrics["correct"] = np.array(correct, dtype=bool)
    parts = {
        f.name: np.array([f.fn(inp, c if f.needs_correct else None, params) for inp, c in zip(inputs, correct)],
                         dtype=np.float32)
        for f in fns
    }
    total = np.zeros(len(inputs), np.float32)
    for name, w in weights.items():
        total += np.float32(w) * parts[name]
    return total, parts, metrics
