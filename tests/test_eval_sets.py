"""The evaluation sets shipped in the package, and the evaluation config that names them."""

from __future__ import annotations

import json
import os

import pytest

from gtpo_jax.config_loader import load_config
from gtpo_jax.data.records import EVAL_SETS_DIR, RecordError, read_rl_records
from gtpo_jax.evaluate import EvalConfig, run_evaluation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COUNTS = {"math500.jsonl": 500, "gsm8k.jsonl": 1319, "aime2024.jsonl": 30, "aime2025.jsonl": 30,
          "olympiadbench.jsonl": 674}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_shipped_set_has_its_published_size_and_reads(name):
    with open(os.path.join(EVAL_SETS_DIR, name), encoding="utf-8") as f:
        raw = [json.loads(line) for line in f if line.strip()]
    assert len(raw) == COUNTS[name]
    assert all(set(r) == {"question", "ground_truth_answer"} and r["question"] and r["ground_truth_answer"] != ""
               for r in raw)
    records = read_rl_records(f"builtin:{name}")
    assert [(q.question, q.ground_truth) for q in records] == [(r["question"], str(r["ground_truth_answer"]))
                                                                for r in raw]


def test_shipped_sets_are_package_data_with_provenance():
    assert os.path.isfile(os.path.join(EVAL_SETS_DIR, "README.md"))
    with open(os.path.join(REPO, "pyproject.toml")) as f:
        assert "eval_sets/*.jsonl" in f.read()


def test_eval_config_from_a_clone_names_the_shipped_sets(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # not the repository: nothing relative to it may be needed
    cfg = load_config(EvalConfig, os.path.join(REPO, "configs", "eval_sdar8b.yaml"))
    assert {k: len(read_rl_records(v)) for k, v in cfg.datasets.items()} == {
        "MATH500": 500, "GSM8K": 1319, "AIME2024": 30, "AIME2025": 30, "OlympiadBench": 674}


def test_missing_evaluation_file_fails_before_anything_is_loaded(tmp_path):
    cfg = load_config(EvalConfig, None, [f"output_dir={tmp_path}", "datasets={A: builtin:math500.jsonl, B: nope.jsonl}",
                                         "model.path=/no/such/model"])
    with pytest.raises(RecordError, match=r"evaluation set\(s\) not found: nope.jsonl.*builtin:gsm8k.jsonl"):
        run_evaluation(cfg)
