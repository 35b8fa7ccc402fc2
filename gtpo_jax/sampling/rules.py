"""The decoding rules of one forward (docs/algorithm.md §2, LMDeploy 0.18's dLLM rules): the
scored distribution, the draw, each slot's confidence and raw log-prob, and which masked slots
the unmasking strategy commits."""

from __future__ import annotations

import jax
import jax.numpy as jnp

def filter_scores(scores: jax.Array, top_k: int, top_p: jax.Array | None) -> jax.Array:
    """Top-k then top-p (on the renormalised top-k distribution) as -inf; ties at a cut are kept.

    Used only for the draw: confidences come from the unfiltered scored distribution."""
    if 0 < top_k < scores.shape[-1]:
        kth = jax.lax.top_k(scores, top_k)[0][..., -1:]
        scores = jnp.where(scores < kth, -jnp.inf, scores)
    if top_p is not None:
        ordered = -jnp.sort(-scores, axis=-1)
        probs = jax.nn.softmax(ordered, axis=-1)
        keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # the smallest prefix reaching top_p
        cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        scores = jnp.where(scores < cutoff, -jnp.inf, scores)
    return scores


def select_slots(masked: jax.Array, conf: jax.Array, threshold: jax.Array, strategy: str, k: int) -> jax.Array:
    """Which masked slots [batch, B] the unmasking strategy commits this forward."""
    c = jnp.where(masked, conf, -1.0)
    idx = jnp.arange(c.shape[-1])
    # rank of slot i among masked slots by confidence (ties: lower index first)
    better = (c[:, None, :] > c[:, :, None]) | ((c[:, None, :] == c[:, :, None]) & (idx[None, :] < idx[:, None]))
    rank = jnp.sum(better & masked[:, None, :], axis=-1)
    if strategy == "low_confidence_static":
        return masked & (rank < k)
    if strategy == "low_confidence_dynamic":
        return masked & ((conf >= threshold) | (rank == 0))
    return masked & (jnp.cumsum(masked, axis=-1) <= k)  # sequential: the next k from the left


def first_argmax(x: jax.Array) -> jax.Array:
    """jnp.argmax over the last axis (the first maximum; NaN aside) as a max and then a min over
    the indices that reach it: two plain reductions, half the CPU time of argmax's paired
    (value, index) reduction over a vocabulary."""
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jnp.arange(x.shape[-1], dtype=jnp.int32)
    return jnp.min(jnp.where(x == top, index, x.shape[-1] - 1), axis=-1)


def score_slots(logits: jax.Array, scored: jax.Array, keys: jax.Array, step: jax.Array, slots: jax.Array, *,
                block_size: int, greedy: bool, top_k: int,
                top_p: jax.Array | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(token, confidence, raw log-prob) of some slots of each sequence's block, [batch, n] each.

    logits [batch, n, vocab] float32 of the block slots `slots` [batch, n]; scored: the scored
    distribution's logits (temperature and stop suppression applied). The draw adds Gumbel noise
    to the filtered scores (argmax of `scored` when greedy): the noise of the whole block,
    gumbel(fold_in(keys[i], step[i]), (block_size, vocab)), of which each slot takes its own row,
    so a slot's draw does not depend on which other slots are scored. The confidence is the drawn
    token's probability under `scored`, the raw log-prob its log-probability under `logits`."""
    if greedy:
        chosen = first_argmax(scored)
    else:
        shape = (block_size, scored.shape[-1])
        noise = jax.vmap(lambda key, t, rows: jax.random.gumbel(jax.random.fold_in(key, t), shape)[rows])(
            keys, step, slots)
        chosen = first_argmax(filter_scores(scored, top_k, top_p) + noise)

    def log_prob(x):
        # log-softmax of the chosen token without materialising it over the vocabulary; shifted by
        # the maximum first (as log_softmax does): max + log(sum) would round a confidence near 1 to
        # exactly 1 and tie slots that transformers' softmax tells apart
        top = jnp.max(x, axis=-1, keepdims=True)
        shifted = jnp.take_along_axis(x, chosen[..., None], axis=-1)[..., 0] - top[..., 0]
        return shifted - jnp.log(jnp.sum(jnp.exp(x - top), axis=-1))

    return chosen, jnp.exp(log_prob(scored)), log_prob(logits)
