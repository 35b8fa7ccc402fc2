"""Pieces both trainers share: model/optimizer construction and the jitted update step.

The update is a pure function (params, opt_state, micro_batches) -> (params, opt_state,
metrics): gradients are accumulated over the leading micro-batch axis with `lax.scan`, then one
AdamW step is applied — unless the loss or gradient norm is not finite, in which case the
step is skipped (parameters and optimizer state unchanged) and reported in the metrics.
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from gtpo_jax.checkpoint import load_model
from gtpo_jax.config import Config, OptimSection
from gtpo_jax.model import ModelConfig, SDARModel, init_model
from gtpo_jax.model.config import runtime_options

log = logging.getLogger("gtpo_jax")

LossFn = Callable[[SDARModel, dict], tuple[jax.Array, dict]]


def build_model(cfg: Config, vocab_size: int | None = None) -> SDARModel:
    """The starting model: from `model.path` (HF dir or Orbax checkpoint) or a random preset."""
    runtime = runtime_options(cfg.model)
    if cfg.model.path:
        model = load_model(cfg.model.path, **runtime)
    else:
        preset = getattr(ModelConfig, cfg.model.preset)
        overrides = dict(cfg.model.preset_overrides)
        if vocab_size is not None:
            overrides.setdefault("vocab_size", vocab_size)
        overrides.setdefault("block_size", cfg.block_size)
        model = init_model(preset(**overrides, **runtime), seed=cfg.model.init_seed)
    model.cfg.check_block_size(cfg.block_size, source=cfg.model.path or "the model preset")
    if vocab_size is not None and vocab_size > model.cfg.vocab_size:
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens but the model's vocabulary holds {model.cfg.vocab_size}; "
            "use the tokenizer that belongs to the checkpoint"
        )
    return model


def make_optimizer(opt: OptimSection, total_updates: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """AdamW (+ global-norm clip) with `opt`'s schedule over `total_updates` optimizer updates —
    optax advances a schedule once per update, so a run with several updates per training step
    must pass steps × updates per step (`Config.updates_per_step`)."""
    if opt.lr is None:
        raise ValueError("optim.lr is unset; Config resolves it to the stage's default")
    if opt.schedule == "constant":
        schedule = optax.constant_schedule(opt.lr)
    else:
        schedule = optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=opt.lr,
            warmup_steps=max(opt.warmup_steps, 1),
            decay_steps=max(total_updates, opt.warmup_steps + 1),
            end_value=opt.lr * opt.min_lr_ratio,
        )
    chain = []
    if opt.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(opt.clip_norm))
    chain.append(
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay)
    )
    return optax.chain(*chain), schedule


# Auxiliary metrics are summed over micro-batches, except *_max / *_min.
_AUX_COMBINE = {"max": jnp.maximum, "min": jnp.minimum}
_AUX_INIT = {"max": -jnp.inf, "min": jnp.inf}


def schedule_count(opt_state) -> jax.Array:
    """Optimizer updates applied so far: the count the learning-rate schedule is evaluated at."""
    is_state = lambda x: isinstance(x, optax.ScaleByScheduleState)  # noqa: E731
    states = [s for s in jax.tree.leaves(opt_state, is_leaf=is_state) if is_state(s)]
    if len(states) != 1:
        raise ValueError(f"expected one learning-rate schedule in the optimizer state, found {len(states)}")
    return states[0].count


def make_update_step(graphdef, tx: optax.GradientTransformation, loss_fn: LossFn, schedule=None):
    """Build the pure update step. `loss_fn(model, micro_batch) -> (loss, aux sums)` where the
    loss of a micro-batch is already weighted so that the sum over micro-batches is the step's
    loss (weights computed on the host over the whole step). With `schedule`, the metrics hold
    `lr`: the learning rate this update applies (the schedule at the optimizer's own count)."""

    def step(params, opt_state, batches):
        def micro_step(carry, micro_batch):
            grads, loss_sum, aux_sum = carry

            def objective(p):
                return loss_fn(nnx.merge(graphdef, p), micro_batch)

            (loss, aux), g = jax.value_and_grad(objective, has_aux=True)(params)
            grads = jax.tree.map(lambda a, b: a + b.astype(a.dtype), grads, g)
            aux_sum = {k: _AUX_COMBINE.get(k.rsplit("_", 1)[-1], jnp.add)(aux_sum[k], v) for k, v in aux.items()}
            return (grads, loss_sum + loss, aux_sum), None

        first = jax.tree.map(lambda x: x[0], batches)
        if jax.tree.leaves(batches)[0].shape[0] == 1:
            # one micro-batch: no accumulator (zero-filling and adding a gradient the size of the
            # embedding and head costs more than the AdamW update of it)
            (loss, aux), grads = jax.value_and_grad(
                lambda p: loss_fn(nnx.merge(graphdef, p), first), has_aux=True)(params)
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
        else:
            zero_grads = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
            aux_shape = jax.eval_shape(lambda p: loss_fn(nnx.merge(graphdef, p), first)[1], params)
            zero_aux = {k: jnp.full(s.shape, _AUX_INIT.get(k.rsplit("_", 1)[-1], 0), s.dtype)
                        for k, s in aux_shape.items()}
            (grads, loss, aux), _ = jax.lax.scan(micro_step, (zero_grads, jnp.float32(0.0), zero_aux), batches)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, new_opt_state = tx.update(grads, opt_state, params)
        new_params = optax.apply_updates(params, jax.tree.map(lambda u, p: u.astype(p.dtype), updates, params))
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
        metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": (~finite).astype(jnp.int32), **aux}
        if schedule is not None:
            metrics["lr"] = jnp.asarray(schedule(schedule_count(opt_state)), jnp.float32)
        return keep(new_params, params), keep(new_opt_state, opt_state), metrics

    return step


class BadStepGuard:
    """Counts consecutive non-finite steps and stops the run after `limit` of them."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_a_row = 0

    def check(self, step: int, metrics: dict) -> None:
        # A step without an update (GTPO: no group kept) has no "skipped": nothing was non-finite.
        if int(metrics.get("skipped", 0)):
            self.in_a_row += 1
            log.warning(
                "step %d: non-finite loss (%s) or gradient norm (%s); update skipped (%d in a row)",
                step, float(metrics["loss"]), float(metrics["grad_norm"]), self.in_a_row,
            )
            if self.in_a_row >= self.limit:
                raise FloatingPointError(
                    f"{self.in_a_row} consecutive steps had a non-finite loss or gradient (last: step {step}); "
                    "lower optim.lr, enable optim.clip_norm, or check the data and the checkpoint for NaNs"
                )
        else:
            self.in_a_row = 0
