"""Every shipped config loads into its typed tree and passes validation; overrides are typed."""

from __future__ import annotations

import dataclasses
import glob
import os

import pytest

from gtpo_jax.config import Config
from gtpo_jax.config_loader import ConfigError, load_config
from gtpo_jax.evaluate import EvalConfig

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.yaml")))


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_shipped_config_is_valid(path):
    if os.path.basename(path).startswith("eval_"):
        cfg = load_config(EvalConfig, path)
        assert cfg.datasets
    else:
        cfg = load_config(Config, path)
        cfg.validate()
        assert cfg.stage in os.path.basename(path)


def test_seed_recipes_carry_the_seed_settings():
    gtpo = load_config(Config, os.path.join(os.path.dirname(CONFIGS[0]), "gtpo_sdar8b.yaml"))
    assert (gtpo.gtpo.num_task_per_step, gtpo.gtpo.num_response_per_task) == (128, 8)
    assert (gtpo.block_size, gtpo.decoding.max_new_tokens, gtpo.decoding.threshold) == (4, 8192, 0.9)
    assert (gtpo.decoding.temperature, gtpo.decoding.top_k, gtpo.optim.lr) == (1.0, 50, 1e-6)
    sft = load_config(Config, os.path.join(os.path.dirname(CONFIGS[0]), "sft_sdar8b.yaml"))
    assert sft.block_size == 4 and sft.model.dtype == "bfloat16" and sft.data.max_len == 8192


def test_overrides_are_parsed_and_typed():
    path = os.path.join(os.path.dirname(CONFIGS[0]), "sft_tiny.yaml")
    cfg = load_config(Config, path, ["optim.lr=2e-5", "data.train_files=[a.jsonl, b.jsonl]", "train.steps=7",
                                     "gtpo.rewards={accuracy: 1.0, format: 0.5}"])
    assert cfg.optim.lr == 2e-5 and cfg.train.steps == 7
    assert cfg.data.train_files == ["a.jsonl", "b.jsonl"]
    assert cfg.gtpo.rewards == {"accuracy": 1.0, "format": 0.5}
    with pytest.raises(ConfigError, match=r"optim\.lr: expected a number"):
        load_config(Config, path, ["optim.lr=fast"])
    with pytest.raises(ConfigError, match=r"unknown key 'optimizer'"):
        load_config(Config, path, ["optimizer.lr=1"])


def test_tiny_speed_demo_differs_from_the_accuracy_demo_only_in_its_reward():
    """The speed run's comparison with the accuracy-only run (README) holds only if nothing else differs."""
    here = os.path.dirname(CONFIGS[0])
    acc, speed = (dataclasses.asdict(load_config(Config, os.path.join(here, name)))
                  for name in ("gtpo_tiny.yaml", "gtpo_tiny_speed.yaml"))
    assert set(acc["gtpo"]["rewards"]) == {"accuracy"} and set(speed["gtpo"]["rewards"]) == {"accuracy", "speed"}
    for cfg in (acc, speed):
        del cfg["output_dir"], cfg["gtpo"]["rewards"]
    assert acc == speed
