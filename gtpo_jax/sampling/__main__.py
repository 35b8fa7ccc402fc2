"""`python -m gtpo_jax.sampling --model PATH --prompt "..." [key=value ...]`: sample from an HF
directory or an Orbax checkpoint (its tokenizer: the HF directory, or `<root>/hf_assets`) and print
the text and decoding statistics. The decoding settings are the config tree's `decoding:` keys
(`temperature=0.7 strategy=sequential ...`, listed below), the same type the trainer decodes with."""

from __future__ import annotations

import argparse
import sys
import time

from gtpo_jax.checkpoint import load_model
from gtpo_jax.config_loader import keys_help, load_config
from gtpo_jax.data.tokenizer import chat_prompt, load_tokenizer, resolve_token_ids, tokenizer_dir_for
from gtpo_jax.logs import setup_logging
from gtpo_jax.sampling.decoding import DecodingConfig
from gtpo_jax.sampling.sampler import BlockDiffusionSampler, SamplerConfig, tokens_per_forward


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gtpo_jax.sampling", description=__doc__,
                                 epilog="decoding keys (key=value; type = default):\n" + keys_help(DecodingConfig),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="HF directory or Orbax checkpoint (root or step directory)")
    ap.add_argument("--tokenizer", help="tokenizer directory (default: next to the model)")
    ap.add_argument("--prompt", action="append", required=True, help="may be repeated")
    ap.add_argument("--chat", action="store_true", help="wrap each prompt in the docs/algorithm.md §6 chat template")
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--n", type=int, default=1, help="samples per prompt")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--block-size", type=int, default=None, help="default: the checkpoint's, else 4")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("decoding", nargs="*", help="decoding key=value settings, e.g. max_new_tokens=64 threshold=0.8")
    args = ap.parse_args(argv)

    setup_logging()
    try:
        decoding = load_config(DecodingConfig, None, args.decoding)
        if decoding.backend != "jax":
            raise ValueError("this command decodes with the JAX sampler: leave backend unset")
        tokenizer = load_tokenizer(args.tokenizer or tokenizer_dir_for(args.model))
        model = load_model(args.model, param_dtype=args.dtype, dtype=args.dtype)
        block_size = args.block_size or model.cfg.block_size or 4
        model.cfg.check_block_size(block_size, source=args.model)
        config = SamplerConfig.of(decoding, resolve_token_ids(tokenizer, block_size), greedy=args.greedy)
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
