"""Input checks shared by the losses: float dtype, shapes, hyperparameter ranges.

All checks run in Python on static information (shapes, dtypes, Python floats), so they work
the same under ``jax.jit`` and never branch on array values.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def compute_dtype(*arrays: jax.Array) -> jnp.dtype:
    """float32, or float64 when x64 is enabled and a floating input is float64.

    Low-precision inputs (bf16, f16) are computed in float32.
    """
    dtypes = (jnp.asarray(a).dtype for a in arrays)
    return jnp.result_type(jnp.float32, *(d for d in dtypes if jnp.issubdtype(d, jnp.floating)))


def as_float(arrays: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
    """Casts every named array to the common compute dtype (see ``compute_dtype``)."""
    values = {name: jnp.asarray(a) for name, a in arrays.items()}
    dtype = compute_dtype(*values.values())
    return {name: a.astype(dtype) for name, a in values.items()}


def same_shape(loss: str, arrays: Mapping[str, jax.Array]) -> tuple[int, ...]:
    """Raises ValueError naming the loss and the arguments unless all shapes are equal."""
    shapes = {name: tuple(jnp.shape(a)) for name, a in arrays.items()}
    first = next(iter(shapes.values()))
    if any(s != first for s in shapes.values()):
        listed = ", ".join(f"{name}{list(s)}" for name, s in shapes.items())
        raise ValueError(f"losses.{loss}: these arguments must have the same shape, got {listed}")
    return first


def check_weights(loss: str, weights: jax.Array | None, shape: tuple[int, ...]) -> None:
    """Per-pair weights must have the shape of the per-pair inputs."""
    if weights is not None and tuple(jnp.shape(weights)) != shape:
        raise ValueError(
            f"losses.{loss}: weights must have the per-pair shape {list(shape)}, "
            f"got {list(jnp.shape(weights))}"
        )


def static_float(value: object) -> float | None:
    """The Python float of a concrete hyperparameter, None for a traced one (not checkable)."""
    if isinstance(value, jax.core.Tracer):
        return None
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def check_range(
    loss: str,
    name: str,
    value: object,
    low: float,
    high: float,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> None:
    """Raises ValueError when a concrete hyperparameter lies outside its interval."""
    v = static_float(value)
    if v is None:
        return
    above = v >= low if low_inclusive else v > low
    below = v <= high if high_inclusive else v < high
    if not (above and below):
        interval = f"{'[' if low_inclusive else '('}{low}, {high}{']' if high_inclusive else ')'}"
        raise ValueError(f"losses.{loss}: {name} must lie in {interval}, got {v}")


def check_positive(loss: str, name: str, value: object) -> None:
    """Raises ValueError when a concrete hyperparameter is not > 0."""
    v = static_float(value)
    if v is not None and not v > 0:
        raise ValueError(f"losses.{loss}: {name} must be > 0, got {v}")
