"""Where the update step's time goes: the top XLA ops of bench_train's compiled step by CPU time.

Runs the step of `bench_train.build_jax_step` (same workload, same inputs) under `jax.profiler`
with XLA's per-op trace events on (`--xla_cpu_enable_xprof_traceme`, set here only: it is a
profiling switch), then sums each op's exclusive time (its events minus the events nested in
them, e.g. a while loop minus its body's ops) over all threads: that is CPU time of the threads
that run XLA ops. Ops inside loops add up over their iterations. `--dump DIR` also writes the
optimized HLO there and prints, under each top op, its HLO line (shape, fusion kind) and the
opcodes of the computation it calls (e.g. `exponential×2 reduce×1`).
Usage: python scripts/profile_train.py [--length 1024] [--steps 1] [--top 25] [--dump DIR]
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import sys
import tempfile


# Trace events of threads that wait for others (not work): left out of the sums.
WAITS = ("ThunkExecutor::Execute (wait for completion)", "SlinkyThreadPool::Await")


def exclusive_times(events) -> dict[str, list]:
    """{name: [exclusive ns, count]} for one trace line's events (nested events are children)."""
    out: dict[str, list] = collections.defaultdict(lambda: [0, 0])
    stack: list[list] = []  # [name, end_ns, child_ns]

    def close(item):
        name, start, end, child = item
        out[name][0] += (end - start) - child
        out[name][1] += 1
        if stack:
            stack[-1][3] += end - start

    for e in sorted(events, key=lambda e: (e.start_ns, -e.duration_ns)):
        while stack and stack[-1][2] <= e.start_ns:
            close(stack.pop())
        stack.append([e.name, e.start_ns, e.start_ns + e.duration_ns, 0])
    while stack:
        close(stack.pop())
    return out


def _table(text: str, header: str) -> list[str]:
    """The lines of one of the optimized HLO dump's trailing tables (FileNames, StackFrames, ...)."""
    m = re.search(rf"^{header}\n((?:.+\n)*)", text, re.M)
    return m.group(1).splitlines() if m else []


def source_places(text: str) -> dict[int, str]:
    """{stack_frame_id: 'file.py:function'} of the innermost frame inside gtpo_jax (else the
    innermost frame at all), from the tables the HLO dump carries."""
    files = {int(i): n.strip('"').split("/")[-1] for i, n in (ln.split(" ", 1) for ln in _table(text, "FileNames"))}
    funcs = {int(i): n.strip('"') for i, n in (ln.split(" ", 1) for ln in _table(text, "FunctionNames"))}
    inside = {int(i): ("gtpo_jax/" in n, n) for i, n in (ln.split(" ", 1) for ln in _table(text, "FileNames"))}
    locs = {}
    for ln in _table(text, "FileLocations"):
        i, f, fn = re.match(r"(\d+) \{file_name_id=(\d+) function_name_id=(\d+)", ln).groups()
        locs[int(i)] = (int(f), int(fn))
    frames = {}
    for ln in _table(text, "StackFrames"):
        i, loc, parent = map(int, re.match(r"(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)", ln).groups())
        frames[i] = (loc, parent)
    out = {}
    for frame in frames:
        chain, cur = [], frame
        while cur in frames and cur not in chain:
            chain.append(cur)
            cur = frames[cur][1]
        places = [locs[frames[c][0]] for c in chain if frames[c][0] in locs]
        ours = [p for p in places if inside[p[0]][0]] or places
        if ours:
            out[frame] = f"{files[ours[0][0]]}:{funcs[ours[0][1]]}"
    return out


def hlo_index(dump_dir: str) -> tuple[dict[str, str], dict[str, collections.Counter], dict[str, str]]:
    """From the optimized HLO of the step: {instruction name: its line}, {computation name:
    opcode counts of its instructions} and {instruction name: source place}."""
    paths = sorted(glob.glob(os.path.join(dump_dir, "*after_optimizations.txt")), key=os.path.getsize)
    text = open(paths[-1]).read() if paths else ""
    places = source_places(text)
    lines, ops, where, comp = {}, collections.defaultdict(collections.Counter), {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            comp = head.group(1)
        inst = re.match(r"^\s+(?:ROOT )?%?([\w.\-]+) = (\S+) ([\w\-]+)\(", line)
        if inst:
            lines[inst.group(1)] = line.strip()
            ops[comp][inst.group(3)] += 1
            frame = re.search(r"stack_frame_id=(\d+)", line)
            if frame and int(frame.group(1)) in places:
                where[inst.group(1)] = places[int(frame.group(1))]
    return lines, ops, where


def describe(name: str, lines: dict, ops: dict) -> str:
    line = lines.get(name)
    if line is None:
        return ""
    called = re.search(r"(?:calls|to_apply|body)=%?([\w.\-]+)", line)
    inner = ""
    if called and called.group(1) in ops:
        counts = ops[called.group(1)]
        inner = " [" + " ".join(f"{k}×{v}" for k, v in counts.most_common() if k not in ("parameter", "constant")) + "]"
    text = re.sub(r", metadata=\{.*?\}", "", line)
    return f"{text[:160]}{inner}"


def op_times(trace_dir: str) -> dict[str, list]:
    """{op name: [exclusive ns, count]} summed over the CPU threads of a jax.profiler trace,
    the waiting events (`WAITS`) left out."""
    import jax

    paths = [os.path.join(d, f) for d, _, fs in os.walk(trace_dir) for f in fs if f.endswith(".xplane.pb")]
    data = jax.profiler.ProfileData.from_file(paths[0])
    total: dict[str, list] = collections.defaultdict(lambda: [0, 0])
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            if line.name.startswith("python") or "Python" in line.name:
                continue
            for name, (ns, count) in exclusive_times(list(line.events)).items():
                total[name][0] += ns
                total[name][1] += count
    for name in WAITS:
        total.pop(name, None)
    return total


def run_trace(length: int, steps: int, dump: str | None) -> str:
    """Compile bench_train's step, run it once, then `steps` times under the profiler; the trace's directory."""
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true"
    if dump:
        flags += f" --xla_dump_to={dump} --xla_dump_hlo_module_re=.*step.*"
    os.environ["XLA_FLAGS"] = flags
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax
    from bench_train import WORKLOADS, build_jax_step

    step, params, opt_state, batch, _, _ = build_jax_step("gtpo", length, WORKLOADS["update"])
    compiled = step.lower(params, opt_state, batch).compile()
    params, opt_state, m = compiled(params, opt_state, batch)
    jax.block_until_ready(m)
    trace_dir = tempfile.mkdtemp(prefix="profile_train_")
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            params, opt_state, m = compiled(params, opt_state, batch)
        jax.block_until_ready(m)
    return trace_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=1024, help="response tokens (bench_train's update workload)")
    ap.add_argument("--steps", type=int, default=1, help="profiled steps after one warm-up step")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--dump", help="also write the optimized HLO of the step into this directory")
    ap.add_argument("--trace", help="read this earlier run's trace directory (with its --dump and --steps) instead")
    args = ap.parse_args()
    trace_dir = args.trace or run_trace(args.length, args.steps, args.dump)
    print(f"trace: {trace_dir}")
    total = op_times(trace_dir)
    lines, ops, where = hlo_index(args.dump) if args.dump else ({}, {}, {})
    grand = sum(ns for ns, _ in total.values())
    print(f"all ops: {grand / 1e9 / args.steps:.2f} CPU-s/step (event durations: inflated when the machine is loaded)")
    if where:
        by_place: dict[str, int] = collections.Counter()
        for name, (ns, _) in total.items():
            by_place[where.get(name, "(runtime, not an HLO op)" if name not in lines else "(no source)")] += ns
        print(f"{'CPU-s/step':>10} {'share':>6}  source of the ops")
        for place, ns in by_place.most_common(args.top):
            print(f"{ns / 1e9 / args.steps:10.3f} {100 * ns / grand:5.1f}%  {place}")
    print(f"{'CPU-s/step':>10} {'share':>6} {'calls/step':>10}  op")
    for name, (ns, count) in sorted(total.items(), key=lambda kv: -kv[1][0])[: args.top]:
        print(f"{ns / 1e9 / args.steps:10.3f} {100 * ns / grand:5.1f}% {count / args.steps:10.0f}  {name}")
        if name in lines:
            print(f"{'':30}{where.get(name, '')}  {describe(name, lines, ops)}")


if __name__ == "__main__":
    main()
