"""log softmax(h · W)[token] for many target states without ever holding [targets, vocab] logits.

The projection runs over (target chunk × vocabulary tile) blocks: the forward keeps an online
max / sum of exponentials per target across the vocabulary tiles (as flash attention does across
keys), so each block of logits is reduced while it is still in cache; the picked logit is a
gathered dot product h · W[:, token]. A custom VJP saves only the log-normaliser per target and
recomputes each block once in the backward, where it yields both the hidden-state gradient (carried
per target chunk) and that tile's head gradient (accumulated in place), and the one-hot term of
the softmax gradient is added as a gather / scatter of T rows instead of a [targets, vocab] scatter.
Everything accumulates in float32: results match a dense log_softmax to fp32 round-off.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

# Vocabulary tile: a [chunk, tile] float32 block of logits should stay in a core's L2 cache.
VOCAB_TILE = 1024


def _tile_starts(v: int, tile: int) -> tuple[jax.Array, jax.Array]:
    """First column of every vocabulary tile, int32 [n], and each tile's additive mask [n, tile].

    The head is read in place, one [hidden, tile] column window per tile (no padded or tiled copy
    of it): the last window is moved back to end at the last column, and its columns that the
    previous tile already covered are masked (-inf), so every column counts exactly once."""
    n = -(-v // tile)
    nominal = jnp.arange(n, dtype=jnp.int32) * tile
    starts = jnp.minimum(nominal, v - tile)
    columns = starts[:, None] + jnp.arange(tile, dtype=jnp.int32)
    bias = jnp.where(columns >= nominal[:, None], 0.0, -jnp.inf).astype(jnp.float32)
    return starts, bias


def _window(head, start, tile, dtype):
    """head[:, start:start + tile] as `dtype`."""
    return jax.lax.dynamic_slice_in_dim(head, start, tile, axis=1).astype(dtype)


def _picked(hidden, head, tokens):
    """The target logit h_t · W[:, token_t] for every t, float32 [T]."""
    columns = jnp.take(head, tokens, axis=1).astype(hidden.dtype)  # [hidden, T]
    return jnp.einsum("td,dt->t", hidden, columns, preferred_element_type=jnp.float32)


def _log_normalisers(hidden, head, chunk, tile):
    """logsumexp over the vocabulary of h · W for every row of hidden [T, d] -> float32 [T]."""
    starts, bias = _tile_starts(head.shape[1], tile)
    t, d = hidden.shape

    def one_chunk(h):
        def step(carry, xs):
            m, s = carry
            start, b = xs
            w = _window(head, start, tile, h.dtype)
            logits = jnp.einsum("td,dv->tv", h, w, preferred_element_type=jnp.float32) + b
            m_new = jnp.maximum(m, logits.max(-1))
            s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[:, None]).sum(-1)
            return (m_new, s), None

        init = (jnp.full((chunk,), -jnp.inf, jnp.float32), jnp.zeros((chunk,), jnp.float32))
        (m, s), _ = jax.lax.scan(step, init, (starts, bias))
        return m + jnp.log(s)

    return jax.lax.map(one_chunk, hidden.reshape(t // chunk, chunk, d)).reshape(t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _target_logprobs(hidden, head, tokens, chunk, tile):
    return _picked(hidden, head, tokens) - _log_normalisers(hidden, head, chunk, tile)


def _fwd(hidden, head, tokens, chunk, tile):
    lse = _log_normalisers(hidden, head, chunk, tile)
    return _picked(hidden, head, tokens) - lse, (hidden, head, tokens, lse)


def _bwd(chunk, tile, res, g):
    hidden, head, tokens, lse = res
    t, d = hidden.shape
    starts, bias = _tile_starts(head.shape[1], tile)
    g = g.astype(jnp.float32)

    def one_chunk(d_head, xs):
        h, lse_c, g_c = xs

        def step(carry, xs):
            dh, d_head = carry
            start, b = xs
            w = _window(head, start, tile, h.dtype)
            logits = jnp.einsum("td,dv->tv", h, w, preferred_element_type=jnp.float32) + b
            # d(-lse)/d logits, times the incoming gradient: -g · softmax (0 on masked columns)
            grad = -g_c[:, None] * jnp.exp(logits - lse_c[:, None])
            dh = dh + jnp.einsum("tv,dv->td", grad, w.astype(jnp.float32))
            window = _window(d_head, start, tile, jnp.float32) + jnp.einsum("td,tv->dv", h.astype(jnp.float32), grad)
            return (dh, jax.lax.dynamic_update_slice_in_dim(d_head, window, start, axis=1)), None

        (dh, d_head), _ = jax.lax.scan(step, (jnp.zeros((chunk, d), jnp.float32), d_head), (starts, bias))
        return d_head, dh

    n = t // chunk
    xs = (hidden.reshape(n, chunk, d), lse.reshape(n, chunk), g.reshape(n, chunk))
    d_head, dh = jax.lax.scan(one_chunk, jnp.zeros(head.shape, jnp.float32), xs)
    # d(picked): g_t · W[:, token_t] into dh, g_t · h_t into column token_t of the head gradient
    dh = dh.reshape(t, d) + g[:, None] * jnp.take(head, tokens, axis=1).T.astype(jnp.float32)
    d_head = d_head.at[:, tokens].add((g[:, None] * hidden.astype(jnp.float32)).T)
    return dh.astype(hidden.dtype), d_head.astype(head.dtype), None


_target_logprobs.defvjp(_fwd, _bwd)


def target_logprobs(hidden: jax.Array, head: jax.Array, tokens: jax.Array, *, chunk: int,
                    tile: int = VOCAB_TILE) -> jax.Array:
    """log softmax(hidden @ head)[tokens], float32 [T], for hidden [T, d], head [d, vocab],
    tokens int [T]; T must be a multiple of `chunk` (targets per block), `tile` is the
    vocabulary tile (the vocabulary is zero-padded to a multiple of it, padding masked)."""
    t = hidden.shape[0]
    if t % chunk:
        raise ValueError(f"number of target slots {t} is not a multiple of the chunk size {chunk}")
    return _target_logprobs(hidden, head, tokens, chunk, min(tile, head.shape[1]))
