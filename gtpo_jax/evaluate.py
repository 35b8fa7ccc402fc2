"""Evaluation: mean accuracy over `n` samples per question (pass@1 averaged) on RL-format sets.

`python -m gtpo_jax.evaluate --config configs/eval_X.yaml [key=value ...]` writes, under
`output_dir`, one JSONL of finished questions per dataset (so an interrupted run continues
where it stopped), `results.json` and `results.md` (the seed's table: one column per dataset
plus the average). Trainers call `evaluate_model` for held-out accuracy during training.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import os
import sys
import time

import numpy as np
from tqdm import tqdm

from gtpo_jax.cli import one_line_errors
from gtpo_jax.config import Config, EvalSection, ModelSection, TokenizerSection, decoding_problems
from gtpo_jax.config_checks import range_problems
from gtpo_jax.config_loader import ConfigError, keys_help, load_config
from gtpo_jax.data.records import check_data_files, read_rl_records
from gtpo_jax.data.tokenizer import TokenIds, chat_prompt, load_tokenizer, resolve_token_ids, tokenizer_dir_for
from gtpo_jax.logs import setup_logging
from gtpo_jax.rewards import Grader, GraderConfig
from gtpo_jax.rollout import RolloutSpec, make_eval_backend
from gtpo_jax.rollout.jax_backend import JaxRollout
from gtpo_jax.sampling import DecodingConfig
from gtpo_jax.sharding import MeshConfig

log = logging.getLogger("gtpo_jax")


@dataclasses.dataclass
class EvalConfig:
    """The config tree of `python -m gtpo_jax.evaluate`: the training tree's sections (model,
    tokenizer, decoding, mesh, grader, eval) plus what names the datasets and the output."""

    datasets: dict  # name -> RL-format file (JSONL / JSON / Parquet), or builtin:<file> for a shipped set
    output_dir: str = "runs/eval"  # where per-question progress, results.json and results.md go
    block_size: int = 4  # diffusion block size B (must match the checkpoint's)
    seed: int = 0  # seed of the sampling (each batch of questions gets seed + its offset)
    think: bool = False  # end the prompt with <think>
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    tokenizer: TokenizerSection = dataclasses.field(default_factory=TokenizerSection)
    decoding: DecodingConfig = dataclasses.field(default_factory=DecodingConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    grader: GraderConfig = dataclasses.field(default_factory=GraderConfig)
    eval: EvalSection = dataclasses.field(default_factory=EvalSection)

    # Keys of earlier releases and where they went: load_config names the new place of each one used.
    MOVED_KEYS = {
        **{key: new for key, new in Config.MOVED_KEYS.items() if key.startswith("rollout")},
        "n": "eval.num_samples", "greedy": "eval.greedy", "max_questions": "eval.max_questions",
        "questions_per_batch": "eval.questions_per_batch", "grader_workers": "grader.workers",
        "grader_timeout_s": "grader.timeout_s", "backend_options": None,
    }

    def validate(self) -> None:
        """Every value in its allowed range (ConfigError naming each bad key), before any model loads."""
        problems = range_problems(self)
        if not self.datasets:
            problems.append("datasets must name at least one dataset, e.g. {aime24: data/aime24.jsonl}")
        problems.extend(decoding_problems(self.decoding))
        if problems:
            raise ConfigError("invalid configuration: " + "; ".join(problems))


def summarise(records: list[dict]) -> dict:
    """Per-question records -> accuracy (mean over questions of the per-question mean over
    samples) with its standard error, and decoding statistics over all samples."""
    if not records:
        return {"questions": 0, "samples": 0, "accuracy": float("nan"), "stderr": float("nan")}
    per_question = np.array([np.mean(r["correct"]) for r in records])
    lengths = [x for r in records for x in r["lengths"]]
    stderr = float(per_question.std(ddof=1) / math.sqrt(len(per_question))) if len(per_question) > 1 else 0.0
    return {
        "questions": len(records),
        "samples": int(sum(len(r["correct"]) for r in records)),
        "accuracy": float(per_question.mean()),
        "stderr": stderr,
        "response_len": float(np.mean(lengths)),
        "truncation_rate": float(np.mean([x for r in records for x in r["truncated"]])),
        "tokens_per_forward": float(np.mean([x for r in records for x in r["tokens_per_forward"]])),
        "timeouts": int(sum(r.get("grader_timeouts", 0) for r in records)),
    }


def evaluate_questions(backend, grader, questions, tokenizer, *, n: int, seed: int, think: bool,
                       questions_per_batch: int, done: dict[int, dict] | None = None, on_record=None,
                       desc: str = "eval") -> list[dict]:
    """Roll out and grade every question not already in `done`; returns records in question order."""
    done = dict(done or {})
    bar = tqdm(total=len(questions), initial=sum(q.index in done for q in questions), desc=desc,
               dynamic_ncols=True, leave=False, disable=None)  # no bar in log files
    # Batches are fixed slices of the question list, each with its own seed, so a resumed run
    # draws the same samples for the batches it still has to do as an uninterrupted one would.
    for start in range(0, len(questions), questions_per_batch):
        batch = [q for q in questions[start : start + questions_per_batch] if q.index not in done]
        if not batch:
            continue
        prompt_ids = [tokenizer.encode(chat_prompt(q.question, think=think), add_special_tokens=False) for q in batch]
        groups = backend.generate(prompt_ids, n, seed=seed + start)
        pairs = [(r.text, q.ground_truth) for q, group in zip(batch, groups) for r in group]
        results = grader.grade(pairs)
        for i, (q, group) in enumerate(zip(batch, groups)):
            graded = results[i * n : (i + 1) * n]
            record = {
                "index": q.index,
                "correct": [bool(g.correct) and not r.truncated for g, r in zip(graded, group)],
                "lengths": [int(len(r.tokens)) for r in group],
                "truncated": [bool(r.truncated) for r in group],
                "tokens_per_forward": [float(r.tokens_per_forward) for r in group],
                "grader_timeouts": sum(g.status == "timeout" for g in graded),
                "response": group[0].text,
            }
            done[q.index] = record
            if on_record is not None:
                on_record(record)
        bar.update(len(batch))
    bar.close()
    return [done[q.index] for q in questions]


def evaluate_model(model, tokenizer, cfg: Config, ids: TokenIds, *, mesh=None) -> dict:
    """Held-out accuracy of a training run's current model on `cfg.data.eval_files` (JAX sampler)."""
    questions = [q for f in cfg.data.eval_files for q in read_rl_records(f)]
    if cfg.eval.max_questions:
        questions = questions[: cfg.eval.max_questions]
    questions = [dataclasses.replace(q, index=i) for i, q in enumerate(questions)]
    spec = RolloutSpec(cfg.decoding, ids, greedy=cfg.eval.greedy)
    backend = JaxRollout.from_spec(spec, model, tokenizer=tokenizer, mesh=mesh)
    grader = Grader.from_config(cfg.grader)
    try:
        records = evaluate_questions(backend, grader, questions, tokenizer, n=cfg.eval.num_samples,
                                     seed=cfg.train.seed, think=cfg.data.think,
                                     questions_per_batch=cfg.eval.questions_per_batch)
    finally:
        grader.close()
    return summarise(records)


def results_table(summaries: dict[str, dict]) -> str:
    """The seed's table: accuracy (%) per dataset and the unweighted average."""
    names = list(summaries)
    accs = [100 * summaries[n]["accuracy"] for n in names]
    header = "| model | " + " | ".join(names) + " | average |"
    sep = "|" + "---|" * (len(names) + 2)
    row = "| accuracy (%) | " + " | ".join(f"{a:.1f} ± {100 * summaries[n]['stderr']:.1f}" for a, n in zip(accs, names))
    row += f" | {np.mean(accs):.1f} |"
    extra = []
    for key, label, fmt in [("response_len", "mean response length", "{:.0f}"),
                            ("truncation_rate", "truncation rate", "{:.3f}"),
                            ("tokens_per_forward", "tokens per forward", "{:.2f}")]:
        values = [summaries[n][key] for n in names]
        extra.append(f"| {label} | " + " | ".join(fmt.format(v) for v in values) + f" | {fmt.format(np.mean(values))} |")
    return "\n".join([header, sep, row, *extra]) + "\n"


def _files_fingerprint(path: str | None) -> list | None:
    """Names, sizes and modification times of the files under `path`: changes whenever a model
    directory is rewritten (a copy without preserved times counts as a new model: safe)."""
    if not path:
        return None
    if os.path.isfile(path):
        stat = os.stat(path)
        return [[os.path.basename(path), stat.st_size, stat.st_mtime_ns]]
    entries = []
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for f in sorted(files):
            stat = os.stat(os.path.join(root, f))
            entries.append([os.path.relpath(os.path.join(root, f), path), stat.st_size, stat.st_mtime_ns])
    return entries


def evaluation_key(cfg: EvalConfig, dataset_path: str) -> dict:
    """What per-question results depend on: the model (its files), the dataset file and every
    decoding setting. Stored results are reused only under the same key."""
    key = {
        "model": {"path": os.path.abspath(cfg.model.path) if cfg.model.path else None,
                  "files": _files_fingerprint(cfg.model.path), "preset": cfg.model.preset,
                  "init_seed": cfg.model.init_seed, "dtype": cfg.model.dtype, "param_dtype": cfg.model.param_dtype},
        "tokenizer": _files_fingerprint(cfg.tokenizer.path),
        "dataset": _files_fingerprint(dataset_path),
        "decoding": {"n": cfg.eval.num_samples, "greedy": cfg.eval.greedy, "seed": cfg.seed, "think": cfg.think,
                     "block_size": cfg.block_size, "questions_per_batch": cfg.eval.questions_per_batch,
                     "rollout": dataclasses.asdict(cfg.decoding)},
    }
    key["fingerprint"] = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return key


def load_progress(progress_file: str, key: dict) -> dict[int, dict]:
    """Finished questions of an interrupted evaluation with the same key. Results made under
    another key (another model, dataset or decoding settings) are moved aside, never reused."""
    key_file = f"{progress_file}.key.json"
    if not os.path.exists(progress_file):
        _write_json(key_file, key)
        return {}
    done, foreign = {}, False
    with open(progress_file) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by an interruption: that question is redone
            if rec.get("key") != key["fingerprint"]:
                foreign = True
                break
            done[rec["index"]] = rec
    if foreign:
        old_key = {}
        if os.path.exists(key_file):
            with open(key_file) as f:
                old_key = json.load(f)
        changed = [k for k in ("model", "tokenizer", "dataset", "decoding") if old_key.get(k) != key[k]]
        aside = f"{progress_file}.stale-{int(time.time())}"
        os.rename(progress_file, aside)
        log.warning("%s holds results of another evaluation (differs in: %s); moved them to %s and evaluating "
                    "afresh", progress_file, ", ".join(changed) or "unknown, written before keys existed", aside)
        done = {}
    _write_json(key_file, key)
    return done


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1, sort_keys=True)


def run_evaluation(cfg: EvalConfig, *, backend=None, tokenizer=None) -> dict:
    """Evaluate every dataset of `cfg`, resuming from the per-dataset JSONL files. `backend`
    (a RolloutBackend) and `tokenizer` default to the ones the config describes; passing them
    lets callers (tests, notebooks) reuse a loaded engine. A passed backend is not closed."""
    # Every dataset is read before the tokenizer, the model and the engine: a wrong path or a
    # bad record fails in a second, not after minutes of loading.
    check_data_files(cfg.datasets.values(), what="evaluation set")
    question_sets = {}
    for name, path in cfg.datasets.items():
        questions = read_rl_records(path)
        if cfg.eval.max_questions:
            questions = questions[: cfg.eval.max_questions]
        question_sets[name] = [dataclasses.replace(q, index=i) for i, q in enumerate(questions)]
    os.makedirs(cfg.output_dir, exist_ok=True)
    if tokenizer is None:
        tokenizer = load_tokenizer(cfg.tokenizer.path or tokenizer_dir_for(cfg.model.path))
    own_backend = backend is None
    if own_backend:
        spec = RolloutSpec(cfg.decoding, resolve_token_ids(tokenizer, cfg.block_size), greedy=cfg.eval.greedy)
        backend = make_eval_backend(spec, cfg.model.path, runtime=cfg.model, mesh=cfg.mesh, tokenizer=tokenizer,
                                    work_dir=cfg.output_dir)
    grader = Grader.from_config(cfg.grader)
    summaries = {}
    try:
        for name, questions in question_sets.items():
            progress_file = os.path.join(cfg.output_dir, f"{name}.jsonl")
            key = evaluation_key(cfg, path)
            done = load_progress(progress_file, key)
            if done:
                log.info("%s: %d of %d questions already evaluated with this model and these settings; continuing",
                         name, len(done), len(questions))
            if os.path.exists(progress_file) and os.path.getsize(progress_file):
                with open(progress_file, "rb+") as f:  # end a line cut by an interruption
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
            with open(progress_file, "a") as out:
                def append(record, out=out, fingerprint=key["fingerprint"]):
                    out.write(json.dumps({**record, "key": fingerprint}) + "\n")
                    out.flush()

                records = evaluate_questions(backend, grader, questions, tokenizer, n=cfg.eval.num_samples,
                                             seed=cfg.seed, think=cfg.think,
                                             questions_per_batch=cfg.eval.questions_per_batch,
                                             done=done, on_record=append, desc=name)
            summaries[name] = summarise(records)
            log.info("%s: accuracy %.1f%% ± %.1f over %d questions × %d samples", name,
                     100 * summaries[name]["accuracy"], 100 * summaries[name]["stderr"], len(records),
                     cfg.eval.num_samples)
    finally:
        grader.close()
        if own_backend:
            backend.close()
    table = results_table(summaries)
    with open(os.path.join(cfg.output_dir, "results.json"), "w") as f:
        json.dump(summaries, f, indent=2)
    with open(os.path.join(cfg.output_dir, "results.md"), "w") as f:
        f.write(table)
    print(table)
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gtpo_jax.evaluate", description=__doc__,
                                     epilog="config keys (type = default):\n" + keys_help(EvalConfig),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. n=4 max_questions=50")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        cfg = load_config(EvalConfig, args.config, args.overrides)
        cfg.validate()
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with one_line_errors(args.debug):
        run_evaluation(cfg)
        return 0
    return 1  # one_line_errors printed the error


if __name__ == "__main__":
    sys.exit(main())
