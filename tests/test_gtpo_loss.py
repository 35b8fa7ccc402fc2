"""GTPO loss and gradient against a direct per-token implementation of docs/algorithm.md §5.3–§5.4."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gtpo_jax.model import ModelConfig, TokenLayout, init_model
from gtpo_jax.trainers.gtpo_objective import ScoredRollout, build_gtpo_batch, group_advantages, gtpo_loss_fn

B, MASK, VOCAB = 4, 0, 61
EPS_LOW, EPS_HIGH = 0.2, 0.28


def token_states(prompt, response, steps):
    """Every response token's state S_t (docs/algorithm.md §3) as an explicit sequence, plus its slot."""
    p = len(prompt)
    states = []
    for t in range(len(response)):
        j = (p + t) // B
        seq = list(prompt) + list(response)
        seq += [MASK] * ((j + 1) * B - len(seq))
        seq = seq[: (j + 1) * B]
        for x in range(max(j * B, p), (j + 1) * B):
            if x >= p + len(response) or steps[x - p] >= steps[t]:
                seq[x] = MASK
        states.append((seq, p + t))
    return states


def direct_loss(params, graphdef, rollouts, loss_norm, beta, tis_cap):
    """One padded row per token state, scored by a plain forward; terms and normalisation
    written out per docs/algorithm.md."""
    model = nnx.merge(graphdef, params)
    rows, slots, targets, owners = [], [], [], []
    for i, r in enumerate(rollouts):
        for t, (seq, slot) in enumerate(token_states(r.prompt, r.response, r.step_map)):
            rows.append(seq), slots.append(slot), targets.append(r.response[t]), owners.append((i, t))
    length = max(len(s) for s in rows)
    tokens = np.array([s + [MASK] * (length - len(s)) for s in rows], np.int32)
    seg = np.array([[1] * len(s) + [0] * (length - len(s)) for s in rows], np.int32)
    pos = np.tile(np.arange(length, dtype=np.int32), (len(rows), 1))
    hidden, _ = model(tokens, pos, TokenLayout.contiguous(pos, B, seg))
    logits = model.logits(hidden[np.arange(len(rows)), np.array(slots)])
    logp = jax.nn.log_softmax(logits)[np.arange(len(rows)), np.array(targets)]

    total = 0.0
    per_response = {}
    for n, (i, t) in enumerate(owners):
        r = rollouts[i]
        l_new = logp[n]
        l_old = jax.lax.stop_gradient(l_new)
        ratio = jnp.exp(jnp.clip(l_new - l_old, -10, 10))
        a = r.advantage
        term = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - EPS_LOW, 1 + EPS_HIGH) * a)
        if tis_cap:
            term = term * jnp.minimum(jnp.exp(l_old - r.rollout_logprobs[t]), tis_cap)
        if beta:
            d = r.ref_logprobs[t] - l_new
            term = term + beta * (jnp.exp(d) - 1 - d)
        # round of token t: rank of its step among the distinct steps of its block
        j = (len(r.prompt) + t) // B
        block_steps = sorted({r.step_map[u] for u in range(len(r.response)) if (len(r.prompt) + u) // B == j})
        per_response.setdefault(i, {}).setdefault(block_steps.index(r.step_map[t]), []).append(term)
    if loss_norm == "token_mean":
        terms = [x for rounds in per_response.values() for ts in rounds.values() for x in ts]
        return sum(terms) / len(terms)
    for rounds in per_response.values():
        total = total + sum(sum(ts) / len(ts) for ts in rounds.values())
    return total / len(rollouts)


def make_rollouts(rng):
    rollouts = []
    rewards = rng.random((2, 3))
    adv = group_advantages(rewards).reshape(-1)
    for k, p_len in enumerate([8, 9, 7, 11, 6, 12]):
        r_len = int(rng.integers(4, 10))
        steps, counter, pos = [], 0, p_len
        while pos < p_len + r_len:  # 1–2 tokens per step, random order inside a block
            end = min((pos // B + 1) * B, p_len + r_len)
            order = rng.permutation(end - pos)
            block = np.zeros(end - pos, int)
            i = 0
            while i < len(order):
                counter += 1
                take = int(rng.integers(1, 3))
                block[order[i : i + take]] = counter
                i += take
            steps += block.tolist()
            pos = end
        rollouts.append(
            ScoredRollout(
                prompt=rng.integers(1, VOCAB, p_len), response=rng.integers(1, VOCAB, r_len),
                step_map=np.array(steps), advantage=float(adv[k]),
                rollout_logprobs=np.log(rng.uniform(0.005, 0.05, r_len)).astype(np.float32),
                ref_logprobs=np.log(rng.uniform(0.005, 0.05, r_len)).astype(np.float32),
            )
        )
    return rollouts


@pytest.mark.parametrize(
    "loss_norm,beta,tis_cap", [("round_mean", 0.0, 0.0), ("token_mean", 0.0, 0.0), ("round_mean", 0.1, 2.0),
                                ("token_mean", 0.05, 2.0)]
)
def test_loss_and_gradient_match_direct(loss_norm, beta, tis_cap):
    rng = np.random.default_rng(0)
    rollouts = make_rollouts(rng)
    model = init_model(ModelConfig.tiny(vocab_size=VOCAB, tie_word_embeddings=False), seed=4)
    graphdef, params = nnx.split(model)
    arrays, _ = build_gtpo_batch(
        rollouts, block_size=B, mask_id=MASK, shrink=1, loss_norm=loss_norm, micro_batches=2, row_len=128,
        vocab_chunk=32,
    )
    loss_fn = gtpo_loss_fn(eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=beta, use_old_logprobs=False, tis_cap=tis_cap,
                           vocab_chunk=32)

    def ours(p):
        return sum(loss_fn(nnx.merge(graphdef, p), {k: v[m] for k, v in arrays.items()})[0] for m in range(2))

    value, grads = jax.value_and_grad(ours)(params)
    ref_value, ref_grads = jax.value_and_grad(direct_loss)(params, graphdef, rollouts, loss_norm, beta, tis_cap)
    assert float(value) == pytest.approx(float(ref_value), abs=1e-6)
    flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    scale = max(float(jnp.abs(g).max()) for g in ref_flat)
    assert scale > 1e-4  # the gradient is not trivially zero
    for g, r in zip(flat, ref_flat):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5 * max(scale, 1.0), rtol=0)


def test_group_advantages():
    adv = group_advantages(np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    np.testing.assert_allclose(adv[0], [1, -1, -1, 1], atol=1e-6)  # mean .5, population std .5
    np.testing.assert_array_equal(adv[1], 0)
