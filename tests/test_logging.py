"""Logs as a researcher sees them: in a file, while the run goes on, with the resume line."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from gtpo_jax import logs
from gtpo_jax.logs import setup_logging

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# A small model on the built-in task, a checkpoint every step, no evaluation or export: only the
# logging is under test.
TRAIN = [sys.executable, "-m", "gtpo_jax.train", "--config", os.path.join(REPO, "configs", "sft_tiny.yaml"),
         "train.steps=1000", "train.log_every=1", "checkpoint.save_every=1", "checkpoint.export_hf=false",
         "eval.enabled=false", "data.synthetic_train=200", "data.synthetic_eval=10", "train.batch_size=4",
         "train.row_len=256", "model.preset_overrides={hidden_size: 32, intermediate_size: 64, num_layers: 1, "
         "num_heads: 2, num_kv_heads: 1, head_dim: 16}"]


def _run_until(args: list[str], log_path: str, wanted: str, timeout_s: float = 240.0, check=None) -> str:
    """Start `args` with stdout and stderr going to `log_path`, wait until `wanted` is in the
    file (after the resume line if there is one) while the process is still running, kill it,
    and return the file's text."""
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env.pop("PYTHONUNBUFFERED", None)  # block-buffered stdout, as under nohup
    with open(log_path, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                start_new_session=True)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            with open(log_path) as f:
                text = f.read()
            if wanted in text.split("resumed from")[-1]:
                assert proc.poll() is None, "the line arrived only when the process ended"
                if check is not None:
                    check()
                return text
            if proc.poll() is not None:
                pytest.fail(f"the run ended (rc {proc.returncode}) before logging {wanted!r}:\n{text[-3000:]}")
            time.sleep(0.2)
        pytest.fail(f"no {wanted!r} in the log after {timeout_s} s:\n{text[-3000:]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _logged_steps(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"step (\d+)/1000 \| loss", text)]


def _keeps_up(run_dir, log_path) -> None:
    """For a few seconds, the log holds every step that metrics.jsonl (flushed per record,
    written just before the step's line) holds, but the last: a block-buffered log lags by
    dozens of steps between flushes."""
    for _ in range(15):
        with open(run_dir / "metrics.jsonl") as f:
            lines = f.read().splitlines(keepends=True)
        recorded = max(json.loads(line)["step"] for line in lines if line.endswith("\n"))
        with open(log_path) as f:
            logged = max(_logged_steps(f.read()), default=0)
        assert logged >= recorded - 1, f"the log shows step {logged} while metrics.jsonl has step {recorded}"
        time.sleep(0.2)


def test_log_file_grows_during_the_run_and_shows_the_resume(tmp_path):
    args = TRAIN + [f"output_dir={tmp_path / 'run'}"]
    first = _run_until(args, str(tmp_path / "first.log"), "step 3/1000",
                       check=lambda: _keeps_up(tmp_path / "run", tmp_path / "first.log"))
    assert _logged_steps(first)[:3] == [1, 2, 3]
    second = _run_until(args, str(tmp_path / "second.log"), "/1000 | loss")
    assert f"resumed from {tmp_path / 'run' / 'checkpoints'} at step " in second
    resumed_at = int(second.split(" at step ")[1].split()[0])
    assert resumed_at >= 1
    assert f"step {resumed_at + 1}/1000 | loss" in second.split("resumed from")[1]


def test_setup_logging_wins_over_a_root_handler_installed_first(capsys):
    root = logging.getLogger()
    saved = list(root.handlers), root.level
    try:
        root.setLevel(logging.WARNING)
        stray = logging.StreamHandler(sys.stderr)  # what an import-time basicConfig leaves behind
        root.handlers = [h for h in saved[0] if not isinstance(h, logs._OurHandler)] + [stray]
        setup_logging()
        assert stray not in root.handlers and root.level == logging.INFO
        logging.getLogger("gtpo_jax").info("resumed from somewhere at step 7")
        logging.getLogger("transformers").warning("PyTorch was not found. Models won't be available")
        logging.getLogger("absl").warning("/x/checkpoints is read only, save will be skipped")
        out = capsys.readouterr()
        assert "resumed from somewhere at step 7" in out.out
        assert "PyTorch" not in out.out + out.err and "read only" not in out.out + out.err
    finally:
        for handler in list(root.handlers):
            if handler not in saved[0]:
                root.removeHandler(handler)
        for handler in saved[0]:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(saved[1])
