"""The sampler's decode attention over a KV cache against dense softmax attention in numpy; the
model's last layer asked for a few tokens only against the full forward; rotary rows gathered from
the sampler's table against those computed from their positions."""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from gtpo_jax.model import KVCache, ModelConfig, Rope, TokenLayout, init_model, split_tiles
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
    tiles_k, tiles_v = split_tiles(jnp.asarray(ck.transpose(0, 1, 3, 2)), jnp.asarray(cv), tile)
    got = cached_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                           TokenLayout(jnp.asarray(seg), jnp.asarray(block), jnp.zeros((b, lq), jnp.int32)),
                           tiles_k, tiles_v, jnp.asarray(lengths))

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


def test_last_layer_rows_equal_the_full_forward(rng):
    """The sampler asks the last layer for a few tokens' states only (`run_layers(..., rows=)`):
    those equal the full forward's at the same tokens, over a cache and without one, including a
    padding token among the keys and a row that asks for a padding token."""
    model = init_model(ModelConfig.tiny(vocab_size=64, num_layers=3), seed=2)
    b, n, B, tile, capacity = 3, 8, 4, 16, 32
    tokens = jnp.asarray(rng.integers(1, 64, (b, n)), jnp.int32)
    pos = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32) + 12, (b, n))
    seg = jnp.ones((b, n), jnp.int32).at[1, :B].set(0)  # row 1: the first block is padding
    layout = TokenLayout(seg, pos // B, jnp.zeros((b, n), jnp.int32))
    rows = jnp.asarray([[4, 6, 7], [5, 4, 0], [0, 3, 7]], jnp.int32)  # any order; row 1 asks for padding
    shape = (b, model.cfg.num_kv_heads, capacity, model.cfg.head_dim)
    k, v = zip(*(split_tiles(jnp.asarray(rng.standard_normal(shape), jnp.float32).swapaxes(2, 3),
                             jnp.asarray(rng.standard_normal(shape), jnp.float32), tile) for _ in range(3)))
    cache = KVCache(k, v, jnp.asarray([12, 0, 9], jnp.int32))
    layers = range(model.cfg.num_layers)

    @nnx.jit(static_argnums=(1,))
    def run(model, with_cache, rows):
        return model.run_layers(model.embed(tokens), Rope.of(model.cfg, pos), layout, layers,
                                cache if with_cache else None, rows)

    for with_cache in (True, False):
        (full, full_kv), (some, some_kv) = run(model, with_cache, None), run(model, with_cache, rows)
        want = np.take_along_axis(np.asarray(full), np.asarray(rows)[..., None], 1)
        np.testing.assert_allclose(np.asarray(some), want, atol=1e-5, rtol=0)
        for a, w in zip(some_kv, full_kv):  # every token's keys and values, last layer included
            np.testing.assert_allclose(np.asarray(a.k), np.asarray(w.k), atol=1e-6, rtol=0)
            np.testing.assert_allclose(np.asarray(a.v), np.asarray(w.v), atol=1e-6, rtol=0)


def test_rope_rows_gathered_from_a_table_equal_those_of_their_positions(rng):
    """The sampler builds the rotary tables once for every cache position and gathers each
    forward's rows (`Rope.at`): they equal the tables computed from the positions themselves."""
    cfg = ModelConfig.tiny(vocab_size=64)
    pos = jnp.asarray(rng.integers(0, 96, (3, 8)), jnp.int32)
    table = Rope.of(cfg, jnp.arange(96, dtype=jnp.int32)[None])
    got, want = table.at(pos), Rope.of(cfg, pos)
    assert got.cos.shape == (3, 8, cfg.head_dim)
    np.testing.assert_allclose(np.asarray(got.cos), np.asarray(want.cos), atol=1e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(got.sin), np.asarray(want.sin), atol=1e-6, rtol=0)
