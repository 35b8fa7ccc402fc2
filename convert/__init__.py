"""Command-line conversion between HF model directories and gtpo_jax Orbax checkpoints.

    python -m convert hf2orbax HF_DIR OUT [--dtype float32|bfloat16]
    python -m convert orbax2hf CKPT OUT [--step N] [--dtype float32|bfloat16] [--max-shard-size 5GB]

The logic lives in `gtpo_jax.checkpoint` (importable without this package); these modules are
the thin CLI layer over it.
"""

from convert.hf_to_orbax import convert_hf_to_orbax
from convert.orbax_to_hf import convert_orbax_to_hf

__all__ = ["convert_hf_to_orbax", "convert_orbax_to_hf"]
