"""Faults a user or the machine inflicts: each case reproduced, then the behaviour we promise instead.

Cases (issue 19): a GTPO step that keeps no group; evaluation results keyed by model and settings;
a full disk (metrics writers, background saves); export safety; corrupted checkpoints; one writer
per output_dir; config values checked at load time; metrics.jsonl after a resume; rewards linear
in the response length; trust_remote_code only on request.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import metrics_by_step
from gtpo_jax.config import Config
from gtpo_jax.config_loader import load_config

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs")
GTPO_TINY = os.path.join(CONFIGS, "gtpo_tiny.yaml")
SFT_TINY = os.path.join(CONFIGS, "sft_tiny.yaml")


def gtpo_overrides(out_dir, **extra) -> list[str]:
    values = {
        "output_dir": str(out_dir), "model.path": "null", "model.preset": "tiny",
        "data.synthetic_train": 64, "data.synthetic_eval": 4, "train.steps": 1,
        "checkpoint.save_every": 1, "checkpoint.export_hf": "false", "eval.enabled": "false",
        "decoding.max_new_tokens": 8, "gtpo.num_task_per_step": 2, "gtpo.num_response_per_task": 2,
        "gtpo.oversample": 1, "grader.workers": 0,  # grading in this process: no worker start-up
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


# ---- 1. a GTPO step that keeps no group -------------------------------------------------------
def test_gtpo_step_without_a_kept_group_does_not_crash(tmp_path):
    from gtpo_jax.trainers.gtpo import run_gtpo

    # A random model never answers right: every group is all-wrong, DAPO keeps none.
    run_gtpo(load_config(Config, GTPO_TINY, gtpo_overrides(tmp_path)))
    records = metrics_by_step(tmp_path)
    assert sorted(records) == [1]
    assert all(r["dapo/kept"] == 0 and "loss" not in r for r in records.values())


# ---- 8. every config value checked at load time --------------------------------------------------
BAD_VALUES = [  # override, the allowed range the one-line error must state
    ("optim.lr=-1e-3", "optim.lr must be > 0"),
    ("train.steps=0", "train.steps must be >= 1"),
    ("train.steps=-5", "train.steps must be >= 1"),
    ("optim.warmup_steps=-1", "optim.warmup_steps must be >= 0"),
    ("decoding.threshold=1.5", "decoding.threshold must be [0, 1]"),
    ("decoding.threshold=-1", "decoding.threshold must be [0, 1]"),
    ("gtpo.eps_low=-0.5", "gtpo.eps_low must be [0, 1)"),
    ("gtpo.beta=-1", "gtpo.beta must be >= 0"),
    ("gtpo.rewards={accuracy: -1.0}", "gtpo.rewards.accuracy must be >= 0"),
    ("decoding.temperature=0", "decoding.temperature must be > 0"),
    ("decoding.top_p=0", "decoding.top_p must be (0, 1]"),
    ("checkpoint.save_every=0", "checkpoint.save_every must be >= 1"),
    ("grader.timeout_s=0", "grader.timeout_s must be > 0"),
    ("train.batch_size=0", "train.batch_size must be >= 1"),
    ("train.vocab_chunk=0", "train.vocab_chunk must be >= 1"),
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("gtpo.num_task_per_step=0", "gtpo.num_task_per_step must be >= 1"),
    ("optim.lr=.nan", "optim.lr must be a finite number"),
    ("decoding.min_new_tokens=99", "decoding.min_new_tokens (99) must be <= decoding.max_new_tokens (8)"),
]


@pytest.mark.parametrize("override, allowed", BAD_VALUES, ids=[case[0] for case in BAD_VALUES])
def test_bad_config_value_is_one_line_exit_2_before_any_work(tmp_path, capsys, monkeypatch, override, allowed):
    from gtpo_jax import train

    def no_run(cfg):
        raise AssertionError("the run started despite a bad config")

    monkeypatch.setattr(train, "run", no_run)
    rc = train.main(["--config", GTPO_TINY, *gtpo_overrides(tmp_path / "run"), override])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and allowed in err, err
    assert not (tmp_path / "run").exists()


def test_negative_reward_weight_with_opt_in_is_accepted(tmp_path):
    cfg = load_config(Config, GTPO_TINY, gtpo_overrides(tmp_path) + [
        "gtpo.rewards={accuracy: 1.0, repetition: -0.5}", "gtpo.negative_reward_weights=true"])
    cfg.validate()


def test_error_mid_run_is_one_line_unless_debug(tmp_path, capsys, monkeypatch):
    from gtpo_jax import train

    def failing_run(cfg):
        raise RuntimeError("prompt 7 has 100000 tokens,\n more than data.max_len")

    monkeypatch.setattr(train, "run", failing_run)
    argv = ["--config", GTPO_TINY, *gtpo_overrides(tmp_path)]
    assert train.main(argv) == 1
    err = capsys.readouterr().err
    assert err == ("error: RuntimeError: prompt 7 has 100000 tokens, more than data.max_len "
                   "(rerun with --debug for the traceback)\n")
    with pytest.raises(RuntimeError, match="100000 tokens"):
        train.main(argv + ["--debug"])


# ---- 3. a full disk -------------------------------------------------------------------------------
def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the injected ENOSPC
def test_full_disk_under_tensorboard_never_blocks_training(tmp_path, monkeypatch, caplog):
    import tensorboardX.event_file_writer as tb_events

    from gtpo_jax.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path))
    monkeypatch.setattr(tb_events.EventsWriter, "write_event", _disk_full)  # the disk fills up

    def many_steps():
        for step in range(1, 200):  # tensorboardX's queue holds 10 events: a dead writer blocks the 11th
            writer.write(step, {"loss": 1.0 / step, "lr": 1e-5})
        writer.close()

    thread = threading.Thread(target=many_steps, daemon=True)
    thread.start()
    thread.join(60)
    assert not thread.is_alive(), "metrics writing blocked on the dead TensorBoard writer"
    assert sum("TensorBoard events" in r.message for r in caplog.records) == 1  # reported once
    assert len(metrics_by_step(tmp_path)) == 199  # metrics.jsonl unaffected


def test_full_disk_under_metrics_jsonl_is_reported_once_and_training_goes_on(tmp_path, caplog):
    from gtpo_jax.metrics import MetricsWriter

    writer = MetricsWriter(str(tmp_path), tensorboard=False)
    writer.write(1, {"loss": 1.0})
    writer._file.write = _disk_full
    for step in range(2, 6):
        writer.write(step, {"loss": 1.0})
    writer.close()
    assert sum("metrics.jsonl is disabled" in r.message for r in caplog.records) == 1
    assert sorted(metrics_by_step(tmp_path)) == [1]


# ---- 5. corrupted checkpoints ---------------------------------------------------------------------
def _two_step_checkpoint(directory, async_save=False) -> dict:
    from gtpo_jax.checkpoint import Checkpointer

    rng = np.random.default_rng(0)
    params = {"layer": {"w": rng.standard_normal((64, 64)).astype(np.float32)}}
    with Checkpointer(directory, async_save=async_save) as ckpt:
        ckpt.save(1, params=params, meta={"step": 1}, force=True)
        ckpt.save(2, params={"layer": {"w": params["layer"]["w"] + 1}}, meta={"step": 2}, force=True)
    return params


def _largest_file(step_dir) -> str:
    files = [os.path.join(root, f) for root, _, names in os.walk(step_dir) for f in names]
    return max(files, key=os.path.getsize)


def _flip_byte(path, offset=-100) -> None:
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated file"])
def test_damaged_latest_step_is_set_aside_and_the_previous_one_used(tmp_path, caplog, damage):
    from gtpo_jax.checkpoint import Checkpointer
    from gtpo_jax.checkpoint import CheckpointCorruptError

    root = tmp_path / "ckpt"
    params = _two_step_checkpoint(root)
    victim = _largest_file(root / "2" / "params")
    if damage == "flipped byte":
        _flip_byte(victim)
    else:
        os.truncate(victim, os.path.getsize(victim) // 2)

    with Checkpointer(root, read_only=True) as ckpt:  # load_model / orbax2hf: skip, change nothing
        with pytest.raises(CheckpointCorruptError, match=r"checkpoint .*/2 is damaged: params/"):
            ckpt.restore(2)  # a step asked for by number is never swapped for another
        restored = ckpt.restore()
    assert restored["step"] == 1 and os.path.isdir(root / "2")
    np.testing.assert_array_equal(restored["params"]["layer"]["w"], params["layer"]["w"])

    with Checkpointer(root) as ckpt:  # a training run: the damaged step is moved out of the way
        assert ckpt.restore()["step"] == 1
        assert ckpt.all_steps() == [1]
    assert not os.path.exists(root / "2") and len(os.listdir(root / "damaged")) == 1
    assert any("is damaged" in r.message and "previous" in r.message for r in caplog.records)


def test_background_saves_are_checksummed(tmp_path):
    from gtpo_jax.checkpoint import MANIFEST, verify_step

    _two_step_checkpoint(tmp_path, async_save=True)
    assert all(verify_step(str(tmp_path / str(step))) for step in (1, 2))
    assert os.path.isfile(tmp_path / "2" / MANIFEST)


def test_failed_background_save_is_raised_at_the_next_poll(tmp_path, monkeypatch):
    import orbax.checkpoint as ocp

    from gtpo_jax.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path, async_save=True)
    ckpt.save(1, params={"w": np.zeros(4, np.float32)}, force=True)
    ckpt.wait()

    def failed(self):
        raise OSError(errno.ENOSPC, "No space left on device (background save)")

    monkeypatch.setattr(ocp.CheckpointManager, "check_for_errors", failed)
    with pytest.raises(OSError, match="No space left"):
        ckpt.poll()  # TrainingSession.finish_step calls it every step
    monkeypatch.undo()
    ckpt.close()


# ---- 6. one run per output directory ---------------------------------------------------------------
def test_second_run_on_a_locked_output_dir_is_refused_and_a_dead_owner_frees_it(tmp_path):
    from gtpo_jax.run_lock import OutputDirInUseError, OutputDirLock
    from gtpo_jax.trainers.sft import run_sft

    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from gtpo_jax.run_lock import OutputDirLock; "
         f"OutputDirLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert holder.stdout.readline().strip() == "locked"
        cfg = load_config(Config, SFT_TINY, [f"output_dir={tmp_path}", "data.synthetic_train=8"])
        with pytest.raises(OutputDirInUseError, match=rf"in use by another run \(pid {holder.pid} on host "):
            run_sft(cfg)
        assert sorted(os.listdir(tmp_path)) == [".lock"]  # refused before writing anything
    finally:
        holder.kill()  # kill -9: the kernel drops its lock
        holder.wait()
    OutputDirLock(str(tmp_path)).acquire().release()


# ---- 4. exports never delete what they did not write ------------------------------------------------
def _tiny_params():
    from gtpo_jax.model import ModelConfig, init_model
    from gtpo_jax.checkpoint import param_tree
    from flax import nnx

    model = init_model(ModelConfig.tiny(num_layers=1, vocab_size=64), seed=0)
    return model.cfg, param_tree(nnx.state(model, nnx.Param))


def test_export_refuses_a_foreign_directory_and_a_failed_export_keeps_the_old_one(tmp_path, monkeypatch):
    import gtpo_jax.hf_io as hf_io

    cfg, params = _tiny_params()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "my_model.safetensors").write_bytes(b"precious")
    (foreign / "notes.bin").write_bytes(b"precious too")
    with pytest.raises(FileExistsError, match="not written by a gtpo_jax export.*--overwrite"):
        hf_io.write_hf_dir(params, cfg, foreign)
    assert sorted(os.listdir(foreign)) == ["my_model.safetensors", "notes.bin"]  # untouched

    out = tmp_path / "export"
    hf_io.write_hf_dir(params, cfg, out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(os.stat(out / name).st_mode & 0o777) for name in before} == {oct(0o666 & ~umask)}

    monkeypatch.setattr(hf_io, "copy_hf_assets", _disk_full)  # the second export fails half-way
    with pytest.raises(OSError, match="No space left"):
        hf_io.write_hf_dir(params, cfg, out, dtype="bfloat16", assets_dir=str(foreign))
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["export", "mine"]  # no stage left behind
    monkeypatch.undo()

    hf_io.write_hf_dir(params, cfg, out, dtype="bfloat16")  # an earlier export of ours is replaced
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    hf_io.write_hf_dir(params, cfg, foreign, overwrite=True)
    assert "my_model.safetensors" not in os.listdir(foreign)


# ---- 2. evaluation results keyed by model and settings -----------------------------------------------
class _FixedAnswerBackend:
    """Answers every question with the ground truth (right=True) or with a wrong number."""

    def __init__(self, answers: dict[str, str] | None, right: bool):
        self.answers, self.right, self.calls = answers, right, 0

    def generate(self, prompts, n, *, seed):
        from gtpo_jax.rollout.base import Rollout

        if self.answers is None:
            raise AssertionError("stored results should have been reused")
        self.calls += 1
        out = []
        for prompt in prompts:
            truth = self.answers[bytes(list(prompt)).decode()]
            text = f"\\boxed{{{truth if self.right else '-987654'}}}"
            tokens = np.arange(4, dtype=np.int32)
            out.append([Rollout(np.asarray(prompt, np.int32), tokens, np.arange(4, dtype=np.int32), None, None,
                                None, "stop", text) for _ in range(n)])
        return out

    def close(self):
        pass


class _BytesTokenizer:
    def encode(self, text, add_special_tokens=False):
        return list(text.encode())


def test_evaluation_never_reuses_results_of_another_model_or_setting(tmp_path, caplog):
    from gtpo_jax.data.records import read_rl_records
    from gtpo_jax.data.tokenizer import chat_prompt
    from gtpo_jax.config import EvalSection, ModelSection
    from gtpo_jax.evaluate import EvalConfig, run_evaluation
    from gtpo_jax.rewards import GraderConfig

    dataset = os.path.join(os.path.dirname(__file__), "fixtures", "eval", "gsm8k.jsonl")
    answers = {chat_prompt(q.question, think=False): q.ground_truth for q in read_rl_records(dataset)}
    models = {}
    for name in ("good", "bad"):
        models[name] = tmp_path / name
        models[name].mkdir()
        (models[name] / "config.json").write_text(json.dumps({"model": name}))

    def evaluate(model, backend, n=1):
        cfg = EvalConfig(datasets={"gsm8k": dataset}, output_dir=str(tmp_path / "eval"),
                         grader=GraderConfig(workers=0, timeout_s=120),  # the first grade imports math-verify: slow
                         eval=EvalSection(num_samples=n, greedy=False, questions_per_batch=16),
                         model=ModelSection(path=str(models[model])))
        return run_evaluation(cfg, backend=backend, tokenizer=_BytesTokenizer())["gsm8k"]

    assert evaluate("good", _FixedAnswerBackend(answers, right=True))["accuracy"] == 1.0
    # another model into the same output_dir: its own (zero) score, not the stored 100%
    assert evaluate("bad", _FixedAnswerBackend(answers, right=False))["accuracy"] == 0.0
    assert any("differs in: model" in r.message for r in caplog.records)
    # other decoding settings: evaluated afresh with the samples the summary claims
    result = evaluate("bad", _FixedAnswerBackend(answers, right=False), n=3)
    assert result["samples"] == 3 * result["questions"]
    # the same evaluation again: everything is reused, nothing generated
    assert evaluate("bad", _FixedAnswerBackend(None, right=False), n=3)["samples"] == 3 * result["questions"]


# ---- 9. rewards that parse text stay linear -----------------------------------------------------------
ADVERSARIAL_64K = {
    "unclosed boxes": "\\boxed{" * 9000,
    "nested boxes": "\\boxed{" * 4500 + "}" * 4500,
    "stop tokens": "x" + "<|im_end|> " * 5800,
    "think tags": "<think>" * 9000 + "</think>" * 100,
    "open braces": "{" * 64000,
    "repeated words": "a b " * 16000,
}


@pytest.mark.parametrize("text", list(ADVERSARIAL_64K.values()), ids=list(ADVERSARIAL_64K))
def test_every_text_reward_is_fast_on_64k_adversarial_responses(text):
    """A hang guard, not a speed number: the quadratic `boxed` took 17 s on 64k characters."""
    import time

    from gtpo_jax.rewards import RewardInput
    from gtpo_jax.rewards.functions import registered_rewards

    inp = RewardInput(text=text, ground_truth="1", num_tokens=len(text) // 4, step_map=np.arange(8),
                      max_new_tokens=len(text))
    for name, reward in registered_rewards().items():
        start = time.process_time()
        reward.fn(inp, False, {})
        assert time.process_time() - start < 2.0, name


def test_boxed_extraction_keeps_its_meaning():
    from gtpo_jax.rewards.answers import extract_boxed

    assert extract_boxed("so \\boxed{\\frac{1}{2}} and \\boxed{3") == "\\frac{1}{2}"  # an unclosed last box
    assert extract_boxed("\\boxed{\\left\\{ x \\right\\}}") == "\\left\\{ x \\right\\}"
    assert extract_boxed("} \\boxed{a{b}c} \\fbox{d}") == "d"
    assert extract_boxed("\\boxed 5") is None


# ---- 10. model code runs only when the user says so ----------------------------------------------------
def test_lmdeploy_gets_trust_remote_code_only_when_set(monkeypatch):
    pytest.importorskip("lmdeploy")
    engine_module = pytest.importorskip("lmdeploy.pytorch.engine")
    from gtpo_jax.rollout import lmdeploy_backend as lb
    from gtpo_jax.sampling import DecodingConfig, LMDeployEngineSection

    seen = []

    def from_pretrained(model_dir, engine_config=None, trust_remote_code=False):
        seen.append(trust_remote_code)
        if not trust_remote_code:
            raise ValueError("The repository contains custom code which must be executed to correctly load the "
                             "model. Please pass the argument `trust_remote_code=True` to allow custom code to be run.")
        return "engine"

    monkeypatch.setattr(engine_module.Engine, "from_pretrained", staticmethod(from_pretrained))
    monkeypatch.setattr(lb, "check_engine_dtype", lambda engine, dtype: None)
    backend = object.__new__(lb.LMDeployRollout)  # no engine: only how it is built
    backend.dtype = "bfloat16"
    backend.cfg, backend.block_size, backend.stop_ids, backend.greedy = DecodingConfig(backend="lmdeploy"), 4, [1], False
    with pytest.raises(RuntimeError, match=r"decoding\.lmdeploy\.trust_remote_code is false\. Set "
                                           r"decoding\.lmdeploy\.trust_remote_code=true only if you trust that code"):
        backend._build_engine("/models/custom")
    backend.cfg = DecodingConfig(backend="lmdeploy", lmdeploy=LMDeployEngineSection(trust_remote_code=True))
    assert backend._build_engine("/models/custom") == "engine"
    assert seen == [False, True]


# ---- 9. after a crash: the checkpoint in flight is kept, metrics.jsonl holds each step once -------------
def test_crash_keeps_the_checkpoint_in_flight_and_resume_logs_each_step_once(tmp_path, monkeypatch):
    from gtpo_jax.checkpoint import verify_step
    from gtpo_jax.trainers import session as session_module
    from gtpo_jax.trainers.sft import run_sft

    overrides = [f"output_dir={tmp_path}", "model.preset_overrides={}", "data.synthetic_train=64",
                 "data.max_len=64", "train.batch_size=2", "train.steps=3", "train.row_len=0",
                 "checkpoint.save_every=2", "checkpoint.export_hf=false", "eval.enabled=false",
                 "optim.schedule=constant"]
    original_save = session_module.TrainingSession.save

    def crash_after_logging_step_3(self, step, **kwargs):
        if step == 3:
            raise RuntimeError("simulated crash after step 3 was logged")
        return original_save(self, step, **kwargs)

    monkeypatch.setattr(session_module.TrainingSession, "save", crash_after_logging_step_3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_sft(load_config(Config, SFT_TINY, overrides))
    assert verify_step(str(tmp_path / "checkpoints" / "2"))  # step 2's background save finished and sealed
    monkeypatch.undo()

    run_sft(load_config(Config, SFT_TINY, overrides))  # the lock was released: the same process resumes
    with open(tmp_path / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3]
    with open(tmp_path / "metrics.superseded.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [3]


# ---- 7. resuming with another block_size ------------------------------------------------------------------
def test_resume_with_another_block_size_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from gtpo_jax.config_loader import ConfigError, dump_yaml
    from gtpo_jax.run_lock import OutputDirLock
    from gtpo_jax.trainers import session as session_module
    from gtpo_jax.trainers.sft import run_sft

    overrides = [f"output_dir={tmp_path}", "data.synthetic_train=8"]
    first = load_config(Config, SFT_TINY, overrides)
    first.resolve_paths()
    (tmp_path / "config.yaml").write_text(dump_yaml(first))  # what a run with block_size 4 left behind
    (tmp_path / "checkpoints" / "100").mkdir(parents=True)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built despite the changed block_size")

    monkeypatch.setattr(session_module, "build_model", no_model)
    with pytest.raises(ConfigError, match=r"block_size"):
        run_sft(load_config(Config, SFT_TINY, overrides + ["block_size=8"]))
    assert "block_size: 4" in (tmp_path / "config.yaml").read_text()  # the stored config is not rewritten
    OutputDirLock(str(tmp_path)).acquire().release()  # and the refusal released the directory

    # accept_config_changes lets other keys through, never one that changes what a checkpoint means.
    accept = overrides + ["checkpoint.accept_config_changes=true"]
    for changed, shown in (("block_size=8", "block_size: 4 -> 8"),
                           ("model.preset_overrides={num_layers: 3}", "model.preset_overrides")):
        with pytest.raises(ConfigError) as err:
            run_sft(load_config(Config, SFT_TINY, accept + [changed]))
        message = str(err.value)
        assert shown in message and "new output_dir" in message and "\n" not in message, message
    assert "block_size: 4" in (tmp_path / "config.yaml").read_text()


# ---- 8. broken HF model directories and non-UTF-8 data: one line naming the file -------------------------
def _broken_hf_dir(directory, case) -> str:
    """An HF directory damaged in one way; returns the file the error must name."""
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "sdar", "hidden_size": 8}))
    if case == "config_json":
        from safetensors.numpy import save_file

        save_file({"model.norm.weight": np.ones(8, np.float32)}, str(directory / "model.safetensors"))
        (directory / "config.json").write_text('{"model_type": "sdar", "hidden_size": ')  # cut short
        return str(directory / "config.json")
    if case == "index_without_weight_map":
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 8}}))
        return str(directory / "model.safetensors.index.json")
    # A header length of 2**64 - 1 followed by a few bytes (OverflowError under the old hand-written
    # header parser; safetensors' own reader rejects it, and the error must name the file).
    (directory / "model.safetensors").write_bytes(b"\xff" * 8 + b'{"a": 1}')
    return str(directory / "model.safetensors")


@pytest.mark.parametrize("case", ["config_json", "index_without_weight_map", "safetensors_header"])
def test_broken_hf_dir_names_the_file_and_the_problem(tmp_path, case):
    from gtpo_jax.checkpoint import load_model
    from gtpo_jax.cli import error_line

    bad_file = _broken_hf_dir(tmp_path / "model", case)
    with pytest.raises(ValueError) as err:
        load_model(str(tmp_path / "model"))
    line = error_line(err.value)
    assert bad_file in line, line
    assert {"config_json": "not valid JSON", "index_without_weight_map": "'weight_map'",
            "safetensors_header": "not a readable safetensors file"}[case] in line, line


def test_empty_model_dir_names_the_missing_tokenizer_files(tmp_path, capsys):
    from gtpo_jax import train

    (tmp_path / "model").mkdir()
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    rc = train.main(["--config", SFT_TINY, f"output_dir={tmp_path / 'run'}", f"model.path={tmp_path / 'model'}",
                     "data.synthetic=false", f"data.train_files=[{tmp_path / 'train.jsonl'}]", "data.eval_files=[]"])
    err = capsys.readouterr().err
    assert rc != 0 and err.count("\n") <= 2, err
    last = err.strip().splitlines()[-1]
    assert f"{tmp_path / 'model'} holds no tokenizer" in last and "tokenizer.json" in last, err


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_non_utf8_data_file_names_file_and_line(tmp_path, suffix):
    from gtpo_jax.data.records import RecordError, read_rl_records

    good = {"question": "1+1?", "ground_truth_answer": "2"}
    raw = json.dumps(good).encode() + b"\n" + json.dumps({**good, "question": "caf\u00e9"}, ensure_ascii=False).encode("latin-1") + b"\n"
    if suffix == ".json":
        raw = b"[" + raw.replace(b"}\n{", b"},\n{") + b"]"
    path = tmp_path / f"rl{suffix}"
    path.write_bytes(raw)
    with pytest.raises(RecordError) as err:
        read_rl_records(str(path))
    message = str(err.value)
    expected_start = f"{path}:2:" if suffix == ".jsonl" else f"{path}: "
    assert message.startswith(expected_start) and "not valid UTF-8" in message, message
    if suffix == ".json":
        assert "line 2, byte offset" in message, message
