"""The speed-reward demo's analysis: the habit of sampled answers (T = 1, the rollout decoding) of
checkpoints on the held-out questions, and tokens per forward by habit.

With `data.synthetic_ramble` > 0 that share of the SFT teacher's solutions trails off into random
punctuation after the boxed answer; a model imitating it must choose, after the `}`, whether to stop
or to ramble, and commits rambling marks about one per forward. Per checkpoint this prints, for all
answers and for those that stop / ramble: their share, tokens per forward, accuracy (boxed sum ==
true sum, not cut) and length in tokens. README (the CPU demo) quotes it.

python scripts/habits.py runs/tiny/sft/checkpoints runs/tiny/gtpo/checkpoints runs/tiny/gtpo_speed/checkpoints \\
    --config runs/tiny/gtpo_speed/config.yaml
"""

from __future__ import annotations

import argparse
import json
import re

import numpy as np

from gtpo_jax.checkpoint import load_model
from gtpo_jax.config import Config
from gtpo_jax.config_loader import load_config
from gtpo_jax.data.records import read_rl_records
from gtpo_jax.data.tokenizer import chat_prompt, load_tokenizer, resolve_token_ids
from gtpo_jax.rollout import RolloutSpec
from gtpo_jax.rollout.jax_backend import JaxRollout

BOXED = re.compile(r"\\boxed\{[^{}]*\}")


def answer_habit(text: str) -> str:
    """'rambles' when anything but white space follows the last `\\boxed{...}`, else 'stops'
    (also for an answer without one)."""
    ends = [m.end() for m in BOXED.finditer(text)]
    return "rambles" if ends and text[ends[-1]:].strip() else "stops"


def is_right(question: str, text: str) -> bool:
    a, b = map(int, re.match(r"What is (\d+) \+ (\d+)\?", question).groups())
    boxed = re.findall(r"boxed\{(\d+)\}", text)
    return bool(boxed) and int(boxed[-1]) == a + b


def sample(path: str, cfg: Config, tokenizer, questions, n: int, seed: int) -> list[tuple[str, str, float, bool, int]]:
    """(question, text, tokens per forward, truncated, length in tokens) of n T=1 samples per question."""
    spec = RolloutSpec(cfg.decoding, resolve_token_ids(tokenizer, cfg.block_size), greedy=False)
    backend = JaxRollout.from_spec(spec, load_model(path), tokenizer=tokenizer)
    out = []
    for start in range(0, len(questions), 64):
        batch = questions[start : start + 64]
        prompts = [tokenizer.encode(chat_prompt(q.question, think=cfg.data.think), add_special_tokens=False)
                   for q in batch]
        for q, group in zip(batch, backend.generate(prompts, n, seed=seed + start)):
            out.extend((q.question, r.text, float(r.tokens_per_forward), bool(r.truncated), len(r.tokens))
                       for r in group)
    return out


def summary(samples: list[tuple[str, str, float, bool, int]]) -> dict:
    rows = [(answer_habit(text), tpf, is_right(q, text) and not cut, length) for q, text, tpf, cut, length in samples]

    def stats(sel: list) -> dict:
        if not sel:
            return {"share": 0.0}
        return {"share": round(len(sel) / len(rows), 3),
                "tokens_per_forward": round(float(np.mean([r[1] for r in sel])), 3),
                "accuracy": round(float(np.mean([r[2] for r in sel])), 3),
                "length": round(float(np.mean([r[3] for r in sel])), 1)}

    return {"answers": len(rows), **stats(rows), **{habit: stats([r for r in rows if r[0] == habit])
                                                      for habit in ("stops", "rambles")}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="checkpoint roots or HF directories")
    ap.add_argument("--config", default="runs/tiny/gtpo_speed/config.yaml",
                    help="a GTPO run's config: held-out questions, decoding")
    ap.add_argument("--samples", type=int, default=4, help="T=1 samples per held-out question")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    cfg = load_config(Config, args.config, [])
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    questions = [q for f in cfg.data.eval_files for q in read_rl_records(f)][: cfg.eval.max_questions or None]
    for path in args.models:
        print(path, json.dumps(summary(sample(path, cfg, tokenizer, questions, args.samples, args.seed))), flush=True)


if __name__ == "__main__":
    main()
