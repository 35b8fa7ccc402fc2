"""The cached block-diffusion sampler against a naive one written here from docs/algorithm.md §2.

The naive sampler re-runs the full block-causal forward over the whole sequence (no cache) at
every step and applies the decoding rules in numpy, one sequence at a time. For sampled
decoding both use the same per-(sequence, step) Gumbel noise (the schedule documented in
`gtpo_jax.sampling.sampler`), so their outputs must agree exactly while top-k / top-p, the
temperature and the confidence rule are implemented independently.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gtpo_jax.model import ModelConfig, TokenLayout, init_model
from gtpo_jax.rollout.jax_backend import JaxRollout
from gtpo_jax.sampling import BlockDiffusionSampler, JaxEngineSection, SamplerConfig
from gtpo_jax.sampling.decode import _score_masked
from gtpo_jax.sampling.rules import score_slots
from gtpo_jax.trajectory import token_logprobs

B, MASK, VOCAB, LFIX = 4, 0, 97, 64
STOP = (90, 92)  # frequent tokens under this model
PROMPT_LENS = (8, 9, 11, 6, 7, 12)  # P % B in {0, 1, 3, 2, 3, 0}


@pytest.fixture(scope="module")
def model():
    m = init_model(ModelConfig.tiny(vocab_size=VOCAB, tie_word_embeddings=False), seed=1)
    # A random model is almost uniform; sharpen it so that confidences spread over (0, 1).
    m.lm_head.set_value(m.lm_head.get_value() * 30)
    return m


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    return [rng.integers(5, 89, n).tolist() for n in PROMPT_LENS]


@nnx.jit
def full_logits(model, tokens, visible):
    """Logits of a whole (padded) sequence; positions >= visible are padding (segment 0)."""
    positions = jax.numpy.arange(tokens.shape[1])[None]
    segment = (positions < visible).astype(jax.numpy.int32)
    hidden, _ = model(tokens, positions, TokenLayout.contiguous(positions, B, segment))
    return model.logits(hidden)[0]


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_filter(scores, top_k, top_p):
    scores = scores.copy()
    if 0 < top_k < scores.shape[-1]:
        kth = np.sort(scores)[-top_k]
        scores[scores < kth] = -np.inf
    if top_p < 1:
        ordered = np.sort(scores)[::-1]
        probs = np.exp(log_softmax(ordered))
        keep = np.cumsum(probs) - probs < top_p
        scores[scores < ordered[keep].min()] = -np.inf
    return scores


def naive_sample(model, prompt, c: SamplerConfig, seed, index, *, renormalise=False, unscaled_conf=False):
    """docs/algorithm.md §2 for one sequence. `renormalise` / `unscaled_conf` are deliberately wrong variants
    (confidence after top-k/top-p renormalisation / without temperature and stop suppression),
    used to show that the tests can tell them apart."""
    p, limit = len(prompt), len(prompt) + c.max_new_tokens
    seq = np.full(LFIX, MASK, np.int32)
    seq[:p] = prompt
    steps, logp, conf = np.zeros(LFIX, int), np.zeros(LFIX), np.zeros(LFIX)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), index)
    j, counter = p // B, 0
    while True:
        slots = np.arange(j * B, (j + 1) * B)
        logits = np.asarray(full_logits(model, seq[None], (j + 1) * B), np.float64)[slots]
        gen = slots >= p  # the whole block is decoded, also past the length limit
        masked = gen & (steps[slots] == 0)
        scored = logits / c.temperature
        if c.min_new_tokens - B * (j - p // B) > 0:
            scored[:, list(c.stop_ids)] = -np.inf
        noise = np.asarray(jax.random.gumbel(jax.random.fold_in(key, counter + 1), (B, VOCAB)), np.float64)
        chosen, confs = np.zeros(B, int), np.zeros(B)
        for i in range(B):
            filt = np_filter(scored[i], c.top_k, c.top_p)
            chosen[i] = np.argmax(scored[i]) if c.greedy else np.argmax(filt + noise[i])
            dist = filt if renormalise else (logits[i] if unscaled_conf else scored[i])
            confs[i] = np.exp(log_softmax(dist)[chosen[i]])
        order = sorted(np.nonzero(masked)[0], key=lambda i: (-confs[i], i))
        if c.strategy == "low_confidence_static":
            commit = order[: c.commit_k]
        elif c.strategy == "sequential":
            commit = sorted(order)[: c.commit_k]
        else:
            commit = [i for i in order if confs[i] >= c.threshold] or order[:1]
        counter += 1
        for i in commit:
            x = slots[i]
            seq[x], steps[x], conf[x] = chosen[i], counter, confs[i]
            logp[x] = log_softmax(logits[i])[chosen[i]]
        if (steps[slots][gen] > 0).all():
            stops = [x for x in slots[gen] if x < limit and seq[x] in c.stop_ids]
            if stops:
                cut, reason = stops[0] + 1, "stop"
                break
            if (j + 1) * B >= limit:
                cut, reason = limit, "length"
                break
            j += 1
    end = (j + 1) * B  # the tail: the rest of the block that holds the cut
    return dict(tokens=seq[p:cut], steps=steps[p:cut], logp=logp[p:cut], conf=conf[p:cut],
                tail_tokens=seq[cut:end], tail_steps=steps[cut:end], reason=reason)


def run_both(model, prompts, cfg, seed=0, mesh=None, **wrong):
    got = BlockDiffusionSampler(model, cfg, mesh=mesh).sample(prompts, seed=seed)
    ref = [naive_sample(model, p, cfg, seed, i, **wrong) for i, p in enumerate(prompts)]
    return got, ref


def same(got, i, ref) -> bool:
    return (np.array_equal(got.tokens[i], ref["tokens"]) and np.array_equal(got.step_maps[i], ref["steps"])
            and np.array_equal(got.tail_tokens[i], ref["tail_tokens"]))


def assert_matches(got, ref):
    for i, r in enumerate(ref):
        np.testing.assert_array_equal(got.tokens[i], r["tokens"], err_msg=f"tokens of sequence {i}")
        np.testing.assert_array_equal(got.step_maps[i], r["steps"], err_msg=f"step map of sequence {i}")
        np.testing.assert_allclose(got.logprobs[i], r["logp"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(got.confidences[i], r["conf"], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(got.tail_tokens[i], r["tail_tokens"])
        np.testing.assert_array_equal(got.tail_steps[i], r["tail_steps"])
        assert got.finish_reasons[i] == r["reason"]


def config(**kw) -> SamplerConfig:
    base = dict(block_size=B, mask_id=MASK, stop_ids=STOP, max_new_tokens=14, threshold=0.6, denoising_steps=2,
                greedy=True)
    base.update(kw)
    return SamplerConfig(**base)


# without stop tokens: slow (~12 s each); the stop-free path stays in the default suite through
# test_rescored_trajectory_matches_rollout_logprobs (static and sequential, stop_ids=())
@pytest.mark.parametrize("stop_ids", [STOP, pytest.param((), marks=pytest.mark.slow)], ids=["stops", "no_stops"])
@pytest.mark.parametrize("strategy", ["low_confidence_static", "low_confidence_dynamic", "sequential"])
def test_greedy_matches_naive(model, prompts, strategy, stop_ids):
    cfg = config(strategy=strategy, stop_ids=stop_ids)
    got, ref = run_both(model, prompts, cfg)
    assert_matches(got, ref)
    if stop_ids:
        assert {"stop", "length"} == set(got.finish_reasons)  # both endings are exercised
    else:  # every rollout is length-capped; limits inside a block leave a tail, for P % B in {0, 1, B-1}
        capped_inside = {len(p) % B for i, p in enumerate(prompts)
                         if (len(p) + cfg.max_new_tokens) % B and len(got.tail_tokens[i]) and
                         len(got.tokens[i]) == cfg.max_new_tokens}
        assert {0, 1, B - 1} <= capped_inside
    for i in range(len(prompts)):
        steps, conf, p = got.step_maps[i], got.confidences[i], len(prompts[i])
        if strategy == "low_confidence_dynamic":
            for s in np.unique(steps):
                below = conf[steps == s] < cfg.threshold
                assert not below.any() or (steps == s).sum() == 1  # only the forced single slot may be below
        else:  # exactly k per forward, fewer only when the block has fewer masked slots left
            all_steps = np.concatenate([steps, got.tail_steps[i]])
            all_pos = p + np.arange(len(all_steps))
            for s in np.unique(steps):
                blk = all_pos[all_steps == s][0] // B
                left = ((all_pos // B == blk) & (all_steps >= s)).sum()
                assert (all_steps == s).sum() == min(cfg.commit_k, left)
    assert any(len(t) for t in got.tail_tokens)  # a stop inside a block leaves a tail


def test_dynamic_commits_several_per_forward(model, prompts):
    got, _ = run_both(model, prompts[:1], config(threshold=0.3))
    assert max(np.bincount(got.step_maps[0])) > 1


def test_sampling_matches_naive_and_rejects_wrong_confidences(model, prompts):
    cfg = config(greedy=False, temperature=0.8, top_k=3, top_p=0.9, strategy="low_confidence_dynamic",
                 threshold=0.45, min_new_tokens=5)
    got, ref = run_both(model, prompts, cfg, seed=3)
    assert_matches(got, ref)
    # confidence renormalised after top-k/top-p, or taken without temperature / stop
    # suppression, changes which slots are committed: the comparison above can fail.
    for wrong in ({"renormalise": True}, {"unscaled_conf": True}):
        bad = [naive_sample(model, p, cfg, 3, i, **wrong) for i, p in enumerate(prompts)]
        assert not all(same(got, i, r) for i, r in enumerate(bad)), wrong
    # a static variant: top-k changes the order of confidences
    cfg = config(greedy=False, temperature=1.5, top_k=2, strategy="low_confidence_static")
    got, ref = run_both(model, prompts, cfg, seed=5)
    assert_matches(got, ref)
    bad = [naive_sample(model, p, cfg, 5, i, renormalise=True) for i, p in enumerate(prompts)]
    assert not all(same(got, i, r) for i, r in enumerate(bad))


def test_stop_cut_min_and_max_new_tokens(model, prompts):
    got, _ = run_both(model, prompts, config(strategy="sequential", denoising_steps=4))
    for i, reason in enumerate(got.finish_reasons):
        toks = got.tokens[i]
        if reason == "stop":  # cut right after the first stop token
            assert toks[-1] in STOP and not np.isin(toks[:-1], STOP).any()
            end = len(prompts[i]) + len(toks)
            assert end + len(got.tail_tokens[i]) == -(-end // B) * B
        else:  # exact length cut; the rest of the last block is the tail
            end = len(prompts[i]) + 14
            assert len(toks) == 14 and not np.isin(toks, STOP).any()
            assert end + len(got.tail_tokens[i]) == -(-end // B) * B
    early = [i for i, t in enumerate(got.tokens) if got.finish_reasons[i] == "stop" and len(t) <= 8]
    assert early  # some stop within the first 8 tokens, which min_new_tokens must prevent
    cfg = config(strategy="sequential", denoising_steps=4, min_new_tokens=9, max_new_tokens=21)
    got, ref = run_both(model, prompts, cfg)
    assert_matches(got, ref)
    for i, p in enumerate(PROMPT_LENS):
        # stops suppressed in every block while min_new - B * (blocks done, partial first counted) > 0
        blocks_suppressed = -(-cfg.min_new_tokens // B)
        first_free = (p // B + blocks_suppressed) * B - p
        hits = np.nonzero(np.isin(got.tokens[i], STOP))[0]
        assert not len(hits) or hits[0] >= first_free
        assert len(got.tokens[i]) <= 21


def test_sharded_equals_unsharded(model, prompts):
    from gtpo_jax.sharding import MeshConfig, build_mesh, shard_model

    cfg = config(greedy=False, temperature=0.8, top_k=5)
    plain = BlockDiffusionSampler(model, cfg).sample(prompts, seed=1)
    sharded_model = nnx.merge(*nnx.split(model))
    mesh = build_mesh(MeshConfig(data=2, fsdp=4, tensor=1))
    shard_model(sharded_model, mesh)
    sharded = BlockDiffusionSampler(sharded_model, cfg, mesh=mesh).sample(prompts, seed=1)
    for i in range(len(prompts)):
        np.testing.assert_array_equal(plain.tokens[i], sharded.tokens[i])
        np.testing.assert_array_equal(plain.step_maps[i], sharded.step_maps[i])
        np.testing.assert_array_equal(plain.tail_tokens[i], sharded.tail_tokens[i])
        np.testing.assert_allclose(plain.logprobs[i], sharded.logprobs[i], atol=1e-5, rtol=0)


def test_rescored_trajectory_matches_rollout_logprobs(model, prompts):
    """The trainer's l_t of the sampler's own trajectories (tails included) equals the sampler's
    log-probs: stop and length cuts inside a block, P % B in {0, 1, 2, 3}."""
    for cfg in (config(threshold=0.3), config(greedy=False, temperature=0.9, top_k=4, max_new_tokens=17),
                config(strategy="low_confidence_static", stop_ids=()),
                config(strategy="sequential", stop_ids=(), max_new_tokens=13)):
        groups = JaxRollout(model, cfg).generate(prompts, 2, seed=7)
        rollouts = [r for g in groups for r in g]
        assert len(groups) == len(prompts) and all(len(g) == 2 for g in groups)
        scored = token_logprobs(model, [r.prompt for r in rollouts], [r.tokens for r in rollouts],
                                [r.step_map for r in rollouts], block_size=B, mask_id=MASK,
                                tails=[r.tail for r in rollouts])
        for r, lt in zip(rollouts, scored):
            np.testing.assert_allclose(lt, r.logprobs, atol=1e-5, rtol=0)
        assert any(len(r.tail_tokens) for r in rollouts)


def test_seed_reproducible_and_batch_independent(model, prompts):
    cfg = config(greedy=False, temperature=1.0)
    s = JaxRollout(model, cfg)
    a = s.generate(prompts[:2], 2, seed=11)
    b = s.generate(prompts[:2], 2, seed=11)
    c = s.generate(prompts[:2], 2, seed=12)
    flat = lambda g: [r.tokens.tolist() for grp in g for r in grp]  # noqa: E731
    assert flat(a) == flat(b) and flat(a) != flat(c)
    assert a[0][0].tokens.tolist() != a[0][1].tokens.tolist()  # samples of one prompt differ
    # a sub-batch budget splits the call without changing results
    small = JaxRollout(model, config(greedy=False, temperature=1.0, jax=JaxEngineSection(max_batch=1)))
    assert flat(small.generate(prompts[:2], 2, seed=11)) == flat(a)


def test_clear_errors(model):
    s = BlockDiffusionSampler(model, config(max_new_tokens=4090))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        s.sample([[5] * 10], seed=0)
    s = BlockDiffusionSampler(model, config(jax=JaxEngineSection(cache_gib=1e-6)))
    with pytest.raises(ValueError, match="cache_gib"):
        s.sample([[5] * 10], seed=0)
    with pytest.raises(ValueError, match="strategy"):
        config(strategy="random")


@pytest.mark.parametrize("greedy", [True, False], ids=["greedy", "sampled"])
def test_masked_slot_scores_equal_whole_block_scores(model, greedy):
    """The decode step projects only masked slots onto the vocabulary (as many rows as the batch's
    most masked slots, a compiled width each); at every masked slot it gives what scoring the whole
    block gives, for batches whose most masked slots are 1, 2, 3 and 4 (widths 1-4 of B = 4)."""
    cfg = config(greedy=greedy, temperature=0.7, top_k=5, top_p=0.9, min_new_tokens=3)
    shape = BlockDiffusionSampler(model, cfg).decode_shape(4, 8)
    rng = np.random.default_rng(3)
    hidden = jnp.asarray(rng.standard_normal((4, B, model.cfg.hidden_size)), jnp.float32)
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(5), i))(jnp.arange(4))
    step, suppress = jnp.asarray([1, 4, 7, 2]), jnp.asarray([True, False, False, True])
    settings = cfg.traced_settings()
    logits = model.logits(hidden)
    stop = np.isin(np.arange(VOCAB), STOP)
    scored = jnp.where(suppress[:, None, None] & stop, -jnp.inf, logits / cfg.temperature)
    want = score_slots(logits, scored, keys, step, jnp.broadcast_to(jnp.arange(B), (4, B)), block_size=B,
                       greedy=greedy, top_k=cfg.top_k, top_p=jnp.float32(cfg.top_p))
    patterns = ([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]],
                [[0, 1, 1, 0], [1, 0, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]],
                [[1, 1, 1, 0], [0, 1, 0, 1], [0, 0, 0, 1], [0, 0, 0, 0]],
                [[1, 1, 1, 1], [0, 1, 0, 1], [1, 0, 1, 1], [0, 0, 0, 0]])
    def final_hidden(slots):
        return jnp.take_along_axis(hidden, slots[..., None], axis=1), ()

    run = jax.jit(lambda masked: _score_masked(model, final_hidden, masked, keys, step, suppress, settings, shape)[0])
    for pattern in patterns:
        masked = jnp.asarray(pattern, bool)
        got = run(masked)
        m = np.asarray(masked)
        np.testing.assert_array_equal(np.asarray(got[0])[m], np.asarray(want[0])[m], err_msg=f"tokens, {pattern}")
        for g, w in zip(got[1:], want[1:]):
            np.testing.assert_allclose(np.asarray(g)[m], np.asarray(w)[m], atol=1e-5, rtol=0, err_msg=str(pattern))


def test_cache_tiles_bounded_and_demo_caches_keep_32(model):
    """Every cache holds whole blocks in at most 8 tiles (each tile's step is unrolled in the
    compiled loop) and covers prompt + max_new_tokens; the CPU demo's caches (prompts of at most
    64 tokens, 48 or 52 new tokens: configs/*_tiny.yaml and the ramble task of
    scripts/demo_seeds.py) keep tiles of 32 positions, the size their recorded runs were decoded
    with: another tile size folds the online softmax over other groups of positions, which moves
    log-probs by round-off and with them every demo table."""
    for new in (4, 48, 52, 128, 352, 1024, 4096):
        sampler = BlockDiffusionSampler(model, config(max_new_tokens=new))
        for prompt in (5, 37, 64, 300, 1000):
            shape = sampler.decode_shape(8, prompt)
            assert shape.cache_tile % B == 0 and shape.cache_len % shape.cache_tile == 0
            assert shape.cache_len // shape.cache_tile <= 8, (new, prompt, shape.cache_len, shape.cache_tile)
            assert shape.cache_len >= prompt + new
    for new in (48, 52):
        for prompt in (20, 55, 64):
            assert BlockDiffusionSampler(model, config(max_new_tokens=new)).decode_shape(16, prompt).cache_tile == 32
