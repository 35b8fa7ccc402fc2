"""Generated tokens/s of the cached block-diffusion sampler against two baselines.

* transformers: a straightforward block sampler on transformers' Qwen3ForCausalLM with a
  `DynamicCache` (written here): the prompt's keys/values are cached once, every denoising
  forward runs the B slots of the current block on top of the cache (its own keys/values are
  cropped off again), and the clean block is appended with one more forward when it completes.
  Greedy, low_confidence_static with 1 token per forward. The same weights go into both models
  (our HF <-> NNX conversion); outputs must be identical.
* naive: the same model without a cache, re-running the block-causal forward over the whole
  prefix at every step (prefix lengths bucketed to multiples of 128, all buckets compiled
  before timing), with the dynamic strategy at the given thresholds.

The random model is sharpened so that confidences spread over (0, 1). No stop tokens, so every
sequence generates exactly --new-tokens. Compilation (and transformers' first call) is excluded
by a warm-up call with the same shapes; each timing alternates the two implementations
--repeats times in this one process and reports the ratio of the median speeds, and per repeat
the ratio of each call to the baseline call right after it (median, min-max).

    python scripts/bench_sampler.py                                   # both baselines, 128 new tokens
    python scripts/bench_sampler.py --new-tokens 1024 --against transformers
    python scripts/bench_sampler.py --new-tokens 64 --batch 4         # a quick look
    taskset -c 1 python scripts/bench_sampler.py --against transformers   # on a loaded machine

On a machine shared with other jobs, pin the run to one core (`taskset`): torch then runs one
thread and XLA's pool stays on that core, so both implementations lose the same share to the
load, whereas torch's multi-threaded kernels stall badly when their threads are descheduled.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx
from transformers import DynamicCache, Qwen3Config, Qwen3ForCausalLM

from gtpo_jax.hf_io import host_tensors
from gtpo_jax.model import ModelConfig, TokenLayout, init_model, params_of
from gtpo_jax.model.params import nnx_to_hf
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


def to_transformers(model) -> Qwen3ForCausalLM:
    """The same weights in transformers' Qwen3 (fp32, eval mode)."""
    cfg = model.cfg
    ref = Qwen3ForCausalLM(Qwen3Config(**cfg.to_hf_dict({"model_type": "qwen3"}), attn_implementation="sdpa"))
    state = {}
    for path, array in host_tensors(params_of(model)):
        name, tensor = nnx_to_hf(path, array, cfg)
        state[name] = torch.from_numpy(np.array(tensor, np.float32))
    ref.load_state_dict(state, strict=True)
    return ref.float().eval()


def hf_generate(model: Qwen3ForCausalLM, prompts: np.ndarray, block_size: int, new_tokens: int, mask_id: int,
                margins: np.ndarray | None = None):
    """Greedy low_confidence_static, 1 slot per forward. Returns (tokens, steps) [b, new_tokens].
    With `margins` [b, new_tokens] (float64, untimed calls only) it also records, per forward, how
    close that forward's choice was: the smaller of the confidence gap between the chosen slot and
    the runner-up slot and the probability gap between the chosen token and the runner-up token."""
    B = block_size
    b, p = prompts.shape
    assert p % B == 0 and new_tokens % B == 0, "the transformers baseline wants whole blocks"
    blocks = new_tokens // B
    rows = torch.arange(b)
    q, k = torch.arange(p)[:, None] // B, torch.arange(p)[None, :] // B
    prefill_mask = torch.where(k <= q, 0.0, float("-inf"))[None, None].expand(b, 1, p, p)
    tokens = torch.full((b, new_tokens), mask_id, dtype=torch.long)
    steps = torch.zeros((b, new_tokens), dtype=torch.long)
    cache = DynamicCache()
    with torch.inference_mode():
        model(input_ids=torch.from_numpy(prompts).long(), attention_mask=prefill_mask,
              position_ids=torch.arange(p)[None].expand(b, p), past_key_values=cache, use_cache=True)
        for j in range(blocks):
            start = p + j * B
            block = tokens[:, j * B : (j + 1) * B]  # a view: commits land in `tokens`
            positions = torch.arange(start, start + B)[None].expand(b, B)
            sees_all = torch.zeros((b, 1, B, start + B))  # the cache and the whole block
            committed = torch.zeros((b, B), dtype=torch.bool)
            for s in range(B):
                logits = model(input_ids=block, attention_mask=sees_all, position_ids=positions,
                               past_key_values=cache, use_cache=True).logits
                cache.crop(-B)  # the noisy block's keys/values do not stay
                probs = torch.softmax(logits.float(), dim=-1)
                conf, chosen = probs.max(dim=-1)
                slot = torch.where(committed, -1.0, conf).argmax(dim=-1)  # first maximum: lowest index
                if margins is not None:
                    margins[:, j * B + s] = _choice_margin(probs, conf, committed, slot).numpy()
                block[rows, slot] = chosen[rows, slot]
                committed[rows, slot] = True
                steps[rows, j * B + slot] = j * B + s + 1
            if j + 1 < blocks:  # the clean block enters the cache
                model(input_ids=block, attention_mask=sees_all, position_ids=positions, past_key_values=cache,
                      use_cache=True)
    return tokens.numpy(), steps.numpy()


def _choice_margin(probs, conf, committed, slot) -> torch.Tensor:
    """[b]: min(chosen slot's confidence - the best other open slot's, top token - second token at it)."""
    rows = torch.arange(len(slot))
    others = torch.where(committed, -1.0, conf)
    others[rows, slot] = -1.0
    slot_gap = conf[rows, slot] - others.max(dim=-1).values  # > 1 when no other slot is open
    top2 = probs[rows, slot].topk(2, dim=-1).values
    return torch.minimum(slot_gap, top2[:, 0] - top2[:, 1]).double()


def first_divergences(ours_tokens, ours_steps, ref_tokens, ref_steps, margins) -> list[str]:
    """For each sequence whose output differs: where, and how close the reference's choice was there."""
    lines = []
    for i, (t, s, rt, rs) in enumerate(zip(ours_tokens, ours_steps, ref_tokens, ref_steps)):
        if np.array_equal(t, rt) and np.array_equal(s, rs):
            continue
        # the first forward at which the two made a different choice (slot or token)
        f = next(f for f in range(len(rs)) if not np.array_equal(s == f + 1, rs == f + 1)
                 or not np.array_equal(t[rs == f + 1], rt[rs == f + 1]))
        lines.append(f"sequence {i}: first different choice at forward {f + 1} of {len(rs)}; the reference's margin "
                     f"there {margins[i, f]:.3g} (fp32 spacing at 1: {np.finfo(np.float32).eps:.3g})")
    return lines


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def pair_ratios(t_ours: list[float], t_base: list[float]) -> str:
    """The speed-up of each repeat (a gtpo_jax call against the baseline call right after it,
    which saw the same machine): median (min-max). Drift between repeats cancels in each pair."""
    ratios = [b / a for a, b in zip(t_ours, t_base)]
    return f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def compare_transformers(model, prompts: np.ndarray, args) -> list[tuple]:
    cfg = SamplerConfig(block_size=args.block_size, mask_id=0, stop_ids=(), strategy="low_confidence_static",
                        denoising_steps=args.block_size, greedy=True, max_new_tokens=args.new_tokens)
    sampler = BlockDiffusionSampler(model, cfg)
    ref = to_transformers(model)
    ours_fn = lambda: sampler.sample(prompts.tolist(), seed=0)  # noqa: E731
    hf_fn = lambda: hf_generate(ref, prompts, args.block_size, args.new_tokens, cfg.mask_id)  # noqa: E731
    res, (hf_tokens, hf_steps) = ours_fn(), hf_fn()  # compile / warm up
    t_ours, t_hf = [], []
    for _ in range(args.repeats):
        res, t = timed(ours_fn)
        t_ours.append(t)
        (hf_tokens, hf_steps), t = timed(hf_fn)
        t_hf.append(t)
    same = sum(np.array_equal(res.tokens[i], hf_tokens[i]) and np.array_equal(res.step_maps[i], hf_steps[i])
               for i in range(len(prompts)))
    if same < len(prompts):  # untimed: how close the reference's choice was where they part
        margins = np.zeros(hf_steps.shape)
        hf_generate(ref, prompts, args.block_size, args.new_tokens, cfg.mask_id, margins)
        print("\n".join(first_divergences(res.tokens, res.step_maps, hf_tokens, hf_steps, margins)))
    n_tok = sum(len(x) for x in res.tokens)
    fast, slow = n_tok / statistics.median(t_ours), n_tok / statistics.median(t_hf)
    return [("static 1/fwd", fast, slow, fast / slow, pair_ratios(t_ours, t_hf), 1.0, f"{same}/{len(prompts)}")]


def compare_naive(model, prompts: np.ndarray, args) -> list[tuple]:
    rows = []
    for thr in args.thresholds:
        cfg = SamplerConfig(block_size=args.block_size, mask_id=0, stop_ids=(), strategy="low_confidence_dynamic",
                            threshold=thr, greedy=True, max_new_tokens=args.new_tokens)
        sampler = BlockDiffusionSampler(model, cfg)
        res = sampler.sample(prompts.tolist(), seed=0)  # compile
        naive_generate(model, prompts, cfg, compile_only=True)
        t_fast, t_naive = [], []
        for _ in range(args.repeats):
            res, t = timed(lambda: sampler.sample(prompts.tolist(), seed=0))  # noqa: B023
            t_fast.append(t)
            naive_steps, t = timed(lambda: naive_generate(model, prompts, cfg))  # noqa: B023
            t_naive.append(t)
        same = sum(np.array_equal(s, n) for s, n in zip(res.step_maps, naive_steps))
        n_tok = sum(len(x) for x in res.tokens)
        tpf = np.mean([len(s) / len(set(s.tolist())) for s in res.step_maps])
        fast, slow = n_tok / statistics.median(t_fast), n_tok / statistics.median(t_naive)
        rows.append((f"dynamic {thr}", fast, slow, fast / slow, pair_ratios(t_fast, t_naive), tpf,
                     f"{same}/{len(prompts)}"))
    return rows


def print_table(baseline: str, rows: list[tuple]) -> None:
    print(f"| {'decoding':<14} | {'gtpo_jax tok/s':>14} | {baseline + ' tok/s':>18} | {'ratio':>7} | "
          f"{'per repeat':>19} | {'tokens/forward':>14} | {'identical':>9} |")
    print("|" + "|".join("-" * w for w in (16, 16, 20, 9, 21, 16, 11)) + "|")
    for name, fast, slow, ratio, pairs, tpf, same in rows:
        print(f"| {name:<14} | {fast:>14.1f} | {slow:>18.1f} | {ratio:>6.2f}x | {pairs:>19} | {tpf:>14.2f} | "
              f"{same:>9} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=768)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=4)
    ap.add_argument("--against", choices=("transformers", "naive", "both"), default="both")
    ap.add_argument("--thresholds", type=float, nargs="+", default=[0.9, 0.7], help="naive comparison's")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls of each implementation (median)")
    ap.add_argument("--sharpen", type=float, default=80.0, help="lm_head scale: spreads confidences")
    args = ap.parse_args()

    mcfg = ModelConfig.tiny(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                            num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
                            head_dim=args.head_dim, tie_word_embeddings=False, block_size=args.block_size)
    model = init_model(mcfg)
    model.lm_head.set_value(model.lm_head.get_value() * args.sharpen)
    rng = np.random.default_rng(0)
    prompts = rng.integers(1, args.vocab, (args.batch, args.prompt_len)).astype(np.int32)
    print(f"model: {args.layers} layers, hidden {args.hidden}, intermediate {args.intermediate}, heads "
          f"{args.heads}/{args.kv_heads} x {args.head_dim}, vocab {args.vocab}, fp32; batch {args.batch}, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens, B={args.block_size}, greedy; "
          f"{jax.devices()[0].platform}, torch threads {torch.get_num_threads()}; median of {args.repeats}")
    if args.against in ("transformers", "both"):
        print_table("transformers", compare_transformers(model, prompts, args))
    if args.against in ("naive", "both"):
        print_table("naive", compare_naive(model, prompts, args))


if __name__ == "__main__":
    main()
