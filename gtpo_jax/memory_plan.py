"""How the trainer (JAX) and the LMDeploy engine share a node's GPUs: the budget, checked at start-up.

Per GPU, in bytes, from the model's exact parameter count and the config (`gpu:` section):
- trainer: parameters, Adam's two moments and the gradients in `model.param_dtype`, sharded over the
  mesh's fsdp × tensor devices; plus the step's temporaries (`gpu.activation_gib`, or an estimate:
  with remat the saved layer inputs of one packed row plus one layer's recomputed working set);
- engine (on `decoding.lmdeploy.tensor_parallel` GPUs of every node): bf16 weights / tp, a runtime reserve
  (CUDA context, kernels' workspace, CUDA graphs), and the KV cache: `decoding.lmdeploy.cache_max_entry_count`
  of the memory still free once the weights are in, which LMDeploy turns into tokens.

`split`: JAX holds `gpu.trainer_fraction` of the GPU for the whole run (preallocated), the engine the
rest. `sleep`: JAX allocates on demand and returns memory after each step; during rollouts it holds
only parameters and optimizer state, during the update the engine holds nothing (sleep level 2).
A plan fails when the trainer's peak exceeds its share or the KV cache cannot hold one full-length
rollout; the error names the setting that fixes it. The engine's own report after start-up (KV
blocks it allocated) is compared with the plan by the LMDeploy backend and `scripts/gpu_smoke.sh`.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys

import jax
from jax._src import xla_bridge

from gtpo_jax.config import Config
from gtpo_jax.config_loader import load_config
from gtpo_jax.layout import gtpo_row_len
from gtpo_jax.model.config import ModelConfig
from gtpo_jax.model.params import expected_hf_names, hf_shape
from gtpo_jax.model.presets import HF_PRESETS
from gtpo_jax.model.vocab_logprobs import saved_logits_bytes
from gtpo_jax.rounding import round_up

GIB = 2**30
ENGINE_RUNTIME_GIB = 3.0  # LMDeploy's CUDA context, torch workspace and CUDA graphs (a reserve, not measured)
JAX_RUNTIME_GIB = 1.0  # XLA's CUDA context and cuBLAS/cuDNN workspace outside its allocator
PROMPT_TOKENS = 1024  # prompt room of one rollout in the KV cache (math prompts are far shorter)
_BYTES = {"float32": 4, "bfloat16": 2}


class MemoryPlanError(ValueError):
    """The trainer and the engine cannot both fit on the GPUs as configured."""


def param_count(model_cfg: ModelConfig) -> int:
    return sum(math.prod(hf_shape(name, model_cfg)) for name in expected_hf_names(model_cfg))


def kv_bytes_per_token(model_cfg: ModelConfig, tp: int, dtype_bytes: int = 2) -> int:
    """Keys and values of one token on one engine GPU (KV heads split over tp, replicated when tp > heads)."""
    heads = math.ceil(model_cfg.num_kv_heads / tp)
    return 2 * model_cfg.num_layers * heads * model_cfg.head_dim * dtype_bytes


def trainer_row_tokens(cfg: Config) -> int:
    """Tokens of one packed training row (what one device processes per micro-batch, at least)."""
    if cfg.stage == "gtpo":
        return gtpo_row_len(cfg.block_size, cfg.decoding.max_new_tokens, PROMPT_TOKENS)
    return cfg.train.row_len or cfg.data.max_len * 2


def activation_estimate(cfg: Config, model_cfg: ModelConfig) -> int:
    """Rough peak temporaries of one update step per device, in bytes (gpu.activation_gib overrides)."""
    m, tokens = model_cfg, trainer_row_tokens(cfg)
    act = _BYTES[cfg.model.dtype]
    q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
    layer_working = tokens * (m.hidden_size * 2 + 2 * q + 2 * kv + 3 * m.intermediate_size) * act
    saved = tokens * m.hidden_size * act if cfg.model.remat == "full" else layer_working
    logits = cfg.train.vocab_chunk * m.vocab_size * 4 * 3  # a chunk of fp32 logits, softmax and its gradient
    # one row's targets: the response (GTPO) or at most the sample (SFT); kept when they fit the budget
    targets = cfg.decoding.max_new_tokens if cfg.stage == "gtpo" else cfg.data.max_len
    kept = saved_logits_bytes(targets, m.vocab_size)
    kept_logits = kept if kept <= cfg.train.vocab_saved_logits_mb * 2**20 else 0
    layer_weights = 2 * (param_count(model_cfg) // max(m.num_layers, 1)) * act  # one gathered layer (+ prefetch)
    return m.num_layers * saved + layer_working + logits + kept_logits + layer_weights


@dataclasses.dataclass
class MemoryPlan:
    sharing: str
    gpu_bytes: int
    rows: list[tuple[str, int, str]]  # (what, bytes per GPU, when it is held)
    trainer_peak: int
    trainer_budget: int
    kv_bytes: int
    kv_tokens: int  # tokens the engine's KV cache holds (one node's engine)
    rollout_tokens: int  # one full-length rollout
    rollouts_per_step: int
    fix_lines: list[str]

    @property
    def ok(self) -> bool:
        return not self.fix_lines

    def table(self) -> str:
        g = lambda b: f"{b / GIB:8.1f} GiB"  # noqa: E731
        lines = [f"GPU memory plan ({self.sharing}; {self.gpu_bytes / GIB:.1f} GiB per GPU)"]
        lines += [f"  {what:<38}{g(b)}  {when}" for what, b, when in self.rows]
        lines.append(f"  {'trainer peak / its budget':<38}{g(self.trainer_peak)} / {self.trainer_budget / GIB:.1f} GiB")
        concurrent = self.kv_tokens // max(self.rollout_tokens, 1)
        lines.append(f"  {'KV cache (tokens)':<38}{self.kv_tokens:>12,d}  = {concurrent} rollouts of "
                     f"{self.rollout_tokens} tokens at once (the step draws {self.rollouts_per_step})")
        lines += [f"  DOES NOT FIT: {line}" for line in self.fix_lines]
        return "\n".join(lines)

    def check(self) -> None:
        if not self.ok:
            raise MemoryPlanError(self.table())


def plan_memory(cfg: Config, model_cfg: ModelConfig, *, gpu_bytes: int, num_devices: int) -> MemoryPlan:
    """The per-GPU budget of `cfg` for a model of `model_cfg` on `num_devices` GPUs in all (trainer mesh)."""
    g, r = cfg.gpu, cfg.decoding
    engine = r.lmdeploy
    n_params = param_count(model_cfg)
    mesh = cfg.mesh
    data = mesh.data
    fsdp = mesh.fsdp if mesh.fsdp > 0 else max(num_devices // (data * mesh.tensor), 1)
    shards = fsdp * mesh.tensor
    pbytes = _BYTES[cfg.model.param_dtype]
    params = n_params * pbytes // shards
    optimizer = 2 * params  # Adam's first and second moments, in the parameters' dtype
    grads = params
    acts = int(g.activation_gib * GIB) if g.activation_gib else activation_estimate(cfg, model_cfg)
    persistent = params + optimizer
    trainer_peak = persistent + grads + acts
    tp = engine.tensor_parallel
    engine_weights = n_params * 2 // tp  # bf16 (rollouts in the trainer's compute dtype)
    engine_runtime = int(ENGINE_RUNTIME_GIB * GIB)
    jax_runtime = int(JAX_RUNTIME_GIB * GIB)
    if g.sharing == "split":
        trainer_budget = int(g.trainer_fraction * gpu_bytes)
        engine_free = gpu_bytes - trainer_budget - jax_runtime - engine_weights - engine_runtime
    else:  # sleep: the engine starts (and wakes) while JAX holds only parameters and optimizer state
        trainer_budget = gpu_bytes - jax_runtime
        engine_free = gpu_bytes - jax_runtime - persistent - engine_weights - engine_runtime
    kv = max(int(engine.cache_max_entry_count * engine_free), 0)
    kv_tokens = kv // kv_bytes_per_token(model_cfg, tp)
    block = cfg.block_size
    rollout_tokens = round_up(PROMPT_TOKENS + r.max_new_tokens, block)
    during = "always" if g.sharing == "split" else "during rollouts and update"
    rows = [
        ("trainer parameters", params, during),
        ("trainer optimizer state (Adam)", optimizer, during),
        ("trainer gradients", grads, "update"),
        ("trainer temporaries" + ("" if g.activation_gib else " (estimate)"), acts, "update"),
        (f"engine weights (bf16, tp={tp})", engine_weights, "always" if g.sharing == "split" else "rollouts"),
        ("engine runtime reserve", engine_runtime, "always" if g.sharing == "split" else "rollouts"),
        ("engine KV cache", kv, "always" if g.sharing == "split" else "rollouts"),
    ]
    fixes = []
    if trainer_peak > trainer_budget:
        need = (trainer_peak + jax_runtime) / gpu_bytes
        if g.sharing == "split" and need < 1:
            fixes.append(f"the trainer needs {trainer_peak / GIB:.1f} GiB per GPU but gpu.trainer_fraction="
                         f"{g.trainer_fraction} gives {trainer_budget / GIB:.1f}: raise it to >= {math.ceil(need * 100) / 100}"
                         ", or use gpu.sharing=sleep")
        else:
            fixes.append(f"the trainer needs {trainer_peak / GIB:.1f} GiB per GPU, more than the GPU holds: shard it over "
                         "more devices (mesh.fsdp, more nodes), use model.remat=full, or fewer tokens per micro-batch")
    if kv_tokens < rollout_tokens:
        want = rollout_tokens * kv_bytes_per_token(model_cfg, tp) / engine.cache_max_entry_count
        if g.sharing == "split":
            room = (gpu_bytes - jax_runtime - engine_weights - engine_runtime - want) / gpu_bytes
            hint = (f"lower gpu.trainer_fraction to <= {math.floor(room * 100) / 100}, " if room > 0 else "")
        else:
            hint = ""
        fixes.append(f"the engine's KV cache holds {kv_tokens} tokens, less than one rollout ({rollout_tokens}): "
                     f"{hint}raise decoding.lmdeploy.tensor_parallel (now {tp}) or decoding.lmdeploy.cache_max_entry_count, "
                     "or use gpu.sharing=sleep")
    per_step = cfg.gtpo.num_task_per_step * cfg.gtpo.num_response_per_task
    return MemoryPlan(g.sharing, gpu_bytes, rows, trainer_peak, trainer_budget, kv, kv_tokens, rollout_tokens,
                      per_step, fixes)


def _jax_backend_started() -> bool:
    # JAX (0.10) has no public "has a backend started?" query (jax-ml/jax#23320 asks for one):
    # jax.devices() and jax.extend.backend would start one, which is what must not happen before the
    # allocator variables are set. This is the one private call of the package; if a JAX release
    # drops it, the check is skipped.
    started = getattr(xla_bridge, "backends_are_initialized", None)
    return bool(started and started())


def startup_plan(cfg: Config, model_cfg: ModelConfig) -> MemoryPlan:
    """The GPU memory plan of an LMDeploy run on the devices torch sees: logged, and checked unless
    gpu.check=false (before the policy is exported or an engine started)."""
    import torch  # LMDeploy's GPU-only dependency, imported lazily: only LMDeploy runs ask the GPU's size

    gpu_bytes = int(cfg.gpu.memory_gib * GIB) or torch.cuda.mem_get_info()[1]
    plan = plan_memory(cfg, model_cfg, gpu_bytes=gpu_bytes, num_devices=jax.device_count())
    logging.getLogger("gtpo_jax").info("%s", plan.table())
    if cfg.gpu.check:
        plan.check()
    return plan


def set_jax_memory_env(cfg: Config, environ=os.environ) -> dict[str, str]:
    """Set JAX's GPU allocator variables for `gpu.sharing` (decoding.backend=lmdeploy only); they take
    effect only if JAX has not started a backend yet. Returns what was set; refuses a conflicting value."""
    if cfg.decoding.backend != "lmdeploy":
        return {}
    want = ({"XLA_PYTHON_CLIENT_MEM_FRACTION": f"{cfg.gpu.trainer_fraction:.3f}"} if cfg.gpu.sharing == "split"
            else {"XLA_PYTHON_CLIENT_PREALLOCATE": "false", "XLA_PYTHON_CLIENT_ALLOCATOR": "platform"})
    def same(key, value):
        given = environ.get(key, value)
        if key == "XLA_PYTHON_CLIENT_MEM_FRACTION":
            try:
                return abs(float(given) - float(value)) < 5e-4
            except ValueError:
                return False
        return given.lower() == value

    for key, value in want.items():
        if not same(key, value):
            raise MemoryPlanError(f"{key}={environ[key]} is set in the environment but gpu.sharing={cfg.gpu.sharing} "
                                  f"needs {value}; unset it and use the gpu: section of the config")
    if _jax_backend_started() and not all(k in environ and same(k, v) for k, v in want.items()):
        raise MemoryPlanError("JAX started before the GPU memory plan could set its allocator; call "
                              "set_jax_memory_env before the first JAX computation")
    environ.update(want)
    return want


def planned_model_config(cfg: Config, preset: str | None = None, *, fallback: str | None = None,
                         **runtime) -> tuple[ModelConfig, str]:
    """The architecture of `cfg.model` without loading weights, and a line saying where it came from:
    `preset` if given, else the config.json of `model.path` (an HF directory or a checkpoint's
    hf_assets/), else `model.preset`. A `model.path` without config.json here (a cluster path) is
    an error, or with `fallback` replaced by that preset. `runtime`: ModelConfig runtime fields."""
    path = cfg.model.path
    name = preset or cfg.model.preset
    if path and preset is None:
        for candidate in (path, os.path.join(path, "hf_assets")):
            if os.path.isfile(os.path.join(candidate, "config.json")):
                return ModelConfig.from_hf_dir(candidate, **runtime), f"model: config.json of {candidate}"
        if fallback is None:
            raise FileNotFoundError(f"model.path {path} holds no config.json; pass --preset sdar_8b to plan without it")
        if fallback in HF_PRESETS:
            return (ModelConfig.from_hf_dict(HF_PRESETS[fallback], **runtime),
                    f"model: {path} does not exist here; planning the shipped config.json of preset {fallback!r} "
                    "(gtpo_jax/model/presets.py)")
        name = fallback
    overrides = {"block_size": cfg.block_size, **cfg.model.preset_overrides}
    return (getattr(ModelConfig, name)(**overrides, **runtime),
            f"model: preset {name!r} {cfg.model.preset_overrides or ''}".rstrip())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gtpo_jax.memory_plan",
                                 description="Print the trainer/engine GPU memory budget of a config.")
    ap.add_argument("--config", required=True)
    ap.add_argument("--gpus", type=int, default=8, help="GPUs in all (every node's)")
    ap.add_argument("--memory-gib", type=float, default=0.0, help="memory of one GPU (default: gpu.memory_gib)")
    ap.add_argument("--preset", default=None, help="plan for a model preset instead of model.path (e.g. sdar_8b)")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(Config, args.config, args.overrides)
    gib = args.memory_gib or cfg.gpu.memory_gib
    if not gib:
        ap.error("give --memory-gib (or gpu.memory_gib): this command reads no device")
    plan = plan_memory(cfg, planned_model_config(cfg, args.preset)[0], gpu_bytes=int(gib * GIB), num_devices=args.gpus)
    print(plan.table())
    return 0 if plan.ok else 1


if __name__ == "__main__":
    sys.exit(main())
