"""mixed_einsum: float32 accumulation in both passes, low-precision gradient products."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign.precision import mixed_einsum

# Every product the models and the LM head run through mixed_einsum, at sizes large enough for
# XLA:CPU to pick its library (oneDNN/XNNPACK) kernels rather than its small-matmul loops.
MODEL_EQUATIONS = {
    "bld,dhk->blhk": ((2, 256, 128), (128, 4, 32)),
    "blhk,hkd->bld": ((2, 256, 4, 32), (4, 32, 128)),
    "bld,df->blf": ((2, 256, 128), (128, 384)),
    "blf,fd->bld": ((2, 256, 384), (384, 128)),
    "bld,dthk->blthk": ((2, 256, 128), (128, 3, 4, 32)),
    "bcd,dv->bcv": ((2, 96, 128), (128, 4096)),
}


def _inputs(x_shape, w_shape, dtype):
    kx, kw, kc = jax.random.split(jax.random.PRNGKey(0), 3)
    x = jax.random.normal(kx, x_shape).astype(dtype)
    w = (jax.random.normal(kw, w_shape) / np.sqrt(x_shape[-1])).astype(dtype)
    return x, w, kc


def test_float32_operands_give_the_plain_product_and_gradients():
    x, w, kc = _inputs((3, 5, 8), (8, 7), jnp.float32)
    c = jax.random.normal(kc, (3, 5, 7))
    ours = lambda x, w: jnp.sum(mixed_einsum("bld,df->blf", x, w) * c)
    plain = lambda x, w: jnp.sum(jnp.einsum("bld,df->blf", x, w) * c)
    np.testing.assert_array_equal(mixed_einsum("bld,df->blf", x, w), jnp.einsum("bld,df->blf", x, w))
    for a, b in zip(jax.grad(ours, (0, 1))(x, w), jax.grad(plain, (0, 1))(x, w)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("equation", sorted(MODEL_EQUATIONS))
def test_bfloat16_products_accumulate_in_float32_in_both_passes(equation):
    x_shape, w_shape = MODEL_EQUATIONS[equation]
    x, w, kc = _inputs(x_shape, w_shape, jnp.bfloat16)
    out = jax.jit(lambda x, w: mixed_einsum(equation, x, w))(x, w)
    assert out.dtype == jnp.float32
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(out), np.einsum(equation, x64, w64), rtol=1e-4, atol=1e-4)
    # A bfloat16-exact cotangent: the backward pass's rounding of it to bfloat16 is then exact,
    # and the gradients are float32-accumulated products rounded once to bfloat16.
    c = jax.random.normal(kc, out.shape).astype(jnp.bfloat16).astype(jnp.float32)
    dx, dw = jax.jit(jax.grad(lambda x, w: jnp.sum(mixed_einsum(equation, x, w) * c), (0, 1)))(x, w)
    assert dx.dtype == dw.dtype == jnp.bfloat16
    a, b = equation.split("->")[0].split(",")
    out_labels = equation.split("->")[1]
    c64 = np.asarray(c, np.float64)
    np.testing.assert_allclose(np.asarray(dx, np.float64), np.einsum(f"{out_labels},{b}->{a}", c64, w64),
                               rtol=1e-2, atol=1e-2)
    np.testing.assert_allclose(np.asarray(dw, np.float64), np.einsum(f"{a},{out_labels}->{b}", x64, c64),
                               rtol=1e-2, atol=5e-2)


def test_float64_and_mixed_dtypes_are_promoted():
    with jax.enable_x64(True):
        x, w = jnp.ones((2, 3), jnp.float64), jnp.ones((3, 4), jnp.float64)
        assert mixed_einsum("nd,dv->nv", x, w).dtype == jnp.float64
    out = mixed_einsum("nd,dv->nv", jnp.ones((2, 3), jnp.bfloat16), jnp.ones((3, 4), jnp.float32))
    assert out.dtype == jnp.float32


@pytest.mark.parametrize("equation", ["nd,dv", "...d,dv->...v", "nn,nv->v", "nd,dv,vk->nk", "nd,dv->nvk"])
def test_unsupported_equations_are_named(equation):
    with pytest.raises(ValueError, match="mixed_einsum"):
        mixed_einsum(equation, jnp.ones((2, 2)), jnp.ones((2, 2)))
