"""Small building blocks: parameters with logical axes, norms, activations.

Every parameter is an ``nnx.Param`` whose ``out_sharding`` metadata holds one logical axis
name per dimension (see ``jaxalign/models/README.md``). Eager sharding is off: the names are
only labels here; ``jaxalign.parallel`` maps them to mesh axes.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxalign.precision import mixed_einsum

Axes = tuple[str | None, ...]

# Logical axes of activations (constrained with jaxalign.parallel.with_logical_constraint).
RESIDUAL: Axes = ("batch", "length", "embed")
QUERIES: Axes = ("batch", "length", "heads", "head_dim")  # also attention outputs, GPT-2 keys/values
KEYS: Axes = ("batch", "length", "kv_heads", "head_dim")
MLP_HIDDEN: Axes = ("batch", "length", "mlp")

INIT_STD = 0.02


class Initializer:
    """Creates parameters: N(0, 0.02^2), ones or zeros drawn on the host with numpy (no XLA
    compilation per shape), or, with ``seed=None``, abstract ``jax.ShapeDtypeStruct`` leaves that
    allocate nothing (for checkpoint loading). Values depend only on the seed and creation order.
    """

    def __init__(self, seed: int | None):
        self.rng = None if seed is None else np.random.default_rng(seed)

    def __call__(self, shape: tuple[int, ...], axes: Axes, dtype, init: str = "normal") -> nnx.Param:
        """A parameter of ``shape`` labelled with logical ``axes`` (one name or None per dimension)."""
        if len(axes) != len(shape):
            raise ValueError(f"axes {axes} do not match shape {shape}")
        if self.rng is None:
            value = jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
        elif init == "normal":
            value = jnp.asarray((INIT_STD * self.rng.standard_normal(shape, np.float32)).astype(dtype))
        elif init in ("ones", "zeros"):
            value = jnp.asarray((np.ones if init == "ones" else np.zeros)(shape, np.dtype(dtype)))
        else:
            raise ValueError(f"unknown init {init!r}")
        return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": _gelu_exact,
    "gelu_new": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": jax.nn.relu,
}


def activation_fn(name: str) -> Callable[[jax.Array], jax.Array]:
    """HF activation names: ``gelu`` is exact (erf), ``gelu_new``/``gelu_pytorch_tanh`` the tanh form."""
    return _ACTIVATIONS[name]


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x^2) + eps) * scale``, normalised in float32. As in HF's Llama, the
    normalised ``x`` is rounded to the compute dtype before the product with ``scale``; the
    product is float32, so the gradient of ``scale`` is summed over positions in float32."""

    def __init__(self, dim: int, eps: float, *, init: Initializer, dtype, param_dtype):
        self.scale = init((dim,), ("norm",), param_dtype, init="ones")
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y.astype(self.dtype) * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nnx.Module):
    """``y = (x - mean) / sqrt(var + eps) * scale + bias``, normalised in float32."""

    def __init__(self, dim: int, eps: float, *, init: Initializer, dtype, param_dtype):
        self.scale = init((dim,), ("norm",), param_dtype, init="ones")
        self.bias = init((dim,), ("norm",), param_dtype, init="zeros")
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(self.dtype)


class Embed(nnx.Module):
    """A lookup table ``[num, dim]``; ``axes`` names its two dimensions."""

    def __init__(self, num: int, dim: int, axes: Axes, *, init: Initializer, dtype, param_dtype):
        self.embedding = init((num, dim), axes, param_dtype)
        self.dtype = dtype

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class Projection(nnx.Module):
    """``y = einsum(equation, x, kernel) + bias``; the kernel's first ``n_in`` dims are contracted.

    The bias (optional) has the kernel's remaining dims and axes. With LoRA adapters
    (``jaxalign.models.lora.add_adapters``: ``lora_a [*in, r]``, ``lora_b [r, *out]``) it is
    ``y = x W + bias + lora_scale * (x A) B``.
    """

    def __init__(self, kernel_shape: tuple[int, ...], axes: Axes, equation: str, *, n_in: int, bias: bool,
                 init: Initializer, dtype, param_dtype):
        self.kernel = init(kernel_shape, axes, param_dtype)
        self.bias = nnx.data(init(kernel_shape[n_in:], axes[n_in:], param_dtype, init="zeros") if bias else None)
        self.equation = equation
        self.n_in = n_in
        self.dtype = dtype
        self.lora_a = nnx.data(None)
        self.lora_b = nnx.data(None)
        self.lora_scale = 0.0

    def __call__(self, x: jax.Array) -> jax.Array:
        # Accumulated in float32 in both passes (jaxalign.precision), then cast.
        y = mixed_einsum(self.equation, x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        if self.lora_a is not None:
            xa = jnp.tensordot(x.astype(self.dtype), self.lora_a[...].astype(self.dtype), axes=self.n_in,
                               preferred_element_type=jnp.float32)
            xa = (self.lora_scale * xa).astype(self.dtype)
            y = y + jnp.tensordot(xa, self.lora_b[...].astype(self.dtype), axes=1, preferred_element_type=jnp.float32)
        return y.astype(self.dtype)
