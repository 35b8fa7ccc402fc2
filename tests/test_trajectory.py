"""token_logprobs against a naive scorer: one full forward per token state, built per docs/algorithm.md §3."""

import jax
import numpy as np
import pytest
from flax import nnx

from gtpo_jax.model import ModelConfig, TokenLayout, init_model
from gtpo_jax.trajectory import layout_trajectories, token_logprobs

B, MASK, VOCAB = 4, 0, 97


@nnx.jit
def full_forward_logprobs(model, tokens):
    positions = jax.numpy.arange(tokens.shape[1])[None]
    hidden, _ = model(tokens, positions, TokenLayout.contiguous(positions, B))
    return jax.nn.log_softmax(model.logits(hidden), axis=-1)


def naive_logprobs(model, prompt, response, steps, tail=None, shrink=1):
    """For each response token t in block j: tokens of block j with step >= (first step of t's
    group) are masked (tail slots by their own steps; unknown slots always masked), earlier
    blocks clean; one forward of the whole prefix, log-softmax at t."""
    prompt, response, steps = list(prompt), list(response), list(steps)
    p = len(prompt)
    tail_tokens, tail_steps = (list(tail[0]), list(tail[1])) if tail else ([], [])
    out = []
    for t in range(len(response)):
        pos = p + t
        j = pos // B
        block_slots = range(j * B, (j + 1) * B)
        # group of t's step among the distinct steps of its block
        block_steps = sorted({steps[x - p] for x in block_slots if p <= x < p + len(response)})
        group_start = block_steps[(block_steps.index(steps[t]) // shrink) * shrink]
        seq = prompt + response
        seq = seq + tail_tokens + [MASK] * ((j + 1) * B - len(seq) - len(tail_tokens))
        seq = seq[: (j + 1) * B]
        for x in block_slots:
            if x < p:
                continue
            if x < p + len(response):
                step = steps[x - p]
            elif x - p - len(response) < len(tail_tokens):
                step = tail_steps[x - p - len(response)]
            else:
                step = np.inf
            if step >= group_start:
                seq[x] = MASK
        logp = full_forward_logprobs(model, np.asarray([seq], np.int32))[0, pos]
        out.append(float(logp[response[t]]))
    return np.asarray(out, np.float32)


def random_step_map(rng, prompt_len, resp_len, tokens_per_step_max):
    """Steps increase block by block; inside a block, slots are committed in a random order,
    several per step."""
    steps, counter = [], 0
    pos = prompt_len
    end = prompt_len + resp_len
    while pos < end:
        block_end = min((pos // B + 1) * B, end)
        slots = list(range(pos, block_end))
        order = rng.permutation(len(slots))
        block_steps = np.zeros(len(slots), int)
        i = 0
        while i < len(slots):
            k = int(rng.integers(1, tokens_per_step_max + 1))
            counter += 1
            block_steps[order[i : i + k]] = counter
            i += k
        steps.extend(block_steps.tolist())
        pos = block_end
    return steps


@pytest.fixture(scope="module")
def model():
    return init_model(ModelConfig.tiny(vocab_size=VOCAB, tie_word_embeddings=False), seed=1)


@pytest.mark.parametrize("shrink", [1, 2])
@pytest.mark.parametrize("per_step", [1, 3])
def test_matches_naive_scorer(model, shrink, per_step):
    rng = np.random.default_rng(per_step * 10 + shrink)
    prompts, responses, steps = [], [], []
    for p_len in (8, 9, 11, 7, 12):  # P % B in {0, 1, 3, 3, 0}
        r_len = int(rng.integers(5, 14))
        prompts.append(rng.integers(1, VOCAB, p_len).tolist())
        responses.append(rng.integers(1, VOCAB, r_len).tolist())
        steps.append(random_step_map(rng, p_len, r_len, per_step))
    got = token_logprobs(model, prompts, responses, steps, block_size=B, mask_id=MASK, shrink=shrink, row_len=256)
    for p, r, s, g in zip(prompts, responses, steps, got):
        np.testing.assert_allclose(g, naive_logprobs(model, p, r, s, shrink=shrink), atol=1e-5, rtol=0)


def test_packs_several_samples_per_row_and_tails(model):
    rng = np.random.default_rng(7)
    prompts = [rng.integers(1, VOCAB, 9).tolist(), rng.integers(1, VOCAB, 6).tolist()]
    responses = [rng.integers(1, VOCAB, 6).tolist(), rng.integers(1, VOCAB, 5).tolist()]
    steps = [random_step_map(rng, 9, 6, 2), random_step_map(rng, 6, 5, 2)]
    # sample 0 ends at position 15 (block end): no tail; sample 1 ends at 11: one tail slot
    tails = [([], []), ([5], [steps[1][-1] - 1])]
    batch = layout_trajectories(prompts, responses, steps, block_size=B, mask_id=MASK, tails=tails, row_len=256,
                                vocab_chunk=32)
    assert batch.arrays["tokens"].shape[:2] == (1, 1) and batch.arrays["segment"].max() == 2  # both in one row
    got = token_logprobs(model, prompts, responses, steps, block_size=B, mask_id=MASK, tails=tails)
    for p, r, s, tl, g in zip(prompts, responses, steps, tails, got):
        np.testing.assert_allclose(g, naive_logprobs(model, p, r, s, tail=tl), atol=1e-5, rtol=0)
    # the tail matters: without it the last block's states differ
    no_tail = token_logprobs(model, prompts, responses, steps, block_size=B, mask_id=MASK)
    assert np.abs(no_tail[1] - got[1]).max() > 1e-6
