"""Packing sample layouts into rows, and rows into the stacked micro-batches a jitted step eats.

Samples are packed several per row (segment ids), first fit decreasing, padding only at row ends.
Shapes come from small grids (`bucket_size`, powers of two) so that jitted steps see few of them.
Everything here is numpy: it runs on the host, before the jitted step.
"""

from __future__ import annotations

from typing import Callable, Collection, Sequence

import chex
import numpy as np

from gtpo_jax.layout import PackedBatch, SampleLayout
from gtpo_jax.rounding import round_up


def bucket_size(n: int, unit: int, per_octave: int = 8) -> int:
    """Smallest size >= n on a grid of multiples of `unit` with `per_octave` sizes per doubling
    (all multiples up to per_octave·unit, then steps of 2^e·unit between per_octave·2^e·unit and
    twice that): at most 1/per_octave above n, and a handful of distinct sizes per octave, so that
    jitted steps fed these sizes compile few shapes."""
    units = max(-(-n // unit), 1)
    step = 1
    while units > per_octave * 2 * step:
        step *= 2
    return round_up(units, step) * unit


def first_fit_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """First-fit decreasing: samples longest first, each into the first row with room; returns
    each row's sample indices."""
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        for r, used in enumerate(fill):
            if used + lengths[i] <= row_len:
                rows[r].append(i)
                fill[r] += lengths[i]
                break
        else:
            rows.append([i])
            fill.append(lengths[i])
    return rows


def pack(
    samples: Sequence[SampleLayout],
    *,
    block_size: int,
    row_len: int | None = None,
    row_multiple: int = 128,
    rows_multiple: int = 1,
    targets_multiple: int = 256,
) -> PackedBatch:
    """First-fit-decreasing packing of samples into rows of `row_len` tokens (default: the longest
    sample rounded up to `row_multiple`). Rows and target counts are padded to multiples so that
    jitted steps see few distinct shapes."""
    longest = max(s.length for s in samples)
    if row_len is None:
        row_len = round_up(longest, row_multiple)
    if longest > row_len:
        raise ValueError(
            f"a sample needs {longest} tokens (clean sequence + noisy copies) but rows hold {row_len}; "
            "raise the row length or lower the maximum sequence length"
        )
    rows = first_fit_rows([s.length for s in samples], row_len)
    shape = (round_up(len(rows), rows_multiple), row_len)
    grid = {name: np.zeros(shape, np.int32) for name in ("tokens", "positions", "segment", "block", "copy")}
    targets: dict[str, list] = {"index": [], "token": [], "sample": [], "round": []}
    for r, members in enumerate(rows):
        offset = 0
        for seg, i in enumerate(members, start=1):
            offset = _place_sample(samples[i], i, seg, grid, targets, r, offset, block_size)
    n_t = len(targets["index"])
    n_t_pad = round_up(max(n_t, 1), targets_multiple)

    def padded(values):
        out = np.zeros(n_t_pad, np.int32)
        out[:n_t] = values
        return out

    return PackedBatch(
        **grid,
        target_index=padded(targets["index"]),
        target_token=padded(targets["token"]),
        target_sample=padded(targets["sample"]),
        target_round=padded(targets["round"]),
        target_valid=np.arange(n_t_pad) < n_t,
        num_samples=len(samples),
    )


def _place_sample(s: SampleLayout, sample: int, seg: int, grid: dict, targets: dict, row: int, offset: int,
                  block_size: int) -> int:
    """Writes sample `s` into row `row` of `grid` from `offset` (segment id `seg`), appends its
    targets; returns the offset after it."""
    row_len = grid["tokens"].shape[1]
    n = len(s.clean)
    sl = slice(offset, offset + n)
    grid["tokens"][row, sl] = s.clean
    grid["positions"][row, sl] = np.arange(n)
    grid["segment"][row, sl] = seg
    grid["block"][row, sl] = np.arange(n) // block_size
    offset += n
    for copy_id, c in enumerate(s.copies, start=1):
        sl = slice(offset, offset + block_size)
        grid["tokens"][row, sl] = c.tokens
        grid["positions"][row, sl] = c.block * block_size + np.arange(block_size)
        grid["segment"][row, sl] = seg
        grid["block"][row, sl] = c.block
        grid["copy"][row, sl] = copy_id
        slots = np.nonzero(c.targets >= 0)[0]
        targets["index"].extend(row * row_len + offset + slots)
        targets["token"].extend(c.targets[slots])
        targets["sample"].extend([sample] * len(slots))
        targets["round"].extend([c.round_index] * len(slots))
        offset += block_size
    return offset


def power_of_two_bucket(n: int, minimum: int) -> int:
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


# Rows longer than one worst-case rollout let short rollouts share a row; below this length a
# row is still cheap for the attention's tile loop (which checks (row/tile)² tile pairs).
SHARED_ROW_TOKENS = 2048


def fitted_row_shape(groups: Sequence[Sequence[SampleLayout]], *, max_row_len: int, rows_multiple: int,
                     row_unit: int = 128) -> tuple[int, int]:
    """(rows, row_len) that hold every group of samples (first fit decreasing) with the fewest row
    tokens; among equals the shortest rows (the attention kernel computes tile pairs across a row's
    samples: one CPU demo GTPO step's 12288 row tokens took half the update CPU time in 32 rows of
    384 as in 6 rows of 2048; that step still gets 2048, 384 not being one of its candidates).
    Row lengths: the longest sample rounded up on `bucket_size`'s grid (multiples of
    `row_unit`), then powers of two × row_unit up to max(max_row_len, SHARED_ROW_TOKENS); row
    counts on `bucket_size`'s grid in multiples of `rows_multiple` (at most 1/8 more than needed).
    So at most (1 + log2(cap / row_unit)) row lengths × the grid's row counts up to one row per
    sample can occur; `stack_micro_batches` reuses shapes already seen to keep it to a few."""
    lengths = [[s.length for s in g] for g in groups]
    row_len = bucket_size(max(max(ls) for ls in lengths), row_unit)
    best: tuple[int, int] | None = None
    while best is None or row_len <= max(max_row_len, SHARED_ROW_TOKENS):
        rows = bucket_size(max(len(first_fit_rows(ls, row_len)) for ls in lengths), rows_multiple)
        if best is None or rows * row_len < best[0] * best[1]:  # ties: shorter rows, less attention work
            best = (rows, row_len)
        row_len = power_of_two_bucket(row_len + 1, row_unit)  # the next power of two × row_unit
    return best


def reusable_shape(groups: Sequence[Sequence[SampleLayout]], fitted: tuple[int, int, int],
                   known_shapes: Collection[tuple[int, int, int]], slack: float = 0.05) -> tuple[int, int, int]:
    """The cheapest of `known_shapes` (rows, row_len, targets: already compiled) that holds the
    groups for at most `slack` more row tokens and target slots than `fitted`, else `fitted`."""
    rows, row_len, targets = fitted

    def holds(shape):
        r, w, t = shape
        return (r * w <= (1 + slack) * rows * row_len and targets <= t <= (1 + slack) * targets
                and all(max(s.length for s in g) <= w and len(first_fit_rows([s.length for s in g], w)) <= r
                        for g in groups))

    return min((s for s in known_shapes if holds(s)), key=lambda s: (s[0] * s[1], s[2]), default=fitted)


def stack_micro_batches(
    groups: Sequence[Sequence[SampleLayout]],
    per_target: Callable[[int, PackedBatch], dict[str, np.ndarray]],
    *,
    block_size: int,
    row_len: int | None,
    rows_multiple: int,
    vocab_chunk: int,
    min_rows: int = 0,
    max_row_len: int = 0,
    known_shapes: Collection[tuple[int, int, int]] = (),
) -> tuple[dict[str, np.ndarray], list[PackedBatch]]:
    """Pack each group of samples and stack the groups to [micro_batches, ...] arrays.

    `per_target(group_number, packed)` returns named arrays aligned with the packed batch's valid
    targets (e.g. loss weights, advantages); they are padded with zeros and stacked alongside.
    With a fixed `row_len`, row counts are on `bucket_size`'s grid and target counts powers of two;
    with row_len None the shape is fitted to the samples (`fitted_row_shape`, targets on
    `bucket_size`'s grid). Either way one of `known_shapes` (with a fixed row_len, one of that
    length) is reused when it costs little more (`reusable_shape`).
    """
    fitted = row_len is None
    if fitted:
        rows, row_len = fitted_row_shape(groups, max_row_len=max_row_len, rows_multiple=rows_multiple)
        needed = max(sum(s.num_targets for s in g) for g in groups)
        rows, row_len, targets = reusable_shape(groups, (rows, row_len, bucket_size(needed, vocab_chunk)),
                                                known_shapes)
    packed = [pack(g, block_size=block_size, row_len=row_len, targets_multiple=vocab_chunk) for g in groups]
    if not fitted:
        # Rows on bucket_size's grid, not to a power of two: every row costs a full row of compute,
        # and an SFT step needing 9 rows of 512 would compute 16. Target slots to a power of two (a
        # padding target costs one projection row, and fewer target counts mean fewer compiles).
        rows = bucket_size(max(min_rows, max(p.tokens.shape[0] for p in packed)), rows_multiple)
        targets = power_of_two_bucket(max(int(p.target_valid.sum()) for p in packed), vocab_chunk)
        rows, _, targets = reusable_shape(groups, (rows, row_len, targets),
                                          [s for s in known_shapes if s[1] == row_len])
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
