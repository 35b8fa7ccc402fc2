#!/usr/bin/env bash
# One command for everything GPU-only (pip install -e ".[gpu,lmdeploy]" first): LMDeploy vs the JAX
# sampler on the same bf16 export, in-place weight updates, sharded SFT/GTPO steps on all local GPUs
# vs one device, the memory plan vs what the devices report, bf16 end to end. Prints a pass/fail
# table. Exit 0: all passed; 1: a check failed; 2: no CUDA here (stops at the first GPU-only check).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python scripts/gpu_smoke.py "$@"
