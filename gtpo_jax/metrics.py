"""Per-step metrics: one console line, a JSONL file and TensorBoard events, written by process 0."""

from __future__ import annotations

import json
import logging
import math
import os
import time

import jax
import numpy as np

log = logging.getLogger("gtpo_jax")


def _plain(value):
    if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "__array__"):
        value = np.asarray(value)
        return value.item() if value.ndim == 0 else value.tolist()
    return value


class MetricsWriter:
    """Appends to `<dir>/metrics.jsonl` (so a resumed run continues the same file) and writes
    TensorBoard scalars under `<dir>/tensorboard`."""

    def __init__(self, directory: str, *, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.path = os.path.join(directory, "metrics.jsonl")
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(directory, exist_ok=True)
        self._file = open(self.path, "a")
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(directory, "tensorboard"))

    def write(self, step: int, metrics: dict, *, prefix: str = "") -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time()}
        record.update({f"{prefix}{k}": _plain(v) for k, v in metrics.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for k, v in record.items():
                if k not in ("step", "time") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def format_line(step: int, total: int, metrics: dict, keys: list[str]) -> str:
    parts = [f"step {step}/{total}"]
    for k in keys:
        if k in metrics:
            v = _plain(metrics[k])
            parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
    return " | ".join(parts)
