"""Joining JAX's multi-controller runtime: the same program in every process, one global mesh.

Every process runs the same host-side pipeline (same data order, same layouts, same DAPO
decisions) and feeds only its own devices' share of each global array
(`gtpo_jax.sharding.put_global`); what must agree exactly across processes and could differ
(grader time-outs) is broadcast from process 0. Metrics, HF exports and log lines come from
process 0; Orbax saves and restores with all of them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from orbax.checkpoint import multihost

log = logging.getLogger("gtpo_jax")


@dataclasses.dataclass
class DistributedSection:
    # host:port of process 0's coordinator; None with num_processes 1 = a single process.
    coordinator_address: Optional[str] = None
    num_processes: int = 1  # processes in the run (each runs the same command)
    process_id: int = 0  # this process's rank, 0 .. num_processes - 1 (0 hosts the coordinator)
    # Let JAX find the cluster's settings itself (SLURM, Open MPI, Kubernetes, Cloud TPU).
    cluster_detection: bool = False
    initialization_timeout_s: int = 300  # seconds to wait for every process to join
    # A process silent this long (crashed, killed, hung host) makes the others fail.
    heartbeat_timeout_s: int = 60


_barriers = 0
ENV_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def resolve(section: DistributedSection) -> DistributedSection:
    """The section with the launcher's environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
    JAX_PROCESS_ID, as scripts/launch_local.py and the README's multi-node recipe set) applied."""
    env = {k: os.environ[k] for k in ENV_VARS if os.environ.get(k)}
    out = dataclasses.replace(section)
    if "JAX_COORDINATOR_ADDRESS" in env:
        out.coordinator_address = env["JAX_COORDINATOR_ADDRESS"]
    if "JAX_NUM_PROCESSES" in env:
        out.num_processes = int(env["JAX_NUM_PROCESSES"])
    if "JAX_PROCESS_ID" in env:
        out.process_id = int(env["JAX_PROCESS_ID"])
    return out


def initialize(section: DistributedSection) -> bool:
    """Start the distributed runtime when the run spans several processes; True if it did.

    Must run before any JAX computation. CPU devices talk through gloo (the tests' and the
    launcher's localhost set-up); GPUs use NCCL whatever this says.
    """
    s = resolve(section)
    if s.num_processes == 1 and not s.cluster_detection:
        return False
    if not s.cluster_detection:
        if not s.coordinator_address:
            raise ValueError(
                f"distributed.num_processes={s.num_processes} needs distributed.coordinator_address (host:port of "
                "process 0), or JAX_COORDINATOR_ADDRESS in the environment, or distributed.cluster_detection=true "
                "under SLURM / Open MPI")
        if not 0 <= s.process_id < s.num_processes:
            raise ValueError(f"distributed.process_id must be in [0, {s.num_processes}), got {s.process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(initialization_timeout=s.initialization_timeout_s, heartbeat_timeout_seconds=s.heartbeat_timeout_s)
    if s.cluster_detection:
        jax.distributed.initialize(**kwargs)
    else:
        jax.distributed.initialize(s.coordinator_address, num_processes=s.num_processes, process_id=s.process_id,
                                   **kwargs)
    log.info("process %d of %d: %d local devices, %d global", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return True


def barrier(name: str, timeout_s: float = 600.0) -> None:
    """Wait until every process gets here (no-op with one). It uses the coordination service, not
    a device collective: CPU (gloo) collectives give up when processes arrive more than 30 s
    apart, which uneven host work (process 0 writing shared files, slow start-up) can exceed."""
    if jax.process_count() == 1:
        return
    global _barriers
    _barriers += 1  # every process passes the same barriers in the same order: unique, agreed ids
    # Orbax's public barrier over the coordination service (its sync_global_processes would use a
    # device collective for an all-process barrier).
    multihost.get_barrier_sync_fn()(key=f"gtpo_jax:{_barriers}:{name}", timeout_ms=int(timeout_s * 1000))


def broadcast_from_first(tree):
    """Process 0's value of a pytree of numpy arrays, on every process (identity with one)."""
    if jax.process_count() == 1:
        return tree
    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))
