"""The jitted decode loop: the whole generation of a batch is a prefill program and one
`lax.while_loop` on the device.

Every iteration runs one forward of the current block's B slots per sequence on top of a
preallocated KV cache of finished blocks (`gtpo_jax.model.KVCache`, in tiles; attention reads
only the filled ones). A block that has just completed is clean and its keys/values must enter
the cache: in iterations where some sequence has such a block, the forward runs 2·B slots instead — the
previous block, clean, in slots [0, B) (segment 0, invisible, for sequences that have nothing to
write), then the current block — so the write costs no extra forward (LMDeploy spends one).
Only the layers below the last differ in width: the last layer always takes the 2·B window (zero
states in segment 0 when nothing is written), so it and the scoring are compiled once, not once
per width.
When all sequences advance in step (equal prompts, a static strategy) that is one iteration of
B + 1 per block; sequences that drift apart make more iterations wide.

Only still-masked slots are scored: committed slots' keys and values are needed in every layer,
but their final states are not, so the last layer computes queries, attention output and MLP,
and the vocabulary projection and scores run, for the masked slots only (as many per sequence as
the batch's most masked slots, rounded up to a compiled width).

Sequences advance independently (each has its own block, step counter and finish state), so a
batch may mix prompt lengths; blocks stay aligned to absolute positions.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gtpo_jax.model import KVCache, Rope, SDARModel, TokenLayout, split_tiles
from gtpo_jax.sampling.rules import score_slots, select_slots
from gtpo_jax.sharding import BATCH_AXES


class DecodeShape(NamedTuple):
    """Everything the compiled loop specialises on (shapes and discrete options)."""

    batch: int
    prompt_len: int  # the prompt bucket
    cache_len: int  # positions of the cache and of the per-slot outputs, a multiple of cache_tile
    cache_tile: int  # positions of the cache attention reads per tile
    block_size: int
    mask_id: int
    stop_ids: tuple[int, ...]
    strategy: str
    commit_k: int
    top_k: int
    use_top_p: bool
    greedy: bool
    mesh: Mesh | None


class TracedSettings(NamedTuple):
    """The decoding settings that enter the loop as float32 scalars, not as compiled constants:
    changing them between calls reuses the compiled loop."""

    temperature: jax.Array
    threshold: jax.Array
    top_p: jax.Array
    min_new_tokens: jax.Array


class _State(NamedTuple):
    tokens: jax.Array  # [b, L] int32: prompt, committed tokens, mask elsewhere
    steps: jax.Array  # [b, L] int32: the forward (1-based) that committed each slot, 0 = not generated
    logp: jax.Array  # [b, L] float32: raw log-prob of each committed token
    conf: jax.Array  # [b, L] float32: its confidence
    k: tuple  # per layer its key tiles (`KVCache`; whole [b, kv_heads, head_dim, L] arrays out of the prefill)
    v: tuple  # per layer its value tiles (whole [b, kv_heads, L, head_dim] arrays out of the prefill)
    block: jax.Array  # [b]: the block being decoded
    cached: jax.Array  # [b]: blocks in the cache (block - 1 while the previous one waits to be written)
    write_prev: jax.Array  # [b] bool: the previous block is complete and not cached yet
    counter: jax.Array  # [b]: forwards run for this sequence (its step numbers)
    done: jax.Array  # [b] bool
    stop_cut: jax.Array  # [b]: end of the tokens after a stop token, 0 = no stop


def _constrain(x: jax.Array, shape: DecodeShape) -> jax.Array:
    """Keep a per-sequence array's leading dimension on the data-parallel axes."""
    if shape.mesh is None:
        return x
    spec = PartitionSpec(BATCH_AXES, *([None] * (x.ndim - 1)))
    return jax.lax.with_sharding_constraint(x, NamedSharding(shape.mesh, spec))


def _put_rows(array: jax.Array, values: jax.Array, start: jax.Array, axis: int = 1) -> jax.Array:
    """array[b, ..., start[b] : start[b] + n, ...] = values[b] along `axis` (of the batched array)."""
    def one(a, v, s):
        return jax.lax.dynamic_update_slice_in_dim(a, v, s, axis=axis - 1)

    return jax.vmap(one)(array, values, start)


def _prefill(model: SDARModel, prompt, prompt_len, done, shape: DecodeShape) -> _State:
    """The prompt's full blocks enter the cache, here as one array per layer for keys and for
    values (the decode program splits them into tiles); its partial block is decoded in place."""
    cfg, (b, pb, L) = model.cfg, (shape.batch, shape.prompt_len, shape.cache_len)
    first_block = prompt_len // shape.block_size
    pos = jnp.broadcast_to(jnp.arange(pb, dtype=jnp.int32), (b, pb))
    seg = (pos < (first_block * shape.block_size)[:, None]).astype(jnp.int32)
    _, kvs = model(prompt, pos, TokenLayout(seg, pos // shape.block_size, jnp.zeros_like(pos)))

    def to_cache(x, keys: bool):  # [b, pb, heads, d] -> keys [b, heads, d, L], values [b, heads, L, d]
        x = x.astype(cfg.dtype).transpose((0, 2, 3, 1) if keys else (0, 2, 1, 3))
        pad = [(0, 0)] * 4
        pad[3 if keys else 2] = (0, L - pb)
        return _constrain(jnp.pad(x, pad), shape)

    tokens = jnp.concatenate([prompt, jnp.full((b, L - pb), shape.mask_id, jnp.int32)], axis=1)
    zeros_i, zeros_f, zero_b = jnp.zeros((b, L), jnp.int32), jnp.zeros((b, L), jnp.float32), jnp.zeros(b, jnp.int32)
    return _State(tokens, zeros_i, zeros_f, zeros_f, tuple(to_cache(kv.k, True) for kv in kvs),
                  tuple(to_cache(kv.v, False) for kv in kvs), first_block, first_block, jnp.zeros(b, bool), zero_b, done,
                  zero_b)


def _window_layout(s: _State, shape: DecodeShape, writes: jax.Array | None):
    """Positions [b, w] (clipped into the cache) and TokenLayout of a decode window: the current
    block's B slots, after the previous block's B slots when `writes` [b] bool is given (those are
    visible, segment 1, only for the sequences whose `writes` is set: segment 0 elsewhere)."""
    B = shape.block_size
    width = B if writes is None else 2 * B
    idx = (s.block - (width // B - 1))[:, None] * B + jnp.arange(width, dtype=jnp.int32)
    seg = jnp.ones_like(idx)
    if writes is not None:
        seg = jnp.where(jnp.arange(width) < B, writes[:, None], True).astype(jnp.int32)
    return jnp.clip(idx, 0, shape.cache_len - 1), TokenLayout(seg, jnp.floor_divide(idx, B), jnp.zeros_like(idx))


def _block_prefix(model: SDARModel, s: _State, shape: DecodeShape, fused: bool, rope: Rope):
    """All layers but the last over the current block, after the previous one (clean) when
    `fused`: their states [b, 2B, hidden] (slots [0, B) zero when not fused) and these layers'
    keys/values of the previous block in the cache layouts (zeros when not fused). The two
    variants differ in width only here, so the last layer and the scoring are compiled once."""
    B, n_layers = shape.block_size, model.cfg.num_layers
    pos, layout = _window_layout(s, shape, s.write_prev if fused else None)
    tok = jnp.take_along_axis(s.tokens, pos, axis=1)
    x, kvs = model.run_layers(model.embed(tok), rope.at(pos), layout, range(n_layers - 1),
                              KVCache(s.k, s.v, s.cached * B))
    if fused:
        return x, tuple(kv.k[:, :B].transpose(0, 2, 3, 1) for kv in kvs), tuple(kv.v[:, :B].transpose(0, 2, 1, 3)
                                                                                for kv in kvs)
    prev_k = tuple(jnp.zeros(c.shape[:3] + (B,), c.dtype) for c, *_ in s.k[: n_layers - 1])
    prev_v = tuple(jnp.zeros(c.shape[:2] + (B,) + c.shape[3:], c.dtype) for c, *_ in s.v[: n_layers - 1])
    return jnp.pad(x, ((0, 0), (B, 0), (0, 0))), prev_k, prev_v


def _window_forward(model: SDARModel, s: _State, shape: DecodeShape, fused: jax.Array, score: Callable, rope: Rope):
    """One forward of the current block, after the previous one (clean) where `fused` [scalar
    bool]: `score(final_hidden)` of its slots (`_score_masked`) and the previous block's keys and
    values in the cache layouts (meaningful only for the sequences that write it). The window is
    always 2·B slots for the last layer: without a write its first B slots are zero states in
    segment 0, invisible, which only the last layer's keys/values pay for."""
    B, n_layers = shape.block_size, model.cfg.num_layers
    x, prev_k, prev_v = jax.lax.cond(fused, lambda s: _block_prefix(model, s, shape, True, rope),
                                     lambda s: _block_prefix(model, s, shape, False, rope), s)
    pos, layout = _window_layout(s, shape, s.write_prev & fused)
    cache = KVCache(s.k, s.v, s.cached * B)

    def final_hidden(slots):  # block slots [b, w] -> their final states; the last layer asks for their queries only
        h, last = model.run_layers(x, rope.at(pos), layout, range(n_layers - 1, n_layers), cache, rows=slots + B)
        return model.norm(h), last

    scores, (last,) = score(final_hidden)
    return scores, prev_k + (last.k[:, :B].transpose(0, 2, 3, 1),), prev_v + (last.v[:, :B].transpose(0, 2, 1, 3),)


def _write_prev_block(s: _State, prev_k, prev_v, shape: DecodeShape) -> _State:
    """The previous block's clean keys/values enter the cache of the sequences that wait for it.
    A block lies inside one tile (tiles are whole blocks); tiles that no sequence writes stay
    untouched."""
    B, t = shape.block_size, shape.cache_tile
    write = s.write_prev & ~s.done
    at = jnp.maximum(s.block - 1, 0) * B

    def put(tiles, new, axis):  # `axis` of a batched tile holds positions
        def into(tile, j):
            here = write & (at // t == j)
            offset = jnp.clip(at - j * t, 0, t - B)

            def write_rows(tile):
                old = jax.vmap(lambda c, a: jax.lax.dynamic_slice_in_dim(c, a, B, axis=axis - 1))(tile, offset)
                rows = jnp.where(here[:, None, None, None], new.astype(tile.dtype), old)
                return _constrain(_put_rows(tile, rows, offset, axis=axis), shape)

            return jax.lax.cond(jnp.any(here), write_rows, lambda tile: tile, tile)

        return tuple(into(tile, j) for j, tile in enumerate(tiles))

    return s._replace(k=tuple(put(c, n, 3) for c, n in zip(s.k, prev_k)),
                      v=tuple(put(c, n, 2) for c, n in zip(s.v, prev_v)), cached=s.cached + write)


def _projection_widths(B: int) -> tuple[int, ...]:
    """Slots per sequence of the compiled final-state branches (`_score_masked`): every width up
    to 8 (a block of 4 committing one slot per forward needs 4, 3, 2, 1), then powers of two and
    B, so that large blocks compile few branches."""
    return tuple(sorted(set(range(1, min(B, 8) + 1)) | {min(1 << i, B) for i in range(B.bit_length() + 1)}))


def _score_masked(model: SDARModel, final_hidden: Callable, masked, keys, step, suppress,
                  settings: TracedSettings, shape: DecodeShape):
    """((token, confidence, raw log-prob) [b, B] of every masked slot, what `final_hidden` adds);
    other slots hold values that nothing reads. `final_hidden(slots [b, w])` -> (final hidden
    states [b, w, hidden], anything). Committed slots' scores are never used, so only masked slots
    get final states (the last layer's queries, attention output and MLP), a vocabulary
    projection and scores: each sequence's masked slots first, in as many rows as the batch's
    most masked slots, rounded up to a compiled width (one `lax.switch` branch per width)."""
    B = shape.block_size
    temperature, top_p = settings.temperature, settings.top_p
    order = jnp.argsort(~masked, axis=1, stable=True).astype(jnp.int32)  # masked slots first, by index
    back = jnp.argsort(order, axis=1).astype(jnp.int32)  # slot -> its row in `order`
    stop_vocab = jnp.zeros((model.cfg.vocab_size,), bool).at[jnp.asarray(shape.stop_ids, jnp.int32)].set(True)

    def width(w: int):
        def branch(order, back):
            rows = order[:, :w]
            hidden, extra = final_hidden(rows)
            logits = model.logits(hidden)  # [b, w, V] float32
            scored = jnp.where(suppress[:, None, None] & stop_vocab, -jnp.inf, logits / temperature)
            out = score_slots(logits, scored, keys, step, rows, block_size=B, greedy=shape.greedy, top_k=shape.top_k,
                              top_p=top_p if shape.use_top_p else None)
            # rows past w (slots that are not masked anywhere in this forward) read as zeros
            return tuple(jnp.take_along_axis(jnp.pad(x, ((0, 0), (0, B - w))), back, axis=1) for x in out), extra
        return branch

    widths = _projection_widths(B)
    need = jnp.max(jnp.sum(masked, axis=1))
    index = jnp.minimum(jnp.searchsorted(jnp.asarray(widths), need), len(widths) - 1)  # the first width >= need
    return jax.lax.switch(index, [width(w) for w in widths], order, back)


def _decode_step(model: SDARModel, s: _State, prompt_len, limit, keys, settings: TracedSettings,
                 shape: DecodeShape, rope: Rope) -> _State:
    """One forward: score the current block, commit slots, write the previous block, finish blocks."""
    B = shape.block_size
    threshold, min_new = settings.threshold, settings.min_new_tokens
    active = ~s.done
    j, first_block = s.block, prompt_len // B
    at = j * B
    cur_pos = at[:, None] + jnp.arange(B, dtype=jnp.int32)
    cur_tok = jnp.take_along_axis(s.tokens, cur_pos, axis=1)
    cur_steps = jnp.take_along_axis(s.steps, cur_pos, axis=1)
    # Every generated slot of the block is decoded, also past the length limit (LMDeploy decodes
    # the last block whole); the host cuts at the limit and returns the rest as tail.
    gen = cur_pos >= prompt_len[:, None]
    masked = gen & (cur_steps == 0) & active[:, None]
    suppress = (min_new - B * (j - first_block)) > 0  # stop tokens barred until min_new_tokens
    step = s.counter + 1
    score = functools.partial(_score_masked, model, masked=masked, keys=keys, step=step, suppress=suppress,
                              settings=settings, shape=shape)
    writes = jnp.any(s.write_prev & active)  # some sequence's previous block waits for the cache
    (chosen, conf, raw), prev_k, prev_v = _window_forward(model, s, shape, writes, score, rope)
    # only a block's first forward writes: skipping the others' masked no-op writes into every
    # layer's cache saves 4-6% of a one-token-per-forward decode on a CPU
    s = jax.lax.cond(writes, lambda s: _write_prev_block(s, prev_k, prev_v, shape), lambda s: s, s)
    commit = select_slots(masked, conf, threshold, shape.strategy, shape.commit_k)
    new_tok = jnp.where(commit, chosen, cur_tok)
    new_steps = jnp.where(commit, step[:, None], cur_steps)

    def put(array, value):
        return _put_rows(array, jnp.where(commit, value, jnp.take_along_axis(array, cur_pos, axis=1)), at)

    s = s._replace(tokens=_put_rows(s.tokens, new_tok, at), steps=_put_rows(s.steps, new_steps, at),
                   logp=put(s.logp, raw), conf=put(s.conf, conf), counter=s.counter + active)

    # Block completion: stop check, length check, or on to the next block.
    complete = active & ~jnp.any(gen & (new_steps == 0), axis=1)
    # a stop token past the limit does not count: the length cut comes first
    is_stop = gen & (cur_pos < limit[:, None]) & jnp.isin(new_tok, jnp.asarray(shape.stop_ids, jnp.int32))
    stopped = complete & jnp.any(is_stop, axis=1)
    length_end = complete & ~stopped & ((j + 1) * B >= limit)
    advance = complete & ~stopped & ~length_end
    return s._replace(stop_cut=jnp.where(stopped, at + jnp.argmax(is_stop, axis=1) + 1, s.stop_cut),
                      done=s.done | stopped | length_end, block=j + advance, write_prev=advance)


def _prefill_program(graphdef, params, prompt, prompt_len, done, shape: DecodeShape) -> _State:
    return _prefill(nnx.merge(graphdef, params), prompt, prompt_len, done, shape)


def _decode_program(graphdef, params, s: _State, prompt_len, limit, keys, settings: TracedSettings,
                    shape: DecodeShape) -> dict:
    """The decode loop from the prefill's state: splits the cache into tiles, then one forward per
    iteration until every sequence is done."""
    model: SDARModel = nnx.merge(graphdef, params)
    k, v = zip(*(split_tiles(k, v, shape.cache_tile) for k, v in zip(s.k, s.v)))
    s = s._replace(k=tuple(tuple(_constrain(t, shape) for t in tiles) for tiles in k),
                   v=tuple(tuple(_constrain(t, shape) for t in tiles) for tiles in v))
    # rotary tables of every cache position, built once: each forward gathers its window's rows
    rope = Rope.of(model.cfg, jnp.arange(shape.cache_len, dtype=jnp.int32)[None])
    max_iters = (shape.cache_len // shape.block_size + 1) * (shape.block_size + 1)

    def body(carry):
        it, s = carry
        return it + 1, _decode_step(model, s, prompt_len, limit, keys, settings, shape, rope)

    def cond(carry):
        it, s = carry
        return (it < max_iters) & ~jnp.all(s.done)

    _, s = jax.lax.while_loop(cond, body, (jnp.int32(0), s))
    return dict(tokens=s.tokens, steps=s.steps, logp=s.logp, conf=s.conf, done=s.done, stop_cut=s.stop_cut,
                forwards=s.counter)


_prefill_jit = jax.jit(_prefill_program, static_argnames=("graphdef", "shape"))
_decode_jit = jax.jit(_decode_program, static_argnames=("graphdef", "shape"))


def generate_loop(graphdef, params, prompt, prompt_len, limit, keys, done, settings: TracedSettings,
                  shape: DecodeShape) -> dict:
    """prompt [b, Pb] (mask-padded), prompt_len / limit (= P + max_new) [b], keys [b] PRNG keys,
    done [b] (padding rows).
    Returns per-slot tokens / steps / raw log-probs / confidences [b, L] and per sequence the stop
    cut (0 = length finish), the finish flag and the decode forwards run.

    Two compiled programs: the prefill hands the cache to the decode loop as whole arrays, which
    the loop splits into tiles. Compiled as one, XLA fuses the last layer's rotary embedding into
    the tiles and rounds it differently (log-probs move by up to 9e-6); apart, the outputs stay bit
    for bit those of the former single-array cache, which earlier runs and their recorded results
    used."""
    s = _prefill_jit(graphdef, params, prompt, prompt_len, done, shape=shape)
    return _decode_jit(graphdef, params, s, prompt_len, limit, keys, settings, shape=shape)
