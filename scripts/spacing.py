"""The speed-reward demo's analysis: the habit of sampled answers (T = 1, the rollout decoding) of
checkpoints on the held-out questions, and tokens per forward by habit.

With `data.synthetic_spacing` > 0 that share of the SFT teacher's solutions comes from a careless
typist, who spaces the first operator of the worked steps (`7 + 5`, the tell) and then each side of
every later operator at even odds; a model imitating it must guess each later space, and the guess
moves the rest of the block. Per checkpoint this prints the share of spaced operator sides, and for
answers that are tidy (no space) / careless (the tell) / mixed (spaces without the tell): their
share, tokens per forward and accuracy (boxed sum == true sum). README (the CPU demo) quotes it.

python scripts/spacing.py runs/tiny/sft/checkpoints runs/tiny/gtpo/checkpoints runs/tiny/gtpo_speed/checkpoints \\
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

OPERATOR = re.compile(r" ?[+=] ?")


def answer_format(text: str) -> tuple[str, int, int]:
    """('tidy' | 'careless' | 'mixed', spaced operator sides, operator sides) of the worked steps
    (before ". So"): careless when the first operator has the careless typist's spaces on both sides."""
    ops = OPERATOR.findall(text.split(". So ", 1)[0])
    spaced = sum(op.count(" ") for op in ops)
    kind = "tidy" if spaced == 0 else "careless" if ops[0] == f" {ops[0].strip()} " else "mixed"
    return kind, spaced, 2 * len(ops)


def is_right(question: str, text: str) -> bool:
    a, b = map(int, re.match(r"What is (\d+) \+ (\d+)\?", question).groups())
    boxed = re.findall(r"boxed\{(\d+)\}", text)
    return bool(boxed) and int(boxed[-1]) == a + b


def sample(path: str, cfg: Config, tokenizer, questions, n: int, seed: int) -> list[tuple[str, str, float, bool]]:
    """(question, text, tokens per forward, truncated) of n T=1 samples per question."""
    spec = RolloutSpec(cfg.decoding, resolve_token_ids(tokenizer, cfg.block_size), greedy=False)
    backend = JaxRollout.from_spec(spec, load_model(path), tokenizer=tokenizer)
    out = []
    for start in range(0, len(questions), 64):
        batch = questions[start : start + 64]
        prompts = [tokenizer.encode(chat_prompt(q.question, think=cfg.data.think), add_special_tokens=False)
                   for q in batch]
        for q, group in zip(batch, backend.generate(prompts, n, seed=seed + start)):
            out.extend((q.question, r.text, float(r.tokens_per_forward), bool(r.truncated)) for r in group)
    return out


def summary(samples: list[tuple[str, str, float, bool]]) -> dict:
    rows = [(*answer_format(text), tpf, is_right(q, text) and not cut) for q, text, tpf, cut in samples]
    spaced = sum(r[1] for r in rows) / max(1, sum(r[2] for r in rows))
    out = {"answers": len(rows), "spaced_sides": round(spaced, 3),
           "tokens_per_forward": round(float(np.mean([r[3] for r in rows])), 3),
           "accuracy": round(float(np.mean([r[4] for r in rows])), 3)}
    for kind in ("tidy", "careless", "mixed"):
        sel = [r for r in rows if r[0] == kind]
        out[kind] = {"share": round(len(sel) / len(rows), 3),
                     "tokens_per_forward": round(float(np.mean([r[3] for r in sel])), 3) if sel else None,
                     "accuracy": round(float(np.mean([r[4] for r in sel])), 3) if sel else None}
    return out


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
