"""Shared fixtures: tiny random SDAR-style HF checkpoints built with transformers' Qwen3."""

from __future__ import annotations

import importlib
import json
import os

import numpy as np
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Eight fake CPU devices for the sharding tests; must be set before jax is imported.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()


def pytest_configure(config):
    """In the xdist controller (or a single process), before any worker collects: import yapf once.

    LMDeploy imports mmengine, which imports yapf, whose first import writes its grammar pickles to
    ~/.cache/YAPF. Two workers collecting tests/test_lmdeploy_bridge.py on a fresh machine raced on
    that file (one read it half-written: EOFError, a CI failure), so it is written here, once, first.
    """
    if hasattr(config, "workerinput"):
        return
    try:
        importlib.import_module("yapf")
    except ImportError:  # no yapf (LMDeploy's CPU sources not installed): nothing to race on
        pass


def tiny_hf_config(tie: bool = True, vocab_size: int = 160, **overrides) -> dict:
    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        hidden_act="silu",
        attention_bias=False,
        use_sliding_window=False,
    )
    cfg.update(overrides)
    return cfg


def write_tiny_hf_checkpoint(path, tie: bool = True, seed: int = 0, dtype: str = "float32", **overrides):
    """Save a random transformers Qwen3ForCausalLM and relabel it as an SDAR checkpoint.

    Returns the torch model (eval mode, float32) for parity checks.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    hf_cfg = Qwen3Config(**tiny_hf_config(tie=tie, **overrides))
    model = Qwen3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # norms start at 1: randomise them so a mix-up cannot hide
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.to(getattr(torch, dtype)).save_pretrained(path, safe_serialization=True)
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    cfg.update(model_type="sdar", architectures=["SDARForCausalLM"], block_size=4, torch_dtype=dtype)
    cfg.pop("dtype", None)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return model.float()


def block_causal_additive_mask(length: int, block_size: int, segments=None):
    """Dense float mask written independently of gtpo_jax: 0 where visible, -inf elsewhere."""
    q = np.arange(length)[:, None] // block_size
    k = np.arange(length)[None, :] // block_size
    visible = k <= q
    if segments is not None:
        segments = np.asarray(segments)
        visible = visible & (segments[:, None] == segments[None, :])
    return np.where(visible, 0.0, -np.inf).astype(np.float32)


def metrics_by_step(out_dir) -> dict[int, dict]:
    """A run's metrics.jsonl as {step: record}. Records of one step are merged, later values
    winning: a step logged before a crash and again after the resume keeps the resumed values."""
    out: dict[int, dict] = {}
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            out.setdefault(rec["step"], {}).update(rec)
    return out


@pytest.fixture
def rng():
    return np.random.default_rng(0)
