"""The GTPO stage end to end on a tiny random model: rollouts, rewards, update, checkpoints, resume."""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import metrics_by_step
from gtpo_jax.config import Config
from gtpo_jax.config_loader import load_config
import multihost_helpers  # noqa: F401  (registers the digit_fraction reward)
from gtpo_jax.trainers import session as session_module
from gtpo_jax.trainers.gtpo import run_gtpo

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "gtpo_tiny.yaml")


def tiny_overrides(out_dir, **extra) -> list[str]:
    values = {
        "output_dir": str(out_dir),
        "model.path": "null",
        "model.preset": "tiny",
        "data.synthetic_train": 200,
        "data.synthetic_eval": 8,
        "train.steps": 4,
        "checkpoint.save_every": 2,
        "checkpoint.export_hf": "false",
        "eval.enabled": "false",
        "decoding.max_new_tokens": 16,
        "gtpo.num_task_per_step": 2,
        "gtpo.num_response_per_task": 4,
        "gtpo.dynamic_sampling": "false",
        # A random model is never right: a custom shaping reward gives the groups a spread.
        "gtpo.rewards": "{accuracy: 1.0, digit_fraction: 1.0}",
        "optim.lr": 1e-2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


class Crash(RuntimeError):
    pass


def test_gtpo_runs_and_resumes_exactly(tmp_path, monkeypatch):
    run_gtpo(load_config(Config, CONFIG, tiny_overrides(tmp_path / "full")))
    full = metrics_by_step(tmp_path / "full")
    assert sorted(full) == [1, 2, 3, 4]
    for rec in full.values():
        for key in ("reward_mean", "accuracy", "response_len", "tokens_per_forward", "loss", "grad_norm",
                    "clip_fraction", "ratio_mean", "rollout_s", "scoring_s", "update_s", "dapo/kept"):
            assert key in rec, key
        assert np.isfinite(rec["loss"]) and rec["grad_norm"] > 0
        assert rec["ratio_mean"] == pytest.approx(1.0, abs=1e-6)  # num_iterations 1: ρ ≡ 1
        # the trainer re-scores the sampler's own trajectories: same numbers up to float error
        assert rec["train_rollout_logprob_abs_diff"] < 1e-3
    # the policy moved: step 1 and step 4 rollouts differ in reward
    assert len({round(r["reward_mean"], 6) for r in full.values()}) > 1

    original = session_module.TrainingSession.update

    def crashing_update(self, arrays):
        if self.step == 2:
            raise Crash("simulated failure")
        return original(self, arrays)

    monkeypatch.setattr(session_module.TrainingSession, "update", crashing_update)
    with pytest.raises(Crash):
        run_gtpo(load_config(Config, CONFIG, tiny_overrides(tmp_path / "resumed")))
    monkeypatch.setattr(session_module.TrainingSession, "update", original)
    run_gtpo(load_config(Config, CONFIG, tiny_overrides(tmp_path / "resumed")))
    resumed = metrics_by_step(tmp_path / "resumed")
    for step in (1, 2, 3, 4):  # same prompts drawn, same rollouts, same updates
        for key in ("loss", "reward_mean", "response_len"):
            assert abs(resumed[step][key] - full[step][key]) <= 1e-6, (step, key)


def test_gtpo_kl_iterations_minibatches_tis(tmp_path):
    """beta > 0 (k3 to the frozen start policy), two iterations (θ_old computed once), two
    mini-batches and a truncated importance weight all run, and the reference is checkpointed."""
    overrides = tiny_overrides(tmp_path, **{"train.steps": 2, "gtpo.beta": 0.1, "gtpo.num_iterations": 2,
                                            "gtpo.mini_batches": 2, "gtpo.tis_cap": 2.0})
    run_gtpo(load_config(Config, CONFIG, overrides))
    recs = metrics_by_step(tmp_path)
    assert sorted(recs) == [1, 2]
    assert recs[1]["kl"] >= 0 and recs[2]["kl"] > 0  # the policy left the reference after step 1
    assert recs[2]["ratio_max"] != pytest.approx(1.0) or recs[2]["ratio_min"] != pytest.approx(1.0)

    from gtpo_jax.checkpoint import Checkpointer
    from gtpo_jax.model.params import iter_nested

    with Checkpointer(tmp_path / "checkpoints", read_only=True) as ckpt:
        reference = dict(iter_nested(ckpt.restore_extra(2, "reference")))
        first = dict(iter_nested(ckpt.restore(2)["params"]))
    from gtpo_jax.data.tokenizer import load_tokenizer
    from gtpo_jax.model import ModelConfig, init_model, params_of

    vocab = len(load_tokenizer(str(tmp_path / "tokenizer")))
    start = dict(iter_nested(params_of(init_model(ModelConfig.tiny(vocab_size=vocab, block_size=4), seed=0))))
    assert reference.keys() == first.keys() == start.keys()
    for k in reference:  # the reference is the starting policy, frozen
        np.testing.assert_array_equal(np.asarray(reference[k]), np.asarray(start[k]))
    assert any(not np.array_equal(reference[k], first[k]) for k in reference)  # while the policy moved
