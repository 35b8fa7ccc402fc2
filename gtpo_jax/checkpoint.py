"""Orbax checkpoints of training runs, and `load_model` for either kind of directory (HF or Orbax;
HF ⇄ Orbax conversion is in gtpo_jax.conversion, checksums in gtpo_jax.checkpoint_integrity).

A checkpoint directory is the root of an `orbax.checkpoint.CheckpointManager`:

    <root>/<step>/params         our parameter tree: nested dict, string keys, NNX layout (as `params_of`)
    <root>/<step>/opt_state      optimizer state (optional)
    <root>/<step>/extra_<name>   further array trees, e.g. the GTPO reference policy (optional)
    <root>/<step>/meta           JSON: data iterator state, RNG, prompt cursor, model_config...
    <root>/<step>/gtpo_checksums.json   size and CRC-32 of every file of the step, written once committed
    <root>/hf_assets/            config.json + tokenizer, chat template, generation config, custom code;
                                 written once, so that any step exports back to an HF directory

Parameters are stored as a plain nested dict (not an `nnx.State`, whose leaves would gain a
`.value` level) so that checkpoints converted from HF and checkpoints written by the trainers
have one layout, readable without building the model first.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from gtpo_jax.checkpoint_integrity import CheckpointCorruptError, VerifiedSteps
from gtpo_jax.hf_io import (
    copy_hf_assets,
    load_hf_model,
    read_hf_config,
    safetensors_files,
)
from gtpo_jax.model import ModelConfig, SDARModel, model_from_params
from gtpo_jax.model.params import CheckpointMismatchError, iter_nested

log = logging.getLogger(__name__)

HF_ASSETS = "hf_assets"
INCOMPLETE = "incomplete"
# Orbax's step metadata, written when a save is finalised: a step directory that Orbax calls
# finalised but that lacks it was copied half-way (or by hand) and must not be resumed from.
_STEP_METADATA = "_CHECKPOINT_METADATA"
_TMP_STEP_RE = re.compile(r"^\d+\.orbax-checkpoint-tmp")  # orbax's in-progress step directories
_EXTRA_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")


def _stringify(tree: Any) -> Any:
    return {str(k): _stringify(v) for k, v in tree.items()} if isinstance(tree, Mapping) else tree


def param_tree(params: Any) -> dict:
    """The stored form of parameters: a nested dict with string keys (nnx.State included)."""
    if isinstance(params, nnx.State):
        params = nnx.to_pure_dict(params)
    return _stringify(params)


def _abstract(tree: Any) -> Any:
    """ShapeDtypeStructs (keeping each jax array's sharding) so restoring allocates only the result."""

    def leaf(x):
        if isinstance(x, (jax.Array, np.ndarray, jax.ShapeDtypeStruct)):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None))
        return x

    return jax.tree.map(leaf, tree)


def _check_json(meta: Mapping[str, Any]) -> None:
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"checkpoint meta must be JSON-serialisable (store arrays via extra_arrays): {e}") from None


class Checkpointer(VerifiedSteps):
    """Saves and restores training state every `save_every` steps, keeping the last `keep` steps.

    Interrupted saves are ignored with a warning: orbax's temporary step directories are removed
    (orbax's own clean-up), and step directories orbax does not call finalised (or without its step metadata) go to
    `<root>/incomplete/` (so that neither a resume nor orbax's keep-K bookkeeping counts them,
    and so that a new save of that step is not refused). `read_only=True` (used by `load_model`
    and `orbax_to_hf`) changes nothing on disk and just skips them.

    Every committed step gets a checksum manifest (checkpoint_integrity), written by a background
    thread once orbax has committed it; `usable_step` checks it, and a damaged step is moved to
    `<root>/damaged/` (read-only: skipped) with a warning so the previous step is used. A failed
    background save is raised by the next `poll()` (every training step), not steps later.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        save_every: int = 1,
        keep: int | None = None,
        async_save: bool = True,
        read_only: bool = False,
    ):
        if save_every < 1:
            raise ValueError(f"save_every must be >= 1, got {save_every}")
        self.directory = os.path.abspath(os.fspath(directory))
        self.read_only = read_only
        if read_only:
            if not os.path.isdir(self.directory):
                raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
            for name in self._incomplete_entries():
                log.warning("ignoring %s/%s: an interrupted save (not finalised by orbax)", self.directory, name)
        else:
            os.makedirs(self.directory, exist_ok=True)
            self._set_aside_interrupted_saves()
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=0 if read_only else save_every,  # orbax warns when a read-only manager has one
            max_to_keep=keep if keep and keep > 0 else None,
            enable_async_checkpointing=async_save and not read_only,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._unsealed: list[int] = []  # saved, checksums not yet written
        self._sealing: list = []  # futures of manifests being written
        self._sealer = None if read_only or jax.process_index() != 0 else ThreadPoolExecutor(1, "checksums")
        self._verified: set[int] = set()

    # ---- interrupted saves -----------------------------------------------------------------
    def _is_complete(self, step: int) -> bool:
        step_dir = os.path.join(self.directory, str(step))
        # Orbax's own check (the atomic rename on local disks, its commit file on object stores).
        return ocp.utils.is_checkpoint_finalized(step_dir) and os.path.exists(os.path.join(step_dir, _STEP_METADATA))

    def _incomplete_entries(self) -> list[str]:
        names = []
        for name in sorted(os.listdir(self.directory)):
            if not os.path.isdir(os.path.join(self.directory, name)):
                continue
            if _TMP_STEP_RE.match(name) or (name.isdigit() and not self._is_complete(int(name))):
                names.append(name)
        return names

    def _set_aside_interrupted_saves(self) -> None:
        if jax.process_index() == 0:
            for name in self._incomplete_entries():
                if _TMP_STEP_RE.match(name):
                    log.warning("ignoring %s/%s: an interrupted save (orbax temporary directory); orbax removes it",
                                self.directory, name)
                    continue
                dest = os.path.join(self.directory, INCOMPLETE, f"{name}-{int(time.time())}")
                log.warning(
                    "ignoring step %s in %s: an interrupted save (not finalised by orbax); moved it to %s, "
                    "delete it once you no longer need it", name, self.directory, dest,
                )
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                os.rename(os.path.join(self.directory, name), dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("gtpo_jax.checkpoint: interrupted saves set aside")

    # ---- steps -------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Complete steps, oldest first (a step whose async save is still running counts)."""
        steps = sorted(self._manager.all_steps())
        return [s for s in steps if self._is_complete(s)] if self.read_only else steps

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    def _resolve_step(self, step: int | None) -> int:
        steps = self.all_steps()
        if step is None:
            if not steps:
                raise FileNotFoundError(f"{self.directory} holds no complete checkpoint")
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(f"{self.directory} has no complete checkpoint for step {step}; steps: {steps}")
        return step

    def _item_dir(self, step: int, item: str) -> str:
        return os.path.join(self.directory, str(step), item)

    # ---- save / restore ----------------------------------------------------------------------
    def save(
        self,
        step: int,
        *,
        params: Any,
        opt_state: Any = None,
        extra_arrays: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        force: bool = False,
    ) -> bool:
        """Save when `step` is due (a multiple of save_every) or `force`; True if a save started.

        With async_save the call returns once arrays are copied off the device; `wait()` blocks
        until the files are committed.
        """
        meta = dict(meta or {})
        _check_json(meta)
        items = {"params": ocp.args.StandardSave(param_tree(params)), "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        for name, tree in (extra_arrays or {}).items():
            if not _EXTRA_NAME_RE.match(name):
                raise ValueError(f"extra array name {name!r} must use letters, digits and _ only")
            items[f"extra_{name}"] = ocp.args.StandardSave(tree)
        self.poll()
        started = bool(self._manager.save(step, args=ocp.args.Composite(**items), force=force))
        if started:
            self._unsealed.append(step)
            self.poll()  # a synchronous save is committed already: checksum it
        return started

    def _stored_arrays(self, step: int, item: str) -> Any:
        """The stored tree of `item` as ShapeDtypeStructs without sharding (i.e. restore as numpy)."""
        directory = self._item_dir(step, item)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"checkpoint step {step} in {self.directory} has no {item!r}")
        handler = ocp.StandardCheckpointHandler()
        try:
            tree = handler.metadata(epath.Path(directory)).tree
        finally:
            handler.close()
        return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree)

    def _params_target(self, step: int, target: Any) -> dict:
        stored = self._stored_arrays(step, "params")
        if target is None:
            return stored
        want = _abstract(param_tree(target))
        stored_leaves, want_leaves = dict(iter_nested(stored)), dict(iter_nested(want))
        for path in sorted(set(stored_leaves) | set(want_leaves)):
            name = ".".join(path)
            if path not in stored_leaves:
                raise CheckpointMismatchError(f"checkpoint step {step} lacks parameter {name}")
            if path not in want_leaves:
                raise CheckpointMismatchError(f"checkpoint step {step} has parameter {name}, which the model lacks")
            if tuple(stored_leaves[path].shape) != tuple(want_leaves[path].shape):
                raise CheckpointMismatchError(
                    f"parameter {name} has shape {tuple(stored_leaves[path].shape)} in checkpoint step {step}, "
                    f"the model expects {tuple(want_leaves[path].shape)}; the checkpoint belongs to another model"
                )
        return want

    def restore(
        self, step: int | None = None, *, params_target: Any = None, opt_state_target: Any = None
    ) -> dict[str, Any]:
        """{"step", "params", "opt_state", "meta"} of `step` (default: the latest complete one).

        params_target: the live parameters or an abstract tree (jax.ShapeDtypeStruct with
            sharding) to restore sharded onto devices, as an nnx.State or nested dict (the result
            has the target's type); None restores numpy arrays on the host.
        opt_state_target: likewise for the optimizer state; None skips it (opt_state is None).
        A step whose checksums disagree raises CheckpointCorruptError; with step None the newest
        undamaged step is restored (see `usable_step`).
        """
        step = self.usable_step(step)
        items = {
            "params": ocp.args.StandardRestore(self._params_target(step, params_target)),
            "meta": ocp.args.JsonRestore(),
        }
        if opt_state_target is not None:
            if not os.path.isdir(self._item_dir(step, "opt_state")):
                raise FileNotFoundError(f"checkpoint step {step} in {self.directory} holds no optimizer state")
            items["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state_target))
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        except (CheckpointMismatchError, FileNotFoundError):
            raise
        except Exception as e:  # noqa: BLE001 — orbax/tensorstore raise many kinds on damaged files
            others = [s for s in self.all_steps() if s != step]
            raise CheckpointCorruptError(
                f"checkpoint step {step} in {self.directory} cannot be read ({type(e).__name__}: "
                f"{' '.join(str(e).split())[:300]}); it may be damaged: choose another step with checkpoint.step=N "
                f"(or --step N), complete steps: {others}") from e
        params = restored["params"]
        if isinstance(params_target, nnx.State):
            state = jax.tree.map(lambda x: x, params_target)  # a new State: the target is left untouched
            nnx.replace_by_pure_dict(state, params)
            params = state
        return {
            "step": step,
            "params": params,
            "opt_state": restored["opt_state"] if opt_state_target is not None else None,
            "meta": restored["meta"],
        }

    def restore_extra(self, step: int | None, name: str, target: Any = None) -> Any:
        """The array tree saved as `extra_arrays[name]` (numpy without a target, else like the target)."""
        step = self._resolve_step(step)
        item = f"extra_{name}"
        abstract = self._stored_arrays(step, item) if target is None else _abstract(target)
        return self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}))[item]

    def meta(self, step: int | None = None) -> dict:
        step = self._resolve_step(step)
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    # ---- HF assets ---------------------------------------------------------------------------
    @property
    def hf_assets_dir(self) -> str:
        return os.path.join(self.directory, HF_ASSETS)

    def save_hf_assets(self, source: str | os.PathLike | Mapping[str, Any]) -> str:
        """Store config.json and the tokenizer/chat-template/generation-config/code files once, at the root.

        source: an HF directory (its config.json and non-weight files); or {"config": <config.json
        dict>, "files_from": <directory, optional>} to write that config with another directory's
        files (e.g. a tokenizer); or a bare config.json dict. Replaces earlier assets.
        """
        if isinstance(source, Mapping):
            config, files_from = (source["config"], source.get("files_from")) if "config" in source else (source, None)
        else:
            files_from, config = os.fspath(source), read_hf_config(source)
        if jax.process_index() != 0:
            return self.hf_assets_dir
        tmp = f"{self.hf_assets_dir}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        if files_from is not None:
            copy_hf_assets(files_from, tmp)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(dict(config), f, indent=2, sort_keys=True)
            f.write("\n")
        old = f"{self.hf_assets_dir}.old-{os.getpid()}"
        if os.path.isdir(self.hf_assets_dir):
            os.rename(self.hf_assets_dir, old)
        os.rename(tmp, self.hf_assets_dir)
        shutil.rmtree(old, ignore_errors=True)
        return self.hf_assets_dir

    def model_config(self, step: int | None = None) -> dict:
        """The HF config.json of the model: the step's meta["model_config"], else hf_assets/config.json."""
        config = self.meta(step).get("model_config")
        if config is not None:
            return config
        if os.path.isfile(os.path.join(self.hf_assets_dir, "config.json")):
            return read_hf_config(self.hf_assets_dir)
        raise FileNotFoundError(
            f"{self.directory} records no model config (neither meta['model_config'] nor {HF_ASSETS}/config.json); "
            "store it with Checkpointer.save_hf_assets(<HF dir or config dict>)"
        )

    # ---- lifecycle ---------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until every save is committed and checksummed; raises a failed save's error."""
        self._manager.wait_until_finished()
        self.poll()
        for future in self._sealing:
            future.result()
        self._sealing = []

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()
            if self._sealer is not None:
                self._sealer.shutdown(wait=True)

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- which kind of directory ------------------------------------------------------------------
def _is_hf_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "config.json"))


def is_checkpoint_root(path: str) -> bool:
    return os.path.isdir(os.path.join(path, HF_ASSETS)) or any(
        (name.isdigit() or _TMP_STEP_RE.match(name)) and os.path.isdir(os.path.join(path, name))
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
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"model path {path} does not exist or is not a directory")
    root, step = locate_checkpoint(path)
    if step is not None or is_checkpoint_root(root):
        return "orbax"
    if _is_hf_dir(path):
        return "hf"
    raise FileNotFoundError(
        f"{path} is neither an HF model directory (config.json + model.safetensors[.index.json]) nor an Orbax "
        "checkpoint directory (numbered step directories, as written by the trainers or "
        "`python -m convert hf2orbax`)"
    )


# ---- loading ---------------------------------------------------------------------------------
def load_model(path: str | os.PathLike, **runtime: Any) -> SDARModel:
    """The model stored at `path`: an HF directory (config.json + safetensors) or an Orbax checkpoint
    (a root, meaning its latest complete step, or a step directory). `runtime`: ModelConfig runtime
    fields (param_dtype, dtype, remat, attention tiles)."""
    if classify_model_dir(path) == "hf":
        safetensors_files(path)  # fails clearly when config.json comes without safetensors weights
        return load_hf_model(path, **runtime)
    root, step = locate_checkpoint(path)
    ckpt = Checkpointer(root, read_only=True)
    try:
        step = ckpt.usable_step(step)
        cfg = ModelConfig.from_hf_dict(ckpt.model_config(step), **runtime)
        params = ckpt.restore(step)["params"]
    finally:
        ckpt.close()
    return model_from_params(cfg, params)
