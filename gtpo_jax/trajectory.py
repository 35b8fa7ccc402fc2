"""Trajectory log-likelihood of block-diffusion rollouts (docs/algorithm.md §3), the public scoring API."""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from flax import nnx

from gtpo_jax.layout import PackedBatch, pack, trajectory_layout
from gtpo_jax.losses import target_logprobs
from gtpo_jax.model import SDARModel
from gtpo_jax.sharding import to_host


@nnx.jit(static_argnames=("vocab_chunk",))
def _jitted_target_logprobs(model, batch, vocab_chunk):
    return target_logprobs(model, batch, vocab_chunk=vocab_chunk)


def layout_rollouts(
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
) -> PackedBatch:
    if not (len(prompts) == len(responses) == len(step_maps)):
        raise ValueError("prompts, responses and step_maps must have one entry per sample")
    if tails is not None and len(tails) != len(prompts):
        raise ValueError("tails must have one (tokens, steps) pair per sample")
    samples = [
        trajectory_layout(
            p, r, s, block_size=block_size, mask_id=mask_id, shrink=shrink, tail=None if tails is None else tails[i]
        )
        for i, (p, r, s) in enumerate(zip(prompts, responses, step_maps))
    ]
    return pack(samples, block_size=block_size, row_len=row_len, targets_multiple=vocab_chunk)


def split_by_sample(values: np.ndarray, batch: PackedBatch) -> list[np.ndarray]:
    """Flat per-target values -> one array per sample, in response order."""
    out = [[] for _ in range(batch.num_samples)]
    order = np.argsort(batch.target_index[batch.target_valid], kind="stable")
    valid_values = values[batch.target_valid][order]
    valid_samples = batch.target_sample[batch.target_valid][order]
    # Within a sample, copies are laid out block by block and slots left to right, but a
    # block's copies hold its targets in step order: sort each sample's targets by position.
    positions = batch.positions.reshape(-1)[batch.target_index[batch.target_valid]][order]
    for i in range(batch.num_samples):
        sel = valid_samples == i
        out[i] = valid_values[sel][np.argsort(positions[sel], kind="stable")].astype(np.float32)
    return out


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
) -> list[np.ndarray]:
    """l_t(θ) for every response token of every sample (float32 arrays, response order).

    One forward over a packed layout: each sample's clean sequence once, plus one noisy copy per
    (block, distinct step) — with `shrink` > 1, per group of that many consecutive steps, whose
    tokens then share one state (a coarser trajectory; 1 is exact).
    """
    batch = layout_rollouts(
        prompts, responses, step_maps, block_size=block_size, mask_id=mask_id, tails=tails, shrink=shrink, row_len=row_len
    )
    inputs = jax.tree.map(np.asarray, batch.model_inputs())
    values = to_host(_jitted_target_logprobs(model, inputs, 256))  # also when params span processes
    return split_by_sample(values, batch)
