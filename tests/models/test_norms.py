"""RMSNorm: float32 statistics, and in bfloat16 a scale gradient summed in float32."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.models.layers import Initializer, RMSNorm


def _norm(dtype, scale):
    norm = RMSNorm(scale.shape[0], 1e-6, init=Initializer(0), dtype=dtype, param_dtype=jnp.float32)
    norm.scale[...] = jnp.asarray(scale)
    return norm


def test_values_match_the_formula_in_float32():
    rng = np.random.default_rng(0)
    x, scale = rng.normal(size=(4, 6, 16)), 1 + 0.1 * rng.normal(size=16)
    out = _norm(jnp.float32, scale)(jnp.asarray(x, jnp.float32))
    expected = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_scale_gradient_is_summed_in_float32():
    """3072 positions: each term y * g is a bfloat16 product, their sum must be float32 (a
    bfloat16 sum is off by ~1e-2 relative here)."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 512, 64)).astype(np.float32)
    scale = (1 + 0.1 * rng.normal(size=64)).astype(np.float32)
    g = jnp.asarray(rng.normal(size=x.shape), jnp.bfloat16)
    norm = _norm(jnp.bfloat16, scale)
    graphdef, params = nnx.split(norm, nnx.Param)

    def loss(params):
        out = nnx.merge(graphdef, params)(jnp.asarray(x))
        assert out.dtype == jnp.bfloat16
        return jnp.sum(out.astype(jnp.float32) * g.astype(jnp.float32))

    grad = jax.jit(jax.grad(loss))(params)["scale"][...]
    y = x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + 1e-6)
    rounded = np.asarray(jnp.asarray(y, jnp.bfloat16), np.float64)
    expected = (rounded * np.asarray(g, np.float64)).sum((0, 1))
    np.testing.assert_allclose(np.asarray(grad, np.float64), expected, rtol=0, atol=1e-4 * np.abs(expected).max())
