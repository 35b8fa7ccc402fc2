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
        import wandb
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
