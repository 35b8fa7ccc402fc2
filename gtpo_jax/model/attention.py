"""Block-causal attention shared by the trainer, the trajectory scorer and the sampler.

Visibility is never stored as an L×L mask. Every token carries three small integers
(``TokenLayout``): the sample it belongs to (``segment``, 0 = padding), its absolute block
index (``block``) and which copy of that block it is (``copy``: 0 = the clean sequence,
k > 0 = the k-th noisy copy, unique within a segment). A query sees a key iff both belong to
the same non-padding segment and either

* the key is clean and lies in an earlier block, or
* the key lies in the query's own block and own copy.

For clean tokens this is docs/algorithm.md §1's rule ``k // B <= q // B`` (bidirectional inside a block,
causal across blocks); a noisy copy of block j sees the clean blocks < j and itself, and no
clean token ever sees a noisy copy (docs/algorithm.md §3), so packed samples, noisy copies and a KV cache
of finished blocks all follow from the same three ids.

The kernel is a tiled online-softmax (flash) attention written in JAX with a custom VJP that
recomputes scores tile by tile in the backward pass: memory is O(L·heads·head_dim) plus one
tile of scores. Each (query tile, key tile) pair is classed once per call (`tile_classes`):
skipped when no query sees a key, computed without a mask when every query sees every key, and
with an additive mask built once per pair otherwise. Tiles are laid out heads-major (the query
heads that share a key head stacked along rows), so that every product in the loops is a plain
batched matmul: XLA's CPU backend then copies no tile into another layout. On GPU the same rule runs as fused
Pallas kernels (`attention_pallas`), chosen automatically; CPU keeps this path.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp

from gtpo_jax.model import attention_pallas
from gtpo_jax.rounding import round_up

IMPLEMENTATIONS = ("jax", "pallas", "pallas_interpret")


class TokenLayout(NamedTuple):
    """Per-token ids, each int32 [batch, length]."""

    segment: jax.Array
    block: jax.Array
    copy: jax.Array

    @staticmethod
    def contiguous(positions: jax.Array, block_size: int, segment: jax.Array | None = None) -> "TokenLayout":
        """Clean sequences whose block index is ``position // block_size``."""
        positions = jnp.asarray(positions, jnp.int32)
        if segment is None:
            segment = jnp.ones_like(positions)
        return TokenLayout(jnp.asarray(segment, jnp.int32), positions // block_size, jnp.zeros_like(positions))

    def pad(self, length: int) -> "TokenLayout":
        extra = length - self.segment.shape[1]
        if extra == 0:
            return self
        return TokenLayout(*(jnp.pad(a, ((0, 0), (0, extra))) for a in self))

    def tiles(self, tile: int) -> "TokenLayout":
        """[batch, n*tile] -> [n, batch, tile]."""
        b, length = self.segment.shape
        return TokenLayout(*(a.reshape(b, length // tile, tile).transpose(1, 0, 2) for a in self))


def visibility(q: TokenLayout, kv: TokenLayout) -> jax.Array:
    """bool [batch, Lq, Lk]: may query i attend to key j. Only ever called on tiles."""
    qs, qb, qc = (a[:, :, None] for a in q)
    ks, kb, kc = (a[:, None, :] for a in kv)
    earlier_clean = (kc == 0) & (kb < qb)
    same_copy = (kc == qc) & (kb == qb)
    return (qs == ks) & (ks > 0) & (earlier_clean | same_copy)


# Tile pair classes: no query sees a key (skipped), some pairs visible (scores masked), all visible.
_SKIP, _MASKED, _FULL = 0, 1, 2


def tile_classes(q_ids: TokenLayout, k_ids: TokenLayout) -> jax.Array:
    """int32 [nq, nk]: the class of every (query tile, key tile) pair of tiled ids
    ([n, batch, tile] each), computed one query tile at a time (never an L×L mask)."""
    nk, b, tk = k_ids.segment.shape
    flat_k = TokenLayout(*(a.transpose(1, 0, 2).reshape(b, nk * tk) for a in k_ids))

    def one_q_tile(qi):
        vis = visibility(qi, flat_k).reshape(b, -1, nk, tk)
        return jnp.where(vis.all((0, 1, 3)), _FULL, jnp.where(vis.any((0, 1, 3)), _MASKED, _SKIP))

    return jax.lax.map(one_q_tile, q_ids).astype(jnp.int32)


def _scores(q, k, bias, scale, g):
    """q [b, hkv, g*tq, d], k [b, hkv, tk, d] -> float32 scaled scores s [b, hkv, g*tq, tk];
    bias [b, tq, tk] (0 or -inf) is added to every head's scores, None for a fully visible pair."""
    s = jnp.einsum("bhmd,bhkd->bhmk", q, k, preferred_element_type=jnp.float32) * scale
    if bias is None:
        return s
    b, hkv, m, tk = s.shape
    return (s.reshape(b, hkv, g, m // g, tk) + bias[:, None, None]).reshape(s.shape)


def _bias(q_ids, k_ids):
    """Additive mask [b, tq, tk] of a partly visible pair, held in memory (the barrier) so that
    XLA does not recompute the visibility rule for every head's score."""
    return jax.lax.optimization_barrier(jnp.where(visibility(q_ids, k_ids), 0.0, -jnp.inf).astype(jnp.float32))


def _by_class(cls, fn, skip):
    """lax.switch over a pair's class: `skip()` for invisible pairs, `fn(masked=...)` otherwise."""
    return jax.lax.switch(cls, [skip, lambda: fn(True), lambda: fn(False)])


def _forward_tiles(q, k, v, q_ids, k_ids, classes, scale, g):
    """q [nq, b, hkv, g*tq, d] (the query heads that share a key head stacked along rows);
    k, v [nk, b, hkv, tk, d]; ids tiled [n, b, tile]; classes [nq, nk] (`tile_classes`).

    Returns out [nq, b, hkv, g*tq, d] (q.dtype) and lse [nq, b, hkv, g*tq] (float32, +inf for
    queries that see nothing, so that their probabilities are 0 in the backward).
    """
    _, b, hkv, rows, d = q.shape

    def one_q_tile(args):
        qt, qi, cls_row = args

        def kv_step(carry, kv):
            kt, vt, ki, cls = kv

            def update(masked):
                m, l, acc = carry
                s = _scores(qt, kt, _bias(qi, ki) if masked else None, scale, g)
                m_new = jnp.maximum(m, s.max(-1))
                m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
                p = jnp.exp(s - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                pv = jnp.einsum("bhmk,bhkd->bhmd", p.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
                return m_new, l * alpha + p.sum(-1), acc * alpha[..., None] + pv

            return _by_class(cls, update, lambda: carry), None

        init = (
            jnp.full((b, hkv, rows), -jnp.inf, jnp.float32),
            jnp.zeros((b, hkv, rows), jnp.float32),
            jnp.zeros((b, hkv, rows, d), jnp.float32),
        )
        (m, l, acc), _ = jax.lax.scan(kv_step, init, (k, v, k_ids, cls_row))
        seen = l > 0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        return out.astype(q.dtype), lse

    return jax.lax.map(one_q_tile, (q, q_ids, classes))


def _backward_tiles(q, k, v, q_ids, k_ids, classes, out, lse, dout, scale, g):
    """FlashAttention-2 style backward in one pass: the outer loop runs over key tiles (carrying
    the query gradient of every tile), the inner over query tiles; each visible tile's scores
    are recomputed once and give dV, dK and that query tile's dQ share, never stored. Layouts
    as in `_forward_tiles`: every product is a plain batched matmul over (b, hkv); the softmax
    scale is applied to dK and dQ once, after their sums."""
    # delta_i = sum_d dO_i * O_i, [nq, b, hkv, g*tq]
    delta = jnp.einsum("nbhmd,nbhmd->nbhm", dout.astype(jnp.float32), out.astype(jnp.float32))

    def key_tile_step(dq, kv):
        kt, vt, ki, cls_col = kv

        def q_step(carry, xs):
            dk, dv, dq = carry
            i, qt, qi, dot, lse_t, delta_t, cls = xs

            def update(masked):
                s = _scores(qt, kt, _bias(qi, ki) if masked else None, scale, g)
                p = jnp.exp(s - lse_t[..., None])  # masked scores are -inf: p = 0 there
                dv_t = jnp.einsum("bhmk,bhmd->bhkd", p, dot.astype(jnp.float32))
                dp = jnp.einsum("bhmd,bhkd->bhmk", dot, vt, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_t[..., None])
                dk_t = jnp.einsum("bhmk,bhmd->bhkd", ds, qt.astype(jnp.float32))
                dq_t = jnp.einsum("bhmk,bhkd->bhmd", ds, kt.astype(jnp.float32))
                return dk + dk_t, dv + dv_t, dq_t

            def skip():
                return dk, dv, jnp.zeros(qt.shape, jnp.float32)

            # dQ stays outside the conditional: passing the whole carry through it would copy it
            dk, dv, dq_tile = _by_class(cls, update, skip)
            return (dk, dv, dq.at[i].add(dq_tile)), None

        zeros = jnp.zeros(kt.shape, jnp.float32)
        xs = (jnp.arange(q.shape[0]), q, q_ids, dout, lse, delta, cls_col)
        (dk, dv, dq), _ = jax.lax.scan(q_step, (zeros, zeros, dq), xs)
        return dq, ((dk * scale).astype(k.dtype), dv.astype(v.dtype))

    dq, (dk, dv) = jax.lax.scan(key_tile_step, jnp.zeros(q.shape, jnp.float32), (k, v, k_ids, classes.T))
    return (dq * scale).astype(q.dtype), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _flash(q, k, v, q_ids, k_ids, classes, scale, g):
    out, _ = _forward_tiles(q, k, v, q_ids, k_ids, classes, scale, g)
    return out


def _flash_fwd(q, k, v, q_ids, k_ids, classes, scale, g):
    out, lse = _forward_tiles(q, k, v, q_ids, k_ids, classes, scale, g)
    return out, (q, k, v, q_ids, k_ids, classes, out, lse)


def _flash_bwd(scale, g, res, dout):
    q, k, v, q_ids, k_ids, classes, out, lse = res
    dq, dk, dv = _backward_tiles(q, k, v, q_ids, k_ids, classes, out, lse, dout, scale, g)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def block_causal_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_layout: TokenLayout,
    kv_layout: TokenLayout,
    *,
    q_tile: int = 256,
    kv_tile: int = 256,
    implementation: str | None = None,
) -> jax.Array:
    """Attention of q [batch, Lq, Hq, D] over k, v [batch, Lk, Hkv, D] (Hq a multiple of Hkv).

    Queries that see no key (padding) return zeros. Scores and softmax run in float32.
    `implementation`: "jax" (this module's tiled loop; q_tile/kv_tile apply), "pallas" (fused
    GPU kernels with their own tiles), "pallas_interpret" (the same kernels interpreted, for
    CPU tests); None picks "pallas" on GPU and "jax" elsewhere, unless the environment variable
    GTPO_JAX_ATTENTION names one (e.g. GTPO_JAX_ATTENTION=jax on a GPU whose Triton cannot
    compile the kernels).
    """
    b, lq, hq, d = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    if hq % hkv:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if implementation is None:
        on_gpu = jax.default_backend() == "gpu"
        implementation = os.environ.get("GTPO_JAX_ATTENTION") or ("pallas" if on_gpu else "jax")
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation != "jax":
        return attention_pallas.pallas_block_causal_attention(
            q, k, v, q_layout, kv_layout, interpret=implementation == "pallas_interpret")
    g = hq // hkv
    q_tile = min(q_tile, round_up(lq, 8))
    kv_tile = min(kv_tile, round_up(lk, 8))
    lq_pad, lk_pad = round_up(lq, q_tile), round_up(lk, kv_tile)

    def heads_major(x, length, t):  # [b, L, hkv, (g,) d] -> [n, b, hkv, (g·)t, d]
        x = jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape(b, length // t, t, hkv, -1, d).transpose(1, 0, 3, 4, 2, 5)
        return x.reshape(length // t, b, hkv, -1, d)

    qt = heads_major(q.reshape(b, lq, hkv, g, d), lq_pad, q_tile)
    kt, vt = heads_major(k, lk_pad, kv_tile), heads_major(v, lk_pad, kv_tile)
    q_ids = q_layout.pad(lq_pad).tiles(q_tile)
    k_ids = kv_layout.pad(lk_pad).tiles(kv_tile)
    out = _flash(qt, kt, vt, q_ids, k_ids, tile_classes(q_ids, k_ids), d**-0.5, g)
    out = out.reshape(lq_pad // q_tile, b, hkv, g, q_tile, d).transpose(1, 0, 4, 2, 3, 5)
    return out.reshape(b, lq_pad, hq, d)[:, :lq]
