"""Log-likelihoods at target slots and the SFT / GTPO objectives (docs/algorithm.md §3–§5).

Only target slots are projected to the vocabulary, in (target chunk × vocabulary tile) blocks
(`gtpo_jax.model.vocab_logprobs`), so neither the forward nor the backward ever holds
[targets, vocab] logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gtpo_jax.model import SDARModel, TokenLayout, vocab_logprobs


def target_logprobs(model: SDARModel, batch: dict, *, vocab_chunk: int = 256, saved_logits_mb: float = 0) -> jax.Array:
    """log p(target_token | its state) for every entry of batch["target_index"] -> float32 [T].

    `batch` holds the arrays of `gtpo_jax.layout.PackedBatch.model_inputs()`; T must be a
    multiple of `vocab_chunk` (pack() pads target lists to such multiples). The backward reuses
    the forward's logits when they fit in `saved_logits_mb` MB (else recomputes them).
    """
    layout = TokenLayout(batch["segment"], batch["block"], batch["copy"])
    hidden, _ = model(batch["tokens"], batch["positions"], layout)
    flat = hidden.reshape(-1, hidden.shape[-1])
    target_hidden = jnp.take(flat, batch["target_index"], axis=0)
    n = target_hidden.shape[0]
    return vocab_logprobs.target_logprobs(target_hidden, model.head_weight(), batch["target_token"],
                                          chunk=min(vocab_chunk, n), saved_logits_mb=saved_logits_mb)


def gtpo_token_terms(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    *,
    eps_low: float,
    eps_high: float,
    beta: float = 0.0,
    ref_logprobs: jax.Array | None = None,
    tis_weight: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Per-token loss terms of docs/algorithm.md §5.4: −min(ρA, clip(ρ)A) (× truncated IS weight) + β·k3.

    min(ρA, clip(ρ)A) is clip(ρ)A exactly where ρ lies strictly beyond the bound on A's side
    (ρ > 1+eps_high for A > 0, ρ < 1−eps_low for A < 0), and ρA everywhere else. Written that
    way, the gradient is A·∇ρ up to and including the bounds: `jnp.minimum` / `jnp.clip` would
    split a tie (ρ on a bound, e.g. ρ = 1 with eps 0) and pass only part of it."""
    ratio = jnp.exp(jnp.clip(logprobs - old_logprobs, -10.0, 10.0))
    is_clipped = ((advantages > 0) & (ratio > 1.0 + eps_high)) | ((advantages < 0) & (ratio < 1.0 - eps_low))
    bound = jnp.where(advantages > 0, 1.0 + eps_high, 1.0 - eps_low)
    surrogate = jnp.where(is_clipped, bound * advantages, ratio * advantages)
    policy_term = -surrogate
    if tis_weight is not None:
        policy_term = policy_term * tis_weight
    terms = policy_term
    stats = {"ratio": ratio, "clipped": is_clipped.astype(jnp.float32)}
    if beta > 0:
        if ref_logprobs is None:
            raise ValueError("beta > 0 needs reference log-probs")
        delta = ref_logprobs - logprobs
        k3 = jnp.exp(delta) - 1.0 - delta
        terms = terms + beta * k3
        stats["k3"] = k3
    return terms, stats
