"""The SDAR / Qwen3 block-diffusion decoder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gtpo_jax.model.attention import TokenLayout, block_causal_attention, visibility
from gtpo_jax.model.config import ModelConfig, ModelConfigError
from gtpo_jax.model.kv_cache import KVCache, split_tiles
from gtpo_jax.model.params import CheckpointMismatchError
from gtpo_jax.model.sdar import LayerKV, Rope, SDARModel, init_model

__all__ = [
    "CheckpointMismatchError",
    "KVCache",
    "LayerKV",
    "ModelConfig",
    "ModelConfigError",
    "Rope",
    "SDARModel",
    "TokenLayout",
    "block_causal_attention",
    "init_model",
    "model_from_params",
    "params_of",
    "split_tiles",
    "visibility",
]


def params_of(model: SDARModel) -> dict:
    """The model's parameters as a nested dict with string keys (our checkpoint tree)."""

    def stringify(tree):
        return {str(k): stringify(v) for k, v in tree.items()} if isinstance(tree, dict) else tree

    return stringify(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def model_from_params(cfg: ModelConfig, params: dict) -> SDARModel:
    """Build a model around existing parameters (no random init), casting to cfg.param_dtype.

    Fails naming the tensor when a parameter is missing or has the wrong shape.
    """
    model = nnx.eval_shape(lambda: SDARModel(cfg, nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    for path, var in nnx.to_flat_state(state):
        node = params
        key_path = tuple(str(p) for p in path)
        for key in key_path:
            if not isinstance(node, dict) or key not in node:
                raise CheckpointMismatchError(f"checkpoint lacks parameter {'.'.join(key_path)}")
            node = node[key]
        expected = var.shape if hasattr(var, "shape") else var.get_value().shape
        if tuple(node.shape) != tuple(expected):
            raise CheckpointMismatchError(
                f"parameter {'.'.join(key_path)} has shape {tuple(node.shape)}, model expects {tuple(expected)}"
            )
        var.set_value(jnp.asarray(node, dtype=jnp.dtype(cfg.param_dtype)))
    nnx.update(model, state)
    return model
