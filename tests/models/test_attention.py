"""Query-blocked attention equals the full form on real queries, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.models.attention import dot_product_attention, make_attention_mask


def _naive(q, k, v, mask, scale):
    """numpy float64: softmax over the visible keys, HF repeat_kv head order."""
    q, k, v, mask = (np.asarray(x, np.float64) for x in (q, k, v, mask))
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    s = np.einsum("bqhd,bkhd->bhqk", q, k) * scale
    s = np.where(mask[:, None] > 0, s, -1e300)
    s = s - s.max(-1, keepdims=True)
    p = np.exp(s) / np.exp(s).sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


@pytest.fixture(scope="module")
def inputs():
    # Row 0: three packed segments and right padding; row 1: left padding, one sequence.
    segments = np.array([[1] * 9 + [2] * 7 + [3] * 5 + [0] * 3, [0] * 4 + [1] * 20], np.int32)
    positions = np.zeros_like(segments)
    for r in range(2):
        for t in range(1, 24):
            same = segments[r, t] == segments[r, t - 1] and segments[r, t] != 0
            positions[r, t] = positions[r, t - 1] + 1 if same else 0
    index = jnp.arange(24)
    mask = make_attention_mask(index, index, jnp.asarray(segments), jnp.asarray(segments),
                               jnp.asarray(positions), jnp.asarray(positions))
    keys = jax.random.split(jax.random.PRNGKey(3), 3)
    q = jax.random.normal(keys[0], (2, 24, 4, 8))  # 4 query heads over 2 key/value heads (GQA)
    k = jax.random.normal(keys[1], (2, 24, 2, 8))
    v = jax.random.normal(keys[2], (2, 24, 2, 8))
    return q, k, v, mask, segments > 0


@pytest.mark.parametrize("block", [0, 4, 7, 24])
def test_query_blocks_give_the_full_softmax_on_real_queries(inputs, block):
    q, k, v, mask, real = inputs
    out = np.asarray(jax.jit(lambda *a: dot_product_attention(*a, 0.35, query_block=block))(q, k, v, mask))
    np.testing.assert_allclose(out[real], _naive(q, k, v, mask, 0.35)[real], rtol=1e-5, atol=1e-6)
    assert np.isfinite(out).all()  # padding queries see nothing: finite, never read


@pytest.mark.parametrize("block", [4, 7])
def test_query_blocks_have_the_full_form_gradients(inputs, block):
    q, k, v, mask, real = inputs
    loss = lambda b: lambda q, k, v: jnp.sum(
        jnp.where(real[..., None, None], dot_product_attention(q, k, v, mask, 0.35, query_block=b), 0.0) ** 2)
    blocked = jax.jit(jax.grad(loss(block), (0, 1, 2)))(q, k, v)
    full = jax.jit(jax.grad(loss(0), (0, 1, 2)))(q, k, v)
    for a, e in zip(blocked, full):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-4, atol=1e-5)


def test_blocked_attention_in_bfloat16_is_close_to_float32(inputs):
    """bfloat16 q, k, v: float32 scores and softmax, bfloat16 weights in the value product;
    values and gradients within bfloat16 rounding of the float32 computation on the same inputs."""
    q, k, v, mask, real = inputs
    q16, k16, v16 = (x.astype(jnp.bfloat16) for x in (q, k, v))
    loss = lambda q, k, v: jnp.sum(
        jnp.where(real[..., None, None], dot_product_attention(q, k, v, mask, 0.35, query_block=7), 0.0)
        .astype(jnp.float32) ** 2)
    grads16 = jax.jit(jax.grad(loss, (0, 1, 2)))(q16, k16, v16)
    grads32 = jax.jit(jax.grad(loss, (0, 1, 2)))(*(x.astype(jnp.float32) for x in (q16, k16, v16)))
    assert [g.dtype for g in grads16] == [jnp.bfloat16] * 3
    for a, e in zip(grads16, grads32):
        e = np.asarray(e)
        np.testing.assert_allclose(np.asarray(a, np.float32), e, atol=3e-2 * np.abs(e).max())
    out16 = dot_product_attention(q16, k16, v16, mask, 0.35, query_block=7)
    out32 = np.asarray(_naive(*(x.astype(jnp.float32) for x in (q16, k16, v16)), mask, 0.35))
    np.testing.assert_allclose(np.asarray(out16, np.float32)[real], out32[real], atol=2e-2)
