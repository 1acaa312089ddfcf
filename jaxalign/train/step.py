"""The one jitted train step shared by every loss, its eval twin, and the reference forward.

``train_step(state, batch) -> (state, metrics)``. The batch follows the batch contract of
docs/architecture.md with one extra leading axis ``A`` (the gradient-accumulation
micro-batches): every array is ``[A, ...]`` and each micro-batch ``a`` is a complete batch of
``P`` pairs. Per micro-batch the step runs the policy once over all rows (chosen and rejected
together), turns hidden states into float32 per-token log-probs chunk by chunk, reduces them
to per-sequence sums over ``sequence_ids``, gets reference log-probs (frozen params in the
same step under ``stop_gradient``, the batch's precomputed ``ref_*_logps``, or none) and
calls the objective (``jaxalign.objectives.Objective``: its ``loss_fn`` does the forward it
needs through a ``jaxalign.scoring.Forward``).

Gradient accumulation (``lax.scan`` over ``A``): with ``w_a`` the weight of micro-batch ``a``
in the objective's ``unit`` (real pairs, or real tokens for token-mean losses) and
``W = sum_a w_a``,

    loss = sum_a (w_a / W) * loss_a,   grads = sum_a (w_a / W) * grad loss_a,

and each metric is combined the same way. Since each ``loss_a`` is a weighted mean over its
own pairs (``weights = pair_mask``) or tokens, ``loss`` is exactly the mean over the global
batch's pairs (tokens), whatever ``A`` is. Then: global-norm clipping and the optax update.

Non-finite guard (``jaxalign.train.guard``): a step whose loss or gradient norm is not
finite leaves the parameters and optimizer state unchanged and is counted; after
``max_consecutive_nonfinite`` such steps in a row every later step is a no-op (the loop then
stops). All of it is ``jnp.where`` inside the step: no host round trip.

LoRA (``lora=True``): ``state.params["model"]`` holds only the adapters and the step's third
argument is the frozen base weights. The policy is ``base + adapters`` (gradients and optimizer
state for the adapters alone); the frozen reference is the same base with every adapter zero,
``y = x W``: no second copy of the weights.

Metrics: the objective's (``rewards/*``, ``logps/*``, ...), ``loss``, ``grad_norm`` (before
clipping), ``learning_rate`` (the schedule at the optimizer's count of applied updates),
``num_pairs``, ``num_tokens``, ``finite`` (1.0 when the loss and gradient norm are finite,
i.e. the update was not skipped for being non-finite), ``nonfinite_steps`` and
``consecutive_nonfinite`` (the guard's counters after this step).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxalign.losses.reductions import safe_ratio
from jaxalign.models.lora import adapters_off, join_adapters
from jaxalign.objectives import STEP_KEYS, Objective, unit_weight
from jaxalign.scoring.forward import Forward
from jaxalign.train.guard import guarded_state, inject_nan
from jaxalign.train.state import TrainState

__all__ = ["REFERENCE_MODES", "device_keys", "make_eval_step", "make_train_step", "reference_keys"]

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

REFERENCE_MODES = ("frozen", "precomputed", "none")
# The precomputed reference's batch keys, in sequence order (chosen, rejected, calibration).
_REFERENCE_KEYS = ("ref_chosen_logps", "ref_rejected_logps", "ref_calibration_logps")


def reference_keys(objective: Objective, reference_mode: str) -> tuple[str, ...]:
    """The batch keys that carry precomputed reference log-probs (none unless precomputed)."""
    if reference_mode not in REFERENCE_MODES:
        raise ValueError(f"reference.mode must be one of {', '.join(REFERENCE_MODES)}, got {reference_mode!r}")
    if not objective.uses_reference or reference_mode != "precomputed":
        return ()
    return _REFERENCE_KEYS[: objective.sequences_per_pair]


def device_keys(objective: Objective, reference_mode: str) -> tuple[str, ...]:
    """Every batch key the steps read: the step's own, the objective's, the reference's."""
    return (*STEP_KEYS, *objective.batch_keys, *reference_keys(objective, reference_mode))


def _reference_logps(
    objective: Objective, reference_mode: str, reference: Forward | None, reference_params: Any, batch: Batch
) -> jax.Array | None:
    """Reference sequence log-probs ``[S]`` of one micro-batch; None when the objective has none."""
    if not objective.uses_reference:
        return None
    if reference_mode == "frozen":
        _, sums, _ = reference.sequence_logps(reference_params, batch, objective.num_sequences(batch))
        return jax.lax.stop_gradient(sums)
    return jnp.concatenate([batch[k] for k in reference_keys(objective, reference_mode)]).astype(jnp.float32)


def _with_base(params: Any, base: Any) -> Any:
    """LoRA: the objective's parameters from the trained adapters and the frozen ``base``."""
    return params if base is None else {**params, "model": join_adapters(base, params["model"])}


def _reference_params(params: Any, reference_params: Any, lora: bool) -> Any:
    """The reference forward's parameters: the frozen copy, or (LoRA) the base with adapters off."""
    return adapters_off(reference_params, params["model"]) if lora else reference_params


def _micro_loss(objective: Objective, forward: Forward) -> Callable[..., tuple[jax.Array, tuple[Metrics, jax.Array]]]:
    """``(params, reference_sums, batch, base=None) -> (loss, (metrics, weight))`` for one
    micro-batch; ``base``: LoRA's frozen base weights (``params["model"]`` are the adapters)."""

    def loss_fn(params: Any, reference: jax.Array | None, batch: Batch, base: Any = None):
        loss, metrics = objective.loss_fn(forward, _with_base(params, base), batch, reference)
        return loss, (metrics, objective.weight(batch))

    return loss_fn


def _combine(values: jax.Array, shares: jax.Array) -> jax.Array:
    return jnp.sum(values.astype(jnp.float32) * shares)


def make_train_step(
    *,
    forward: Forward,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    reference_mode: str = "frozen",
    reference: Forward | None = None,
    donate: bool = True,
    state_shardings: Any = None,
    batch_sharding: Any = None,
    max_consecutive_nonfinite: int = 0,
    nan_at_steps: tuple[int, ...] = (),
    lora: bool = False,
) -> Callable[..., tuple[TrainState, Metrics]]:
    """The jitted step ``(state, batch, reference_params=None) -> (state, metrics)``.

    ``forward``: the policy's forward passes (graph and LM-head layout). ``reference_params``
    are the frozen reference's parameters (``reference_mode="frozen"``; ``reference`` defaults
    to ``forward``: same architecture). With ``donate`` the input state's buffers are reused
    for the output (do not use the old state afterwards). Optional ``state_shardings`` (a
    pytree of shardings matching the state) and ``batch_sharding`` pin the layouts; otherwise
    they follow the inputs. ``max_consecutive_nonfinite`` halts the guard (0 = never);
    ``nan_at_steps`` is the NaN-injection TEST HOOK (``inject_nan``). ``lora``: the third
    argument is the frozen base weights (module docstring), whatever the reference mode.
    """
    reference_keys(objective, reference_mode)  # checks the mode
    reference = forward if reference is None else reference
    grad_fn = jax.value_and_grad(_micro_loss(objective, forward), has_aux=True)

    def step(state: TrainState, batch: Batch, reference_params: Any = None) -> tuple[TrainState, Metrics]:
        total = objective.weight(batch)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)

        base = reference_params if lora else None
        ref_params = _reference_params(state.params, reference_params, lora)

        def body(grads: Any, micro: Batch):
            ref = _reference_logps(objective, reference_mode, reference, ref_params, micro)
            (loss, (metrics, weight)), g = grad_fn(state.params, ref, micro, base)
            share = safe_ratio(weight, total)
            grads = jax.tree.map(lambda acc, x: acc + share * x.astype(jnp.float32), grads, g)
            return grads, (loss, metrics, share)

        # One micro-batch: unrolled, no loop (cheaper to compile and run).
        unroll = batch["pair_mask"].shape[0] == 1
        grads, (losses_, metrics_, shares) = jax.lax.scan(body, zeros, batch, unroll=unroll)
        grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
        if nan_at_steps:
            grads = inject_nan(grads, state.step + 1, nan_at_steps)
        loss = _combine(losses_, shares)
        metrics = {k: _combine(v, shares) for k, v in metrics_.items()}
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        rng, _ = jax.random.split(state.rng)

        def update(grads: Any, opt_state: Any, params: Any) -> tuple[Any, Any]:
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state

        new_state = guarded_state(state, update, grads, rng, finite, max_consecutive_nonfinite)
        metrics.update(
            loss=loss,
            grad_norm=grad_norm,
            learning_rate=jnp.asarray(schedule(state.step - state.nonfinite_steps), jnp.float32),
            num_pairs=jnp.sum(batch["pair_mask"].astype(jnp.float32)),
            num_tokens=unit_weight("tokens", batch),
            finite=finite.astype(jnp.float32),
            nonfinite_steps=new_state.nonfinite_steps.astype(jnp.float32),
            consecutive_nonfinite=new_state.consecutive_nonfinite.astype(jnp.float32),
        )
        return new_state, metrics

    jit_kwargs: dict[str, Any] = {"donate_argnums": (0,) if donate else ()}
    if state_shardings is not None:
        jit_kwargs["in_shardings"] = (state_shardings, batch_sharding, None)
        jit_kwargs["out_shardings"] = (state_shardings, None)
    return jax.jit(step, **jit_kwargs)


def make_eval_step(
    *,
    forward: Forward,
    objective: Objective,
    reference_mode: str = "frozen",
    reference: Forward | None = None,
    lora: bool = False,
) -> Callable[..., Metrics]:
    """The jitted ``(params, batch, reference_params=None) -> metrics`` on one plain batch.

    Metrics are the objective's and ``loss``, as weighted means over the batch's units (real
    pairs, or tokens), plus ``weight`` (that count) so that the caller can average over
    batches: ``sum_b weight_b * m_b / sum_b weight_b``. ``lora``: as in ``make_train_step``.
    """
    reference_keys(objective, reference_mode)
    reference = forward if reference is None else reference
    loss_fn = _micro_loss(objective, forward)

    def evaluate(params: Any, batch: Batch, reference_params: Any = None) -> Metrics:
        ref = _reference_logps(objective, reference_mode, reference, _reference_params(params, reference_params, lora),
                               batch)
        loss, (metrics, weight) = loss_fn(params, ref, batch, reference_params if lora else None)
        return {**metrics, "loss": loss, "weight": weight}

    return jax.jit(evaluate)
