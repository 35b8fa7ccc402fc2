"""Batched block-diffusion generation with a KV cache (docs/algorithm.md §2, LMDeploy 0.18's dLLM rules).

`BlockDiffusionSampler` is the host side: it buckets prompts and batches so that few shapes
compile, splits a request under the KV-cache budget, runs the jitted decode loop
(`gtpo_jax.sampling.decode`: the whole generation of a batch is one `lax.while_loop` on the
device) and cuts each sequence's results at its stop token or length limit.

Random draws are per (sequence, forward): sequence i of a call with seed s, at the forward that
gets step number t, adds Gumbel noise `jax.random.gumbel(fold_in(fold_in(PRNGKey(s), i), t),
(B, vocab))` to the filtered scores. Results therefore do not depend on how sequences are
batched or sharded.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from gtpo_jax.data.tokenizer import TokenIds
from gtpo_jax.model import SDARModel
from gtpo_jax.rounding import round_up
from gtpo_jax.sampling.decode import DecodeShape, TracedSettings, generate_loop
from gtpo_jax.sampling.decoding import STRATEGIES, DecodingConfig
from gtpo_jax.sharding import BATCH_AXES, shard_batch, to_host

log = logging.getLogger("gtpo_jax")

# Cache positions per tile (`gtpo_jax.model.KVCache`): the decode attention reads the filled part
# in whole tiles, each one a step of fixed cost (two small products, the online softmax, a
# `lax.cond`) unrolled in the compiled loop, so run time and compile time both grow with the count
# (a tiny model's sampler compiles in 10.3 / 11.6 / 13.5 CPU-s with 3 / 5 / 9 tiles), while a
# larger tile reads more unfilled positions. `_cache_tile` splits a cache into at most
# FEW_TILES tiles while they stay within FEW_TILES_MAX_TILE positions, and otherwise into at most
# CACHE_TILES, never under CACHE_TILE_MIN positions. Measured on one CPU core (16 prompts of 32
# tokens): 128 new tokens decode 1.02x faster in 3 tiles of 64 than in 6 of 32; 352 as fast in 4
# tiles of 128 as in 7 of 64; 1 024 0.92x in 3 tiles of 512 and 1.09x in 9 of 128 against 5 of
# 256 (kept: compile time). Caches of up to 128 positions (the CPU demo's) keep tiles of 32.
CACHE_TILES, FEW_TILES, FEW_TILES_MAX_TILE, CACHE_TILE_MIN = 8, 4, 128, 32
# (DecodeShape, graphdef) pairs the decode loop was compiled for in this process: the jitted
# loop's cache is shared by every sampler (an evaluation's sampler reuses the rollouts' shapes).
_COMPILED: set = set()


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

    def traced_settings(self) -> TracedSettings:
        """The settings the compiled loop takes as float32 scalars (changing them reuses it)."""
        return TracedSettings(*map(np.float32, (self.temperature, self.threshold, self.top_p, self.min_new_tokens)))


def _cache_tile(capacity: int) -> int:
    """Positions per KV-cache tile for a cache of `capacity` (a power of two) positions."""
    few = min(capacity // FEW_TILES, FEW_TILES_MAX_TILE)
    return min(max(CACHE_TILE_MIN, capacity // CACHE_TILES, few), capacity)


def _next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


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
        self._data_parallel = 1 if mesh is None else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))

    # ---- sizes -----------------------------------------------------------------------------
    def decode_shape(self, batch: int, max_prompt: int) -> DecodeShape:
        """The compiled loop's shape for `batch` sequences whose longest prompt has `max_prompt`
        tokens: the prompt bucket is a power of two (multiples of 256 past 256) and the cache
        length a multiple of the cache tile, so that few shapes compile."""
        c, B = self.config, self.config.block_size
        pb = _next_pow2(max(max_prompt, 8)) if max_prompt <= 256 else round_up(max_prompt, 256)
        need = pb + round_up(c.max_new_tokens, B) + B  # the last window ends before pb + max_new + B
        tile = _cache_tile(_next_pow2(need))
        return DecodeShape(batch, pb, round_up(need, tile), tile, B, c.mask_id, c.stop_ids, c.strategy, c.commit_k,
                           c.top_k, c.top_p < 1.0, c.greedy, self.mesh)

    def cache_bytes_per_sequence(self, cache_len: int) -> int:
        m = self.model.cfg
        return 2 * m.num_layers * cache_len * m.num_kv_heads * m.head_dim * jnp.dtype(m.dtype).itemsize  # keys, values

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
        per_seq = self.cache_bytes_per_sequence(self.decode_shape(1, longest).cache_len)
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
        batch = round_up(_next_pow2(n), self._data_parallel)
        shape = self.decode_shape(batch, max(len(p) for p in prompts))
        pb = shape.prompt_len
        prompt = np.full((batch, pb), c.mask_id, np.int32)
        plen = np.ones(batch, np.int32)
        for i, p in enumerate(prompts):
            prompt[i, : len(p)] = p
            plen[i] = len(p)
        limit = plen + c.max_new_tokens
        done = np.arange(batch) >= n
        base = jax.random.PRNGKey(seed)
        keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.arange(batch) + first_index)
        graphdef, params = nnx.split(self.model)
        if (shape, graphdef) not in _COMPILED:  # what the jitted programs' caches hold, for every sampler
            _COMPILED.add((shape, graphdef))
            log.info("sampler: compiling for batch %d, prompt bucket %d, cache length %d (%s)",
                     batch, pb, shape.cache_len, c.strategy)
        args = (prompt, plen, limit, keys, done)
        if self.mesh is not None:
            args = shard_batch(args, self.mesh)
        out = to_host(generate_loop(graphdef, params, *args, c.traced_settings(), shape=shape))
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
