"""The optional Weights & Biases writer, against a stand-in `wandb` module (not installed here)."""

from __future__ import annotations

import sys
import types

import pytest

from gtpo_jax.metrics import WandbWriter, import_wandb


class FakeRun:
    def __init__(self, **kwargs):
        self.init_kwargs, self.logged, self.finished = kwargs, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_wandb(monkeypatch):
    runs = []
    module = types.SimpleNamespace(
        util=types.SimpleNamespace(generate_id=lambda: f"id{len(runs)}"),
        init=lambda **kw: runs.append(FakeRun(**kw)) or runs[-1],
    )
    monkeypatch.setitem(sys.modules, "wandb", module)
    return runs


def test_records_go_to_the_run_and_a_resumed_run_continues_it(tmp_path, fake_wandb):
    writer = WandbWriter(str(tmp_path), "proj", config={"stage": "sft"})
    writer.write(3, {"loss": 1.5, "kept": 2, "nan": float("nan"), "text": "x"})
    writer.write(3, {"accuracy": 0.25}, prefix="eval/")
    writer.close()
    run = fake_wandb[0]
    assert run.init_kwargs["project"] == "proj" and run.init_kwargs["config"] == {"stage": "sft"}
    assert run.logged == [(3, {"loss": 1.5, "kept": 2}), (3, {"eval/accuracy": 0.25})]
    assert run.finished
    WandbWriter(str(tmp_path), "proj")  # the same run directory again: the same W&B run id
    assert fake_wandb[1].init_kwargs["id"] == run.init_kwargs["id"] and fake_wandb[1].init_kwargs["resume"] == "allow"


def test_missing_wandb_says_how_to_install_or_turn_it_off(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    with pytest.raises(ImportError, match=r"pip install -e '\.\[wandb\]'.*train\.wandb_project"):
        import_wandb()
