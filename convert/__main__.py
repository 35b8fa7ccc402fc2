"""`python -m convert {hf2orbax,orbax2hf} ...`: prints one summary line; errors are one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import sys

EXIT_USAGE = 2
DTYPES = ("float32", "bfloat16")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert",
                                description="Convert between HF model directories and gtpo_jax Orbax checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf2orbax", help="HF directory (config.json + safetensors) -> new Orbax checkpoint (step 0)")
    a.add_argument("hf_dir", help="HF model directory")
    a.add_argument("out", help="new (or empty) checkpoint directory")
    a.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: keep the stored dtype)")
    b = sub.add_parser("orbax2hf", help="Orbax checkpoint step -> HF directory that transformers/LMDeploy load")
    b.add_argument("ckpt", help="checkpoint root (latest complete step) or one of its step directories")
    b.add_argument("out", help="output HF directory: new, empty, or an earlier export (replaced whole once the "
                               "new one is complete)")
    b.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty output directory that is not an earlier export")
    b.add_argument("--step", type=int, default=None, help="step to export (default: latest complete)")
    b.add_argument("--dtype", choices=DTYPES, default=None, help="cast the weights (default: keep the stored dtype)")
    b.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard, e.g. 5GB, 500MB, 2GiB")
    for q in (a, b):
        q.add_argument("--quiet", action="store_true", help="no progress bars")
        q.add_argument("--json", action="store_true", help="print the summary as JSON instead of a sentence")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    progress = not args.quiet and sys.stderr.isatty()
    # Imported after parsing: `--help` and usage errors should not wait for jax.
    from gtpo_jax.model import CheckpointMismatchError, ModelConfigError

    from convert import convert_hf_to_orbax, convert_orbax_to_hf

    try:
        if args.command == "hf2orbax":
            summary = convert_hf_to_orbax(args.hf_dir, args.out, dtype=args.dtype, progress=progress)
        else:
            summary = convert_orbax_to_hf(args.ckpt, args.out, step=args.step, dtype=args.dtype,
                                          max_shard_size=args.max_shard_size, progress=progress,
                                          overwrite=args.overwrite)
    except (OSError, ValueError, CheckpointMismatchError, ModelConfigError) as e:
        # OSError covers FileNotFoundError/FileExistsError; ValueError bad sizes and dtypes. Anything else is a bug: traceback.
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"convert {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        import dataclasses

        print(json.dumps(dataclasses.asdict(summary)))
    else:
        print(summary.line())
    return 0


if __name__ == "__main__":
    sys.exit(main())
