"""Matrix products with float32 accumulation and explicit gradient products, both passes.

``mixed_einsum(equation, x, w)`` is ``einsum`` accumulated and returned in float32. Its
backward pass rounds the float32 cotangent ``g`` to the operands' dtype and forms both
gradients as products of their own, accumulated in float32,

    dx = einsum(out, w -> x)(g, w),    dw = einsum(x, out -> w)(x, g),

returned in the operands' dtypes. With lower-precision operands (bfloat16, float16; the
model's compute dtype) this is what PyTorch's autocast does, and what automatic
differentiation of a float32-output product does not (it promotes the operands to float32,
which on XLA:CPU leaves the bfloat16 (AMX) matmul kernels for the float32 ones, ~5x slower).
With float32 operands it is the same arithmetic as automatic differentiation, but XLA:CPU
lays out the autodiff form of the weight gradient with transposing copies of the cotangent
(a SwiGLU MLP's forward + backward: 262 ms against 156 ms at 3072 x 512 x 1408,
docs/performance.md).
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

__all__ = ["mixed_einsum"]


def _operands(equation: str) -> tuple[str, str, str]:
    inputs, _, out = equation.replace(" ", "").partition("->")
    a, _, b = inputs.partition(",")
    if not out or not a or not b or "." in equation or "," in b:
        raise ValueError(f"mixed_einsum: need an explicit two-operand equation 'x,w->out', got {equation!r}")
    for name, labels in (("x", a), ("w", b), ("out", out)):
        if len(set(labels)) != len(labels):
            raise ValueError(f"mixed_einsum: repeated index in {name} of {equation!r}")
    if not set(a) <= set(b) | set(out) or not set(b) <= set(a) | set(out) or not set(out) <= set(a) | set(b):
        raise ValueError(f"mixed_einsum: every index must appear in two of x, w, out in {equation!r}")
    return a, b, out


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _product(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum(equation, x, w, preferred_element_type=jnp.float32)


def _forward(equation: str, x: jax.Array, w: jax.Array):
    return _product(equation, x, w), (x, w)


def _backward(equation: str, residuals, g: jax.Array):
    x, w = residuals
    a, b, out = _operands(equation)
    g = g.astype(x.dtype)
    dx = jnp.einsum(f"{out},{b}->{a}", g, w, preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"{a},{out}->{b}", x, g, preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(w.dtype)


_product.defvjp(_forward, _backward)


def mixed_einsum(equation: str, x: jax.Array, w: jax.Array) -> jax.Array:
    """``einsum(equation, x, w)`` in float32 with the explicit backward of the module
    docstring, for ``x`` and ``w`` of one dtype of at most 32 bits; otherwise (float64, mixed
    dtypes) both are promoted and automatic differentiation applies."""
    _operands(equation)
    if x.dtype != w.dtype or jnp.dtype(x.dtype).itemsize > 4:
        accumulate = jnp.promote_types(jnp.promote_types(x.dtype, w.dtype), jnp.float32)
        return jnp.einsum(equation, x, w, preferred_element_type=accumulate)
    return _product(equation, x, w)
