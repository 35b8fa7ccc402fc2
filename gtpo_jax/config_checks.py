"""Allowed values of every numeric config setting, checked at load time (before any model loads).

Rules are attached to section types, not to paths, so that a section reused by another config
tree (the evaluation config holds the same `decoding`, `model`, `grader` and `eval` sections) is checked the same
way. `range_problems(cfg)` walks the tree and returns one line per bad value, naming the dotted
key, the allowed range and the value given.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Rule:
    field: str
    ok: Callable[[Any], bool]
    allowed: str  # what the message says is allowed


def at_least(field: str, low: float, note: str = "") -> Rule:
    return Rule(field, lambda v: v >= low, f">= {low}{note}")


def above(field: str, low: float, note: str = "") -> Rule:
    return Rule(field, lambda v: v > low, f"> {low}{note}")


def within(field: str, low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Rule:
    def ok(v):
        return (v > low if low_open else v >= low) and (v < high if high_open else v <= high)

    return Rule(field, ok, f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}")


def _rules() -> dict[str, list[Rule]]:
    """Section class name -> rules (by name: config.py imports this module, not the reverse)."""
    return {
        "Config": [at_least("block_size", 1)],
        "ModelSection": [at_least("attn_q_tile", 1), at_least("attn_kv_tile", 1)],
        "DataSection": [
            at_least("synthetic_train", 1), at_least("synthetic_eval", 0), at_least("synthetic_digits", 1),
            within("synthetic_carry_slip", 0, 1),
            within("synthetic_ramble", 0, 1),
            at_least("max_len", 2), at_least("epochs", 0, " (0 = repeat forever)"),
        ],
        "MaskingSection": [within("lower_p", 0, 1), within("upper_p", 0, 1), at_least("post_num", 0),
                           at_least("num_noisy_copies", 1)],
        "OptimSection": [
            above("lr", 0), at_least("warmup_steps", 0), within("min_lr_ratio", 0, 1),
            within("b1", 0, 1, high_open=True), within("b2", 0, 1, high_open=True), above("eps", 0),
            at_least("weight_decay", 0), at_least("clip_norm", 0, " (0 = no clipping)"),
        ],
        "TrainSection": [
            at_least("steps", 1), at_least("batch_size", 1), at_least("micro_batches", 1),
            at_least("row_len", 0, " (0 = derived from data.max_len)"),
            at_least("rows_per_micro_batch", 0, " (0 = as many as needed)"), at_least("max_bad_steps", 1),
            at_least("log_every", 1), at_least("vocab_chunk", 1),
        ],
        "CheckpointSection": [at_least("save_every", 1), at_least("keep", 0, " (0 = keep every step)")],
        "MeshConfig": [at_least("data", 1), Rule("fsdp", lambda v: v >= 1 or v == -1, ">= 1, or -1 (all devices left)"),
                        at_least("tensor", 1)],
        "DecodingConfig": [
            at_least("denoising_steps", 1), within("threshold", 0, 1),
            above("temperature", 0, " (greedy decoding is eval.greedy, not temperature 0)"),
            at_least("top_k", 0, " (0 = off)"), within("top_p", 0, 1, low_open=True), at_least("max_new_tokens", 1),
            at_least("min_new_tokens", 0),
        ],
        "JaxEngineSection": [Rule("max_batch", lambda v: v is None or v >= 1, ">= 1, or null (no limit)"),
                             Rule("cache_gib", lambda v: v is None or v > 0, "> 0, or null (no limit)")],
        "LMDeployEngineSection": [at_least("tensor_parallel", 1),
                                  within("cache_max_entry_count", 0, 1, low_open=True)],
        "GraderConfig": [at_least("workers", 0, " (0 = grade in the calling process)"), above("timeout_s", 0)],
        "GTPOSection": [
            at_least("num_task_per_step", 1), at_least("num_response_per_task", 2, " (advantages are group-normalised)"),
            at_least("oversample", 1), within("eps_low", 0, 1, high_open=True), at_least("eps_high", 0),
            at_least("beta", 0, " (0 = no KL term)"), at_least("shrink", 1), at_least("num_iterations", 1),
            at_least("mini_batches", 1), at_least("tis_cap", 0, " (0 = off)"), at_least("max_rounds", 1),
        ],
        "EvalSection": [at_least("every", 0, " (0 = start and end only)"), at_least("num_samples", 1),
                        at_least("max_questions", 0, " (0 = all)"), at_least("questions_per_batch", 1)],
        "EvalConfig": [at_least("block_size", 1)],
        "GPUSection": [within("trainer_fraction", 0, 1, low_open=True, high_open=True),
                       at_least("memory_gib", 0, " (0 = as the device reports)"),
                       at_least("activation_gib", 0, " (0 = estimated)")],
        "DistributedSection": [at_least("num_processes", 1), at_least("process_id", 0),
                               above("initialization_timeout_s", 0), above("heartbeat_timeout_s", 0)],
    }


_RULES = _rules()


def range_problems(node: Any, prefix: str = "") -> list[str]:
    """One line per value outside its allowed range, for `node` and every section below it."""
    problems = []
    for rule in _RULES.get(type(node).__name__, []):
        value = getattr(node, rule.field)
        key = f"{prefix}{rule.field}"
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{key} must be a finite number, got {value}")
        elif not rule.ok(value):
            problems.append(f"{key} must be {rule.allowed}, got {value}")
    for f in dataclasses.fields(node):
        child = getattr(node, f.name)
        if dataclasses.is_dataclass(child) and not isinstance(child, type):
            problems.extend(range_problems(child, f"{prefix}{f.name}."))
    return problems
