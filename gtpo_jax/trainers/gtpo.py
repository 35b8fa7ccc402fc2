"""Stage 2: GTPO — rollouts, rewards, DAPO filtering, advantages, trajectory objective (docs/algorithm.md §5)."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time
from typing import Collection

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gtpo_jax.checkpoint import param_tree
from gtpo_jax.config import Config
from gtpo_jax.data.pipeline import RLPromptSource
from gtpo_jax.data.tokenizer import TokenIds
from gtpo_jax.distributed import barrier, broadcast_from_first
from gtpo_jax.layout import gtpo_row_len
from gtpo_jax.memory_plan import startup_plan
from gtpo_jax.packing import split_evenly
from gtpo_jax.rewards import Grader, RewardInput, compute_rewards
from gtpo_jax.rollout import RolloutBackend, RolloutSpec, make_rollout_backend
from gtpo_jax.rollout.base import Rollout
from gtpo_jax.trainers.dapo import dynamic_sample
from gtpo_jax.trainers.gtpo_objective import (build_gtpo_batch, check_rollout_logprobs,
                                              group_advantages, gtpo_loss_fn)
from gtpo_jax.trainers.session import TrainingSession
from gtpo_jax.trajectory import TrajectoryBatch, layout_logprobs, layout_trajectories

log = logging.getLogger("gtpo_jax")


@dataclasses.dataclass
class ScoredGroup:
    question_index: int
    rollouts: list[Rollout]
    rewards: np.ndarray  # [n] total reward
    correct: np.ndarray  # [n] bool
    reward_parts: dict[str, np.ndarray]

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())


def _rewards_differ(group: ScoredGroup) -> bool:
    return bool(np.ptp(group.rewards) > 0)


def run_gtpo(cfg: Config) -> dict:
    import_reward_modules(cfg.gtpo.reward_modules)
    session = TrainingSession(cfg, make_data=lambda s: RLPromptSource.from_files(
        cfg.data.train_files, s.tokenizer, seed=cfg.data.shuffle_seed, think=cfg.data.think,
        shuffle=cfg.gtpo.shuffle))
    return session.run(lambda s: _train(s, cfg))  # on an error: checkpoint in flight finished, directory released


def _train(session, cfg: Config) -> dict:
    g = cfg.gtpo
    prompts = session.data
    session.compile_step(gtpo_loss_fn(eps_low=g.eps_low, eps_high=g.eps_high, beta=g.beta,
                                      use_old_logprobs=g.num_iterations > 1, tis_cap=g.tis_cap,
                                      vocab_chunk=cfg.train.vocab_chunk, tis_from_exact_old=g.shrink > 1,
                                      saved_logits_mb=cfg.train.vocab_saved_logits_mb))
    start = session.restore_or_init()
    prompts.set_state(session.extra_state.get("prompt_cursor", prompts.get_state()))
    reference = _reference_params(session, start) if g.beta > 0 else None
    compiled_shapes: set[tuple[int, int, int]] = set()
    backend = rollout_backend(session, cfg)
    grader = Grader.from_config(cfg.grader)
    session.evaluate_if_due(start, force=start == 0, label="before")
    last: dict = {}
    try:
        for step in session.progress(start, cfg.train.steps):
            t0 = time.perf_counter()
            backend.update_params(session.params)
            rng = np.random.default_rng([cfg.train.seed, step])
            scorer = RolloutScorer(backend, grader, cfg, rng)
            sampled = dynamic_sample(
                prompts.draw, scorer, lambda grp: grp.accuracy, num_groups=g.num_task_per_step,
                oversample=g.oversample, rng=rng, enabled=g.dynamic_sampling, max_rounds=g.max_rounds,
                keep_varied=_rewards_differ if g.dynamic_sampling_keep == "reward" else None,
            )
            # The policy's performance is measured on everything it generated this step; the
            # kept groups (0 < accuracy < 1) would bias it towards 50%.
            metrics = rollout_metrics(scorer.drawn, cfg)
            metrics.update({f"kept/{k}": v for k, v in rollout_metrics(sampled.groups, cfg).items()
                            if k in ("reward_mean", "accuracy", "response_len")})
            metrics.update(speed_signal_metrics(sampled.groups))
            metrics.update(sum_counts(scorer.reward_metrics))
            metrics.update(sampled.counts.as_metrics())
            metrics.update(rollout_s=scorer.rollout_s, scoring_s=scorer.scoring_s)
            session.extra_state = {"prompt_cursor": prompts.get_state(), "has_reference": reference is not None}
            if not sampled.groups:
                log.warning("step %d: no group with mixed accuracy; no update this step", step)
                last = session.finish_step(step, metrics, keys=["reward_mean", "accuracy"])
                continue
            t = time.perf_counter()
            backend.pause()  # the engine's GPU memory goes to the update (gpu.sharing=sleep)
            metrics.update(update_policy(session, sampled.groups, cfg, reference, compiled_shapes))
            metrics["update_shapes"] = len(compiled_shapes)  # distinct row shapes so far (compilations)
            metrics["update_s"] = time.perf_counter() - t
            # response tokens trained per second of the update phase (layout, scoring, all updates)
            metrics["update_tokens_per_s"] = metrics.pop("update_target_tokens", 0.0) / metrics["update_s"]
            metrics["step_s"] = time.perf_counter() - t0
            last = session.finish_step(step, metrics,
                                       keys=["reward_mean", "accuracy", "tokens_per_forward", "response_len",
                                             "loss", "rollout_s", "update_s", "packing_efficiency"])
    finally:
        grader.close()
        backend.close()
    return session.close(last)


def _reference_params(session, start: int):
    """θ_ref is the starting policy, frozen: a copy, since the live parameters are donated to every
    update. A resumed run restores the one it started with."""
    reference = jax.tree.map(jnp.copy, session.params)
    if start and session.extra_state.get("has_reference"):
        stored = session.checkpointer.restore_extra(start, "reference", param_tree(reference))
        nnx.replace_by_pure_dict(reference, stored)
    session.extra_arrays["reference"] = param_tree(reference)
    return reference


class RolloutScorer:
    """One step's `rollout_and_score` for `dynamic_sample`: generates a group per prompt, rewards
    every rollout (the same rewards on every process), and keeps every group it scored, kept or
    filtered, with the time spent and the grader's counts."""

    def __init__(self, backend, grader, cfg: Config, rng: np.random.Generator):
        self.backend, self.grader, self.cfg, self.rng = backend, grader, cfg, rng
        self.drawn: list[ScoredGroup] = []
        self.reward_metrics: list[dict] = []
        self.rollout_s = self.scoring_s = 0.0

    def __call__(self, batch) -> list[ScoredGroup]:
        g, n = self.cfg.gtpo, self.cfg.gtpo.num_response_per_task
        t = time.perf_counter()
        groups = self.backend.generate([p.prompt_ids for p in batch], n, seed=int(self.rng.integers(2**31)))
        self.rollout_s += time.perf_counter() - t
        t = time.perf_counter()
        flat = [r for group in groups for r in group]
        inputs = [
            RewardInput(text=r.text, ground_truth=p.ground_truth, num_tokens=len(r.tokens), truncated=r.truncated,
                        step_map=r.step_map, block_size=self.cfg.block_size,
                        max_new_tokens=self.cfg.decoding.max_new_tokens)
            for p, group in zip(batch, groups) for r in group
        ]
        total, parts, reward_metrics = compute_rewards(inputs, g.rewards, self.grader, need_correct=True,
                                                       **g.reward_params)
        # Grader time-outs may differ between processes; all must train on the same rewards.
        barrier("rewards")
        total, correct = broadcast_from_first((np.asarray(total, np.float32),
                                               np.asarray(reward_metrics["correct"], bool)))
        self.scoring_s += time.perf_counter() - t
        self.reward_metrics.append(reward_metrics)
        scored = [
            ScoredGroup(p.index, flat[i * n : (i + 1) * n], total[i * n : (i + 1) * n],
                        np.asarray(correct[i * n : (i + 1) * n]) > 0,
                        {k: v[i * n : (i + 1) * n] for k, v in parts.items()})
            for i, p in enumerate(batch)
        ]
        self.drawn.extend(scored)
        return scored


def rollout_backend(session: TrainingSession, cfg: Config) -> RolloutBackend:
    """The rollout engine, built from a spec the trainer makes (decoding settings, token ids, model
    config, HF assets of the run's checkpoints); LMDeploy checks the GPU memory plan first."""
    spec = RolloutSpec(cfg.decoding, session.ids, session.model_cfg, hf_assets_dir=session.checkpointer.hf_assets_dir)
    return make_rollout_backend(spec, session.model(), tokenizer=session.tokenizer, mesh=session.mesh,
                                work_dir=cfg.output_dir, sleep_during_update=cfg.gpu.sharing == "sleep",
                                check_memory=lambda: startup_plan(cfg, session.model_cfg))


def import_reward_modules(names: list[str]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"gtpo.reward_modules: cannot import {name!r} ({e}); it must be importable "
                              "(installed, or on PYTHONPATH)") from None


def sum_counts(reward_metrics: list[dict]) -> dict:
    """Grader status counts (ok / no_answer / timeout / error) of one step's reward calls, summed."""
    out: dict = {}
    for m in reward_metrics:
        for k, v in m.items():
            if k.startswith("grader/"):
                out[k] = out.get(k, 0) + int(v)
    return out


def rollout_metrics(groups: list[ScoredGroup], cfg: Config) -> dict:
    if not groups:
        return {}
    rollouts = [r for grp in groups for r in grp.rollouts]
    rewards = np.concatenate([grp.rewards for grp in groups])
    out = {
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()),
        "accuracy": float(np.mean([grp.accuracy for grp in groups])),
        "response_len": float(np.mean([len(r.tokens) for r in rollouts])),
        "truncation_rate": float(np.mean([r.truncated for r in rollouts])),
        "tokens_per_forward": float(np.mean([r.tokens_per_forward for r in rollouts])),
    }
    logprobs = [np.asarray(r.logprobs) for r in rollouts if r.logprobs is not None and len(r.logprobs)]
    if logprobs:  # −log p of the committed tokens: an entropy estimate, to see a policy collapse coming
        out["rollout_nll"] = float(-np.concatenate(logprobs).mean())
    for name in groups[0].reward_parts:
        out[f"reward/{name}"] = float(np.concatenate([grp.reward_parts[name] for grp in groups]).mean())
    return out


def speed_signal_metrics(groups: list[ScoredGroup]) -> dict:
    """What the speed reward can act on in the kept groups. DAPO keeps only groups with right and
    wrong answers, and the accuracy part of the reward separates those two anyway; what favours a
    faster trajectory is only how tokens per forward differ among the right answers of one prompt.
    `kept/tpf_right_std`: the population std of tokens per forward among a group's right answers,
    averaged over the groups with at least two right answers (`kept/groups_two_right`: their share);
    `kept/tpf_right_minus_wrong`: mean tokens per forward of a group's right answers minus its
    wrong ones' (how much the accuracy reward alone already favours speed)."""
    spreads, gaps = [], []
    for grp in groups:
        tpf = np.array([r.tokens_per_forward for r in grp.rollouts])
        right, wrong = tpf[grp.correct], tpf[~grp.correct]
        if len(right) >= 2:
            spreads.append(float(right.std()))
        if len(right) and len(wrong):
            gaps.append(float(right.mean() - wrong.mean()))
    if not groups:
        return {}
    out = {"kept/groups_two_right": len(spreads) / len(groups)}
    if spreads:
        out["kept/tpf_right_std"] = float(np.mean(spreads))
    if gaps:
        out["kept/tpf_right_minus_wrong"] = float(np.mean(gaps))
    return out


def update_policy(session, groups: list[ScoredGroup], cfg: Config, reference,
                  compiled_shapes: set[tuple[int, int, int]] | None = None) -> dict:
    """`num_iterations` passes over the step's rollouts, one optimizer update per mini-batch, each
    normalised over its own mini-batch (docs/algorithm.md §5.4–§5.5). Each mini-batch is laid out
    once; θ_old's and the reference's log-probs are read off those arrays before the first update.
    `compiled_shapes`: the (rows, row_len, targets) shapes earlier steps used, reused when they fit (updated)."""
    g = cfg.gtpo
    advantages = group_advantages(np.stack([grp.rewards for grp in groups]))
    # Empty responses stay: they have nothing to train but count as responses in round_mean.
    rollouts = [r for grp in groups for r in grp.rollouts]
    for r, a in zip(rollouts, advantages.reshape(-1)):
        r.advantage = float(a)
    if g.tis_cap > 0:
        check_rollout_logprobs(rollouts, cfg.decoding.backend)
    shapes = set() if compiled_shapes is None else compiled_shapes
    batches = lay_out_updates(rollouts, cfg, ids=session.ids, rows_multiple=session.data_parallel,
                              known_shapes=shapes)
    shapes.update((*b.arrays["tokens"].shape[1:], b.arrays["target_valid"].shape[1]) for _, b in batches)
    score_before_updates(session, batches, cfg, reference)
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(g.num_iterations):
        for _, batch in batches:
            m = session.update(batch.arrays)
            updates += 1
            for k, v in m.items():
                if k.endswith("_max"):
                    sums[k] = max(sums.get(k, -np.inf), v)
                elif k.endswith("_min"):
                    sums[k] = min(sums.get(k, np.inf), v)
                else:
                    sums[k] = sums.get(k, 0.0) + v
    if not updates:
        return {"optimizer_updates": 0}
    tokens = max(sums.get("tokens", 0.0), 1.0)
    return {
        "loss": sums["loss"] / updates,
        "grad_norm": sums["grad_norm"] / updates,
        "lr": sums["lr"] / updates,  # mean of the learning rates the step's updates applied
        "optimizer_updates": updates,
        "skipped": sums["skipped"],
        "ratio_mean": sums["ratio_sum"] / tokens,
        "ratio_max": sums["ratio_max"],  # over all of the step's updates
        "ratio_min": sums["ratio_min"],
        "clip_fraction": sums["clipped_sum"] / tokens,
        "kl": sums["k3_sum"] / tokens,
        "train_rollout_logprob_abs_diff": sums["rollout_abs_diff_sum"] / tokens
        if all(s.logprobs is not None for s in rollouts) else float("nan"),
        "trained_tokens": sums["tokens"] / updates,
        "update_target_tokens": sums["tokens"],
        # row tokens the rollouts fill / row tokens the update computes (padding included)
        "packing_efficiency": sum(b.sample_tokens for _, b in batches) / sum(b.row_tokens for _, b in batches),
        "update_row_tokens": sum(b.row_tokens for _, b in batches),
    }


def lay_out_updates(rollouts: list[Rollout], cfg: Config, *, ids: TokenIds, rows_multiple: int,
                    known_shapes: Collection[tuple[int, int, int]] = ()) -> list[tuple[list[Rollout], TrajectoryBatch]]:
    """Each mini-batch's rollouts laid out once, for every iteration of the step; rows fitted to
    what the rollouts need, at most a worst-case rollout's row (or `SHARED_ROW_TOKENS`) long."""
    g = cfg.gtpo
    worst_row = gtpo_row_len(ids.block_size, cfg.decoding.max_new_tokens, max(len(s.prompt) for s in rollouts))
    batches = []
    for mini in split_evenly(rollouts, g.mini_batches):
        if not any(len(s.tokens) for s in mini):
            log.warning("a mini-batch of %d rollouts has only empty responses; its update is skipped", len(mini))
            continue
        batches.append((mini, build_gtpo_batch(
            mini, block_size=ids.block_size, mask_id=ids.mask_id, shrink=g.shrink, loss_norm=g.loss_norm,
            micro_batches=cfg.train.micro_batches, max_row_len=worst_row, vocab_chunk=cfg.train.vocab_chunk,
            rows_multiple=rows_multiple, known_shapes=known_shapes)))
    return batches


def score_before_updates(session, batches: list[tuple[list[Rollout], TrajectoryBatch]], cfg: Config,
                         reference) -> None:
    """l(θ_old) (num_iterations > 1), the exact-state l(θ_old) of the importance weight (tis_cap > 0
    with shrink > 1: its own layout, at shrink 1) and l(θ_ref) (beta > 0), on the training arrays
    with the training vocabulary chunk, into the arrays and onto each rollout."""
    g, chunk = cfg.gtpo, cfg.train.vocab_chunk
    policy = nnx.merge(session.graphdef, session.params)
    for mini, batch in batches:
        valid = batch.arrays["target_valid"]
        scorers = []
        if g.num_iterations > 1:
            scorers.append(("old_logprobs", "old_logprob", policy))
        if reference is not None:
            scorers.append(("ref_logprobs", "ref_logprob", nnx.merge(session.graphdef, reference)))
        for attr, name, model in scorers:
            values = np.where(valid, layout_logprobs(model, batch, vocab_chunk=chunk), 0.0).astype(np.float32)
            batch.arrays[name] = values
            for rollout, lp in zip(mini, batch.per_rollout(values)):
                setattr(rollout, attr, lp)
        if g.tis_cap > 0 and g.shrink > 1:  # the importance weight compares exact states (docs/algorithm.md §5)
            exact = layout_trajectories(
                [s.prompt for s in mini], [s.tokens for s in mini], [s.step_map for s in mini],
                block_size=session.ids.block_size, mask_id=session.ids.mask_id, vocab_chunk=chunk,
                tails=[s.tail for s in mini], shrink=1, micro_batches=cfg.train.micro_batches, max_row_len=batch.arrays["tokens"].shape[-1])
            per_rollout = exact.per_rollout(layout_logprobs(policy, exact, vocab_chunk=chunk))
            for rollout, lp in zip(mini, per_rollout):
                rollout.exact_old_logprobs = lp
            batch.arrays["exact_old_logprob"] = batch.per_target(per_rollout)
