"""`<root>/hf_assets/` of a checkpoint: config.json + tokenizer, chat template, generation config
and custom code, written once so that any step exports back to an HF directory."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import jax

from gtpo_jax.hf_io import copy_hf_assets, read_hf_config


def write_hf_assets(dest: str, source: str | os.PathLike | Mapping[str, Any]) -> str:
    """Replace `dest` with config.json and the non-weight files of `source` (process 0 writes).

    source: an HF directory (its config.json and non-weight files); or {"config": <config.json
    dict>, "files_from": <directory, optional>} to write that config with another directory's
    files (e.g. a tokenizer); or a bare config.json dict.
    """
    if isinstance(source, Mapping):
        config, files_from = (source["config"], source.get("files_from")) if "config" in source else (source, None)
    else:
        files_from, config = os.fspath(source), read_hf_config(source)
    if jax.process_index() != 0:
        return dest
    # Written beside `dest` and renamed into place, so that a reader never sees half of them.
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    if files_from is not None:
        copy_hf_assets(files_from, tmp)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
        f.write("\n")
    old = f"{dest}.old-{os.getpid()}"
    if os.path.isdir(dest):
        os.rename(dest, old)
    os.rename(tmp, dest)
    shutil.rmtree(old, ignore_errors=True)
    return dest
