"""HF safetensors names ⇄ NNX parameter paths, one tensor at a time.

HF stores projections as [out, in]; we store them input-major with heads split out
(q: [hidden, heads, head_dim], o: [heads, head_dim, hidden]) so that sharding rules can name
each dimension. Both directions are exact reshapes/transposes: a round trip is bit-exact.
The rules are data (PER_LAYER_RULES, GLOBAL_RULES, _LAYOUTS), read by both directions.
"""

from __future__ import annotations

import re
from typing import Callable, Iterator, NamedTuple

import numpy as np

from gtpo_jax.model.config import ModelConfig

Path = tuple[str, ...]


class CheckpointMismatchError(ValueError):
    """A checkpoint tensor that does not fit the configured architecture."""


class TensorRule(NamedTuple):
    """One tensor: its HF name (after `model.layers.<i>.` for per-layer ones), its NNX path (after
    `layers/<i>/`), its HF shape in the dimension names of `_dims`, and how NNX lays it out."""

    hf_name: str
    nnx_path: Path
    hf_shape: tuple[str, ...]
    layout: str  # a key of _LAYOUTS


PER_LAYER_RULES = (
    TensorRule("input_layernorm.weight", ("input_layernorm", "weight"), ("hidden",), "as_is"),
    TensorRule("post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), ("hidden",), "as_is"),
    TensorRule("self_attn.q_proj.weight", ("self_attn", "q_proj"), ("q_heads*head_dim", "hidden"), "heads_out"),
    TensorRule("self_attn.k_proj.weight", ("self_attn", "k_proj"), ("kv_heads*head_dim", "hidden"), "heads_out"),
    TensorRule("self_attn.v_proj.weight", ("self_attn", "v_proj"), ("kv_heads*head_dim", "hidden"), "heads_out"),
    TensorRule("self_attn.o_proj.weight", ("self_attn", "o_proj"), ("hidden", "q_heads*head_dim"), "heads_in"),
    TensorRule("self_attn.q_norm.weight", ("self_attn", "q_norm", "weight"), ("head_dim",), "as_is"),
    TensorRule("self_attn.k_norm.weight", ("self_attn", "k_norm", "weight"), ("head_dim",), "as_is"),
    TensorRule("mlp.gate_proj.weight", ("mlp", "gate_proj"), ("intermediate", "hidden"), "transposed"),
    TensorRule("mlp.up_proj.weight", ("mlp", "up_proj"), ("intermediate", "hidden"), "transposed"),
    TensorRule("mlp.down_proj.weight", ("mlp", "down_proj"), ("hidden", "intermediate"), "transposed"),
)
GLOBAL_RULES = (
    TensorRule("model.embed_tokens.weight", ("embed_tokens",), ("vocab", "hidden"), "as_is"),
    TensorRule("model.norm.weight", ("norm", "weight"), ("hidden",), "as_is"),
    TensorRule("lm_head.weight", ("lm_head",), ("vocab", "hidden"), "transposed"),  # absent with tied embeddings
)

# layout -> (HF [out, in] -> NNX, NNX -> HF). HF stores projections as [out, in]; NNX input-major,
# with the heads split out where the projection has them.
_LAYOUTS: dict[str, tuple[Callable, Callable]] = {
    "as_is": (lambda t, cfg: t, lambda a, cfg: a),
    "transposed": (lambda t, cfg: t.T, lambda a, cfg: a.T),
    # q/k/v: [heads·d, hidden] -> [hidden, heads, d]
    "heads_out": (lambda t, cfg: t.T.reshape(cfg.hidden_size, -1, cfg.head_dim),
                  lambda a, cfg: a.reshape(cfg.hidden_size, -1).T),
    # o: [hidden, heads·d] -> [heads, d, hidden]
    "heads_in": (lambda t, cfg: t.T.reshape(-1, cfg.head_dim, cfg.hidden_size),
                 lambda a, cfg: a.reshape(-1, cfg.hidden_size).T),
}

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_BY_HF = {r.hf_name: r for r in PER_LAYER_RULES}
_GLOBAL_BY_HF = {r.hf_name: r for r in GLOBAL_RULES}
_LAYER_BY_PATH = {r.nnx_path: r for r in PER_LAYER_RULES}
_GLOBAL_BY_PATH = {r.nnx_path: r for r in GLOBAL_RULES}


def _dims(cfg: ModelConfig) -> dict[str, int]:
    return {
        "hidden": cfg.hidden_size, "intermediate": cfg.intermediate_size, "vocab": cfg.vocab_size,
        "head_dim": cfg.head_dim, "q_heads*head_dim": cfg.num_heads * cfg.head_dim,
        "kv_heads*head_dim": cfg.num_kv_heads * cfg.head_dim,
    }


def _rule_of(name: str, cfg: ModelConfig) -> tuple[TensorRule, Path]:
    """The rule of HF tensor `name` and the NNX path it goes to."""
    m = _LAYER_RE.match(name)
    if m is None:
        if name not in _GLOBAL_BY_HF:
            raise CheckpointMismatchError(f"unexpected tensor {name!r}: not part of an SDAR/Qwen3 decoder")
        return _GLOBAL_BY_HF[name], _GLOBAL_BY_HF[name].nnx_path
    layer, suffix = m.groups()
    if suffix not in _LAYER_BY_HF or int(layer) >= cfg.num_layers:
        raise CheckpointMismatchError(f"unexpected tensor {name!r} for a {cfg.num_layers}-layer SDAR/Qwen3 model")
    return _LAYER_BY_HF[suffix], ("layers", layer) + _LAYER_BY_HF[suffix].nnx_path


def hf_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The shape `name` must have in an HF checkpoint of this architecture."""
    dims = _dims(cfg)
    return tuple(dims[d] for d in _rule_of(name, cfg)[0].hf_shape)


def check_hf_shape(name: str, shape: tuple[int, ...], cfg: ModelConfig, *, config: str = "config.json",
                   weights: str = "the weights") -> None:
    """CheckpointMismatchError unless HF tensor `name` has the shape `cfg` implies."""
    want = hf_shape(name, cfg)
    if tuple(shape) != want:
        raise CheckpointMismatchError(f"tensor {name!r} has shape {tuple(shape)} but {config} implies {want}; "
                                      f"{weights} and {config} do not belong together")


def expected_hf_names(cfg: ModelConfig) -> list[str]:
    names = ["model.embed_tokens.weight"]
    for i in range(cfg.num_layers):
        names += [f"model.layers.{i}.{rule.hf_name}" for rule in PER_LAYER_RULES]
    names.append("model.norm.weight")
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def hf_to_nnx(name: str, tensor: np.ndarray, cfg: ModelConfig) -> tuple[Path, np.ndarray]:
    """One HF tensor -> (NNX state path, array in our layout). Raises on unknown names/shapes."""
    rule, path = _rule_of(name, cfg)
    if name == "lm_head.weight" and cfg.tie_word_embeddings:
        raise CheckpointMismatchError("checkpoint has lm_head.weight but config.json says tie_word_embeddings=true")
    check_hf_shape(name, tensor.shape, cfg)
    return path, np.ascontiguousarray(_LAYOUTS[rule.layout][0](tensor, cfg))


def nnx_to_hf(path: Path, array: np.ndarray, cfg: ModelConfig) -> tuple[str, np.ndarray]:
    """Inverse of `hf_to_nnx`. Raises KeyError for a path with no HF counterpart."""
    path = tuple(str(p) for p in path)
    if path[0] == "layers":
        rule = _LAYER_BY_PATH[path[2:]]
        name = f"model.layers.{path[1]}.{rule.hf_name}"
    else:
        rule = _GLOBAL_BY_PATH[path]
        name = rule.hf_name
    return name, np.ascontiguousarray(_LAYOUTS[rule.layout][1](array, cfg))


def iter_nested(tree: dict, prefix: Path = ()) -> Iterator[tuple[Path, object]]:
    """Leaves of a nested dict with their key paths (keys as strings)."""
    for key, value in tree.items():
        if isinstance(value, dict):
            yield from iter_nested(value, prefix + (str(key),))
        else:
            yield prefix + (str(key),), value


def set_nested(tree: dict, path: Path, value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
