"""A sampler's KV cache of finished clean blocks, and attention of a few new tokens over it.

The cache is preallocated in tiles of positions: per layer a tuple of key tiles
[batch, kv_heads, head_dim, tile] (scores = q @ K) and of value tiles [batch, kv_heads, tile,
head_dim] (out = p @ V). With so few query rows per head, keys stored [.., tile, head_dim] make
the score product three times slower on a CPU. Every tile is its own array because the products
then read it where it lies: a tile sliced out of one array, dynamically or statically, is a copy
on XLA's CPU backend, and those copies took 11% of a 128-token decode. The first `length[b]`
positions are filled with clean blocks earlier than any query of the forward, so every
(non-padding) query sees all of them: visibility inside the cache is a length, and only the new
tokens' own keys need the block-causal rule (`visibility`).

Attention folds the new tokens' own keys and then each tile into an online softmax; a tile past
the batch's longest filled length is skipped (`lax.cond`), so the cost follows what is filled,
not the capacity, in one compiled shape. The number of tiles is the caller's choice (the sampler
keeps it at most 8: the steps are unrolled). Decoding only: there is no backward pass.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from gtpo_jax.model.attention import TokenLayout, visibility

Tiles = tuple[jax.Array, ...]


class KVCache(NamedTuple):
    """Per layer the key tiles k[layer] ([batch, kv_heads, head_dim, tile] each) and value tiles
    v[layer] ([batch, kv_heads, tile, head_dim] each), tile i holding positions [i·tile, (i+1)·tile);
    length int32 [batch]: filled positions."""

    k: tuple[Tiles, ...]
    v: tuple[Tiles, ...]
    length: jax.Array


def split_tiles(keys: jax.Array, values: jax.Array, tile: int) -> tuple[Tiles, Tiles]:
    """One layer's whole cache arrays, keys [b, kv_heads, head_dim, capacity] and values
    [b, kv_heads, capacity, head_dim] (capacity a multiple of `tile`), as `KVCache` tiles."""
    capacity = keys.shape[3]
    if capacity % tile:
        raise ValueError(f"cache capacity {capacity} is not a multiple of the tile {tile}")
    starts = range(0, capacity, tile)
    return tuple(keys[..., i : i + tile] for i in starts), tuple(values[:, :, i : i + tile] for i in starts)


def _online_softmax_step(carry, s, v):
    """Fold scores s [b, h, r, t] (-inf where invisible) and values v [b, h, t, d] into (m, l, acc)."""
    m, l, acc = carry
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
    p = jnp.exp(s - m_safe[..., None])
    alpha = jnp.exp(m - m_safe)
    pv = jnp.einsum("bhrt,bhtd->bhrd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv


def cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, layout: TokenLayout, cache_k: Tiles, cache_v: Tiles,
                     length: jax.Array, *, kv_layout: TokenLayout | None = None) -> jax.Array:
    """q [b, lq, hq, d] over the cache's first length[b] positions (one layer's `KVCache` tiles)
    and the new tokens' own keys/values k, v [b, lk, hkv, d]; `layout` is the queries',
    `kv_layout` the new keys' (default: the same tokens; lk > lq when only some of the new tokens
    ask). Queries of segment 0 (padding) see nothing and return zeros."""
    b, lq, hq, d = q.shape
    hkv, tile = cache_k[0].shape[1], cache_k[0].shape[3]
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

    def cache_tile(carry, kt, vt, start):
        filled = (start + jnp.arange(tile)) < length[:, None]  # [b, t]
        s = jnp.einsum("bhrd,bhdt->bhrt", qr, kt, preferred_element_type=jnp.float32) * scale
        return _online_softmax_step(carry, jnp.where(real & filled[:, None, None], s, -jnp.inf), vt)

    longest = jnp.max(length)
    for i, (kt, vt) in enumerate(zip(cache_k, cache_v)):
        carry = jax.lax.cond(i * tile < longest, lambda c, kt, vt, i=i: cache_tile(c, kt, vt, i * tile),
                             lambda c, kt, vt: c, carry, kt, vt)
    m, l, acc = carry
    seen = l > 0
    out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
    return out.reshape(b, hkv, g, lq, d).transpose(0, 3, 1, 2, 4).reshape(b, lq, hq, d).astype(q.dtype)
