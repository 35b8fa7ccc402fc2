"""LMDeploy 0.18's step maps and rollout log-probs, recorded without a fork (docs/algorithm.md §2).

Released LMDeploy returns neither: its outputs only
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
built in-process (`enable_mp_engine=False`, what the backend does, also for tensor parallelism:
only model workers are other processes), so nothing has to cross a process boundary. The wrapper is
idempotent, refuses LMDeploy versions other than 0.18.x, and never changes the engine's behaviour.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import numpy as np

from gtpo_jax.rollout.base import Rollout

SUPPORTED_VERSIONS = ("0.18",)  # major.minor prefixes
SDAR_MASK_TOKEN = 151669  # lmdeploy/pytorch/configurations/sdar.py (0.18)
_PATCH_FLAG = "_gtpo_step_map_patch"


class LMDeployUnavailableError(RuntimeError):
    """LMDeploy missing, of an unsupported version, or no CUDA device."""


def check_lmdeploy() -> Any:
    """Import LMDeploy and check its version; return the module."""
    try:
        import lmdeploy  # GPU-only extra, imported lazily
    except ImportError as e:
        raise LMDeployUnavailableError(
            f"decoding.backend=lmdeploy needs LMDeploy {'/'.join(v + '.x' for v in SUPPORTED_VERSIONS)}: "
            f"pip install '.[lmdeploy]' on a CUDA machine ({e})"
        ) from e
    version = str(getattr(lmdeploy, "__version__", "unknown"))
    if not any(version == v or version.startswith(v + ".") for v in SUPPORTED_VERSIONS):
        raise LMDeployUnavailableError(
            f"LMDeploy {version} is not supported: the step-map patch is written against "
            f"{', '.join(v + '.x' for v in SUPPORTED_VERSIONS)} (pip install '.[lmdeploy]'); "
            "use decoding.backend=jax otherwise"
        )
    return lmdeploy


def check_cuda() -> None:
    import torch  # GPU-only extra, imported lazily

    if not torch.cuda.is_available():
        raise LMDeployUnavailableError(
            "decoding.backend=lmdeploy needs a CUDA GPU (LMDeploy's PyTorch engine runs Triton kernels); "
            "none is visible here. Use decoding.backend=jax on this machine."
        )


# --------------------------------------------------------------------------- step-map recording


@dataclasses.dataclass
class StepRecord:
    """What one sequence's forwards committed: absolute position -> forward index / raw log-prob."""

    counter: int = 0  # forwards that committed at least one slot (docs/algorithm.md §2 counting rule)
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
    from lmdeploy.pytorch import consts  # GPU-only extra, imported lazily
    from lmdeploy.pytorch.messages import MessageStatus  # GPU-only extra, imported lazily

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
    from lmdeploy.pytorch.strategies.dllm import sequence as dllm_sequence  # GPU-only extra, imported lazily

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
    from lmdeploy.pytorch.strategies.dllm import sequence as dllm_sequence  # GPU-only extra, imported lazily

    cls = dllm_sequence.DLLMSequenceStrategy
    if getattr(cls.update_running, _PATCH_FLAG, False):
        cls.update_running = cls.update_running.__wrapped_original__
