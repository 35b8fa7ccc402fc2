"""GTPO loss and gradient against a direct per-token implementation of docs/algorithm.md §3–§5.

The direct implementation builds every token's state S_t as an explicit sequence (one padded
row per token, plain block-causal forward), then writes the clipped surrogate, the ±10 clamp,
k3, the truncated importance weight and the two normalisations out per docs/algorithm.md.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gtpo_jax.config import Config
from gtpo_jax.losses import gtpo_token_terms
from gtpo_jax.model import ModelConfig, TokenLayout, init_model
from gtpo_jax.rollout.base import Rollout
from gtpo_jax.trainers.common import make_update_step
from gtpo_jax.trainers.gtpo import ScoredGroup, update_policy
from gtpo_jax.trainers.gtpo_objective import build_gtpo_batch, group_advantages, gtpo_loss_fn

B, MASK, VOCAB = 4, 0, 61
EPS_LOW, EPS_HIGH = 0.2, 0.28


def token_states(prompt, response, steps, shrink=1):
    """Every response token's (state S_t as a sequence, its slot, its round), docs/algorithm.md §3 / §5.4:
    with `shrink`, a token's state masks every slot of its block whose step is >= the first
    step of its group of `shrink` consecutive distinct steps; the group index is its round."""
    p, r = len(prompt), len(response)
    out = []
    for t in range(r):
        j = (p + t) // B
        block = [u for u in range(r) if (p + u) // B == j]
        distinct = sorted({int(steps[u]) for u in block})
        group = distinct.index(int(steps[t])) // shrink
        first = distinct[group * shrink]
        seq = list(prompt) + list(response)
        seq += [MASK] * ((j + 1) * B - len(seq))
        seq = seq[: (j + 1) * B]
        for x in range(max(j * B, p), (j + 1) * B):
            if x >= p + r or steps[x - p] >= first:
                seq[x] = MASK
        out.append((seq, p + t, group))
    return out


def direct_logprobs(model, rollouts, shrink=1):
    """Per rollout: (l_t array over its response, rounds list), by one plain forward per state."""
    rows, slots, targets, owners = [], [], [], []
    for i, r in enumerate(rollouts):
        for t, (seq, slot, rnd) in enumerate(token_states(r.prompt, r.tokens, r.step_map, shrink)):
            rows.append(seq), slots.append(slot), targets.append(r.tokens[t]), owners.append((i, rnd))
    length = max(len(s) for s in rows)
    tokens = np.array([s + [MASK] * (length - len(s)) for s in rows], np.int32)
    seg = np.array([[1] * len(s) + [0] * (length - len(s)) for s in rows], np.int32)
    pos = np.tile(np.arange(length, dtype=np.int32), (len(rows), 1))
    hidden, _ = model(tokens, pos, TokenLayout.contiguous(pos, B, seg))
    logits = model.logits(hidden[np.arange(len(rows)), np.array(slots)])
    logp = jax.nn.log_softmax(logits)[np.arange(len(rows)), np.array(targets)]
    out, n = [], 0
    for i, r in enumerate(rollouts):
        k = len(r.tokens)
        out.append((logp[n : n + k], [rnd for _, rnd in owners[n : n + k]]))
        n += k
    return out


def direct_loss(params, graphdef, rollouts, loss_norm, beta, tis_cap, *, eps_low=EPS_LOW, eps_high=EPS_HIGH,
                shrink=1, old=None, exact_old=None):
    """docs/algorithm.md §5.4 written per token. `old`: per-rollout l(θ_old) (None: θ_old = θ, stop-gradient);
    `exact_old`: per-rollout exact-state l(θ_old) for the importance weight (None: `old`)."""
    model = nnx.merge(graphdef, params)
    scored = direct_logprobs(model, [r for r in rollouts if len(r.tokens)], shrink)
    it = iter(scored)
    per_response, all_terms = [], []
    for i, r in enumerate(rollouts):
        if not len(r.tokens):
            per_response.append({})
            continue
        logp, rounds = next(it)
        by_round = {}
        for t in range(len(r.tokens)):
            l_new = logp[t]
            l_old = jax.lax.stop_gradient(l_new) if old is None else old[i][t]
            ratio = jnp.exp(jnp.clip(l_new - l_old, -10, 10))
            a = r.advantage
            term = -jnp.minimum(ratio * a, jnp.clip(ratio, 1 - eps_low, 1 + eps_high) * a)
            if tis_cap:
                base = l_old if exact_old is None else exact_old[i][t]
                term = term * jnp.minimum(jnp.exp(base - r.logprobs[t]), tis_cap)
            if beta:
                d = r.ref_logprobs[t] - l_new
                term = term + beta * (jnp.exp(d) - 1 - d)
            by_round.setdefault(rounds[t], []).append(term)
            all_terms.append(term)
        per_response.append(by_round)
    if loss_norm == "token_mean":
        return sum(all_terms) / len(all_terms)
    return sum(sum(ts) / len(ts) for rounds in per_response for ts in rounds.values()) / len(rollouts)


def make_rollouts(rng, n=6, prompt_lens=(8, 9, 7, 11, 6, 12)):
    rollouts = []
    adv = group_advantages(rng.random((2, n // 2))).reshape(-1)
    for k in range(n):
        p_len = prompt_lens[k % len(prompt_lens)]
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
            Rollout(
                prompt=rng.integers(1, VOCAB, p_len), tokens=rng.integers(1, VOCAB, r_len),
                step_map=np.array(steps), advantage=float(adv[k]),
                logprobs=np.log(rng.uniform(0.005, 0.05, r_len)).astype(np.float32),
                ref_logprobs=np.log(rng.uniform(0.005, 0.05, r_len)).astype(np.float32),
            )
        )
    return rollouts


@pytest.fixture(scope="module")
def model():
    return init_model(ModelConfig.tiny(vocab_size=VOCAB, tie_word_embeddings=False), seed=4)


def our_loss(graphdef, rollouts, micro_batches=2, shrink=1, loss_norm="round_mean", **loss_kw):
    arrays = build_gtpo_batch(rollouts, block_size=B, mask_id=MASK, shrink=shrink, loss_norm=loss_norm,
                                 micro_batches=micro_batches, row_len=128, vocab_chunk=32).arrays
    kw = dict(eps_low=EPS_LOW, eps_high=EPS_HIGH, beta=0.0, use_old_logprobs=False, tis_cap=0.0)
    kw.update(loss_kw)
    loss_fn = gtpo_loss_fn(vocab_chunk=32, **kw)
    n = arrays["target_valid"].shape[0]

    def value(p):
        return sum(loss_fn(nnx.merge(graphdef, p), {k: v[m] for k, v in arrays.items()})[0] for m in range(n))

    return value


def assert_same_value_and_grad(ours, direct, params, check_value=True):
    # jitted: one compile per side instead of op-by-op dispatch of every per-token term
    value, grads = jax.jit(jax.value_and_grad(ours))(params)
    ref_value, ref_grads = jax.jit(jax.value_and_grad(direct))(params)
    if check_value:
        assert float(value) == pytest.approx(float(ref_value), abs=1e-6)
    flat, ref_flat = jax.tree.leaves(grads), jax.tree.leaves(ref_grads)
    scale = max(float(jnp.abs(g).max()) for g in ref_flat)
    assert scale > 1e-4  # the gradient is not trivially zero
    for g, r in zip(flat, ref_flat):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5 * max(scale, 1.0), rtol=0)


@pytest.mark.parametrize(
    "loss_norm,beta,tis_cap", [("round_mean", 0.0, 0.0), ("token_mean", 0.0, 0.0), ("round_mean", 0.1, 2.0),
                                ("token_mean", 0.05, 2.0)]
)
def test_loss_and_gradient_match_direct(model, loss_norm, beta, tis_cap):
    rollouts = make_rollouts(np.random.default_rng(0))
    graphdef, params = nnx.split(model)
    assert_same_value_and_grad(
        our_loss(graphdef, rollouts, loss_norm=loss_norm, beta=beta, tis_cap=tis_cap),
        lambda p: direct_loss(p, graphdef, rollouts, loss_norm, beta, tis_cap), params)


@pytest.mark.parametrize("shrink,loss_norm", [(1, "round_mean"), (2, "round_mean"), (3, "token_mean")])
def test_clipped_paths_with_ratio_off_one(model, shrink, loss_norm):
    """ρ ≠ 1 (θ_old given, as with num_iterations > 1): both clip sides with asymmetric eps, the
    ±10 clamp on both sides, shrink > 1 inside the loss, the importance weight and k3."""
    rng = np.random.default_rng(1)
    rollouts = make_rollouts(rng)
    graphdef, params = nnx.split(model)
    current = [np.asarray(lp) for lp, _ in direct_logprobs(model, rollouts, shrink)]
    offsets = [rng.choice([-0.6, -0.1, 0.0, 0.05, 0.5, -12.0, 11.0], size=len(c)) for c in current]
    for r, c, o in zip(rollouts, current, offsets):
        r.old_logprobs = (c + o).astype(np.float32)  # l_new − l_old = −o at θ
    old = [r.old_logprobs for r in rollouts]
    eps_low, eps_high = 0.1, 0.3
    ratios = np.exp(np.clip(-np.concatenate(offsets), -10, 10))
    assert (ratios > 1 + eps_high).any() and (ratios < 1 - eps_low).any()
    assert (np.abs(np.concatenate(offsets)) > 10).any()  # the ±10 clamp is reached
    kw = dict(eps_low=eps_low, eps_high=eps_high, beta=0.05, tis_cap=2.0)
    assert_same_value_and_grad(
        our_loss(graphdef, rollouts, shrink=shrink, loss_norm=loss_norm, use_old_logprobs=True, **kw),
        lambda p: direct_loss(p, graphdef, rollouts, loss_norm, kw["beta"], kw["tis_cap"], eps_low=eps_low,
                              eps_high=eps_high, shrink=shrink, old=old), params)


@pytest.mark.parametrize("eps_low,eps_high", [(0.0, 0.0), (0.0, 0.28)])
def test_gradient_at_ratio_one_is_advantage_times_grad_logprob(model, eps_low, eps_high):
    """num_iterations 1 (θ_old = θ, ρ ≡ 1 on a clip boundary when an eps is 0): the gradient is
    exactly A·∇l (docs/algorithm.md §5.5), i.e. that of −Σ_t w_t·A·l_t."""
    rollouts = make_rollouts(np.random.default_rng(2))
    graphdef, params = nnx.split(model)

    def policy_gradient(p):  # round_mean weights, no ratio, no clip
        scored = direct_logprobs(nnx.merge(graphdef, p), rollouts)
        total = 0.0
        for r, (lp, rounds) in zip(rollouts, scored):
            for rnd in set(rounds):
                total = total - r.advantage * lp[np.array(rounds) == rnd].mean()
        return total / len(rollouts)

    ours = our_loss(graphdef, rollouts, eps_low=eps_low, eps_high=eps_high)
    assert_same_value_and_grad(ours, policy_gradient, params, check_value=False)  # values: ΣwA vs ΣwAl


@pytest.mark.parametrize("eps_low,eps_high", [(0.0, 0.0), (0.0, 0.3), (0.2, 0.0)])
def test_terms_gradient_at_ratio_one_with_given_old(eps_low, eps_high):
    """θ_old given (num_iterations > 1) and l = l_old exactly: d(term)/dl = −A for every token."""
    l_now = jnp.array([-1.0, -2.5, -0.3, -4.0])
    adv = jnp.array([1.0, -1.0, 0.5, -2.0])
    grad = jax.grad(lambda l: gtpo_token_terms(l, l_now, adv, eps_low=eps_low, eps_high=eps_high)[0].sum())(l_now)
    np.testing.assert_array_equal(grad, -adv)


def test_surrogate_terms_direct():
    """Elementwise terms and their gradient in l, against the formula (no model)."""
    l_new = jnp.array([0.0, 0.3, -0.4, 12.0, -11.0, 0.1, -0.2, 0.0])
    l_old = jnp.zeros_like(l_new)
    adv = jnp.array([1.0, 1.0, -1.0, 1.0, -1.0, -1.0, 1.0, -2.0])

    def direct(l):
        ratio = jnp.exp(jnp.clip(l - l_old, -10, 10))
        return -jnp.minimum(ratio * adv, jnp.clip(ratio, 0.8, 1.28) * adv)

    ours = lambda l: gtpo_token_terms(l, l_old, adv, eps_low=0.2, eps_high=0.28)[0]  # noqa: E731
    np.testing.assert_allclose(ours(l_new), direct(l_new), rtol=1e-6)
    g = jax.grad(lambda l: ours(l).sum())(l_new)
    g_ref = jax.grad(lambda l: direct(l).sum())(l_new)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6)  # no tie here: the two agree everywhere
    stats = gtpo_token_terms(l_new, l_old, adv, eps_low=0.2, eps_high=0.28)[1]
    np.testing.assert_array_equal(stats["clipped"], [0, 1, 1, 1, 1, 0, 0, 0])


def test_group_advantages():
    adv = group_advantages(np.array([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    np.testing.assert_allclose(adv[0], [1, -1, -1, 1], atol=1e-6)  # mean .5, population std .5
    np.testing.assert_array_equal(adv[1], 0)
