"""Everything only a CUDA machine can check, in one command, as a pass/fail table (scripts/gpu_smoke.sh).

Checks run in order; the CPU-capable ones first. On a machine without CUDA the run stops at the
first GPU-only check with a "needs CUDA" line and exit code 2 (0: all passed, 1: a check failed).
JAX gets 40% of each GPU (set before JAX starts), LMDeploy's KV cache 30% of what is left.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback

os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.40")  # before JAX starts: room for the engine
TRAINER_FRACTION, CACHE_FRACTION = float(os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"]), 0.3
NEEDS_CUDA_EXIT = 2


class NeedsCuda(Exception):
    pass


def gpu_count() -> int:
    import jax

    try:
        return len(jax.devices("gpu"))
    except RuntimeError:
        return 0


def check_packages(ctx) -> str:
    import jax
    import torch

    from gtpo_jax.rollout.lmdeploy_patch import check_lmdeploy

    lmdeploy = check_lmdeploy()
    ctx["tmp"] = tempfile.mkdtemp(prefix="gtpo_gpu_smoke_")
    return f"jax {jax.__version__}, torch {torch.__version__}, lmdeploy {lmdeploy.__version__}"


def tiny_policy(vocab_size: int):
    from flax import nnx

    from gtpo_jax.checkpoint import param_tree
    from gtpo_jax.model import ModelConfig, init_model

    model = init_model(ModelConfig.tiny(vocab_size=vocab_size, tie_word_embeddings=True), seed=0)
    return model, param_tree(nnx.state(model, nnx.Param))


def check_bf16_export(ctx) -> str:
    """The tiny policy (vocabulary holding LMDeploy's SDAR mask id) exported as the trainer does."""
    from safetensors import safe_open

    from gtpo_jax.hf_io import export_hf_dir
    from gtpo_jax.rollout.lmdeploy_patch import SDAR_MASK_TOKEN

    model, params = tiny_policy(SDAR_MASK_TOKEN + 16)
    out = os.path.join(ctx["tmp"], "policy")
    export_hf_dir(params, model.cfg, out, dtype="bfloat16")
    with safe_open(os.path.join(out, "model.safetensors"), framework="numpy") as f:
        names = list(f.keys())
        dtypes = {f.get_slice(name).get_dtype() for name in names}
    with open(os.path.join(out, "config.json")) as f:
        torch_dtype = json.load(f)["torch_dtype"]
    assert dtypes == {"BF16"} and torch_dtype == "bfloat16", (dtypes, torch_dtype)
    ctx.update(policy_dir=out, model_cfg=model.cfg, params=params)
    return f"{len(names)} tensors, all BF16; config torch_dtype={torch_dtype}"


def check_cuda(ctx) -> str:
    import jax
    import torch

    n = gpu_count()
    if not n or not torch.cuda.is_available():
        raise NeedsCuda(f"JAX sees {n} GPU(s), torch.cuda.is_available()={torch.cuda.is_available()}")
    jax_cuda = next((p for p in ("13", "12") if any(f"cuda{p}" in m for m in sys.modules)), "?")
    torch_cuda = (torch.version.cuda or "?").split(".")[0]
    assert n == torch.cuda.device_count(), (n, torch.cuda.device_count())
    assert jax_cuda in ("?", torch_cuda), f"JAX's CUDA {jax_cuda} plugin beside torch built for CUDA {torch_cuda}"
    ctx["gpus"] = n
    return f"{n} GPU(s) ({jax.devices()[0].device_kind}); torch CUDA {torch.version.cuda}, JAX plugin CUDA {jax_cuda}"


def _max_diff(a, b) -> float:
    import jax
    import numpy as np

    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _update_step(loss_fn, batch_fn, mesh):
    import jax
    import numpy as np
    from flax import nnx

    from gtpo_jax.config import OptimSection
    from gtpo_jax.model import ModelConfig, init_model
    from gtpo_jax.sharding import shard_micro_batches, shard_model
    from gtpo_jax.trainers.common import make_optimizer, make_update_step

    model = init_model(ModelConfig.tiny(vocab_size=96, tie_word_embeddings=False), seed=0)
    batch = batch_fn()
    if mesh is not None:
        shard_model(model, mesh)
        batch = shard_micro_batches(batch, mesh)
    graphdef, params = nnx.split(model)
    tx, _ = make_optimizer(OptimSection(lr=1e-4), 10)
    params, _, metrics = jax.jit(make_update_step(graphdef, tx, loss_fn))(params, tx.init(params), batch)
    return jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, metrics)


def _compare_sharded(loss_fn, batch_fn, ctx) -> str:
    import jax

    from gtpo_jax.sharding import MeshConfig, build_mesh

    n = ctx["gpus"]
    if n < 2:
        return "1 GPU: nothing to shard (skipped)"
    with jax.default_matmul_precision("highest"):
        single = _update_step(loss_fn, batch_fn, None)
        sharded = _update_step(loss_fn, batch_fn, build_mesh(MeshConfig(data=1, fsdp=n, tensor=1)))
    loss_diff, param_diff = abs(float(single[1]["loss"]) - float(sharded[1]["loss"])), _max_diff(single[0], sharded[0])
    assert loss_diff <= 1e-5 and param_diff <= 1e-5, (loss_diff, param_diff)
    return f"fsdp={n}: |loss diff| {loss_diff:.1e}, max |param diff| {param_diff:.1e}"


def check_sharded_sft(ctx) -> str:
    import numpy as np

    from gtpo_jax.config import Config
    from gtpo_jax.data.tokenizer import TokenIds
    from gtpo_jax.trainers.sft import build_sft_batch, sft_layouts, sft_loss_fn

    def batch_fn():
        cfg = Config(stage="sft", block_size=4)
        cfg.data.synthetic, cfg.data.max_len, cfg.train.micro_batches, cfg.train.vocab_chunk = True, 24, 2, 32
        rng = np.random.default_rng(0)
        samples = [(rng.integers(3, 96, 5 + i).tolist(), rng.integers(3, 96, 9 + i).tolist()) for i in range(8)]
        ids = TokenIds(block_size=cfg.block_size, mask_id=1, pad_id=2, stop_ids=())
        return build_sft_batch(sft_layouts(samples, cfg, ids, step=0), cfg,
                               rows_multiple=ctx["gpus"])[0]

    return _compare_sharded(sft_loss_fn(32), batch_fn, ctx)


def check_sharded_gtpo(ctx) -> str:
    import numpy as np

    from gtpo_jax.rollout.base import Rollout
    from gtpo_jax.trainers.gtpo_objective import build_gtpo_batch, gtpo_loss_fn

    def batch_fn():
        rng = np.random.default_rng(0)
        rollouts = []
        for k, p_len in enumerate([8, 9, 7, 11, 6, 12]):
            r_len = int(rng.integers(4, 10))
            steps = np.arange(1, r_len + 1)  # one token per forward
            rollouts.append(Rollout(prompt=rng.integers(3, 96, p_len), tokens=rng.integers(3, 96, r_len),
                                    step_map=steps, advantage=float(k % 3 - 1),
                                    logprobs=np.log(rng.uniform(0.005, 0.05, r_len)).astype(np.float32)))
        return build_gtpo_batch(rollouts, block_size=4, mask_id=1, shrink=1, loss_norm="round_mean", micro_batches=2,
                                row_len=128, vocab_chunk=32, rows_multiple=ctx["gpus"]).arrays

    return _compare_sharded(gtpo_loss_fn(eps_low=0.2, eps_high=0.28, beta=0.0, use_old_logprobs=False, tis_cap=2.0,
                                         vocab_chunk=32), batch_fn, ctx)


def check_lmdeploy_vs_jax(ctx) -> str:
    """Greedy LMDeploy (bf16 engine on the exported weights) against the greedy JAX sampler (bf16)."""
    import numpy as np

    from gtpo_jax.checkpoint import load_model
    from gtpo_jax.data.tokenizer import TokenIds
    from gtpo_jax.rollout import RolloutSpec
    from gtpo_jax.rollout.jax_backend import JaxRollout
    from gtpo_jax.rollout.lmdeploy_backend import SDAR_MASK_TOKEN, LMDeployRollout
    from gtpo_jax.sampling import DecodingConfig, LMDeployEngineSection

    stop, mask = (SDAR_MASK_TOKEN + 1,), SDAR_MASK_TOKEN
    rc = DecodingConfig(backend="lmdeploy", strategy="low_confidence_dynamic", threshold=0.3, max_new_tokens=24,
                        lmdeploy=LMDeployEngineSection(cache_max_entry_count=CACHE_FRACTION))
    jax_model = load_model(ctx["policy_dir"], param_dtype="bfloat16", dtype="bfloat16")
    spec = RolloutSpec(rc, TokenIds(block_size=4, mask_id=mask, pad_id=mask, stop_ids=stop), ctx["model_cfg"],
                       greedy=True)
    jx = JaxRollout.from_spec(spec, jax_model)
    ld = LMDeployRollout(ctx["policy_dir"], spec, weight_sync="inplace", dtype="bfloat16")
    ctx.update(engine=ld, rollout_cfg=rc, prompts=[[11, 12, 13, 14, 15, 16], [21, 22, 23, 24]])
    a, b = jx.generate(ctx["prompts"], 1, seed=0), ld.generate(ctx["prompts"], 1, seed=0)
    ctx["before"] = b
    compared = 0
    for ga, gb in zip(a, b):
        n = min(len(ga[0].tokens), len(gb[0].tokens))  # LMDeploy's length cap can be P % B shorter
        np.testing.assert_array_equal(ga[0].tokens[:n], gb[0].tokens[:n])
        np.testing.assert_array_equal(ga[0].step_map[:n], gb[0].step_map[:n])
        compared += n
    return f"{compared} tokens and step-map entries identical over {len(a)} prompts"


def check_engine_dtype(ctx) -> str:
    engine = ctx["engine"].engine
    return f"engine model dtype {engine.model_config.dtype} (checked at start-up against bfloat16)"


def check_update_params(ctx) -> str:
    import jax
    import numpy as np

    params = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), ctx["params"])
    start = time.perf_counter()
    ctx["engine"].update_params(params)
    pushed_s = time.perf_counter() - start
    after = ctx["engine"].generate(ctx["prompts"], 1, seed=0)
    changed = sum(not np.array_equal(x[0].tokens, y[0].tokens) for x, y in zip(ctx["before"], after))
    assert changed, "generations unchanged after update_params"
    return f"{changed}/{len(after)} generations changed after an in-place push ({pushed_s:.2f} s)"


def check_memory_plan(ctx) -> str:
    import jax
    import torch

    from gtpo_jax.config import Config
    from gtpo_jax.memory_plan import GIB, plan_memory
    from gtpo_jax.rollout.lmdeploy_backend import engine_kv_tokens

    total = torch.cuda.mem_get_info()[1]
    limit = jax.devices()[0].memory_stats().get("bytes_limit", 0)
    assert abs(limit - TRAINER_FRACTION * total) <= 0.02 * total, (limit, total)
    cfg = Config(stage="gtpo", block_size=4, decoding=ctx["rollout_cfg"])
    cfg.gpu.trainer_fraction = TRAINER_FRACTION
    plan = plan_memory(cfg, ctx["model_cfg"], gpu_bytes=total, num_devices=1)
    got = engine_kv_tokens(ctx["engine"].engine)
    assert got is not None and 0.7 <= got / plan.kv_tokens <= 1.3, (got, plan.kv_tokens)
    return (f"JAX limit {limit / GIB:.1f} of {total / GIB:.1f} GiB; engine KV {got:,d} tokens, "
            f"plan {plan.kv_tokens:,d} ({got / plan.kv_tokens:.2f}x)")


CHECKS = [  # (name, needs CUDA, function)
    ("packages (jax, torch, lmdeploy 0.18)", False, check_packages),
    ("bf16 export of the policy", False, check_bf16_export),
    ("CUDA visible to JAX and torch, one CUDA major", True, check_cuda),
    ("sharded SFT step == single device", True, check_sharded_sft),
    ("sharded GTPO step == single device", True, check_sharded_gtpo),
    ("LMDeploy greedy == JAX sampler greedy (bf16)", True, check_lmdeploy_vs_jax),
    ("LMDeploy engine runs in bf16", True, check_engine_dtype),
    ("update_params in place changes generations", True, check_update_params),
    ("memory plan vs device-reported numbers", True, check_memory_plan),
]


def main() -> int:
    ctx: dict = {}
    rows, code = [], 0
    for name, needs_cuda, fn in CHECKS:
        if needs_cuda and not gpu_count():
            rows.append((name, "needs CUDA", "no CUDA device visible to JAX"))
            code = NEEDS_CUDA_EXIT
            break
        try:
            rows.append((name, "PASS", fn(ctx)))
        except NeedsCuda as e:
            rows.append((name, "needs CUDA", str(e)))
            code = NEEDS_CUDA_EXIT
            break
        except Exception as e:  # noqa: BLE001 - one row per failed check, the run goes on
            traceback.print_exc()
            rows.append((name, "FAIL", f"{type(e).__name__}: {str(e)[:200]}"))
            code = 1
    if ctx.get("engine") is not None:
        ctx["engine"].close()
    if any(status == "FAIL" for _, status, _ in rows):
        code = 1
    width = max(len(r[0]) for r in rows)
    print("\n" + "\n".join(f"{n:<{width}}  {s:<10}  {d}" for n, s, d in rows))
    if code == NEEDS_CUDA_EXIT:
        print(f"\nneeds CUDA: stopped before '{rows[-1][0]}' (no GPU here); "
              "run scripts/gpu_smoke.sh on a CUDA machine with .[gpu,lmdeploy]")
    return code


if __name__ == "__main__":
    sys.exit(main())
