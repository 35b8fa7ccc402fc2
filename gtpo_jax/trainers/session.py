"""What every training run holds: tokenizer, model on the mesh, optimizer, jitted update,
checkpoints (exact resume), metrics, evaluation and the final HF export."""

from __future__ import annotations

import logging
import os

import jax
import numpy as np
import yaml
from flax import nnx
from tqdm import tqdm

from gtpo_jax.checkpoint import Checkpointer, param_tree
from gtpo_jax.config import Config
from gtpo_jax.config_loader import ConfigError, config_differences, dump_yaml, to_dict
from gtpo_jax.data.pipeline import SFTData
from gtpo_jax.data.records import check_data_files
from gtpo_jax.data.synthetic import write_synthetic_task
from gtpo_jax.data.tiny_tokenizer import build_tiny_tokenizer
from gtpo_jax.data.tokenizer import load_tokenizer, resolve_token_ids, tokenizer_dir_for
from gtpo_jax.distributed import barrier
from gtpo_jax.evaluate import evaluate_model
from gtpo_jax.hf_io import export_hf_dir, read_hf_config
from gtpo_jax.logs import setup_logging
from gtpo_jax.metrics import MetricsWriter, WandbWriter, format_line, import_wandb
from gtpo_jax.model.config import read_json_file
from gtpo_jax.run_lock import OutputDirLock
from gtpo_jax.sharding import (
    build_mesh,
    optimizer_shardings,
    replicate_unsharded,
    shard_micro_batches,
    shard_model,
)
from gtpo_jax.trainers.common import (
    BadStepGuard,
    build_model,
    make_optimizer,
    make_update_step,
)

log = logging.getLogger("gtpo_jax")
# Keys that may change between a run and its resumption: how long it runs, how it is saved, evaluated, laid
# out on devices and logged, not what it computes.
RESUMABLE_KEYS = ("checkpoint.", "eval.", "mesh.", "gpu.", "distributed.", "train.steps", "train.log_every",
                  "train.wandb_project")
# Keys that change what a checkpoint's arrays mean (diffusion block size, architecture): a resume
# across such a change is refused even with checkpoint.accept_config_changes.
CHECKPOINT_SHAPING_KEYS = ("block_size", "model.preset", "model.preset_overrides")


class TrainingSession:
    """`make_data(session)` builds the stage's data source right after the tokenizer, so that bad
    data fails before the (possibly minutes-long) model load; the result is `session.data`."""

    def __init__(self, cfg: Config, make_data=None):
        setup_logging(process_index=jax.process_index())
        cfg.validate()
        if cfg.train.wandb_project and jax.process_index() == 0:
            import_wandb()  # a missing optional package fails now, not after the model is loaded
        # The demo's tiny tokenizer is built when the tokenizer is unset or names its derived place
        # (as in a config written by --print-config).
        self._tiny_tokenizer = cfg.data.synthetic and cfg.model.path is None and cfg.tokenizer.path in (
            None, os.path.join(cfg.output_dir, "tokenizer"))
        cfg.resolve_paths()
        self.cfg = cfg
        os.makedirs(cfg.output_dir, exist_ok=True)
        # One run per output directory (process 0 holds it for all); released by close() or abort().
        self._lock = OutputDirLock(cfg.output_dir).acquire() if jax.process_index() == 0 else None
        self.checkpointer = self.metrics = None
        try:
            self._open(make_data)
        except BaseException:
            self.abort()
            raise

    def _open(self, make_data) -> None:
        cfg = self.cfg
        self._check_against_stored_config()
        barrier("config checked")
        if jax.process_index() == 0:
            with open(os.path.join(cfg.output_dir, "config.yaml"), "w") as f:
                f.write(dump_yaml(cfg))  # the resolved config: what this run reads
        if cfg.data.synthetic:
            # Process 0 writes the task files and the tokenizer; the others then find them.
            if jax.process_index() == 0:
                self._prepare_synthetic_task()
            barrier("synthetic task written")
            if jax.process_index() != 0:
                self._prepare_synthetic_task()
        check_data_files(cfg.data.train_files, "data.train_files entry")
        check_data_files(cfg.data.eval_files, "data.eval_files entry")
        tok_dir = self._tokenizer_dir()
        self.tokenizer_dir = tok_dir
        self.tokenizer = load_tokenizer(tok_dir)
        # block size, mask / pad / stop ids: resolved once here, read by every stage from here (the
        # block size is checked against the model's when the model is built)
        self.ids = resolve_token_ids(self.tokenizer, cfg.block_size)
        self.data = make_data(self) if make_data is not None else None
        model = build_model(cfg, vocab_size=len(self.tokenizer))
        barrier("model built")  # before the first collective
        self.model_cfg = model.cfg
        self.mesh = build_mesh(cfg.mesh)
        self.data_parallel = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        shard_model(model, self.mesh)
        self.graphdef, self.params = nnx.split(model)
        self.tx, self.schedule = make_optimizer(cfg.optim, cfg.train.steps * cfg.updates_per_step())
        init_opt = jax.jit(self.tx.init, out_shardings=optimizer_shardings(self.tx, self.params, self.mesh))
        self.opt_state = replicate_unsharded(init_opt(self.params), self.mesh)
        self.checkpointer = Checkpointer(
            os.path.join(cfg.output_dir, "checkpoints"),
            save_every=cfg.checkpoint.save_every,
            keep=cfg.checkpoint.keep,
            async_save=cfg.checkpoint.async_save,
        )
        self.checkpointer.save_hf_assets(self._hf_assets_source(tok_dir))
        self.metrics = MetricsWriter(cfg.output_dir)
        self.wandb = (WandbWriter(cfg.output_dir, cfg.train.wandb_project, config=to_dict(cfg))
                      if cfg.train.wandb_project else None)
        self.guard = BadStepGuard(cfg.train.max_bad_steps)
        self.extra_state: dict = {}  # stage-specific JSON state saved with every checkpoint
        self.extra_arrays: dict = {}  # stage-specific array trees saved with every checkpoint
        self._step_fn = None
        self._bar = None
        self.step = 0  # optimizer steps taken
        self._data_state = None
        self.eval_results: dict[str, dict] = {}

    # ---- set-up ------------------------------------------------------------------------
    def _check_against_stored_config(self) -> None:
        """A run that will resume must not silently continue under another config: the keys that
        differ from the stored config.yaml stop it, unless checkpoint.accept_config_changes."""
        stored_path = os.path.join(self.cfg.output_dir, "config.yaml")
        ckpt_dir = os.path.join(self.cfg.output_dir, "checkpoints")
        if not (self.cfg.checkpoint.resume and os.path.isfile(stored_path) and os.path.isdir(ckpt_dir)
                and any(name.isdigit() for name in os.listdir(ckpt_dir))):
            return
        with open(stored_path) as f:
            stored = yaml.safe_load(f) or {}
        changes = config_differences(stored, to_dict(self.cfg), to_dict(Config(stage=self.cfg.stage)),
                                     ignore=RESUMABLE_KEYS)
        if not changes:
            return
        shaping = [line for line in changes if line.startswith(CHECKPOINT_SHAPING_KEYS)]
        if shaping:
            raise ConfigError(
                f"{self.cfg.output_dir} holds checkpoints of another model: {'; '.join(shaping)} "
                "(these keys change what a checkpoint means, so checkpoint.accept_config_changes does not apply). "
                "Choose a new output_dir, or keep the stored values"
            )
        if self.cfg.checkpoint.accept_config_changes:
            log.warning("resuming %s with a changed config (accepted): %s", self.cfg.output_dir, "; ".join(changes))
            return
        raise ConfigError(
            f"{self.cfg.output_dir} holds a run made with another config; resuming it would mix the two. "
            f"Changed: {'; '.join(changes)}. To resume with the new values set checkpoint.accept_config_changes=true; "
            "to start over in this directory set checkpoint.resume=false; or choose another output_dir"
        )

    def _prepare_synthetic_task(self) -> None:
        d = self.cfg.data
        write_synthetic_task(os.path.join(self.cfg.output_dir, "data"), n_train=d.synthetic_train,
                             n_eval=d.synthetic_eval, seed=d.shuffle_seed, digits=d.synthetic_digits,
                             carry_slip=d.synthetic_carry_slip, ramble=d.synthetic_ramble)
        if self._tiny_tokenizer:
            build_tiny_tokenizer(self.cfg.tokenizer.path)

    def _tokenizer_dir(self) -> str:
        if not self.cfg.tokenizer.path:
            raise ValueError("set tokenizer.path (or model.path to an HF directory that holds the tokenizer)")
        return self.cfg.tokenizer.path

    def _hf_assets_source(self, tok_dir: str) -> dict | str:
        """config.json of the model + tokenizer files, so that every checkpoint exports to HF."""
        return {"config": self.model_cfg.to_hf_dict(self._source_hf_config()), "files_from": tok_dir}

    def _source_hf_config(self) -> dict | None:
        path = self.cfg.model.path
        for candidate in (path, tokenizer_dir_for(path) if path else None):
            if candidate and os.path.isfile(os.path.join(candidate, "config.json")):
                return read_json_file(os.path.join(candidate, "config.json"))
        return None

    def sft_data(self):
        """The SFT sample stream (this process's shard), checkpointable with get_state/set_state."""
        d = self.cfg.data
        return SFTData(d.train_files, self.tokenizer, max_len=d.max_len, over_length=d.over_length,
                       prompt_too_long=d.prompt_too_long, seed=d.shuffle_seed, epochs=d.epochs)

    # ---- the update ----------------------------------------------------------------------
    def compile_step(self, loss_fn) -> None:
        self._step_fn = jax.jit(make_update_step(self.graphdef, self.tx, loss_fn, self.schedule),
                                donate_argnums=(0, 1))

    def model(self) -> nnx.Module:
        """The current policy as a module (shares the live parameter arrays)."""
        return nnx.merge(self.graphdef, self.params)

    def update(self, arrays: dict) -> dict:
        batch = shard_micro_batches(arrays, self.mesh)
        with jax.set_mesh(self.mesh):  # the model pins activation rows to the data axes (constrain_batch)
            self.params, self.opt_state, metrics = self._step_fn(self.params, self.opt_state, batch)
        return {k: np.asarray(v).item() for k, v in metrics.items()}  # lr: the one this update applied

    # ---- checkpoints ---------------------------------------------------------------------
    def restore_or_init(self, data_state_setter=None) -> int:
        """Resume when asked to, from checkpoint.step or else the newest undamaged checkpoint;
        returns the first step to run. metrics.jsonl is cut back to the resumed step."""
        checkpoint_cfg = self.cfg.checkpoint
        if not checkpoint_cfg.resume or (checkpoint_cfg.step is None and self.checkpointer.latest_step() is None):
            self.metrics.drop_after(0)
            return 0
        latest = self.checkpointer.usable_step(checkpoint_cfg.step)
        restored = self.checkpointer.restore(latest, params_target=self.params, opt_state_target=self.opt_state)
        self.params, self.opt_state = restored["params"], restored["opt_state"]
        meta = restored.get("meta") or {}
        if data_state_setter is not None and meta.get("data_state") is not None:
            data_state_setter(meta["data_state"])
        self.extra_state = meta.get("extra_state", {})
        self.step = latest
        self.metrics.drop_after(latest)  # steps after it are redone: their old records would appear twice
        log.info("resumed from %s at step %d", self.checkpointer.directory, latest)
        return latest

    def save(self, step: int, data_state=None, force: bool = False) -> None:
        meta = {"data_state": data_state, "extra_state": self.extra_state, "step": step}
        self.checkpointer.save(step, params=self.params, opt_state=self.opt_state, extra_arrays=self.extra_arrays,
                               meta=meta, force=force)

    # ---- loop helpers --------------------------------------------------------------------
    def progress(self, start: int, total: int):
        self._total = total
        # The bar only on a terminal (disable=None): in a log file its redraws would bury the lines.
        self._bar = tqdm(range(start, total), initial=start, total=total, desc=self.cfg.stage, dynamic_ncols=True,
                         disable=None if jax.process_index() == 0 else True)
        for index in self._bar:
            yield index + 1  # steps are numbered from 1; checkpoint N holds the state after step N

    def finish_step(self, step: int, metrics: dict, *, data_state=None, keys: list[str]) -> dict:
        self.step = step
        self._data_state = data_state
        self.checkpointer.poll()  # a background save that failed stops the run now, not steps later
        self.guard.check(step, metrics)
        self.write_metrics(step, metrics)
        if jax.process_index() == 0 and (step % self.cfg.train.log_every == 0 or step == self._total):
            log.info(format_line(step, self._total, metrics, keys))
        self._bar.set_postfix({k: metrics[k] for k in keys[:2] if k in metrics})
        self.save(step, data_state=data_state)
        self.evaluate_if_due(step)
        return metrics

    def write_metrics(self, step: int, metrics: dict, *, prefix: str = "") -> None:
        self.metrics.write(step, metrics, prefix=prefix)
        if self.wandb is not None:
            self.wandb.write(step, metrics, prefix=prefix)

    def evaluate_if_due(self, step: int, *, force: bool = False, label: str | None = None) -> dict | None:
        every = self.cfg.eval.every
        if not self.cfg.eval.enabled or not self.cfg.data.eval_files or not (force or (every and step % every == 0)):
            return None
        barrier(f"evaluate {step}")
        result = evaluate_model(self.model(), self.tokenizer, self.cfg, self.ids, mesh=self.mesh)
        label = label or f"step {step}"
        self.eval_results[label] = result
        self.write_metrics(step, {k: v for k, v in result.items() if isinstance(v, (int, float))}, prefix="eval/")
        log.info("held-out accuracy (%s): %.1f%% over %d samples", label, 100 * result["accuracy"], result["samples"])
        return result

    def export_hf(self, out_dir: str) -> None:
        """Write the live policy as an HF directory (config.json and tokenizer from the run's
        hf_assets) through `hf_io.export_hf_dir`: every process takes part in the per-tensor
        gathers, process 0 writes."""
        barrier("export")  # processes meet before the first gather (CPU collectives tolerate little skew)
        assets = self.checkpointer.hf_assets_dir
        export_hf_dir(param_tree(self.params), self.model_cfg, out_dir, dtype=self.cfg.checkpoint.export_dtype,
                      source_config=read_hf_config(assets), assets_dir=assets)
        if jax.process_index() == 0:
            log.info("exported the final model to %s", out_dir)

    def close(self, last_metrics: dict) -> dict:
        step = self.step
        if step and self.checkpointer.latest_step() != step:
            self.save(step, force=True, data_state=self._data_state)
        self.checkpointer.wait()
        self.evaluate_if_due(step, force=True, label="after")
        if self.cfg.checkpoint.export_hf:
            self.export_hf(os.path.join(self.cfg.output_dir, "hf"))
        self.metrics.close()
        if self.wandb is not None:
            self.wandb.close()
        self.checkpointer.close()
        self._release()
        return {"metrics": last_metrics, "eval": self.eval_results}

    def run(self, train) -> dict:
        """`train(self)`; after an error the session is aborted and the error re-raised."""
        try:
            return train(self)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """After an error: let the checkpoint in flight finish (or say why it failed), close the
        writers and release the output directory. The caller re-raises the error."""
        try:
            if self.checkpointer is not None:
                try:
                    self.checkpointer.close()
                except Exception as e:  # noqa: BLE001 — reported, the original error is the one raised
                    log.error("the checkpoint save in flight failed as well: %s: %s", type(e).__name__, e)
            if self.metrics is not None:
                self.metrics.close()
        finally:
            self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None
