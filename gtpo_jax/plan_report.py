"""What `python -m gtpo_jax.plan` reports about one compiled program, and how it prints it."""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from gtpo_jax.plan_costs import ACCELERATORS, roofline


@dataclasses.dataclass
class ProgramPlan:
    name: str
    note: str
    devices: int
    param_bytes: int  # per device
    optimizer_bytes: int
    batch_bytes: int
    argument_bytes: int  # memory_analysis: all inputs
    output_bytes: int
    alias_bytes: int  # outputs written into donated inputs
    temp_bytes: int  # activations and other temporaries
    flops: float  # per device, per step (matmuls)
    matmul_bytes: float
    tokens: int  # per step, all devices (padding included)
    comm_bytes: float = 0.0
    flops_per: str = "step"
    largest: list = dataclasses.field(default_factory=list)
    original: dict | None = None  # analytic numbers of the original framework's layout

    @property
    def peak_bytes(self) -> int:
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


_HLO_ARRAY = re.compile(r"= (\w+)\[([\d,]*)\]\{[^}]*\} (\w[\w-]*)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_ITEMSIZE = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "s8": 1, "u8": 1, "f64": 8, "s64": 8}


def largest_arrays(hlo_text: str, top: int = 5) -> list[str]:
    """The biggest values the compiled (per-device) program materialises, with their source op."""
    found = {}
    for line in hlo_text.splitlines():
        m = _HLO_ARRAY.search(line)
        if m is None:
            continue
        dtype, dims, opcode = m.groups()
        name = _OP_NAME.search(line)
        op_name = name.group(1) if name else None
        if dtype not in _ITEMSIZE or opcode in ("parameter", "bitcast", "get-tuple-element", "tuple"):
            continue
        shape = [int(d) for d in dims.split(",") if d]
        nbytes = int(np.prod(shape)) * _ITEMSIZE[dtype]
        key = (dtype, tuple(shape), op_name or opcode)
        found[key] = nbytes
    ranked = sorted(found.items(), key=lambda kv: -kv[1])[:top]
    return [f"{gib(n)} {d}{list(s)} from {src}" for (d, s, src), n in ranked]


_LINEAR_FIELDS = ("param_bytes", "optimizer_bytes", "batch_bytes", "argument_bytes", "output_bytes", "alias_bytes",
                  "temp_bytes", "flops", "matmul_bytes", "comm_bytes")


def extrapolate(small: ProgramPlan, large: ProgramPlan, depths: list[int], layers: int) -> ProgramPlan:
    """Per-device figures of a `layers`-deep model from plans of two shallower copies."""
    (d1, d2), out = depths, dataclasses.replace(large)
    for name in _LINEAR_FIELDS:
        a, b = getattr(small, name), getattr(large, name)
        value = b + (b - a) / (d2 - d1) * (layers - d2)
        setattr(out, name, type(b)(round(value)) if isinstance(b, int) else value)
    out.note += f" [extrapolated from {d1} and {d2} layers]"
    return out


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**26 else f"{n / 2**20:.1f} MiB"


def flop(n: float) -> str:
    return f"{n / 1e12:.1f} TFLOP" if n >= 1e11 else f"{n / 1e9:.2f} GFLOP"


def report(plan: ProgramPlan, accelerator: str, memory_bytes: float) -> tuple[list[str], bool]:
    acc = ACCELERATORS[accelerator]
    est = roofline(acc, flops=plan.flops, hbm_bytes=plan.matmul_bytes, comm_bytes=plan.comm_bytes,
                   devices=plan.devices)
    fits = plan.peak_bytes <= memory_bytes
    intensity = plan.flops / max(plan.matmul_bytes, 1)
    lines = [
        f"== {plan.name}: {plan.note}",
        f"   per device: parameters {gib(plan.param_bytes)}, optimizer {gib(plan.optimizer_bytes)}, "
        f"batch {gib(plan.batch_bytes)} | compiled: arguments {gib(plan.argument_bytes)}, "
        f"temporaries {gib(plan.temp_bytes)}, outputs {gib(plan.output_bytes)} "
        f"(aliased into donated inputs {gib(plan.alias_bytes)}) -> peak {gib(plan.peak_bytes)} "
        f"of {gib(memory_bytes)}: {'fits' if fits else 'DOES NOT FIT'}",
        f"   per {plan.flops_per}: {plan.tokens} tokens (all devices), {flop(plan.flops)}/device (matmuls), "
        f"{plan.matmul_bytes / 1e9:.2f} GB matmul operand traffic/device, arithmetic intensity {intensity:.0f} FLOP/B"
        + (f", {plan.comm_bytes / 1e9:.1f} GB FSDP traffic/device" if plan.comm_bytes else ""),
        f"   estimated time on {acc.name}: {est.step_s:.3g} s ({est.bound}-bound; compute {est.compute_s:.3g} s, "
        f"HBM {est.hbm_s:.3g} s, interconnect {est.comm_s:.3g} s)",
    ]
    if plan.original:
        o = plan.original
        lines.append(
            f"   original framework's layout (analytic): {o['sequences_per_device']} sequences of {o['sequence_len']} "
            f"tokens/device/micro-batch, peak >= {gib(o['peak_bytes'])}, {flop(o['flops'])}/device, "
            f">= {o['flops'] / acc.peak_flops:.3g} s at peak FLOP/s (ours at peak: {est.compute_s:.3g} s)")
    if not fits:
        lines.append("   largest arrays: " + "; ".join(plan.largest))
    return lines, fits


ROOFLINE_NOTE = (
    "roofline: time = max(matmul FLOPs / peak bf16 FLOP/s, matmul operand bytes / HBM bandwidth, FSDP bytes sent / "
    "link bandwidth) per device, perfect overlap at full peak — a lower bound; expect 40-60% of peak in practice"
)
