"""The trainer/engine GPU memory plan: its arithmetic against sums written out here, the refusals
and the fixes they name, and the JAX allocator settings made before JAX starts."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest

from gtpo_jax import memory_plan as mp
from gtpo_jax.config import Config
from gtpo_jax.config_loader import load_config
from gtpo_jax.model.config import ModelConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "configs", "gtpo_sdar8b.yaml")
GIB = 2**30


def recipe(*overrides: str) -> Config:
    return load_config(Config, RECIPE, list(overrides))


def test_sdar8b_counts():
    m = ModelConfig.sdar_8b()
    # Qwen3-8B by hand: embeddings and head (untied), per layer q/k/v/o, q/k norms, MLP, two norms
    h, f, v, layers = 4096, 12288, 151936, 36
    per_layer = h * 32 * 128 + 2 * h * 8 * 128 + 32 * 128 * h + 2 * 128 + 3 * h * f + 2 * h
    assert mp.param_count(m) == 2 * v * h + layers * per_layer + h == 8_190_735_360
    assert mp.kv_bytes_per_token(m, tp=1) == 2 * 36 * 8 * 128 * 2  # K and V, bf16
    assert mp.kv_bytes_per_token(m, tp=8) == 2 * 36 * 1 * 128 * 2
    assert mp.kv_bytes_per_token(m, tp=16) == 2 * 36 * 1 * 128 * 2  # KV heads replicated beyond 8


def test_split_plan_of_the_8b_recipe_on_8x80gb():
    cfg = recipe("gpu.sharing=split", "gpu.trainer_fraction=0.5", "gpu.activation_gib=20", "decoding.lmdeploy.tensor_parallel=8")
    plan = mp.plan_memory(cfg, ModelConfig.sdar_8b(), gpu_bytes=80 * GIB, num_devices=8)
    n = 8_190_735_360
    rows = {what.split(" (")[0]: b for what, b, _ in plan.rows}
    assert rows["trainer parameters"] == n * 4 // 8  # fp32 master weights, fsdp over 8
    assert rows["trainer optimizer state"] == 2 * (n * 4 // 8)
    assert plan.trainer_peak == 4 * (n * 4 // 8) + 20 * GIB
    assert plan.trainer_budget == 40 * GIB
    engine_free = 80 * GIB - 40 * GIB - 1 * GIB - n * 2 // 8 - 3 * GIB  # JAX's share, contexts, bf16 weights / tp
    kv = int(0.8 * engine_free)
    assert plan.kv_bytes == kv and plan.kv_tokens == kv // (2 * 36 * 1 * 128 * 2)
    assert plan.rollout_tokens == 1024 + 8192 and plan.rollouts_per_step == 128 * 8
    assert plan.ok, plan.table()
    assert "KV cache (tokens)" in plan.table() and "DOES NOT FIT" not in plan.table()


def test_trainer_too_big_for_its_fraction_is_refused_and_the_named_fix_works():
    cfg = recipe("gpu.sharing=split", "gpu.trainer_fraction=0.3", "gpu.activation_gib=20", "decoding.lmdeploy.tensor_parallel=8")
    plan = mp.plan_memory(cfg, ModelConfig.sdar_8b(), gpu_bytes=80 * GIB, num_devices=8)
    assert not plan.ok
    with pytest.raises(mp.MemoryPlanError, match=r"raise it to >= 0\.(\d+)") as e:
        plan.check()
    fixed = float(e.value.args[0].split("raise it to >= ")[1].split(",")[0])
    cfg.gpu.trainer_fraction = fixed
    assert mp.plan_memory(cfg, ModelConfig.sdar_8b(), gpu_bytes=80 * GIB, num_devices=8).ok


def test_engine_without_room_for_one_rollout_is_refused_and_the_named_fix_works():
    # tp=1: the whole bf16 model (15.3 GiB) on one GPU beside a trainer holding 75%
    cfg = recipe("gpu.sharing=split", "gpu.trainer_fraction=0.75", "gpu.activation_gib=20", "decoding.lmdeploy.tensor_parallel=1")
    plan = mp.plan_memory(cfg, ModelConfig.sdar_8b(), gpu_bytes=80 * GIB, num_devices=8)
    assert plan.kv_tokens < plan.rollout_tokens
    with pytest.raises(mp.MemoryPlanError, match=r"lower gpu.trainer_fraction to <= (0\.\d+)") as e:
        plan.check()
    cfg.gpu.trainer_fraction = float(e.value.args[0].split("lower gpu.trainer_fraction to <= ")[1].split(",")[0])
    assert mp.plan_memory(cfg, ModelConfig.sdar_8b(), gpu_bytes=80 * GIB, num_devices=8).ok


def test_sleep_gives_the_engine_what_the_trainer_does_not_hold_between_updates():
    cfg = recipe("gpu.sharing=sleep", "gpu.activation_gib=20", "decoding.lmdeploy.tensor_parallel=1")
    plan = mp.plan_memory(cfg, ModelConfig.sdar_8b(), gpu_bytes=80 * GIB, num_devices=8)
    n = 8_190_735_360
    persistent = 3 * (n * 4 // 8)
    assert plan.kv_bytes == int(0.8 * (80 * GIB - 1 * GIB - persistent - n * 2 - 3 * GIB))
    assert plan.trainer_budget == 79 * GIB and plan.ok


def test_a_model_too_big_for_the_gpus_names_sharding():
    cfg = recipe("gpu.activation_gib=20", "decoding.lmdeploy.tensor_parallel=8")
    plan = mp.plan_memory(cfg, ModelConfig.sdar_8b(), gpu_bytes=80 * GIB, num_devices=1)  # no FSDP
    with pytest.raises(mp.MemoryPlanError, match="more than the GPU holds: shard it"):
        plan.check()


def test_allocator_settings_follow_gpu_sharing(monkeypatch):
    from jax._src import xla_bridge

    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: False)
    env: dict = {}
    assert mp.set_jax_memory_env(recipe("gpu.sharing=split", "gpu.trainer_fraction=0.45"), env) == {
        "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.450"}
    env = {}
    mp.set_jax_memory_env(recipe("gpu.sharing=sleep"), env)
    assert env == {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_ALLOCATOR": "platform"}
    assert mp.set_jax_memory_env(recipe("decoding.backend=jax"), {}) == {}  # the JAX sampler shares the trainer's memory
    given = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.5"}  # the same fraction, written differently: accepted
    assert mp.set_jax_memory_env(recipe("gpu.sharing=split", "gpu.trainer_fraction=0.5"), given)
    with pytest.raises(mp.MemoryPlanError, match="XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 is set in the environment"):
        mp.set_jax_memory_env(recipe("gpu.sharing=split"), {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.9"})
    monkeypatch.setattr(xla_bridge, "backends_are_initialized", lambda: True)
    with pytest.raises(mp.MemoryPlanError, match="JAX started before"):
        mp.set_jax_memory_env(recipe("gpu.sharing=split"), {})


def test_cli_prints_the_budget_and_fails_on_a_plan_that_does_not_fit():
    base = [sys.executable, "-m", "gtpo_jax.memory_plan", "--config", RECIPE, "--preset", "sdar_8b",
            "--memory-gib", "80", "--gpus", "8"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    ok = subprocess.run(base, capture_output=True, text=True, env=env, cwd=ROOT)
    assert ok.returncode == 0, ok.stderr
    assert "GPU memory plan (split; 80.0 GiB per GPU)" in ok.stdout and "KV cache (tokens)" in ok.stdout
    bad = subprocess.run(base + ["gpu.trainer_fraction=0.1"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert bad.returncode == 1 and "DOES NOT FIT" in bad.stdout


def test_gpu_section_ranges_are_checked_before_any_work():
    with pytest.raises(ValueError, match=r"gpu.trainer_fraction must be \(0, 1\)"):
        recipe("gpu.trainer_fraction=1.5").validate()
    with pytest.raises(ValueError, match="set model.dtype=bfloat16"):  # never fp32 -> fp16 in the engine
        recipe("model.dtype=float32").validate()
    assert dataclasses.asdict(recipe().gpu)["sharing"] in ("split", "sleep")
