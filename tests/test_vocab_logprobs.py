"""The tiled vocabulary log-prob kernel against a dense log_softmax (values and both gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gtpo_jax.model import vocab_logprobs


def _dense(hidden, head, tokens):
    logp = jax.nn.log_softmax(hidden @ head, axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


@pytest.mark.parametrize("vocab, tile, chunk", [(1000, 128, 16), (1000, 1000, 48), (96, 256, 8)])
def test_matches_dense_log_softmax(vocab, tile, chunk):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    t, d = 48, 32
    hidden = jax.random.normal(k[0], (t, d))
    head = jax.random.normal(k[1], (d, vocab)) * 0.5
    tokens = jax.random.randint(k[2], (t,), 0, vocab).at[:3].set(vocab - 1)  # the last (padded) tile
    weights = jax.random.normal(k[3], (t,))

    tiled = vocab_logprobs.target_logprobs(hidden, head, tokens, chunk=chunk, tile=tile)
    np.testing.assert_allclose(tiled, _dense(hidden, head, tokens), rtol=1e-6, atol=2e-6)

    def objective(fn):
        return lambda h, w: (weights * fn(h, w)).sum()

    got = jax.grad(objective(lambda h, w: vocab_logprobs.target_logprobs(h, w, tokens, chunk=chunk, tile=tile)),
                   (0, 1))(hidden, head)
    want = jax.grad(objective(lambda h, w: _dense(h, w, tokens)), (0, 1))(hidden, head)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(jnp.abs(w).max()))


def test_targets_must_fill_chunks():
    with pytest.raises(ValueError, match="multiple of the chunk size"):
        vocab_logprobs.target_logprobs(jnp.zeros((10, 4)), jnp.zeros((4, 8)), jnp.zeros(10, int), chunk=4)
