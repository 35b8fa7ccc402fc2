"""Policy-gradient sanity: GTPO, through the real trainer (rollouts, DAPO, advantages, trajectory
layout, objective, update step), must climb a reward whose optimum is known, and must go the
other way with the advantage sign flipped. Per-token unit tests cannot catch a sign,
normalisation, step-map or layout error that still produces finite losses; these can.

The task replaces only the reward (the "grader"): a rollout is right when the first token of
its response is a digit. A random tiny model starts near 10/192 of that; the optimum is 1.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import metrics_by_step
from gtpo_jax.config import Config
from gtpo_jax.config_loader import load_config
from gtpo_jax.rewards import get_reward
from gtpo_jax.trainers import gtpo as gtpo_module
from gtpo_jax.trainers.gtpo import run_gtpo

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "gtpo_tiny.yaml")


def overrides(out_dir, **extra) -> list[str]:
    values = {
        "output_dir": str(out_dir),
        "model.path": "null",
        "model.preset": "tiny",
        "data.synthetic_train": 400,
        "data.synthetic_eval": 8,
        "checkpoint.save_every": 1000,
        "checkpoint.export_hf": "false",
        "eval.enabled": "false",
        "decoding.max_new_tokens": 4,
        "decoding.temperature": 1.0,
        # one compiled sampler shape (DAPO's rounds ask for 16 to 128 sequences): tiny calls, few compiles
        "decoding.jax.max_batch": 8,
        "gtpo.num_task_per_step": 8,
        "gtpo.num_response_per_task": 8,
        "gtpo.oversample": 2,
        "optim.lr": 3e-2,
        "optim.schedule": "constant",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def first_token_is_digit(inputs, weights, grader=None, *, need_correct=False, **params):
    """Stands in for `compute_rewards`: reward 1 when the response text starts with a digit."""
    reward = np.array([1.0 if inp.text[:1].isdigit() else 0.0 for inp in inputs], np.float32)
    return reward, {"first_digit": reward}, {"correct": reward > 0}


def tokens_per_forward_reward(inputs, weights, grader=None, *, need_correct=False, **params):
    """The speed reward alone: tokens per forward / B, whatever the text (docs/algorithm.md §5.1 without the
    correctness gate, so that a random model has a signal). "Right" for DAPO: some forward
    committed more than one token."""
    speed = get_reward("speed").fn
    reward = np.array([speed(inp, True, {}) for inp in inputs], np.float32)
    return reward, {"speed": reward}, {"correct": reward > 1.0 / inputs[0].block_size}


def run(tmp_path, monkeypatch, reward_fn, *, flip_sign=False, **extra) -> list[dict]:
    monkeypatch.setattr(gtpo_module, "compute_rewards", reward_fn)
    if flip_sign:
        original = gtpo_module.group_advantages
        monkeypatch.setattr(gtpo_module, "group_advantages", lambda r: -original(r))
    run_gtpo(load_config(Config, CONFIG, overrides(tmp_path, **extra)))
    recs = metrics_by_step(tmp_path)
    return [recs[s] for s in sorted(recs)]


def test_gtpo_climbs_a_known_reward(tmp_path, monkeypatch):
    # 7 steps: 0.06 -> 0.99 (0.86 at step 6); later steps keep too few mixed groups to train on
    recs = run(tmp_path, monkeypatch, first_token_is_digit, **{"train.steps": 7})
    acc = [r["accuracy"] for r in recs]
    print("accuracy per step", np.round(acc, 3).tolist())
    assert acc[0] < 0.2, acc
    assert acc[-1] > 0.9, acc


def test_gtpo_with_flipped_advantages_descends(tmp_path, monkeypatch):
    recs = run(tmp_path, monkeypatch, first_token_is_digit, flip_sign=True, **{"train.steps": 5})
    acc = [r["accuracy"] for r in recs]
    print("accuracy per step", np.round(acc, 3).tolist())
    assert acc[-1] < 0.5 * acc[0], acc


def test_speed_reward_raises_tokens_per_forward(tmp_path, monkeypatch):
    # A random model's confidences are ~0.006 (uniform over 192 tokens is 0.005): at threshold
    # 0.01 it almost never commits two slots in one forward; a sharper policy does.
    recs = run(tmp_path, monkeypatch, tokens_per_forward_reward,
               **{"train.steps": 6, "decoding.threshold": 0.01, "decoding.max_new_tokens": 8,
                  "gtpo.dynamic_sampling": "false"})
    tpf = [r["tokens_per_forward"] for r in recs]
    print("tokens per forward per step", np.round(tpf, 3).tolist())
    assert tpf[0] < 1.05 and tpf[-1] > 1.4, tpf
