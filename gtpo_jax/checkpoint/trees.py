"""The array trees a checkpoint stores: parameters as plain nested dicts, restore targets.

Parameters are stored as a plain nested dict (not an `nnx.State`, whose leaves would gain a
`.value` level) so that checkpoints converted from HF and checkpoints written by the trainers
have one layout, readable without building the model first.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from gtpo_jax.model.params import CheckpointMismatchError, iter_nested


def _stringify(tree: Any) -> Any:
    return {str(k): _stringify(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def param_tree(params: Any) -> dict:
    """The stored form of parameters: a nested dict with string keys (nnx.State included)."""
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    return _stringify(params)


def abstract_tree(tree: Any) -> Any:
    """ShapeDtypeStructs (keeping each jax array's sharding) so restoring allocates only the result."""

    def leaf(x):
        if isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        return x

    return jax.tree.map(leaf, tree)


def check_json(meta: Mapping[str, Any]) -> None:
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint meta must be JSON-serialisable (store arrays via extra_arrays): {e}") from None


def stored_arrays(item_dir: str) -> Any:
    """The tree stored in `item_dir` as ShapeDtypeStructs without sharding (i.e. restore as numpy)."""
    handler = ocp.StandardCheckpointHandler()
    try:
        tree = handler.metadata(epath.Path(item_dir)).tree
    finally:
        handler.close()
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)


def checked_params_target(stored: Any, target: Any, step: int) -> Any:
    """The abstract form of `target` once every stored parameter matches it by name and shape
    (CheckpointMismatchError naming the first that does not)."""
    want = abstract_tree(param_tree(target))
    stored_leaves, want_leaves = dict(iter_nested(stored)), dict(iter_nested(want))
    for path in sorted(set(stored_leaves) | set(want_leaves)):
        name = ".".join(path)
        if path not in stored_leaves:
            raise CheckpointMismatchError(f"checkpoint step {step} lacks parameter {name}")
        if path not in want_leaves:
            raise CheckpointMismatchError(f"checkpoint step {step} has parameter {name}, which the model lacks")
        if tuple(stored_leaves[path].shape) != tuple(want_leaves[path].shape):
            raise CheckpointMismatchError(
                f"parameter {name} has shape {tuple(stored_leaves[path].shape)} in checkpoint step {step}, "
                f"the model expects {tuple(want_leaves[path].shape)}; the checkpoint belongs to another model"
            )
    return want
