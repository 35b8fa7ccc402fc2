"""A synthetic arithmetic task with checkable `\\boxed{}` answers, so every stage runs on a CPU.

Questions are additions of two `digits`-digit numbers; responses work column by column
(with carries) and end in `\\boxed{sum}`: short, learnable by a tiny model, and graded by the
same math-verify path as real benchmarks.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from gtpo_jax.data.tokenizer import INSTRUCTION


@dataclasses.dataclass
class ArithmeticExample:
    question: str
    response: str  # without the end tokens
    answer: str


def worked_addition(a: int, b: int) -> str:
    steps, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s}")
        carry = s // 10
    return ", ".join(steps) + f". So {a}+{b}={a + b}. \\boxed{{{a + b}}}"


def synthetic_examples(n: int, seed: int, digits: int = 2) -> list[ArithmeticExample]:
    rng = np.random.default_rng(seed)
    lo, hi = 10 ** (digits - 1), 10**digits
    out = []
    for _ in range(n):
        a, b = (int(x) for x in rng.integers(lo, hi, 2))
        out.append(ArithmeticExample(f"What is {a} + {b}?", worked_addition(a, b), str(a + b)))
    return out


def task_paths(out_dir: str) -> dict[str, str]:
    """The files `write_synthetic_task(out_dir, ...)` writes, by role."""
    return {name: os.path.join(out_dir, f"{name}.jsonl") for name in ("sft_train", "rl_train", "rl_eval")}


def write_synthetic_task(out_dir: str, n_train: int, n_eval: int, seed: int = 0, digits: int = 2) -> dict[str, str]:
    """sft_train.jsonl, rl_train.jsonl and rl_eval.jsonl; held-out questions never appear in
    the training files. Deterministic in (n_train, n_eval, seed, digits)."""
    os.makedirs(out_dir, exist_ok=True)
    pool = synthetic_examples(4 * (n_train + n_eval), seed=seed, digits=digits)
    seen, unique = set(), []
    for ex in pool:
        if ex.question not in seen:
            seen.add(ex.question)
            unique.append(ex)
    if len(unique) < n_train + n_eval:
        raise ValueError(f"only {len(unique)} distinct {digits}-digit questions exist; lower the counts or add digits")
    eval_set, train_set = unique[:n_eval], unique[n_eval : n_eval + n_train]
    paths = task_paths(out_dir)

    def dump(path, rows):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)

    # The SFT prompt is the user's message (question and instruction); the chat template and the
    # stop tokens are added when tokenizing, giving the same tokens as the RL prompt template.
    dump(paths["sft_train"], [{"prompt": f"{e.question}\n{INSTRUCTION}", "response": e.response} for e in train_set])
    dump(paths["rl_train"], [{"question": e.question, "ground_truth_answer": e.answer} for e in train_set])
    dump(paths["rl_eval"], [{"question": e.question, "ground_truth_answer": e.answer} for e in eval_set])
    return paths
