"""`Grader`: math-verify grading with a per-item time limit, in reusable worker processes.

Why processes: sympy can hang or blow up on a pathological answer, and math-verify's own
timeouts use signal.alarm, which only works in a main thread and cannot stop C code. A worker
that overruns is killed and replaced; the item scores 0 with status "timeout". Nothing raises
into the trainer: a crash or an exception scores 0 with status "error".

Workers are fresh interpreters (`python -c ...` via subprocess, talking over a socketpair),
not forks of the caller, which may hold JAX and its threads, and not multiprocessing's spawn
or forkserver, which re-import the caller's `__main__` in every worker (slow for a trainer,
fatal for an unguarded script). Starting one does not block: it imports math-verify (~0.6 s)
while the caller carries on, and workers are reused across `grade` calls.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing.connection as mpc
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Callable, Sequence

from gtpo_jax.rewards.answers import STATUSES, GradeResult, grade_answer

log = logging.getLogger("gtpo_jax")

GradeFn = Callable[[str, str], GradeResult]
_MAX_START_FAILURES = 3  # workers in a row that die before they are ready: a setup problem
_START_LIMIT_S = 120.0  # a worker that has not loaded its imports by then is replaced


def _worker_entry() -> None:
    """`python -c` entry point: the socket fd is argv[1]; the first message is the pickled grade_fn."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us
    conn = mpc.Connection(int(sys.argv[1]))
    grade_fn = pickle.loads(conn.recv_bytes())
    if grade_fn is grade_answer:  # load math-verify's parsers now, not inside the first item's time limit
        grade_answer("\\boxed{\\frac{1}{2}}", "0.5")
    conn.send("ready")
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return  # the parent went away
        if job is None:
            return
        job_id, text, gold = job
        try:
            r = grade_fn(text, gold)
            out = (job_id, bool(r.correct), str(r.status), r.answer, r.detail)
        except Exception as e:  # noqa: BLE001 - any failure of one item scores 0
            out = (job_id, False, "error", None, f"{type(e).__name__}: {e}"[:500])
        conn.send(out)


def _child_env() -> dict:
    """The worker must import what the caller can (gtpo_jax, the module of an injected grade_fn)."""
    env = dict(os.environ)
    paths = [os.path.abspath(p or os.curdir) for p in sys.path]
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


class _Worker:
    def __init__(self, payload: bytes):
        parent_sock, child_sock = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from gtpo_jax.rewards.grading import _worker_entry; _worker_entry()",
                 str(child_sock.fileno())],
                pass_fds=[child_sock.fileno()], stdin=subprocess.DEVNULL, env=_child_env(), close_fds=True,
            )
        finally:
            child_sock.close()
        self.conn = mpc.Connection(parent_sock.detach())
        self.conn.send_bytes(payload)
        self.ready = False  # the item time limit starts once the worker has loaded its imports
        self.start_deadline = time.monotonic() + _START_LIMIT_S

    def stop(self, kill: bool = False, wait_s: float = 0.5) -> None:
        """Ask the worker to exit (or kill it: a hung item), never waiting long."""
        if not kill:
            try:
                self.conn.send(None)
                self.proc.wait(wait_s)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            pass
        self.conn.close()


class _ItemTimeout(BaseException):
    """Raised by the in-process interval timer; a BaseException so math-verify's and sympy's
    `except Exception` blocks cannot swallow it."""


@dataclasses.dataclass
class GraderConfig:
    """The config tree's `grader:` section (training rewards and evaluation grade the same way)."""

    workers: int = 2  # processes grading answers with math-verify; 0 = grade in the calling process
    timeout_s: float = 10.0  # seconds before a grading counts as wrong (a timeout, counted)


class Grader:
    """Grades (response text, ground truth) pairs; see the module docstring.

    num_workers: worker processes (0 = grade in this process: for debugging; the time limit then
    uses an interval timer, available only in the main thread). timeout_s: limit per item.
    grade_fn: a picklable top-level `(text, ground_truth) -> GradeResult` (default: boxed answer
    under math-verify). `counts` accumulates statuses over the grader's life; `grade` returns
    results in input order and never raises for a bad item.
    """

    @classmethod
    def from_config(cls, config: GraderConfig) -> "Grader":
        return cls(num_workers=config.workers, timeout_s=config.timeout_s)

    def __init__(self, num_workers: int = 2, timeout_s: float = 10.0, grade_fn: GradeFn = grade_answer):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
        self.num_workers, self.timeout_s, self.grade_fn = num_workers, float(timeout_s), grade_fn
        self.counts: collections.Counter = collections.Counter({s: 0 for s in STATUSES})
        self._workers: list[_Worker] = []
        self._closed = False
        self._start_failures = 0  # workers in a row that died before answering
        if num_workers:
            try:
                self._payload = pickle.dumps(grade_fn)
            except Exception as e:  # noqa: BLE001
                raise ValueError(f"grade_fn must be picklable (a top-level function) to run in workers: {e}") from e
            self._workers = [_Worker(self._payload) for _ in range(num_workers)]

    # -- public API --------------------------------------------------------------------------
    def grade(self, pairs: Sequence[tuple[str, str]]) -> list[GradeResult]:
        if self._closed:
            raise RuntimeError("this Grader is closed")
        pairs = [(str(t), str(g)) for t, g in pairs]
        results = self._grade_in_process(pairs) if not self.num_workers else self._grade_in_workers(pairs)
        for r in results:
            self.counts[r.status] += 1
        return results

    def grade_one(self, text: str, ground_truth: str) -> GradeResult:
        return self.grade([(text, ground_truth)])[0]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for w in self._workers:  # tell all first, so they exit in parallel
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 0.5
        for w in self._workers:
            w.stop(wait_s=max(0.0, deadline - time.monotonic()))
        self._workers = []

    def __enter__(self) -> "Grader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- in-process --------------------------------------------------------------------------
    def _grade_in_process(self, pairs: list[tuple[str, str]]) -> list[GradeResult]:
        timed = threading.current_thread() is threading.main_thread() and hasattr(signal, "setitimer")
        out = []
        for text, gold in pairs:
            previous = None
            try:
                if timed:
                    previous = signal.signal(signal.SIGALRM, _raise_item_timeout)
                    signal.setitimer(signal.ITIMER_REAL, self.timeout_s)
                r = self.grade_fn(text, gold)
                out.append(GradeResult(bool(r.correct), str(r.status), r.answer, r.detail))
            except _ItemTimeout:
                out.append(GradeResult(False, "timeout", None, f"over {self.timeout_s:g}s"))
            except Exception as e:  # noqa: BLE001
                out.append(GradeResult(False, "error", None, f"{type(e).__name__}: {e}"[:500]))
            finally:
                if timed:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    signal.signal(signal.SIGALRM, previous if previous is not None else signal.SIG_DFL)
        return out

    # -- worker processes --------------------------------------------------------------------
    def _replace(self, w: _Worker, kill: bool) -> None:
        if not w.ready:
            self._start_failures += 1
        w.stop(kill=kill)
        self._workers[self._workers.index(w)] = _Worker(self._payload)

    @property
    def _broken(self) -> bool:
        return self._start_failures >= _MAX_START_FAILURES

    def _grade_in_workers(self, pairs: list[tuple[str, str]]) -> list[GradeResult]:
        results: list[GradeResult | None] = [None] * len(pairs)
        queue = collections.deque(range(len(pairs)))
        busy: dict[_Worker, tuple[int, float]] = {}  # worker -> (item, deadline)
        while queue or busy:
            if self._broken:  # e.g. the grade_fn's module cannot be imported in a worker
                log.error("grading workers keep dying before they are ready (%d in a row); scoring the rest 0 — "
                          "see the worker's stderr above", self._start_failures)
                for i in queue:
                    results[i] = GradeResult(False, "error", None, "grading workers cannot start")
                queue.clear()
            for w in list(self._workers):
                if not queue:
                    break
                if w.ready and w not in busy:
                    i = queue.popleft()
                    try:
                        w.conn.send((i, *pairs[i]))
                        busy[w] = (i, time.monotonic() + self.timeout_s)
                    except (OSError, ValueError):  # died while idle: replace it, the item goes first again
                        self._replace(w, kill=True)
                        queue.appendleft(i)
            starting = [w for w in self._workers if not w.ready] if queue else []
            if not busy and not starting:
                continue
            deadlines = [d for _, d in busy.values()] + [w.start_deadline for w in starting]
            wait_s = max(0.0, min(deadlines) - time.monotonic())
            ready = set(mpc.wait([w.conn for w in [*busy, *starting]], timeout=wait_s))
            now = time.monotonic()
            for w in starting:
                if w.conn in ready:
                    try:
                        w.ready = w.conn.recv() == "ready"
                        self._start_failures = 0
                    except (EOFError, OSError):  # could not start (its stderr says why)
                        self._replace(w, kill=True)
                elif now >= w.start_deadline:
                    self._replace(w, kill=True)
            for w, (i, deadline) in list(busy.items()):
                if w.conn in ready:
                    del busy[w]
                    try:
                        job_id, correct, status, answer, detail = w.conn.recv()
                        results[job_id] = GradeResult(correct, status, answer, detail)
                    except (EOFError, OSError) as e:  # crashed (segfault, os._exit, OOM kill)
                        code = w.proc.poll()
                        self._replace(w, kill=True)
                        results[i] = GradeResult(False, "error", None, f"grading worker died (exit {code}): {e!r}")
                elif now >= deadline:
                    del busy[w]
                    self._replace(w, kill=True)
                    results[i] = GradeResult(False, "timeout", None, f"over {self.timeout_s:g}s")
        return results  # type: ignore[return-value]


def _raise_item_timeout(signum, frame):
    raise _ItemTimeout()

