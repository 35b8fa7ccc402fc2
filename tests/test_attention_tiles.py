"""The JAX attention kernel's tiles follow the row length: short rows get short tiles, so that the
tile pairs no query can see (other samples of a packed row) are skipped."""

import jax.numpy as jnp

from gtpo_jax.model import ModelConfig, TokenLayout, init_model, sdar


def test_tiles_are_halved_until_a_row_holds_eight_down_to_64():
    cfg = ModelConfig.tiny()  # configured tiles 256
    assert cfg.attention_tiles(4096) == (256, 256)  # never above the configured tile
    assert cfg.attention_tiles(2048) == (256, 256)
    assert cfg.attention_tiles(1024) == (128, 128)
    assert cfg.attention_tiles(512) == (64, 64)  # the CPU demo's SFT rows
    assert cfg.attention_tiles(384) == (64, 64)
    assert cfg.attention_tiles(40) == (64, 64)  # the kernel clips a tile to the row itself
    assert cfg.replace(attn_q_tile=512, attn_kv_tile=128).attention_tiles(8192) == (512, 128)
    assert cfg.replace(attn_q_tile=32, attn_kv_tile=96).attention_tiles(128) == (32, 96)  # small ones as set


def test_the_model_runs_attention_with_the_tiles_of_its_row_length(monkeypatch):
    seen = []
    real = sdar.block_causal_attention

    def recording(*args, q_tile, kv_tile, **kwargs):
        seen.append((q_tile, kv_tile))
        return real(*args, q_tile=q_tile, kv_tile=kv_tile, **kwargs)

    monkeypatch.setattr(sdar, "block_causal_attention", recording)
    model = init_model(ModelConfig.tiny(num_layers=1))
    for length in (512, 2048):
        positions = jnp.arange(length, dtype=jnp.int32)[None]
        model(jnp.zeros((1, length), jnp.int32), positions, TokenLayout.contiguous(positions, 4))
    assert seen == [(64, 64), (256, 256)]
