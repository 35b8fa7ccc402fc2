#!/usr/bin/env bash
# Makes LMDeploy 0.18's Python sources importable on a CPU machine, for the bridge's CPU tests
# (tests/test_lmdeploy_bridge.py): the package without its CUDA dependency set, plus the light
# packages its engine modules import. For real rollouts on a GPU use `pip install -e ".[lmdeploy]"`.
set -euo pipefail
pip install -q --no-deps "lmdeploy==0.18.0"
pip install -q mmengine-lite fire shortuuid pybase64 pydantic partial_json_parser einops cloudpickle pyzmq psutil pillow requests
