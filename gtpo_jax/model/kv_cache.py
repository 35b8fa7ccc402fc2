"""A sampler's KV cache of finished clean blocks, and attention of a few new tokens over it.

The cache is preallocated, one array per layer for keys and for values (separate arrays: a
slice of a stacked one would be a copy per layer and step), laid out as the two products of a
decode step read them: keys [batch, kv_heads, head_dim, capacity] (scores = q @ K), values
[batch, kv_heads, capacity, head_dim] (out = p @ V). With so few query rows per head, keys
stored [.., capacity, head_dim] make the score product three times slower on a CPU. Its first `length[b]` positions are filled with clean blocks earlier than any
query of the forward, so every (non-padding) query sees all of them: visibility inside the cache
is a length, and only the new tokens' own keys need the block-causal rule (`visibility`).

Attention walks the cache in tiles up to the longest filled length of the batch (a loop with a
traced trip count: the cost follows what is filled, not the capacity, without one compiled
shape per length) and merges the tiles with the new tokens' own keys by an online softmax.
Decoding only: there is no backward pass.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gtpo_jax.model.attention import TokenLayout, visibility


class KVCache(NamedTuple):
    """Per layer k [batch, kv_heads, head_dim, capacity] and v [batch, kv_heads, capacity, head_dim];
    length int32 [batch]: filled positions."""

    k: tuple[jax.Array, ...]
    v: tuple[jax.Array, ...]
    length: jax.Array


def _online_softmax_step(carry, s, v):
    """Fold scores s [b, h, r, t] (-inf where invisible) and values v [b, h, t, d] into (m, l, acc)."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    pv = jnp.einsum("bhrt,bhtd->bhrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: TokenLayout, cache_k: jax.Array,
                     cache_v: jax.Array, length: jax.Array, *, tile: int,
                     kv_layout: TokenLayout | None = None) -> jax.Array:
    """q [b, lq, hq, d] over the cache's first length[b] positions (`KVCache` layouts, capacity a
    multiple of `tile`) and the new tokens' own keys/values k, v [b, lk, hkv, d]; `layout` is the
    queries', `kv_layout` the new keys' (default: the same tokens; lk > lq when only some of the
    new tokens ask). Queries of segment 0 (padding) see nothing and return zeros."""
    b, lq, hq, d = q.shape
    hkv, capacity = cache_k.shape[1], cache_k.shape[3]
    if capacity % tile:
        raise ValueError(f"cache capacity {capacity} is not a multiple of the tile {tile}")
    g = hq // hkv
    scale = d**-0.5
    # rows r = (group, query) per kv head: [b, hkv, g·lq, d]
    qr = q.reshape(b, lq, hkv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, hkv, g * lq, d)
    real = jnp.tile(layout.segment > 0, (1, g))[:, None, :, None]  # [b, 1, r, 1]

    own = jnp.tile(visibility(layout, layout if kv_layout is None else kv_layout), (1, g, 1))[:, None]  # [b, 1, r, lk]
    s = jnp.einsum("bhrd,bkhd->bhrk", qr, k, preferred_element_type=jnp.float32) * scale
    rows = (b, hkv, g * lq)
    init = (jnp.full(rows, -jnp.inf, jnp.float32), jnp.zeros(rows, jnp.float32),
            jnp.zeros(rows + (d,), jnp.float32))
    carry = _online_softmax_step(init, jnp.where(own, s, -jnp.inf), v.transpose(0, 2, 1, 3))

    def cache_tile(i, carry):
        kt = jax.lax.dynamic_slice_in_dim(cache_k, i * tile, tile, axis=3)
        vt = jax.lax.dynamic_slice_in_dim(cache_v, i * tile, tile, axis=2)
        filled = (i * tile + jnp.arange(tile)) < length[:, None]  # [b, t]
        s = jnp.einsum("bhrd,bhdt->bhrt", qr, kt, preferred_element_type=jnp.float32) * scale
        return _online_softmax_step(carry, jnp.where(real & filled[:, None, None], s, -jnp.inf), vt)

    n_tiles = (jnp.max(length) + tile - 1) // tile
    m, l, acc = jax.lax.fori_loop(0, n_tiles, cache_tile, carry)
    seen = l > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    return out.reshape(b, hkv, g, lq, d).transpose(0, 3, 1, 2, 4).reshape(b, lq, hq, d).astype(q.dtype)
