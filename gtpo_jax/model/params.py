"""HF safetensors names ⇄ NNX parameter paths, one tensor at a time.

HF stores projections as [out, in]; we store them input-major with heads split out
(q: [hidden, heads, head_dim], o: [heads, head_dim, hidden]) so that sharding rules can name
each dimension. Both directions are exact reshapes/transposes: a round trip is bit-exact.
"""

from __future__ import annotations

import re
from typing import Iterator

import numpy as np

from gtpo_jax.model.config import ModelConfig

Path = tuple[str, ...]

_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_PER_LAYER = {
    "input_layernorm.weight": ("input_layernorm", "weight"),
    "post_attention_layernorm.weight": ("post_attention_layernorm", "weight"),
    "self_attn.q_proj.weight": ("self_attn", "q_proj"),
    "self_attn.k_proj.weight": ("self_attn", "k_proj"),
    "self_attn.v_proj.weight": ("self_attn", "v_proj"),
    "self_attn.o_proj.weight": ("self_attn", "o_proj"),
    "self_attn.q_norm.weight": ("self_attn", "q_norm", "weight"),
    "self_attn.k_norm.weight": ("self_attn", "k_norm", "weight"),
    "mlp.gate_proj.weight": ("mlp", "gate_proj"),
    "mlp.up_proj.weight": ("mlp", "up_proj"),
    "mlp.down_proj.weight": ("mlp", "down_proj"),
}
_GLOBAL = {
    "model.embed_tokens.weight": ("embed_tokens",),
    "model.norm.weight": ("norm", "weight"),
    "lm_head.weight": ("lm_head",),
}
_PATH_TO_LAYER_NAME = {v: k for k, v in _PER_LAYER.items()}
_PATH_TO_GLOBAL_NAME = {v: k for k, v in _GLOBAL.items()}


class CheckpointMismatchError(ValueError):
    """A checkpoint tensor that does not fit the configured architecture."""


def hf_shape(name: str, cfg: ModelConfig) -> tuple[int, ...]:
    """The shape `name` must have in an HF checkpoint of this architecture."""
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    qd, kvd, d = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.head_dim
    shapes = {
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (qd, h),
        "self_attn.k_proj.weight": (kvd, h),
        "self_attn.v_proj.weight": (kvd, h),
        "self_attn.o_proj.weight": (h, qd),
        "self_attn.q_norm.weight": (d,),
        "self_attn.k_norm.weight": (d,),
        "mlp.gate_proj.weight": (f, h),
        "mlp.up_proj.weight": (f, h),
        "mlp.down_proj.weight": (h, f),
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    m = _LAYER_RE.match(name)
    return shapes[m.group(2) if m else name]


def expected_hf_names(cfg: ModelConfig) -> list[str]:
    names = ["model.embed_tokens.weight"]
    for i in range(cfg.num_layers):
        names += [f"model.layers.{i}.{suffix}" for suffix in _PER_LAYER]
    names.append("model.norm.weight")
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    return names


def hf_to_nnx(name: str, tensor: np.ndarray, cfg: ModelConfig) -> tuple[Path, np.ndarray]:
    """One HF tensor -> (NNX state path, array in our layout). Raises on unknown names/shapes."""
    m = _LAYER_RE.match(name)
    if m:
        layer, suffix = int(m.group(1)), m.group(2)
        if suffix not in _PER_LAYER or layer >= cfg.num_layers:
            raise CheckpointMismatchError(f"unexpected tensor {name!r} for a {cfg.num_layers}-layer SDAR/Qwen3 model")
        path = ("layers", str(layer)) + _PER_LAYER[suffix]
    elif name in _GLOBAL:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            raise CheckpointMismatchError("checkpoint has lm_head.weight but config.json says tie_word_embeddings=true")
        path = _GLOBAL[name]
    else:
        raise CheckpointMismatchError(f"unexpected tensor {name!r}: not part of an SDAR/Qwen3 decoder")
    want = hf_shape(name, cfg)
    if tuple(tensor.shape) != want:
        raise CheckpointMismatchError(
            f"tensor {name!r} has shape {tuple(tensor.shape)} but config.json implies {want}; "
            "the weights and config.json do not belong together"
        )
    h, d = cfg.hidden_size, cfg.head_dim
    leaf = path[-1]
    if leaf in ("q_proj", "k_proj", "v_proj"):
        tensor = tensor.T.reshape(h, -1, d)
    elif leaf == "o_proj":
        tensor = tensor.T.reshape(-1, d, h)
    elif leaf in ("gate_proj", "up_proj", "down_proj", "lm_head"):
        tensor = tensor.T
    return path, np.ascontiguousarray(tensor)


def nnx_to_hf(path: Path, array: np.ndarray, cfg: ModelConfig) -> tuple[str, np.ndarray]:
    """Inverse of `hf_to_nnx`. Raises KeyError for a path with no HF counterpart."""
    path = tuple(str(p) for p in path)
    if path[0] == "layers":
        name = f"model.layers.{path[1]}.{_PATH_TO_LAYER_NAME[path[2:]]}"
    else:
        name = _PATH_TO_GLOBAL_NAME[path]
    leaf = path[-1]
    if leaf in ("q_proj", "k_proj", "v_proj"):
        array = array.reshape(cfg.hidden_size, -1).T
    elif leaf == "o_proj":
        array = array.reshape(-1, cfg.hidden_size).T
    elif leaf in ("gate_proj", "up_proj", "down_proj", "lm_head"):
        array = array.T
    return name, np.ascontiguousarray(array)


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
