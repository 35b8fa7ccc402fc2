"""Discoverable configs: --help lists every key, --print-config shows the resolved config that
config.yaml then holds, and a changed config does not silently resume an old run."""

from __future__ import annotations

import dataclasses
import os
import shutil
import typing

import pytest
import yaml

from gtpo_jax import train
from gtpo_jax.config import Config
from gtpo_jax.config_loader import ConfigError, dump_yaml, load_config
from gtpo_jax.evaluate import EvalConfig
from gtpo_jax.evaluate import main as evaluate_main
from gtpo_jax.sampling import DecodingConfig
from gtpo_jax.sampling.__main__ import main as sampling_main
from gtpo_jax.trainers.session import TrainingSession

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SFT_TINY = os.path.join(REPO, "configs", "sft_tiny.yaml")


def leaf_keys(cls, prefix=""):
    """Every dotted key of a config tree, walked here independently of the code under test."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from leaf_keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


@pytest.mark.parametrize("cls, main", [(Config, train.main), (EvalConfig, evaluate_main),
                                       (DecodingConfig, sampling_main)])
def test_help_lists_every_key_with_type_default_and_meaning(cls, main, capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    lines = capsys.readouterr().out.splitlines()
    keys = list(leaf_keys(cls))
    assert len(keys) > 10 if cls is not DecodingConfig else len(keys) > 5
    for key in keys:
        row = [i for i, line in enumerate(lines) if line.split() and line.split()[0] == key]
        assert row, f"--help does not list {key}"
        i = row[0]
        assert " = " in lines[i], f"{key}: no type = default"
        below = lines[i + 1] if i + 1 < len(lines) else ""
        indent = len(below) - len(below.lstrip())
        assert below.strip() and indent > 2 + len(key), f"{key} has no line of meaning (a comment on the field)"
    if cls is Config:  # the learning rate's default depends on the stage; --help says which
        row = next(i for i, line in enumerate(lines) if line.split() and line.split()[0] == "optim.lr")
        assert lines[row].split()[1:] == ["float", "or", "null", "=", "null"]
        assert "sft 1e-5, gtpo 1e-6" in lines[row + 1]


@pytest.mark.parametrize("cls, path, override, new_place", [
    (Config, "gtpo_tiny.yaml", "rollout.temperature=0.7", "rollout.temperature is now decoding.temperature"),
    (Config, "gtpo_tiny.yaml", "rollout.tensor_parallel=2",
     "rollout.tensor_parallel is now decoding.lmdeploy.tensor_parallel"),
    (Config, "gtpo_tiny.yaml", "rollout.jax_max_batch=8", "rollout.jax_max_batch is now decoding.jax.max_batch"),
    (Config, "gtpo_tiny.yaml", "gtpo.grader_workers=4", "gtpo.grader_workers is now grader.workers"),
    (EvalConfig, "eval_tiny.yaml", "n=8", "n is now eval.num_samples"),
    (EvalConfig, "eval_tiny.yaml", "grader_timeout_s=5", "grader_timeout_s is now grader.timeout_s"),
])
def test_a_renamed_key_fails_naming_its_new_place(cls, path, override, new_place, capsys):
    """An old key is never silently accepted (nor silently dropped): one error names where it went."""
    with pytest.raises(ConfigError, match="renamed config key") as err:
        load_config(cls, os.path.join(REPO, "configs", path), [override])
    assert new_place in str(err.value)
    main = train.main if cls is Config else evaluate_main
    assert main(["--config", os.path.join(REPO, "configs", path), override]) == 2
    assert new_place in capsys.readouterr().err
    # a whole old section in a YAML file names the section's new place too
    with pytest.raises(ConfigError, match="rollout is now decoding"):
        load_config(cls, os.path.join(REPO, "configs", path), ["rollout={}"])


def test_print_config_prints_the_resolved_config_and_exits(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(["--config", SFT_TINY, f"output_dir={out}", "optim.lr=0.002", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert not out.exists()  # nothing was run or written
    assert printed["optim"]["lr"] == 0.002 and printed["output_dir"] == str(out)
    assert printed["data"]["train_files"] == [str(out / "data" / "sft_train.jsonl")]
    assert printed["data"]["eval_files"] == [str(out / "data" / "rl_eval.jsonl")]
    assert printed["tokenizer"]["path"] == str(out / "tokenizer")
    assert printed["model"]["preset_overrides"]["num_layers"] == 4  # from the YAML file
    # The printed config is a complete config: loading it back gives the same tree.
    (tmp_path / "printed.yaml").write_text(yaml.safe_dump(printed))
    assert dataclasses.asdict(load_config(Config, str(tmp_path / "printed.yaml"))) == printed


def test_model_path_to_a_checkpoint_step_resolves_the_tokenizer_beside_it(tmp_path):
    step = tmp_path / "checkpoints" / "40"
    (step / "params").mkdir(parents=True)
    (tmp_path / "checkpoints" / "hf_assets").mkdir()
    cfg = load_config(Config, None, ["stage=sft", "data.synthetic=true", f"model.path={step}"])
    cfg.resolve_paths()
    assert cfg.tokenizer.path == str(tmp_path / "checkpoints" / "hf_assets")


class _Stop(Exception):
    pass


def _stop_after_checks(session):
    raise _Stop  # the session got past the config check, the data files and the tokenizer


def test_changed_config_does_not_resume_silently(tmp_path):
    out = tmp_path / "run"
    base = [f"output_dir={out}", "data.synthetic_train=50", "data.synthetic_eval=5"]
    first = load_config(Config, SFT_TINY, base)
    with pytest.raises(_Stop):
        TrainingSession(first, make_data=_stop_after_checks)
    (out / "checkpoints" / "10").mkdir(parents=True)  # as if the first run had saved step 10
    # The same config resumes; so does one that only changes how the run is saved or logged.
    for extra in ([], ["train.steps=800", "checkpoint.save_every=5", "train.log_every=2", "eval.every=3"]):
        with pytest.raises(_Stop):
            TrainingSession(load_config(Config, SFT_TINY, base + extra), make_data=_stop_after_checks)

    # A run directory copied elsewhere resumes there: its own paths moved with it (a path outside it did not).
    moved = tmp_path / "moved"
    shutil.copytree(out, moved)
    with pytest.raises(_Stop):
        TrainingSession(load_config(Config, SFT_TINY, base + [f"output_dir={moved}"]), make_data=_stop_after_checks)
    with pytest.raises(ConfigError, match="tokenizer.path"):
        TrainingSession(load_config(Config, SFT_TINY, base + [f"output_dir={moved}", f"tokenizer.path={tmp_path}/tok"]),
                        make_data=_stop_after_checks)

    changed = base + ["optim.lr=0.01", "masking.upper_p=0.5"]
    with pytest.raises(ConfigError) as err:
        TrainingSession(load_config(Config, SFT_TINY, changed), make_data=_stop_after_checks)
    message = str(err.value)
    assert "optim.lr: 0.003 -> 0.01" in message and "masking.upper_p: 0.9 -> 0.5" in message
    assert "checkpoint.accept_config_changes=true" in message
    assert yaml.safe_load((out / "config.yaml").read_text())["optim"]["lr"] == 0.003  # untouched

    accepted = load_config(Config, SFT_TINY, changed + ["checkpoint.accept_config_changes=true"])
    with pytest.raises(_Stop):
        TrainingSession(accepted, make_data=_stop_after_checks)
    stored = (out / "config.yaml").read_text()
    assert yaml.safe_load(stored)["optim"]["lr"] == 0.01
    assert stored == dump_yaml(accepted)  # config.yaml holds the resolved config
    assert yaml.safe_load(stored)["data"]["train_files"] == [str(out / "data" / "sft_train.jsonl")]
