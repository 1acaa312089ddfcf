"""Weighted and masked means: the batch reductions every loss uses."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def safe_ratio(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """numerator / denominator, and 0 where the denominator is 0 (gradient-safe: no NaN)."""
    nonzero = denominator != 0
    return jnp.where(nonzero, numerator / jnp.where(nonzero, denominator, 1), 0)


def weighted_mean(values: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """``mean(values)``, or ``sum(w * values) / sum(w)`` with weights (0 when ``sum(w) == 0``)."""
    if weights is None:
        return jnp.mean(values)
    weights = jnp.asarray(weights).astype(values.dtype)
    return safe_ratio(jnp.sum(weights * values), jnp.sum(weights))


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Token mean ``sum(mask * values) / sum(mask)`` over all axes, 0 when the mask is empty."""
    mask = jnp.asarray(mask).astype(values.dtype)
    return safe_ratio(jnp.sum(mask * values), jnp.sum(mask))
