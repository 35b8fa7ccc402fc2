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
tile of scores, and tiles that no query can see are skipped. On GPU the same rule runs as fused
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


def _scores(q, k, q_ids, k_ids, scale):
    # q [b, tq, hkv, g, d], k [b, tk, hkv, d] -> s [b, hkv, g, tq, tk] in float32
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * scale
    mask = visibility(q_ids, k_ids)[:, None, None]
    return s, mask


def _forward_tiles(q, k, v, q_ids, k_ids, scale, q_tile, kv_tile):
    """q [nq, b, tq, hkv, g, d]; k, v [nk, b, tk, hkv, d]; ids tiled likewise.

    Returns out [nq, b, tq, hkv, g, d] (q.dtype) and lse [nq, b, hkv, g, tq] (float32,
    +inf for queries that see nothing, so that their probabilities are 0 in the backward).
    """
    _, b, tq, hkv, g, d = q.shape

    def one_q_tile(args):
        qt, qi = args

        def kv_step(carry, kv):
            m, l, acc = carry
            kt, vt, ki = kv

            def update(carry):
                m, l, acc = carry
                s, mask = _scores(qt, kt, qi, ki, scale)
                s = jnp.where(mask, s, -jnp.inf)
                m_new = jnp.maximum(m, s.max(-1))
                m_safe = jnp.where(jnp.isneginf(m_new), 0.0, m_new)
                p = jnp.exp(s - m_safe[..., None])
                alpha = jnp.exp(m - m_safe)
                l = l * alpha + p.sum(-1)
                pv = jnp.einsum("bhgqk,bkhd->bhgqd", p.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
                acc = acc * alpha[..., None] + pv
                return m_new, l, acc

            any_visible = jnp.any(visibility(qi, ki))
            return jax.lax.cond(any_visible, update, lambda c: c, carry), None

        init = (
            jnp.full((b, hkv, g, tq), -jnp.inf, jnp.float32),
            jnp.zeros((b, hkv, g, tq), jnp.float32),
            jnp.zeros((b, hkv, g, tq, d), jnp.float32),
        )
        (m, l, acc), _ = jax.lax.scan(kv_step, init, (k, v, k_ids))
        seen = l > 0
        out = jnp.where(seen[..., None], acc / jnp.where(seen, l, 1.0)[..., None], 0.0)
        lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), jnp.inf)
        return out.transpose(0, 3, 1, 2, 4).astype(q.dtype), lse

    return jax.lax.map(one_q_tile, (q, q_ids))


def _backward_tiles(q, k, v, q_ids, k_ids, out, lse, dout, scale):
    """FlashAttention-2 style backward in one pass: the outer loop runs over key tiles (carrying
    the query gradient of every tile), the inner over query tiles; each visible tile's scores
    are recomputed once and give dV, dK and that query tile's dQ share, never stored."""
    # delta_i = sum_d dO_i * O_i, [nq, b, hkv, g, tq]
    delta = jnp.einsum("nbqhgd,nbqhgd->nbhgq", dout.astype(jnp.float32), out.astype(jnp.float32))

    def probs(qt, kt, qi, ki, lse_t):
        s, mask = _scores(qt, kt, qi, ki, scale)
        return jnp.where(mask, jnp.exp(s - lse_t[..., None]), 0.0)

    def key_tile_step(dq, kv):
        kt, vt, ki = kv

        def q_step(carry, xs):
            dk, dv, dq = carry
            i, qt, qi, dot, lse_t, delta_t = xs

            def update(dk, dv):
                p = probs(qt, kt, qi, ki, lse_t)
                dv = dv + jnp.einsum("bhgqk,bqhgd->bkhd", p, dot.astype(jnp.float32))
                dp = jnp.einsum("bqhgd,bkhd->bhgqk", dot, vt, preferred_element_type=jnp.float32)
                ds = p * (dp - delta_t[..., None])
                dk = dk + jnp.einsum("bhgqk,bqhgd->bkhd", ds, qt.astype(jnp.float32)) * scale
                dq_tile = jnp.einsum("bhgqk,bkhd->bqhgd", ds, kt.astype(jnp.float32)) * scale
                return dk, dv, dq_tile

            def skip(dk, dv):
                return dk, dv, jnp.zeros(qt.shape, jnp.float32)

            # dQ stays outside the conditional: passing the whole carry through it would copy it
            dk, dv, dq_tile = jax.lax.cond(jnp.any(visibility(qi, ki)), update, skip, dk, dv)
            return (dk, dv, dq.at[i].add(dq_tile)), None

        zeros = jnp.zeros(kt.shape, jnp.float32)
        xs = (jnp.arange(q.shape[0]), q, q_ids, dout, lse, delta)
        (dk, dv, dq), _ = jax.lax.scan(q_step, (zeros, zeros, dq), xs)
        return dq, (dk.astype(k.dtype), dv.astype(v.dtype))

    dq, (dk, dv) = jax.lax.scan(key_tile_step, jnp.zeros(q.shape, jnp.float32), (k, v, k_ids))
    return dq.astype(q.dtype), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _flash(q, k, v, q_ids, k_ids, scale, q_tile, kv_tile):
    out, _ = _forward_tiles(q, k, v, q_ids, k_ids, scale, q_tile, kv_tile)
    return out


def _flash_fwd(q, k, v, q_ids, k_ids, scale, q_tile, kv_tile):
    out, lse = _forward_tiles(q, k, v, q_ids, k_ids, scale, q_tile, kv_tile)
    return out, (q, k, v, q_ids, k_ids, out, lse)


def _flash_bwd(scale, q_tile, kv_tile, res, dout):
    q, k, v, q_ids, k_ids, out, lse = res
    dq, dk, dv = _backward_tiles(q, k, v, q_ids, k_ids, out, lse, dout, scale)
    return dq, dk, dv, None, None


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

    def tile(x, length, t):
        x = jnp.pad(x, [(0, 0), (0, length - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
        return x.reshape(b, length // t, t, *x.shape[2:]).swapaxes(0, 1)

    qt = tile(q.reshape(b, lq, hkv, g, d), lq_pad, q_tile)
    kt, vt = tile(k, lk_pad, kv_tile), tile(v, lk_pad, kv_tile)
    q_ids = q_layout.pad(lq_pad).tiles(q_tile)
    k_ids = kv_layout.pad(lk_pad).tiles(kv_tile)
    out = _flash(qt, kt, vt, q_ids, k_ids, d**-0.5, q_tile, kv_tile)
    return out.swapaxes(0, 1).reshape(b, lq_pad, hq, d)[:, :lq]
