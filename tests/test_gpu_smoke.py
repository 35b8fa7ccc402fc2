"""scripts/gpu_smoke.sh on a machine without CUDA: its CPU checks pass, then it stops at the first
GPU-only check with a "needs CUDA" line and exit code 2 (not 0: nothing GPU-only was checked)."""

from __future__ import annotations

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_smoke_stops_at_the_first_gpu_check_on_cpu():
    pytest.importorskip("lmdeploy", reason="the smoke script's first check imports LMDeploy (scripts/install_lmdeploy_cpu.sh)")
    env = dict(os.environ, JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(["bash", os.path.join(ROOT, "scripts", "gpu_smoke.sh")], capture_output=True, text=True,
                            env=env, cwd=ROOT, timeout=300)
    out = result.stdout
    assert result.returncode == 2, out + result.stderr[-2000:]
    rows = {line.split("  ")[0]: line for line in out.splitlines() if "  " in line}
    assert "PASS" in rows["packages (jax, torch, lmdeploy 0.18)"]
    assert "PASS" in rows["bf16 export of the policy"] and "all BF16" in rows["bf16 export of the policy"]
    assert "needs CUDA" in rows["CUDA visible to JAX and torch, one CUDA major"]
    assert "LMDeploy greedy" not in out  # nothing after the first GPU-only check ran
    assert "needs CUDA: stopped before 'CUDA visible to JAX and torch, one CUDA major'" in out
