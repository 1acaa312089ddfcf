"""The one jitted train step shared by every loss, its eval twin, and the reference forward.

``train_step(state, batch) -> (state, metrics)``. The batch follows the batch contract of
docs/architecture.md with one extra leading axis ``A`` (the gradient-accumulation
micro-batches): every array is ``[A, ...]`` and each micro-batch ``a`` is a complete batch of
``P`` pairs. Per micro-batch the step runs the policy once over all rows (chosen and rejected
together), turns hidden states into float32 per-token log-probs chunk by chunk, reduces them
to per-sequence sums over ``sequence_ids``, gets reference log-probs (frozen params in the
same step under ``stop_gradient``, the batch's precomputed ``ref_*_logps``, or zeros) and
calls the objective.

Gradient accumulation (``lax.scan`` over ``A``): with ``w_a`` the number of real pairs (or,
for token-mean losses, real tokens) of micro-batch ``a`` and ``W = sum_a w_a``,

    loss = sum_a (w_a / W) * loss_a,   grads = sum_a (w_a / W) * grad loss_a,

and each metric is combined the same way. Since each ``loss_a`` is a weighted mean over its
own pairs (``weights = pair_mask``) or tokens, ``loss`` is exactly the mean over the global
batch's pairs (tokens), whatever ``A`` is. Then: global-norm clipping and the optax update.

Non-finite guard (``jaxalign.train.guard``): a step whose loss or gradient norm is not
finite leaves the parameters and optimizer state unchanged and is counted; after
``max_consecutive_nonfinite`` such steps in a row every later step is a no-op (the loop then
stops). All of it is ``jnp.where`` inside the step: no host round trip.

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
import numpy as np
import optax
from flax import nnx

from jaxalign.data.batching import pad_batch
from jaxalign.losses.reductions import safe_ratio
from jaxalign.train import forward
from jaxalign.train.guard import guarded_state, inject_nan
from jaxalign.train.objectives import Objective, reward_loss, real_token_mask, sft_loss
from jaxalign.train.state import TrainState

__all__ = ["make_eval_step", "make_reference_fn", "make_train_step", "stack_micro_batches"]

Batch = dict[str, jax.Array]
Metrics = dict[str, jax.Array]

REFERENCE_KEYS = ("ref_chosen_logps", "ref_rejected_logps", "ref_calibration_logps")


def stack_micro_batches(batches: list[dict[str, Any]], pad_id: int = 0) -> dict[str, Any]:
    """Stacks ``A`` micro-batches (same keys) into one ``[A, ...]`` step batch, their token
    arrays first padded to the largest rows and length among them (``pad_batch``: padded
    batches differ in length, packed ones in rows; empty positions change no sum)."""
    keys = batches[0].keys()
    for i, b in enumerate(batches):
        if b.keys() != keys:
            raise ValueError(f"micro-batch {i} has keys {sorted(b)}, expected {sorted(keys)}")
    rows = max(b["input_ids"].shape[0] for b in batches)
    length = max(b["input_ids"].shape[1] for b in batches)
    batches = [pad_batch(b, rows=rows, length=length, pad_id=pad_id) for b in batches]
    return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in keys}


def _num_sequences(objective: Objective, batch: Batch) -> int:
    return objective.sequences_per_pair * batch["pair_mask"].shape[0]


def _reference_logps(
    objective: Objective,
    reference_mode: str,
    reference_graphdef: nnx.GraphDef | None,
    reference_params: Any,
    batch: Batch,
    chunk: int,
    row_groups: int,
) -> jax.Array:
    """Reference sequence log-probs ``[S]`` for one micro-batch (zeros when unused)."""
    s = _num_sequences(objective, batch)
    if objective.kind != "pairwise" or reference_mode == "none":
        return jnp.zeros((s,), jnp.float32)
    if reference_mode == "frozen":
        _, sums, _ = forward.sequence_logps(reference_graphdef, reference_params, batch, num_sequences=s, chunk=chunk,
                                            row_groups=row_groups)
        return jax.lax.stop_gradient(sums)
    if reference_mode == "precomputed":
        parts = [batch[k] for k in REFERENCE_KEYS[: objective.sequences_per_pair]]
        return jnp.concatenate(parts).astype(jnp.float32)
    raise ValueError(f"reference.mode must be frozen, precomputed or none, got {reference_mode!r}")


def _micro_loss(
    objective: Objective, graphdef: nnx.GraphDef, chunk: int, row_groups: int
) -> Callable[[Any, jax.Array, Batch], tuple[jax.Array, tuple[Metrics, jax.Array]]]:
    """``(params, reference_sums, batch) -> (loss, (metrics, weight))`` for one micro-batch."""

    def loss_fn(params: Any, reference: jax.Array, batch: Batch):
        s = _num_sequences(objective, batch)
        pair_mask = batch["pair_mask"].astype(jnp.float32)
        if objective.kind == "pairwise":
            _, sums, counts = forward.sequence_logps(graphdef, params["model"], batch, num_sequences=s, chunk=chunk,
                                                     row_groups=row_groups)
            loss, metrics = objective.pairwise_fn(sums, counts, reference, pair_mask)
            weight = jnp.sum(pair_mask)
        elif objective.kind == "sft":
            tokens = forward.token_logps(graphdef, params["model"], batch, chunk=chunk, row_groups=row_groups)
            mask = real_token_mask(batch)
            loss, metrics = sft_loss(tokens, mask)
            weight = jnp.sum(mask)
        else:
            rewards = forward.sequence_rewards(graphdef, params["model"], params["head"], batch, num_sequences=s)
            loss, metrics = reward_loss(objective, rewards, pair_mask)
            weight = jnp.sum(pair_mask)
        return loss, (metrics, weight)

    return loss_fn


def _global_weight(objective: Objective, batch: Batch) -> jax.Array:
    """``W``: real pairs (or real tokens for token-mean losses) of the whole ``[A, ...]`` batch."""
    if objective.unit == "tokens":
        return jnp.sum(jax.vmap(real_token_mask)(batch))
    return jnp.sum(batch["pair_mask"].astype(jnp.float32))


def _combine(values: jax.Array, shares: jax.Array) -> jax.Array:
    return jnp.sum(values.astype(jnp.float32) * shares)


def make_train_step(
    *,
    graphdef: nnx.GraphDef,
    objective: Objective,
    optimizer: optax.GradientTransformation,
    schedule: optax.Schedule,
    reference_mode: str = "frozen",
    reference_graphdef: nnx.GraphDef | None = None,
    logits_chunk: int = 0,
    row_groups: int = 1,
    donate: bool = True,
    state_shardings: Any = None,
    batch_sharding: Any = None,
    max_consecutive_nonfinite: int = 0,
    nan_at_steps: tuple[int, ...] = (),
) -> Callable[..., tuple[TrainState, Metrics]]:
    """The jitted step ``(state, batch, reference_params=None) -> (state, metrics)``.

    ``reference_params`` are the frozen reference's parameters (``reference.mode="frozen"``;
    ``reference_graphdef`` defaults to the policy's). With ``donate`` the input state's
    buffers are reused for the output (do not use the old state afterwards). Optional
    ``state_shardings`` (a pytree of shardings matching the state) and ``batch_sharding``
    pin the layouts; otherwise they follow the inputs. ``max_consecutive_nonfinite`` halts
    the guard (0 = never); ``nan_at_steps`` is the NaN-injection TEST HOOK (``inject_nan``).
    ``logits_chunk`` and ``row_groups`` (the devices that split a batch's rows) lay out the LM
    head (``forward.token_logps``).
    """
    reference_graphdef = graphdef if reference_graphdef is None else reference_graphdef
    loss_fn = _micro_loss(objective, graphdef, logits_chunk, row_groups)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch: Batch, reference_params: Any = None) -> tuple[TrainState, Metrics]:
        total = _global_weight(objective, batch)
        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)

        def body(grads: Any, micro: Batch):
            reference = _reference_logps(
                objective, reference_mode, reference_graphdef, reference_params, micro, logits_chunk, row_groups
            )
            (loss, (metrics, weight)), g = grad_fn(state.params, reference, micro)
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
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        rng, _ = jax.random.split(state.rng)
        new_state = guarded_state(state, params, opt_state, rng, finite, max_consecutive_nonfinite)
        metrics.update(
            loss=loss,
            grad_norm=grad_norm,
            learning_rate=jnp.asarray(schedule(state.step - state.nonfinite_steps), jnp.float32),
            num_pairs=jnp.sum(batch["pair_mask"].astype(jnp.float32)),
            num_tokens=jnp.sum(jax.vmap(real_token_mask)(batch)),
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
    graphdef: nnx.GraphDef,
    objective: Objective,
    reference_mode: str = "frozen",
    reference_graphdef: nnx.GraphDef | None = None,
    logits_chunk: int = 0,
    row_groups: int = 1,
) -> Callable[..., Metrics]:
    """The jitted ``(params, batch, reference_params=None) -> metrics`` on one plain batch.

    Metrics are the objective's and ``loss``, as weighted means over the batch's real pairs
    (tokens for SFT), plus ``weight`` (that count) so that the caller can average over
    batches: ``sum_b weight_b * m_b / sum_b weight_b``.
    """
    reference_graphdef = graphdef if reference_graphdef is None else reference_graphdef
    loss_fn = _micro_loss(objective, graphdef, logits_chunk, row_groups)

    def evaluate(params: Any, batch: Batch, reference_params: Any = None) -> Metrics:
        reference = _reference_logps(objective, reference_mode, reference_graphdef, reference_params, batch,
                                     logits_chunk, row_groups)
        loss, (metrics, weight) = loss_fn(params, reference, batch)
        return {**metrics, "loss": loss, "weight": weight}

    return jax.jit(evaluate)


def make_reference_fn(
    *, graphdef: nnx.GraphDef, sequences_per_pair: int = 2, logits_chunk: int = 0, row_groups: int = 1
) -> Callable[[Any, Batch], jax.Array]:
    """The jitted ``(params, batch) -> sequence log-prob sums [sequences_per_pair * P]``.

    The same forward the train step runs for a frozen reference; used to precompute the
    reference log-prob cache.
    """

    def reference(params: Any, batch: Batch) -> jax.Array:
        s = sequences_per_pair * batch["pair_mask"].shape[0]
        _, sums, _ = forward.sequence_logps(graphdef, params, batch, num_sequences=s, chunk=logits_chunk,
                                            row_groups=row_groups)
        return sums

    return jax.jit(reference)
