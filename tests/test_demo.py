"""The README demo at full scale (about 10 minutes on 2 cores): `pytest -m slow`."""

from __future__ import annotations

import os

import pytest

from gtpo_jax.config import Config
from gtpo_jax.config_loader import load_config
from gtpo_jax.trainers.gtpo import run_gtpo
from gtpo_jax.trainers.sft import run_sft

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")


@pytest.mark.slow
def test_demo_sft_then_gtpo_raises_held_out_accuracy(tmp_path):
    sft = run_sft(load_config(Config, os.path.join(CONFIGS, "sft_tiny.yaml"),
                              [f"output_dir={tmp_path / 'sft'}", "checkpoint.export_hf=false"]))
    before, after = sft["eval"]["before"]["accuracy"], sft["eval"]["after"]["accuracy"]
    assert before < 0.05 and after >= 0.2, (before, after)
    gtpo = run_gtpo(load_config(Config, os.path.join(CONFIGS, "gtpo_tiny.yaml"),
                                [f"output_dir={tmp_path / 'gtpo'}", f"model.path={tmp_path / 'sft' / 'checkpoints'}"]))
    assert gtpo["eval"]["before"]["accuracy"] == pytest.approx(after)  # greedy: same model, same numbers
    assert gtpo["eval"]["after"]["accuracy"] > after
    assert os.path.isfile(tmp_path / "gtpo" / "hf" / "config.json")  # exported for transformers / LMDeploy
