"""Matmul FLOPs of a compiled XLA program, loops counted by their trip counts.

`compiled.cost_analysis()["flops"]` counts the body of every while loop once, whatever its trip
count, so for a step built from `lax.scan` / `lax.map` (micro-batches, vocabulary chunks,
attention tiles) it under-counts by the trip counts. This walks the optimized HLO text instead:
every `dot` and `convolution` contributes 2 · |output| · |contracted dims| FLOPs, multiplied by
the known trip counts of the while loops around it. A `conditional` (the attention's
skip-this-tile test) is counted at its costliest branch times `conditional_weight` — the
fraction of those conditionals that take the compute branch, which the caller measures from the
layout (elementwise FLOPs — exp, adds — are not counted at all: this is a matmul count).
"""

from __future__ import annotations

import re

_COMPUTATION = re.compile(r"^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$")
_SHAPE = re.compile(r"^\w+\[([\d,]*)\]")


def _dims(shape: str) -> list[int]:
    m = _SHAPE.match(shape)
    return [int(d) for d in m.group(1).split(",") if d] if m else []


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _parse(hlo: str):
    comps, entry, current = {}, None, None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = comps.setdefault(m.group(1), [])
            if line.startswith("ENTRY"):
                entry = m.group(1)
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            current.append((m.group(1), m.group(2), m.group(3), m.group(4)))
    return comps, entry


def _dot_flops(out_shape: str, rest: str, shapes: dict) -> int:
    operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
    lhs = _dims(shapes.get(operands[0], "")) if operands else []
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", rest)
    k = _prod(lhs[int(i)] for i in contracting.group(1).split(",") if i) if contracting and lhs else 1
    return 2 * _prod(_dims(out_shape)) * k


def matmul_flops(hlo: str, conditional_weight: float = 1.0) -> float:
    comps, entry = _parse(hlo)
    memo: dict[str, float] = {}

    def cost(name: str) -> float:
        if name in memo:
            return memo[name]
        memo[name] = 0.0  # cycle guard
        instrs = comps.get(name, [])
        shapes = {n: s for n, s, _, _ in instrs}
        total = 0.0
        for _, shape, op, rest in instrs:
            if op in ("dot", "convolution"):
                total += _dot_flops(shape, rest, shapes)
            elif op == "while":
                body = re.search(r"body=%?([\w.\-]+)", rest).group(1)
                trips = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', rest)
                if trips is None:
                    raise ValueError(f"while loop {body} has no known trip count; cannot count its FLOPs")
                total += int(trips.group(1)) * cost(body)
            elif op == "conditional":
                branches = re.search(r"branch_computations=\{([^}]*)\}", rest)
                names = [b.strip().lstrip("%") for b in branches.group(1).split(",")] if branches else []
                if not names:  # true_computation= / false_computation= form
                    names = re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", rest)
                total += conditional_weight * max((cost(b) for b in names), default=0.0)
            else:
                for callee in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", rest):
                    if op in ("fusion", "call", "custom-call", "async-start"):
                        total += cost(callee)
        memo[name] = total
        return total

    return cost(entry)
