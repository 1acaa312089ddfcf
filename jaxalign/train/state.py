"""The train state: one pytree holding everything a step changes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

__all__ = ["TrainState", "init_state"]


@struct.dataclass
class TrainState:
    """``params`` (trained parameters; ``{"model": nnx.State, ...}``), the optimizer state,
    the number of optimizer steps taken (int32 scalar) and a raw ``uint32[2]`` PRNG key that
    the step splits once per step (so a resumed run draws the same randomness)."""

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """A state at step 0: ``optimizer.init(params)`` and ``PRNGKey(seed)``."""
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(seed),
    )
