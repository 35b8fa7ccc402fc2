#!/usr/bin/env bash
# CPU demo: SFT a tiny model on the synthetic arithmetic task, then GTPO from its checkpoint,
# printing held-out accuracy before and after each stage (GTPO also at its evaluation steps), and
# drawing runs/tiny/gtpo/curves.png. Extra args (key=value overrides) go to both stages.
# The speed-reward run starts from the same SFT checkpoint:
#   python -m gtpo_jax.train --config configs/gtpo_tiny_speed.yaml
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
python -m gtpo_jax.train --config configs/sft_tiny.yaml "$@"
python -m gtpo_jax.train --config configs/gtpo_tiny.yaml "$@"
python scripts/plot_metrics.py runs/tiny/gtpo/metrics.jsonl -o runs/tiny/gtpo/curves.png --title "GTPO (tiny demo)"
