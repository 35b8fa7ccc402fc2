"""Cost models behind `gtpo_jax.plan`: matmul FLOPs and bytes counted on the jaxpr, the
visible fraction of attention tiles, accelerators, and the roofline estimate of a step.

Why not `compiled.cost_analysis()` alone: XLA counts the body of a `while` loop once, and every
program here loops (micro-batches under `lax.scan`, attention tiles under `lax.map`, vocabulary
chunks, the sampler's decode loop). Counting `dot_general`s on the jaxpr with each scan's trip
count applied gives the real per-step matmul work; a `cond` (the attention kernel's tile skip)
counts its largest branch times the fraction of tiles that some query can see.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from jax.extend import core

from gtpo_jax.layout import PackedBatch


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float  # dense bf16 FLOP/s
    hbm_bytes_per_s: float
    memory_bytes: float  # HBM capacity
    link_bytes_per_s: float  # per-GPU NVLink bandwidth, one direction, within a node of 8
    node_link_bytes_per_s: float = 50e9  # per-GPU InfiniBand (400 Gb/s) between nodes


# Vendor datasheet numbers (SXM parts; dense, no sparsity).
ACCELERATORS = {
    "h100": Accelerator("H100 SXM 80GB", 989e12, 3.35e12, 80e9, 450e9),
    "h200": Accelerator("H200 SXM 141GB", 989e12, 4.8e12, 141e9, 450e9),
    "a100": Accelerator("A100 SXM 80GB", 312e12, 2.039e12, 80e9, 300e9),
}
GPUS_PER_NODE = 8


@dataclasses.dataclass
class MatmulCount:
    flops: float = 0.0
    bytes: float = 0.0  # operands + result of every matmul (no reuse between them assumed)
    in_while_loop: bool = False  # some matmuls sit in a while loop, counted for one iteration

    def add(self, other: "MatmulCount", times: float = 1.0) -> None:
        self.flops += times * other.flops
        self.bytes += times * other.bytes
        self.in_while_loop |= other.in_while_loop


def _nbytes(aval) -> int:
    return int(np.prod(aval.shape)) * aval.dtype.itemsize


def _sub_jaxprs(value):
    if isinstance(value, core.ClosedJaxpr):
        yield value.jaxpr
    elif isinstance(value, core.Jaxpr):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _sub_jaxprs(v)


def count_matmuls(jaxpr: core.Jaxpr, visible_tile_fraction: float = 1.0) -> MatmulCount:
    total = MatmulCount()
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs, rhs, out = eqn.invars[0].aval, eqn.invars[1].aval, eqn.outvars[0].aval
            contract = int(np.prod([lhs.shape[i] for i in lhs_contract]))
            total.flops += 2.0 * int(np.prod(out.shape)) * contract
            total.bytes += _nbytes(lhs) + _nbytes(rhs) + _nbytes(out)
        elif name == "scan":
            total.add(count_matmuls(eqn.params["jaxpr"].jaxpr, visible_tile_fraction), eqn.params["length"])
        elif name == "while":
            body = count_matmuls(eqn.params["body_jaxpr"].jaxpr, visible_tile_fraction)
            body.in_while_loop = True
            total.add(body)
        elif name == "cond":
            branches = [count_matmuls(b.jaxpr, visible_tile_fraction) for b in eqn.params["branches"]]
            total.add(max(branches, key=lambda c: c.flops), visible_tile_fraction)
        else:
            for value in eqn.params.values():
                for sub in _sub_jaxprs(value):
                    total.add(count_matmuls(sub, visible_tile_fraction))
    return total


def visible_tile_fraction(batch: PackedBatch, q_tile: int, kv_tile: int) -> float:
    """Fraction of (query tile, key tile) pairs of a packed row in which some query sees some
    key — the tiles the attention kernel computes; the others are skipped."""
    seg, blk, cp = (np.asarray(a[0]) for a in (batch.segment, batch.block, batch.copy))
    length = len(seg)
    nq, nk = math.ceil(length / q_tile), math.ceil(length / kv_tile)
    pad = nk * kv_tile - length
    ks, kb, kc = (np.pad(a, (0, pad)) for a in (seg, blk, cp))
    visible = 0
    for i in range(nq):
        sl = slice(i * q_tile, min((i + 1) * q_tile, length))
        qs, qb, qc = seg[sl, None], blk[sl, None], cp[sl, None]
        see = (qs == ks) & (ks > 0) & (((kc == 0) & (kb < qb)) | ((kc == qc) & (kb == qb)))
        visible += int(see.reshape(len(qs), nk, kv_tile).any(axis=(0, 2)).sum())
    return visible / (nq * nk)


@dataclasses.dataclass
class Roofline:
    compute_s: float
    hbm_s: float
    comm_s: float

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.hbm_s, self.comm_s)

    @property
    def bound(self) -> str:
        return {self.compute_s: "compute", self.hbm_s: "memory", self.comm_s: "communication"}[self.step_s]


def fsdp_comm_bytes(param_count: int, *, fsdp: int, data: int, compute_bytes: int, passes: int,
                    micro_batches: int) -> float:
    """Bytes each device sends per step: FSDP all-gathers of the compute-dtype weights (one per
    pass over the layers: forward, rematerialised forward, backward), a float32 gradient
    reduce-scatter per micro-batch, and a float32 all-reduce of the gradient shard over `data`."""
    out = 0.0
    if fsdp > 1:
        ring = (fsdp - 1) / fsdp
        out += micro_batches * ring * param_count * (passes * compute_bytes + 4)
    if data > 1:
        out += 2 * (data - 1) / data * param_count / max(fsdp, 1) * 4
    return out


def roofline(acc: Accelerator, *, flops: float, hbm_bytes: float, comm_bytes: float, devices: int) -> Roofline:
    """Per-device step time: max(FLOPs / peak, bytes / HBM bandwidth, bytes sent / link
    bandwidth) — perfect overlap, full peak; real steps are slower (MFU < 1)."""
    link = acc.link_bytes_per_s if devices <= GPUS_PER_NODE else acc.node_link_bytes_per_s
    return Roofline(flops / acc.peak_flops, hbm_bytes / acc.hbm_bytes_per_s, comm_bytes / link)


@dataclasses.dataclass
class OriginalLayoutEstimate:
    """Analytic per-device numbers for the original PyTorch framework's layout on the same
    mesh, model, precision and remat: every sequence is [noisy copy; clean copy] (2L tokens)
    with a dense 2L×2L additive mask, logits over the full vocabulary at all 2L positions,
    and for GTPO one such sequence per trajectory step copy (the clean half recomputed each
    time). Attention is a fused kernel that takes the dense mask (no score matrix stored, but
    every tile computed)."""

    sequences_per_device: int  # per micro-batch
    sequence_len: int
    activation_bytes: float  # per micro-batch
    flops: float  # per device, per step


def original_layout(*, hidden: int, layers: int, heads: int, head_dim: int, vocab: int, layer_matmul_params: int,
                    clean_len: int, copies_per_sample: int, samples_per_device: int, micro_batches: int,
                    compute_bytes: int = 2) -> OriginalLayoutEstimate:
    seq = 2 * clean_len
    n_seq = samples_per_device * copies_per_sample
    per_seq = (
        2 * seq * seq  # the bf16 additive mask [2L, 2L]
        + layers * seq * hidden * compute_bytes  # each layer's input, kept by full remat
        + 2 * seq * vocab * 4  # float32 logits at every position and their gradient
    )
    # forward + rematerialised forward + backward (2x) for the layers; the head is not rematerialised
    layer_flops = 4 * 2 * layer_matmul_params * seq + 4 * layers * 4 * seq * seq * heads * head_dim
    head_flops = 3 * 2 * seq * hidden * vocab
    return OriginalLayoutEstimate(n_seq, seq, n_seq * per_seq, micro_batches * n_seq * (layer_flops + head_flops))
