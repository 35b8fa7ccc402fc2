"""HF directory <-> Orbax checkpoint conversion (`python -m convert`), one model copy in host memory."""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Iterator

import numpy as np

from gtpo_jax.checkpoint import Checkpointer, classify_model_dir, is_checkpoint_root, locate_checkpoint
from gtpo_jax.export_dir import check_export_destination
from gtpo_jax.hf_io import (
    DEFAULT_MAX_SHARD_BYTES,
    load_hf_params,
    np_dtype,
    read_hf_config,
    safetensors_files,
    write_hf_dir,
)
from gtpo_jax.model import ModelConfig
from gtpo_jax.model.params import Path, iter_nested


@dataclasses.dataclass(frozen=True)
class ConversionSummary:
    source: str
    destination: str
    step: int
    num_tensors: int
    num_bytes: int
    dtype: str
    seconds: float

    def line(self) -> str:
        size = f"{self.num_bytes / 1e9:.2f} GB" if self.num_bytes >= 1e8 else f"{self.num_bytes / 1e6:.2f} MB"
        return (f"{self.num_tensors} tensors, {size} {self.dtype}: {self.source} -> "
                f"{self.destination} (step {self.step}) in {self.seconds:.1f} s")


def _tree_stats(tree: dict) -> tuple[int, int, str]:
    count, by_dtype = 0, {}
    for _, array in iter_nested(tree):
        count += 1
        by_dtype[array.dtype.name] = by_dtype.get(array.dtype.name, 0) + array.nbytes
    return count, sum(by_dtype.values()), max(by_dtype, key=by_dtype.get)


def hf_to_orbax(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None, progress: bool = False
) -> ConversionSummary:
    """Convert an HF directory to an Orbax checkpoint (step 0, meta {"model_config": config.json}).

    Tensors stream from the safetensors shards into our parameter tree (one copy in memory);
    dtype None keeps the stored dtype. The non-weight files go to <out_dir>/hf_assets.
    Peak host memory is that copy plus what orbax/tensorstore buffer while writing it (measured
    with scripts/bench_convert.py at up to about two more copies, transiently; orbax's
    save_concurrent_gb does not bound it for host arrays).
    """
    start = time.perf_counter()
    hf_dir, out_dir = os.fspath(hf_dir), os.fspath(out_dir)
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"HF model directory {hf_dir} does not exist")
    hf_config = read_hf_config(hf_dir)
    cfg = ModelConfig.from_hf_dict(hf_config)
    safetensors_files(hf_dir)  # fails clearly before anything is created when the weights are not safetensors
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        # A fresh directory only: writing step 0 into a training run (or into the HF source) would mix them up.
        what = "an Orbax checkpoint" if is_checkpoint_root(out_dir) else "files"
        raise FileExistsError(f"{out_dir} already holds {what}; choose a new (or empty) output directory")
    params = load_hf_params(hf_dir, cfg, dtype=None if dtype is None else np_dtype(dtype), progress=progress)
    num_tensors, num_bytes, stored_dtype = _tree_stats(params)
    with Checkpointer(out_dir, async_save=False) as ckpt:
        ckpt.save_hf_assets(hf_dir)
        ckpt.save(0, params=params, meta={"model_config": hf_config, "converted_from": os.path.abspath(hf_dir)},
                  force=True)
    return ConversionSummary(hf_dir, out_dir, 0, num_tensors, num_bytes, stored_dtype, time.perf_counter() - start)


def _drain(tree: dict) -> Iterator[tuple[Path, np.ndarray]]:
    """Leaves of `tree`, each removed from it as it is yielded: once converted, the source is freed."""
    for path in [p for p, _ in iter_nested(tree)]:
        node = tree
        for key in path[:-1]:
            node = node[key]
        yield path, node.pop(path[-1])


def orbax_to_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    step: int | None = None,
    dtype: str | None = None,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = False,
    overwrite: bool = False,
) -> ConversionSummary:
    """Export a checkpoint step (default: latest complete) as an HF directory via `write_hf_dir`
    (written beside `out_dir`, swapped in when complete; a foreign non-empty `out_dir` needs `overwrite`).

    ckpt_dir: a checkpoint root or one of its step directories. Parameters are restored as numpy
    arrays on the host, whatever sharding they were saved with; peak memory is one model copy.
    """
    start = time.perf_counter()
    if classify_model_dir(ckpt_dir) != "orbax":
        raise FileNotFoundError(f"{ckpt_dir} is an HF model directory, not an Orbax checkpoint; nothing to export")
    root, step_in_path = locate_checkpoint(ckpt_dir)
    out_abs = os.path.abspath(os.fspath(out_dir))
    if os.path.commonpath([out_abs, root]) == root:
        raise ValueError(f"refusing to export into the checkpoint directory {root}; choose an output directory outside it")
    check_export_destination(out_abs, overwrite=overwrite)
    ckpt = Checkpointer(root, read_only=True)
    try:
        step = ckpt.usable_step(step if step is not None else step_in_path)
        hf_config = ckpt.model_config(step)
        cfg = ModelConfig.from_hf_dict(hf_config)
        params = ckpt.restore(step)["params"]
    finally:
        ckpt.close()
    assets = ckpt.hf_assets_dir if os.path.isdir(ckpt.hf_assets_dir) else None
    summary = write_hf_dir(_drain(params), cfg, out_dir, dtype=dtype, max_shard_bytes=max_shard_bytes,
                           source_config=hf_config, assets_dir=assets, progress=progress, overwrite=overwrite)
    return ConversionSummary(root, os.fspath(out_dir), step, summary.num_tensors, summary.num_bytes, summary.dtype,
                             time.perf_counter() - start)
