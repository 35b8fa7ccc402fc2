"""Orbax checkpoints of training runs, and `load_model` for either kind of directory (HF or Orbax;
HF ⇄ Orbax conversion is in gtpo_jax.conversion).

A checkpoint directory is the root of an `orbax.checkpoint.CheckpointManager`:

    <root>/<step>/params         our parameter tree: nested dict, string keys, NNX layout (as `params_of`)
    <root>/<step>/opt_state      optimizer state (optional)
    <root>/<step>/extra_<name>   further array trees, e.g. the GTPO reference policy (optional)
    <root>/<step>/meta           JSON: data iterator state, RNG, prompt cursor, model_config...
    <root>/<step>/gtpo_checksums.json   size and CRC-32 of every file of the step, written once committed
    <root>/hf_assets/            config.json + tokenizer, chat template, generation config, custom code;
                                 written once, so that any step exports back to an HF directory
    <root>/incomplete/, damaged/ steps set aside: interrupted saves, steps whose checksums disagree

Modules: manager (`Checkpointer`, over orbax's CheckpointManager), steps (step directories on
disk, which kind of directory a path is), integrity (checksums), trees (stored array trees),
hf_assets, load (`load_model`).
"""

from gtpo_jax.checkpoint.integrity import MANIFEST, CheckpointCorruptError, verify_step
from gtpo_jax.checkpoint.load import load_model
from gtpo_jax.checkpoint.manager import Checkpointer
from gtpo_jax.checkpoint.steps import (
    HF_ASSETS,
    classify_model_dir,
    is_checkpoint_root,
    locate_checkpoint,
)
from gtpo_jax.checkpoint.trees import param_tree

__all__ = [
    "HF_ASSETS",
    "MANIFEST",
    "CheckpointCorruptError",
    "Checkpointer",
    "classify_model_dir",
    "is_checkpoint_root",
    "load_model",
    "locate_checkpoint",
    "param_tree",
    "verify_step",
]
