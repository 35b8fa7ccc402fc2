"""The LMDeploy bridge's weight path on a CPU, against fake engines: the trainer's fp32 master
weights reach LMDeploy in bf16 (start-up export, in-place pushes), the engine's dtype is checked,
no copy of the policy stays on disk, the memory plan is checked before anything starts, and a
sleeping engine is woken around a push. Real engines: tests/test_lmdeploy_bridge.py (-m gpu)."""

from __future__ import annotations

import json
import os
import sys
import types
from unittest import mock

import numpy as np
import pytest
from safetensors import safe_open

pytest.importorskip("lmdeploy", reason="LMDeploy bridge tests need `pip install .[lmdeploy]` (or lmdeploy --no-deps)")
torch = pytest.importorskip("torch")

try:  # xgrammar (guided decoding, GPU wheels only) is imported by the engine modules; not exercised here
    import xgrammar  # noqa: F401
except ImportError:
    sys.modules["xgrammar"] = mock.MagicMock(name="xgrammar")

from gtpo_jax.export_dir import EXPORT_MARKER  # noqa: E402
from gtpo_jax.memory_plan import MemoryPlanError, startup_plan  # noqa: E402
from gtpo_jax.rollout import lmdeploy_backend as lb  # noqa: E402


def _tiny_params(seed: int = 0):
    """A tiny model's fp32 parameters (jax arrays) and its config."""
    from flax import nnx

    from gtpo_jax.checkpoint import param_tree
    from gtpo_jax.model import ModelConfig, init_model

    model = init_model(ModelConfig.tiny(vocab_size=96, tie_word_embeddings=False), seed=seed)
    return param_tree(nnx.state(model, nnx.Param)), model.cfg


class _FakeEngine:
    """Records what the backend asks of LMDeploy's Engine (no GPU): pushes, sleep, wake-ups."""

    def __init__(self, dtype="torch.bfloat16"):
        self.calls, self.model_config = [], types.SimpleNamespace(dtype=dtype)

    def update_params(self, request):
        self.calls.append(("push", dict(request.serialized_named_tensors), request.finished))

    async def sleep(self, level):
        self.calls.append(("sleep", level))

    def wakeup(self, tags):
        self.calls.append(("wakeup", tuple(tags)))


def _backend_on(engine, model_cfg, *, sleep=False):
    import asyncio

    be = object.__new__(lb.LMDeployRollout)  # no engine start: the weight path only
    be.engine, be.model_cfg, be.weight_sync, be.dtype = engine, model_cfg, "inplace", "bfloat16"
    be.sleep_during_update, be.asleep, be._loop = sleep, False, asyncio.new_event_loop()
    return be


def test_inplace_push_is_bf16_per_tensor_and_wakes_a_sleeping_engine(monkeypatch):
    """Every pushed tensor is the trainer's fp32 value rounded to bf16 (never fp32, never fp16), under
    its HF name; a sleeping engine gets its weights back before the push and its KV cache after."""
    import ml_dtypes
    from lmdeploy import utils as lmdeploy_utils

    from gtpo_jax.model.params import expected_hf_names, nnx_to_hf

    params, cfg = _tiny_params()
    monkeypatch.setattr(lmdeploy_utils, "serialize_state_dict", lambda state: state)  # CUDA IPC: GPU only
    monkeypatch.setattr(lb, "_torch_cuda", lambda a: torch.from_numpy(a.view(np.uint16)).view(torch.bfloat16)
                        if a.dtype.name == "bfloat16" else torch.from_numpy(np.ascontiguousarray(a)))
    monkeypatch.setattr(lb, "_BUCKET_BYTES", 20_000)  # several buckets on a tiny model
    engine = _FakeEngine()
    be = _backend_on(engine, cfg, sleep=True)
    be.pause()
    be.update_params(params)
    kinds = [c[0] for c in engine.calls]
    assert kinds[:2] == ["sleep", "wakeup"] and engine.calls[0][1] == 2 and engine.calls[1][1] == ("weights",)
    assert engine.calls[-1] == ("wakeup", ("kv_cache",)) and not be.asleep
    pushes = [c for c in engine.calls if c[0] == "push"]
    assert len(pushes) > 2 and [p[2] for p in pushes] == [False] * (len(pushes) - 1) + [True]
    pushed = {name: t for p in pushes for name, t in p[1].items()}
    assert sorted(pushed) == sorted(expected_hf_names(cfg))
    from gtpo_jax.model.params import iter_nested

    for path, array in iter_nested(params):  # independent: host-side rounding of the fp32 master
        name, want = nnx_to_hf(tuple(path), np.asarray(array).astype(ml_dtypes.bfloat16), cfg)
        got = pushed[name]
        assert got.dtype == torch.bfloat16, name
        np.testing.assert_array_equal(got.view(torch.uint16).numpy(), want.view(np.uint16), err_msg=name)


def test_engine_dtype_is_the_trainers_and_checked_after_start():
    assert lb.engine_dtype("bfloat16") == "bfloat16"
    with pytest.raises(ValueError, match="model.dtype=bfloat16"):
        lb.engine_dtype("float32")
    lb.check_engine_dtype(_FakeEngine("torch.bfloat16"), "bfloat16")
    with pytest.raises(RuntimeError, match="started in float16, not bfloat16"):
        lb.check_engine_dtype(_FakeEngine(torch.float16), "bfloat16")


def _policy(tmp_path, cfg):
    """What the trainer hands the LMDeploy factory: a spec (bf16 compute, fp32 master weights) and the
    policy's parameters; its HF assets directory holds a tokenizer file and no config.json."""
    from flax import nnx

    from gtpo_jax.data.tokenizer import TokenIds
    from gtpo_jax.model import ModelConfig, init_model
    from gtpo_jax.rollout import RolloutSpec

    model = init_model(ModelConfig.tiny(vocab_size=96, tie_word_embeddings=False, dtype=cfg.model.dtype), seed=0)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text("{}")
    ids = TokenIds(block_size=cfg.block_size, mask_id=lb.SDAR_MASK_TOKEN, pad_id=0, stop_ids=(5,))
    return RolloutSpec(cfg.decoding, ids, model.cfg, hf_assets_dir=str(tok)), nnx.state(model, nnx.Param)


def _gtpo_config(tmp_path, *overrides):
    from gtpo_jax.config import Config
    from gtpo_jax.config_loader import load_config

    cfg = load_config(Config, os.path.join(os.path.dirname(__file__), "..", "configs", "gtpo_tiny.yaml"),
                      ["decoding.backend=lmdeploy", "model.dtype=bfloat16", f"output_dir={tmp_path / 'run'}",
                       "decoding.lmdeploy.tensor_parallel=1", *overrides])
    cfg.validate()
    return cfg


def test_make_backend_starts_the_engine_on_a_bf16_export_and_keeps_no_copy(tmp_path, monkeypatch):
    """The engine starts on a bf16 export of the fp32 master weights (never fp32 on disk, never
    LMDeploy's `auto`), and once it has loaded them the export's weight files are gone."""
    seen = {}

    def build(self, model_dir):
        files = sorted(os.listdir(model_dir))
        with safe_open(os.path.join(model_dir, "model.safetensors"), framework="numpy") as st:
            dtypes = {st.get_slice(name).get_dtype() for name in st.keys()}
        with open(os.path.join(model_dir, "config.json")) as f:
            seen.update(files=files, dtypes=dtypes,
                        torch_dtype=json.load(f)["torch_dtype"], engine_dtype=self.engine_config().dtype)
        engine = _FakeEngine()
        engine.cache_config = types.SimpleNamespace(num_gpu_blocks=100, block_size=64)
        return engine

    monkeypatch.setattr(lb, "check_cuda", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (70 * 2**30, 80 * 2**30))
    monkeypatch.setattr(lb.LMDeployRollout, "_build_engine", build)
    cfg = _gtpo_config(tmp_path)
    spec, params = _policy(tmp_path, cfg)
    backend = lb.make_backend(spec, params, work_dir=cfg.output_dir,
                              check_memory=lambda: startup_plan(cfg, spec.model_cfg))
    assert seen["dtypes"] == {"BF16"} and seen["torch_dtype"] == "bfloat16" and seen["engine_dtype"] == "bfloat16"
    assert "model.safetensors" in seen["files"] and "tokenizer_config.json" in seen["files"]
    left = sorted(os.listdir(tmp_path / "run" / "lmdeploy_policy"))
    # no weights kept on disk (the marker says the directory is ours to replace on the next export)
    assert left == [EXPORT_MARKER, "config.json", "tokenizer_config.json"]
    assert backend.dtype == "bfloat16" and not backend.sleep_during_update


def test_make_backend_refuses_a_memory_plan_that_cannot_fit_before_exporting(tmp_path, monkeypatch):
    monkeypatch.setattr(lb, "check_cuda", lambda: None)
    monkeypatch.setattr(lb.LMDeployRollout, "_build_engine", lambda self, d: pytest.fail("engine started"))
    # 5 GiB GPUs: JAX's half, its context and the engine's runtime reserve leave no KV cache
    cfg = _gtpo_config(tmp_path, "gpu.memory_gib=5")
    spec, params = _policy(tmp_path, cfg)
    with pytest.raises(MemoryPlanError, match="DOES NOT FIT: the engine's KV cache holds 0 tokens"):
        lb.make_backend(spec, params, work_dir=cfg.output_dir, check_memory=lambda: startup_plan(cfg, spec.model_cfg))
    assert not (tmp_path / "run" / "lmdeploy_policy").exists()
