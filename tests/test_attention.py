"""block_causal_attention against a dense-mask reference whose mask is built token by token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gtpo_jax.model import TokenLayout, block_causal_attention


def dense_reference(q, k, v, allowed):
    """Plain softmax attention with an explicit boolean mask [b, Lq, Lk]; rows with no key -> 0."""
    b, lq, hq, d = q.shape
    hkv = k.shape[2]
    k = np.repeat(k, hq // hkv, axis=2)
    v = np.repeat(v, hq // hkv, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(d)
    s = np.where(allowed[:, None], s, -np.inf)
    m = np.max(s, -1, keepdims=True)
    p = np.exp(s - np.where(np.isinf(m), 0, m))
    denom = p.sum(-1, keepdims=True)
    p = np.where(denom > 0, p / np.where(denom > 0, denom, 1), 0)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def random_qkv(rng, b, lq, lk, hq=4, hkv=2, d=8):
    return (
        rng.normal(size=(b, lq, hq, d)).astype(np.float32),
        rng.normal(size=(b, lk, hkv, d)).astype(np.float32),
        rng.normal(size=(b, lk, hkv, d)).astype(np.float32),
    )


def check(q, k, v, q_layout, kv_layout, allowed, tiles=((8, 8), (16, 32), (256, 256))):
    expected = dense_reference(q, k, v, allowed)
    for q_tile, kv_tile in tiles:
        got = block_causal_attention(q, k, v, q_layout, kv_layout, q_tile=q_tile, kv_tile=kv_tile)
        np.testing.assert_allclose(np.asarray(got), expected, atol=2e-5, rtol=0)


@pytest.mark.parametrize("length,block", [(32, 4), (37, 4), (30, 8)])
def test_plain_block_causal(rng, length, block):
    q, k, v = random_qkv(rng, 2, length, length)
    pos = np.tile(np.arange(length), (2, 1))
    layout = TokenLayout.contiguous(pos, block)
    allowed = np.array([[[kk // block <= qq // block for kk in range(length)] for qq in range(length)]] * 2)
    check(q, k, v, layout, layout, allowed)


def test_packed_segments_with_padding(rng):
    # row 0: samples of 10 and 13 tokens then 5 pad; row 1: one sample of 21, 7 pad
    seg = np.array([[1] * 10 + [2] * 13 + [0] * 5, [1] * 21 + [0] * 7])
    pos = np.array([list(range(10)) + list(range(13)) + [0] * 5, list(range(21)) + [0] * 7])
    b, length = seg.shape
    layout = TokenLayout(jnp.asarray(seg), jnp.asarray(pos // 4), jnp.zeros_like(jnp.asarray(seg)))
    allowed = np.zeros((b, length, length), bool)
    for r in range(b):
        for i in range(length):
            for j in range(length):
                allowed[r, i, j] = seg[r, i] > 0 and seg[r, i] == seg[r, j] and pos[r, j] // 4 <= pos[r, i] // 4
    q, k, v = random_qkv(rng, b, length, length)
    check(q, k, v, layout, layout, allowed)


def test_noisy_copies(rng):
    """Clean prompt+response (P=6, R=10, B=4) followed by noisy copies of blocks 1..3.

    Each copy sees clean tokens of earlier blocks and its own slots; clean tokens never see copies."""
    block = 4
    clean_pos = list(range(16))
    copies = [(1, 1), (2, 1), (2, 2), (3, 1)]  # (block j, copy id)
    pos, blk, cpy = list(clean_pos), [p // block for p in clean_pos], [0] * 16
    for j, c in copies:
        for p in range(j * block, (j + 1) * block):
            pos.append(p), blk.append(j), cpy.append(c + 10 * j)  # copy ids unique per (block, copy)
    length = len(pos)
    layout = TokenLayout(jnp.ones((1, length), jnp.int32), jnp.asarray([blk]), jnp.asarray([cpy]))
    allowed = np.zeros((1, length, length), bool)
    for i in range(length):
        for j in range(length):
            if cpy[i] == 0:
                allowed[0, i, j] = cpy[j] == 0 and blk[j] <= blk[i]
            else:
                allowed[0, i, j] = (cpy[j] == 0 and blk[j] < blk[i]) or cpy[j] == cpy[i]
    q, k, v = random_qkv(rng, 1, length, length)
    check(q, k, v, layout, layout, allowed)


def test_kv_cache_context(rng):
    """Queries of one block over cached earlier blocks + itself (the sampler's pattern)."""
    block, cached, cache_cap = 4, 12, 20  # 3 finished blocks in a 20-slot cache
    kv_seg = np.array([[1] * cached + [0] * (cache_cap - cached) + [1] * block])
    kv_pos = np.array([list(range(cached)) + [0] * (cache_cap - cached) + list(range(12, 16))])
    kv_layout = TokenLayout(jnp.asarray(kv_seg), jnp.asarray(kv_pos // block), jnp.zeros_like(jnp.asarray(kv_seg)))
    q_layout = TokenLayout(jnp.ones((1, block), jnp.int32), jnp.full((1, block), 3), jnp.zeros((1, block), jnp.int32))
    allowed = np.broadcast_to((kv_seg > 0)[:, None, :], (1, block, kv_seg.shape[1]))
    q, k, v = random_qkv(rng, 1, block, kv_seg.shape[1])
    check(q, k, v, q_layout, kv_layout, allowed)


def test_gradients_match_dense(rng):
    length, block = 23, 4
    q, k, v = random_qkv(rng, 2, length, length)
    pos = np.tile(np.arange(length), (2, 1))
    layout = TokenLayout.contiguous(pos, block)
    allowed = jnp.asarray(np.array([[[kk // block <= qq // block for kk in range(length)] for qq in range(length)]] * 2))
    w = jnp.asarray(rng.normal(size=q.shape).astype(np.float32))

    def dense(q, k, v):
        kk, vv = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, kk) / np.sqrt(q.shape[-1])
        p = jax.nn.softmax(jnp.where(allowed[:, None], s, -1e30), -1)
        return jnp.einsum("bhqk,bkhd->bqhd", p, vv)

    ours = jax.grad(lambda *a: (block_causal_attention(*a, layout, layout, q_tile=8, kv_tile=8) * w).sum(), (0, 1, 2))
    ref = jax.grad(lambda *a: (dense(*a) * w).sum(), (0, 1, 2))
    for g_ours, g_ref in zip(ours(q, k, v), ref(q, k, v)):
        np.testing.assert_allclose(np.asarray(g_ours), np.asarray(g_ref), atol=2e-5, rtol=0)


def test_no_quadratic_mask_in_compiled_program():
    """The compiled forward+backward at L=2048 holds no L×L buffer (tiles only)."""
    length = 2048
    q = jax.ShapeDtypeStruct((1, length, 2, 16), jnp.float32)
    kv = jax.ShapeDtypeStruct((1, length, 1, 16), jnp.float32)
    ids = jax.ShapeDtypeStruct((1, length), jnp.int32)

    def loss(q, k, v, seg, blk, cpy):
        lay = TokenLayout(seg, blk, cpy)
        return block_causal_attention(q, k, v, lay, lay, q_tile=128, kv_tile=128).sum()

    compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, kv, kv, ids, ids, ids).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < length * length  # an L×L bool mask alone would be 4 MiB; f32 scores 16 MiB
