"""`Checkpointer`: our thin layer over `orbax.checkpoint.CheckpointManager` for training runs
(the layout of a checkpoint directory is in gtpo_jax/checkpoint/__init__.py)."""

from __future__ import annotations

import logging
import os
import re
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from flax import nnx

from gtpo_jax.checkpoint.hf_assets import write_hf_assets
from gtpo_jax.checkpoint.integrity import (
    CheckpointCorruptError,
    ChecksumWriter,
    verify_step,
)
from gtpo_jax.checkpoint.steps import (
    DAMAGED,
    HF_ASSETS,
    incomplete_entries,
    is_complete,
    move_aside,
    set_aside_interrupted_saves,
    sync_processes,
)
from gtpo_jax.checkpoint.trees import (
    abstract_tree,
    check_json,
    checked_params_target,
    param_tree,
    stored_arrays,
)
from gtpo_jax.hf_io import read_hf_config
from gtpo_jax.model.params import CheckpointMismatchError

log = logging.getLogger(__name__)

_EXTRA_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")


class Checkpointer:
    """Saves and restores training state every `save_every` steps, keeping the last `keep` steps.

    Interrupted saves are ignored with a warning: orbax's temporary step directories are removed
    (orbax's own clean-up), and step directories orbax does not call finalised (or without its step metadata) go to
    `<root>/incomplete/` (so that neither a resume nor orbax's keep-K bookkeeping counts them,
    and so that a new save of that step is not refused). `read_only=True` (used by `load_model`
    and `orbax_to_hf`) changes nothing on disk and just skips them.

    Every committed step gets a checksum manifest (checkpoint.integrity), written by a background
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
            for name in incomplete_entries(self.directory):
                log.warning("ignoring %s/%s: an interrupted save (not finalised by orbax)", self.directory, name)
        else:
            os.makedirs(self.directory, exist_ok=True)
            set_aside_interrupted_saves(self.directory)
        options = ocp.CheckpointManagerOptions(
            save_interval_steps=0 if read_only else save_every,  # orbax warns when a read-only manager has one
            max_to_keep=keep if keep and keep > 0 else None,
            enable_async_checkpointing=async_save and not read_only,
            create=not read_only,
            cleanup_tmp_directories=not read_only,
            read_only=read_only,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._checksums = ChecksumWriter(self.directory, enabled=not read_only and jax.process_index() == 0)
        self._verified: set[int] = set()

    # ---- steps -------------------------------------------------------------------------------
    def all_steps(self) -> list[int]:
        """Complete steps, oldest first (a step whose async save is still running counts)."""
        steps = sorted(self._manager.all_steps())
        return [s for s in steps if is_complete(self.directory, s)] if self.read_only else steps

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

    def usable_step(self, step: int | None = None) -> int:
        """`step` after checking its checksums (CheckpointCorruptError if damaged); with None the
        newest step that passes, damaged newer ones set aside (read-only: skipped) with a warning."""
        if step is not None:
            step = self._resolve_step(step)
            self._check_integrity(step)
            return step
        for candidate in reversed(self.all_steps()):
            try:
                self._check_integrity(candidate)
                return candidate
            except CheckpointCorruptError as e:
                self._set_aside_damaged(candidate, e)
        raise FileNotFoundError(f"{self.directory} holds no complete, undamaged checkpoint")

    def _check_integrity(self, step: int) -> None:
        if step in self._verified:
            return
        if not verify_step(os.path.join(self.directory, str(step))):
            log.info("checkpoint step %d in %s has no checksums (written before they existed, or killed right "
                     "after the save); restoring it unverified", step, self.directory)
        self._verified.add(step)

    def _set_aside_damaged(self, step: int, error: CheckpointCorruptError) -> None:
        if self.read_only or jax.process_index() != 0:
            log.warning("%s; skipping step %d, trying the previous one", error, step)
        else:
            dest = move_aside(self.directory, str(step), DAMAGED)
            log.warning("%s; moved step %d to %s (delete it once you no longer need it) and using the previous "
                        "step", error, step, dest)
        sync_processes(f"damaged step {step} set aside")
        if not self.read_only:
            self._manager.reload()

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
        check_json(meta)
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
            self._checksums.saved(step)
            self.poll()  # a synchronous save is committed already: checksum it
        return started

    def _stored_arrays(self, step: int, item: str) -> Any:
        directory = self._item_dir(step, item)
        if not os.path.isdir(directory):
            raise FileNotFoundError(f"checkpoint step {step} in {self.directory} has no {item!r}")
        return stored_arrays(directory)

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
        stored_params = self._stored_arrays(step, "params")
        params_abstract = (stored_params if params_target is None
                           else checked_params_target(stored_params, params_target, step))
        items = {"params": ocp.args.StandardRestore(params_abstract), "meta": ocp.args.JsonRestore()}
        if opt_state_target is not None:
            if not os.path.isdir(self._item_dir(step, "opt_state")):
                raise FileNotFoundError(f"checkpoint step {step} in {self.directory} holds no optimizer state")
            items["opt_state"] = ocp.args.StandardRestore(abstract_tree(opt_state_target))
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
        abstract = self._stored_arrays(step, item) if target is None else abstract_tree(target)
        return self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)}))[item]

    def meta(self, step: int | None = None) -> dict:
        step = self._resolve_step(step)
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    # ---- HF assets ---------------------------------------------------------------------------
    @property
    def hf_assets_dir(self) -> str:
        return os.path.join(self.directory, HF_ASSETS)

    def save_hf_assets(self, source: str | os.PathLike | Mapping[str, Any]) -> str:
        """Store config.json and the tokenizer/chat-template/generation-config/code files once, at the
        root, replacing earlier assets (`source` as for `hf_assets.write_hf_assets`)."""
        return write_hf_assets(self.hf_assets_dir, source)

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
    def poll(self) -> None:
        """Raise the error of a failed background save now; checksum the saves that have finished."""
        self._manager.check_for_errors()
        self._checksums.poll(saving=self._manager.is_saving_in_progress())

    def wait(self) -> None:
        """Block until every save is committed and checksummed; raises a failed save's error."""
        self._manager.wait_until_finished()
        self.poll()
        self._checksums.wait()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()
            self._checksums.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
