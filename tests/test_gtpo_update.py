"""`update_policy` (docs/algorithm.md §5.4–§5.5) against the direct per-token loss of test_gtpo_loss: θ_old
computed once before the first update, one update per mini-batch normalised over that
mini-batch, empty responses counted, shrink > 1 in the loss with an exact-state importance
weight, and a missing rollout log-prob refused."""

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from gtpo_jax import packing, trajectory
from gtpo_jax.config import Config
from gtpo_jax.data.tokenizer import TokenIds
from gtpo_jax.model import ModelConfig, init_model
from gtpo_jax.rollout.base import Rollout
from gtpo_jax.trainers.common import make_update_step
from gtpo_jax.trainers.gtpo import ScoredGroup, speed_signal_metrics, update_policy
from gtpo_jax.trainers.gtpo_objective import gtpo_loss_fn
from test_gtpo_loss import B, MASK, VOCAB, direct_logprobs, direct_loss, make_rollouts
from test_trajectory import naive_logprobs

LR = 0.5  # plain SGD, large enough that the second pass sees ρ ≠ 1 and clips


class RecordingSession:
    """The slice of TrainingSession that update_policy uses: a real jitted update step (SGD),
    recording the parameters each update started from and the loss it reported."""

    def __init__(self, model, cfg):
        g = cfg.gtpo
        self.graphdef, self.params = nnx.split(model)
        self.ids, self.data_parallel = TokenIds(block_size=B, mask_id=MASK, pad_id=MASK, stop_ids=()), 1
        loss_fn = gtpo_loss_fn(eps_low=g.eps_low, eps_high=g.eps_high, beta=0.0,
                               use_old_logprobs=g.num_iterations > 1, tis_cap=g.tis_cap, vocab_chunk=32,
                               tis_from_exact_old=g.shrink > 1)
        schedule = optax.constant_schedule(LR)
        tx = optax.sgd(schedule)
        self.opt_state = tx.init(self.params)
        self.step = jax.jit(make_update_step(self.graphdef, tx, loss_fn, schedule))
        self.started_from, self.losses = [], []

    def update(self, arrays):
        self.started_from.append(self.params)
        self.params, self.opt_state, m = self.step(self.params, self.opt_state, arrays)
        m = {k: np.asarray(v).item() for k, v in m.items()}
        self.losses.append(m["loss"])
        return m


def gtpo_config(**gtpo):
    cfg = Config(stage="gtpo")
    cfg.block_size = B
    cfg.decoding.max_new_tokens = 16
    cfg.train.micro_batches = 2
    cfg.train.vocab_chunk = 32
    for k, v in gtpo.items():
        setattr(cfg.gtpo, k, v)
    return cfg


def groups_with_an_empty_response(rng):
    base = make_rollouts(rng, n=8)
    base[5].tokens, base[5].step_map = base[5].tokens[:0], base[5].step_map[:0]  # an empty response
    base[5].logprobs = base[5].logprobs[:0]
    rewards = rng.random((2, 4))
    groups = []
    for g in range(2):
        rollouts = [Rollout(prompt=r.prompt, tokens=r.tokens, step_map=r.step_map, logprobs=r.logprobs)
                    for r in base[4 * g : 4 * g + 4]]
        groups.append(ScoredGroup(g, rollouts, rewards[g], rewards[g] > 0.5, {}))
    # the direct side: advantages by the formula, rollouts in step order
    adv = (rewards - rewards.mean(1, keepdims=True)) / rewards.std(1, keepdims=True)
    direct = [Rollout(prompt=r.prompt, tokens=r.tokens, step_map=r.step_map, logprobs=r.logprobs, advantage=float(a))
              for grp, ad in zip(groups, adv) for r, a in zip(grp.rollouts, ad)]
    return groups, direct


def test_minibatches_iterations_shrink_and_importance_weight_match_direct():
    cfg = gtpo_config(num_iterations=2, mini_batches=2, shrink=2, tis_cap=2.0, eps_low=0.1, eps_high=0.3)
    model = init_model(ModelConfig.tiny(vocab_size=VOCAB, tie_word_embeddings=False), seed=4)
    groups, direct = groups_with_an_empty_response(np.random.default_rng(5))
    session = RecordingSession(model, cfg)
    metrics = update_policy(session, groups, cfg, reference=None)
    assert metrics["optimizer_updates"] == 4 and len(session.losses) == 4
    assert metrics["clip_fraction"] > 0  # the second pass, at ρ ≠ 1, reaches the clipped paths

    theta0 = session.started_from[0]
    nonempty = [r for r in direct if len(r.tokens)]

    def per_rollout(values):
        it = iter(values)
        return [np.asarray(next(it)[0]) if len(r.tokens) else np.zeros(0) for r in direct]

    model0 = nnx.merge(session.graphdef, theta0)
    old = per_rollout(direct_logprobs(model0, nonempty, shrink=2))  # θ_old: before the first update
    exact_old = per_rollout(direct_logprobs(model0, nonempty, shrink=1))  # exact states, for the weight
    halves = [slice(0, 4), slice(4, 8)]  # mini-batches: consecutive halves of the step's rollouts
    for k, params in enumerate(session.started_from):
        part = halves[k % 2]
        want = direct_loss(params, session.graphdef, direct[part], "round_mean", 0.0, 2.0, eps_low=0.1,
                           eps_high=0.3, shrink=2, old=old[part], exact_old=exact_old[part])
        assert session.losses[k] == pytest.approx(float(want), abs=2e-6), f"update {k}"


def test_missing_rollout_logprobs_with_importance_weight_is_an_error():
    cfg = gtpo_config(tis_cap=2.0)
    cfg.decoding.backend = "lmdeploy"
    groups, _ = groups_with_an_empty_response(np.random.default_rng(5))
    groups[1].rollouts[2].logprobs = None
    with pytest.raises(ValueError, match="lmdeploy.*returned none for 1 .* of 8"):
        update_policy(None, groups, cfg, reference=None)


def test_old_and_reference_logprobs_are_read_off_the_one_training_layout(monkeypatch):
    """num_iterations 2 and beta > 0: every rollout is laid out once for the whole step (two passes,
    two mini-batches of two micro-batches: four packed micro-batches in all), and the l(θ_old) and
    l(θ_ref) read off that layout before the first update equal a naive per-sample scorer's
    (one full forward per token state)."""
    cfg = gtpo_config(num_iterations=2, mini_batches=2, beta=0.05)
    model = init_model(ModelConfig.tiny(vocab_size=VOCAB, tie_word_embeddings=False), seed=4)
    reference_model = init_model(ModelConfig.tiny(vocab_size=VOCAB, tie_word_embeddings=False), seed=9)
    groups, _ = groups_with_an_empty_response(np.random.default_rng(6))
    session = RecordingSession(model, cfg)
    laid_out, packed = [], []

    def counting(calls, fn):
        return lambda *a, **kw: calls.append(1) or fn(*a, **kw)

    monkeypatch.setattr(trajectory, "trajectory_layout", counting(laid_out, trajectory.trajectory_layout))
    monkeypatch.setattr(packing, "pack", counting(packed, packing.pack))
    metrics = update_policy(session, groups, cfg, reference=nnx.split(reference_model)[1])
    assert metrics["optimizer_updates"] == 4
    assert len(laid_out) == 8 and len(packed) == 4
    policy0 = nnx.merge(session.graphdef, session.started_from[0])
    rollouts = [r for grp in groups for r in grp.rollouts if len(r.tokens)]
    assert len(rollouts) == 7
    for r in rollouts:
        np.testing.assert_allclose(r.old_logprobs, naive_logprobs(policy0, r.prompt, r.tokens, r.step_map),
                                   atol=1e-5, rtol=0)
        np.testing.assert_allclose(r.ref_logprobs, naive_logprobs(reference_model, r.prompt, r.tokens, r.step_map),
                                   atol=1e-5, rtol=0)
    assert np.abs(rollouts[0].old_logprobs - rollouts[0].ref_logprobs).max() > 1e-3  # two different models


def test_speed_signal_metrics_measure_tpf_among_right_answers():
    def group(step_maps, correct):
        rollouts = [Rollout(prompt=np.zeros(2, np.int32), tokens=np.zeros(len(m), np.int32),
                            step_map=np.array(m, np.int32), logprobs=None) for m in step_maps]
        return ScoredGroup(0, rollouts, np.asarray(correct, float), np.asarray(correct, bool), {})

    # tokens per forward: [0,0,0,0] -> 4, [0,0,1,1] -> 2, [0,1,2,3] -> 1
    two_right = group([[0, 0, 0, 0], [0, 0, 1, 1], [0, 1, 2, 3]], [1, 1, 0])  # right 4, 2; wrong 1
    one_right = group([[0, 0, 1, 1], [0, 1, 2, 3]], [1, 0])  # right 2; wrong 1
    m = speed_signal_metrics([two_right, one_right])
    assert m["kept/groups_two_right"] == 0.5
    assert m["kept/tpf_right_std"] == pytest.approx(1.0)  # std of (4, 2), the only group with two right
    assert m["kept/tpf_right_minus_wrong"] == pytest.approx(((3 - 1) + (2 - 1)) / 2)
    assert speed_signal_metrics([]) == {}
