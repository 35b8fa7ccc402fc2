"""log softmax(h · W)[token] for many target states without ever holding [targets, vocab] logits.

The projection runs over (target chunk × vocabulary tile) blocks: the forward keeps an online
max / sum of exponentials per target across the vocabulary tiles (as flash attention does across
keys), so each block of logits is reduced while it is still in cache; the picked logit is a
gathered dot product h · W[:, token]. A custom VJP saves the log-normaliser per target and
either recomputes each block once in the backward or, when the caller can afford the memory
(`save_logits`), reads the logits the forward stored: one [targets, vocab] matmul fewer, a
quarter of the projection's FLOPs. Each block yields both the hidden-state gradient (carried
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


def _log_normalisers(hidden, head, chunk, tile, keep_logits=False):
    """logsumexp over the vocabulary of h · W for every row of hidden [T, d] -> float32 [T], and
    with keep_logits every (chunk, tile) block of logits, float32 [T / chunk, tiles, chunk, tile]
    (masked columns included as -inf), else None."""
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
            return (m_new, s), logits if keep_logits else None

        init = (jnp.full((chunk,), -jnp.inf, jnp.float32), jnp.zeros((chunk,), jnp.float32))
        (m, s), blocks = jax.lax.scan(step, init, (starts, bias))
        return m + jnp.log(s), blocks

    lse, blocks = jax.lax.map(one_chunk, hidden.reshape(t // chunk, chunk, d))
    return lse.reshape(t), blocks


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _target_logprobs(hidden, head, tokens, chunk, tile, save_logits):
    return _picked(hidden, head, tokens) - _log_normalisers(hidden, head, chunk, tile)[0]


def _fwd(hidden, head, tokens, chunk, tile, save_logits):
    lse, blocks = _log_normalisers(hidden, head, chunk, tile, keep_logits=save_logits)
    return _picked(hidden, head, tokens) - lse, (hidden, head, tokens, lse, blocks)


def _bwd(chunk, tile, save_logits, res, g):
    hidden, head, tokens, lse, saved = res
    t, d = hidden.shape
    starts, bias = _tile_starts(head.shape[1], tile)
    g = g.astype(jnp.float32)

    def one_chunk(d_head, xs):
        h, lse_c, g_c, saved_c = xs

        def step(carry, xs):
            dh, d_head = carry
            start, b, logits = xs
            w = _window(head, start, tile, h.dtype)
            if logits is None:  # not saved by the forward: recompute this block
                logits = jnp.einsum("td,dv->tv", h, w, preferred_element_type=jnp.float32) + b
            # d(-lse)/d logits, times the incoming gradient: -g · softmax (0 on masked columns)
            grad = -g_c[:, None] * jnp.exp(logits - lse_c[:, None])
            dh = dh + jnp.einsum("tv,dv->td", grad, w.astype(jnp.float32))
            window = _window(d_head, start, tile, jnp.float32) + jnp.einsum("td,tv->dv", h.astype(jnp.float32), grad)
            return (dh, jax.lax.dynamic_update_slice_in_dim(d_head, window, start, axis=1)), None

        (dh, d_head), _ = jax.lax.scan(step, (jnp.zeros((chunk, d), jnp.float32), d_head), (starts, bias, saved_c))
        return d_head, dh

    n = t // chunk
    xs = (hidden.reshape(n, chunk, d), lse.reshape(n, chunk), g.reshape(n, chunk), saved)
    d_head, dh = jax.lax.scan(one_chunk, jnp.zeros(head.shape, jnp.float32), xs)
    # d(picked): g_t · W[:, token_t] into dh, g_t · h_t into column token_t of the head gradient
    dh = dh.reshape(t, d) + g[:, None] * jnp.take(head, tokens, axis=1).T.astype(jnp.float32)
    d_head = d_head.at[:, tokens].add((g[:, None] * hidden.astype(jnp.float32)).T)
    return dh.astype(hidden.dtype), d_head.astype(head.dtype), None


_target_logprobs.defvjp(_fwd, _bwd)


def saved_logits_bytes(targets: int, vocab: int, tile: int = VOCAB_TILE) -> int:
    """Bytes of the float32 logits the forward keeps for the backward with save_logits."""
    tile = min(tile, vocab)
    return targets * -(-vocab // tile) * tile * 4


def target_logprobs(hidden: jax.Array, head: jax.Array, tokens: jax.Array, *, chunk: int,
                    tile: int = VOCAB_TILE, saved_logits_mb: float = 0) -> jax.Array:
    """log softmax(hidden @ head)[tokens], float32 [T], for hidden [T, d], head [d, vocab],
    tokens int [T]; T must be a multiple of `chunk` (targets per block), `tile` is the
    vocabulary tile (the last tile overlaps the previous one, its repeated columns masked).
    The forward keeps its logits for the backward when they take at most `saved_logits_mb` MB
    (saved_logits_bytes), else the backward recomputes them; the results are the same."""
    t = hidden.shape[0]
    if t % chunk:
        raise ValueError(f"number of target slots {t} is not a multiple of the chunk size {chunk}")
    tile = min(tile, head.shape[1])
    save = saved_logits_bytes(t, head.shape[1], tile) <= saved_logits_mb * 2**20
    return _target_logprobs(hidden, head, tokens, chunk, tile, save)
