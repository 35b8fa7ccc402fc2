"""Stage 1: supervised fine-tuning with random block masking (docs/algorithm.md §4)."""

from __future__ import annotations

import logging
import os
import time
from typing import Collection, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from gtpo_jax.config import Config
from gtpo_jax.data.tokenizer import TokenIds
from gtpo_jax.layout import PackedBatch, SampleLayout, sft_layout
from gtpo_jax.losses import target_logprobs
from gtpo_jax.packing import split_evenly, stack_micro_batches
from gtpo_jax.rounding import round_up
from gtpo_jax.trainers.session import TrainingSession

log = logging.getLogger("gtpo_jax")


def sft_loss_fn(vocab_chunk: int, saved_logits_mb: float = 0):
    """Σ −w_t·l_t over valid targets. With w_t = 1 / (targets of t's sample · samples with targets)
    this is the mean over samples of each sample's mean NLL (docs/algorithm.md §4); the weights are
    global so that micro-batches add up to the full-batch loss."""

    def loss_fn(model, mb):
        logprobs = target_logprobs(model, mb, vocab_chunk=vocab_chunk, saved_logits_mb=saved_logits_mb)
        valid = mb["target_valid"]
        loss = -(jnp.where(valid, mb["weight"] * logprobs, 0.0)).sum()
        aux = {
            "masked_tokens": valid.sum().astype(jnp.int32),
            "nll_sum": -(jnp.where(valid, logprobs, 0.0)).sum(),
        }
        return loss, aux

    return loss_fn


def sft_layouts(
    samples: Sequence[tuple[Sequence[int], Sequence[int]]], cfg: Config, ids: TokenIds, *, step: int
) -> list[SampleLayout]:
    """Masked noisy copies for one step. The masks come from a generator seeded by (seed, step),
    so a resumed run draws exactly the masks of an uninterrupted one."""
    rng = np.random.default_rng([cfg.train.seed, step])
    m = cfg.masking
    return [
        sft_layout(
            prompt,
            response,
            block_size=ids.block_size,
            mask_id=ids.mask_id,
            pad_id=ids.pad_id,
            rng=rng,
            lower_p=m.lower_p,
            upper_p=m.upper_p,
            mask_sampling=m.mask_sampling,
            post_num=m.post_num,
            num_noisy_copies=m.num_noisy_copies,
        )
        for prompt, response in samples
    ]


def per_sample_mean_weights(layouts: Sequence[SampleLayout], packed: PackedBatch, num_samples: int) -> np.ndarray:
    """w_t = 1 / (targets of t's sample × samples in the step): Σ w_t·nll_t is the mean over
    samples of each sample's mean NLL. Samples without any target contribute nothing."""
    per_sample = np.array([lay.num_targets for lay in layouts], np.float64)  # once per sample, not per target
    counts = per_sample[packed.target_sample[packed.target_valid]]
    return (1.0 / (counts * max(num_samples, 1))).astype(np.float32)


def sft_row_len(cfg: Config) -> int:
    """Enough for the longest allowed sample: its clean tokens plus each noisy copy of its
    response blocks (up to one extra block for the partial first block and the post_num pads)."""
    if cfg.train.row_len:
        return cfg.train.row_len
    b, m = cfg.block_size, cfg.masking
    copies = m.num_noisy_copies * (cfg.data.max_len + m.post_num + 2 * b)
    return round_up(cfg.data.max_len + copies, 128)


def build_sft_batch(layouts: list[SampleLayout], cfg: Config, rows_multiple: int = 1,
                    known_shapes: Collection[tuple[int, int, int]] = ()) -> tuple[dict, dict]:
    """Stacked micro-batches with per-target weights; stats for the metrics. `known_shapes`: the
    (rows, row_len, targets) shapes earlier steps used (compiled), reused when they cost little more."""
    with_targets = sum(1 for lay in layouts if lay.num_targets)
    groups = split_evenly(layouts, cfg.train.micro_batches)
    arrays, _ = stack_micro_batches(
        groups,
        lambda g, packed: {"weight": per_sample_mean_weights(groups[g], packed, with_targets)},
        block_size=cfg.block_size,
        row_len=sft_row_len(cfg),
        rows_multiple=rows_multiple,
        vocab_chunk=cfg.train.vocab_chunk,
        min_rows=cfg.train.rows_per_micro_batch,
        known_shapes=known_shapes,
    )
    stats = {
        "samples": len(layouts),
        "samples_without_targets": len(layouts) - with_targets,
        "tokens": int(sum(len(lay.clean) for lay in layouts)),
    }
    return arrays, stats


def run_sft(cfg: Config) -> dict:
    """The SFT stage end to end; returns the final metrics (and held-out accuracy if evaluated)."""
    session = TrainingSession(cfg, make_data=TrainingSession.sft_data)
    return session.run(lambda s: _train(s, cfg))  # on an error: checkpoint in flight finished, directory released


def _train(session, cfg: Config) -> dict:
    data = session.data
    loss_fn = sft_loss_fn(cfg.train.vocab_chunk, cfg.train.vocab_saved_logits_mb)
    session.compile_step(loss_fn)
    start = session.restore_or_init(data_state_setter=data.set_state)
    session.evaluate_if_due(start, force=start == 0, label="before")
    batches = data.batches(cfg.train.batch_size)
    last, shapes = {}, set()
    for step in session.progress(start, cfg.train.steps):
        samples, data_stats = next(batches)
        t0 = time.perf_counter()
        layouts = sft_layouts(samples, cfg, session.ids, step=step)
        arrays, stats = build_sft_batch(layouts, cfg, rows_multiple=session.data_parallel, known_shapes=shapes)
        shapes.add((*arrays["tokens"].shape[1:], arrays["target_valid"].shape[1]))
        metrics = session.update(arrays)
        elapsed = time.perf_counter() - t0
        metrics.update(stats)
        metrics.update(data_stats)
        metrics["tokens_per_s"] = stats["tokens"] / elapsed
        metrics["mean_nll"] = float(metrics.pop("nll_sum")) / max(int(metrics["masked_tokens"]), 1)
        last = session.finish_step(step, metrics, data_state=data.get_state(),
                                   keys=["loss", "lr", "grad_norm", "tokens_per_s", "masked_tokens"])
    return session.close(last)
