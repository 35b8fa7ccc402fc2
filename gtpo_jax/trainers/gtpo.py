"""Stage 2: GTPO — rollouts, rewards, DAPO filtering, advantages, trajectory objective (docs/algorithm.md §5)."""

from __future__ import annotations

import dataclasses
import importlib
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gtpo_jax.checkpoint import param_tree
from gtpo_jax.config import Config
from gtpo_jax.data.pipeline import RLPromptSource
from gtpo_jax.distributed import barrier, broadcast_from_first
from gtpo_jax.layout import gtpo_row_len
from gtpo_jax.memory_plan import startup_plan
from gtpo_jax.rewards import Grader, RewardInput, compute_rewards
from gtpo_jax.rollout import RolloutBackend, RolloutSpec, make_rollout_backend
from gtpo_jax.rollout.base import Rollout
from gtpo_jax.trainers.batching import split_evenly
from gtpo_jax.trainers.dapo import dynamic_sample
from gtpo_jax.trainers.gtpo_objective import (ScoredRollout, build_gtpo_batch, check_rollout_logprobs,
                                              group_advantages, gtpo_loss_fn)
from gtpo_jax.trainers.session import TrainingSession
from gtpo_jax.trajectory import token_logprobs

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


def run_gtpo(cfg: Config) -> dict:
    import_reward_modules(cfg.gtpo.reward_modules)
    session = TrainingSession(cfg, make_data=lambda s: RLPromptSource.from_files(
        cfg.data.train_files, s.tokenizer, seed=cfg.data.shuffle_seed, think=cfg.data.think,
        shuffle=cfg.gtpo.shuffle))
    return session.run(lambda s: _train(s, cfg))  # on an error: checkpoint in flight finished, directory released


def _train(session, cfg: Config) -> dict:
    g = cfg.gtpo
    prompts = session.data
    use_old = g.num_iterations > 1
    session.compile_step(gtpo_loss_fn(eps_low=g.eps_low, eps_high=g.eps_high, beta=g.beta,
                                      use_old_logprobs=use_old, tis_cap=g.tis_cap,
                                      vocab_chunk=cfg.train.vocab_chunk, tis_from_exact_old=g.shrink > 1))
    start = session.restore_or_init()
    prompts.set_state(session.extra_state.get("prompt_cursor", prompts.get_state()))
    reference = None
    if g.beta > 0:
        # θ_ref is the starting policy, frozen: a copy, since the live parameters are donated to
        # every update. A resumed run restores the one it started with.
        reference = jax.tree.map(jnp.copy, session.params)
        if start and session.extra_state.get("has_reference"):
            stored = session.checkpointer.restore_extra(start, "reference", param_tree(reference))
            nnx.replace_by_pure_dict(reference, stored)
        session.extra_arrays["reference"] = param_tree(reference)
    backend = rollout_backend(session, cfg)
    grader = Grader.from_config(cfg.grader)
    session.evaluate_if_due(start, force=start == 0, label="before")
    last: dict = {}
    try:
        for step in session.progress(start, cfg.train.steps):
            t0 = time.perf_counter()
            backend.update_params(session.params)
            rng = np.random.default_rng([cfg.train.seed, step])
            timing = {"rollout_s": 0.0, "scoring_s": 0.0}
            drawn: list[ScoredGroup] = []  # every scored group, kept or filtered

            def rollout_and_score(batch):
                t = time.perf_counter()
                groups = backend.generate([p.prompt_ids for p in batch], g.num_response_per_task,
                                          seed=int(rng.integers(2**31)))
                timing["rollout_s"] += time.perf_counter() - t
                t = time.perf_counter()
                flat = [r for group in groups for r in group]
                inputs = [
                    RewardInput(text=r.text, ground_truth=p.ground_truth, num_tokens=len(r.tokens),
                                truncated=r.truncated, step_map=r.step_map, block_size=cfg.block_size,
                                max_new_tokens=cfg.decoding.max_new_tokens)
                    for p, group in zip(batch, groups) for r in group
                ]
                total, parts, reward_metrics = compute_rewards(inputs, g.rewards, grader, need_correct=True,
                                                               **g.reward_params)
                # Grader time-outs may differ between processes; all must train on the same rewards.
                barrier("rewards")
                total, correct = broadcast_from_first((np.asarray(total, np.float32),
                                                       np.asarray(reward_metrics["correct"], bool)))
                timing["scoring_s"] += time.perf_counter() - t
                timing.setdefault("reward_metrics", []).append(reward_metrics)
                n = g.num_response_per_task
                scored = [
                    ScoredGroup(p.index, flat[i * n : (i + 1) * n], total[i * n : (i + 1) * n],
                                np.asarray(correct[i * n : (i + 1) * n]) > 0,
                                {k: v[i * n : (i + 1) * n] for k, v in parts.items()})
                    for i, p in enumerate(batch)
                ]
                drawn.extend(scored)
                return scored

            sampled = dynamic_sample(
                prompts.draw, rollout_and_score, lambda grp: grp.accuracy, num_groups=g.num_task_per_step,
                oversample=g.oversample, rng=rng, enabled=g.dynamic_sampling, max_rounds=g.max_rounds,
            )
            # The policy's performance is measured on everything it generated this step; the
            # kept groups (0 < accuracy < 1) would bias it towards 50%.
            metrics = rollout_metrics(drawn, cfg)
            metrics.update({f"kept/{k}": v for k, v in rollout_metrics(sampled.groups, cfg).items()
                            if k in ("reward_mean", "accuracy", "response_len")})
            metrics.update(sum_counts(timing.pop("reward_metrics", [])))
            metrics.update(sampled.counts.as_metrics())
            metrics.update({k: v for k, v in timing.items() if k.endswith("_s")})
            session.extra_state = {"prompt_cursor": prompts.get_state(), "has_reference": reference is not None}
            if not sampled.groups:
                log.warning("step %d: no group with mixed accuracy; no update this step", step)
                last = session.finish_step(step, metrics, keys=["reward_mean", "accuracy"])
                continue
            t = time.perf_counter()
            backend.pause()  # the engine's GPU memory goes to the update (gpu.sharing=sleep)
            metrics.update(update_policy(session, sampled.groups, cfg, reference))
            metrics["update_s"] = time.perf_counter() - t
            metrics["step_s"] = time.perf_counter() - t0
            last = session.finish_step(step, metrics,
                                       keys=["reward_mean", "accuracy", "tokens_per_forward", "response_len",
                                             "loss", "rollout_s", "update_s"])
    finally:
        grader.close()
        backend.close()
    return session.close(last)


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


def update_policy(session, groups: list[ScoredGroup], cfg: Config, reference) -> dict:
    """`num_iterations` passes over the step's rollouts, one optimizer update per mini-batch, each
    normalised over its own mini-batch (docs/algorithm.md §5.4–§5.5)."""
    g = cfg.gtpo
    advantages = group_advantages(np.stack([grp.rewards for grp in groups]))
    # Empty responses stay: they have nothing to train but count as responses in round_mean.
    scored = [
        ScoredRollout(prompt=r.prompt, response=r.tokens, step_map=r.step_map, advantage=float(a), tail=r.tail,
                      rollout_logprobs=r.logprobs)
        for grp, adv in zip(groups, advantages) for r, a in zip(grp.rollouts, adv)
    ]
    if g.tis_cap > 0:
        check_rollout_logprobs(scored, cfg.decoding.backend)
    trainable = [s for s in scored if len(s.response)]

    def score(params, shrink: int) -> list[np.ndarray]:
        model = nnx.merge(session.graphdef, params)
        return token_logprobs(model, [s.prompt for s in trainable], [s.response for s in trainable],
                              [s.step_map for s in trainable], block_size=session.ids.block_size, mask_id=session.ids.mask_id,
                              tails=[s.tail or ([], []) for s in trainable], shrink=shrink)

    if g.num_iterations > 1:
        for s, lp in zip(trainable, score(session.params, g.shrink)):
            s.old_logprobs = lp
    if g.tis_cap > 0 and g.shrink > 1:  # the importance weight compares exact states (docs/algorithm.md §5)
        for s, lp in zip(trainable, score(session.params, 1)):
            s.exact_old_logprobs = lp
    if reference is not None:
        for s, lp in zip(trainable, score(reference, g.shrink)):
            s.ref_logprobs = lp
    row_len = gtpo_row_len(cfg.block_size, cfg.decoding.max_new_tokens, max(len(s.prompt) for s in scored))
    sums: dict[str, float] = {}
    updates = 0
    for _ in range(g.num_iterations):
        for mini in split_evenly(scored, g.mini_batches):
            if not any(len(s.response) for s in mini):
                log.warning("a mini-batch of %d rollouts has only empty responses; its update is skipped", len(mini))
                continue
            arrays, _ = build_gtpo_batch(
                mini, block_size=session.ids.block_size, mask_id=session.ids.mask_id, shrink=g.shrink, loss_norm=g.loss_norm,
                micro_batches=cfg.train.micro_batches, row_len=row_len,
                vocab_chunk=cfg.train.vocab_chunk, rows_multiple=session.data_parallel,
            )
            m = session.update(arrays)
            updates += 1
            for k, v in m.items():
                sums[k] = sums.get(k, 0.0) + v if not k.endswith(("_max", "_min")) else v
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
        "ratio_max": sums["ratio_max"],
        "ratio_min": sums["ratio_min"],
        "clip_fraction": sums["clipped_sum"] / tokens,
        "kl": sums["k3_sum"] / tokens,
        "train_rollout_logprob_abs_diff": sums["rollout_abs_diff_sum"] / tokens
        if all(s.rollout_logprobs is not None for s in scored) else float("nan"),
        "trained_tokens": sums["tokens"] / updates,
    }
