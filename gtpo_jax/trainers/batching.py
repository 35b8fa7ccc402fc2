"""Turning per-sample layouts into the stacked, fixed-shape micro-batches the update step eats."""

from __future__ import annotations

from typing import Callable, Sequence

import chex
import numpy as np

from gtpo_jax.layout import PackedBatch, SampleLayout, pack
from gtpo_jax.rounding import round_up


def _bucket(n: int, minimum: int) -> int:
    """Next power of two >= n (at least `minimum`): few distinct shapes, few recompiles."""
    size = minimum
    while size < n:
        size *= 2
    return size


def _pad_first(array: np.ndarray, length: int, fill=0) -> np.ndarray:
    if array.shape[0] == length:
        return array
    pad = np.full((length - array.shape[0],) + array.shape[1:], fill, array.dtype)
    return np.concatenate([array, pad])


def stack_micro_batches(
    groups: Sequence[Sequence[SampleLayout]],
    per_target: Callable[[int, PackedBatch], dict[str, np.ndarray]],
    *,
    block_size: int,
    row_len: int,
    rows_multiple: int,
    vocab_chunk: int,
    min_rows: int = 0,
) -> tuple[dict[str, np.ndarray], list[PackedBatch]]:
    """Pack each group of samples and stack the groups to [micro_batches, ...] arrays.

    `per_target(group_number, packed)` returns named arrays aligned with the packed batch's valid
    targets (e.g. loss weights, advantages); they are padded with zeros and stacked alongside.
    Row counts and target counts are padded to a common bucket.
    """
    packed = [pack(g, block_size=block_size, row_len=row_len, targets_multiple=vocab_chunk) for g in groups]
    # Rows to a power of two too: a GTPO step's row count follows how many groups DAPO kept, and
    # every new count would otherwise recompile the update step.
    rows = _bucket(max(min_rows, max(p.tokens.shape[0] for p in packed)), 1)
    rows = round_up(rows, rows_multiple)
    targets = _bucket(max(int(p.target_valid.sum()) for p in packed), vocab_chunk)
    stacked: dict[str, list[np.ndarray]] = {}
    for g, p in enumerate(packed):
        extra = per_target(g, p)
        arrays = {k: _pad_first(v, rows) for k, v in p.model_inputs().items() if v.ndim == 2}
        arrays["target_index"] = _pad_first(p.target_index, targets)
        arrays["target_token"] = _pad_first(p.target_token, targets)
        arrays["target_valid"] = _pad_first(p.target_valid, targets, False)
        for name, values in extra.items():
            arrays[name] = _pad_first(np.asarray(values), targets)
        for k, v in arrays.items():
            stacked.setdefault(k, []).append(v)
    out = {k: np.stack(v) for k, v in stacked.items()}
    # The update step's contract: row arrays [micro_batches, rows, row_len], per-target arrays
    # [micro_batches, targets], integer token ids and positions (a mismatch would surface as a
    # shape error deep inside jit, or as a silent float cast).
    row_arrays = [v for v in out.values() if v.ndim == 3]
    chex.assert_equal_shape(row_arrays)
    chex.assert_shape(row_arrays[0], (len(groups), rows, row_arrays[0].shape[2]))
    chex.assert_equal_shape([v for k, v in out.items() if k.startswith("target_") or k in extra])
    chex.assert_type([out["tokens"], out["target_index"], out["target_token"]], int)
    return out, packed


def split_evenly(items: Sequence, parts: int) -> list[list]:
    """`parts` consecutive groups whose sizes differ by at most one."""
    bounds = np.linspace(0, len(items), parts + 1).round().astype(int)
    return [list(items[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def per_sample_mean_weights(layouts: Sequence[SampleLayout], packed: PackedBatch, num_samples: int) -> np.ndarray:
    """w_t = 1 / (targets of t's sample × samples in the step): Σ w_t·nll_t is the mean over
    samples of each sample's mean NLL. Samples without any target contribute nothing."""
    counts = np.array([layouts[i].num_targets for i in packed.target_sample[packed.target_valid]], np.float64)
    return (1.0 / (counts * max(num_samples, 1))).astype(np.float32)
