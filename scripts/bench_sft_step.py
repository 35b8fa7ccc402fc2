"""Where an SFT step's time goes: host-side batch building vs the jitted update, in CPU seconds.

Builds the SFT pieces of a config (default configs/sft_tiny.yaml, the CPU demo) like
`gtpo_jax.trainers.sft` does, then for `--steps` steps:
  * data: the next batch of tokenized samples;
  * host: sft_layouts + build_sft_batch (numpy), timed alone;
  * device: the compiled update on those batches (after one warm-up per shape), timed alone with
    block_until_ready;
and prints per-step wall and process CPU seconds of each (CPU seconds are the number to compare
on a shared machine), the batch shapes seen, and the first steps' losses (`--losses FILE` writes
them as JSON, to compare two versions of the code).
Usage: python scripts/bench_sft_step.py [--config configs/sft_tiny.yaml] [--steps 20] [key=value ...]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
import time

import jax
import numpy as np

from gtpo_jax.config import Config
from gtpo_jax.config_loader import load_config
from gtpo_jax.trainers.session import TrainingSession
from gtpo_jax.trainers.sft import build_sft_batch, sft_layouts, sft_loss_fn


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/sft_tiny.yaml")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--losses", help="write the steps' losses (the update run in order from init) here")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    out_dir = tempfile.mkdtemp(prefix="bench_sft_")
    cfg = load_config(Config, args.config, [f"output_dir={out_dir}", "eval.enabled=false",
                                            "checkpoint.save_every=100000", *args.overrides])
    session = TrainingSession(cfg, make_data=TrainingSession.sft_data)
    session.compile_step(sft_loss_fn(cfg.train.vocab_chunk, cfg.train.vocab_saved_logits_mb))
    batches = session.data.batches(cfg.train.batch_size)
    host, data = np.zeros(2), np.zeros(2)
    built = []
    for step in range(1, args.steps + 1):
        (samples, _), wall, cpu = _timed(lambda: next(batches))
        data += (wall, cpu)

        def build(step=step, samples=samples):
            layouts = sft_layouts(samples, cfg, session.ids, step=step)
            return build_sft_batch(layouts, cfg, rows_multiple=session.data_parallel)[0]

        arrays, wall, cpu = _timed(build)
        host += (wall, cpu)
        built.append(arrays)
    shapes = collections.Counter((a["tokens"].shape, a["target_index"].shape) for a in built)
    # warm-up: one compile per shape, on copies of the initial state (the measured run starts from init)
    params0 = jax.tree.map(lambda x: x.copy(), session.params)
    opt0 = jax.tree.map(lambda x: x.copy(), session.opt_state)
    seen = set()
    for arrays in built:
        key = tuple(v.shape for v in arrays.values())
        if key not in seen:
            seen.add(key)
            session.update(arrays)
    session.params, session.opt_state = params0, opt0
    losses, dev = [], np.zeros(2)
    for arrays in built:
        metrics, wall, cpu = _timed(lambda arrays=arrays: session.update(arrays))
        dev += (wall, cpu)
        losses.append(metrics["loss"])
    session.close({})
    n = args.steps
    print(f"shapes (tokens, targets): {dict(shapes)}")
    print(f"host  data : {data[0] / n:.3f} s/step wall, {data[1] / n:.3f} CPU-s/step (tokenized samples)")
    print(f"host  build: {host[0] / n:.3f} s/step wall, {host[1] / n:.3f} CPU-s/step")
    print(f"device step: {dev[0] / n:.3f} s/step wall, {dev[1] / n:.3f} CPU-s/step")
    print("losses:", " ".join(f"{x:.6f}" for x in losses[:10]), "...")
    if args.losses:
        with open(args.losses, "w") as f:
            json.dump(losses, f)


if __name__ == "__main__":
    sys.exit(main())
