"""One SFT update step on an 8-device CPU mesh equals the single-device step."""

import jax
import numpy as np
import pytest
from flax import nnx

from gtpo_jax.config import Config
from gtpo_jax.data.tokenizer import TokenIds
from gtpo_jax.model import ModelConfig, init_model
from gtpo_jax.sharding import MeshConfig, build_mesh, shard_micro_batches, shard_model
from gtpo_jax.trainers.common import make_optimizer, make_update_step
from gtpo_jax.trainers.sft import build_sft_batch, sft_layouts, sft_loss_fn


def one_step(mesh=None, saved_logits_mb=0):
    cfg = Config(stage="sft", block_size=4)
    cfg.data.synthetic = True
    cfg.data.max_len = 24
    cfg.train.micro_batches = 2
    cfg.train.vocab_chunk = 32
    cfg.optim.lr = 1e-4  # Adam normalises tiny gradients: a large lr would amplify rounding noise
    rng = np.random.default_rng(0)
    samples = [(rng.integers(3, 96, 5 + i).tolist(), rng.integers(3, 96, 9 + i).tolist()) for i in range(8)]
    ids = TokenIds(block_size=cfg.block_size, mask_id=1, pad_id=2, stop_ids=())
    layouts = sft_layouts(samples, cfg, ids, step=0)
    batch, _ = build_sft_batch(layouts, cfg, rows_multiple=8)
    model = init_model(ModelConfig.tiny(vocab_size=96, tie_word_embeddings=False), seed=0)
    if mesh is not None:
        shard_model(model, mesh)
        batch = shard_micro_batches(batch, mesh)
    graphdef, params = nnx.split(model)
    tx, _ = make_optimizer(cfg.optim, 10)
    step = jax.jit(make_update_step(graphdef, tx, sft_loss_fn(32, saved_logits_mb)))
    params, _, metrics = step(params, tx.init(params), batch)
    return jax.tree.map(np.asarray, params), jax.tree.map(np.asarray, metrics)


# One mesh with the vocabulary logits saved for the backward (train.vocab_saved_logits_mb), one recomputing them.
@pytest.mark.parametrize("fsdp,tensor,saved_logits_mb", [(4, 2, 1024), (8, 1, 0)])
def test_sharded_step_equals_single_device(fsdp, tensor, saved_logits_mb):
    params, metrics = one_step()
    s_params, s_metrics = one_step(build_mesh(MeshConfig(data=1, fsdp=fsdp, tensor=tensor)), saved_logits_mb)
    np.testing.assert_allclose(s_metrics["loss"], metrics["loss"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(s_metrics["grad_norm"], metrics["grad_norm"], atol=1e-5, rtol=0)
    for a, b in zip(jax.tree.leaves(s_params), jax.tree.leaves(params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
