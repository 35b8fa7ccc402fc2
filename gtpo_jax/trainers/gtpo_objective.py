"""GTPO's per-step objective on a batch of scored rollouts (docs/algorithm.md §5.3–§5.4).

Host side: rollouts -> trajectory layouts -> stacked micro-batches carrying, per target token,
its advantage, its normalisation weight and the log-probs it is compared with. Device side:
`gtpo_loss_fn` evaluates the clipped surrogate (+ k3 KL, × truncated importance weight).
"""

from __future__ import annotations

from typing import Collection, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gtpo_jax.layout import SampleLayout
from gtpo_jax.losses import gtpo_token_terms, target_logprobs
from gtpo_jax.rollout.base import Rollout
from gtpo_jax.trajectory import TrajectoryBatch, layout_trajectories


def check_rollout_logprobs(rollouts: Sequence[Rollout], backend: str) -> None:
    """The truncated importance weight needs every token's rollout log-prob; a missing one would
    silently turn the weight into min(p_old, C)."""
    missing = sum(r.logprobs is None for r in rollouts)
    short = sum(r.logprobs is not None and len(r.logprobs) != len(r.tokens) for r in rollouts)
    if missing or short:
        raise ValueError(
            f"gtpo.tis_cap > 0 needs the rollout log-prob of every token, but the {backend!r} rollout backend "
            f"returned none for {missing} and too few for {short} of {len(rollouts)} rollouts; set gtpo.tis_cap=0 "
            "or use a backend that reports raw log-probs")


def group_advantages(rewards: np.ndarray) -> np.ndarray:
    """[groups, responses] -> (r − mean) / population std per group; 0 where std == 0."""
    rewards = np.asarray(rewards, np.float64)
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, keepdims=True)
    return np.where(std > 0, (rewards - mean) / np.where(std > 0, std, 1.0), 0.0).astype(np.float32)


def normalisation_weights(layouts: Sequence[SampleLayout], loss_norm: str) -> list[dict[int, float]]:
    """Per sample, {round: weight of each of its tokens}, normalised over `layouts` (one update's
    responses, docs/algorithm.md §5.5).

    round_mean: a round's terms are averaged over its tokens, rounds summed, divided by the
    number of responses (an empty response counts); token_mean: one weight 1 / (all target
    tokens of the update)."""
    if loss_norm == "token_mean":
        total = sum(lay.num_targets for lay in layouts)
        return [{c.round_index: 1.0 / total for c in lay.copies} for lay in layouts]
    if loss_norm != "round_mean":
        raise ValueError(f"loss_norm must be round_mean or token_mean, got {loss_norm!r}")
    out = []
    for lay in layouts:
        counts: dict[int, int] = {}
        for c in lay.copies:
            counts[c.round_index] = counts.get(c.round_index, 0) + int((c.targets >= 0).sum())
        out.append({r: 1.0 / (n * len(layouts)) for r, n in counts.items() if n})
    return out


def build_gtpo_batch(
    rollouts: Sequence[Rollout],
    *,
    block_size: int,
    mask_id: int,
    shrink: int,
    loss_norm: str,
    micro_batches: int,
    vocab_chunk: int,
    row_len: int | None = None,
    max_row_len: int = 0,
    rows_multiple: int = 1,
    known_shapes: Collection[tuple[int, int, int]] = (),
) -> TrajectoryBatch:
    """One update's rollouts laid out once (`layout_trajectories`), with per target its
    normalisation weight, its rollout's advantage and whichever per-token log-probs the rollouts
    carry (zeros for those none carries: the caller fills them from this very layout)."""
    batch = layout_trajectories(
        [r.prompt for r in rollouts], [r.tokens for r in rollouts], [r.step_map for r in rollouts],
        block_size=block_size, mask_id=mask_id, vocab_chunk=vocab_chunk, tails=[r.tail for r in rollouts],
        shrink=shrink, micro_batches=micro_batches, row_len=row_len, max_row_len=max_row_len,
        rows_multiple=rows_multiple, known_shapes=known_shapes,
    )
    # Responses without targets (empty) count in the normalisation but take no row.
    weights = normalisation_weights(batch.layouts, loss_norm)
    valid = batch.target_rollout >= 0
    arrays = batch.arrays
    arrays["weight"] = np.zeros(valid.shape, np.float32)
    arrays["weight"][valid] = [weights[i][r] for i, r in zip(batch.target_rollout[valid], batch.target_round[valid])]
    arrays["advantage"] = np.zeros(valid.shape, np.float32)
    arrays["advantage"][valid] = np.array([r.advantage for r in rollouts], np.float32)[batch.target_rollout[valid]]
    trained = {i for i, lay in enumerate(batch.layouts) if lay.num_targets}
    for attr, name in (("old_logprobs", "old_logprob"), ("ref_logprobs", "ref_logprob"),
                       ("logprobs", "rollout_logprob"), ("exact_old_logprobs", "exact_old_logprob")):
        values = [getattr(r, attr) for r in rollouts]
        if all(values[i] is None for i in trained):  # not used by this run's loss, or filled in later
            arrays[name] = np.zeros(valid.shape, np.float32)
        elif any(values[i] is None for i in trained):
            raise ValueError(f"{attr} is given for some rollouts of a batch and missing for others")
        else:
            arrays[name] = batch.per_target([values[i] if i in trained else None for i in range(len(values))])
    return batch


def gtpo_loss_fn(
    *,
    eps_low: float,
    eps_high: float,
    beta: float,
    use_old_logprobs: bool,
    tis_cap: float,
    vocab_chunk: int,
    tis_from_exact_old: bool = False,
    saved_logits_mb: float = 0,
):
    """loss_fn(model, micro_batch) -> (weighted loss, metric sums) for `make_update_step`.

    With use_old_logprobs False (num_iterations == 1) θ_old is θ itself: l_old = stop_gradient(l),
    so the ratio is exactly 1 and only its gradient flows. The truncated importance weight
    compares the exact-state l_old with the rollout's: the loss's own l_old when its states are
    exact (shrink 1), else `exact_old_logprob` (tis_from_exact_old)."""

    def loss_fn(model, mb):
        logprobs = target_logprobs(model, mb, vocab_chunk=vocab_chunk, saved_logits_mb=saved_logits_mb)
        valid = mb["target_valid"]
        old = mb["old_logprob"] if use_old_logprobs else jax.lax.stop_gradient(logprobs)
        tis = None
        if tis_cap > 0:
            exact_old = mb["exact_old_logprob"] if tis_from_exact_old else old
            tis = jnp.minimum(jnp.exp(exact_old - mb["rollout_logprob"]), tis_cap)
        terms, stats = gtpo_token_terms(
            logprobs, old, mb["advantage"], eps_low=eps_low, eps_high=eps_high, beta=beta,
            ref_logprobs=mb["ref_logprob"], tis_weight=tis,
        )
        masked = lambda x: jnp.where(valid, x, 0.0).sum()  # noqa: E731
        aux = {
            "tokens": valid.sum().astype(jnp.float32),
            "ratio_sum": masked(stats["ratio"]),
            "ratio_max": jnp.where(valid, stats["ratio"], -jnp.inf).max(),
            "ratio_min": jnp.where(valid, stats["ratio"], jnp.inf).min(),
            "clipped_sum": masked(stats["clipped"]),
            "k3_sum": masked(stats["k3"]) if "k3" in stats else jnp.float32(0.0),
            "rollout_abs_diff_sum": masked(jnp.abs(jax.lax.stop_gradient(logprobs) - mb["rollout_logprob"])),
        }
        return masked(mb["weight"] * terms), aux

    return loss_fn
