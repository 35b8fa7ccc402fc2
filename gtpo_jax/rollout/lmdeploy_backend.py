"""LMDeploy (PyTorch engine, dLLM path) as a GTPO rollout engine, with step maps.

Only this module imports LMDeploy, lazily: the core runs without it (`pip install .[lmdeploy]`,
CUDA machines only). Supported: LMDeploy 0.18.x, the release whose decoding rules SPEC §2 copies.

Step maps and rollout log-probs (SPEC §2). Released LMDeploy returns neither: its outputs only
say which tokens a finished block holds, and its logprobs are those of the forward that *completed*
the block, not of the forward that committed each token. Both facts live in the engine process,
in one place: `DLLMSequenceStrategy.update_running` (pytorch/strategies/dllm/sequence.py) is
called once per forward with the running sequences (their dLLM mask *before* the forward:
`seq.dllm_mask`, whose last block is the block just processed) and the forward's outputs
(`extra_outputs.dllm_mask`: that block's mask *after* unmasking; `logprobs`: raw log-probs of the
sampled token of every slot, computed before `post_sampling`, so equal to the committed token's for
a slot committed now). `install_step_map_patch` wraps that one method: before delegating, it diffs
the two masks of each sequence our backend registered (`record_forward`, a pure function) and keeps
a per-session `StepRecord` in this process; the backend reads it once the request finishes. The
scheduler, the engine loop and the sequence objects live in the caller's process when the engine is
built in-process (`enable_mp_engine=False`, what this backend does, also for tensor parallelism:
only model workers are other processes), so nothing has to cross a process boundary. The wrapper is
idempotent, refuses LMDeploy versions other than 0.18.x, and never changes the engine's behaviour.

Weights between RL steps: `Engine.update_params` (0.18: model_agent `update_params`, the RLHF
path; tensors go as CUDA IPC handles, `lmdeploy.utils.serialize_state_dict`), in buckets, the
last with `finished=True` so LMDeploy re-ties the embedding; if that fails, the policy is exported
with `write_hf_dir` to a directory and the engine rebuilt from it.

Limits: GPU only. LMDeploy 0.18 hard-codes the SDAR mask token to 151669
(`configurations/sdar.py`), so the tokenizer's mask id must be that one. No tail is returned
(`Rollout.tail_tokens is None`; SPEC §3 masks the last block's unknown slots). A length-capped
output may be up to P % B tokens shorter than `max_new_tokens` (LMDeploy's block-granular budget).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
import os
import tempfile
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from gtpo_jax.rollout.base import Rollout, RolloutBackend

SUPPORTED_VERSIONS = ("0.18",)  # major.minor prefixes
SDAR_MASK_TOKEN = 151669  # lmdeploy/pytorch/configurations/sdar.py (0.18)
_PATCH_FLAG = "_gtpo_step_map_patch"
_BUCKET_BYTES = 512 << 20


class LMDeployUnavailableError(RuntimeError):
    """LMDeploy missing, of an unsupported version, or no CUDA device."""


def check_lmdeploy() -> Any:
    """Import LMDeploy and check its version; return the module."""
    try:
        import lmdeploy
    except ImportError as e:
        raise LMDeployUnavailableError(
            f"rollout.backend=lmdeploy needs LMDeploy {'/'.join(v + '.x' for v in SUPPORTED_VERSIONS)}: "
            f"pip install '.[lmdeploy]' on a CUDA machine ({e})"
        ) from e
    version = str(getattr(lmdeploy, "__version__", "unknown"))
    if not any(version == v or version.startswith(v + ".") for v in SUPPORTED_VERSIONS):
        raise LMDeployUnavailableError(
            f"LMDeploy {version} is not supported: the step-map patch is written against "
            f"{', '.join(v + '.x' for v in SUPPORTED_VERSIONS)} (pip install '.[lmdeploy]'); "
            "use rollout.backend=jax otherwise"
        )
    return lmdeploy


def check_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise LMDeployUnavailableError(
            "rollout.backend=lmdeploy needs a CUDA GPU (LMDeploy's PyTorch engine runs Triton kernels); "
            "none is visible here. Use rollout.backend=jax on this machine."
        )


# --------------------------------------------------------------------------- step-map recording


@dataclasses.dataclass
class StepRecord:
    """What one sequence's forwards committed: absolute position -> forward index / raw log-prob."""

    counter: int = 0  # forwards that committed at least one slot (SPEC §2 counting rule)
    forwards: int = 0  # all forwards that processed the sequence
    steps: dict[int, int] = dataclasses.field(default_factory=dict)
    logprobs: dict[int, float] = dataclasses.field(default_factory=dict)


def record_forward(rec: StepRecord, block_start: int, was_masked: np.ndarray, now_masked: np.ndarray,
                   logprobs: np.ndarray | None = None) -> np.ndarray:
    """Book one forward of one sequence: slots masked before and not after were committed by it.

    Returns the committed slots (block-relative). A forward committing nothing (e.g. the pass that
    writes a finished block's keys/values) is counted in `forwards` only.
    """
    was_masked, now_masked = np.asarray(was_masked, bool), np.asarray(now_masked, bool)
    if was_masked.shape != now_masked.shape:
        raise ValueError(f"mask shapes differ: {was_masked.shape} vs {now_masked.shape}")
    if np.any(now_masked & ~was_masked):
        raise ValueError("a committed slot became masked again: the engine's bookkeeping is not the one patched")
    rec.forwards += 1
    committed = np.flatnonzero(was_masked & ~now_masked)
    if committed.size:
        rec.counter += 1
        for slot in committed.tolist():
            rec.steps[block_start + slot] = rec.counter
            if logprobs is not None:
                rec.logprobs[block_start + slot] = float(logprobs[slot])
    return committed


def rollout_from_record(prompt: Sequence[int], tokens: Sequence[int], rec: StepRecord, finish_reason: str,
                        *, with_logprobs: bool = True, text: str = "") -> Rollout:
    """A `Rollout` from an engine output (generated ids) and the record of its forwards."""
    start = len(prompt)
    positions = range(start, start + len(tokens))
    missing = [p - start for p in positions if p not in rec.steps]
    if missing:
        raise RuntimeError(f"no committing forward recorded for response token(s) {missing[:5]}: "
                           "the step-map patch did not see this request")
    steps = np.asarray([rec.steps[p] for p in positions], np.int32)
    lps = None
    if with_logprobs and all(p in rec.logprobs for p in positions):
        lps = np.asarray([rec.logprobs[p] for p in positions], np.float32)
    return Rollout(prompt=np.asarray(prompt, np.int32), tokens=np.asarray(tokens, np.int32), step_map=steps,
                   logprobs=lps, tail_tokens=None, tail_steps=None, finish_reason=finish_reason, text=text,
                   num_forwards=rec.forwards)


_RECORDS: dict[int, StepRecord] = {}  # session id -> record; only sessions our backend registered


def _to_numpy(x) -> np.ndarray:
    return x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)


def _book_batch(running: Sequence[Any], batched_outputs: Any) -> None:
    """Record one engine forward for the registered sequences of `running` (before the original
    `update_running` rewrites their masks)."""
    from lmdeploy.pytorch import consts
    from lmdeploy.pytorch.messages import MessageStatus

    if not running or not any(getattr(m, "session_id", None) in _RECORDS for m in running):
        return
    new_masks = _to_numpy(batched_outputs.extra_outputs.dllm_mask).reshape(len(running), -1)
    block = new_masks.shape[1]
    lp = getattr(batched_outputs, "logprobs", None)
    lp_vals = None if lp is None else _to_numpy(lp.vals)
    if lp_vals is not None and lp_vals.shape[0] != len(running) * block:
        lp_vals = None  # not one row per slot (another logprobs mode): leave log-probs out
    for idx, msg in enumerate(running):
        rec = _RECORDS.get(msg.session_id)
        if rec is None or msg.status != MessageStatus.RUNNING:
            continue
        old = np.asarray(msg.dllm_mask)[-block:]
        block_start = msg.num_history_ids + msg.num_token_ids - block
        row = None if lp_vals is None else lp_vals[idx * block:(idx + 1) * block, 0]
        record_forward(rec, block_start, old == consts.DLLM_MASKED, new_masks[idx] == consts.DLLM_MASKED, row)


def install_step_map_patch() -> None:
    """Wrap `DLLMSequenceStrategy.update_running` once (version-checked; idempotent)."""
    check_lmdeploy()
    from lmdeploy.pytorch.strategies.dllm import sequence as dllm_sequence

    cls = dllm_sequence.DLLMSequenceStrategy
    original = cls.update_running
    if getattr(original, _PATCH_FLAG, False):
        return

    @functools.wraps(original)
    def update_running(self, running, batched_outputs, model_inputs, delta, **kwargs):
        _book_batch(running, batched_outputs)
        return original(self, running, batched_outputs, model_inputs, delta, **kwargs)

    setattr(update_running, _PATCH_FLAG, True)
    update_running.__wrapped_original__ = original
    cls.update_running = update_running


def uninstall_step_map_patch() -> None:
    from lmdeploy.pytorch.strategies.dllm import sequence as dllm_sequence

    cls = dllm_sequence.DLLMSequenceStrategy
    if getattr(cls.update_running, _PATCH_FLAG, False):
        cls.update_running = cls.update_running.__wrapped_original__


# --------------------------------------------------------------------------- weights


def hf_named_tensors(params: Any, model_cfg) -> Iterator[tuple[str, np.ndarray]]:
    """Our parameter tree (nnx.State or nested dict) as HF-named host arrays, one at a time."""
    from gtpo_jax.checkpoint import param_tree
    from gtpo_jax.model.params import iter_nested, nnx_to_hf

    for path, array in iter_nested(param_tree(params)):
        yield nnx_to_hf(path, np.asarray(array), model_cfg)


def _torch_cuda(array: np.ndarray):
    import torch

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


# --------------------------------------------------------------------------- backend


class LMDeployRollout(RolloutBackend):
    """SPEC §2 decoding on LMDeploy's in-process PyTorch engine, returning `Rollout`s with step maps
    and raw rollout log-probs (no tail)."""

    def __init__(self, model_dir: str, *, block_size: int, rollout_cfg, stop_ids: Sequence[int], mask_id: int,
                 model_cfg=None, tokenizer=None, greedy: bool = False, weight_sync: str = "auto",
                 export_dir: str | None = None, source_config: Mapping[str, Any] | None = None,
                 assets_dir: str | None = None):
        check_lmdeploy()
        check_cuda()
        if mask_id != SDAR_MASK_TOKEN:
            raise ValueError(f"LMDeploy 0.18 uses mask token id {SDAR_MASK_TOKEN} for SDAR models, but the tokenizer's "
                             f"mask id is {mask_id}; use rollout.backend=jax for this vocabulary")
        if weight_sync not in ("auto", "inplace", "reload"):
            raise ValueError(f"weight_sync must be auto, inplace or reload, got {weight_sync!r}")
        install_step_map_patch()
        self.model_dir, self.block_size, self.cfg = model_dir, block_size, rollout_cfg
        self.stop_ids, self.mask_id, self.greedy = [int(s) for s in stop_ids], mask_id, greedy
        self.model_cfg, self.tokenizer, self.weight_sync = model_cfg, tokenizer, weight_sync
        self.export_dir, self.source_config, self.assets_dir = export_dir, source_config, assets_dir
        self._sessions = itertools.count(1 << 20)
        self._loop = asyncio.new_event_loop()
        self.engine = self._build_engine(model_dir)

    def engine_config(self):
        from lmdeploy import PytorchEngineConfig

        c = self.cfg
        return PytorchEngineConfig(
            tp=c.tensor_parallel, cache_max_entry_count=c.cache_max_entry_count, enable_mp_engine=False,
            logprobs_mode="raw_logprobs", dllm_block_length=self.block_size, dllm_unmasking_strategy=c.strategy,
            dllm_denoising_steps=c.denoising_steps, dllm_confidence_threshold=c.threshold,
        )

    def generation_config(self, seed: int):
        from lmdeploy import GenerationConfig

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
        from lmdeploy.pytorch.engine import Engine

        return Engine.from_pretrained(model_dir, engine_config=self.engine_config(), trust_remote_code=True)

    async def _one(self, instance, prompt: list[int], seed: int) -> Rollout:
        from lmdeploy.messages import ResponseType

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
        return self._loop.run_until_complete(self._agenerate(prompts, n, seed))

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
                import logging

                logging.getLogger(__name__).warning("in-place weight update failed (%s); exporting and reloading", e)
                self.weight_sync = "reload"
        self._update_reload(params)

    def _update_inplace(self, params) -> None:
        from types import SimpleNamespace

        from lmdeploy.utils import serialize_state_dict

        named = (kv for kv in hf_named_tensors(params, self.model_cfg))
        buckets = list(_buckets(named, _BUCKET_BYTES)) or [[]]
        for i, bucket in enumerate(buckets):
            state = {name: _torch_cuda(array) for name, array in bucket}
            request = SimpleNamespace(serialized_named_tensors=serialize_state_dict(state), load_format=None,
                                      finished=i == len(buckets) - 1)
            self.engine.update_params(request)
            del state

    def _update_reload(self, params) -> None:
        from gtpo_jax.hf_io import write_hf_dir

        out = self.export_dir or tempfile.mkdtemp(prefix="gtpo_lmdeploy_")
        from gtpo_jax.checkpoint import param_tree

        write_hf_dir(param_tree(params), self.model_cfg, out, source_config=self.source_config,
                     assets_dir=self.assets_dir)
        self.engine.close()
        self.model_dir, self.engine = out, self._build_engine(out)

    def close(self) -> None:
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.close()
        if not self._loop.is_closed():
            self._loop.close()


# --------------------------------------------------------------------------- factories (gtpo_jax.rollout)


def make_backend(cfg, session) -> LMDeployRollout:
    """Training: export the session's current policy once, start the engine on it; later steps
    push weights with `update_params`."""
    from gtpo_jax.checkpoint import param_tree
    from gtpo_jax.hf_io import write_hf_dir

    check_lmdeploy()
    check_cuda()
    source = session._source_hf_config() if hasattr(session, "_source_hf_config") else None
    out = os.path.join(cfg.output_dir, "lmdeploy_policy")
    write_hf_dir(param_tree(session.params), session.model_cfg, out, source_config=source,
                 assets_dir=session.tokenizer_dir)
    return LMDeployRollout(out, block_size=cfg.block_size, rollout_cfg=cfg.rollout, stop_ids=session.stop_ids,
                           mask_id=session.mask_id, model_cfg=session.model_cfg, tokenizer=session.tokenizer,
                           export_dir=out, source_config=source, assets_dir=session.tokenizer_dir)


def make_backend_for_eval(cfg, tokenizer) -> LMDeployRollout:
    """Evaluation: `cfg.model.path` as is when it is an HF directory, else its Orbax checkpoint
    exported to `<output_dir>/lmdeploy_model`."""
    from gtpo_jax.checkpoint import orbax_to_hf
    from gtpo_jax.data.tokenizer import mask_token_id, stop_token_ids

    check_lmdeploy()
    check_cuda()
    path = cfg.model.path
    if not path:
        raise ValueError("evaluation needs model.path (an HF directory or an Orbax checkpoint)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        out = os.path.join(cfg.output_dir, "lmdeploy_model")
        orbax_to_hf(path, out)
        path = out
    greedy = getattr(cfg, "greedy", None)
    if greedy is None:
        greedy = cfg.eval.greedy
    return LMDeployRollout(path, block_size=cfg.block_size, rollout_cfg=cfg.rollout,
                           stop_ids=stop_token_ids(tokenizer), mask_id=mask_token_id(tokenizer),
                           tokenizer=tokenizer, greedy=bool(greedy))
