"""Orbax checkpoint step -> HF directory: a thin wrapper over `gtpo_jax.conversion.orbax_to_hf`."""

from __future__ import annotations

import os

from gtpo_jax.conversion import ConversionSummary, orbax_to_hf
from gtpo_jax.hf_io import DEFAULT_MAX_SHARD_BYTES


def convert_orbax_to_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    step: int | None = None,
    dtype: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = False,
    overwrite: bool = False,
) -> ConversionSummary:
    """Export `step` (default: the latest complete one) of a checkpoint root or step directory to `out_dir`."""
    return orbax_to_hf(ckpt_dir, out_dir, step=step, dtype=dtype, max_shard_bytes=max_shard_size, progress=progress,
                       overwrite=overwrite)
