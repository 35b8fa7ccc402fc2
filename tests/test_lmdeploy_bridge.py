"""The LMDeploy bridge on a CPU: our HF export against the installed LMDeploy SDAR loader, the
step-map patch on the real 0.18 classes with fake engine outputs, and its error messages.
Generation itself needs a CUDA GPU (`-m gpu`)."""

from __future__ import annotations

import json
import os
import sys
import types
from unittest import mock

import numpy as np
import pytest

pytest.importorskip("lmdeploy", reason="LMDeploy bridge tests need `pip install .[lmdeploy]` (or lmdeploy --no-deps)")
torch = pytest.importorskip("torch")

try:  # xgrammar (guided decoding, GPU wheels only) is imported by the engine modules; not exercised here
    import xgrammar  # noqa: F401
except ImportError:
    sys.modules["xgrammar"] = mock.MagicMock(name="xgrammar")

from conftest import write_tiny_hf_checkpoint  # noqa: E402

from gtpo_jax.rollout import lmdeploy_backend as lb  # noqa: E402


def _export(tmp_path, tie: bool) -> str:
    """Tiny random SDAR -> our Orbax checkpoint -> our HF export (the path RL/eval use)."""
    from gtpo_jax.conversion import hf_to_orbax, orbax_to_hf

    src, ckpt, out = tmp_path / "src", tmp_path / "ckpt", tmp_path / "export"
    write_tiny_hf_checkpoint(str(src), tie=tie)
    hf_to_orbax(str(src), str(ckpt))
    orbax_to_hf(str(ckpt), str(out))
    return str(out)


def _lmdeploy_sdar(hf_cfg):
    """Instantiate LMDeploy's own SDARForCausalLM on the CPU: its kernels (Triton) are stubbed out,
    the parameter tree and `load_weights` mapping are the installed ones."""
    import lmdeploy.pytorch.backends.selector as selector
    from lmdeploy.pytorch.models.module_map import MODULE_MAP

    module_path, cls_name = MODULE_MAP["SDARForCausalLM"].rsplit(".", 1)
    __import__(module_path)
    cls = getattr(sys.modules[module_path], cls_name)
    ctx = types.SimpleNamespace(build_ctx=types.SimpleNamespace(dllm_config=types.SimpleNamespace(block_length=4)))
    with mock.patch.object(selector, "_get_backend", return_value=mock.MagicMock()):
        return cls(hf_cfg, ctx, dtype=torch.float32, device="cpu")


@pytest.mark.parametrize("tie", [False, True])
def test_export_loads_into_lmdeploy_sdar(tmp_path, tie):
    from safetensors.torch import load_file
    from transformers import PretrainedConfig

    from lmdeploy.pytorch.configurations.sdar import SDARModelConfigBuilder

    out = _export(tmp_path, tie)
    with open(os.path.join(out, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["model_type"] == "sdar" and cfg["architectures"] == ["SDARForCausalLM"]
    hf_cfg = PretrainedConfig(**cfg)
    built = SDARModelConfigBuilder.build(hf_cfg, out)  # the installed config reader
    assert built.model_paradigm == "dllm" and built.dllm_mask_token == lb.SDAR_MASK_TOKEN
    assert (built.num_layers, built.hidden_size, built.num_attention_heads, built.num_key_value_heads,
            built.head_dim, built.vocab_size) == (2, 64, 4, 2, 16, 160)
    assert hf_cfg.tie_word_embeddings == tie  # read by lmdeploy ModelConfig.from_pretrained after the builder

    model = _lmdeploy_sdar(hf_cfg)
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert ("lm_head.weight" in weights) == (not tie)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
        model.load_weights(iter(weights.items()))  # KeyError on any name LMDeploy does not know
        model.update_weights()  # ties lm_head as the engine does after loading
    unloaded = [n for n, p in model.named_parameters() if torch.isnan(p).any()]
    assert not unloaded, f"parameters LMDeploy expects but our export lacks: {unloaded}"
    params = dict(model.named_parameters())
    for i in range(2):
        pre = f"model.layers.{i}."
        qkv = torch.cat([weights[pre + f"self_attn.{x}_proj.weight"] for x in "qkv"])
        assert torch.equal(params[pre + "self_attn.qkv_proj.weight"], qkv)
        gate_up = torch.cat([weights[pre + "mlp.gate_proj.weight"], weights[pre + "mlp.up_proj.weight"]])
        assert torch.equal(params[pre + "mlp.gate_up_proj.weight"], gate_up)
    for name, w in weights.items():
        if name in params:
            assert params[name].shape == w.shape and w.dtype == torch.float32
            assert torch.equal(params[name], w), name
    head = model.lm_head.weight  # tied: the same tensor as the embedding (named_parameters lists it once)
    assert torch.equal(head, weights["model.embed_tokens.weight" if tie else "lm_head.weight"])


class _FakeSeq:
    """The parts of SchedulerSequenceDLLM that `update_running` and our hook touch: the window of
    slots the next forward processes (`dllm_mask`), moved on when a block becomes cached."""

    def __init__(self, session_id: int, prompt_len: int, block: int):
        from lmdeploy.pytorch import consts
        from lmdeploy.pytorch.messages import MessageStatus

        self.c, self.block, self.session_id = consts, block, session_id
        self.status = MessageStatus.RUNNING
        n = prompt_len + (-prompt_len) % block
        self.mask = np.full(n, consts.DLLM_UNMASKED, np.uint8)
        self.mask[prompt_len:] = consts.DLLM_MASKED
        self.num_history_ids, self.num_token_ids = 0, n

    @property
    def dllm_mask(self):
        return self.mask[self.num_history_ids:self.num_history_ids + self.num_token_ids]

    def update_token_ids(self, token, dllm_mask=None, model_meta=None, mode=None):
        self.mask[self.num_history_ids + self.num_token_ids - self.block:] = dllm_mask
        if np.all(dllm_mask == self.c.DLLM_CACHED):
            self.num_history_ids += self.num_token_ids
            self.num_token_ids = self.block
            self.mask = np.concatenate([self.mask, np.full(self.block, self.c.DLLM_MASKED, np.uint8)])

    def finish(self):
        pass


def _outputs(masks: list[str], lps: np.ndarray):
    """BatchedOutputs-like object for one forward: per sequence its block mask after unmasking
    (M masked, U unmasked, C cached) and a raw log-prob per slot."""
    from lmdeploy.pytorch import consts

    code = {"M": consts.DLLM_MASKED, "U": consts.DLLM_UNMASKED, "C": consts.DLLM_CACHED}
    mask = torch.tensor([code[ch] for m in masks for ch in m], dtype=torch.uint8)
    b = len(masks)
    return types.SimpleNamespace(
        next_token_ids=torch.zeros(mask.numel(), dtype=torch.long), stopped=torch.zeros(b, dtype=torch.bool),
        model_metas=None, extra_outputs=types.SimpleNamespace(dllm_mask=mask),
        stop_pos=torch.full((b,), -1), logprobs=types.SimpleNamespace(vals=torch.tensor(lps[:, None])))


@pytest.fixture
def patched():
    from lmdeploy.pytorch.strategies.dllm.sequence import DLLMSequenceStrategy

    before = DLLMSequenceStrategy.update_running
    lb.install_step_map_patch()
    lb.install_step_map_patch()  # idempotent
    yield DLLMSequenceStrategy(block_size=4, dllm_mask_token=lb.SDAR_MASK_TOKEN)
    lb.uninstall_step_map_patch()
    lb._RECORDS.clear()
    assert DLLMSequenceStrategy.update_running is before


def test_patch_records_step_maps_on_real_strategy(patched):
    from lmdeploy.pytorch.strategies.dllm.sequence import DLLMSequenceStrategy

    assert getattr(DLLMSequenceStrategy.update_running, lb._PATCH_FLAG)
    strat = patched
    # P = 6, B = 4: the first block is the prompt's partial one (slots 6, 7 to fill). Seq 1 is ours,
    # seq 2 is not (never recorded). Forward 3 only caches the finished block: it commits nothing.
    ours, other = _FakeSeq(1, 6, 4), _FakeSeq(2, 6, 4)
    lb._RECORDS[1] = lb.StepRecord()
    forwards = [("UUUM", "UUUU"), ("UUUU", "CCCC"), ("CCCC", "UUMM"), ("UMUM", "UUUU"), ("UUUU", "CCCC")]
    all_lps = []
    for f, masks in enumerate(forwards):
        lps = -np.arange(8, dtype=np.float32) - 10 * f  # distinct per forward and slot
        all_lps.append(lps)
        inputs = types.SimpleNamespace(is_decoding=f > 0)
        strat.update_running([ours, other], _outputs(list(masks), lps), inputs, None)
    rec = lb._RECORDS[1]
    assert rec.forwards == 5 and rec.counter == 4
    assert rec.steps == {6: 1, 7: 2, 8: 3, 10: 3, 9: 4, 11: 4}
    assert 2 not in lb._RECORDS
    # log-prob at the committing forward, row 0 of ours: slot s of forward f is -(s + 10 f)
    assert rec.logprobs[6] == all_lps[0][2] and rec.logprobs[7] == all_lps[1][3]
    assert rec.logprobs[8] == all_lps[3][0] and rec.logprobs[11] == all_lps[4][3]

    r = lb.rollout_from_record(list(range(6)), [20, 21, 22, 23, 24, 25], rec, "length")
    np.testing.assert_array_equal(r.step_map, [1, 2, 3, 4, 3, 4])
    np.testing.assert_allclose(r.logprobs, [-2, -13, -30, -41, -32, -43])
    assert r.tail is None and r.num_forwards == 5 and r.tokens_per_forward == 1.5
    cut = lb.rollout_from_record(list(range(6)), [20, 21, 22], rec, "stop")  # stopped inside block 2
    np.testing.assert_array_equal(cut.step_map, [1, 2, 3])


def test_record_forward_pure():
    rec = lb.StepRecord()
    assert lb.record_forward(rec, 0, [1, 1, 1, 1], [1, 1, 1, 1]).size == 0  # nothing committed
    assert rec.counter == 0 and rec.forwards == 1
    np.testing.assert_array_equal(lb.record_forward(rec, 8, [1, 1, 0, 1], [0, 1, 0, 0]), [0, 3])
    assert rec.steps == {8: 1, 11: 1}
    with pytest.raises(ValueError, match="masked again"):
        lb.record_forward(rec, 8, [0, 1, 0, 0], [1, 1, 0, 0])
    with pytest.raises(RuntimeError, match="no committing forward"):
        lb.rollout_from_record([0] * 8, [1, 2, 3], rec, "stop")


def test_unsupported_version(monkeypatch):
    import lmdeploy

    monkeypatch.setattr(lmdeploy, "__version__", "0.19.1")
    with pytest.raises(lb.LMDeployUnavailableError, match=r"0\.19\.1 is not supported.*0\.18\.x"):
        lb.install_step_map_patch()
    monkeypatch.setattr(lmdeploy, "__version__", "0.18.3")
    assert lb.check_lmdeploy() is lmdeploy


def test_missing_lmdeploy(monkeypatch):
    monkeypatch.setitem(sys.modules, "lmdeploy", None)
    with pytest.raises(lb.LMDeployUnavailableError, match=r"pip install '\.\[lmdeploy\]'"):
        lb.check_lmdeploy()


def test_missing_gpu(monkeypatch):
    from gtpo_jax.data.tokenizer import TokenIds
    from gtpo_jax.rollout import RolloutSpec
    from gtpo_jax.sampling import DecodingConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ids = TokenIds(block_size=4, mask_id=lb.SDAR_MASK_TOKEN, pad_id=lb.SDAR_MASK_TOKEN, stop_ids=(1,))
    with pytest.raises(lb.LMDeployUnavailableError, match="needs a CUDA GPU"):
        lb.LMDeployRollout("/nonexistent", RolloutSpec(DecodingConfig(backend="lmdeploy"), ids))


def test_generation_config_maps_the_decoding_section():
    from gtpo_jax.sampling import DecodingConfig, LMDeployEngineSection

    be = object.__new__(lb.LMDeployRollout)  # no engine: only the config mapping
    be.cfg = DecodingConfig(backend="lmdeploy", strategy="low_confidence_static", denoising_steps=2, threshold=0.7,
                            temperature=0.6, top_k=20, top_p=0.95, max_new_tokens=64, min_new_tokens=8,
                            lmdeploy=LMDeployEngineSection(tensor_parallel=2, cache_max_entry_count=0.5))
    be.block_size, be.stop_ids, be.greedy, be.dtype = 4, [5, 6], False, "bfloat16"
    ec, gc = be.engine_config(), be.generation_config(seed=3)
    assert (ec.dllm_block_length, ec.dllm_unmasking_strategy, ec.dllm_denoising_steps,
            ec.dllm_confidence_threshold, ec.logprobs_mode, ec.enable_mp_engine, ec.dtype) == (
        4, "low_confidence_static", 2, 0.7, "raw_logprobs", False, "bfloat16")
    assert (ec.tp, ec.cache_max_entry_count) == (2, 0.5)
    assert (gc.temperature, gc.top_k, gc.top_p, gc.max_new_tokens, gc.min_new_tokens, gc.stop_token_ids,
            gc.random_seed, gc.logprobs) == (0.6, 20, 0.95, 64, 8, [5, 6], 3, 1)
    be.greedy = True
    assert be.generation_config(seed=0).top_k == 1


@pytest.mark.gpu
def test_gpu_parity_with_jax_sampler_and_inplace_update(tmp_path):
    """Greedy LMDeploy == greedy JAX sampler (tokens and step maps) on an exported tiny model whose
    vocabulary holds LMDeploy's SDAR mask id; an in-place weight update changes the outputs."""
    import jax

    from gtpo_jax.checkpoint import load_model
    from gtpo_jax.data.tokenizer import TokenIds
    from gtpo_jax.rollout import RolloutSpec
    from gtpo_jax.rollout.jax_backend import JaxRollout
    from gtpo_jax.sampling import DecodingConfig, LMDeployEngineSection

    src = tmp_path / "model"
    write_tiny_hf_checkpoint(str(src), tie=True, vocab_size=lb.SDAR_MASK_TOKEN + 16)
    stop, mask = [lb.SDAR_MASK_TOKEN + 1], lb.SDAR_MASK_TOKEN
    decoding = DecodingConfig(backend="lmdeploy", strategy="low_confidence_dynamic", threshold=0.3, temperature=1.0,
                              max_new_tokens=24, lmdeploy=LMDeployEngineSection(cache_max_entry_count=0.2))
    model = load_model(str(src), param_dtype="bfloat16", dtype="bfloat16")  # both engines in bf16
    spec = RolloutSpec(decoding, TokenIds(block_size=4, mask_id=mask, pad_id=mask, stop_ids=tuple(stop)), model.cfg,
                       greedy=True)
    jx = JaxRollout.from_spec(spec, model)
    ld = lb.LMDeployRollout(str(src), spec, weight_sync="inplace", dtype="bfloat16")
    try:
        prompts = [[11, 12, 13, 14, 15, 16], [21, 22, 23, 24]]
        a, b = jx.generate(prompts, 1, seed=0), ld.generate(prompts, 1, seed=0)
        for ga, gb in zip(a, b):
            n = min(len(ga[0].tokens), len(gb[0].tokens))  # LMDeploy's length cap can be P % B shorter
            np.testing.assert_array_equal(ga[0].tokens[:n], gb[0].tokens[:n])
            np.testing.assert_array_equal(ga[0].step_map[:n], gb[0].step_map[:n])
            np.testing.assert_allclose(ga[0].logprobs[:n], gb[0].logprobs[:n], atol=3e-2)  # bf16 kernels differ
        from flax import nnx

        state = nnx.state(model, nnx.Param)
        state = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape, x.dtype), state)
        ld.update_params(state)
        c = ld.generate(prompts, 1, seed=0)
        assert any(not np.array_equal(x[0].tokens, y[0].tokens) for x, y in zip(b, c))
    finally:
        ld.close()
