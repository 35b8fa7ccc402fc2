"""The SFT stage end to end: exact resume, interrupted saves, bad input, bad configs, NaN guard."""

from __future__ import annotations

import json
import logging
import os

import numpy as np
import pytest

from conftest import metrics_by_step
from gtpo_jax.config import Config
from gtpo_jax.config_loader import ConfigError, load_config
from gtpo_jax.data.records import RecordError
from gtpo_jax.trainers import session as session_module
from gtpo_jax.trainers.sft import run_sft

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "sft_tiny.yaml")


def tiny_overrides(out_dir, **extra) -> list[str]:
    values = {
        "output_dir": str(out_dir),
        "model.preset_overrides": "{}",
        "data.synthetic_train": 300,
        "data.synthetic_eval": 10,
        "data.max_len": 64,
        "train.batch_size": 4,
        "train.micro_batches": 2,
        "train.steps": 6,
        "train.log_every": 3,
        "checkpoint.save_every": 3,
        "checkpoint.export_hf": "false",
        "eval.enabled": "false",
        "optim.warmup_steps": 2,
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def losses(out_dir) -> dict[int, float]:
    return {step: rec["loss"] for step, rec in metrics_by_step(out_dir).items() if "loss" in rec}


class Crash(RuntimeError):
    pass


def test_resume_is_exact(tmp_path, monkeypatch):
    full = load_config(Config, CONFIG, tiny_overrides(tmp_path / "full"))
    run_sft(full)
    expected = losses(tmp_path / "full")
    assert sorted(expected) == list(range(1, 7))

    # Same run, crashing during step 5 (after checkpoint 3 and step 4): resumes from step 3.
    original = session_module.TrainingSession.update

    def crashing_update(self, arrays):
        if self.step == 4:
            raise Crash("simulated failure")
        return original(self, arrays)

    monkeypatch.setattr(session_module.TrainingSession, "update", crashing_update)
    interrupted = load_config(Config, CONFIG, tiny_overrides(tmp_path / "resumed"))
    with pytest.raises(Crash):
        run_sft(interrupted)
    assert sorted(losses(tmp_path / "resumed")) == [1, 2, 3, 4]
    monkeypatch.setattr(session_module.TrainingSession, "update", original)

    resumed = load_config(Config, CONFIG, tiny_overrides(tmp_path / "resumed"))
    run_sft(resumed)
    got = losses(tmp_path / "resumed")
    assert sorted(got) == sorted(expected)
    for step in expected:  # same data order, same masks, same parameters
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])


def test_interrupted_save_is_ignored_on_resume(tmp_path, caplog):
    out = tmp_path / "run"
    run_sft(load_config(Config, CONFIG, tiny_overrides(out, **{"train.steps": 3})))
    ckpt = out / "checkpoints"
    # A save of step 6 cut short: the step directory exists but orbax never committed it.
    (ckpt / "6" / "params").mkdir(parents=True)
    caplog.set_level(logging.WARNING)
    run_sft(load_config(Config, CONFIG, tiny_overrides(out, **{"train.steps": 4})))
    assert any("interrupted save" in r.getMessage() for r in caplog.records)
    assert sorted(losses(out)) == [1, 2, 3, 4]  # resumed from 3, not from the broken 6
    assert not (ckpt / "6").exists()


def test_nan_guard_skips_then_stops(tmp_path, monkeypatch):
    original = session_module.TrainingSession.update

    def poisoned(self, arrays):
        arrays = dict(arrays)
        arrays["weight"] = np.full_like(arrays["weight"], np.nan)
        return original(self, arrays)

    monkeypatch.setattr(session_module.TrainingSession, "update", poisoned)
    cfg = load_config(Config, CONFIG, tiny_overrides(tmp_path, **{"train.max_bad_steps": 2}))
    with pytest.raises(FloatingPointError, match="2 consecutive steps had a non-finite loss"):
        run_sft(cfg)
    with open(tmp_path / "metrics.jsonl") as f:
        skipped = [json.loads(line)["skipped"] for line in f]
    assert skipped == [1]  # the second bad step raises before it is logged


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


def file_overrides(tmp_path, data_file) -> list[str]:
    from gtpo_jax.data.tiny_tokenizer import build_tiny_tokenizer

    tok = build_tiny_tokenizer(str(tmp_path / "tok"))
    return tiny_overrides(tmp_path / "run", **{"data.synthetic": "false"}) + [
        f"data.train_files=[{data_file}]", f"tokenizer.path={tok}"]


GOOD = {"prompt": "What is 1 + 2?", "response": "\\boxed{3}"}  # raw texts: template and stop tokens added


@pytest.mark.parametrize(
    "rows, message",
    [
        ([GOOD, "{not json", GOOD], r"bad\.jsonl:2: malformed JSON"),
        ([GOOD, {"prompt": "x"}], r"bad\.jsonl:2: missing field 'response'"),
        ([GOOD, {"prompt": "x", "response": 3}], r"bad\.jsonl:2: field 'response' must be a string"),
        ([], r"no records"),
    ],
)
def test_bad_data_is_a_clear_error(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    cfg = load_config(Config, CONFIG, file_overrides(tmp_path, path))
    with pytest.raises(RecordError, match=message):
        run_sft(cfg)


def test_prompt_longer_than_limit(tmp_path):
    long_prompt = dict(GOOD, prompt=GOOD["prompt"] + "1 + 2 " * 100)
    path = write_jsonl(tmp_path / "long.jsonl", [GOOD, long_prompt])
    base = file_overrides(tmp_path, path)
    with pytest.raises(RecordError, match=r"more than data.max_len=64.*data.prompt_too_long=skip"):
        run_sft(load_config(Config, CONFIG, base))
    # Skipping instead: the run goes on and every skip is counted in the metrics.
    run_sft(load_config(Config, CONFIG, base + ["data.prompt_too_long=skip", "train.steps=3"]))  # > warmup_steps
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        recs = [json.loads(line) for line in f]
    assert sum(r["skipped_samples"] for r in recs) >= 2


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.lrr=1e-5"], r"unknown key 'lrr' in optim\. Did you mean 'lr'\?"),
        (["train.steps=ten"], r"train\.steps: expected an integer"),
        (["masking.mask_sampling=per_row"], r"masking\.mask_sampling: must be one of"),
        (["train.batch_size=6", "train.micro_batches=4"], r"must be a multiple of train\.micro_batches"),
        (["optim.lr"], r"must look like key=value"),
    ],
)
def test_bad_config_fails_before_work(tmp_path, overrides, message):
    with pytest.raises((ConfigError, ValueError), match=message):
        cfg = load_config(Config, CONFIG, tiny_overrides(tmp_path) + overrides)
        cfg.validate()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_block_size_disagreeing_with_checkpoint(tmp_path):
    from conftest import write_tiny_hf_checkpoint
    from gtpo_jax.data.tiny_tokenizer import build_tiny_tokenizer
    from gtpo_jax.model import ModelConfigError

    hf = tmp_path / "hf"
    write_tiny_hf_checkpoint(str(hf), vocab_size=256)  # config.json says block_size 4
    tok = build_tiny_tokenizer(str(tmp_path / "tok"))
    cfg = load_config(Config, CONFIG, tiny_overrides(tmp_path / "run") +
                      [f"model.path={hf}", f"tokenizer.path={tok}", "block_size=8"])
    with pytest.raises(ModelConfigError, match="block_size 8 disagrees with .*block_size 4"):
        run_sft(cfg)
