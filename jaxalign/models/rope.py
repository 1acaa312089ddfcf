"""Rotary position embeddings (RoPE), HF "rotate half" layout, with linear and Llama-3 scaling."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models.config import RopeScaling


def inverse_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
    """``inv_freq[i] = theta^(-2i / head_dim)`` for ``i < head_dim / 2``, then scaled.

    Llama-3 scaling with factor ``s``, low/high frequency factors ``a < b`` and original
    context ``C``: with wavelength ``w = 2 pi / f``, frequencies with ``w > C / a`` become
    ``f / s``, those with ``w < C / b`` stay ``f``, and in between
    ``(1 - k) f / s + k f`` with ``k = (C / w - a) / (b - a)``.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
    inv_freq = (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)
    if scaling is None:
        return inv_freq
    if scaling.rope_type == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    s, a, b, c = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor, scaling.original_max_position
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > c / a, inv_freq / s, inv_freq)
    smooth = (c / wavelen - a) / (b - a)
    smoothed = (1 - smooth) * scaled / s + smooth * scaled
    medium = ~(wavelen < c / b) & ~(wavelen > c / a)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: jax.Array, inv_freq: Sequence[float] | np.ndarray) -> tuple[jax.Array, jax.Array]:
    """``(cos, sin)`` of the angles ``positions[b, l] * inv_freq``, float32 ``[B, L, 1, Dh]`` (the
    ``Dh/2`` angles repeated for the two halves of the head dimension).

    A decoder computes them once per forward for all its layers. The optimization barrier makes
    XLA materialise them: otherwise it fuses ``sin``/``cos`` into every consumer and evaluates
    them per element of each layer's queries and keys (once per head), in both passes.
    """
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [B, L, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    return jax.lax.optimization_barrier((jnp.cos(angles), jnp.sin(angles)))


def apply_rope(x: jax.Array, tables: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Rotate ``x [B, L, N, Dh]`` by the angles of ``tables = rope_tables(positions, inv_freq)``:
    ``y = x * cos + rotate_half(x) * sin`` with ``rotate_half([x1, x2]) = [-x2, x1]`` over the
    two halves of the head dimension (cos and sin rounded to ``x``'s dtype)."""
    cos, sin = (t.astype(x.dtype) for t in tables)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin
