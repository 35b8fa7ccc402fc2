"""The step directories of a checkpoint root on disk: which are complete, setting aside the
interrupted and damaged ones, and telling a checkpoint from an HF model directory."""

from __future__ import annotations

import logging
import os
import re
import time

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

log = logging.getLogger(__name__)

HF_ASSETS = "hf_assets"
INCOMPLETE = "incomplete"
DAMAGED = "damaged"
# Orbax's step metadata, written when a save is finalised: a step directory that Orbax calls
# finalised but that lacks it was copied half-way (or by hand) and must not be resumed from.
_STEP_METADATA = "_CHECKPOINT_METADATA"
TMP_STEP_RE = re.compile(r"^\d+\.orbax-checkpoint-tmp")  # orbax's in-progress step directories


def is_complete(root: str, step: int) -> bool:
    step_dir = os.path.join(root, str(step))
    # Orbax's own check (the atomic rename on local disks, its commit file on object stores).
    return ocp.utils.is_checkpoint_finalized(step_dir) and os.path.exists(os.path.join(step_dir, _STEP_METADATA))


def incomplete_entries(root: str) -> list[str]:
    """Names of the step directories under `root` that an interrupted save left behind."""
    names = []
    for name in sorted(os.listdir(root)):
        if not os.path.isdir(os.path.join(root, name)):
            continue
        if TMP_STEP_RE.match(name) or (name.isdigit() and not is_complete(root, int(name))):
            names.append(name)
    return names


def move_aside(root: str, name: str, under: str) -> str:
    """Move `<root>/<name>` to `<root>/<under>/<name>-<time>` and return where it went."""
    dest = os.path.join(root, under, f"{name}-{int(time.time())}")
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    os.rename(os.path.join(root, name), dest)
    return dest


def sync_processes(what: str) -> None:
    """Every process waits here until all have done `what` (a no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"gtpo_jax.checkpoint: {what}")


def set_aside_interrupted_saves(root: str) -> None:
    """Move the interrupted saves under `root` to `<root>/incomplete/` (process 0), so that neither a
    resume nor orbax's keep-K bookkeeping counts them and a new save of that step is not refused;
    orbax's own temporary directories are left to orbax's clean-up."""
    if jax.process_index() == 0:
        for name in incomplete_entries(root):
            if TMP_STEP_RE.match(name):
                log.warning("ignoring %s/%s: an interrupted save (orbax temporary directory); orbax removes it",
                            root, name)
                continue
            dest = move_aside(root, name, INCOMPLETE)
            log.warning("ignoring step %s in %s: an interrupted save (not finalised by orbax); moved it to %s, "
                        "delete it once you no longer need it", name, root, dest)
    sync_processes("interrupted saves set aside")


# ---- which kind of directory ------------------------------------------------------------------
def is_checkpoint_root(path: str) -> bool:
    return os.path.isdir(os.path.join(path, HF_ASSETS)) or any(
        (name.isdigit() or TMP_STEP_RE.match(name)) and os.path.isdir(os.path.join(path, name))
        for name in os.listdir(path)
    )


def locate_checkpoint(path: str | os.PathLike) -> tuple[str, int | None]:
    """(root, step) for a checkpoint root (latest step) or one of its step directories."""
    path = os.path.abspath(os.fspath(path))
    name, parent = os.path.basename(path), os.path.dirname(path)
    if name.isdigit() and os.path.isdir(os.path.join(path, "params")):
        return parent, int(name)
    return path, None


def classify_model_dir(path: str | os.PathLike) -> str:
    """"hf" for an HF model directory, "orbax" for a checkpoint root or step; else FileNotFoundError."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path} does not exist or is not a directory")
    root, step = locate_checkpoint(path)
    if step is not None or is_checkpoint_root(root):
        return "orbax"
    if os.path.isfile(os.path.join(path, "config.json")):
        return "hf"
    raise FileNotFoundError(
        f"{path} is neither an HF model directory (config.json + model.safetensors[.index.json]) nor an Orbax "
        "checkpoint directory (numbered step directories, as written by the trainers or "
        "`python -m convert hf2orbax`)"
    )
