"""LMDeploy (PyTorch engine, dLLM path) as a GTPO rollout engine, with step maps.

Only this module and `lmdeploy_patch` import LMDeploy, lazily: the core runs without it (`pip
install .[lmdeploy]`, CUDA machines only). Supported: LMDeploy 0.18.x, the release whose decoding
rules docs/algorithm.md §2 copies. Step maps and rollout log-probs come from `lmdeploy_patch`.


Weights between RL steps: `Engine.update_params` (0.18: model_agent `update_params`, the RLHF
path; tensors go as CUDA IPC handles, `lmdeploy.utils.serialize_state_dict`), in buckets, the
last with `finished=True` so LMDeploy re-ties the embedding; if that fails, the policy is exported
with `hf_io.export_hf_dir` to a directory and the engine rebuilt from it. Both paths cast to the
engine's dtype (the trainer's compute dtype, bf16) on the devices and gather one tensor at a time,
so parameters sharded across processes work. With gpu.sharing=sleep, `pause()` puts the engine to
sleep (level 2) for the trainer's update and the next push wakes it (weights, push, KV cache).

Limits: GPU only. LMDeploy 0.18 hard-codes the SDAR mask token to 151669
(`configurations/sdar.py`), so the tokenizer's mask id must be that one. No tail is returned
(`Rollout.tail_tokens is None`; docs/algorithm.md §3 masks the last block's unknown slots). A length-capped
output may be up to P % B tokens shorter than `max_new_tokens` (LMDeploy's block-granular budget).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import tempfile
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import numpy as np

from gtpo_jax.checkpoint import param_tree
from gtpo_jax.conversion import orbax_to_hf
from gtpo_jax.distributed import barrier
from gtpo_jax.hf_io import export_hf_dir, host_tensors, read_hf_config, remove_weight_files
from gtpo_jax.model.params import nnx_to_hf
from gtpo_jax.rollout.base import Rollout, RolloutBackend, RolloutSpec
from gtpo_jax.rollout.lmdeploy_patch import (  # noqa: F401 - re-exported: the bridge's public names
    _PATCH_FLAG,
    _RECORDS,
    SDAR_MASK_TOKEN,
    SUPPORTED_VERSIONS,
    LMDeployUnavailableError,
    StepRecord,
    check_cuda,
    check_lmdeploy,
    install_step_map_patch,
    record_forward,
    rollout_from_record,
    uninstall_step_map_patch,
)

log = logging.getLogger("gtpo_jax")
_BUCKET_BYTES = 512 << 20
ENGINE_DTYPES = ("bfloat16", "float16")  # what LMDeploy's PyTorch engine computes in


# --------------------------------------------------------------------------- weights


def hf_named_tensors(params: Any, model_cfg, dtype: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Our parameter tree (nnx.State or nested dict) as HF-named host arrays in `dtype`, one at a
    time: cast on the devices, gathered when they span processes (every process must iterate)."""
    for path, array in host_tensors(param_tree(params), dtype):
        yield nnx_to_hf(path, array, model_cfg)


def _torch_cuda(array: np.ndarray):
    import torch  # GPU-only extra, imported lazily

    if array.dtype.name == "bfloat16":  # ml_dtypes: move the bits
        return torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16).cuda()
    return torch.from_numpy(np.ascontiguousarray(array)).cuda()


def _buckets(named: Iterable[tuple[str, np.ndarray]], limit: int) -> Iterator[list[tuple[str, np.ndarray]]]:
    bucket, size = [], 0
    for name, array in named:
        bucket.append((name, array))
        size += array.nbytes
        if size >= limit:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def engine_dtype(compute_dtype: str) -> str:
    """The engine's dtype for a trainer computing in `compute_dtype` (never LMDeploy's `auto`, which
    turns an fp32 checkpoint into float16)."""
    if compute_dtype not in ENGINE_DTYPES:
        raise ValueError(f"rollouts run in the trainer's compute dtype, but LMDeploy computes only in {ENGINE_DTYPES} "
                         f"and model.dtype is {compute_dtype}; set model.dtype=bfloat16 or use decoding.backend=jax")
    return compute_dtype


def check_engine_dtype(engine, want: str) -> None:
    """After start-up: the dtype the engine really runs in (its model config) is `want`."""
    got = str(getattr(engine.model_config, "dtype", "unknown")).removeprefix("torch.")
    if got != want:
        raise RuntimeError(f"LMDeploy started in {got}, not {want} (the trainer's compute dtype); the GPU may lack "
                           f"{want} support, use decoding.backend=jax there")


def engine_kv_tokens(engine) -> int | None:
    """KV-cache tokens the engine allocated (0.18: GPU blocks × tokens per block), None if unknown."""
    cache = getattr(engine, "cache_config", None)
    blocks, size = getattr(cache, "num_gpu_blocks", None), getattr(cache, "block_size", None)
    return int(blocks) * int(size) if blocks and size else None


# --------------------------------------------------------------------------- backend


class LMDeployRollout(RolloutBackend):
    """docs/algorithm.md §2 decoding on LMDeploy's in-process PyTorch engine, returning `Rollout`s with step maps
    and raw rollout log-probs (no tail), in `dtype` (weights pushed and engine checked in it).
    `sleep_during_update`: `pause()` puts the engine to sleep (level 2: weights and KV cache freed)
    and the next `update_params` wakes it (weights, push, then KV cache)."""

    def __init__(self, model_dir: str, spec: RolloutSpec, *, tokenizer=None, weight_sync: str = "auto",
                 export_dir: str | None = None, dtype: str = "bfloat16", sleep_during_update: bool = False):
        check_lmdeploy()
        check_cuda()
        mask_id = spec.ids.mask_id
        if mask_id != SDAR_MASK_TOKEN:
            raise ValueError(f"LMDeploy 0.18 uses mask token id {SDAR_MASK_TOKEN} for SDAR models, but the tokenizer's "
                             f"mask id is {mask_id}; use decoding.backend=jax for this vocabulary")
        if weight_sync not in ("auto", "inplace", "reload"):
            raise ValueError(f"weight_sync must be auto, inplace or reload, got {weight_sync!r}")
        install_step_map_patch()
        self.model_dir, self.block_size, self.cfg = model_dir, spec.ids.block_size, spec.decoding
        self.stop_ids, self.mask_id, self.greedy = [int(s) for s in spec.ids.stop_ids], mask_id, spec.greedy
        self.model_cfg, self.tokenizer, self.weight_sync = spec.model_cfg, tokenizer, weight_sync
        self.export_dir, self.assets_dir = export_dir, spec.hf_assets_dir
        self.source_config = _source_config(spec.hf_assets_dir)
        self.dtype, self.sleep_during_update, self.asleep = engine_dtype(dtype), sleep_during_update, False
        self._sessions = itertools.count(1 << 20)
        self._loop = asyncio.new_event_loop()
        self.engine = self._build_engine(model_dir)

    def engine_config(self):
        from lmdeploy import PytorchEngineConfig  # GPU-only extra, imported lazily

        c = self.cfg
        return PytorchEngineConfig(
            tp=c.lmdeploy.tensor_parallel, cache_max_entry_count=c.lmdeploy.cache_max_entry_count, enable_mp_engine=False,
            dtype=self.dtype, logprobs_mode="raw_logprobs", dllm_block_length=self.block_size,
            dllm_unmasking_strategy=c.strategy, dllm_denoising_steps=c.denoising_steps,
            dllm_confidence_threshold=c.threshold,
        )

    def generation_config(self, seed: int):
        from lmdeploy import GenerationConfig  # GPU-only extra, imported lazily

        c = self.cfg
        # The bare Engine ignores `do_sample` (only the pipeline maps it to top_k=1): greedy is top_k=1,
        # keeping the temperature, which still shapes the confidences (as in the JAX sampler).
        return GenerationConfig(
            n=1, do_sample=not self.greedy, temperature=c.temperature, top_k=1 if self.greedy else c.top_k,
            top_p=1.0 if self.greedy else c.top_p,
            max_new_tokens=c.max_new_tokens, min_new_tokens=c.min_new_tokens or None,
            stop_token_ids=list(self.stop_ids), ignore_eos=False, random_seed=seed, logprobs=1,
            skip_special_tokens=False,
        )

    def _build_engine(self, model_dir: str):
        from lmdeploy.pytorch.engine import Engine  # GPU-only extra, imported lazily

        trust = self.cfg.lmdeploy.trust_remote_code
        try:
            engine = Engine.from_pretrained(model_dir, engine_config=self.engine_config(), trust_remote_code=trust)
        except Exception as e:  # noqa: BLE001 — re-raised, with the fix when it is the missing opt-in
            if trust or "trust_remote_code" not in str(e):
                raise
            raise RuntimeError(
                f"LMDeploy needs to run Python code shipped in {model_dir} (config.json's auto_map) to load this "
                "model, and decoding.lmdeploy.trust_remote_code is false. Set "
                "decoding.lmdeploy.trust_remote_code=true only if you "
                f"trust that code. ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
            ) from e
        check_engine_dtype(engine, self.dtype)
        return engine

    async def _one(self, instance, prompt: list[int], seed: int) -> Rollout:
        from lmdeploy.messages import ResponseType  # GPU-only extra, imported lazily

        session_id = next(self._sessions)
        _RECORDS[session_id] = rec = StepRecord()
        tokens: list[int] = []
        finish = "length"
        try:
            async for out in instance.async_stream_infer(session_id, prompt, gen_config=self.generation_config(seed)):
                if out.status not in (ResponseType.SUCCESS, ResponseType.FINISH):
                    raise RuntimeError(f"LMDeploy request failed: {out.status}")
                tokens += list(out.token_ids)
            await instance.async_end(session_id)
        finally:
            _RECORDS.pop(session_id, None)
        if tokens and tokens[-1] in self.stop_ids:
            finish = "stop"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True) if self.tokenizer is not None else ""
        return rollout_from_record(prompt, tokens, rec, finish, text=text)

    async def _agenerate(self, prompts: Sequence[Sequence[int]], n: int, seed: int) -> list[list[Rollout]]:
        instance = self.engine.create_instance()
        jobs = [self._one(instance, [int(t) for t in p], seed * 1_000_003 + i * n + j)
                for i, p in enumerate(prompts) for j in range(n)]
        flat = await asyncio.gather(*jobs)
        return [list(flat[i * n:(i + 1) * n]) for i in range(len(prompts))]

    def generate(self, prompts: Sequence[Sequence[int]], n: int, *, seed: int) -> list[list[Rollout]]:
        if self.asleep:
            raise RuntimeError("the engine is asleep: update_params wakes it (call it before generating)")
        return self._loop.run_until_complete(self._agenerate(prompts, n, seed))

    def pause(self) -> None:
        """Free the engine's GPU memory for the trainer's update (gpu.sharing=sleep)."""
        if self.sleep_during_update and not self.asleep:
            self._loop.run_until_complete(self.engine.sleep(2))
            self.asleep = True

    def update_params(self, params) -> None:
        if self.model_cfg is None:
            raise ValueError("update_params needs model_cfg (the trainer's ModelConfig)")
        if self.weight_sync in ("auto", "inplace"):
            try:
                self._update_inplace(params)
                return
            except Exception as e:  # noqa: BLE001 - fall back to a reload, or re-raise when asked for inplace
                if self.weight_sync == "inplace":
                    raise
                log.warning("in-place weight update failed (%s); exporting and reloading", e)
                self.weight_sync = "reload"
        self._update_reload(params)

    def _update_inplace(self, params) -> None:
        from lmdeploy.utils import serialize_state_dict  # GPU-only extra, imported lazily

        if self.asleep:  # level 2: the weights are rebuilt empty, then filled by the push below
            self.engine.wakeup(["weights"])
        named = hf_named_tensors(params, self.model_cfg, self.dtype)
        buckets = list(_buckets(named, _BUCKET_BYTES)) or [[]]
        for i, bucket in enumerate(buckets):
            state = {name: _torch_cuda(array) for name, array in bucket}
            request = SimpleNamespace(serialized_named_tensors=serialize_state_dict(state), load_format=None,
                                      finished=i == len(buckets) - 1)
            self.engine.update_params(request)
            del state
        if self.asleep:
            self.engine.wakeup(["kv_cache"])
            self.asleep = False

    def _update_reload(self, params) -> None:
        out = self.export_dir or tempfile.mkdtemp(prefix="gtpo_lmdeploy_")
        export_hf_dir(param_tree(params), self.model_cfg, out, dtype=self.dtype, source_config=self.source_config,
                      assets_dir=self.assets_dir)
        self.engine.close()
        self.model_dir, self.engine, self.asleep = out, self._build_engine(out), False

    def close(self) -> None:
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.close()
        if not self._loop.is_closed():
            self._loop.close()


# --------------------------------------------------------------------------- factories (gtpo_jax.rollout)


def _source_config(assets_dir: str | None) -> dict | None:
    """The policy's HF config.json (fields the export keeps), when its assets directory holds one."""
    if assets_dir and os.path.isfile(os.path.join(assets_dir, "config.json")):
        return read_hf_config(assets_dir)
    return None


def make_backend(spec: RolloutSpec, params, *, tokenizer=None, work_dir: str, sleep_during_update: bool = False,
                 check_memory: Callable[[], Any] | None = None) -> LMDeployRollout:
    """Training: export the current policy `params` once in the trainer's compute dtype
    (`spec.model_cfg.dtype`; every process gathers, process 0 writes) to `<work_dir>/lmdeploy_policy`
    with `spec.hf_assets_dir`'s config and tokenizer, start this process's engine on it; later steps
    push weights with `update_params`. The export's weight files are removed once every engine has
    loaded them (config and tokenizer stay), so a run keeps no copy of the policy on disk.
    `check_memory()` (the trainer's GPU memory plan: raises when it cannot fit) runs before the export."""
    check_lmdeploy()
    check_cuda()
    dtype = engine_dtype(spec.model_cfg.dtype)
    plan = check_memory() if check_memory is not None else None
    out = os.path.join(work_dir, "lmdeploy_policy")
    export_hf_dir(param_tree(params), spec.model_cfg, out, dtype=dtype, source_config=_source_config(spec.hf_assets_dir),
                  assets_dir=spec.hf_assets_dir)
    backend = LMDeployRollout(out, spec, tokenizer=tokenizer, export_dir=out, dtype=dtype,
                              sleep_during_update=sleep_during_update)
    tokens = engine_kv_tokens(backend.engine)
    log.info("engine KV cache: %s tokens (plan: %s)", "unknown" if tokens is None else f"{tokens:,d}",
             "none" if plan is None else f"{plan.kv_tokens:,d}")
    barrier("rollout engines started")
    if jax.process_index() == 0:
        remove_weight_files(out)
    return backend


def make_backend_for_eval(spec: RolloutSpec, model_path: str, *, tokenizer, work_dir: str,
                          dtype: str) -> LMDeployRollout:
    """Evaluation: `model_path` as is when it is an HF directory, else its Orbax checkpoint exported
    to `<work_dir>/lmdeploy_model`; the engine runs in `dtype` (model.dtype)."""
    check_lmdeploy()
    check_cuda()
    dtype = engine_dtype(dtype)
    if not os.path.isfile(os.path.join(model_path, "config.json")):
        out = os.path.join(work_dir, "lmdeploy_model")
        orbax_to_hf(model_path, out, dtype=dtype)
        model_path = out
    return LMDeployRollout(model_path, spec, tokenizer=tokenizer, dtype=dtype)
