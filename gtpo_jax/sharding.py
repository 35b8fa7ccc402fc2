"""The device mesh and the rules that place parameters and batches on it — all in one place.

Mesh axes: ``data`` (pure data parallel), ``fsdp`` (data parallel with parameters sharded
along their ``embed`` dimension) and ``tensor`` (heads / MLP / vocabulary split). Parameters
declare logical axes (see `gtpo_jax.model.sdar`); `LOGICAL_RULES` maps them to mesh axes.
A dimension that a mesh axis does not divide stays replicated on that axis rather than
failing (e.g. 2 KV heads on a 4-way tensor axis), and this is logged once.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "vocab": "tensor",
    "embed": "fsdp",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "norm": None,
}


@dataclasses.dataclass
class MeshConfig:
    """Sizes of the mesh axes (the config tree's `mesh:` section); one of them may be -1 to take all
    remaining devices."""

    data: int = 1  # devices along the pure data-parallel mesh axis
    fsdp: int = -1  # devices along the parameter-sharded data axis; -1 = all the devices left
    tensor: int = 1  # devices along the tensor-parallel axis (heads, MLP width)


def build_mesh(cfg: MeshConfig | None = None, devices=None) -> Mesh:
    cfg = cfg or MeshConfig()
    devices = list(jax.devices() if devices is None else devices)
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got data={cfg.data} fsdp={cfg.fsdp} tensor={cfg.tensor}")
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices cannot be split into mesh axes {dict(zip(MESH_AXES, sizes))}")
        sizes[sizes.index(-1)] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices but {len(devices)} are available; "
            "set mesh sizes whose product is the device count (or use -1 for one axis)"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def _axis_size(mesh: Mesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


_warned: set = set()


def logical_to_spec(logical_axes, shape, mesh: Mesh, rules=None) -> P:
    rules = LOGICAL_RULES if rules is None else rules
    spec = []
    for name, dim in zip(logical_axes, shape):
        axes = rules.get(name)
        if axes is not None and dim % _axis_size(mesh, axes):
            key = (name, dim, axes)
            if key not in _warned:
                _warned.add(key)
                log.info("dimension %s=%d is not divisible by mesh axis %s; kept replicated", name, dim, axes)
            axes = None
        spec.append(axes)
    return P(*spec)


def param_shardings(model: nnx.Module, mesh: Mesh, rules=None):
    """nnx.State of NamedSharding matching the model's parameters."""
    state = nnx.state(model, nnx.Param)

    def to_sharding(var):
        axes = var.get_metadata().get("logical_axes")
        value = var.get_value()
        if axes is None:
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, logical_to_spec(axes, value.shape, mesh, rules))

    return jax.tree.map(to_sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def constrain_batch(x: jax.Array) -> jax.Array:
    """Pin an activation's leading (row) dimension to the data-parallel axes of the ambient mesh
    (`jax.set_mesh`); a no-op without one. FSDP needs it: left alone, XLA follows the weights'
    `embed` sharding into the activations and keeps every row of the batch on every device."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, P(BATCH_AXES, *([None] * (x.ndim - 1))))


def optimizer_shardings(tx: optax.GradientTransformation, params, mesh: Mesh):
    """Shardings of `tx.init(params)`: leaves shaped like a parameter (Adam's moments) follow
    that parameter's sharding, the rest (step counts) are replicated. Pass them as the init's
    out_shardings: left to itself XLA replicates the moments — zeros that depend on no input —
    on every device, 8 bytes per parameter per device."""
    shapes = jax.eval_shape(tx.init, params)
    param_sh = jax.tree.map(lambda x: x.sharding, params)
    return optax.tree_map_params(tx, lambda _, sharding: sharding, shapes, param_sh,
                                 transform_non_params=lambda _: NamedSharding(mesh, P()))


def put_global(x, sharding: NamedSharding) -> jax.Array:
    """A global array from a host value that every process holds in full: each process places
    only the pieces its own devices hold (one process: a plain device_put)."""
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def to_host(tree):
    """numpy copies of a pytree of (possibly multi-process) arrays, on every process."""

    def fetch(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree.map(fetch, tree)


def replicate_unsharded(tree, mesh: Mesh):
    """Place leaves that live on one device (e.g. the optimizer's step count) replicated on the
    mesh, so that a restore, which follows these shardings, never mixes device sets."""
    replicated = NamedSharding(mesh, P())

    def place(x):
        return x if isinstance(x.sharding, NamedSharding) else jax.device_put(x, replicated)

    return jax.tree.map(place, tree)


def shard_model(model: nnx.Module, mesh: Mesh, rules=None) -> nnx.Module:
    """Place the model's parameters on the mesh (in place) and return it. With several
    processes every one must hold the same values (a seeded init or the same checkpoint)."""
    state = nnx.state(model, nnx.Param)
    shardings = param_shardings(model, mesh, rules)
    if jax.process_count() == 1:
        placed = jax.device_put(state, shardings)
    else:
        placed = jax.tree.map(lambda v, s: v.replace(put_global(to_host(v.get_value()), s)), state, shardings,
                              is_leaf=lambda x: isinstance(x, nnx.Variable))
    nnx.update(model, placed)
    return model


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
    """Leading (batch) dimension split over the data-parallel axes, the rest replicated."""
    return NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def shard_batch(batch, mesh: Mesh):
    """device_put every array of a pytree with its leading dimension split over data axes.

    The leading dimension must be divisible by data×fsdp; pad batches before calling.
    """
    n = _axis_size(mesh, BATCH_AXES)

    def put(x):
        x = np.asarray(x)
        if x.shape[0] % n:
            raise ValueError(
                f"batch dimension {x.shape[0]} is not divisible by the data-parallel size {n} (data×fsdp); "
                "choose a batch size that is a multiple of it"
            )
        return put_global(x, batch_sharding(mesh, x.ndim))

    return jax.tree.map(put, batch)


def shard_micro_batches(arrays: dict, mesh: Mesh) -> dict:
    """Stacked micro-batches: token grids [micro, rows, L] split by rows over the data axes;
    per-target arrays [micro, T] (gather indices into the global grid) replicated."""
    n = _axis_size(mesh, BATCH_AXES)
    out = {}
    for name, x in arrays.items():
        x = np.asarray(x)
        if x.ndim == 3:
            if x.shape[1] % n:
                raise ValueError(f"{name}: {x.shape[1]} rows are not divisible by the data-parallel size {n}")
            out[name] = put_global(x, NamedSharding(mesh, P(None, BATCH_AXES, None)))
        else:
            out[name] = put_global(x, NamedSharding(mesh, P()))
    return out
