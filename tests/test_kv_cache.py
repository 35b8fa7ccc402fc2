"""The sampler's decode attention over a KV cache against dense softmax attention in numpy."""

import jax.numpy as jnp
import numpy as np

from gtpo_jax.model import TokenLayout
from gtpo_jax.model.kv_cache import cached_attention


def test_cached_attention_matches_dense_numpy(rng):
    b, lq, hq, hkv, d, capacity, tile, B = 4, 8, 4, 2, 16, 48, 16, 4
    lengths = np.array([0, 5, 16, 37])  # empty, inside the first tile, a tile edge, the third tile
    q = rng.standard_normal((b, lq, hq, d)).astype(np.float32)
    k = rng.standard_normal((b, lq, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, lq, hkv, d)).astype(np.float32)
    ck = rng.standard_normal((b, hkv, capacity, d)).astype(np.float32)  # garbage past each length
    cv = rng.standard_normal((b, hkv, capacity, d)).astype(np.float32)
    # two blocks of new tokens: the first clean (row 1: padding), the second sees it and itself
    seg = np.ones((b, lq), np.int32)
    seg[1, :B] = 0
    block = np.repeat([[10, 11]], b, 0).repeat(B, 1)
    got = cached_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                           TokenLayout(jnp.asarray(seg), jnp.asarray(block), jnp.zeros((b, lq), jnp.int32)),
                           jnp.asarray(ck.transpose(0, 1, 3, 2)), jnp.asarray(cv), jnp.asarray(lengths), tile=tile)

    want = np.zeros_like(q)
    for i in range(b):
        for t in range(lq):
            if not seg[i, t]:
                continue  # padding sees nothing: zeros
            own = [u for u in range(lq) if seg[i, u] and block[i, u] <= block[i, t]]
            for h in range(hq):
                g = h // (hq // hkv)
                keys = np.concatenate([ck[i, g, : lengths[i]], k[i, own, g]])
                values = np.concatenate([cv[i, g, : lengths[i]], v[i, own, g]])
                s = keys.astype(np.float64) @ q[i, t, h] / np.sqrt(d)
                p = np.exp(s - s.max())
                want[i, t, h] = p @ values / p.sum()
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=0)
