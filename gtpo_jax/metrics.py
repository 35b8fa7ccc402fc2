"""Per-step metrics: one console line, a JSONL file and TensorBoard events, written by process 0."""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import threading
import time

import jax
import numpy as np
from tensorboardX import SummaryWriter

log = logging.getLogger("gtpo_jax")


def _plain(value):
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__array__"):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    return value


class MetricsWriter:
    """Appends to `<dir>/metrics.jsonl` (so a resumed run continues the same file) and writes
    TensorBoard scalars under `<dir>/tensorboard`.

    Never blocks or stops training: TensorBoard events go through a bounded queue to a thread of
    their own (tensorboardX's writer thread dies on a full disk and its queue then blocks for
    ever), and a writer that fails is reported once and disabled.
    """

    def __init__(self, directory: str, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(directory, "metrics.jsonl")
        self._file = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(directory, exist_ok=True)
        self._file = open(self.path, "a")
        if tensorboard:
            self._tb = _TensorBoardThread(os.path.join(directory, "tensorboard"))

    def drop_after(self, step: int) -> None:
        """Move records of steps after `step` to metrics.superseded.jsonl (a resumed run redoes
        them; each step then appears once in metrics.jsonl, and nothing is lost)."""
        if not self.enabled or self._file is None or not os.path.getsize(self.path):
            return
        self._file.close()
        with open(self.path) as f:
            lines = [line for line in f if line.strip()]
        kept, dropped = [], []
        for line in lines:
            try:
                later = json.loads(line)["step"] > step
            except (ValueError, KeyError, TypeError):
                later = True  # a line cut by a crash
            (dropped if later else kept).append(line if line.endswith("\n") else line + "\n")
        if dropped:
            with open(os.path.join(os.path.dirname(self.path), "metrics.superseded.jsonl"), "a") as f:
                f.writelines(dropped)
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                f.writelines(kept)
            os.replace(tmp, self.path)
            log.info("metrics.jsonl: moved %d records of steps after %d (redone now) to metrics.superseded.jsonl",
                     len(dropped), step)
        self._file = open(self.path, "a")

    def write(self, step: int, metrics: dict, *, prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time()}
        record.update({f"{prefix}{k}": _plain(v) for k, v in metrics.items()})
        if self._file is not None:
            try:
                self._file.write(json.dumps(record) + "\n")
                self._file.flush()
            except OSError as e:
                log.error("cannot write %s (%s); metrics.jsonl is disabled for the rest of this run, training "
                          "goes on", self.path, e)
                self._close_file()
        if self._tb is not None:
            scalars = [(k, v) for k, v in record.items()
                       if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v)]
            if not self._tb.put(scalars, step):
                self._tb = None

    def _close_file(self) -> None:
        try:
            self._file.close()
        except OSError:
            pass
        self._file = None

    def close(self) -> None:
        if self.enabled:
            if self._file is not None:
                self._close_file()
            if self._tb is not None:
                self._tb.close()
                self._tb = None


class _TensorBoardThread:
    """A tensorboardX SummaryWriter fed through a bounded queue by a daemon thread: `put` never waits."""

    def __init__(self, logdir: str, max_pending: int = 100):
        self.logdir = logdir
        self._queue: queue.Queue = queue.Queue(max_pending)
        self._writer = SummaryWriter(logdir)
        self._failed: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tensorboard", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                scalars, step = item
                for key, value in scalars:
                    self._writer.add_scalar(key, value, step)
            except Exception as e:  # noqa: BLE001 — any failure disables TensorBoard, never training
                self._failed = e
                return
        self._writer.close()

    def _event_file_writer(self):
        """tensorboardX's own writer (its thread, its queue): looked up defensively, it is internal."""
        return getattr(getattr(self._writer, "file_writer", None), "event_writer", None)

    def put(self, scalars: list, step: int) -> bool:
        """Queue one step's scalars; False (after one error line) once the writer has failed or stalled."""
        problem = None
        inner = self._event_file_writer()
        inner_worker = getattr(inner, "_worker", None)
        if self._failed is not None or not self._thread.is_alive():
            problem = f"its writer failed ({self._failed})"
        elif inner_worker is not None and not inner_worker.is_alive():
            problem = "tensorboardX's writer thread died (a full disk?)"
        else:
            try:
                self._queue.put_nowait((scalars, step))
            except queue.Full:
                problem = "its writer has stopped taking events (a full or hung disk?)"
        if problem:
            if inner is not None:
                inner._closed = True  # its exit handler would wait for the dead thread for ever
            log.error("TensorBoard events under %s are disabled for the rest of this run: %s; metrics.jsonl "
                      "goes on", self.logdir, problem)
            return False
        return True

    def close(self, timeout_s: float = 10.0) -> None:
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return
        self._thread.join(timeout_s)


class WandbWriter:
    """Logs the same per-step records to a Weights & Biases run (process 0 only).

    Optional: `pip install -e ".[wandb]"` and set `train.wandb_project`. The run id is kept in
    `<dir>/wandb_run_id`, so that a resumed training run continues the same W&B run.
    """

    def __init__(self, directory: str, project: str, *, config: dict | None = None):
        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        wandb = import_wandb()
        id_file = os.path.join(directory, "wandb_run_id")
        if os.path.isfile(id_file):
            with open(id_file) as f:
                run_id = f.read().strip()
        else:
            run_id = wandb.util.generate_id()
            os.makedirs(directory, exist_ok=True)
            with open(id_file, "w") as f:
                f.write(run_id + "\n")
        self._run = wandb.init(project=project, id=run_id, resume="allow", dir=directory, config=config,
                               name=os.path.basename(os.path.abspath(directory)))

    def write(self, step: int, metrics: dict, *, prefix: str = "") -> None:
        if not self.enabled:
            return
        values = {f"{prefix}{k}": _plain(v) for k, v in metrics.items()}
        self._run.log({k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)},
                      step=step)

    def close(self) -> None:
        if self.enabled:
            self._run.finish()


def import_wandb():
    """The wandb module, or an error that says how to install it or turn it off."""
    try:
        import wandb  # optional extra (train.wandb_project), imported only when asked for
    except ImportError:
        raise ImportError(
            "train.wandb_project is set but Weights & Biases is not installed: pip install -e '.[wandb]' "
            "(or leave train.wandb_project unset; metrics.jsonl and TensorBoard are always written)"
        ) from None
    return wandb


def format_line(step: int, total: int, metrics: dict, keys: list[str]) -> str:
    parts = [f"step {step}/{total}"]
    for k in keys:
        if k in metrics:
            v = _plain(metrics[k])
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return " | ".join(parts)
