"""Held-out greedy accuracy of a checkpoint after moving every parameter by ±delta: the size of one
Adam step at learning rate delta, in a direction that is not the policy gradient's. Tells damage
by a step's size from damage by its direction (README, "The CPU demo, measured").

python scripts/probe_perturbation.py runs/tiny/sft/checkpoints --config runs/tiny/gtpo/config.yaml \\
    --mode random --deltas 2e-4 1e-3

--mode random: an independent sign per coordinate; rank1: sign(u_i)·sign(v_j) per matrix, the
sign pattern of a rank-1 gradient u vᵀ (one token's gradient of a linear layer), which moves the
layer's outputs coherently. Two draws (seeds 0 and 1) per delta, plus the unmoved model.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
from flax import nnx

from gtpo_jax.checkpoint import load_model
from gtpo_jax.config import Config
from gtpo_jax.config_loader import load_config
from gtpo_jax.data.tokenizer import load_tokenizer, resolve_token_ids
from gtpo_jax.evaluate import evaluate_model


def moved(x, key, delta: float, mode: str):
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return x
    if mode == "random" or x.ndim < 2:
        return x + delta * jnp.sign(jax.random.normal(key, x.shape)).astype(x.dtype)
    ku, kv = jax.random.split(key)
    u = jnp.sign(jax.random.normal(ku, x.shape[:-1] + (1,)))
    v = jnp.sign(jax.random.normal(kv, (1,) * (x.ndim - 1) + x.shape[-1:]))
    return x + delta * (u * v).astype(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="checkpoint root or HF directory (e.g. runs/tiny/sft/checkpoints)")
    ap.add_argument("--config", default="runs/tiny/gtpo/config.yaml", help="a GTPO run's config: eval questions, decoding")
    ap.add_argument("--mode", choices=["random", "rank1"], default="random")
    ap.add_argument("--deltas", type=float, nargs="+", default=[2e-4, 1e-3])
    args = ap.parse_args()
    cfg = load_config(Config, args.config, [])
    tokenizer = load_tokenizer(cfg.tokenizer.path)
    for delta, seed in [(0.0, 0)] + [(d, s) for d in args.deltas for s in (0, 1)]:
        graph, state = nnx.split(load_model(args.model))
        leaves, tree = jax.tree_util.tree_flatten(state)
        keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
        model = nnx.merge(graph, jax.tree_util.tree_unflatten(tree, [moved(x, k, delta, args.mode)
                                                                     for x, k in zip(leaves, keys)]))
        summary = evaluate_model(model, tokenizer, cfg, resolve_token_ids(tokenizer, cfg.block_size))
        print(json.dumps({"mode": args.mode, "delta": delta, "seed": seed, "held_out_accuracy": summary["accuracy"],
                          "tokens_per_forward": round(summary["tokens_per_forward"], 3)}), flush=True)


if __name__ == "__main__":
    main()
