"""Reading HF model directories (config.json + single or sharded safetensors), tensor by tensor."""

from __future__ import annotations

import json
import os
from typing import Iterator

import numpy as np
from safetensors import safe_open

from gtpo_jax.model import ModelConfig, SDARModel, model_from_params
from gtpo_jax.model.params import CheckpointMismatchError, expected_hf_names, hf_to_nnx, set_nested

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"


def safetensors_files(path: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> file, from the index (sharded) or the single file."""
    path = os.fspath(path)
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, fname) for name, fname in weight_map.items()}
    single = os.path.join(path, SINGLE_SAFETENSORS)
    if os.path.isfile(single):
        with safe_open(single, framework="numpy") as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(
        f"{path} holds neither {SINGLE_SAFETENSORS} nor {SAFETENSORS_INDEX}; "
        "gtpo_jax reads HF checkpoints saved as safetensors (save_pretrained(..., safe_serialization=True))"
    )


def iter_hf_tensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """(name, numpy array) one tensor at a time, opening each shard once, in file order."""
    by_file: dict[str, list[str]] = {}
    for name, fname in safetensors_files(path).items():
        by_file.setdefault(fname, []).append(name)
    for fname, names in by_file.items():
        with safe_open(fname, framework="numpy") as f:
            for name in names:
                yield name, f.get_tensor(name)


def load_hf_params(path: str | os.PathLike, cfg: ModelConfig, dtype=None) -> dict:
    """Nested-dict parameters in our layout, keeping the stored dtype unless `dtype` is given.

    Every tensor is checked against the architecture; missing and unexpected tensors are errors.
    """
    params: dict = {}
    seen = set()
    for name, tensor in iter_hf_tensors(path):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            # Some tied checkpoints still store the (identical) head; it carries no information.
            continue
        nnx_path, array = hf_to_nnx(name, tensor, cfg)
        set_nested(params, nnx_path, array if dtype is None else array.astype(dtype))
        seen.add(name)
    missing = [n for n in expected_hf_names(cfg) if n not in seen]
    if missing:
        raise CheckpointMismatchError(f"{path} is missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return params


def read_hf_config(path: str | os.PathLike) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def load_hf_model(path: str | os.PathLike, **runtime) -> SDARModel:
    """An SDARModel with the weights of an HF directory. `runtime`: ModelConfig runtime fields."""
    cfg = ModelConfig.from_hf_dir(path, **runtime)
    return model_from_params(cfg, load_hf_params(path, cfg))
