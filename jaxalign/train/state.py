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
    the number of optimizer steps taken (int32 scalar; skipped steps count, their batch was
    consumed), a raw ``uint32[2]`` PRNG key that the step splits once per step (so a resumed
    run draws the same randomness), and the non-finite guard's counters (int32 scalars):
    ``nonfinite_steps`` (steps skipped because the loss or a gradient was not finite, over
    the whole run) and ``consecutive_nonfinite`` (of those, how many in a row up to now)."""

    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    nonfinite_steps: jax.Array
    consecutive_nonfinite: jax.Array


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int) -> TrainState:
    """A state at step 0: ``optimizer.init(params)``, ``PRNGKey(seed)``, counters at 0."""
    return TrainState(
        params=params,
        opt_state=optimizer.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.PRNGKey(seed),
        nonfinite_steps=jnp.zeros((), jnp.int32),
        consecutive_nonfinite=jnp.zeros((), jnp.int32),
    )
