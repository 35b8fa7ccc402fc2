"""Faults a user or the machine inflicts: each case reproduced, then the behaviour we promise instead.

Cases (issue 19): a GTPO step that keeps no group; evaluation results keyed by model and settings;
a full disk (metrics writers, background saves); export safety; corrupted checkpoints; one writer
per output_dir; config values checked at load time; metrics.jsonl after a resume; rewards linear
in the response length; trust_remote_code only on request.
"""

from __future__ import annotations

import os

import pytest

from conftest import metrics_by_step
from gtpo_jax.config import Config
from gtpo_jax.config_loader import load_config

GTPO_TINY = os.path.join(os.path.dirname(__file__), "..", "configs", "gtpo_tiny.yaml")


def gtpo_overrides(out_dir, **extra) -> list[str]:
    values = {
        "output_dir": str(out_dir), "model.path": "null", "model.preset": "tiny",
        "data.synthetic_train": 64, "data.synthetic_eval": 4, "train.steps": 1,
        "checkpoint.save_every": 1, "checkpoint.export_hf": "false", "eval.enabled": "false",
        "rollout.max_new_tokens": 8, "gtpo.num_task_per_step": 2, "gtpo.num_response_per_task": 2,
        "gtpo.oversample": 1,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


# ---- 1. a GTPO step that keeps no group -------------------------------------------------------
def test_gtpo_step_without_a_kept_group_does_not_crash(tmp_path):
    from gtpo_jax.trainers.gtpo import run_gtpo

    # A random model never answers right: every group is all-wrong, DAPO keeps none.
    run_gtpo(load_config(Config, GTPO_TINY, gtpo_overrides(tmp_path)))
    records = metrics_by_step(tmp_path)
    assert sorted(records) == [1]
    assert all(r["dapo/kept"] == 0 and "loss" not in r for r in records.values())
