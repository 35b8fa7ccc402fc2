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


# ---- 8. every config value checked at load time --------------------------------------------------
BAD_VALUES = [  # override, the allowed range the one-line error must state
    ("optim.lr=-1e-3", "optim.lr must be > 0"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("train.steps=-5", "train.steps must be >= 1"),
    ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0"),
    ("rollout.threshold=1.5", "rollout.threshold must be [0, 1]"),
    ("rollout.threshold=-1", "rollout.threshold must be [0, 1]"),
    ("gtpo.eps_low=-0.5", "gtpo.eps_low must be [0, 1)"),
    ("gtpo.beta=-1", "gtpo.beta must be >= 0"),
    ("gtpo.rewards={accuracy: -1.0}", "gtpo.rewards.accuracy must be >= 0"),
    ("rollout.temperature=0", "rollout.temperature must be > 0"),
    ("rollout.top_p=0", "rollout.top_p must be (0, 1]"),
    ("checkpoint.save_every=0", "checkpoint.save_every must be >= 1"),
    ("gtpo.grader_timeout_s=0", "gtpo.grader_timeout_s must be > 0"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("train.vocab_chunk=0", "train.vocab_chunk must be >= 1"),
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("gtpo.num_task_per_step=0", "gtpo.num_task_per_step must be >= 1"),
    ("optim.lr=.nan", "optim.lr must be a finite number"),
    ("rollout.min_new_tokens=99", "rollout.min_new_tokens (99) must be <= rollout.max_new_tokens (8)"),
]


@pytest.mark.parametrize("override, allowed", BAD_VALUES, ids=[case[0] for case in BAD_VALUES])
def test_bad_config_value_is_one_line_exit_2_before_any_work(tmp_path, capsys, monkeypatch, override, allowed):
    from gtpo_jax import train

    def no_run(cfg):
        raise AssertionError("the run started despite a bad config")

    monkeypatch.setattr(train, "run", no_run)
    rc = train.main(["--config", GTPO_TINY, *gtpo_overrides(tmp_path / "run"), override])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and allowed in err, err
    assert not (tmp_path / "run").exists()


def test_negative_reward_weight_with_opt_in_is_accepted(tmp_path):
    cfg = load_config(Config, GTPO_TINY, gtpo_overrides(tmp_path) + [
        "gtpo.rewards={accuracy: 1.0, repetition: -0.5}", "gtpo.negative_reward_weights=true"])
    cfg.validate()


def test_error_mid_run_is_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    from gtpo_jax import train

    def failing_run(cfg):
        raise RuntimeError("prompt 7 has 100000 tokens,\n more than data.max_len")

    monkeypatch.setattr(train, "run", failing_run)
    argv = ["--config", GTPO_TINY, *gtpo_overrides(tmp_path)]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert err == ("error: RuntimeError: prompt 7 has 100000 tokens, more than data.max_len "
                   "(rerun with --debug for the traceback)\n")
    with pytest.raises(RuntimeError, match="100000 tokens"):
        train.main(argv + ["--debug"])
