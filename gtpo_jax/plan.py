"""`python -m gtpo_jax.plan --config configs/X.yaml [key=value ...]`: will this run fit, and how
long will a step take — answered on a CPU, without weights and without the accelerators.

The model is built abstractly (`nnx.eval_shape`: shapes, dtypes and shardings, no values), the
run's jitted programs — the exact SFT / GTPO update step of the trainers, the trajectory scorer
and the sampler's decode loop — are lowered and compiled by XLA for the config's mesh on fake
CPU devices (`--xla_force_host_platform_device_count`; the command re-executes itself with it),
and per device it prints: parameter, optimizer, batch, temporary (activations, buffers) and
output bytes from `compiled.memory_analysis()`, matmul FLOPs and bytes per step, tokens per step,
arithmetic intensity, and a roofline estimate of the step time on a named accelerator (see
`gtpo_jax.plan_costs`). It exits with status 1, naming the largest arrays, when a program does
not fit the accelerator's memory. Buffers are sized by the CPU compiler: a GPU compiler
schedules differently, so treat the bytes as an estimate of a few percent, not an allocation.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from gtpo_jax.config import Config
from gtpo_jax.config_loader import load_config
from gtpo_jax.data.tokenizer import TokenIds
from gtpo_jax.layout import gtpo_row_len, sft_layout, trajectory_layout
from gtpo_jax.losses import target_logprobs
from gtpo_jax.memory_plan import planned_model_config
from gtpo_jax.model import ModelConfig, SDARModel
from gtpo_jax.model.config import runtime_options
from gtpo_jax.packing import pack, power_of_two_bucket
from gtpo_jax.plan_costs import ACCELERATORS, count_matmuls, fsdp_comm_bytes, original_layout, visible_tile_fraction
from gtpo_jax.plan_report import ROOFLINE_NOTE, ProgramPlan, gib, extrapolate, largest_arrays, report
from gtpo_jax.rounding import round_up
from gtpo_jax.sampling.decode import TracedSettings, generate_loop
from gtpo_jax.sampling.sampler import BlockDiffusionSampler, SamplerConfig
from gtpo_jax.sharding import BATCH_AXES, build_mesh, optimizer_shardings, param_shardings
from gtpo_jax.trainers.common import make_optimizer, make_update_step
from gtpo_jax.trainers.gtpo_objective import gtpo_loss_fn
from gtpo_jax.trainers.sft import sft_loss_fn, sft_row_len

_DEVICE_FLAG = "--xla_force_host_platform_device_count"


# ---- the model, abstractly ----------------------------------------------------------------
def abstract_params(model_cfg: ModelConfig, mesh):
    """(graphdef, params as sharded ShapeDtypeStructs) — no parameter is ever allocated."""
    model = nnx.eval_shape(lambda: SDARModel(model_cfg, nnx.Rngs(0)))
    shardings = param_shardings(model, mesh)
    graphdef, params = nnx.split(model)

    def with_sharding(var, sharding):
        return var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding))

    return graphdef, jax.tree.map(with_sharding, params, shardings, is_leaf=lambda x: isinstance(x, nnx.Variable))


def _sds(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype), sharding=sharding)


def device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += int(np.prod(shard)) * leaf.dtype.itemsize
    return total


# ---- the shapes each program sees -----------------------------------------------------------
@dataclasses.dataclass
class StepShape:
    micro_batches: int
    rows: int  # per micro-batch, over all devices
    row_len: int
    targets: int  # target slots per micro-batch
    tile_fraction: float  # attention tiles computed / all tiles
    note: str
    clean_len: int = 0  # prompt + response tokens of one sample


def sft_shape(cfg: Config, data_parallel: int, prompt_len: int) -> StepShape:
    """Every sample at data.max_len (prompt_len + response), one per row; targets as masked by a
    typical draw of the configured masking."""
    samples = -(-cfg.train.batch_size // cfg.train.micro_batches)
    m, b = cfg.masking, cfg.block_size
    prompt_len = min(prompt_len, cfg.data.max_len // 2)
    rng = np.random.default_rng(0)
    response = cfg.data.max_len - prompt_len
    lay = sft_layout(rng.integers(1, 100, prompt_len), rng.integers(1, 100, response), block_size=b, mask_id=0,
                     pad_id=1, rng=rng, lower_p=m.lower_p, upper_p=m.upper_p, mask_sampling=m.mask_sampling,
                     post_num=m.post_num, num_noisy_copies=m.num_noisy_copies)
    row_len = sft_row_len(cfg)
    packed = pack([lay], block_size=b, row_len=row_len)
    frac = visible_tile_fraction(packed, *cfg.model.attention_tiles(row_len))
    return StepShape(cfg.train.micro_batches, round_up(samples, data_parallel), row_len,
                     power_of_two_bucket(samples * lay.num_targets, cfg.train.vocab_chunk), frac,
                     f"{samples} samples/micro-batch of {cfg.data.max_len} tokens (prompt {prompt_len}), "
                     f"one per row, {m.num_noisy_copies} noisy copy", cfg.data.max_len)


def gtpo_shape(cfg: Config, data_parallel: int, prompt_len: int) -> StepShape:
    """Every response at decoding.max_new_tokens with one token committed per forward (the most
    noisy copies a response can have), one response per row."""
    g, b = cfg.gtpo, cfg.block_size
    per_update = g.num_task_per_step * g.num_response_per_task // g.mini_batches
    micro = min(cfg.train.micro_batches, per_update)
    per_micro = -(-per_update // micro)
    new = cfg.decoding.max_new_tokens
    rng = np.random.default_rng(0)
    lay = trajectory_layout(rng.integers(1, 100, prompt_len), rng.integers(1, 100, new), np.arange(1, new + 1),
                            block_size=b, mask_id=0, shrink=g.shrink)
    row_len = gtpo_row_len(cfg.block_size, cfg.decoding.max_new_tokens, prompt_len)
    frac = visible_tile_fraction(pack([lay], block_size=b, row_len=row_len), *cfg.model.attention_tiles(row_len))
    return StepShape(micro, round_up(per_micro, data_parallel), row_len,
                     power_of_two_bucket(per_micro * lay.num_targets, cfg.train.vocab_chunk), frac,
                     f"{per_micro} responses/micro-batch of {new} tokens (prompt {prompt_len}), one per row, "
                     "one token per forward (worst case)", prompt_len + new)


def abstract_batch(shape: StepShape, mesh, per_target: tuple[str, ...], stacked: bool = True) -> dict:
    rows = NamedSharding(mesh, P(None, BATCH_AXES, None) if stacked else P(BATCH_AXES, None))
    replicated = NamedSharding(mesh, P())
    lead = (shape.micro_batches,) if stacked else ()
    grid = lead + (shape.rows, shape.row_len)
    out = {k: _sds(grid, jnp.int32, rows) for k in ("tokens", "positions", "segment", "block", "copy")}
    out["target_index"] = _sds(lead + (shape.targets,), jnp.int32, replicated)
    out["target_token"] = _sds(lead + (shape.targets,), jnp.int32, replicated)
    if stacked:
        out["target_valid"] = _sds(lead + (shape.targets,), jnp.bool_, replicated)
    for name in per_target:
        out[name] = _sds(lead + (shape.targets,), jnp.float32, replicated)
    return out


# ---- compiling one program ------------------------------------------------------------------
def compile_program(name, note, fn, args, *, devices, tile_fraction, tokens, param_bytes=0, optimizer_bytes=0,
                    batch_bytes=0, donate=(), static=None) -> ProgramPlan:
    static = static or {}
    jitted = jax.jit(fn, donate_argnums=donate, static_argnames=tuple(static))
    compiled = jitted.lower(*args, **static).compile()
    mem = compiled.memory_analysis()
    jaxpr = jax.make_jaxpr(lambda *a: fn(*a, **static))(*args)
    count = count_matmuls(jaxpr.jaxpr, tile_fraction)
    return ProgramPlan(
        name, note, devices, param_bytes, optimizer_bytes, batch_bytes, mem.argument_size_in_bytes,
        mem.output_size_in_bytes, mem.alias_size_in_bytes, mem.temp_size_in_bytes, count.flops / devices,
        count.bytes / devices, tokens, flops_per="loop iteration" if count.in_while_loop else "step",
        largest=largest_arrays(compiled.as_text()),
    )


def original_estimate(cfg: Config, model_cfg: ModelConfig, shape: StepShape, mesh, plan: ProgramPlan) -> dict:
    """The same step in the original framework's layout (see plan_costs.original_layout)."""
    m = model_cfg
    per_layer = 2 * m.hidden_size * m.num_heads * m.head_dim + 2 * m.hidden_size * m.num_kv_heads * m.head_dim
    per_layer += 3 * m.hidden_size * m.intermediate_size
    if cfg.stage == "sft":
        clean, copies = cfg.data.max_len, cfg.masking.num_noisy_copies
    else:
        clean, copies = shape.clean_len, cfg.block_size // cfg.gtpo.shrink  # one copy per distinct step of a block
    est = original_layout(hidden=m.hidden_size, layers=m.num_layers, heads=m.num_heads, head_dim=m.head_dim,
                          vocab=m.vocab_size, layer_matmul_params=m.num_layers * per_layer, clean_len=clean,
                          copies_per_sample=copies, samples_per_device=shape.rows // (mesh.shape["data"] * mesh.shape["fsdp"]),
                          micro_batches=shape.micro_batches, compute_bytes=jnp.dtype(m.dtype).itemsize)
    return dict(dataclasses.asdict(est), peak_bytes=plan.param_bytes + plan.optimizer_bytes + est.activation_bytes)


def plan_update_step(cfg: Config, graphdef, params, mesh, shape: StepShape, model_cfg: ModelConfig) -> ProgramPlan:
    tx, _ = make_optimizer(cfg.optim, cfg.train.steps)
    opt_state = jax.tree.map(lambda s, sh: _sds(s.shape, s.dtype, sh), jax.eval_shape(tx.init, params),
                             optimizer_shardings(tx, params, mesh))  # as TrainingSession places them
    if cfg.stage == "sft":
        loss_fn, extra = sft_loss_fn(cfg.train.vocab_chunk, cfg.train.vocab_saved_logits_mb), ("weight",)
    else:
        g = cfg.gtpo
        loss_fn = gtpo_loss_fn(eps_low=g.eps_low, eps_high=g.eps_high, beta=g.beta, use_old_logprobs=g.num_iterations > 1,
                               tis_cap=g.tis_cap, vocab_chunk=cfg.train.vocab_chunk,
                               saved_logits_mb=cfg.train.vocab_saved_logits_mb)
        extra = ("weight", "advantage", "old_logprob", "ref_logprob", "rollout_logprob")
    batch = abstract_batch(shape, mesh, extra)
    step = make_update_step(graphdef, tx, loss_fn)
    devices = mesh.devices.size
    with jax.set_mesh(mesh):  # as TrainingSession.update traces it
        plan = compile_program(
            f"{cfg.stage} update step", shape.note, step, (params, opt_state, batch), devices=devices,
            tile_fraction=shape.tile_fraction, tokens=shape.micro_batches * shape.rows * shape.row_len,
            param_bytes=device_bytes(params), optimizer_bytes=device_bytes(opt_state),
            batch_bytes=device_bytes(batch), donate=(0, 1),
        )
    plan.original = original_estimate(cfg, model_cfg, shape, mesh, plan)
    m = cfg.model
    plan.comm_bytes = fsdp_comm_bytes(
        sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params)), fsdp=mesh.shape["fsdp"], data=mesh.shape["data"],
        compute_bytes=jnp.dtype(m.dtype).itemsize, passes=2 + (m.remat != "none"), micro_batches=shape.micro_batches)
    return plan


def plan_scorer(cfg: Config, graphdef, params, mesh, shape: StepShape) -> ProgramPlan:
    """`gtpo_jax.trajectory.token_logprobs` on one micro-batch's rows (vocabulary chunk 256)."""
    batch = abstract_batch(shape, mesh, (), stacked=False)

    def score(p, b):
        return target_logprobs(nnx.merge(graphdef, p), b, vocab_chunk=256)

    return compile_program("trajectory scorer", "forward only, rows of one update micro-batch", score,
                           (params, batch), devices=mesh.devices.size, tile_fraction=shape.tile_fraction,
                           tokens=shape.rows * shape.row_len, param_bytes=device_bytes(params),
                           batch_bytes=device_bytes(batch))


def plan_sampler(cfg: Config, graphdef, params, mesh, model_cfg: ModelConfig, prompt_len: int,
                 per_device: int) -> ProgramPlan:
    r, b = cfg.decoding, cfg.block_size
    ids = TokenIds(block_size=b, mask_id=model_cfg.vocab_size - 1, pad_id=0, stop_ids=(0,))  # shapes only
    sampler_cfg = SamplerConfig.of(r, ids)
    sampler = BlockDiffusionSampler(nnx.merge(graphdef, params), sampler_cfg, mesh=mesh)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = per_device * dp
    shape = sampler.decode_shape(batch, prompt_len)
    pb, cache_len = shape.prompt_len, shape.cache_len
    rows = NamedSharding(mesh, P(BATCH_AXES))
    args = (params, _sds((batch, pb), jnp.int32, NamedSharding(mesh, P(BATCH_AXES, None))),
            _sds((batch,), jnp.int32, rows), _sds((batch,), jnp.int32, rows),
            _sds((batch, 2), jnp.uint32, NamedSharding(mesh, P(BATCH_AXES, None))), _sds((batch,), jnp.bool_, rows),
            TracedSettings(*[_sds((), jnp.float32, NamedSharding(mesh, P()))] * 4))

    def generate(p, *a, shape):
        return generate_loop(graphdef, p, *a, shape=shape)

    return compile_program(
        "sampler", f"{batch} sequences ({per_device}/device), prompt bucket {pb}, KV cache {cache_len} slots; "
        "FLOPs of one decode forward with the cache full", generate, args, devices=mesh.devices.size,
        tile_fraction=1.0, tokens=batch * 2 * b, param_bytes=device_bytes(params), static={"shape": shape})


# ---- report -------------------------------------------------------------------------------------
def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m gtpo_jax.plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. mesh.fsdp=8")
    parser.add_argument("--devices", type=int, help="device count when a mesh axis is -1")
    parser.add_argument("--accelerator", choices=sorted(ACCELERATORS), default="h100")
    parser.add_argument("--memory-gb", type=float, help="device memory to plan for (default: the accelerator's)")
    parser.add_argument("--programs", default="all", help="comma list of update,scorer,sampler (default: all the "
                        "stage runs: sft -> update; gtpo -> update,scorer,sampler)")
    parser.add_argument("--prompt-len", type=int, default=512, help="prompt tokens of a planned sample")
    parser.add_argument("--sampler-per-device", type=int, default=8, help="sequences per device in the sampler")
    parser.add_argument("--preset", default="sdar_8b", choices=["tiny", "sdar_1_7b", "sdar_8b"],
                        help="architecture to plan when model.path does not exist here (default: sdar_8b)")
    parser.add_argument("--extrapolate-layers", metavar="L1,L2",
                        help="compile L1- and L2-layer copies and extrapolate to the full depth (much faster on small "
                        "machines; e.g. 2,4)")
    parser.add_argument("--json", help="also write the per-program numbers to this file")
    return parser.parse_args(argv)


def device_count(cfg: Config, devices: int | None) -> int:
    sizes = [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor]
    if -1 in sizes:
        if devices is None:
            raise ValueError("the mesh has an axis of -1 (all devices): pass --devices N or set it, e.g. mesh.fsdp=8")
        return devices
    return int(np.prod(sizes))


def _ensure_fake_devices(n: int, argv: list[str]) -> None:
    """Re-execute with n fake CPU devices unless this process already has them (JAX reads the
    flag once, when its CPU backend starts)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if f"{_DEVICE_FLAG}={n}" in flags.split() and os.environ.get("JAX_PLATFORMS") == "cpu":
        return
    flags = " ".join(f for f in flags.split() if not f.startswith(_DEVICE_FLAG))
    # The plan never runs the programs: skip LLVM's expensive optimisations (buffers are unchanged).
    fast = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    env = dict(os.environ, XLA_FLAGS=f"{flags} {fast} {_DEVICE_FLAG}={n}".strip(), JAX_PLATFORMS="cpu")
    os.execve(sys.executable, [sys.executable, "-m", "gtpo_jax.plan", *argv], env)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    try:
        cfg = load_config(Config, args.config, args.overrides)
        n = device_count(cfg, args.devices)
    except (ValueError, TypeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    _ensure_fake_devices(n, argv)
    model_cfg, source = planned_model_config(cfg, fallback=args.preset, **runtime_options(cfg.model))
    mesh = build_mesh(cfg.mesh, devices=jax.devices()[:n])
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    print(source)
    print(f"mesh {dict(mesh.shape)} on {n} fake CPU devices; {model_cfg.param_dtype} master weights, "
          f"{model_cfg.dtype} compute, remat {model_cfg.remat}")
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract_params(model_cfg, mesh)[1]))
    print(f"{count / 1e9:.3f} B parameters")
    wanted = {"sft": ["update"], "gtpo": ["update", "scorer", "sampler"]}[cfg.stage]
    if args.programs != "all":
        wanted = [p.strip() for p in args.programs.split(",")]
    prompt_len = min(args.prompt_len, cfg.data.max_len)
    shape = (sft_shape if cfg.stage == "sft" else gtpo_shape)(cfg, dp, prompt_len)
    q_tile, kv_tile = model_cfg.attention_tiles(shape.row_len)
    print(f"attention tiles {q_tile}x{kv_tile} (JAX kernel) compute {100 * shape.tile_fraction:.0f}% of the tile "
          f"pairs of a planned row of {shape.row_len}")
    memory = args.memory_gb * 1e9 if args.memory_gb else ACCELERATORS[args.accelerator].memory_bytes

    def build(name: str, mcfg: ModelConfig) -> ProgramPlan:
        graphdef, params = abstract_params(mcfg, mesh)
        if name == "update":
            return plan_update_step(cfg, graphdef, params, mesh, shape, mcfg)
        if name == "scorer":
            return plan_scorer(cfg, graphdef, params, mesh, shape)
        return plan_sampler(cfg, graphdef, params, mesh, mcfg, prompt_len, args.sampler_per_device)

    depths = sorted(int(x) for x in args.extrapolate_layers.split(",")) if args.extrapolate_layers else None
    if depths:
        print(f"compiling {depths[0]}- and {depths[1]}-layer copies of the model and extrapolating every per-device "
              f"figure linearly to {model_cfg.num_layers} layers (identical layers: exact for parameters, "
              "optimizer and FLOPs; temporaries assume one more layer adds what the last one did)")
    results, all_fit = [], True
    for name in wanted:
        if depths:
            small, large = (build(name, model_cfg.replace(num_layers=d)) for d in depths)
            plan = extrapolate(small, large, depths, model_cfg.num_layers)
            if plan.original is not None:
                plan.original = original_estimate(cfg, model_cfg, shape, mesh, plan)
        else:
            plan = build(name, model_cfg)
        lines, fits = report(plan, args.accelerator, memory)
        print("\n".join(lines), flush=True)
        all_fit &= fits
        results.append(dict(dataclasses.asdict(plan), peak_bytes=plan.peak_bytes, fits=fits))
    print(ROOFLINE_NOTE)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": source, "parameters": count, "devices": n, "programs": results}, f, indent=1)
    if not all_fit:
        print(f"error: the plan does not fit {gib(memory)} per device; see the largest arrays above "
              "(lower train.micro_batches' rows, enable model.remat, or add devices)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
