"""SDAR / Qwen3 decoder in Flax NNX (docs/algorithm.md §1).

Parameters carry ``logical_axes`` metadata; `gtpo_jax.sharding` maps them onto the mesh.
The model returns final-norm hidden states; `SDARModel.logits` projects to the vocabulary so
that trainers can project only the positions they score.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gtpo_jax.model.attention import TokenLayout, block_causal_attention
from gtpo_jax.model.config import ModelConfig
from gtpo_jax.model.kv_cache import KVCache, Tiles, cached_attention
from gtpo_jax.sharding import constrain_batch


class LayerKV(NamedTuple):
    """Keys/values of one layer, [batch, length, kv_heads, head_dim]."""

    k: jax.Array
    v: jax.Array


class LayerCache(NamedTuple):
    """One layer's view of a `KVCache`: its key and value tiles and the filled length [batch]."""

    k: Tiles
    v: Tiles
    length: jax.Array


@jax.custom_vjp
def linear(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., K] @ w [K, N]. Same values and gradients as `x @ w`; the custom backward orders
    the weight-gradient product so that XLA's CPU dot transposes the narrower of x and dy
    (autodiff's order has it copy a transposed [tokens, 768] MLP activation per matmul:
    the MLP's backward took 30% longer)."""
    return x @ w


def _linear_fwd(x, w):
    return x @ w, (x, w)


def _linear_bwd(res, dy):
    x, w = res
    x2, dy2 = x.reshape(-1, x.shape[-1]), dy.reshape(-1, dy.shape[-1])
    dx = jnp.einsum("tn,kn->tk", dy2, w).reshape(x.shape)
    if x2.shape[1] <= dy2.shape[1]:
        dw = jnp.einsum("tn,tk->nk", dy2, x2).T
    else:
        dw = jnp.einsum("tk,tn->kn", x2, dy2)
    return dx, dw.astype(w.dtype)


linear.defvjp(_linear_fwd, _linear_bwd)


def _param(rngs: nnx.Rngs, shape, axes, dtype, init=None):
    init = init or nnx.initializers.normal(0.02)
    return nnx.Param(init(rngs.params(), shape, dtype), logical_axes=axes)


def _ones(shape, axes, dtype):
    return nnx.Param(jnp.ones(shape, dtype), logical_axes=axes)


def take_rows(x: jax.Array, rows: jax.Array) -> jax.Array:
    """x[b, rows[b], ...] for x [batch, length, ...] and rows int [batch, n]."""
    return jnp.take_along_axis(x, rows.reshape(rows.shape + (1,) * (x.ndim - 2)), axis=1)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, axis_name: str, param_dtype):
        self.weight = _ones((dim,), (axis_name,), param_dtype)
        self.eps = eps

    def __call__(self, x):
        dtype = x.dtype
        x = x.astype(jnp.float32)
        x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(dtype) * x.astype(dtype)


def rope_inv_freq(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """Inverse frequencies and attention factor (HF's rope initialisation, incl. rope_scaling)."""
    dim, base = cfg.head_dim, cfg.rope_theta
    inv_freq = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = dict(cfg.rope_scaling or {})
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    attention_factor = 1.0
    if rope_type == "linear":
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type == "llama3":
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_ctx = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
        inv_freq = np.where(medium, smoothed, scaled)
    elif rope_type == "yarn":
        factor = scaling["factor"]
        old_ctx = scaling.get("original_max_position_embeddings", cfg.max_position_embeddings)
        beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

        def mscale(scale, m=1.0):
            return 0.1 * m * math.log(scale) + 1.0 if scale > 1 else 1.0

        if scaling.get("attention_factor") is not None:
            attention_factor = scaling["attention_factor"]
        elif scaling.get("mscale") and scaling.get("mscale_all_dim"):
            attention_factor = mscale(factor, scaling["mscale"]) / mscale(factor, scaling["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)

        def correction_dim(rotations):
            return dim * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

        lo = max(math.floor(correction_dim(beta_fast)), 0)
        hi = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - lo) / (hi - lo), 0, 1)
        extrapolation = 1 - ramp
        inv_freq = (inv_freq / factor) * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq.astype(np.float32), float(attention_factor)


class Rope(NamedTuple):
    """Rotary tables of a forward's tokens: cos and sin [batch, length, head_dim] float32, scaled by
    the attention factor, shared by every layer's queries and keys. A sampler builds them once for
    all positions of its cache and gathers each forward's rows (`at`): computed from positions, XLA
    evaluates cos/sin inside every query and key fusion, per head and layer (5% of a decode step on
    a CPU)."""

    cos: jax.Array
    sin: jax.Array

    @classmethod
    def of(cls, cfg: ModelConfig, positions: jax.Array) -> "Rope":
        inv_freq, attention_factor = rope_inv_freq(cfg)
        freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [b, l, d/2]
        emb = jnp.concatenate([freqs, freqs], axis=-1)
        return cls(jnp.cos(emb) * attention_factor, jnp.sin(emb) * attention_factor)

    def at(self, positions: jax.Array) -> "Rope":
        """The tables of `positions` [b, l] from a table of one row of consecutive positions from 0."""
        return Rope(self.cos[0][positions], self.sin[0][positions])

    def rows(self, rows: jax.Array) -> "Rope":
        return Rope(take_rows(self.cos, rows), take_rows(self.sin, rows))


def apply_rope(x, rope: Rope):
    """x [b, l, h, d]; rotate-half convention of HF Qwen3."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = rope.cos[:, :, None, :], rope.sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        h, n, kvn, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = _param(rngs, (h, n, d), ("embed", "q_heads", "head_dim"), pd)
        self.k_proj = _param(rngs, (h, kvn, d), ("embed", "kv_heads", "head_dim"), pd)
        self.v_proj = _param(rngs, (h, kvn, d), ("embed", "kv_heads", "head_dim"), pd)
        self.o_proj = _param(rngs, (n, d, h), ("q_heads", "head_dim", "embed"), pd)
        self.q_norm = RMSNorm(d, cfg.rms_norm_eps, "head_dim", pd)
        self.k_norm = RMSNorm(d, cfg.rms_norm_eps, "head_dim", pd)
        self.cfg = cfg

    def __call__(self, x, rope: Rope, layout: TokenLayout, cache: LayerCache | None, rows=None):
        """Attention output of every token, or with `rows` [batch, n] of those tokens only (every
        token's keys and values are computed: they are attended)."""
        dt = x.dtype
        q_x, q_rope, q_layout = x, rope, layout
        if rows is not None:
            q_x, q_rope = take_rows(x, rows), rope.rows(rows)
            q_layout = TokenLayout(*(take_rows(a, rows) for a in layout))

        def project(x, w):  # x [b, l, hidden] @ w [hidden, heads, head_dim] -> [b, l, heads, head_dim]
            return linear(x, w.reshape(w.shape[0], -1).astype(dt)).reshape(*x.shape[:2], *w.shape[1:])

        q, k, v = project(q_x, self.q_proj[...]), project(x, self.k_proj[...]), project(x, self.v_proj[...])
        q = apply_rope(self.q_norm(q), q_rope)
        k = apply_rope(self.k_norm(k), rope)
        if cache is None:
            q_tile, kv_tile = self.cfg.attention_tiles(x.shape[1])  # by the row's length (the kernel clips to rows=)
            out = block_causal_attention(q, k, v, q_layout, layout, q_tile=q_tile, kv_tile=kv_tile)
        else:
            out = cached_attention(q, k, v, q_layout, tuple(t.astype(dt) for t in cache.k),
                                   tuple(t.astype(dt) for t in cache.v), cache.length, kv_layout=layout)
        o_proj = self.o_proj[...]
        o = linear(out.reshape(*out.shape[:2], -1), o_proj.reshape(-1, o_proj.shape[-1]).astype(dt))
        return o, LayerKV(k, v)


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        h, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = _param(rngs, (h, f), ("embed", "mlp"), pd)
        self.up_proj = _param(rngs, (h, f), ("embed", "mlp"), pd)
        self.down_proj = _param(rngs, (f, h), ("mlp", "embed"), pd)

    def __call__(self, x):
        dt = x.dtype
        gate = linear(x, self.gate_proj[...].astype(dt))
        up = linear(x, self.up_proj[...].astype(dt))
        return linear(jax.nn.silu(gate) * up, self.down_proj[...].astype(dt))


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", pd)
        self.self_attn = Attention(cfg, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", pd)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, rope: Rope, layout, context, rows=None):
        attn_out, new_kv = self.self_attn(self.input_layernorm(x), rope, layout, context, rows)
        if rows is not None:
            x = take_rows(x, rows)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, new_kv


_REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class SDARModel(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pd = jnp.dtype(cfg.param_dtype)
        self.cfg = cfg
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), pd)
        self.layers = nnx.List([DecoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "norm", pd)
        if not cfg.tie_word_embeddings:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), pd)

    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        layout: TokenLayout,
        cache: KVCache | None = None,
    ) -> tuple[jax.Array, tuple[LayerKV, ...]]:
        """tokens, positions int [batch, length] -> (final hidden [batch, length, hidden],
        per-layer keys/values of these tokens). `cache` holds keys/values of earlier clean blocks
        that every token sees (a sampler's)."""
        rope = Rope.of(self.cfg, positions)
        x, kvs = self.run_layers(self.embed(tokens), rope, layout, range(self.cfg.num_layers), cache)
        return self.norm(x), kvs

    def embed(self, tokens: jax.Array) -> jax.Array:
        """Input embeddings [batch, length, hidden] in the compute dtype."""
        return constrain_batch(jnp.take(self.embed_tokens[...], tokens, axis=0).astype(jnp.dtype(self.cfg.dtype)))

    def run_layers(self, x: jax.Array, rope: Rope, layout: TokenLayout, layers: range, cache: KVCache | None = None,
                   rows: jax.Array | None = None) -> tuple[jax.Array, tuple[LayerKV, ...]]:
        """The decoder layers `layers` on hidden states x [batch, length, hidden] -> (their output,
        their keys/values of these tokens). With `rows` [batch, n] (token indices) the last of them
        computes queries, attention output and MLP for those tokens only, whose states come back
        [batch, n, hidden]: a sampler reads the final states of a few slots of a block, and
        every token's keys and values are needed anyway."""
        new_kvs = []
        for i in layers:
            layer, layer_rows = self.layers[i], rows if i == layers[-1] else None
            layer_ctx = None if cache is None else LayerCache(cache.k[i], cache.v[i], cache.length)
            if self.cfg.remat != "none" and cache is None:  # remat serves gradients; decoding has none
                call = nnx.remat(
                    lambda lyr, x, rope, lay, ctx, r: lyr(x, rope, lay, ctx, r),
                    policy=_REMAT_POLICIES[self.cfg.remat],
                )
                x, kv = call(layer, x, rope, layout, layer_ctx, layer_rows)
            else:
                x, kv = layer(x, rope, layout, layer_ctx, layer_rows)
            x = constrain_batch(x)
            new_kvs.append(kv)
        return x, tuple(new_kvs)

    def head_weight(self) -> jax.Array:
        """[hidden, vocab] output projection (the embedding's transpose when tied)."""
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens[...].T
        return self.lm_head[...]

    def logits(self, hidden: jax.Array) -> jax.Array:
        """Full-vocabulary logits in float32 for the given hidden states."""
        return jnp.einsum(
            "...d,dv->...v", hidden, self.head_weight().astype(hidden.dtype), preferred_element_type=jnp.float32
        )


def init_model(cfg: ModelConfig, seed: int = 0) -> SDARModel:
    return SDARModel(cfg, nnx.Rngs(params=seed))
