"""The fused Pallas kernel (run in interpret mode on CPU) against dense softmax attention whose
mask is built token by token from the rule, for values and for gradients of q, k and v."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gtpo_jax.model import TokenLayout, block_causal_attention
from gtpo_jax.model.attention_pallas import pallas_block_causal_attention


def allowed_mask(q_ids, k_ids):
    """bool [b, Lq, Lk] by loops: same non-padding sample, and the key is clean in an earlier
    block or in the query's own block and copy."""
    (qs, qb, qc), (ks, kb, kc) = ([np.asarray(a) for a in ids] for ids in (q_ids, k_ids))
    b, lq, lk = qs.shape[0], qs.shape[1], ks.shape[1]
    out = np.zeros((b, lq, lk), bool)
    for r in range(b):
        for i in range(lq):
            for j in range(lk):
                if qs[r, i] == 0 or qs[r, i] != ks[r, j]:
                    continue
                earlier_clean = kc[r, j] == 0 and kb[r, j] < qb[r, i]
                own_copy = kc[r, j] == qc[r, i] and kb[r, j] == qb[r, i]
                out[r, i, j] = earlier_clean or own_copy
    return out


def dense_attention(q, k, v, allowed):
    """Softmax attention with an explicit mask; queries that see nothing give 0."""
    g = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    mask = jnp.asarray(allowed)[:, None]
    p = jax.nn.softmax(jnp.where(mask, s, -1e30), axis=-1) * mask
    return jnp.einsum("bhqk,bkhd->bqhd", p, v)


def layout(seg, blk, cpy):
    return TokenLayout(*(jnp.asarray(np.asarray(a), jnp.int32) for a in (seg, blk, cpy)))


def plain():
    pos = np.tile(np.arange(37), (2, 1))
    lay = TokenLayout.contiguous(pos, 4)
    return lay, lay


def packed():
    # row 0: samples of 10 and 13 tokens then 5 pad; row 1: one sample of 21 tokens, 7 pad
    seg = np.array([[1] * 10 + [2] * 13 + [0] * 5, [1] * 21 + [0] * 7])
    pos = np.array([list(range(10)) + list(range(13)) + [0] * 5, list(range(21)) + [0] * 7])
    lay = layout(seg, pos // 4, np.zeros_like(seg))
    return lay, lay


def noisy_copies():
    # clean prompt+response of 18 tokens (B=4), then copies of blocks 1, 2 (twice) and 4 (partial block)
    blk, cpy = [p // 4 for p in range(18)], [0] * 18
    for j, c in [(1, 1), (2, 2), (2, 3), (4, 4)]:
        blk += [j] * 4
        cpy += [c] * 4
    lay = layout(np.ones((1, len(blk))), [blk], [cpy])
    return lay, lay


def kv_cache():
    # a window of the previous block (just finished) + the current one over a cache of 3 of 6 blocks
    cache_seg = [1] * 12 + [0] * 12
    kv = layout([cache_seg + [1] * 8], [[p // 4 for p in range(24)] + [3] * 4 + [4] * 4], [[0] * 32])
    q = layout([[1] * 8], [[3] * 4 + [4] * 4], [[0] * 8])
    return q, kv


PATTERNS = {"plain": plain, "packed": packed, "noisy_copies": noisy_copies, "kv_cache": kv_cache}


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_values_and_gradients_match_dense(name):
    q_lay, kv_lay = PATTERNS[name]()
    allowed = allowed_mask(q_lay, kv_lay)
    rng = np.random.default_rng(len(name))
    b, lq, lk = allowed.shape
    q = jnp.asarray(rng.normal(size=(b, lq, 2, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(b, lk, 1, 16)), jnp.float32) for _ in range(2))
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)  # a generic cotangent

    def kernel(q, k, v):
        return pallas_block_causal_attention(q, k, v, q_lay, kv_lay, q_tile=16, kv_tile=16, interpret=True)

    np.testing.assert_allclose(np.asarray(kernel(q, k, v)), np.asarray(dense_attention(q, k, v, allowed)),
                               atol=2e-5, rtol=0)
    got = jax.grad(lambda *a: (kernel(*a) * w).sum(), (0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: (dense_attention(*a, allowed) * w).sum(), (0, 1, 2))(q, k, v)
    for g_got, g_want, which in zip(got, want, "qkv"):
        np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), atol=5e-5, rtol=0, err_msg=f"d{which}")


def test_dispatch_uses_the_jax_path_on_cpu_and_pallas_when_asked():
    q_lay, kv_lay = plain()
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 37, 4, 16)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 37, 2, 16)), jnp.float32) for _ in range(2))
    auto = jax.jit(lambda q, k, v: block_causal_attention(q, k, v, q_lay, kv_lay)).lower(q, k, v).as_text()
    assert "pallas" not in auto  # CPU: the tiled JAX path
    forced = block_causal_attention(q, k, v, q_lay, kv_lay, implementation="pallas_interpret")
    np.testing.assert_allclose(np.asarray(forced), np.asarray(dense_attention(q, k, v, allowed_mask(q_lay, kv_lay))),
                               atol=2e-5, rtol=0)
