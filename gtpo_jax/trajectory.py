"""Rollouts laid out on their trajectory states (docs/algorithm.md §3), and l_t(θ) read off that layout.

`layout_trajectories` lays a set of rollouts out once, as the stacked micro-batches the GTPO update
step eats; `layout_logprobs` scores the targets of such a layout (the GTPO trainer's old and
reference log-probs, on the very arrays it trains on); `token_logprobs` is both, per sample.
"""

from __future__ import annotations

import dataclasses
from typing import Collection, Sequence

import jax
import numpy as np
from flax import nnx

from gtpo_jax.layout import PackedBatch, SampleLayout, trajectory_layout
from gtpo_jax.losses import target_logprobs
from gtpo_jax.model import SDARModel
from gtpo_jax.packing import split_evenly, stack_micro_batches
from gtpo_jax.sharding import to_host

MODEL_INPUTS = ("tokens", "positions", "segment", "block", "copy", "target_index", "target_token")


@dataclasses.dataclass
class TrajectoryBatch:
    """Rollouts laid out once: stacked micro-batches and, per target slot, which rollout and which
    of its response tokens it scores — so that per-token values (old / reference / rollout
    log-probs, weights) move between the rollouts and the arrays without another layout."""

    arrays: dict[str, np.ndarray]  # [micro_batches, rows, row_len] row arrays, [micro_batches, T] per target
    layouts: list[SampleLayout]  # one per rollout, empty responses included
    packed: list[PackedBatch]
    target_rollout: np.ndarray  # int [micro_batches, T]: index into the rollouts, -1 on padding
    target_response_index: np.ndarray  # int [micro_batches, T]: the response token the slot scores
    target_round: np.ndarray  # int [micro_batches, T]: the copy's index among its block's copies

    @property
    def sample_tokens(self) -> int:
        """Row tokens the rollouts occupy (clean sequences + noisy copies of those with targets)."""
        return sum(lay.length for lay in self.layouts if lay.num_targets)

    @property
    def row_tokens(self) -> int:
        """Row tokens one forward over this batch computes, padding included."""
        return int(self.arrays["tokens"].size)

    def per_target(self, per_rollout: Sequence[np.ndarray | None]) -> np.ndarray:
        """Per-rollout, per-response-token values -> float32 [micro_batches, T] (0 on padding);
        rollouts without targets may hold None."""
        lengths = [0 if v is None else len(v) for v in per_rollout]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.concatenate([np.zeros(0, np.float32)] + [np.asarray(v, np.float32) for v in per_rollout
                                                            if v is not None])
        out = np.zeros(self.target_rollout.shape, np.float32)
        valid = self.target_rollout >= 0
        out[valid] = flat[offsets[self.target_rollout[valid]] + self.target_response_index[valid]]
        return out

    def per_rollout(self, values: np.ndarray) -> list[np.ndarray]:
        """float [micro_batches, T] values at the targets -> one float32 array per rollout, in
        response order (every response token is the target of exactly one slot)."""
        lengths = [int(lay.num_targets) for lay in self.layouts]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        flat = np.zeros(offsets[-1], np.float32)
        valid = self.target_rollout >= 0
        flat[offsets[self.target_rollout[valid]] + self.target_response_index[valid]] = values[valid]
        return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])]


def layout_trajectories(
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    step_maps: Sequence[Sequence[int]],
    *,
    block_size: int,
    mask_id: int,
    vocab_chunk: int,
    tails: Sequence[tuple[Sequence[int], Sequence[int]] | None] | None = None,
    shrink: int = 1,
    micro_batches: int = 1,
    row_len: int | None = None,
    max_row_len: int = 0,
    rows_multiple: int = 1,
    known_shapes: Collection[tuple[int, int, int]] = (),
) -> TrajectoryBatch:
    """One copy per (block, group of `shrink` distinct steps) of every response (docs/algorithm.md §3),
    packed into `micro_batches` stacked micro-batches. Rollouts without a response token take no
    row. `row_len` None fits the rows to the rollouts (`layout.fitted_row_shape`, up to
    `max_row_len`, reusing one of `known_shapes` when it costs little more); target counts are
    padded to multiples of `vocab_chunk`."""
    if not (len(prompts) == len(responses) == len(step_maps)):
        raise ValueError("prompts, responses and step_maps must have one entry per sample")
    if tails is not None and len(tails) != len(prompts):
        raise ValueError("tails must have one (tokens, steps) pair per sample")
    layouts = [
        trajectory_layout(p, r, s, block_size=block_size, mask_id=mask_id, shrink=shrink,
                          tail=None if tails is None else tails[i])
        for i, (p, r, s) in enumerate(zip(prompts, responses, step_maps))
    ]
    with_targets = [i for i, lay in enumerate(layouts) if lay.num_targets]
    if not with_targets:
        raise ValueError("no rollout has a response token to score")
    groups = split_evenly(with_targets, min(micro_batches, len(with_targets)))
    origins: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    def record_origins(g: int, packed: PackedBatch) -> dict:
        valid = packed.target_valid
        rollout = np.asarray(groups[g])[packed.target_sample[valid]]
        position = packed.positions.reshape(-1)[packed.target_index[valid]]
        origins.append((rollout, position - np.array([len(prompts[i]) for i in rollout], np.int64),
                        packed.target_round[valid]))
        return {}

    arrays, packed = stack_micro_batches(
        [[layouts[i] for i in g] for g in groups], record_origins, block_size=block_size, row_len=row_len,
        max_row_len=max_row_len, rows_multiple=rows_multiple, vocab_chunk=vocab_chunk, known_shapes=known_shapes,
    )
    shape = arrays["target_valid"].shape
    target_rollout, response_index, rounds = np.full(shape, -1, np.int64), np.zeros(shape, np.int64), np.zeros(shape, np.int64)
    for m, (rollout, index, rnd) in enumerate(origins):
        target_rollout[m, : len(rollout)], response_index[m, : len(rollout)], rounds[m, : len(rollout)] = rollout, index, rnd
    return TrajectoryBatch(arrays, layouts, packed, target_rollout, response_index, rounds)


@nnx.jit(static_argnames=("vocab_chunk",))
def _jitted_target_logprobs(model, batch, vocab_chunk):
    return target_logprobs(model, batch, vocab_chunk=vocab_chunk)


def layout_logprobs(model: SDARModel, batch: TrajectoryBatch, *, vocab_chunk: int) -> np.ndarray:
    """l(θ) at every target slot of `batch` -> float32 [micro_batches, T] on the host (also when
    the parameters span processes), one forward per micro-batch — the update step's forward."""
    per_micro = []
    for m in range(batch.arrays["tokens"].shape[0]):
        inputs = {k: batch.arrays[k][m] for k in MODEL_INPUTS}
        per_micro.append(to_host(_jitted_target_logprobs(model, inputs, vocab_chunk)))
    return np.stack(per_micro).astype(np.float32)


def token_logprobs(
    model: SDARModel,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    step_maps: Sequence[Sequence[int]],
    *,
    block_size: int,
    mask_id: int,
    tails: Sequence[tuple[Sequence[int], Sequence[int]]] | None = None,
    shrink: int = 1,
    row_len: int | None = None,
    vocab_chunk: int = 256,
) -> list[np.ndarray]:
    """l_t(θ) for every response token of every sample (float32 arrays, response order).

    One forward over a packed layout (`layout_trajectories`): each sample's clean sequence once,
    plus one noisy copy per (block, distinct step) — with `shrink` > 1, per group of that many
    consecutive steps, whose tokens then share one state (a coarser trajectory; 1 is exact).
    """
    if not any(len(r) for r in responses):
        return [np.zeros(0, np.float32) for _ in responses]
    batch = layout_trajectories(prompts, responses, step_maps, block_size=block_size, mask_id=mask_id,
                                vocab_chunk=vocab_chunk, tails=tails, shrink=shrink, row_len=row_len)
    return batch.per_rollout(layout_logprobs(model, batch, vocab_chunk=vocab_chunk))
