"""A teacher's top-k next-token distribution and a model's log-probs at given candidate tokens,
label-aligned, computed chunk by chunk through the unembedding.

For a batch (docs/architecture.md) of ``R`` rows of ``L`` tokens, vocabulary ``V``, at each
scored token ``t`` (``loss_mask[t] > 0``, not the first token of its segment), with
``logp_t = log_softmax(logits[t - 1])`` (temperature 1, float32):

* ``teacher_topk``: ``ids[t] = top_k(logp_t)`` (most probable first) and
  ``probs[t] = exp(logp_t[ids[t]])``: int32 and float32 ``[R, L, K]``;
* ``candidate_logps``: ``logp_t[ids[t, j]]`` for given ``ids [R, L, K]``: float32 ``[R, L, K]``.

Both are 0 at every other position (prompt, padding, segment starts). As in
``Forward.token_logps``, only the scored positions go through the unembedding, ranked first
within each of the forward's row groups, ``chunk`` positions at a time (``lax.map``; chunks past
the largest count are skipped, each chunk is recomputed in the backward pass), so no
``[R, L, V]`` array exists: the peak is one chunk's ``[positions, V]`` logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxalign.precision import mixed_einsum
from jaxalign.scoring.forward import Forward, logits_chunk_size

__all__ = ["candidate_logps", "candidate_logps_fn", "teacher_topk", "teacher_topk_fn"]

Batch = dict[str, jax.Array]
ChunkFn = Callable[..., tuple[jax.Array, ...]]


def _scored(batch: Batch) -> jax.Array:
    """Label-aligned bool ``[R, L]``: ``loss_mask > 0`` and not the first token of a segment."""
    segments = batch["segment_ids"]
    starts = jnp.concatenate([jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    return (batch["loss_mask"] > 0) & ~starts


def _shift(x: jax.Array, right: bool) -> jax.Array:
    """Moves axis 1 by one position (right: ``out[t] = x[t - 1]``; left: ``out[t] = x[t + 1]``), filling 0."""
    zero = jnp.zeros_like(x[:, :1])
    return jnp.concatenate([zero, x[:, :-1]], axis=1) if right else jnp.concatenate([x[:, 1:], zero], axis=1)


def _log_softmax(hidden: jax.Array, unembedding: jax.Array) -> jax.Array:
    """Float32 ``log_softmax(hidden @ unembedding)`` ``[N, V]`` of hidden states ``[N, D]``; a
    low-precision product runs in its dtype with float32 accumulation (``mixed_einsum``)."""
    dtype = jnp.promote_types(jnp.float32, jnp.promote_types(hidden.dtype, unembedding.dtype))
    if jnp.dtype(hidden.dtype).itemsize < 4:
        logits = mixed_einsum("nd,dv->nv", hidden, unembedding.astype(hidden.dtype))
    else:
        logits = jnp.einsum("nd,dv->nv", hidden, unembedding, preferred_element_type=dtype)
    logits = logits.astype(dtype)
    return logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)


def _at_scored(fn: ChunkFn, forward: Forward, params: Any, batch: Batch,
               per_token: tuple[jax.Array, ...] = ()) -> tuple[jax.Array, ...]:
    """``fn(logps [N, V], *per_token [N, ...]) -> ([N, ...], ...)`` at every scored token of
    ``batch`` (label-aligned, see the module docstring), 0 elsewhere; ``per_token`` are
    label-aligned ``[R, L, ...]`` inputs of ``fn``."""
    hidden, model = forward.hidden_states(params, batch)
    unembedding = model.unembedding(dtype=model.config.param_dtype)  # cast per chunk: gradient summed in param_dtype
    rows, length = batch["input_ids"].shape
    scored = _scored(batch)
    groups = math.gcd(rows, forward.row_groups)
    per_group = rows // groups * length
    size = logits_chunk_size(groups, per_group, unembedding.shape[-1], forward.chunk * (rows // groups))
    num_chunks = -(-per_group // size)

    def grouped(x: jax.Array) -> jax.Array:  # [R, L, ...] -> [G, R / G * L, ...]
        return x.reshape((groups, per_group) + x.shape[2:])

    def along(index: jax.Array, x: jax.Array) -> jax.Array:  # gathers axis 1 of [G, N, ...]
        return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)

    def to_chunks(x: jax.Array) -> jax.Array:  # [G, N, ...] -> [chunks, G, size, ...]
        x = jnp.pad(x, [(0, 0), (0, num_chunks * size - per_group)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((groups, num_chunks, size) + x.shape[2:]), 1, 0)

    # Position t - 1 predicts token t: the inputs move to the predicting positions, scored ones first.
    predicting = grouped(_shift(scored, right=False))
    order = jnp.argsort(~predicting, axis=1, stable=True)
    count = jnp.max(jnp.sum(predicting, axis=1, dtype=jnp.int32))
    inputs = [to_chunks(along(order, grouped(x))) for x in (hidden, *(_shift(x, right=False) for x in per_token))]

    def run(h: jax.Array, *xs: jax.Array) -> tuple[jax.Array, ...]:
        flat = (x.reshape((-1,) + x.shape[2:]) for x in xs)
        out = fn(_log_softmax(h.reshape(-1, h.shape[-1]), unembedding), *flat)
        return tuple(o.reshape((groups, size) + o.shape[1:]) for o in out)

    shapes = jax.eval_shape(run, *(x[0] for x in inputs))

    def run_or_skip(start: jax.Array, *xs: jax.Array) -> tuple[jax.Array, ...]:
        skip = lambda *_: tuple(jnp.zeros(s.shape, s.dtype) for s in shapes)
        return jax.lax.cond(start < count, run, skip, *xs)

    starts = jnp.arange(num_chunks, dtype=jnp.int32) * size
    outs = jax.lax.map(lambda xs: jax.checkpoint(run_or_skip)(*xs), (starts, *inputs))
    inverse = jnp.argsort(order, axis=1)
    results = []
    for out in outs:  # [chunks, G, size, ...] -> label-aligned [R, L, ...]
        out = jnp.moveaxis(out, 0, 1).reshape((groups, num_chunks * size) + out.shape[3:])[:, :per_group]
        out = _shift(along(inverse, out).reshape((rows, length) + out.shape[2:]), right=True)
        results.append(jnp.where(scored.reshape(scored.shape + (1,) * (out.ndim - 2)), out, jnp.zeros_like(out)))
    return tuple(results)


def teacher_topk(forward: Forward, params: Any, batch: Batch, k: int) -> tuple[jax.Array, jax.Array]:
    """The model's ``k`` most probable next tokens at each scored token and their
    probabilities: ``(ids int32 [R, L, k], probs float32 [R, L, k])``, label-aligned, most
    probable first, 0 where not scored (module docstring)."""

    def topk(logps: jax.Array) -> tuple[jax.Array, jax.Array]:
        if not 1 <= k <= logps.shape[-1]:
            raise ValueError(f"teacher_topk: k = {k} must be in [1, vocab_size = {logps.shape[-1]}]")
        values, ids = jax.lax.top_k(logps, k)
        return ids.astype(jnp.int32), jnp.exp(values)

    ids, probs = _at_scored(topk, forward, params, batch)
    return ids, probs


def candidate_logps(forward: Forward, params: Any, batch: Batch, ids: jax.Array) -> jax.Array:
    """The model's float32 log-probs ``log_softmax(logits[t - 1])[ids[t, j]]`` ``[R, L, K]`` of
    candidate tokens ``ids`` (int ``[R, L, K]``, label-aligned), 0 where not scored; gradients
    flow to ``params``."""
    if ids.shape[:2] != batch["input_ids"].shape or ids.ndim != 3 or not jnp.issubdtype(ids.dtype, jnp.integer):
        raise ValueError(f"candidate_logps: ids must be integer [R, L, K] with [R, L] = "
                         f"{list(batch['input_ids'].shape)}, got {ids.dtype} {list(ids.shape)}")
    return _at_scored(lambda logps, c: (jnp.take_along_axis(logps, c, axis=-1),), forward, params, batch, (ids,))[0]


def teacher_topk_fn(forward: Forward, k: int) -> Callable[[Any, Batch], tuple[jax.Array, jax.Array]]:
    """The jitted ``(params, batch) -> teacher_topk(forward, params, batch, k)``: one teacher pass."""
    return jax.jit(lambda params, batch: teacher_topk(forward, params, batch, k))


def candidate_logps_fn(forward: Forward, ids_key: str) -> Callable[[Any, Batch], jax.Array]:
    """The jitted ``(params, batch) -> candidate_logps(forward, params, batch, batch[ids_key])``."""
    return jax.jit(lambda params, batch: candidate_logps(forward, params, batch, batch[ids_key]))
