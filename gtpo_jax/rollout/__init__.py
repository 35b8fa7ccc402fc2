"""Rollout engines behind one interface (`RolloutBackend`), built from a `RolloutSpec` (decoding
settings, token ids, model config, HF assets): the JAX sampler, or LMDeploy.

The LMDeploy bridge (`gtpo_jax.rollout.lmdeploy_backend`) imports LMDeploy itself only when an
engine is built (LMDeploy is a GPU-only dependency), so importing this package needs no LMDeploy.
"""

from __future__ import annotations

import jax
from flax import nnx

from gtpo_jax.checkpoint import load_model
from gtpo_jax.model.config import ModelRuntime, runtime_options
from gtpo_jax.rollout import lmdeploy_backend
from gtpo_jax.rollout.base import Rollout, RolloutBackend, RolloutSpec
from gtpo_jax.rollout.jax_backend import JaxRollout
from gtpo_jax.rollout.split import ProcessSplitRollout
from gtpo_jax.sharding import MeshConfig, build_mesh, shard_model

__all__ = ["Rollout", "RolloutBackend", "RolloutSpec", "make_eval_backend", "make_rollout_backend"]


def _check_backend(spec: RolloutSpec) -> None:
    if spec.decoding.backend not in ("jax", "lmdeploy"):
        raise ValueError(f"unknown decoding.backend {spec.decoding.backend!r}; use 'jax' or 'lmdeploy'")


def make_rollout_backend(spec: RolloutSpec, model: nnx.Module, *, tokenizer=None, mesh=None, work_dir: str,
                         sleep_during_update: bool = False, check_memory=None) -> RolloutBackend:
    """A training run's rollout engine for the policy `model` (its live parameters): the JAX sampler
    shares them; LMDeploy starts on an export of them under `work_dir` (one engine per process),
    after `check_memory()` (the GPU memory plan) has passed."""
    _check_backend(spec)
    if spec.decoding.backend == "jax":
        return JaxRollout.from_spec(spec, model, tokenizer=tokenizer, mesh=mesh)
    backend = lmdeploy_backend.make_backend(spec, nnx.state(model), tokenizer=tokenizer, work_dir=work_dir,
                                            sleep_during_update=sleep_during_update,
                                            check_memory=check_memory)
    if jax.process_count() > 1:  # one engine per process (node): each generates its share
        backend = ProcessSplitRollout(backend)
    return backend


def make_eval_backend(spec: RolloutSpec, model_path: str | None, *, runtime: ModelRuntime, mesh: MeshConfig,
                      tokenizer, work_dir: str) -> RolloutBackend:
    """`python -m gtpo_jax.evaluate`'s engine for the model at `model_path` (HF directory or Orbax
    checkpoint), run with `runtime`'s dtypes: the JAX sampler on a `mesh`, or LMDeploy, which reads
    an HF directory itself (an Orbax checkpoint is exported to `<work_dir>/lmdeploy_model` first)."""
    _check_backend(spec)
    if not model_path:
        raise ValueError("evaluation needs model.path (an HF directory or an Orbax checkpoint)")
    if spec.decoding.backend == "lmdeploy":
        return lmdeploy_backend.make_backend_for_eval(spec, model_path, tokenizer=tokenizer, work_dir=work_dir,
                                                      dtype=runtime.dtype)
    model = load_model(model_path, **runtime_options(runtime))
    model.cfg.check_block_size(spec.ids.block_size, source=model_path)
    device_mesh = build_mesh(mesh)
    shard_model(model, device_mesh)
    return JaxRollout.from_spec(spec, model, tokenizer=tokenizer, mesh=device_mesh)
