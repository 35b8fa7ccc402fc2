"""`python -m gtpo_jax.train --config configs/X.yaml [key=value ...]`: runs the stage the config names."""

from __future__ import annotations

import argparse
import json
import sys

from gtpo_jax.cli import one_line_errors
from gtpo_jax.config import Config
from gtpo_jax.config_loader import dump_yaml, keys_help, load_config
from gtpo_jax.distributed import initialize
from gtpo_jax.memory_plan import set_jax_memory_env
from gtpo_jax.trainers.gtpo import run_gtpo
from gtpo_jax.trainers.sft import run_sft


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gtpo_jax.train",
        description="Post-train an SDAR block-diffusion model: SFT or GTPO, as the config's `stage` says.",
        epilog="config keys (set in the YAML file or as key=value; type = default):\n" + keys_help(Config),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="YAML file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-6 train.steps=10")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config (what config.yaml of the run will hold) and exit")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(Config, args.config, args.overrides)
        cfg.validate()
        cfg.resolve_paths()
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(dump_yaml(cfg), end="")
        return 0
    with one_line_errors(args.debug):
        return run(cfg)
    return 1  # one_line_errors swallowed an error (it has printed it)


def run(cfg: Config) -> int:
    set_jax_memory_env(cfg)  # JAX's GPU allocator settings for gpu.sharing, before JAX starts
    initialize(cfg.distributed)  # before any JAX computation
    result = run_sft(cfg) if cfg.stage == "sft" else run_gtpo(cfg)
    summary = {label: round(100 * r["accuracy"], 1) for label, r in result.get("eval", {}).items()}
    if summary:
        print("held-out accuracy (%): " + json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
