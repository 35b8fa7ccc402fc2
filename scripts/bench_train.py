"""Training-step throughput, FLOPs and peak memory: gtpo_jax vs the original framework's layout in PyTorch.

Default workload (`--workload update`, issue 13): one GTPO sample, prompt 128 tokens, a response
of N tokens decoded exactly 2 tokens per forward in every block of 4 (so 2 rounds per block), the
real SDAR vocabulary (151 936, untied head), 4 layers, hidden 256, intermediate 768, 4 query /
2 key-value heads of 64, fp32.
  * reference: what the original framework computes, with transformers' Qwen3 (SDPA): for each
    round r a separate [noisy_r ; clean] forward of 2L tokens with a dense 2L×2L block-diffusion
    mask and full-vocabulary logits at every position, cross-entropy at round r's targets,
    backward per round, then clip + AdamW.
  * gtpo_jax: its real jitted update step (`make_update_step`: forward, backward, clip, AdamW):
    noisy copies share one clean pass, tiled attention without an L×L mask, log-probs only at
    the target slots.
Columns: tokens/s (response tokens per second of step time), the ratio, peak RSS, CPU seconds
per step (process time, all threads: a check on the wall-clock ratio when the machine is shared), and for
gtpo_jax the step's matmul FLOPs and MFU = FLOPs / step time / matmul peak, the peak being a
4096³ fp32 `jnp` matmul timed in the same process right after the step. FLOPs come from the
compiled step's optimized HLO (`hlo_flops.matmul_flops`: every dot, loops multiplied by their trip
counts, which XLA's own `cost_analysis()` counts once; that raw figure is printed too). Attention
FLOPs are those of the score / value / gradient matmuls of the (query tile, key tile) pairs the
kernel actually computes: tiles that no query of the tile can see are skipped at run time and
not counted; masked pairs inside a computed tile are counted. Recomputation in the backward
(vocabulary chunks, attention scores) is counted: these are executed FLOPs, not model FLOPs.

gtpo_jax's process runs as its trainer CLI does, with glibc's malloc on transparent huge pages
(`gtpo_jax.cli.reexec_with_hugepage_malloc`); the reference as it is, or with the same malloc
setting under `--ref-hugepages`.

`--workload legacy` keeps the earlier comparison (SFT and GTPO, L/4 prompt, one token per forward,
vocabulary 32 768). Each (implementation, length) runs in a fresh subprocess; peak RSS is that
process's maximum, and a process that passes `--rss-cap-gb` is stopped and reported as such.
Usage: python scripts/bench_train.py [--lengths 1024 2048 4096 8192] [--impls jax torch]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time

import numpy as np

MODEL = dict(hidden_size=256, intermediate_size=768, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64)
B = 4
MASK = 1
WORKLOADS = {  # vocab, prompt length (None: L/4 of the total), tokens per forward, modes
    "update": dict(vocab=151936, prompt=128, per_forward=2, modes=["gtpo"]),
    "legacy": dict(vocab=32768, prompt=None, per_forward=1, modes=["sft", "gtpo"]),
}
PEAK_N = 4096


def synthetic_rollout(length: int, workload: dict, seed: int = 0):
    """(prompt, response, step map). `length` is the response length for the update workload and
    prompt + response for the legacy one. Inside each block the decoding order is random, with
    `per_forward` tokens committed per forward."""
    rng = np.random.default_rng(seed)
    vocab, per = workload["vocab"], workload["per_forward"]
    p = workload["prompt"] if workload["prompt"] is not None else length // 4
    r = length if workload["prompt"] is not None else length - p
    prompt, response = rng.integers(2, vocab, p), rng.integers(2, vocab, r)
    steps, counter = [], 0
    for start in range(0, r, B):
        n = min(B, r - start)
        rounds = -(-n // per)
        order = rng.permutation(n)
        block = np.empty(n, int)
        block[order] = counter + 1 + np.arange(n) // per
        counter += rounds
        steps.extend(block.tolist())
    return prompt, response, np.array(steps)


def _rss_guard(cap_gb: float) -> None:
    """Stop this process (exit 3) when its resident memory passes the cap."""
    page = os.sysconf("SC_PAGE_SIZE")

    def watch():
        while True:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * page
            if rss > cap_gb * 2**30:
                print(f"RESULT {json.dumps({'error': f'RSS passed the {cap_gb} GB cap'})}", flush=True)
                os._exit(3)
            time.sleep(0.05)

    threading.Thread(target=watch, daemon=True).start()


def visible_tile_fraction(batch: dict, q_tile: int, kv_tile: int) -> float:
    """Fraction of (query tile, key tile) pairs of the training rows in which some query sees
    some key (model.attention's rule); the kernel skips the others."""
    seg, blk, cp = (np.asarray(batch[k]).reshape(-1, np.shape(batch[k])[-1]) for k in ("segment", "block", "copy"))
    length = seg.shape[1]
    q_tile, kv_tile = min(q_tile, -(-length // 8) * 8), min(kv_tile, -(-length // 8) * 8)
    seen = total = 0
    for s, b, c in zip(seg, blk, cp):
        vis = (s[:, None] == s[None, :]) & (s[None, :] > 0) & (
            ((c[None, :] == 0) & (b[None, :] < b[:, None])) | ((c[None, :] == c[:, None]) & (b[None, :] == b[:, None])))
        lq, lk = -(-length // q_tile) * q_tile, -(-length // kv_tile) * kv_tile
        vis = np.pad(vis, ((0, lq - length), (0, lk - length)))
        tiles = vis.reshape(lq // q_tile, q_tile, lk // kv_tile, kv_tile).any(axis=(1, 3))
        seen, total = seen + tiles.sum(), total + tiles.size
    return float(seen / total)


def matmul_peak() -> float:
    """FLOP/s of a large fp32 matmul in this process (best of 3)."""
    import jax
    import jax.numpy as jnp

    a = jnp.ones((PEAK_N, PEAK_N), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * PEAK_N**3 / best


# ------------------------------------------------------------------------------------ JAX --
def build_jax_step(mode: str, length: int, workload: dict):
    """The jitted update step of this workload (not compiled), its inputs and the attention tile:
    (step, params, opt_state, batch, response, tile). scripts/profile_train.py profiles the same."""
    import jax
    from flax import nnx

    from gtpo_jax.config import Config
    from gtpo_jax.data.tokenizer import TokenIds
    from gtpo_jax.layout import trajectory_layout
    from gtpo_jax.model import ModelConfig, init_model
    from gtpo_jax.trainers.common import make_optimizer, make_update_step
    from gtpo_jax.rollout.base import Rollout
    from gtpo_jax.trainers.gtpo_objective import build_gtpo_batch, gtpo_loss_fn
    from gtpo_jax.trainers.sft import build_sft_batch, sft_layouts, sft_loss_fn

    cfg = Config(stage=mode)
    vocab, chunk, tile = workload["vocab"], 512, cfg.model.attn_q_tile  # the config's attention tile
    cfg.block_size = B
    cfg.train.vocab_chunk = chunk
    if workload.get("saved_logits_mb") is not None:
        cfg.train.vocab_saved_logits_mb = workload["saved_logits_mb"]
    # the config's setting; a --base-checkout older than the setting gets no such argument
    saved = {"saved_logits_mb": cfg.train.vocab_saved_logits_mb} if hasattr(cfg.train, "vocab_saved_logits_mb") else {}
    model = init_model(ModelConfig.tiny(vocab_size=vocab, tie_word_embeddings=False, **MODEL, attn_q_tile=tile,
                                        attn_kv_tile=cfg.model.attn_kv_tile), seed=0)
    graphdef, params = nnx.split(model)
    tx, _ = make_optimizer(cfg.optim, 10)
    opt_state = tx.init(params)
    prompt, response, step_map = synthetic_rollout(length, workload)
    if mode == "sft":
        cfg.data.max_len = len(prompt) + len(response)
        ids = TokenIds(block_size=cfg.block_size, mask_id=MASK, pad_id=0, stop_ids=())
        layouts = sft_layouts([(prompt, response)], cfg, ids, step=0)
        cfg.train.row_len = -(-layouts[0].length // 512) * 512
        batch, _ = build_sft_batch(layouts, cfg)
        loss_fn = sft_loss_fn(chunk, **saved)
    else:
        rollout = Rollout(prompt, response, step_map, logprobs=None, advantage=1.0)
        need = trajectory_layout(prompt, response, step_map, block_size=B, mask_id=MASK).length
        batch = build_gtpo_batch([rollout], block_size=B, mask_id=MASK, shrink=1, loss_norm="round_mean",
                                 micro_batches=1, row_len=-(-need // 512) * 512, vocab_chunk=chunk).arrays
        loss_fn = gtpo_loss_fn(eps_low=0.2, eps_high=0.28, beta=0.0, use_old_logprobs=False, tis_cap=0.0,
                               vocab_chunk=chunk, **saved)
    step = jax.jit(make_update_step(graphdef, tx, loss_fn), donate_argnums=(0, 1))
    return step, params, opt_state, batch, response, tile


def run_jax(mode: str, length: int, steps: int, workload: dict) -> dict:
    import jax
    from hlo_flops import matmul_flops

    step, params, opt_state, batch, response, tile = build_jax_step(mode, length, workload)
    compiled = step.lower(params, opt_state, batch).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    raw = compiled.cost_analysis()
    raw = raw[0] if isinstance(raw, list) else raw
    tiles = visible_tile_fraction(batch, tile, tile)
    flops = matmul_flops(compiled.as_text(), conditional_weight=tiles)
    params, opt_state, m = compiled(params, opt_state, batch)
    jax.block_until_ready(m)
    if steps == 0:  # memory only: one step, no timing
        return {"xla_temp_mb": temp / 2**20, "row_tokens": int(batch["tokens"].shape[-1]), "loss": float(m["loss"])}
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        params, opt_state, m = compiled(params, opt_state, batch)
    jax.block_until_ready(m)
    dt, cpu = (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps
    peak = matmul_peak()
    return {"tokens_per_s": len(response) / dt, "step_s": dt, "cpu_s": cpu, "xla_temp_mb": temp / 2**20, "flops": flops,
            "xla_cost_analysis_flops": raw.get("flops"), "visible_tiles": tiles, "peak_flops": peak,
            "mfu": flops / dt / peak, "row_tokens": int(batch["tokens"].shape[-1]), "loss": float(m["loss"])}


# -------------------------------------------------------------------------------- PyTorch --
def run_torch(mode: str, length: int, steps: int, workload: dict) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3Config(vocab_size=workload["vocab"], hidden_size=MODEL["hidden_size"],
                      intermediate_size=MODEL["intermediate_size"], num_hidden_layers=MODEL["num_layers"],
                      num_attention_heads=MODEL["num_heads"], num_key_value_heads=MODEL["num_kv_heads"],
                      head_dim=MODEL["head_dim"], tie_word_embeddings=False, attn_implementation="sdpa")
    model = Qwen3ForCausalLM(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    prompt, response, step_map = synthetic_rollout(length, workload)
    clean = torch.tensor(np.concatenate([prompt, response]))
    p, total = len(prompt), len(prompt) + len(response)

    # [noisy ; clean] block-diffusion mask, dense 2L×2L (the original's layout)
    blk = torch.arange(total) // B
    noisy_sees_noisy = blk[:, None] == blk[None, :]
    noisy_sees_clean = blk[:, None] > blk[None, :]
    clean_sees_clean = blk[:, None] >= blk[None, :]
    top = torch.cat([noisy_sees_noisy, noisy_sees_clean], 1)
    bottom = torch.cat([torch.zeros_like(noisy_sees_noisy), clean_sees_clean], 1)
    allowed = torch.cat([top, bottom], 0)
    mask = torch.zeros(2 * total, 2 * total).masked_fill(~allowed, float("-inf"))[None, None]
    position_ids = torch.cat([torch.arange(total), torch.arange(total)])[None]

    if mode == "sft":
        rng = np.random.default_rng(0)
        masked = np.zeros(total, bool)
        masked[p:] = rng.random(total - p) < 0.5
        rounds = [(masked, masked)]
    else:  # round r masks, per block, the tokens of step >= the block's r-th step; targets = r-th step
        steps_full = np.full(total, -1)
        steps_full[p:] = step_map
        rounds = []
        for r in range(B):
            m, t = np.zeros(total, bool), np.zeros(total, bool)
            for start in range(p - p % B, total, B):
                sl = slice(start, start + B)
                distinct = np.unique(steps_full[sl][steps_full[sl] >= 0])
                if r < len(distinct):
                    m[sl] = steps_full[sl] >= distinct[r]
                    t[sl] = steps_full[sl] == distinct[r]
            if t.any():
                rounds.append((m, t))

    def one_step():
        opt.zero_grad()
        for m, t in rounds:
            noisy = clean.clone()
            noisy[torch.from_numpy(m)] = MASK
            ids = torch.cat([noisy, clean])[None]
            logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits  # full vocab
            target = torch.from_numpy(t)
            loss = torch.nn.functional.cross_entropy(logits[0, :total][target], clean[target])
            loss.backward()
            del logits
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return float(loss)

    one_step()
    t0, c0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = one_step()
    dt, cpu = (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps
    return {"tokens_per_s": len(response) / dt, "step_s": dt, "cpu_s": cpu, "loss": loss, "forwards": len(rounds)}


def child(args) -> None:
    if args.impl == "jax" or args.ref_hugepages:  # as `python -m gtpo_jax.train` runs: huge-page malloc
        from gtpo_jax.cli import reexec_with_hugepage_malloc
        reexec_with_hugepage_malloc()
    if args.rss_cap_gb:
        _rss_guard(args.rss_cap_gb)
    run = run_jax if args.impl == "jax" else run_torch
    result = run(args.mode, args.length, args.steps, dict(WORKLOADS[args.workload], saved_logits_mb=args.saved_logits_mb))
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


def run_child(impl: str, mode: str, length: int, args) -> dict:
    """impl "jax", "torch", or "base": gtpo_jax imported from --base-checkout (e.g. a worktree of
    an earlier commit), for before/after ratios measured in one run."""
    env = dict(os.environ)
    if impl == "base":
        impl, env["PYTHONPATH"] = "jax", os.path.abspath(args.base_checkout)
    cmd = [sys.executable, __file__, "--impl", impl, "--mode", mode, "--length", str(length), "--steps",
           str(args.steps), "--workload", args.workload, "--rss-cap-gb", str(args.rss_cap_gb)]
    cmd += ["--ref-hugepages"] if args.ref_hugepages else []
    cmd += ["--saved-logits-mb", str(args.saved_logits_mb)] if args.saved_logits_mb is not None else []
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if line:
        return json.loads(line[0][7:])
    return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="update")
    ap.add_argument("--mode", choices=["sft", "gtpo", "both"], default=None,
                    help="legacy workload only (the update workload is GTPO)")
    ap.add_argument("--lengths", type=int, nargs="+", default=None,
                    help="response tokens (update; default 1024 2048 4096 8192) or total tokens (legacy)")
    ap.add_argument("--impls", nargs="+", choices=["jax", "torch", "base"], default=["jax", "torch"])
    ap.add_argument("--base-checkout", help="impl 'base': a checkout whose gtpo_jax is timed as 'base'")
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step (0: peak memory only)")
    ap.add_argument("--rss-cap-gb", type=float, default=12.0, help="stop a process whose RSS passes this (0: none)")
    ap.add_argument("--ref-hugepages", action="store_true",
                    help="run the reference with glibc's huge-page malloc too (gtpo_jax's trainer always does)")
    ap.add_argument("--saved-logits-mb", type=int, default=None,
                    help="gtpo_jax's train.vocab_saved_logits_mb (default: the config's; 0: the backward recomputes the logits)")
    ap.add_argument("--impl", choices=["jax", "torch"], help=argparse.SUPPRESS)
    ap.add_argument("--length", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # hlo_flops, next to this script
    workload = WORKLOADS[args.workload]
    if args.impl:
        args.mode = args.mode or workload["modes"][0]
        return child(args)
    lengths = args.lengths or ([1024, 2048, 4096, 8192] if args.workload == "update" else [1024, 2048, 4096])
    modes = workload["modes"] if args.mode in (None, "both") else [args.mode]
    print(f"workload {args.workload}: model {MODEL}, vocab {workload['vocab']}, block {B}, prompt "
          f"{workload['prompt'] or 'L/4'}, {workload['per_forward']} token(s) per forward, fp32, one sample")
    print(f"{'mode':5} {'L':>6} | {'jax tok/s':>9} {'ref tok/s':>9} {'ratio':>6} | {'jax RSS MB':>10} "
          f"{'ref RSS MB':>10} | {'jax cpu-s':>9} {'ref cpu-s':>9} | {'GFLOP':>7} {'XLA c_a GF':>10} {'vis.tiles':>9} {'peak GF/s':>9} {'MFU':>6}")
    for mode in modes:
        for length in lengths:
            res = {impl: run_child(impl, mode, length, args) for impl in args.impls}
            j, t, b = res.get("jax", {}), res.get("torch", {}), res.get("base", {})

            def f(d, k, fmt):
                return format(d[k], fmt) if k in d else "-"

            ratio = f"{j['tokens_per_s'] / t['tokens_per_s']:.2f}x" if "tokens_per_s" in j and "tokens_per_s" in t else "-"
            mfu = f"{100 * j['mfu']:.1f}%" if "mfu" in j else "-"
            print(f"{mode:5} {length:>6} | {f(j, 'tokens_per_s', '9.1f')} {f(t, 'tokens_per_s', '9.1f')} {ratio:>6} | "
                  f"{f(j, 'peak_rss_mb', '10.0f')} {f(t, 'peak_rss_mb', '10.0f')} | "
                  f"{f(j, 'cpu_s', '9.1f')} {f(t, 'cpu_s', '9.1f')} | "
                  f"{j['flops'] / 1e9 if 'flops' in j else float('nan'):7.0f} "
                  f"{(j.get('xla_cost_analysis_flops') or float('nan')) / 1e9:10.0f} {f(j, 'visible_tiles', '9.2f')} "
                  f"{j['peak_flops'] / 1e9 if 'peak_flops' in j else float('nan'):9.0f} {mfu:>6}", flush=True)
            if b:
                vs = (f", {b['tokens_per_s'] / t['tokens_per_s']:.2f}x the reference" if "tokens_per_s" in t else "")
                print(f"      base: {f(b, 'tokens_per_s', '.1f')} tok/s{vs}, {f(b, 'cpu_s', '.1f')} cpu-s, "
                      f"RSS {f(b, 'peak_rss_mb', '.0f')} MB, {b.get('flops', float('nan')) / 1e9:.0f} GFLOP, MFU "
                      + (f"{100 * b['mfu']:.1f}%" if "mfu" in b else "-"), flush=True)
            for impl, r in res.items():
                if "error" in r:
                    print(f"      {impl}: {r['error']}", flush=True)


if __name__ == "__main__":
    main()
