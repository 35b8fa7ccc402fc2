"""Rollouts split across processes: each process's engine generates its share of a step's prompts
(one LMDeploy engine per node), then every process receives all of them, in prompt order, so that
all train on the same data. The JAX sampler needs none of this: it runs as one program over the
global mesh and returns the same rollouts on every process."""

from __future__ import annotations

import pickle
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from gtpo_jax.distributed import barrier
from gtpo_jax.rollout.base import Rollout, RolloutBackend


def share(num_prompts: int, process: int, num_processes: int) -> range:
    """Contiguous prompt indices process `process` generates (sizes differ by at most one)."""
    base, extra = divmod(num_prompts, num_processes)
    start = process * base + min(process, extra)
    return range(start, start + base + (process < extra))


def allgather_bytes(payload: bytes) -> list[bytes]:
    """Every process's `payload`, in process order, on every process (byte strings of any length).

    A coordination-service barrier first: engines finish their shares at different times, and CPU
    (gloo) collectives give up when processes arrive more than 30 s apart."""
    barrier("rollouts generated")
    data = np.frombuffer(payload, np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [gathered[p, :int(n)].tobytes() for p, n in enumerate(sizes)]


class ProcessSplitRollout(RolloutBackend):
    """`backend` (this process's engine) generates this process's share; `generate` returns the whole
    step on every process. `update_params` and `pause` go to the local engine (each has its own)."""

    def __init__(self, backend: RolloutBackend):
        self.backend = backend

    def generate(self, prompts: Sequence[Sequence[int]], n: int, *, seed: int) -> list[list[Rollout]]:
        process, count = jax.process_index(), jax.process_count()
        mine = share(len(prompts), process, count)
        # A seed per process: the shares are different requests, and must not repeat one stream.
        local = self.backend.generate([prompts[i] for i in mine], n, seed=seed * count + process) if len(mine) else []
        # pickle: the rollouts of our own processes of one job (numpy arrays, text), never foreign data
        parts = [pickle.loads(b) for b in allgather_bytes(pickle.dumps(local, protocol=pickle.HIGHEST_PROTOCOL))]
        groups = [group for part in parts for group in part]
        if len(groups) != len(prompts):
            raise RuntimeError(f"gathered {len(groups)} rollout groups for {len(prompts)} prompts")
        return groups

    def update_params(self, params) -> None:
        self.backend.update_params(params)

    def pause(self) -> None:
        self.backend.pause()

    def close(self) -> None:
        self.backend.close()
