"""Optimizer settings: stage-dependent learning-rate defaults, and schedules that count optimizer
updates (docs/algorithm.md §5.5), checked against the schedule's formula written here."""

import math

import jax.numpy as jnp
import numpy as np
import pytest

from gtpo_jax.config import Config
from gtpo_jax.config_loader import dump_yaml, load_config


def test_stage_learning_rate_defaults_are_resolved_and_shown():
    sft, gtpo = Config(stage="sft"), Config(stage="gtpo")
    assert sft.optim.lr == 1e-5 and gtpo.optim.lr == 1e-6
    assert "lr: 1.0e-06" in dump_yaml(gtpo)  # what config.yaml / --print-config show
    assert load_config(Config, None, ["stage=gtpo"]).optim.lr == 1e-6
    assert load_config(Config, None, ["stage=sft"]).optim.lr == 1e-5
    assert load_config(Config, None, ["stage=gtpo", "optim.lr=3e-4"]).optim.lr == 3e-4  # explicit wins


def warmup_cosine(n, peak, warmup, total, end):
    """optax's warmup_cosine_decay_schedule from 0, written out: n counts optimizer updates."""
    if n < warmup:
        return peak * n / warmup
    frac = min(n - warmup, total - warmup) / (total - warmup)
    return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * frac))


def test_schedule_counts_optimizer_updates_and_logs_the_applied_lr(tmp_path):
    from gtpo_jax.trainers.session import TrainingSession

    overrides = ["stage=gtpo", f"output_dir={tmp_path}", "data.synthetic=true", "data.synthetic_train=20",
                 "data.synthetic_eval=4", "train.steps=3", "gtpo.num_iterations=2", "gtpo.mini_batches=2",
                 "optim.schedule=warmup_cosine", "optim.warmup_steps=2", "optim.min_lr_ratio=0.1", "optim.lr=1e-3",
                 "checkpoint.async_save=false"]
    cfg = load_config(Config, None, overrides)
    session = TrainingSession(cfg)
    try:
        session.compile_step(lambda model, mb: (jnp.sum(model.head_weight()) * mb["x"].sum(), {}))
        applied = [session.update({"x": np.ones((1, 4), np.float32)})["lr"] for _ in range(12)]  # 3 steps × 2 × 2
    finally:
        session.abort()  # the writers' threads stopped (left open, TensorBoard's raised at interpreter exit)
    total = 3 * 2 * 2
    want = [warmup_cosine(n, 1e-3, 2, total, 1e-4) for n in range(total)]
    np.testing.assert_allclose(applied, want, rtol=1e-5, atol=1e-12)
    assert min(applied[3:]) > 1.1e-4  # the decay ends with the run, not after a quarter of it
