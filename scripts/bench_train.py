"""Training-step throughput and peak memory: gtpo_jax vs the original framework's layout in PyTorch.

The baseline reproduces what the PyTorch framework computes, with transformers' Qwen3 (SDPA):
  * SFT: one sequence [noisy copy ; clean] of 2L tokens, a dense 2L×2L block-diffusion mask,
    full-vocabulary logits at every position, cross-entropy at the masked slots.
  * GTPO: for each round r (the r-th distinct step of every block) a separate [noisy_r ; clean]
    forward of 2L tokens — the clean half recomputed per copy — dense mask, full logits.
gtpo_jax runs its real jitted update step (noisy copies sharing one clean pass, tiled attention
without an L×L mask, log-probs only at target slots).

Each (implementation, length) runs in a fresh subprocess; peak RSS is that process's maximum.
Usage: python scripts/bench_train.py [--mode sft|gtpo|both] [--lengths 1024 2048 4096]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

MODEL = dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64)
VOCAB = 32768
B = 4
MASK = 1


def synthetic_rollout(length: int, seed: int = 0):
    """Prompt of L/4 tokens, response of 3L/4 decoded one token per forward in random order
    inside each block (the costliest trajectory: B rounds per block)."""
    rng = np.random.default_rng(seed)
    p = length // 4
    r = length - p
    prompt = rng.integers(2, VOCAB, p)
    response = rng.integers(2, VOCAB, r)
    steps, counter = [], 0
    for start in range(0, r, B):
        n = min(B, r - start)
        order = rng.permutation(n)
        block = np.empty(n, int)
        block[order] = np.arange(counter + 1, counter + n + 1)
        counter += n
        steps.extend(block.tolist())
    return prompt, response, np.array(steps)


# ------------------------------------------------------------------------------------ JAX --
def run_jax(mode: str, length: int, steps: int) -> dict:
    import jax
    from flax import nnx

    from gtpo_jax.config import Config
    from gtpo_jax.model import ModelConfig, init_model
    from gtpo_jax.trainers.common import make_optimizer, make_update_step
    from gtpo_jax.data.tokenizer import TokenIds
    from gtpo_jax.rollout.base import Rollout
    from gtpo_jax.trainers.gtpo_objective import build_gtpo_batch, gtpo_loss_fn
    from gtpo_jax.trainers.sft import build_sft_batch, sft_layouts, sft_loss_fn

    cfg = Config(stage=mode)
    cfg.block_size = B
    cfg.train.vocab_chunk = 512
    cfg.data.max_len = length
    model = init_model(ModelConfig.tiny(vocab_size=VOCAB, tie_word_embeddings=False, **MODEL, attn_q_tile=512,
                                        attn_kv_tile=512), seed=0)
    graphdef, params = nnx.split(model)
    tx, _ = make_optimizer(cfg.optim, 10)
    opt_state = tx.init(params)
    prompt, response, step_map = synthetic_rollout(length)
    if mode == "sft":
        ids = TokenIds(block_size=cfg.block_size, mask_id=MASK, pad_id=0, stop_ids=())
        layouts = sft_layouts([(prompt, response)], cfg, ids, step=0)
        cfg.train.row_len = -(-layouts[0].length // 512) * 512
        batch, _ = build_sft_batch(layouts, cfg)
        loss_fn = sft_loss_fn(cfg.train.vocab_chunk)
    else:
        rollout = Rollout(prompt, response, step_map, logprobs=None, advantage=1.0)
        from gtpo_jax.layout import trajectory_layout

        need = trajectory_layout(prompt, response, step_map, block_size=B, mask_id=MASK).length
        batch = build_gtpo_batch([rollout], block_size=B, mask_id=MASK, shrink=1, loss_norm="round_mean",
                                    micro_batches=1, row_len=-(-need // 512) * 512, vocab_chunk=512).arrays
        loss_fn = gtpo_loss_fn(eps_low=0.2, eps_high=0.28, beta=0.0, use_old_logprobs=False, tis_cap=0.0,
                               vocab_chunk=512)
    step = jax.jit(make_update_step(graphdef, tx, loss_fn), donate_argnums=(0, 1))
    compiled = step.lower(params, opt_state, batch).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    params, opt_state, m = compiled(params, opt_state, batch)
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for _ in range(steps):
        params, opt_state, m = compiled(params, opt_state, batch)
    jax.block_until_ready(m)
    dt = (time.perf_counter() - t0) / steps
    return {"tokens_per_s": length / dt, "step_s": dt, "xla_temp_mb": temp / 2**20,
            "row_tokens": int(batch["tokens"].shape[-1]), "loss": float(m["loss"])}


# -------------------------------------------------------------------------------- PyTorch --
def run_torch(mode: str, length: int, steps: int) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=VOCAB, hidden_size=MODEL["hidden_size"], intermediate_size=MODEL["intermediate_size"],
                      num_hidden_layers=MODEL["num_layers"], num_attention_heads=MODEL["num_heads"],
                      num_key_value_heads=MODEL["num_kv_heads"], head_dim=MODEL["head_dim"],
                      tie_word_embeddings=False, attn_implementation="sdpa")
    model = Qwen3ForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    prompt, response, step_map = synthetic_rollout(length)
    clean = torch.tensor(np.concatenate([prompt, response]))
    p = len(prompt)

    # [noisy ; clean] block-diffusion mask, dense 2L×2L (the original's layout)
    blk = torch.arange(length) // B
    noisy_sees_noisy = blk[:, None] == blk[None, :]
    noisy_sees_clean = blk[:, None] > blk[None, :]
    clean_sees_clean = blk[:, None] >= blk[None, :]
    top = torch.cat([noisy_sees_noisy, noisy_sees_clean], 1)
    bottom = torch.cat([torch.zeros_like(noisy_sees_noisy), clean_sees_clean], 1)
    allowed = torch.cat([top, bottom], 0)
    mask = torch.zeros(2 * length, 2 * length).masked_fill(~allowed, float("-inf"))[None, None]
    position_ids = torch.cat([torch.arange(length), torch.arange(length)])[None]

    if mode == "sft":
        rng = np.random.default_rng(0)
        masked = np.zeros(length, bool)
        masked[p:] = rng.random(length - p) < 0.5
        rounds = [masked]
    else:  # round r masks, per block, the tokens of step >= the block's r-th step; targets = r-th step
        steps_full = np.full(length, -1)
        steps_full[p:] = step_map
        rounds = []
        for r in range(B):
            m = np.zeros(length, bool)
            for start in range(p - p % B, length, B):
                sl = slice(start, start + B)
                distinct = np.unique(steps_full[sl][steps_full[sl] >= 0])
                if r < len(distinct):
                    m[sl] = steps_full[sl] >= distinct[r]
            rounds.append(m)

    def one_step():
        opt.zero_grad()
        for m in rounds:
            noisy = clean.clone()
            noisy[torch.from_numpy(m)] = MASK
            ids = torch.cat([noisy, clean])[None]
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits  # full vocab
            target = torch.from_numpy(m)
            loss = torch.nn.functional.cross_entropy(logits[0, :length][target], clean[target])
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss)

    one_step()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = one_step()
    dt = (time.perf_counter() - t0) / steps
    return {"tokens_per_s": length / dt, "step_s": dt, "loss": loss, "forwards": len(rounds)}


def child(args) -> None:
    result = (run_jax if args.impl == "jax" else run_torch)(args.mode, args.length, args.steps)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mode", choices=["sft", "gtpo", "both"], default="both")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--impl", choices=["jax", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.impl:
        args.mode = args.mode
        return child(args)
    modes = ["sft", "gtpo"] if args.mode == "both" else [args.mode]
    print(f"model: {MODEL}, vocab {VOCAB}, block {B}, fp32, batch 1 sample of L tokens (prompt L/4)")
    print(f"{'mode':5} {'L':>6} | {'jax tok/s':>10} {'torch tok/s':>11} {'speedup':>8} | "
          f"{'jax RSS MB':>10} {'torch RSS MB':>12} | {'jax XLA temp MB':>15}")
    for mode in modes:
        for length in args.lengths:
            res = {}
            for impl in ("jax", "torch"):
                cmd = [sys.executable, __file__, "--impl", impl, "--mode", mode, "--length", str(length),
                       "--steps", str(args.steps)]
                out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
                line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
                res[impl] = json.loads(line[0][7:]) if line else {"error": out.stderr.strip().splitlines()[-1:]}
            j, t = res["jax"], res["torch"]
            if "error" in j or "error" in t:
                print(f"{mode:5} {length:>6} | error: jax={j.get('error')} torch={t.get('error')}")
                continue
            print(f"{mode:5} {length:>6} | {j['tokens_per_s']:>10.1f} {t['tokens_per_s']:>11.1f} "
                  f"{j['tokens_per_s'] / t['tokens_per_s']:>7.2f}x | {j['peak_rss_mb']:>10.0f} "
                  f"{t['peak_rss_mb']:>12.0f} | {j['xla_temp_mb']:>15.1f}", flush=True)


if __name__ == "__main__":
    main()
