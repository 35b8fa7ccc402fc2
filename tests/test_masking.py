"""SFT masking statistics (docs/algorithm.md §4) and post_num behaviour."""

import numpy as np
import pytest

from gtpo_jax.layout import sft_layout

MASK, PAD = 1, 2


def block_mask_counts(mask_sampling, lower, upper, block_size=8, blocks=4000, seed=0):
    rng = np.random.default_rng(seed)
    response = np.full(blocks * block_size, 7)
    lay = sft_layout(
        [5] * block_size, response, block_size=block_size, mask_id=MASK, pad_id=PAD, rng=rng,
        lower_p=lower, upper_p=upper, mask_sampling=mask_sampling,
    )
    return np.array([(c.tokens == MASK).sum() for c in lay.copies])


def test_per_block_vs_per_token_distributions():
    # per_token: each token masked with its own p ~ U(.1,.9): counts ~ Binomial(8, .5), var 2.
    # per_block: one p per block: var = 8 E[p(1-p)] + 64 Var(p) = 1.5733 + 3.4133 = 4.987.
    per_token = block_mask_counts("per_token", 0.1, 0.9)
    per_block = block_mask_counts("per_block", 0.1, 0.9)
    assert per_token.mean() / 8 == pytest.approx(0.5, abs=0.02)
    assert per_block.mean() / 8 == pytest.approx(0.5, abs=0.02)
    assert per_token.var() == pytest.approx(2.0, rel=0.1)
    assert per_block.var() == pytest.approx(4.987, rel=0.1)


def test_fixed_probability():
    counts = block_mask_counts("per_block", 0.3, 0.3)
    assert counts.mean() / 8 == pytest.approx(0.3, abs=0.02)


def test_prompt_never_masked_and_post_num():
    rng = np.random.default_rng(1)
    prompt, response, b = [5] * 6, [7] * 9, 4  # response ends at 15; pads from 15
    seen_targets = set()
    for _ in range(300):
        lay = sft_layout(prompt, response, block_size=b, mask_id=MASK, pad_id=PAD, rng=rng, post_num=3,
                         lower_p=0.5, upper_p=0.9)
        for c in lay.copies:
            for slot in np.nonzero(c.targets >= 0)[0]:
                seen_targets.add(c.block * b + slot)
        # the prompt's slots inside the partial first block stay visible
        first = [c for c in lay.copies if c.block == 1][0]
        assert (first.tokens[:2] == 5).all()
    # targets: the 9 response slots 6..14 and exactly post_num=3 pads 15..17; never 18, 19
    assert seen_targets == set(range(6, 18))
    lay = sft_layout(prompt, response, block_size=b, mask_id=MASK, pad_id=PAD, rng=rng, post_num=0)
    assert max(c.block for c in lay.copies) == 3  # no block of pads only


def test_noisy_copies_are_independent():
    rng = np.random.default_rng(2)
    lay = sft_layout([5] * 4, [7] * 40, block_size=4, mask_id=MASK, pad_id=PAD, rng=rng, num_noisy_copies=2)
    first = np.concatenate([c.tokens for c in lay.copies if c.round_index == 0])
    second = np.concatenate([c.tokens for c in lay.copies if c.round_index == 1])
    assert len(first) == len(second) == 40
    assert not np.array_equal(first, second)
