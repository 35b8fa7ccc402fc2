"""`load_model`: the model stored in an HF directory or an Orbax checkpoint."""

from __future__ import annotations

import os
from typing import Any

from gtpo_jax.checkpoint.manager import Checkpointer
from gtpo_jax.checkpoint.steps import classify_model_dir, locate_checkpoint
from gtpo_jax.hf_io import load_hf_model, safetensors_files
from gtpo_jax.model import ModelConfig, SDARModel, model_from_params


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
