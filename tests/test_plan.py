"""`python -m gtpo_jax.plan`: compiled per-device memory against a count made from the
architecture by hand, FLOP counting through loops, the fallback preset and the no-fit error."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gtpo_jax.config import Config
from gtpo_jax.config_loader import load_config
from gtpo_jax.memory_plan import planned_model_config
from gtpo_jax.plan_costs import count_matmuls
from gtpo_jax.model.config import runtime_options

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_plan(tmp_path, *args):
    out = tmp_path / "plan.json"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the plan sets its own device count
    proc = subprocess.run([sys.executable, "-m", "gtpo_jax.plan", *args, "--json", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.slow  # ~80 s AOT compile of a 1.7B model; the other plan tests stay
def test_sdar_1_7b_on_8_devices_holds_its_share_of_params_and_adam_states(tmp_path):
    proc, result = run_plan(tmp_path, "--config", "configs/sft_tiny.yaml", "model.preset=sdar_1_7b",
                            "model.preset_overrides={}", "mesh.fsdp=8", "train.batch_size=8", "data.max_len=64")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    # SDAR-1.7B (Qwen3-1.7B shape): tied embedding, 28 layers of q/k/v/o + SwiGLU + 4 norms, final norm.
    vocab, hidden, ffn, layers, heads, kv_heads, head_dim = 151936, 2048, 6144, 28, 16, 8, 128
    per_layer = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * ffn
    per_layer += 2 * hidden + 2 * head_dim
    count = vocab * hidden + layers * per_layer + hidden
    assert result["parameters"] == count
    step = result["programs"][0]
    share = 4 * count / 8  # float32, split 8 ways along the embed dimension
    # Norm weights stay replicated (<0.1% of the parameters): 1% margin.
    assert share <= step["param_bytes"] <= 1.01 * share
    assert 2 * share <= step["optimizer_bytes"] <= 1.01 * 2 * share  # Adam's two moments, sharded like the params
    # What XLA compiled: params + moments + a batch of a few KiB as inputs.
    assert 3 * share <= step["argument_bytes"] <= 1.01 * 3 * share
    assert step["fits"]


def test_plan_that_does_not_fit_fails_naming_the_largest_arrays(tmp_path):
    proc, result = run_plan(tmp_path, "--config", "configs/sft_tiny.yaml", "mesh.fsdp=2", "--memory-gb", "0.01")
    assert proc.returncode == 1
    assert "DOES NOT FIT" in proc.stdout and "largest arrays:" in proc.stdout
    assert "does not fit" in proc.stderr
    assert not result["programs"][0]["fits"]


def test_missing_model_path_plans_the_shipped_sdar_8b_config():
    cfg = load_config(Config, "configs/sft_sdar8b.yaml", ["model.path=/nonexistent/SDAR-8B-Chat"])
    model_cfg, line = planned_model_config(cfg, fallback="sdar_8b", **runtime_options(cfg.model))
    assert "does not exist" in line and "sdar_8b" in line
    assert (model_cfg.hidden_size, model_cfg.num_layers, model_cfg.num_heads, model_cfg.num_kv_heads) == (4096, 36, 32, 8)
    assert (model_cfg.dtype, model_cfg.param_dtype, model_cfg.remat) == ("bfloat16", "float32", "full")


def test_matmul_count_applies_scan_trip_counts_and_tile_fraction():
    def f(x, w):
        def body(c, _):
            c = c @ w
            return jax.lax.cond(c.sum() > 0, lambda c: c @ w, lambda c: c, c), None

        return jax.lax.scan(body, x, None, length=10)[0]

    x = jax.ShapeDtypeStruct((32, 64), jnp.float32)
    w = jax.ShapeDtypeStruct((64, 64), jnp.float32)
    count = count_matmuls(jax.make_jaxpr(f)(x, w).jaxpr, visible_tile_fraction=0.25)
    one = 2 * 32 * 64 * 64
    np.testing.assert_allclose(count.flops, 10 * (one + 0.25 * one))
