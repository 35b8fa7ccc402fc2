"""`python -m gtpo_jax.sampling --model PATH --prompt "..."`: sample from an HF directory or an
Orbax checkpoint (its tokenizer: the HF directory, or `<root>/hf_assets`) and print the text and
decoding statistics."""

from __future__ import annotations

import argparse
import sys
import time

from gtpo_jax.checkpoint import load_model
from gtpo_jax.data.tokenizer import chat_prompt, load_tokenizer, mask_token_id, stop_token_ids, tokenizer_dir_for
from gtpo_jax.logs import setup_logging
from gtpo_jax.sampling.sampler import STRATEGIES, BlockDiffusionSampler, SamplerConfig, tokens_per_forward


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gtpo_jax.sampling", description=__doc__)
    ap.add_argument("--model", required=True, help="HF directory or Orbax checkpoint (root or step directory)")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: next to the model)")
    ap.add_argument("--prompt", action="append", required=True, help="may be repeated")
    ap.add_argument("--chat", action="store_true", help="wrap each prompt in the docs/algorithm.md §6 chat template")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--min-new-tokens", type=int, default=0)
    ap.add_argument("--strategy", choices=STRATEGIES, default="low_confidence_dynamic")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--denoising-steps", type=int, default=4)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=None, help="default: the checkpoint's, else 4")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args(argv)

    setup_logging()
    try:
        tokenizer = load_tokenizer(args.tokenizer or tokenizer_dir_for(args.model))
        model = load_model(args.model, param_dtype=args.dtype, dtype=args.dtype)
        block_size = args.block_size or model.cfg.block_size or 4
        model.cfg.check_block_size(block_size, source=args.model)
        config = SamplerConfig(
            block_size=block_size, mask_id=mask_token_id(tokenizer), stop_ids=tuple(stop_token_ids(tokenizer)),
            strategy=args.strategy, denoising_steps=args.denoising_steps, threshold=args.threshold,
            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, greedy=args.greedy,
            max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    texts = [chat_prompt(p) if args.chat else p for p in args.prompt]
    prompt_ids = [tokenizer.encode(t, add_special_tokens=False) for t in texts]
    sampler = BlockDiffusionSampler(model, config)
    start = time.perf_counter()
    # sample j of prompt i is sequence i·n + j (the random stream the rollout engine uses too)
    out = sampler.sample([p for p in prompt_ids for _ in range(args.n)], seed=args.seed)
    seconds = time.perf_counter() - start
    total = 0
    for k, tokens in enumerate(out.tokens):
        total += len(tokens)
        reason = out.finish_reasons[k]
        print(f"=== prompt: {texts[k // args.n]!r} sample {k % args.n}: {len(tokens)} tokens, finish={reason}, "
              f"tokens/forward={tokens_per_forward(out.step_maps[k]):.2f}, forwards={out.num_forwards[k]}")
        print(tokenizer.decode((tokens[:-1] if reason == "stop" else tokens).tolist(), skip_special_tokens=False))
    print(f"--- {total} tokens in {seconds:.2f} s (incl. compilation)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
