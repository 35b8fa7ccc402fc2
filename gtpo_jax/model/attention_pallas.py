"""The block-causal attention of `gtpo_jax.model.attention` as fused Pallas kernels (GPU).

Same visibility rule (segment, block and copy ids per token; see `attention.visibility`), same
results as the tiled JAX path: a FlashAttention-2 forward that keeps the online-softmax state
of one query tile in registers while it walks the key tiles, and a backward of two kernels —
dK/dV (one program per key tile, walking the query tiles of every query head of its group)
and dQ (one program per query tile, walking the key tiles) — that recompute the scores from
the saved log-sum-exp instead of storing them. Tiles in which no query sees any key are
skipped, so the clean prefix of a noisy copy and the unfilled part of a KV cache cost no
matmuls.

Why not a library kernel: tokamax's and cuDNN's attention take a causal flag, per-sequence
lengths / key ranges or a dense [L, L] mask. A noisy copy sees two disjoint key ranges (the
clean blocks before it and its own slots), which no single key range expresses, and a dense
mask is exactly the O(L²) buffer this layout exists to avoid.

On GPU the kernels lower through Triton; on CPU they run in Pallas interpret mode (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Triton-friendly tiles for head_dim 128 (a [64, 128] float32 accumulator per program).
Q_TILE = 64
KV_TILE = 64


def _visible(qs, qb, qc, ks, kb, kc):
    """bool [tq, tk] from per-token ids [tq] and [tk] (attention.visibility on one tile)."""
    qs, qb, qc = qs[:, None], qb[:, None], qc[:, None]
    ks, kb, kc = ks[None, :], kb[None, :], kc[None, :]
    return (qs == ks) & (ks > 0) & (((kc == 0) & (kb < qb)) | ((kc == qc) & (kb == qb)))


def _any(mask):
    # an integer max: Triton reduces i1 tensors poorly
    return jnp.max(mask.astype(jnp.int32)) > 0


def _dot(a, b, contract_a, contract_b):
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                               preferred_element_type=jnp.float32)


def _fwd_kernel(q_ref, k_ref, v_ref, qs_ref, qb_ref, qc_ref, ks_ref, kb_ref, kc_ref, o_ref, lse_ref, *,
                scale, kv_tile, n_kv):
    q = q_ref[...]
    q_ids = (qs_ref[...], qb_ref[...], qc_ref[...])
    tq, d = q.shape

    def kv_step(j, carry):
        sl = pl.ds(j * kv_tile, kv_tile)
        mask = _visible(*q_ids, ks_ref[sl], kb_ref[sl], kc_ref[sl])

        def update(carry):
            m, l, acc = carry
            s = jnp.where(mask, _dot(q, k_ref[sl, :], 1, 1) * scale, -jnp.inf)
            m_new = jnp.maximum(m, s.max(axis=1))
            m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
            p = jnp.exp(s - m_safe[:, None])
            alpha = jnp.exp(m - m_safe)
            v = v_ref[sl, :]
            acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, 1, 0)
            return m_new, l * alpha + p.sum(axis=1), acc

        return jax.lax.cond(_any(mask), update, lambda c: c, carry)

    init = (jnp.full((tq,), -jnp.inf, jnp.float32), jnp.zeros((tq,), jnp.float32), jnp.zeros((tq, d), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n_kv, kv_step, init)
    seen = l > 0
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc / safe_l[:, None], 0.0).astype(o_ref.dtype)
    # +inf where a query sees nothing, so that exp(s - lse) = 0 in the backward.
    lse_ref[...] = jnp.where(seen, m + jnp.log(safe_l), jnp.inf)


def _probs(q, k, mask, lse, scale):
    return jnp.where(mask, jnp.exp(_dot(q, k, 1, 1) * scale - lse[:, None]), 0.0)


def _dkv_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, qs_ref, qb_ref, qc_ref, ks_ref, kb_ref, kc_ref,
                dk_ref, dv_ref, *, scale, q_tile, n_q, group):
    k, v = k_ref[...], v_ref[...]
    k_ids = (ks_ref[...], kb_ref[...], kc_ref[...])

    def q_step(i, carry):
        sl = pl.ds(i * q_tile, q_tile)
        mask = _visible(qs_ref[sl], qb_ref[sl], qc_ref[sl], *k_ids)

        def update(carry):
            dk, dv = carry
            for h in range(group):  # the query heads that share this key/value head
                q, do = q_ref[h, sl, :], do_ref[h, sl, :]
                p = _probs(q, k, mask, lse_ref[h, sl], scale)
                dv = dv + _dot(p.astype(do.dtype), do, 0, 0)
                ds = p * (_dot(do, v, 1, 1) - delta_ref[h, sl][:, None])
                dk = dk + _dot(ds.astype(q.dtype), q, 0, 0) * scale
            return dk, dv

        return jax.lax.cond(_any(mask), update, lambda c: c, carry)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, n_q, q_step, (zeros, zeros))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, do_ref, lse_ref, delta_ref, k_ref, v_ref, qs_ref, qb_ref, qc_ref, ks_ref, kb_ref, kc_ref,
               dq_ref, *, scale, kv_tile, n_kv):
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_ids = (qs_ref[...], qb_ref[...], qc_ref[...])

    def kv_step(j, dq):
        sl = pl.ds(j * kv_tile, kv_tile)
        mask = _visible(*q_ids, ks_ref[sl], kb_ref[sl], kc_ref[sl])

        def update(dq):
            k = k_ref[sl, :]
            p = _probs(q, k, mask, lse, scale)
            ds = p * (_dot(do, v_ref[sl, :], 1, 1) - delta[:, None])
            return dq + _dot(ds.astype(k.dtype), k, 1, 0) * scale

        return jax.lax.cond(_any(mask), update, lambda c: c, dq)

    dq = jax.lax.fori_loop(0, n_kv, kv_step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _spec(block, index_map):
    return pl.BlockSpec(tuple(pl.squeezed if b is None else b for b in block), index_map)


def _params(interpret: bool):
    if interpret:
        return {}
    from jax.experimental.pallas import triton as plgpu  # GPU-only backend, imported when the kernel compiles

    return {"compiler_params": plgpu.CompilerParams(num_warps=4, num_stages=2)}


def _forward(q, k, v, q_ids, k_ids, scale, tq, tk, interpret):
    """q [b, Hq, Lq, d], k/v [b, Hkv, Lk, d], ids 3 × [b, L] -> out [b, Hq, Lq, d], lse [b, Hq, Lq]."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    q_spec = _spec((None, None, tq, d), lambda bi, h, i: (bi, h, i, 0))
    kv_spec = _spec((None, None, lk, d), lambda bi, h, i: (bi, h // g, 0, 0))
    qid_spec = _spec((None, tq), lambda bi, h, i: (bi, i))
    kid_spec = _spec((None, lk), lambda bi, h, i: (bi, 0))
    kernel = functools.partial(_fwd_kernel, scale=scale, kv_tile=tk, n_kv=lk // tk)
    return pl.pallas_call(
        kernel,
        grid=(b, hq, lq // tq),
        in_specs=[q_spec, kv_spec, kv_spec] + [qid_spec] * 3 + [kid_spec] * 3,
        out_specs=[q_spec, _spec((None, None, tq), lambda bi, h, i: (bi, h, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, lq), jnp.float32)],
        interpret=interpret,
        name="block_causal_attention_fwd",
        **_params(interpret),
    )(q, k, v, *q_ids, *k_ids)


def _backward(q, k, v, q_ids, k_ids, out, lse, dout, scale, tq, tk, interpret):
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    delta = jnp.einsum("bhqd,bhqd->bhq", dout.astype(jnp.float32), out.astype(jnp.float32))
    args = (q, dout, lse, delta, k, v, *q_ids, *k_ids)

    # dK, dV: one program per (batch, key/value head, key tile).
    group_q = _spec((None, g, lq, d), lambda bi, h, j: (bi, h, 0, 0))
    group_row = _spec((None, g, lq), lambda bi, h, j: (bi, h, 0))
    k_tile = _spec((None, None, tk, d), lambda bi, h, j: (bi, h, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, q_tile=tq, n_q=lq // tq, group=g),
        grid=(b, hkv, lk // tk),
        in_specs=[group_q, group_q, group_row, group_row, k_tile, k_tile]
        + [_spec((None, lq), lambda bi, h, j: (bi, 0))] * 3 + [_spec((None, tk), lambda bi, h, j: (bi, j))] * 3,
        out_specs=[k_tile, k_tile],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        interpret=interpret,
        name="block_causal_attention_dkv",
        **_params(interpret),
    )(*args)

    # dQ: one program per (batch, query head, query tile).
    q_tile = _spec((None, None, tq, d), lambda bi, h, i: (bi, h, i, 0))
    row_tile = _spec((None, None, tq), lambda bi, h, i: (bi, h, i))
    kv_full = _spec((None, None, lk, d), lambda bi, h, i: (bi, h // g, 0, 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, kv_tile=tk, n_kv=lk // tk),
        grid=(b, hq, lq // tq),
        in_specs=[q_tile, q_tile, row_tile, row_tile, kv_full, kv_full]
        + [_spec((None, tq), lambda bi, h, i: (bi, i))] * 3 + [_spec((None, lk), lambda bi, h, i: (bi, 0))] * 3,
        out_specs=q_tile,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        name="block_causal_attention_dq",
        **_params(interpret),
    )(*args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _attention(q, k, v, q_ids, k_ids, scale, tq, tk, interpret):
    return _forward(q, k, v, q_ids, k_ids, scale, tq, tk, interpret)[0]


def _attention_fwd(q, k, v, q_ids, k_ids, scale, tq, tk, interpret):
    out, lse = _forward(q, k, v, q_ids, k_ids, scale, tq, tk, interpret)
    return out, (q, k, v, q_ids, k_ids, out, lse)


def _attention_bwd(scale, tq, tk, interpret, res, dout):
    q, k, v, q_ids, k_ids, out, lse = res
    dq, dk, dv = _backward(q, k, v, q_ids, k_ids, out, lse, dout, scale, tq, tk, interpret)
    return dq, dk, dv, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _tile(length: int, tile: int) -> int:
    """A power of two, at least 16 (Triton's smallest matmul), at most `tile`."""
    return min(tile, max(16, pl.next_power_of_2(length)))


def pallas_block_causal_attention(q, k, v, q_layout, kv_layout, *, q_tile: int = Q_TILE, kv_tile: int = KV_TILE,
                                  interpret: bool = False):
    """`attention.block_causal_attention` as fused kernels: q [b, Lq, Hq, D] over k, v
    [b, Lk, Hkv, D]; ids in `TokenLayout`s. Lengths are padded to whole tiles with segment 0."""
    b, lq, hq, d = q.shape
    lk = k.shape[1]
    tq, tk = _tile(lq, q_tile), _tile(lk, kv_tile)
    lq_pad, lk_pad = pl.cdiv(lq, tq) * tq, pl.cdiv(lk, tk) * tk

    def heads_first(x, length):
        return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))).transpose(0, 2, 1, 3)

    out = _attention(heads_first(q, lq_pad), heads_first(k, lk_pad), heads_first(v, lk_pad),
                     tuple(q_layout.pad(lq_pad)), tuple(kv_layout.pad(lk_pad)), d**-0.5, tq, tk, interpret)
    return out.transpose(0, 2, 1, 3)[:, :lq]
