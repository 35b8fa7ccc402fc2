"""Packing of a real GTPO step: rows sized for the worst case vs rows fitted to the step's rollouts.

Loads a GTPO config (default: the CPU demo's, from its SFT checkpoint), draws one step's prompts,
generates their rollouts with the configured engine, lays the same rollouts out twice — rows of
`layout.gtpo_row_len` (every block decoded one token per forward, as before) and rows fitted by
`layout.fitted_row_shape` (now) — and times the jitted update step on each, in this one process
(compile excluded, the two layouts' updates alternated, median of --repeats). Useful tokens: the
rows the rollouts fill.
Usage: python scripts/bench_gtpo_packing.py [--config configs/gtpo_tiny.yaml] [key=value ...]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np

from gtpo_jax.config import Config
from gtpo_jax.config_loader import load_config
from gtpo_jax.data.pipeline import RLPromptSource
from gtpo_jax.layout import gtpo_row_len
from gtpo_jax.model import TokenLayout
from gtpo_jax.model.attention import tile_classes
from gtpo_jax.rounding import round_up
from gtpo_jax.trainers.gtpo import rollout_backend
from gtpo_jax.trainers.gtpo_objective import build_gtpo_batch, group_advantages, gtpo_loss_fn
from gtpo_jax.trainers.session import TrainingSession


def computed_pairs(arrays: dict, q_tile: int, kv_tile: int) -> tuple[float, float]:
    """Shares of the attention kernel's (query tile, key tile) pairs that are computed (not
    skipped): as the kernel classes them, one class per micro-batch, and had each row its own.
    Rows are padded and tiled as `block_causal_attention` does."""
    shared, per_row = [], []
    for mb in range(arrays["tokens"].shape[0]):
        layout = TokenLayout(*(np.asarray(arrays[k][mb]) for k in ("segment", "block", "copy")))
        q_ids, k_ids = (layout.pad(round_up(layout.segment.shape[1], t)).tiles(t) for t in (q_tile, kv_tile))
        shared.append(float(np.mean(np.asarray(tile_classes(q_ids, k_ids)) > 0)))
        one_row = [[TokenLayout(*(a[:, r : r + 1] for a in ids)) for ids in (q_ids, k_ids)]
                   for r in range(q_ids.segment.shape[1])]
        per_row.append(float(np.mean([np.mean(np.asarray(tile_classes(q, k)) > 0) for q, k in one_row])))
    return float(np.mean(shared)), float(np.mean(per_row))


def measure(session, cfg, repeats: int, steps: int) -> list[dict]:
    g = cfg.gtpo
    session.compile_step(gtpo_loss_fn(eps_low=g.eps_low, eps_high=g.eps_high, beta=0.0, use_old_logprobs=False,
                                      tis_cap=0.0, vocab_chunk=cfg.train.vocab_chunk,
                                      saved_logits_mb=cfg.train.vocab_saved_logits_mb))
    backend = rollout_backend(session, cfg)
    rows = []
    for step in range(steps):
        backend.update_params(session.params)  # the updates below donate the parameters it points at
        prompts = session.data.draw(g.num_task_per_step)
        groups = backend.generate([p.prompt_ids for p in prompts], g.num_response_per_task, seed=step)
        rng = np.random.default_rng(step)  # rewards do not change the layout; advantages only scale the loss
        advantages = group_advantages(rng.random((len(groups), g.num_response_per_task)))
        rollouts = [r for grp in groups for r in grp]
        for r, a in zip(rollouts, advantages.reshape(-1)):
            r.advantage = float(a)
        worst = gtpo_row_len(session.ids.block_size, cfg.decoding.max_new_tokens, max(len(r.prompt) for r in rollouts))
        layouts = {}
        for label, row_len in (("worst-case rows", worst), ("fitted rows", None)):
            layouts[label] = build_gtpo_batch(
                rollouts, block_size=session.ids.block_size, mask_id=session.ids.mask_id, shrink=g.shrink,
                loss_norm=g.loss_norm, micro_batches=cfg.train.micro_batches, vocab_chunk=cfg.train.vocab_chunk,
                row_len=row_len, max_row_len=worst, rows_multiple=session.data_parallel)
            session.update(layouts[label].arrays)  # compile (and warm up)
        times = {label: [] for label in layouts}
        for _ in range(repeats):  # alternated, so that both layouts see the same machine
            for label, batch in layouts.items():
                t = time.perf_counter()
                session.update(batch.arrays)
                times[label].append(time.perf_counter() - t)
        for label, batch in layouts.items():
            rows.append({"step": step, "layout": label, "shape": tuple(batch.arrays["tokens"].shape),
                         "targets": batch.arrays["target_valid"].shape[-1],
                         "packing_efficiency": batch.sample_tokens / batch.row_tokens,
                         "update_s": statistics.median(times[label]),
                         "pairs": computed_pairs(batch.arrays, *session.model_cfg.attention_tiles(
                             batch.arrays["tokens"].shape[-1])),
                         "response_tokens": int(sum(len(r.tokens) for r in rollouts))})
    backend.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/gtpo_tiny.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2, help="steps' worth of rollouts (different prompts)")
    args, overrides = ap.parse_known_args()
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(Config, args.config, [*overrides, f"output_dir={out}", "train.wandb_project="])
        session = TrainingSession(cfg, make_data=lambda s: RLPromptSource.from_files(
            cfg.data.train_files, s.tokenizer, seed=cfg.data.shuffle_seed, think=cfg.data.think))
        session.restore_or_init()
        rows = session.run(lambda s: measure(s, cfg, args.repeats, args.steps))
    print("| step | layout | rows × row_len (micro-batches) | targets | packing efficiency | attention pairs "
          "computed (per-row classes) | update s (median) | response tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        m, n, w = r["shape"]
        shared, per_row = r["pairs"]
        print(f"| {r['step']} | {r['layout']} | {n} × {w} ({m}) | {r['targets']} | {100 * r['packing_efficiency']:.1f}% "
              f"| {100 * shared:.0f}% ({100 * per_row:.0f}%) | {r['update_s']:.3f} | "
              f"{r['response_tokens'] / r['update_s']:.0f} |")
    for step in sorted({r["step"] for r in rows}):
        before, after = [r for r in rows if r["step"] == step]
        print(f"step {step}: fitted rows take {after['update_s'] / before['update_s']:.2f}× the update time "
              f"of worst-case rows")


if __name__ == "__main__":
    main()
