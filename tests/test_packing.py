"""Row shapes fitted to a GTPO step's rollouts (numpy only, no model): the bucket grid, how full the
rows are on rollouts shaped like the CPU demo's, and the reuse of shapes already compiled."""

import types

import numpy as np

from gtpo_jax.layout import gtpo_row_len, trajectory_layout
from gtpo_jax.packing import bucket_size, fitted_row_shape, stack_micro_batches

B = 4


def test_bucket_grid_is_at_most_one_eighth_above_and_eight_per_octave():
    for unit in (1, 128):
        sizes = [bucket_size(n, unit) for n in range(1, 40 * unit)]
        for n, size in zip(range(1, 40 * unit), sizes):
            assert size >= n and size % unit == 0
            assert size <= max(16 * unit, n * 9 / 8 + unit)  # exact up to 16 units, then within 1/8
        octave = {s for s in sizes if 16 * unit <= s < 32 * unit}
        assert len(octave) == 8


def demo_like_rollouts(rng, n=64, max_new=48):
    """Prompts of 35–45 tokens, responses of ~36 ± 6 tokens (at most max_new), 1–2 tokens per
    forward in random order inside each block: the CPU demo's rollouts in shape."""
    layouts = []
    for _ in range(n):
        p, r = int(rng.integers(35, 46)), int(np.clip(rng.normal(36, 6), 8, max_new))
        steps, counter, pos = [], 0, p
        while pos < p + r:
            end = min((pos // B + 1) * B, p + r)
            order, block, i = rng.permutation(end - pos), np.zeros(end - pos, int), 0
            while i < len(order):
                counter += 1
                take = 1 if rng.random() < 0.3 else 2
                block[order[i : i + take]] = counter
                i += take
            steps += block.tolist()
            pos = end
        layouts.append(trajectory_layout(rng.integers(1, 90, p), rng.integers(1, 90, r), steps, block_size=B,
                                         mask_id=0))
    return layouts


def test_fitted_rows_are_at_least_85_percent_full_with_few_shapes():
    rng = np.random.default_rng(0)
    known, fill, worst_case_fill = set(), [], []
    worst = gtpo_row_len(B, 48, 45)
    for _ in range(20):  # twenty steps' worth of rollouts
        layouts = demo_like_rollouts(rng)
        useful = sum(lay.length for lay in layouts)
        arrays, packed = stack_micro_batches([layouts], lambda g, p: {}, block_size=B, row_len=None, rows_multiple=1,
                                             vocab_chunk=256, max_row_len=worst, known_shapes=known)
        known.add((*arrays["tokens"].shape[1:], arrays["target_valid"].shape[1]))
        # every sample placed once: the segments of the rows hold all the samples' tokens
        assert (arrays["segment"] > 0).sum() == useful
        assert arrays["target_valid"].sum() == sum(lay.num_targets for lay in layouts)
        fill.append(useful / arrays["tokens"].size)
        old, _ = stack_micro_batches([layouts], lambda g, p: {}, block_size=B, row_len=worst, rows_multiple=1,
                                     vocab_chunk=256)
        worst_case_fill.append(useful / old["tokens"].size)
    assert min(fill) >= 0.85, fill
    assert np.mean(fill) > np.mean(worst_case_fill)
    assert len(known) <= 5, known


def test_a_known_shape_is_reused_when_it_costs_little_more():
    layouts = demo_like_rollouts(np.random.default_rng(1))
    fitted, _ = stack_micro_batches([layouts], lambda g, p: {}, block_size=B, row_len=None, rows_multiple=1,
                                    vocab_chunk=256, max_row_len=384)
    rows, row_len = fitted["tokens"].shape[1:]
    targets = fitted["target_valid"].shape[1]
    slightly_bigger = (rows, row_len + 32, targets)  # longer rows hold the same samples, 3% more tokens
    again, _ = stack_micro_batches([layouts], lambda g, p: {}, block_size=B, row_len=None, rows_multiple=1,
                                   vocab_chunk=256, max_row_len=384, known_shapes={slightly_bigger, (1, 128, 256)})
    assert (*again["tokens"].shape[1:], again["target_valid"].shape[1]) == slightly_bigger
    far_bigger = (2 * rows, row_len, targets)
    third, _ = stack_micro_batches([layouts], lambda g, p: {}, block_size=B, row_len=None, rows_multiple=1,
                                   vocab_chunk=256, max_row_len=384, known_shapes={far_bigger})
    assert third["tokens"].shape[1:] == (rows, row_len)


def test_fixed_row_length_pads_rows_to_the_grid_and_reuses_known_shapes():
    """SFT packs into rows of a fixed length: the rows needed are padded on bucket_size's grid (a
    power of two would compute up to twice the rows), target slots to a power of two, and a known
    shape of the same row length that costs <= 5% more is reused (no recompile); one of another row
    length, or with far more rows, is not."""
    layouts = demo_like_rollouts(np.random.default_rng(2))

    def shape_with(known=()):
        out, packed = stack_micro_batches([layouts], lambda g, p: {}, block_size=B, row_len=512, rows_multiple=1,
                                          vocab_chunk=256, known_shapes=known)
        return (*out["tokens"].shape[1:], out["target_valid"].shape[1]), len(packed[0].tokens)

    (rows, row_len, targets), needed = shape_with()
    assert needed > 16 and needed & (needed - 1), "the rollouts should need a row count that is not a power of two"
    assert (rows, row_len) == (bucket_size(needed, 1), 512) and rows < 1.13 * needed
    assert targets & (targets - 1) == 0
    one_more = (rows + 1, 512, targets)
    assert shape_with({one_more, (rows, 1024, targets)})[0] == one_more
    assert shape_with({(rows, 1024, targets), (2 * rows, 512, targets)})[0] == (rows, 512, targets)


def test_equal_row_tokens_go_to_the_shorter_rows():
    """Eight 512-token samples fill 8 rows of 512, 4 of 1024 or 2 of 2048 alike; the attention
    kernel computes tile pairs across a row's samples, so the shortest rows cost least (the CPU
    demo's GTPO update: 32 rows of 384 took half the CPU time of 6 rows of 2048)."""
    samples = [types.SimpleNamespace(length=512)] * 8
    assert fitted_row_shape([samples], max_row_len=512, rows_multiple=1) == (8, 512)
    # fewer row tokens still win: three 650-token samples fill 3 rows of 768 (2304) or 1 of 2048
    assert fitted_row_shape([[types.SimpleNamespace(length=650)] * 3], max_row_len=768, rows_multiple=1) == (1, 2048)
