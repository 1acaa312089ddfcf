"""The non-finite guard: a step whose loss or gradients are not finite changes nothing.

Inside the jitted step (no host round trip): with ``finite`` the flag "loss and global
gradient norm are finite" (a NaN or infinity in any gradient makes the norm non-finite) and
``halted = max_consecutive > 0 and consecutive_nonfinite >= max_consecutive``,

    apply            = finite and not halted
    params, opt_state = update(grads, opt_state, params) if apply else unchanged   # lax.cond
    nonfinite_steps   += (not finite) and not halted
    consecutive_nonfinite = unchanged if halted, else 0 if finite, else + 1

``step`` and the RNG advance either way (the batch was consumed). The optimizer's own
counters live in ``opt_state``, so a skipped step does not advance its schedule or Adam's
bias correction (as ``optax.apply_if_finite``). Once ``halted``, every later step is a no-op:
the loop, which learns of it one step later, stops with a checkpoint that holds the last
good parameters.

The choice is a ``lax.cond`` around the update, not a select between the updated and the old
state: a select needs the old parameters and moments after the new ones are computed, so XLA
copies every donated leaf instead of updating it in place (the 8B DPO step on 8 devices held
4.8 GiB more temporaries that way, docs/scaling.md).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxalign.train.state import TrainState

__all__ = ["guarded_state", "inject_nan"]

Update = Callable[[Any, Any, Any], tuple[Any, Any]]  # (grads, opt_state, params) -> (params, opt_state)


def guarded_state(
    state: TrainState, update: Update, grads: Any, rng: jax.Array, finite: jax.Array, max_consecutive: int
) -> TrainState:
    """The state after one step: ``update(grads, opt_state, params) -> (params, opt_state)``
    applied only when ``finite`` and not halted (see module docstring)."""
    if max_consecutive > 0:
        halted = state.consecutive_nonfinite >= max_consecutive
    else:
        halted = jnp.zeros((), bool)
    apply = finite & ~halted
    bad = (~finite & ~halted).astype(jnp.int32)
    consecutive = jnp.where(halted, state.consecutive_nonfinite, jnp.where(finite, 0, state.consecutive_nonfinite + 1))
    params, opt_state = jax.lax.cond(apply, update, lambda _, opt_state, params: (params, opt_state),
                                     grads, state.opt_state, state.params)
    return TrainState(
        params=params,
        opt_state=opt_state,
        step=state.step + 1,
        rng=rng,
        nonfinite_steps=state.nonfinite_steps + bad,
        consecutive_nonfinite=consecutive.astype(jnp.int32),
    )


def inject_nan(grads: Any, step: jax.Array, nan_at_steps: Sequence[int]) -> Any:
    """TEST HOOK (config ``debug.nan_at_steps``): every gradient is NaN when ``step`` (1-based) is listed."""
    hit = jnp.isin(step, jnp.asarray(tuple(nan_at_steps), jnp.int32))
    return jax.tree.map(lambda g: jnp.where(hit, jnp.asarray(jnp.nan, g.dtype), g), grads)
