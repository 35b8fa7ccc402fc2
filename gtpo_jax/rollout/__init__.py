"""Rollout engines behind one interface (`RolloutBackend`): the JAX sampler, or LMDeploy.

The LMDeploy bridge (`gtpo_jax.rollout.lmdeploy_backend`) imports LMDeploy itself only when an
engine is built (LMDeploy is a GPU-only dependency), so importing this package needs no LMDeploy.
"""

from __future__ import annotations

import dataclasses

import jax

from gtpo_jax.checkpoint import load_model
from gtpo_jax.rollout import lmdeploy_backend
from gtpo_jax.rollout.base import Rollout, RolloutBackend
from gtpo_jax.rollout.jax_backend import JaxRollout
from gtpo_jax.rollout.split import ProcessSplitRollout
from gtpo_jax.sharding import MeshConfig, build_mesh, shard_model

__all__ = ["Rollout", "RolloutBackend", "make_rollout_backend", "make_rollout_backend_for_eval"]


def make_rollout_backend(cfg, session) -> RolloutBackend:
    """The training run's rollout engine (`cfg.rollout.backend`); the JAX one shares the
    session's live model and mesh."""
    if cfg.rollout.backend == "lmdeploy":
        backend = lmdeploy_backend.make_backend(cfg, session)
        if jax.process_count() > 1:  # one engine per process (node): each generates its share
            backend = ProcessSplitRollout(backend)
        return backend
    if cfg.rollout.backend != "jax":
        raise ValueError(f"unknown rollout.backend {cfg.rollout.backend!r}; use 'jax' or 'lmdeploy'")
    return JaxRollout.from_config(session.model(), session.tokenizer, cfg.rollout, block_size=cfg.block_size,
                                  mesh=session.mesh, stop_ids=session.stop_ids, mask_id=session.mask_id)


def make_rollout_backend_for_eval(cfg, tokenizer) -> RolloutBackend:
    """The engine of `python -m gtpo_jax.evaluate`: the model at `cfg.model.path` with the runtime
    options of `cfg.model`, decoding greedily when `cfg.greedy`."""
    if cfg.rollout.backend == "lmdeploy":
        return lmdeploy_backend.make_backend_for_eval(cfg, tokenizer)
    if cfg.rollout.backend != "jax":
        raise ValueError(f"unknown rollout.backend {cfg.rollout.backend!r}; use 'jax' or 'lmdeploy'")
    if not cfg.model.path:
        raise ValueError("evaluation needs model.path (an HF directory or an Orbax checkpoint)")
    m = cfg.model
    model = load_model(m.path, param_dtype=m.param_dtype, dtype=m.dtype, remat=m.remat,
                       attn_q_tile=m.attn_q_tile, attn_kv_tile=m.attn_kv_tile)
    model.cfg.check_block_size(cfg.block_size, source=m.path)
    mesh = build_mesh(MeshConfig(**dataclasses.asdict(cfg.mesh)))
    shard_model(model, mesh)
    return JaxRollout.from_config(model, tokenizer, cfg.rollout, block_size=cfg.block_size, greedy=cfg.greedy,
                                  mesh=mesh)
