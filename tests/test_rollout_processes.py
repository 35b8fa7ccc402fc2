"""Two processes (scripts/launch_local.py, 2 CPU devices each): parameters that span processes are
gathered tensor by tensor for the HF export and the weight push, in bf16; a step's prompts are split
between the processes' engines and every process gets all rollouts back, in prompt order."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import ml_dtypes
import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("two_processes")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "launch_local.py"), "--nproc", "2", "--cpu-devices", "2",
           "--grace", "30", "--", sys.executable, os.path.join(ROOT, "tests", "rollout_process_worker.py"), str(out)]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def expected_bf16():
    """The tiny model's parameters, built here in one process and rounded to bf16 on the host."""
    from flax import nnx

    from gtpo_jax.checkpoint import param_tree
    from gtpo_jax.model import ModelConfig, init_model
    from gtpo_jax.model.params import iter_nested, nnx_to_hf

    model = init_model(ModelConfig.tiny(vocab_size=96, tie_word_embeddings=False), seed=0)
    return dict(nnx_to_hf(tuple(p), np.asarray(a).astype(ml_dtypes.bfloat16), model.cfg)
                for p, a in iter_nested(param_tree(nnx.state(model, nnx.Param))))


def test_export_and_push_gather_spanning_parameters_in_bf16(two_processes):
    from gtpo_jax.hf_io import iter_hf_tensors

    want = expected_bf16()
    export = two_processes / "export"
    with open(export / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    written = dict(iter_hf_tensors(export))
    assert sorted(written) == sorted(want)
    for name, w in want.items():
        assert written[name].dtype == ml_dtypes.bfloat16, name
        np.testing.assert_array_equal(written[name].view(np.uint16), w.view(np.uint16), err_msg=name)
    for process in (0, 1):  # every process's engine receives the whole model
        pushed = np.load(two_processes / f"pushed_{process}.npz")
        assert sorted(pushed.files) == sorted(want)
        for name, w in want.items():
            np.testing.assert_array_equal(pushed[name], w.view(np.uint16), err_msg=f"process {process}: {name}")


def test_rollouts_split_between_processes_and_gathered_in_prompt_order(two_processes):
    results = []
    for process in (0, 1):
        with open(two_processes / f"rollouts_{process}.pkl", "rb") as f:
            results.append(pickle.load(f))
    # 5 prompts over 2 processes: 3 on process 0, 2 on process 1, each with its own seed
    assert results[0]["calls"] == [(3, 7 * 2 + 0)] and results[1]["calls"] == [(2, 7 * 2 + 1)]
    for res in results:  # both processes hold the same, complete step
        groups = res["groups"]
        assert [g[0].prompt.tolist() for g in groups] == [[10 + i] * (i + 1) for i in range(5)]
        assert [[r.tokens[0] for r in g] for g in groups] == [[0, 0]] * 3 + [[1, 1]] * 2
        assert all([r.tokens[2] for r in g] == [0, 1] for g in groups)
    for a, b in zip(results[0]["groups"], results[1]["groups"]):
        for x, y in zip(a, b):
            assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.step_map, y.step_map) and x.text == y.text


def test_share_covers_every_prompt_once():
    from gtpo_jax.rollout.split import share

    for n in range(0, 12):
        for procs in (1, 2, 3, 5):
            got = [i for p in range(procs) for i in share(n, p, procs)]
            assert got == list(range(n)), (n, procs)
            sizes = [len(share(n, p, procs)) for p in range(procs)]
            assert max(sizes) - min(sizes) <= 1
