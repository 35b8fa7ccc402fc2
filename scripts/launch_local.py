"""Start N processes of one gtpo_jax command on this machine, as a cluster manager would.

    python scripts/launch_local.py --nproc 2 [--cpu-devices 4] -- python -m gtpo_jax.train --config X.yaml ...

Each process gets JAX_COORDINATOR_ADDRESS (a free localhost port), JAX_NUM_PROCESSES and
JAX_PROCESS_ID (read by `gtpo_jax.distributed`); with --cpu-devices, JAX_PLATFORMS=cpu and that
many CPU devices per process. Output lines are prefixed with the process id. When one process
fails, the others are stopped after --grace seconds (they usually fail on their own first, through
the runtime's heartbeat) and the launcher exits with the first failure's code, naming it.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def relay(proc: subprocess.Popen, rank: int) -> None:
    for line in proc.stdout:
        sys.stdout.write(f"[{rank}] {line}")
        sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, required=True, help="number of processes")
    ap.add_argument("--cpu-devices", type=int, default=0, help="run on the CPU with this many devices per process")
    ap.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    ap.add_argument("--grace", type=float, default=30.0, help="seconds the others get to exit after a failure")
    ap.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every process runs")
    args = ap.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.nproc < 1:
        ap.error("give --nproc >= 1 and a command after --")
    address = f"localhost:{args.port or free_port()}"
    procs, relays = [], []
    for rank in range(args.nproc):
        env = dict(os.environ, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=str(args.nproc),
                   JAX_PROCESS_ID=str(rank), PYTHONUNBUFFERED="1")
        if args.cpu_devices:
            flags = [f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
            env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={args.cpu_devices}"])
            env["JAX_PLATFORMS"] = "cpu"
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)
        procs.append(proc)
        relays.append(threading.Thread(target=relay, args=(proc, rank), daemon=True))
        relays[-1].start()
    failed: tuple[int, int] | None = None
    deadline = None
    try:
        while any(p.poll() is None for p in procs):
            for rank, p in enumerate(procs):
                if failed is None and p.poll() not in (None, 0):
                    failed = (rank, p.returncode)
                    deadline = time.monotonic() + args.grace
                    print(f"launch_local: process {rank} exited with code {p.returncode}; stopping the others "
                          f"within {args.grace:.0f} s", file=sys.stderr, flush=True)
            if deadline is not None and time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        os.killpg(p.pid, signal.SIGKILL)
            time.sleep(0.2)
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        raise
    for t in relays:
        t.join(timeout=5)
    if failed is None:
        failed = next(((r, p.returncode) for r, p in enumerate(procs) if p.returncode), None)
    if failed is not None:
        print(f"launch_local: failed: process {failed[0]} (exit code {failed[1]})", file=sys.stderr)
        return failed[1] if failed[1] > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
