"""The tiled vocabulary log-prob kernel against a dense log_softmax (values and both gradients)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gtpo_jax.model import vocab_logprobs


def _dense(hidden, head, tokens):
    logp = jax.nn.log_softmax(hidden @ head, axis=-1)
    return jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]


@pytest.mark.parametrize("saved_logits_mb", [0, 1], ids=["recomputed", "saved"])
@pytest.mark.parametrize("vocab, tile, chunk", [(1000, 128, 16), (1000, 1000, 48), (96, 256, 8)])
def test_matches_dense_log_softmax(vocab, tile, chunk, saved_logits_mb):
    # 1 MB holds these logits (48 x 1024 x 4 B = 0.19 MB): the backward reads the forward's.
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    t, d = 48, 32
    hidden = jax.random.normal(k[0], (t, d))
    head = jax.random.normal(k[1], (d, vocab)) * 0.5
    tokens = jax.random.randint(k[2], (t,), 0, vocab).at[:3].set(vocab - 1)  # the last (padded) tile
    weights = jax.random.normal(k[3], (t,))

    tiled = vocab_logprobs.target_logprobs(hidden, head, tokens, chunk=chunk, tile=tile,
                                           saved_logits_mb=saved_logits_mb)
    np.testing.assert_allclose(tiled, _dense(hidden, head, tokens), rtol=1e-6, atol=2e-6)

    def objective(fn):
        return lambda h, w: (weights * fn(h, w)).sum()

    got = jax.grad(objective(lambda h, w: vocab_logprobs.target_logprobs(
        h, w, tokens, chunk=chunk, tile=tile, saved_logits_mb=saved_logits_mb)), (0, 1))(hidden, head)
    want = jax.grad(objective(lambda h, w: _dense(h, w, tokens)), (0, 1))(hidden, head)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6 * float(jnp.abs(w).max()))


def test_targets_must_fill_chunks():
    with pytest.raises(ValueError, match="multiple of the chunk size"):
        vocab_logprobs.target_logprobs(jnp.zeros((10, 4)), jnp.zeros((4, 8)), jnp.zeros(10, int), chunk=4)


def test_saved_logits_skip_the_backward_recompute():
    """With the logits saved the gradient computes the [targets, vocab] logits once (in the forward),
    else twice (forward and backward's recompute)."""
    t, d, vocab = 64, 16, 512
    args = (jnp.ones((t, d)), jnp.ones((d, vocab)), jnp.zeros(t, jnp.int32))

    def dots(saved_logits_mb):
        grad = jax.grad(lambda h, w, tok: vocab_logprobs.target_logprobs(
            h, w, tok, chunk=t, tile=vocab, saved_logits_mb=saved_logits_mb).sum(), (0, 1))
        hlo = jax.jit(grad).lower(*args).as_text()
        return sum(f"-> tensor<{t}x{vocab}xf32>" in line for line in hlo.splitlines() if "dot_general" in line)

    assert vocab_logprobs.saved_logits_bytes(t, vocab) == t * vocab * 4
    assert dots(0) == 2 and dots(1) == 1, (dots(0), dots(1))
