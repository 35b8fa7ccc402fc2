"""HF model directories (config.json + single or sharded safetensors), read and written tensor by tensor.

Both directions hold at most one copy of the model in host memory: reading converts each tensor
to our layout as it leaves its shard (`safetensors.safe_open`, one tensor per opening), and writing converts each tensor to the HF layout (dropping
the source when the caller hands over an iterator that lets go of it, as `orbax_to_hf` does), then
writes every shard straight from those arrays (safetensors >= 0.8 serialises from the arrays'
buffers, bfloat16 included, without building the file in memory).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import json
import os
import re
import shutil
from typing import Any, Iterable, Iterator, Mapping

import jax
import ml_dtypes
import numpy as np
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from tqdm import tqdm

from gtpo_jax.distributed import barrier
from gtpo_jax.export_dir import check_export_destination, staged_directory
from gtpo_jax.model import ModelConfig, SDARModel, model_from_params
from gtpo_jax.model.config import DTYPES, read_json_file
from gtpo_jax.model.params import (
    CheckpointMismatchError,
    Path,
    check_hf_shape,
    expected_hf_names,
    hf_to_nnx,
    iter_nested,
    nnx_to_hf,
    set_nested,
)
from gtpo_jax.sharding import to_host

SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_SAFETENSORS = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB", transformers 4's default max_shard_size (LMDeploy and vLLM read any size)
# Files of an HF directory that hold weights: never copied as assets.
WEIGHT_FILE_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclasses.dataclass(frozen=True)
class HFDirSummary:
    """What `write_hf_dir` wrote."""

    files: list[str]  # weight files, in order
    num_tensors: int
    num_bytes: int
    dtype: str  # the dtype holding most bytes (the one config.json's torch_dtype names)


# ---- reading ---------------------------------------------------------------------------------
def safetensors_files(path: str | os.PathLike) -> dict[str, str]:
    """Tensor name -> file, from the index (sharded) or the single file."""
    path = os.fspath(path)
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.isfile(index):
        content = read_json_file(index)
        weight_map = content.get("weight_map") if isinstance(content, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointMismatchError(f"{index} has no 'weight_map' (tensor name -> file); the index is damaged: "
                                          "copy it again from the model's source")
        return {name: os.path.join(path, fname) for name, fname in weight_map.items()}
    single = os.path.join(path, SINGLE_SAFETENSORS)
    if os.path.isfile(single):
        with _open_safetensors(single) as f:
            return {name: single for name in f.keys()}
    raise FileNotFoundError(
        f"{path} holds neither {SINGLE_SAFETENSORS} nor {SAFETENSORS_INDEX}; "
        "gtpo_jax reads HF checkpoints saved as safetensors (save_pretrained(..., safe_serialization=True))"
    )


def iter_hf_tensors(path: str | os.PathLike) -> Iterator[tuple[str, np.ndarray]]:
    """(name, numpy array) one tensor at a time, in file order, each read with `safe_open`.

    A file is opened anew for each tensor: `safe_open` memory-maps it, and the mapped pages a read
    touches stay resident (and count in RSS) until it is closed, so that reading a whole
    single-file checkpoint under one open would hold the model twice.
    """
    by_file: dict[str, list[str]] = {}
    for name, fname in safetensors_files(path).items():
        by_file.setdefault(fname, []).append(name)
    for fname, names in by_file.items():
        for name in names:
            with _open_safetensors(fname) as f:
                if name not in f.keys():
                    raise CheckpointMismatchError(f"{fname} lacks tensor {name!r} that its index names")
                try:
                    tensor = f.get_tensor(name)
                except (AttributeError, TypeError, SafetensorError) as e:  # e.g. a dtype numpy lacks
                    raise CheckpointMismatchError(f"cannot read tensor {name!r} of {fname}: {e}") from None
            yield name, tensor


@contextlib.contextmanager
def _open_safetensors(fname: str):
    try:
        f = safe_open(fname, framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointMismatchError(f"{fname} is not a readable safetensors file: {e}") from None
    with f:
        yield f


def load_hf_params(path: str | os.PathLike, cfg: ModelConfig, dtype=None, *, progress: bool = False) -> dict:
    """Nested-dict parameters in our layout, keeping the stored dtype unless `dtype` is given.

    Every tensor is checked against the architecture; missing and unexpected tensors are errors.
    `progress` shows a tqdm bar over tensors (the CLI's).
    """
    target = None if dtype is None else np_dtype(dtype)
    params: dict = {}
    seen = set()
    tensors = iter_hf_tensors(path)
    if progress:
        tensors = tqdm(tensors, total=len(safetensors_files(path)), desc="reading", unit="tensor")
    for name, tensor in tensors:
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            # Some tied checkpoints still store the (identical) head; it carries no information.
            continue
        if target is not None:  # cast before the layout change: the transposed copy is then the smaller one
            tensor = tensor.astype(target, copy=False)
        nnx_path, array = hf_to_nnx(name, tensor, cfg)
        set_nested(params, nnx_path, array)
        seen.add(name)
    missing = [n for n in expected_hf_names(cfg) if n not in seen]
    if missing:
        raise CheckpointMismatchError(f"{path} is missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    return params


def read_hf_config(path: str | os.PathLike) -> dict:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} has no config.json; is it an HF model directory?")
    return read_json_file(cfg_path)


def load_hf_model(path: str | os.PathLike, **runtime) -> SDARModel:
    """An SDARModel with the weights of an HF directory. `runtime`: ModelConfig runtime fields."""
    cfg = ModelConfig.from_hf_dir(path, **runtime)
    return model_from_params(cfg, load_hf_params(path, cfg))


# ---- writing ---------------------------------------------------------------------------------
def np_dtype(name: str | np.dtype) -> np.dtype:
    """numpy dtype for a config dtype name ("float32", "bfloat16"); bfloat16 comes from ml_dtypes."""
    if isinstance(name, np.dtype):
        return name
    if name == "bfloat16":
        return np.dtype(ml_dtypes.bfloat16)
    if name in DTYPES:
        return np.dtype(name)
    raise ValueError(f"unsupported dtype {name!r}; choose one of {DTYPES} (or None to keep the stored dtype)")


def parse_byte_size(size: int | str) -> int:
    """Bytes from an int or a transformers-style size string: "5GB" = 5e9, "2GiB" = 2 * 2**30, "500MB"."""
    if isinstance(size, int):
        value = size
    else:
        m = _SIZE_RE.match(str(size))
        if not m:
            raise ValueError(f"cannot read size {size!r}; write e.g. 5GB, 500MB, 2GiB or a number of bytes")
        value = int(float(m.group(1)) * _SIZE_UNITS[(m.group(2) or "").upper()])
    if value <= 0:
        raise ValueError(f"size must be positive, got {size!r}")
    return value


def is_weight_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, pattern) for pattern in WEIGHT_FILE_PATTERNS)


def remove_weight_files(hf_dir: str | os.PathLike) -> list[str]:
    """Delete the weight files of an HF directory (config, tokenizer and other assets stay)."""
    removed = [name for name in sorted(os.listdir(hf_dir)) if is_weight_file(name)]
    for name in removed:
        os.remove(os.path.join(hf_dir, name))
    return removed


def copy_hf_assets(src_dir: str | os.PathLike, dst_dir: str | os.PathLike, *, include_config: bool = False) -> list[str]:
    """Copy what an HF directory holds besides its weights: tokenizer files, chat template,
    generation_config.json, custom code (*.py), README... (top-level regular files, no dotfiles).

    config.json is copied only when asked: writers produce their own from the model config.
    """
    copied = []
    for name in sorted(os.listdir(src_dir)):
        src = os.path.join(src_dir, name)
        if (name.startswith(".") or not os.path.isfile(src) or is_weight_file(name)
                or (name == "config.json" and not include_config)):
            continue
        shutil.copy2(src, os.path.join(dst_dir, name))
        copied.append(name)
    return copied


def host_array(array: Any, dtype: str | np.dtype | None = None) -> np.ndarray:
    """One parameter as a host array in `dtype` (None: its own). A jax array is cast where it lives
    (a bf16 export moves half the bytes of fp32 master weights) and gathered when it spans
    processes: a collective, so every process must call this for the same tensors in the same order."""
    target = None if dtype is None else np_dtype(dtype)
    if isinstance(array, jax.Array):
        if target is not None and array.dtype != target:
            array = array.astype(target)
        return to_host(array)
    array = np.asarray(array)
    return array if target is None else array.astype(target, copy=False)


def host_tensors(params: Mapping, dtype: str | np.dtype | None = None) -> Iterator[tuple[Path, np.ndarray]]:
    """(path, host array) of every leaf of a nested parameter tree, one at a time (see `host_array`)."""
    for path, array in iter_nested(params):
        yield tuple(path), host_array(array, dtype)


def export_hf_dir(params: Mapping, cfg: ModelConfig, out_dir: str | os.PathLike, *, dtype: str | None,
                  **write_options: Any) -> HFDirSummary | None:
    """`write_hf_dir` for a run of one or several processes: every process calls it (each tensor is
    gathered in turn, cast to `dtype` on the devices first), process 0 writes, and all return once
    the directory is complete (so that any process may read it). Process 0 gets the summary."""
    tensors = host_tensors(params, dtype)
    summary = None
    if jax.process_index() == 0:
        summary = write_hf_dir(tensors, cfg, out_dir, **write_options)
    else:
        for _ in tensors:  # take part in every gather
            pass
    barrier("hf export written")
    return summary


def _to_hf_tensor(
    path: Path, array: Any, cfg: ModelConfig, target: np.dtype | None, expected: set[str]
) -> tuple[str, np.ndarray]:
    array = host_array(array, target)  # a jax array comes to the host here, one tensor at a time
    try:
        name, tensor = nnx_to_hf(path, array, cfg)
    except KeyError:
        raise CheckpointMismatchError(
            f"parameter {'.'.join(map(str, path))} has no HF counterpart in an SDAR/Qwen3 decoder"
        ) from None
    if name not in expected:
        raise CheckpointMismatchError(
            f"parameter {'.'.join(map(str, path))} ({name!r}) does not belong to this model "
            f"({cfg.num_layers} layers, tie_word_embeddings={cfg.tie_word_embeddings})"
        )
    check_hf_shape(name, tensor.shape, cfg, config="the model config", weights="the parameters")
    return name, tensor


def write_hf_dir(
    params: Mapping | Iterable[tuple[Path, Any]],
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_shard_bytes: int | str = DEFAULT_MAX_SHARD_BYTES,
    source_config: Mapping[str, Any] | None = None,
    assets_dir: str | os.PathLike | None = None,
    progress: bool = False,
    overwrite: bool = False,
) -> HFDirSummary:
    """Write an HF directory that transformers and LMDeploy load: safetensors weights, config.json, assets.

    params: our parameter tree (nested dict, NNX layout, numpy or jax leaves) or an iterable of
        (path, array). Peak host memory is one copy of the model when the iterable releases each
        source array once yielded; with a dict the caller's copy stays alive alongside.
    dtype: cast to "float32"/"bfloat16"; None keeps each tensor's dtype (a bit-exact export).
    max_shard_bytes: int or "5GB"-style; more than one shard adds model.safetensors.index.json.
    source_config: the original config.json; every field of it survives (model_type, architectures,
        auto_map, block_size...), architecture fields come from `cfg`, torch_dtype is the written dtype.
    assets_dir: an HF directory whose non-weight files (tokenizer, chat template, generation config,
        custom *.py code) are copied alongside.

    The directory is written beside `out_dir` and swapped in whole once complete (see
    `staged_directory`): a failed export leaves the previous one untouched, and a non-empty
    `out_dir` that is not an earlier export of ours is refused unless `overwrite`.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if assets_dir is not None and os.path.isdir(out_dir) and os.path.samefile(assets_dir, out_dir):
        raise ValueError(f"refusing to export into the source directory {out_dir}; choose another output directory")
    check_export_destination(out_dir, overwrite=overwrite)  # before the (long) conversion
    limit = parse_byte_size(max_shard_bytes)
    target = None if dtype is None else np_dtype(dtype)
    names = expected_hf_names(cfg)
    expected = set(names)
    leaves = iter_nested(params) if isinstance(params, Mapping) else params
    tensors: dict[str, np.ndarray] = {}
    for path, array in tqdm(leaves, desc="converting", unit="tensor", disable=not progress):
        name, tensor = _to_hf_tensor(tuple(path), array, cfg, target, expected)
        tensors[name] = tensor
    missing = [n for n in names if n not in tensors]
    if missing:
        raise CheckpointMismatchError(
            f"the parameters lack tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
            f"that a {cfg.num_layers}-layer model needs"
        )
    bytes_by_dtype: dict[str, int] = {}
    for tensor in tensors.values():
        bytes_by_dtype[tensor.dtype.name] = bytes_by_dtype.get(tensor.dtype.name, 0) + tensor.nbytes
    written_dtype = max(bytes_by_dtype, key=bytes_by_dtype.get)
    total = sum(bytes_by_dtype.values())

    with staged_directory(out_dir, overwrite=overwrite) as stage:
        files, weight_map = _write_weights(tensors, names, limit, stage, progress)
        hf_config = cfg.to_hf_dict(dict(source_config) if source_config is not None else None)
        hf_config["torch_dtype"] = written_dtype
        if "dtype" in hf_config:  # transformers >= 5 names the field `dtype`; keep both in step
            hf_config["dtype"] = written_dtype
        with open(os.path.join(stage, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=2, sort_keys=True)
            f.write("\n")
        if assets_dir is not None:
            copy_hf_assets(assets_dir, stage)
    return HFDirSummary(files=files, num_tensors=len(weight_map), num_bytes=total, dtype=written_dtype)


def _write_weights(tensors: dict[str, np.ndarray], names: list[str], limit: int, out_dir: str,
                   progress: bool) -> tuple[list[str], dict[str, str]]:
    """Safetensors shard(s), plus the index when there are several; `tensors` is emptied as they are written.
    Shards are planned by huggingface_hub's splitter (transformers' own rule), in checkpoint order."""
    split = split_state_dict_into_shards_factory(
        {n: tensors[n] for n in names}, get_storage_size=lambda t: t.nbytes,
        filename_pattern=SINGLE_SAFETENSORS.replace(".safetensors", "{suffix}.safetensors"), max_shard_size=limit)
    for fname, shard in tqdm(list(split.filename_to_tensors.items()), desc="writing", unit="shard",
                             disable=not progress):
        save_file({n: tensors[n] for n in shard}, os.path.join(out_dir, fname), metadata={"format": "pt"})
        for n in shard:
            del tensors[n]  # written: let it go
    if split.is_sharded:
        with open(os.path.join(out_dir, SAFETENSORS_INDEX), "w") as f:
            json.dump({"metadata": split.metadata, "weight_map": split.tensor_to_filename}, f, indent=2)
            f.write("\n")
    return list(split.filename_to_tensors), split.tensor_to_filename
