"""A synthetic arithmetic task with checkable `\\boxed{}` answers, so every stage runs on a CPU.

Questions are additions of two `digits`-digit numbers; responses work column by column
(with carries) and end in `\\boxed{sum}`: short, learnable by a tiny model, and graded by the
same math-verify path as real benchmarks.

`carry_slip` makes the SFT teacher sloppy: that fraction of the worked solutions that need a carry
forget every carry (a consistent but wrong computation, e.g. 27+45: "7+5=12, 2+4=6 ... \\boxed{62}").
A model imitating it samples the slip at T=1 as often as the teacher made it, a mistake the
accuracy reward can find and remove (the CPU demo's headroom for RL); the RL prompts and the
held-out answers stay correct.

`ramble` is the fraction of worked solutions whose writer, after the boxed answer, trails off into
RAMBLE_MARKS random punctuation marks (`\\boxed{72} .!?;.!;??...`). The answer and its grade are the
same either way, but no model can predict a coin flip, so a decoder commits those marks about one
per forward: rambling costs parallel decoding without changing correctness. Whether an answer
rambles is one sampled choice (stop or go on after the `}`), whose two outcomes decode at
different speeds: what the speed reward (SPEC 5.1) can select. Off in the demo's configs (README,
"Speed reward", has what it measured). Earlier probes made answers slow by spacing their operators
at random instead; the spaces shift every later digit, and the tiny SFT model then got its column
sums wrong (greedy held-out 14-20% against 56%).
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


RAMBLE_MARKS = 12  # random punctuation marks after a rambling answer, each one of RAMBLE_SYMBOLS
# Four symbols, not two: before the writer's choice after the `}` is committed, a later slot's most
# likely mark (0.7 / 4 at a 70% rambling share) must stay less likely than stopping there (0.3), or
# the decoder commits a mark first whenever it drew the stop, and stops far less often than the model.
RAMBLE_SYMBOLS = (".", "!", "?", ";")


def worked_addition(a: int, b: int, forget_carry: bool = False) -> str:
    """Column-by-column addition ending in `\\boxed{}`; `forget_carry` drops every carry (and so
    writes a wrong sum: the last column's sum, then the other columns' sums mod 10)."""
    steps, carry, digits = [], 0, []
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x = int(da[i]) if i < len(da) else 0
        y = int(db[i]) if i < len(db) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}" + (f"+{carry}" if carry else "") + f"={s}")
        digits.append(str(s % 10))
        carry = 0 if forget_carry else s // 10
    total = int(str(s) + "".join(reversed(digits[:-1])))  # == a + b unless a carry was forgotten
    return ", ".join(steps) + f". So {a}+{b}={total}. \\boxed{{{total}}}"


def needs_carry(a: int, b: int) -> bool:
    """Whether some column of a + b carries into the next one (the last column's carry is not a
    carry to forget: it is written as its sum's leading digit)."""
    da, db = str(a)[::-1], str(b)[::-1]
    width = max(len(da), len(db))
    carry = 0
    for i in range(width - 1):
        carry = (int(da[i]) if i < len(da) else 0) + (int(db[i]) if i < len(db) else 0) + carry >= 10
        if carry:
            return True
    return False


def synthetic_examples(n: int, seed: int, digits: int = 2, carry_slip: float = 0.0,
                       ramble: float = 0.0) -> list[ArithmeticExample]:
    """`answer` is always the true sum; `response` is the (possibly sloppy) teacher's."""
    rng = np.random.default_rng(seed)
    slips = np.random.default_rng([seed, 1]).random(n) < carry_slip  # own stream: same questions for any rate
    # own stream, a fixed number of draws per example: the questions and slips do not depend on it
    ramble_rng = np.random.default_rng([seed, 2])
    rambles = ramble_rng.random(n) < ramble
    marks = ramble_rng.choice(np.array(RAMBLE_SYMBOLS), (n, RAMBLE_MARKS))
    lo, hi = 10 ** (digits - 1), 10**digits
    out = []
    for i in range(n):
        a, b = (int(x) for x in rng.integers(lo, hi, 2))
        response = worked_addition(a, b, forget_carry=bool(slips[i]) and needs_carry(a, b))
        if rambles[i]:
            response += " " + "".join(marks[i])
        out.append(ArithmeticExample(f"What is {a} + {b}?", response, str(a + b)))
    return out


def task_paths(out_dir: str) -> dict[str, str]:
    """The files `write_synthetic_task(out_dir, ...)` writes, by role."""
    return {name: os.path.join(out_dir, f"{name}.jsonl") for name in ("sft_train", "rl_train", "rl_eval")}


def write_synthetic_task(out_dir: str, n_train: int, n_eval: int, seed: int = 0, digits: int = 2,
                         carry_slip: float = 0.0, ramble: float = 0.0) -> dict[str, str]:
    """sft_train.jsonl, rl_train.jsonl and rl_eval.jsonl; held-out questions never appear in
    the training files. Deterministic in (n_train, n_eval, seed, digits, carry_slip, ramble)."""
    os.makedirs(out_dir, exist_ok=True)
    pool = synthetic_examples(4 * (n_train + n_eval), seed=seed, digits=digits, carry_slip=carry_slip,
                              ramble=ramble)
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
