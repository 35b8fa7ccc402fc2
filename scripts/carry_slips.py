"""What the demo's GTPO changed: held-out answers of checkpoints, sorted into right / carry
forgotten (the boxed sum is the sum without carries) / other wrong, for the questions whose units
column carries and for the others. Greedy by default; `--samples N` draws N answers per question
at the config's decoding temperature instead (what the GTPO runs' rollout accuracy measures).

python scripts/carry_slips.py runs/tiny/sft/checkpoints runs/tiny/gtpo/checkpoints \\
    --config runs/tiny/gtpo/config.yaml
"""

from __future__ import annotations

import argparse
import json
import re

from gtpo_jax.checkpoint import load_model
from gtpo_jax.config import Config
from gtpo_jax.config_loader import load_config
from gtpo_jax.data.records import read_rl_records
from gtpo_jax.data.tokenizer import chat_prompt, load_tokenizer, resolve_token_ids
from gtpo_jax.rewards import Grader
from gtpo_jax.rollout import RolloutSpec
from gtpo_jax.rollout.jax_backend import JaxRollout


def kind(question: str, response: str, correct: bool) -> tuple[str, str]:
    a, b = map(int, re.match(r"What is (\d+) \+ (\d+)\?", question).groups())
    boxed = re.search(r"boxed\{(\d+)\}", response)
    without_carry = (a // 10 + b // 10) * 10 + (a % 10 + b % 10) % 10
    verdict = "right" if correct else ("forgot" if boxed and int(boxed.group(1)) == without_carry else "other")
    return ("carry" if a % 10 + b % 10 >= 10 else "no carry"), verdict


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="+", help="checkpoint roots or HF directories")
    ap.add_argument("--config", default="runs/tiny/gtpo/config.yaml", help="a GTPO run's config: eval questions, decoding")
    ap.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                    help="overrides of the config, e.g. decoding.strategy=sequential")
    ap.add_argument("--samples", type=int, default=0,
                    help="N > 0: N sampled answers per question at decoding.temperature instead of one greedy")
    args = ap.parse_args()
    cfg = load_config(Config, args.config, args.overrides)
    if cfg.data.synthetic_digits != 2:
        raise SystemExit("carry_slips.py reads two-digit questions (data.synthetic_digits: 2)")
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    questions = [q for f in cfg.data.eval_files for q in read_rl_records(f)][: cfg.eval.max_questions or None]
    prompts = [tokenizer.encode(chat_prompt(q.question, think=cfg.data.think), add_special_tokens=False)
               for q in questions]
    n = max(args.samples, 1)
    for path in args.models:
        spec = RolloutSpec(cfg.decoding, resolve_token_ids(tokenizer, cfg.block_size), greedy=args.samples == 0)
        backend = JaxRollout.from_spec(spec, load_model(path), tokenizer=tokenizer)
        grader = Grader(num_workers=1, timeout_s=cfg.grader.timeout_s)
        try:
            groups = [g for start in range(0, len(prompts), 64)
                      for g in backend.generate(prompts[start : start + 64], n, seed=start)]
            graded = grader.grade([(r.text, q.ground_truth) for q, g in zip(questions, groups) for r in g])
        finally:
            grader.close()
        counts: dict[str, int] = {}
        responses = [(q, r) for q, g in zip(questions, groups) for r in g]
        for (q, r), grade in zip(responses, graded):
            key = "/".join(kind(q.question, r.text, bool(grade.correct) and not r.truncated))
            counts[key] = counts.get(key, 0) + 1
        print(path, json.dumps(dict(sorted(counts.items()))), flush=True)


if __name__ == "__main__":
    main()
