"""The Flax model against transformers' Qwen3ForCausalLM with an explicit block-causal mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conftest import block_causal_additive_mask, write_tiny_hf_checkpoint
from gtpo_jax.hf_io import load_hf_model
from gtpo_jax.model import TokenLayout
from gtpo_jax.model.sdar import linear


def hf_logits(model, tokens, block_size):
    length = tokens.shape[1]
    mask = torch.from_numpy(block_causal_additive_mask(length, block_size))[None, None]
    mask = mask.expand(tokens.shape[0], 1, length, length)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(tokens), attention_mask=mask)
    return out.logits.float().numpy()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("length", [16, 19])
def test_logits_match_transformers(tmp_path, rng, tie, length):
    ref = write_tiny_hf_checkpoint(tmp_path, tie=tie, attn_implementation="eager")
    model = load_hf_model(tmp_path)
    tokens = rng.integers(0, model.cfg.vocab_size, size=(2, length)).astype(np.int64)
    positions = np.tile(np.arange(length), (2, 1))
    hidden, _ = model(tokens, positions, TokenLayout.contiguous(positions, 4))
    ours = np.asarray(model.logits(hidden))
    theirs = hf_logits(ref, tokens, 4)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)
    # the mask matters: a plain causal model gives different logits
    with torch.no_grad():
        causal = ref(input_ids=torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(causal - theirs).max() > 1e-3


def test_rope_scaling_linear_matches_transformers(tmp_path, rng):
    ref = write_tiny_hf_checkpoint(
        tmp_path, tie=True, rope_scaling={"rope_type": "linear", "factor": 2.0}, attn_implementation="eager"
    )
    model = load_hf_model(tmp_path)
    assert model.cfg.rope_scaling["factor"] == 2.0
    tokens = rng.integers(0, model.cfg.vocab_size, size=(1, 24)).astype(np.int64)
    positions = np.arange(24)[None]
    hidden, _ = model(tokens, positions, TokenLayout.contiguous(positions, 4))
    np.testing.assert_allclose(np.asarray(model.logits(hidden)), hf_logits(ref, tokens, 4), atol=1e-4, rtol=0)


@pytest.mark.parametrize("k,n", [(24, 40), (40, 24)])  # both orders of the weight-gradient product
def test_linear_values_and_gradients_match_matmul(rng, k, n):
    """`linear`'s custom backward (operand order chosen for XLA's CPU dot) against autodiff of x @ w."""
    x = jnp.asarray(rng.normal(size=(2, 7, k)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(k, n)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(2, 7, n)), jnp.float32)
    ours = jax.grad(lambda x, w: (linear(x, w) * dy).sum(), (0, 1))(x, w)
    plain = jax.grad(lambda x, w: (jnp.matmul(x, w) * dy).sum(), (0, 1))(x, w)
    np.testing.assert_allclose(np.asarray(linear(x, w)), np.asarray(x @ w), atol=1e-5, rtol=0)
    for g_ours, g_plain in zip(ours, plain):
        np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_plain), atol=1e-4, rtol=0)
