"""Evaluation end to end with a scripted rollout backend: benchmark-format fixtures (answers
checked by hand), grading of equivalent / wrong / truncated responses, the accuracy and
standard-error arithmetic, the results table, resuming after an interruption, and the
metrics plot script.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from gtpo_jax.config import EvalSection
from gtpo_jax.data.records import read_rl_records
from gtpo_jax.data.tokenizer import load_tokenizer, qwen3_tokenizer_dir
from gtpo_jax.evaluate import EvalConfig, evaluate_questions, results_table, run_evaluation, summarise
from gtpo_jax.rewards import GraderConfig
from gtpo_jax.rewards import Grader
from gtpo_jax.rollout.base import Rollout, RolloutBackend

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(ROOT, "tests", "fixtures", "eval")
DATASETS = {name: os.path.join(FIXTURES, f"{name}.jsonl")
            for name in ["math500", "gsm8k", "aime2024", "aime2025", "olympiadbench"]}
CUT = "length"  # finish reason of a response cut at max_new_tokens

# Two scripted samples per question (keyed by the gold), and whether each is right, by hand.
SCRIPT: dict[str, list[tuple[str, str, bool]]] = {
    # math500
    r"\frac{14}{3}": [(r"f(-2)=2, f(-1)=5/3, f(0)=1, so \boxed{\dfrac{14}{3}}", "stop", True),
                      (r"\boxed{4.6}", "stop", False)],
    r"\left( 3, \frac{\pi}{2} \right)": [(r"\boxed{(3, \frac{\pi}{2})}", "stop", True),
                                          (r"\boxed{\left(3,\frac{\pi}{2}\right)}", CUT, False)],  # cut: 0
    r"5\sqrt{2}": [(r"\boxed{5\sqrt{2}}", "stop", True), (r"\boxed{\sqrt{50}}", "stop", True)],
    # gsm8k
    "18": [(r"16 - 3 - 4 = 9 eggs, 9 * 2 = \boxed{18}", "stop", True), (r"\boxed{\$18}", "stop", True)],
    "3": [(r"\boxed{3}", "stop", True), ("The answer is 3.", "stop", False)],  # no box: 0
    "38": [(r"\boxed{38.0}", "stop", True), (r"\boxed{40}", "stop", False)],
    # aime2024
    "16": [(r"\boxed{016}", "stop", True), (r"\boxed{15}", "stop", False)],
    "24": [(r"\boxed{24}", "stop", True), (r"\boxed{24}", "stop", True)],
    # aime2025
    "70": [(r"b = 21, 49: \boxed{70}", "stop", True), (r"\boxed{70}", CUT, False)],
    "9": [(r"\boxed{9}", "stop", True), (r"\boxed{10}", "stop", False)],
    # olympiadbench
    r"$2 \sqrt{2}$": [(r"\boxed{\sqrt{8}}", "stop", True), (r"\boxed{2\sqrt{3}}", "stop", False)],
    "(-5,2)": [(r"\boxed{(-5, 2)}", "stop", True), (r"\boxed{[-5,2]}", "stop", False)],
    "[1,5]": [(r"\boxed{[1,5]}", "stop", True), (r"\boxed{[1, 5]}", "stop", True)],
}
# per-question means, from the script above
EXPECTED = {"math500": [0.5, 0.5, 1.0], "gsm8k": [1.0, 0.5, 0.5], "aime2024": [0.5, 1.0], "aime2025": [0.5, 0.5],
            "olympiadbench": [0.5, 0.5, 1.0]}


class Interrupted(RuntimeError):
    pass


class ScriptedBackend(RolloutBackend):
    """Returns SCRIPT's responses for the question found in each decoded prompt; sample j of a
    batch drawn with seed s is script[(j + s) % 2] when `rotate` (so seeds matter), and records
    the seed each question was generated with. Raises after `fail_after` generate calls."""

    def __init__(self, tokenizer, questions: dict[str, str], rotate: bool = False, fail_after: int | None = None):
        self.tok, self.questions, self.rotate, self.fail_after = tokenizer, questions, rotate, fail_after
        self.calls = 0
        self.seeds: dict[str, int] = {}

    def generate(self, prompts, n, *, seed):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise Interrupted("backend died")
        self.calls += 1
        groups = []
        for ids in prompts:
            text = self.tok.decode(ids)
            (question,) = [q for q in self.questions if q in text]
            gold = self.questions[question]
            self.seeds[question] = seed
            script = SCRIPT[gold]
            group = []
            for j in range(n):
                response, finish, _ = script[(j + (seed if self.rotate else 0)) % len(script)]
                tokens = np.asarray(self.tok.encode(response, add_special_tokens=False), np.int32)
                steps = np.arange(len(tokens), dtype=np.int32) // 2 + 1  # two tokens per forward
                group.append(Rollout(prompt=np.asarray(ids, np.int32), tokens=tokens, step_map=steps, logprobs=None,
                                     tail_tokens=None, tail_steps=None, finish_reason=finish, text=response))
            groups.append(group)
        return groups

    def update_params(self, params) -> None:
        pass


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(qwen3_tokenizer_dir())


@pytest.fixture(scope="module")
def grader():
    with Grader(num_workers=2, timeout_s=10.0) as g:
        yield g


def all_questions() -> dict[str, str]:
    return {q.question: q.ground_truth for path in DATASETS.values() for q in read_rl_records(path)}


def test_fixtures_are_scripted():
    for name, path in DATASETS.items():
        golds = [q.ground_truth for q in read_rl_records(path)]
        assert all(g in SCRIPT for g in golds) and len(golds) == len(EXPECTED[name])
        for g, mean in zip(golds, EXPECTED[name]):
            assert np.mean([ok for _, _, ok in SCRIPT[g]]) == mean


def test_evaluate_questions_and_summary(tokenizer, grader):
    questions = read_rl_records(DATASETS["math500"])
    backend = ScriptedBackend(tokenizer, all_questions())
    seen = []
    records = evaluate_questions(backend, grader, questions, tokenizer, n=2, seed=0, think=False,
                                 questions_per_batch=2, on_record=seen.append)
    assert [r["index"] for r in records] == [0, 1, 2] and len(seen) == 3
    assert [r["correct"] for r in records] == [[True, False], [True, False], [True, True]]
    assert records[1]["truncated"] == [False, True]  # graded right, but cut: scored 0
    assert records[0]["tokens_per_forward"][0] == pytest.approx(2.0, abs=0.5)
    s = summarise(records)
    per_q = np.array(EXPECTED["math500"])
    assert s["questions"] == 3 and s["samples"] == 6
    assert s["accuracy"] == pytest.approx(per_q.mean())
    assert s["stderr"] == pytest.approx(per_q.std(ddof=1) / math.sqrt(3))  # = 1/6
    assert s["stderr"] == pytest.approx(1 / 6)
    assert s["truncation_rate"] == pytest.approx(1 / 6) and s["timeouts"] == 0


def test_results_table():
    summaries = {"a": dict(accuracy=0.5, stderr=0.1, response_len=100.0, truncation_rate=0.0, tokens_per_forward=2.0),
                 "b": dict(accuracy=0.25, stderr=0.05, response_len=300.0, truncation_rate=0.5, tokens_per_forward=3.0)}
    lines = results_table(summaries).strip().splitlines()
    assert lines[0] == "| model | a | b | average |"
    assert lines[2] == "| accuracy (%) | 50.0 ± 10.0 | 25.0 ± 5.0 | 37.5 |"
    assert lines[3] == "| mean response length | 100 | 300 | 200 |"
    assert lines[5] == "| tokens per forward | 2.00 | 3.00 | 2.50 |"


def eval_config(out_dir: str, **kw) -> EvalConfig:
    cfg = EvalConfig(datasets=DATASETS, output_dir=str(out_dir), grader=GraderConfig(workers=2),
                     eval=EvalSection(num_samples=2, greedy=False, questions_per_batch=2), **kw)
    cfg.tokenizer.path = qwen3_tokenizer_dir()
    return cfg


def test_run_evaluation_and_resume(tokenizer, tmp_path):
    questions = all_questions()
    # uninterrupted; the tokenizer is loaded from the config's path
    full_backend = ScriptedBackend(tokenizer, questions, rotate=True)
    full = run_evaluation(eval_config(tmp_path / "full"), backend=full_backend)
    for name, per_q in EXPECTED.items():
        assert full[name]["accuracy"] == pytest.approx(np.mean(per_q))
        assert full[name]["stderr"] == pytest.approx(np.std(per_q, ddof=1) / math.sqrt(len(per_q)))
    with open(tmp_path / "full" / "results.json") as f:
        assert json.load(f) == full
    table = (tmp_path / "full" / "results.md").read_text()
    average = np.mean([100 * np.mean(v) for v in EXPECTED.values()])
    assert table.splitlines()[0] == "| model | math500 | gsm8k | aime2024 | aime2025 | olympiadbench | average |"
    assert f"| {average:.1f} |" in table.splitlines()[2] and f"{average:.1f}" == "65.0"

    # interrupted after three batches (math500's two, gsm8k's first), then resumed
    out = tmp_path / "resumed"
    first = ScriptedBackend(tokenizer, questions, rotate=True, fail_after=3)
    with pytest.raises(Interrupted):
        run_evaluation(eval_config(out), backend=first, tokenizer=tokenizer)
    done = {name: len((out / f"{name}.jsonl").read_text().splitlines()) for name in ["math500", "gsm8k"]}
    assert done == {"math500": 3, "gsm8k": 2} and not (out / "results.json").exists()
    lines = (out / "gsm8k.jsonl").read_text().splitlines()
    # the interruption cut the batch's second record mid-line: that question is redone, alone
    (out / "gsm8k.jsonl").write_text(lines[0] + "\n" + lines[1][:15])
    second = ScriptedBackend(tokenizer, questions, rotate=True)
    resumed = run_evaluation(eval_config(out), backend=second, tokenizer=tokenizer)
    gsm8k_first = read_rl_records(DATASETS["gsm8k"])[0].question
    assert gsm8k_first not in second.seeds and set(second.seeds) & set(first.seeds) == {
        read_rl_records(DATASETS["gsm8k"])[1].question}  # only the cut record is generated again
    assert {**first.seeds, **second.seeds} == full_backend.seeds  # same seed per question as uninterrupted
    with open(tmp_path / "full" / "results.json") as f, open(out / "results.json") as g:
        assert json.load(f) == json.load(g)
    assert (out / "results.md").read_text() == table
    for name in DATASETS:  # and the per-question records match, one line each
        def rows(d):
            recs = [json.loads(x) for x in (d / f"{name}.jsonl").read_text().splitlines() if x.startswith('{"index"')
                    and x.endswith("}")]
            return sorted(recs, key=lambda r: r["index"])
        assert rows(out) == rows(tmp_path / "full")


def test_plot_metrics(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    with open(metrics, "w") as f:
        for step in range(1, 6):
            f.write(json.dumps({"step": step, "reward_mean": 0.1 * step, "accuracy": 0.2 * step, "loss": 1.0 / step,
                                "response_len": 100 + step, "tokens_per_forward": 1.5 + 0.1 * step}) + "\n")
        f.write('{"step": 6, "rew')  # a cut last line is skipped
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "plot_metrics.py"), str(metrics), "-o", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for key in ["reward_mean", "accuracy", "response_len", "tokens_per_forward"]:
        assert key in proc.stdout
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
