"""HF directory -> Orbax checkpoint (step 0): a thin wrapper over `gtpo_jax.conversion.hf_to_orbax`."""

from __future__ import annotations

import os

from gtpo_jax.conversion import ConversionSummary, hf_to_orbax


def convert_hf_to_orbax(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None, progress: bool = False
) -> ConversionSummary:
    """Convert `hf_dir` into a new checkpoint root `out_dir`; dtype None keeps the stored dtype (bit-exact)."""
    return hf_to_orbax(hf_dir, out_dir, dtype=dtype, progress=progress)
