"""Forward under fsdp×tensor meshes of 8 fake CPU devices equals the single-device forward."""

import jax
import numpy as np
import pytest

from gtpo_jax.model import ModelConfig, TokenLayout, init_model
from gtpo_jax.sharding import MeshConfig, build_mesh, param_shardings, shard_batch, shard_model


def _forward(model, tokens, positions):
    @jax.jit
    def run(model, tokens, positions):
        hidden, _ = model(tokens, positions, TokenLayout.contiguous(positions, 4))
        return model.logits(hidden)

    return np.asarray(run(model, tokens, positions))


@pytest.mark.parametrize("fsdp,tensor", [(4, 2), (8, 1)])
def test_sharded_forward_equals_unsharded(fsdp, tensor, rng):
    assert len(jax.devices()) == 8, "conftest sets 8 fake CPU devices"
    cfg = ModelConfig.tiny(vocab_size=256, num_heads=4, num_kv_heads=2, tie_word_embeddings=False)
    tokens = rng.integers(0, 256, size=(8, 21)).astype(np.int32)
    positions = np.tile(np.arange(21, dtype=np.int32), (8, 1))
    expected = _forward(init_model(cfg, seed=3), tokens, positions)

    mesh = build_mesh(MeshConfig(data=1, fsdp=fsdp, tensor=tensor))
    model = shard_model(init_model(cfg, seed=3), mesh)
    q_proj = model.layers[0].self_attn.q_proj.get_value()
    assert q_proj.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert len(q_proj.addressable_shards) == 8
    tokens_s, positions_s = shard_batch((tokens, positions), mesh)
    got = _forward(model, tokens_s, positions_s)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


def test_indivisible_dimension_stays_replicated():
    cfg = ModelConfig.tiny(num_heads=4, num_kv_heads=2)
    mesh = build_mesh(MeshConfig(data=1, fsdp=2, tensor=4))
    shardings = param_shardings(init_model(cfg), mesh)
    k_spec = shardings["layers"][0]["self_attn"]["k_proj"].spec
    assert k_spec == jax.sharding.PartitionSpec("fsdp", None, None)  # 2 kv heads on a 4-way axis


def test_mesh_errors():
    with pytest.raises(ValueError, match="needs 16 devices"):
        build_mesh(MeshConfig(data=2, fsdp=4, tensor=2))
    with pytest.raises(ValueError, match="at most one"):
        build_mesh(MeshConfig(data=-1, fsdp=-1))
