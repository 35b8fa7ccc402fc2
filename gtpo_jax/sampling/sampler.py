"""Batched block-diffusion generation with a KV cache (docs/algorithm.md §2, LMDeploy 0.18's dLLM rules).

The whole generation of a batch is one jitted `lax.while_loop`. Every iteration runs one
forward of 2·B slots per sequence on top of a preallocated KV cache:

* slots [0, B): the previous block, clean, when it has just completed — its keys/values are
  written into the cache (LMDeploy spends a separate forward on this; fusing it into the next
  denoising forward gives the same numbers with a third fewer iterations). Otherwise these slots
  have segment 0 and nothing sees them;
* slots [B, 2B): the current block, which is denoised: the strategy commits some masked slots.

Sequences advance independently (each has its own block, step counter and finish state), so a
batch may mix prompt lengths; blocks stay aligned to absolute positions. Cache slots that are
not filled yet have segment 0 and are invisible (see `gtpo_jax.model.attention`), so the same
attention kernel serves the sampler and the trainer.

Random draws are per (sequence, forward): sequence i of a call with seed s, at the forward that
gets step number t, adds Gumbel noise `jax.random.gumbel(fold_in(fold_in(PRNGKey(s), i), t),
(B, vocab))` to the filtered scores. Results therefore do not depend on how sequences are
batched or sharded.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gtpo_jax.data.tokenizer import TokenIds
from gtpo_jax.model import KVContext, LayerKV, SDARModel, TokenLayout
from gtpo_jax.rounding import round_up
from gtpo_jax.sampling.decoding import STRATEGIES, DecodingConfig
from gtpo_jax.sharding import BATCH_AXES, shard_batch, to_host

log = logging.getLogger("gtpo_jax")


@dataclasses.dataclass(kw_only=True)
class SamplerConfig(DecodingConfig):
    """The decoding settings (docs/algorithm.md §2; `jax` holds the memory budget of one jitted
    call) with the run's resolved token ids and the choice of greedy decoding."""

    block_size: int
    mask_id: int
    stop_ids: tuple[int, ...]
    greedy: bool = False

    @classmethod
    def of(cls, decoding: DecodingConfig, ids: TokenIds, *, greedy: bool = False) -> "SamplerConfig":
        settings = {f.name: getattr(decoding, f.name) for f in dataclasses.fields(DecodingConfig)}
        return cls(**settings, block_size=ids.block_size, mask_id=ids.mask_id, stop_ids=ids.stop_ids, greedy=greedy)

    def __post_init__(self):
        problems = []
        if self.strategy not in STRATEGIES:
            problems.append(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.block_size < 1 or self.denoising_steps < 1:
            problems.append("block_size and denoising_steps must be >= 1")
        if self.max_new_tokens < 1 or self.min_new_tokens < 0:
            problems.append(f"need max_new_tokens >= 1 and min_new_tokens >= 0, got {self.max_new_tokens}, "
                            f"{self.min_new_tokens}")
        if not self.temperature > 0:
            problems.append(f"temperature must be > 0 (use greedy=True for argmax decoding), got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            problems.append(f"need top_k >= 0 and 0 < top_p <= 1, got {self.top_k}, {self.top_p}")
        if problems:
            raise ValueError("invalid sampler configuration:\n  - " + "\n  - ".join(problems))
        object.__setattr__(self, "stop_ids", tuple(int(s) for s in self.stop_ids))

    @property
    def commit_k(self) -> int:
        """Slots per forward of the static and sequential strategies (LMDeploy's rule)."""
        return max(1, min(self.block_size // self.denoising_steps, self.block_size))


class _Static(NamedTuple):
    """Everything the compiled loop specialises on (shapes and discrete options)."""

    batch: int
    prompt_len: int
    cache_len: int
    block_size: int
    mask_id: int
    stop_ids: tuple[int, ...]
    strategy: str
    commit_k: int
    top_k: int
    use_top_p: bool
    greedy: bool
    mesh: Mesh | None


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


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


def _put_rows(array: jax.Array, values: jax.Array, start: jax.Array, axis: int) -> jax.Array:
    """array[b, start[b] : start[b] + n] = values[b] along `axis` (1 for [b, L], 2 for caches)."""
    def one(a, v, s):
        return jax.lax.dynamic_update_slice_in_dim(a, v, s, axis=axis - 1)

    in_axis = 0 if axis == 1 else 1
    return jax.vmap(one, in_axes=(in_axis, in_axis, 0), out_axes=in_axis)(array, values, start)


def _generate(graphdef, params, prompt, prompt_len, limit, keys, done, knobs, st: _Static):
    """The jitted loop. prompt [b, Pb] (mask-padded), prompt_len / limit (= P + max_new) [b],
    keys [b] PRNG keys, done [b] (padding rows), knobs float32 [4] = temperature, threshold,
    top_p, min_new_tokens. Returns per-slot tokens / steps / raw log-probs / confidences
    [b, L] and per-sequence stop cut (0 = length finish) and forward count."""
    model: SDARModel = nnx.merge(graphdef, params)
    cfg = model.cfg
    b, B, L, pb = st.batch, st.block_size, st.cache_len, st.prompt_len
    temperature, threshold, top_p, min_new = knobs[0], knobs[1], knobs[2], knobs[3]
    dt = jnp.dtype(cfg.dtype)
    nl, kvh, hd = cfg.num_layers, cfg.num_kv_heads, cfg.head_dim

    def constrain(x, batch_axis):
        if st.mesh is None:
            return x
        spec = [None] * x.ndim
        spec[batch_axis] = BATCH_AXES
        return jax.lax.with_sharding_constraint(x, NamedSharding(st.mesh, PartitionSpec(*spec)))

    # Prefill: the prompt's full blocks enter the cache; the partial block is decoded in place.
    first_block = prompt_len // B
    ppos = jnp.broadcast_to(jnp.arange(pb, dtype=jnp.int32), (b, pb))
    pseg = (ppos < (first_block * B)[:, None]).astype(jnp.int32)
    _, kvs = model(prompt, ppos, TokenLayout(pseg, ppos // B, jnp.zeros_like(ppos)))
    pad = ((0, 0), (0, 0), (0, L - pb), (0, 0), (0, 0))
    k_cache = constrain(jnp.pad(jnp.stack([kv.k for kv in kvs]).astype(dt), pad), 1)
    v_cache = constrain(jnp.pad(jnp.stack([kv.v for kv in kvs]).astype(dt), pad), 1)

    tokens = jnp.concatenate([prompt, jnp.full((b, L - pb), st.mask_id, jnp.int32)], axis=1)
    zeros_i = jnp.zeros((b, L), jnp.int32)
    zeros_f = jnp.zeros((b, L), jnp.float32)
    stop_vocab = jnp.zeros((cfg.vocab_size,), bool).at[jnp.asarray(st.stop_ids, jnp.int32)].set(True)
    pos_l = jnp.arange(L, dtype=jnp.int32)
    win = jnp.arange(2 * B, dtype=jnp.int32)
    is_prev = win < B
    zero_b = jnp.zeros((b,), jnp.int32)
    state = dict(tokens=tokens, steps=zeros_i, logp=zeros_f, conf=zeros_f, k=k_cache, v=v_cache,
                 block=first_block, cached=first_block, write_prev=jnp.zeros((b,), bool), counter=zero_b,
                 done=done, stop_cut=zero_b, forwards=zero_b)
    max_iters = (L // B + 1) * (B + 1)

    def body(carry):
        it, s = carry
        active = ~s["done"]
        j = s["block"]
        start = (j - 1) * B
        widx = start[:, None] + win  # absolute positions of the window (prev block, current block)
        wpos = jnp.clip(widx, 0, L - 1)
        wtok = jnp.take_along_axis(s["tokens"], wpos, axis=1)
        wseg = jnp.where(is_prev, s["write_prev"][:, None], True).astype(jnp.int32)
        layout = TokenLayout(wseg, jnp.floor_divide(widx, B), jnp.zeros_like(widx))
        cache_layout = TokenLayout((pos_l < (s["cached"] * B)[:, None]).astype(jnp.int32),
                                   jnp.broadcast_to(pos_l // B, (b, L)), jnp.zeros((b, L), jnp.int32))
        ctx = KVContext(tuple(LayerKV(s["k"][i], s["v"][i]) for i in range(nl)), cache_layout)
        hidden, kvs = model(wtok, wpos, layout, ctx)
        logits = model.logits(hidden[:, B:])  # [b, B, V] float32

        # The scored distribution, the draw, confidence and raw log-prob of each slot.
        cur_pos = widx[:, B:]
        suppress = (min_new - B * (j - first_block)) > 0
        scored = jnp.where(suppress[:, None, None] & stop_vocab, -jnp.inf, logits / temperature)
        if st.greedy:
            chosen = jnp.argmax(scored, axis=-1)
        else:
            noise = jax.vmap(lambda key, t: jax.random.gumbel(jax.random.fold_in(key, t), scored.shape[1:]))(
                keys, s["counter"] + 1)
            chosen = jnp.argmax(filter_scores(scored, st.top_k, top_p if st.use_top_p else None) + noise, axis=-1)
        chosen = chosen.astype(jnp.int32)
        pick = lambda a: jnp.take_along_axis(a, chosen[..., None], axis=-1)[..., 0]  # noqa: E731
        conf = jnp.exp(pick(jax.nn.log_softmax(scored, axis=-1)))
        raw = pick(jax.nn.log_softmax(logits, axis=-1))

        cur_tok = wtok[:, B:]
        cur_steps = jnp.take_along_axis(s["steps"], cur_pos, axis=1)
        # Every generated slot of the block is decoded, also past the length limit (LMDeploy
        # decodes the last block whole); the host cuts at the limit and returns the rest as tail.
        gen = cur_pos >= prompt_len[:, None]
        masked = gen & (cur_steps == 0) & active[:, None]
        commit = select_slots(masked, conf, threshold, st.strategy, st.commit_k)
        step = s["counter"] + 1
        new_tok = jnp.where(commit, chosen, cur_tok)
        new_steps = jnp.where(commit, step[:, None], cur_steps)
        cur_at = j * B
        out = dict(s)
        out["tokens"] = _put_rows(s["tokens"], new_tok, cur_at, 1)
        out["steps"] = _put_rows(s["steps"], new_steps, cur_at, 1)
        for name, value in (("logp", raw), ("conf", conf)):
            kept = jnp.take_along_axis(s[name], cur_pos, axis=1)
            out[name] = _put_rows(s[name], jnp.where(commit, value, kept), cur_at, 1)

        # The previous block's clean keys/values enter the cache.
        write = s["write_prev"] & active
        for name, new in (("k", jnp.stack([kv.k[:, :B] for kv in kvs]).astype(dt)),
                          ("v", jnp.stack([kv.v[:, :B] for kv in kvs]).astype(dt))):
            old = jax.vmap(lambda c, st_: jax.lax.dynamic_slice_in_dim(c, st_, B, axis=1), in_axes=(1, 0),
                           out_axes=1)(s[name], jnp.maximum(start, 0))
            out[name] = constrain(_put_rows(s[name], jnp.where(write[None, :, None, None, None], new, old),
                                            jnp.maximum(start, 0), 2), 1)
        out["cached"] = s["cached"] + write

        # Block completion: stop check, length check, or on to the next block.
        complete = active & ~jnp.any(gen & (new_steps == 0), axis=1)
        # a stop token past the limit does not count: the length cut comes first
        is_stop = gen & (cur_pos < limit[:, None]) & jnp.isin(new_tok, jnp.asarray(st.stop_ids, jnp.int32))
        stopped = complete & jnp.any(is_stop, axis=1)
        length_end = complete & ~stopped & ((j + 1) * B >= limit)
        advance = complete & ~stopped & ~length_end
        out["stop_cut"] = jnp.where(stopped, cur_at + jnp.argmax(is_stop, axis=1) + 1, s["stop_cut"])
        out["done"] = s["done"] | stopped | length_end
        out["block"] = j + advance
        out["write_prev"] = advance
        out["counter"] = s["counter"] + active
        out["forwards"] = s["forwards"] + active
        return it + 1, out

    def cond(carry):
        it, s = carry
        return (it < max_iters) & ~jnp.all(s["done"])

    _, s = jax.lax.while_loop(cond, body, (jnp.int32(0), state))
    return {k: s[k] for k in ("tokens", "steps", "logp", "conf", "done", "stop_cut", "forwards")}


_generate_jit = jax.jit(_generate, static_argnames=("graphdef", "st"))


@dataclasses.dataclass
class SampleBatch:
    """The sampler's results, one entry per sequence (numpy); the rollout layer builds its
    records from them (the sampler knows nothing of rollouts)."""

    tokens: list[np.ndarray]
    step_maps: list[np.ndarray]
    logprobs: list[np.ndarray]
    confidences: list[np.ndarray]
    tail_tokens: list[np.ndarray]
    tail_steps: list[np.ndarray]
    finish_reasons: list[str]
    num_forwards: list[int]


def tokens_per_forward(step_map: np.ndarray) -> float:
    """Tokens committed per model forward of one sequence: its length over its distinct steps."""
    return len(step_map) / max(len(set(np.asarray(step_map).tolist())), 1)


class BlockDiffusionSampler:
    """Generates with a model under a `SamplerConfig`; `model`'s parameters may be replaced
    (nnx.update) between calls without recompiling."""

    def __init__(self, model: SDARModel, config: SamplerConfig, *, mesh: Mesh | None = None):
        self.model = model
        self.config = config
        self.mesh = mesh
        self._compiled: set = set()
        self._data_parallel = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))

    # ---- sizes -----------------------------------------------------------------------------
    def _buckets(self, max_prompt: int) -> tuple[int, int]:
        """(prompt bucket, cache length): powers of two, then multiples of the attention tile, so
        that few shapes compile; cache length + 2B is a whole number of key tiles."""
        c, B = self.config, self.config.block_size
        pb = _next_pow2(max(max_prompt, 8)) if max_prompt <= 256 else round_up(max_prompt, 256)
        need = pb + round_up(c.max_new_tokens, B) + B + 2 * B
        tile = self.model.cfg.attn_kv_tile
        total = _next_pow2(need) if need <= tile else round_up(need, tile)
        return pb, total - 2 * B

    def cache_bytes_per_sequence(self, cache_len: int) -> int:
        m = self.model.cfg
        # keys + values, plus the copy the attention makes when it appends the window
        return 2 * 2 * m.num_layers * (cache_len + 2 * self.config.block_size) * m.num_kv_heads * m.head_dim * \
            jnp.dtype(m.dtype).itemsize

    def _check_fits(self, prompts: Sequence[Sequence[int]]) -> int:
        """Sequences per call under the cache budget; clear errors for requests that cannot fit."""
        c, m = self.config, self.model.cfg
        longest = max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError("empty prompt: every prompt needs at least one token")
        if longest + c.max_new_tokens > m.max_position_embeddings:
            raise ValueError(f"prompt of {longest} tokens + max_new_tokens {c.max_new_tokens} exceeds the model's "
                             f"max_position_embeddings ({m.max_position_embeddings}); shorten the prompt or lower "
                             "max_new_tokens")
        per_seq = self.cache_bytes_per_sequence(self._buckets(longest)[1])
        batch = c.jax.max_batch or 1 << 30
        if c.jax.cache_gib is not None:
            fit = int(c.jax.cache_gib * 2**30 // per_seq)
            if fit < self._data_parallel:
                raise ValueError(f"the KV cache of one sequence (prompt {longest} + {c.max_new_tokens} new tokens) "
                                 f"needs {per_seq / 2**20:.1f} MiB; cache_gib={c.jax.cache_gib} holds {fit} "
                                 f"sequences but the data-parallel size is {self._data_parallel}; raise cache_gib "
                                 "or lower max_new_tokens")
            batch = min(batch, fit)
        return max(self._data_parallel, batch // self._data_parallel * self._data_parallel)

    # ---- generation ----------------------------------------------------------------------
    def sample(self, prompts: Sequence[Sequence[int]], *, seed: int, first_index: int = 0) -> SampleBatch:
        """One result per prompt (sequence i uses the random stream of index first_index + i)."""
        if not prompts:
            return SampleBatch([], [], [], [], [], [], [], [])
        chunk = self._check_fits(prompts)
        parts = [self._sample_chunk(prompts[i : i + chunk], seed, first_index + i)
                 for i in range(0, len(prompts), chunk)]
        return SampleBatch(*(sum((getattr(p, f.name) for p in parts), []) for f in dataclasses.fields(SampleBatch)))

    def _sample_chunk(self, prompts: Sequence[Sequence[int]], seed: int, first_index: int) -> SampleBatch:
        c, B = self.config, self.config.block_size
        n = len(prompts)
        pb, cache_len = self._buckets(max(len(p) for p in prompts))
        batch = round_up(_next_pow2(n), self._data_parallel)
        prompt = np.full((batch, pb), c.mask_id, np.int32)
        plen = np.ones(batch, np.int32)
        for i, p in enumerate(prompts):
            prompt[i, : len(p)] = p
            plen[i] = len(p)
        limit = plen + c.max_new_tokens
        done = np.arange(batch) >= n
        base = jax.random.PRNGKey(seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(batch) + first_index)
        knobs = np.asarray([c.temperature, c.threshold, c.top_p, c.min_new_tokens], np.float32)
        st = _Static(batch, pb, cache_len, B, c.mask_id, c.stop_ids, c.strategy, c.commit_k, c.top_k,
                     c.top_p < 1.0, c.greedy, self.mesh)
        graphdef, params = nnx.split(self.model)
        if (st, graphdef) not in self._compiled:
            self._compiled.add((st, graphdef))
            log.info("sampler: compiling for batch %d, prompt bucket %d, cache length %d (%s)",
                     batch, pb, cache_len, c.strategy)
        args = (prompt, plen, limit, keys, done)
        if self.mesh is not None:
            args = shard_batch(args, self.mesh)
        out = to_host(_generate_jit(graphdef, params, *args, knobs, st=st))
        if not out["done"][:n].all():
            raise RuntimeError("sampler loop ended before every sequence finished (internal error)")
        result = SampleBatch([], [], [], [], [], [], [], [])
        for i in range(n):
            p, cut = int(plen[i]), int(out["stop_cut"][i])
            reason = "stop" if cut else "length"
            cut = cut or int(limit[i])
            tail_end = round_up(cut, B)  # the block that holds the cut was decoded whole
            result.tokens.append(out["tokens"][i, p:cut].astype(np.int32))
            result.step_maps.append(out["steps"][i, p:cut].astype(np.int32))
            result.logprobs.append(out["logp"][i, p:cut].astype(np.float32))
            result.confidences.append(out["conf"][i, p:cut].astype(np.float32))
            result.tail_tokens.append(out["tokens"][i, cut:tail_end].astype(np.int32))
            result.tail_steps.append(out["steps"][i, cut:tail_end].astype(np.int32))
            result.finish_reasons.append(reason)
            result.num_forwards.append(int(out["forwards"][i]) + int(p >= B))  # + the prefill
        return result
