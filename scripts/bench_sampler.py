"""Generated tokens/s of the cached block-diffusion sampler vs a naive no-cache sampler.

Both decode the same random model (sharpened so that confidences spread over (0, 1)) with the
same rules; the naive one re-runs the block-causal forward over the whole prefix at every
step (prefix lengths bucketed to multiples of 128, all buckets compiled before timing). No stop
tokens, so every sequence generates exactly --new-tokens. Compilation is excluded from the
sampler's timing by a warm-up call with the same shapes.

    python scripts/bench_sampler.py                       # 4 layers, hidden 256, batch 16, 256 tokens
    python scripts/bench_sampler.py --new-tokens 1024     # longer generations
    python scripts/bench_sampler.py --new-tokens 64 --batch 4   # a quick look
"""

from __future__ import annotations

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gtpo_jax.model import ModelConfig, TokenLayout, init_model
from gtpo_jax.sampling import BlockDiffusionSampler, SamplerConfig, select_slots


@functools.partial(jax.jit, static_argnames=("graphdef", "length", "block_size", "strategy", "k"))
def naive_step(graphdef, params, tokens, steps, block, counter, limit, threshold, *, length, block_size, strategy, k):
    """One greedy denoising forward over the prefix [0, length) without a cache."""
    model = nnx.merge(graphdef, params)
    B = block_size
    b = tokens.shape[0]
    pos = jnp.broadcast_to(jnp.arange(length), (b, length))
    seg = (pos < ((block + 1) * B)[:, None]).astype(jnp.int32)
    hidden, _ = model(tokens[:, :length], pos, TokenLayout.contiguous(pos, B, seg))
    cur = block[:, None] * B + jnp.arange(B)
    logits = model.logits(jnp.take_along_axis(hidden, cur[..., None], axis=1))
    logq = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    conf = jnp.exp(jnp.take_along_axis(logq, chosen[..., None], -1)[..., 0])
    cur_steps = jnp.take_along_axis(steps, cur, axis=1)
    gen = cur < limit[:, None]
    active = block * B < limit  # not finished
    masked = gen & (cur_steps == 0) & active[:, None]
    commit = select_slots(masked, conf, threshold, strategy, k)
    rows = jnp.arange(b)[:, None]
    tokens = tokens.at[rows, cur].set(jnp.where(commit, chosen, jnp.take_along_axis(tokens, cur, 1)))
    new_steps = jnp.where(commit, (counter + 1)[:, None], cur_steps)
    steps = steps.at[rows, cur].set(new_steps)
    complete = active & ~jnp.any(gen & (new_steps == 0), axis=1)
    return tokens, steps, block + complete, counter + active


def naive_generate(model, prompts: np.ndarray, cfg: SamplerConfig, *, compile_only: bool = False):
    """Greedy, no stop tokens, equal prompt lengths (P % B == 0). Returns steps [b, P + N]."""
    B, n_new = cfg.block_size, cfg.max_new_tokens
    b, p = prompts.shape
    total = p + -(-n_new // B) * B
    L = -(-total // 128) * 128
    graphdef, params = nnx.split(model)
    tokens = np.full((b, L), cfg.mask_id, np.int32)
    tokens[:, :p] = prompts
    state = (jnp.asarray(tokens), jnp.zeros((b, L), jnp.int32), jnp.full((b,), p // B, jnp.int32),
             jnp.zeros((b,), jnp.int32))
    limit = jnp.full((b,), p + n_new, jnp.int32)
    step = functools.partial(naive_step, graphdef, params, limit=limit, threshold=jnp.float32(cfg.threshold),
                             block_size=B, strategy=cfg.strategy, k=cfg.commit_k)
    if compile_only:
        for length in range(128, L + 1, 128):
            jax.block_until_ready(step(*state, length=length))
        return None
    while True:
        block = int(jnp.max(state[2]))
        if int(jnp.min(state[2])) * B >= p + n_new:
            break
        state = step(*state, length=min(L, -(-((block + 1) * B) // 128) * 128))
    return np.asarray(state[1])[:, p : p + n_new]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.7])
    ap.add_argument("--sharpen", type=float, default=80.0, help="lm_head scale: spreads confidences")
    args = ap.parse_args()

    mcfg = ModelConfig.tiny(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=3 * args.hidden,
                            num_layers=args.layers, num_heads=args.hidden // 32,
                            num_kv_heads=max(1, args.hidden // 128), head_dim=32, tie_word_embeddings=False,
                            block_size=args.block_size)
    model = init_model(mcfg)
    model.lm_head.set_value(model.lm_head.get_value() * args.sharpen)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, args.vocab, (args.batch, args.prompt_len)).astype(np.int32)
    print(f"model: {args.layers} layers, hidden {args.hidden}, vocab {args.vocab}; batch {args.batch}, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens, B={args.block_size}, greedy, {jax.devices()[0].platform}")
    rows = []
    for strategy, thr in [("low_confidence_dynamic", t) for t in args.thresholds]:
        cfg = SamplerConfig(block_size=args.block_size, mask_id=0, stop_ids=(), strategy=strategy, threshold=thr,
                            greedy=True, max_new_tokens=args.new_tokens)
        sampler = BlockDiffusionSampler(model, cfg)
        sampler.sample(prompts.tolist(), seed=0)  # compile
        t = time.perf_counter()
        res = sampler.sample(prompts.tolist(), seed=0)
        t_fast = time.perf_counter() - t
        naive_generate(model, prompts, cfg, compile_only=True)
        t = time.perf_counter()
        naive_steps = naive_generate(model, prompts, cfg)
        t_naive = time.perf_counter() - t
        agree = np.mean([np.array_equal(s, n) for s, n in zip(res.step_maps, naive_steps)])
        n_tok = sum(len(x) for x in res.tokens)
        tpf = np.mean([len(s) / len(set(s.tolist())) for s in res.step_maps])
        rows.append((f"dynamic {thr}", n_tok / t_fast, n_tok / t_naive, t_naive / t_fast, tpf, agree))
    print(f"| {'decoding':<14} | {'sampler tok/s':>13} | {'naive tok/s':>11} | {'speed-up':>8} | "
          f"{'tokens/forward':>14} | {'same steps':>10} |")
    print("|" + "|".join("-" * w for w in (16, 15, 13, 10, 16, 12)) + "|")
    for name, fast, slow, ratio, tpf, agree in rows:
        print(f"| {name:<14} | {fast:>13.1f} | {slow:>11.1f} | {ratio:>7.1f}x | {tpf:>14.2f} | {agree:>10.0%} |")


if __name__ == "__main__":
    main()
