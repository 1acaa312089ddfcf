"""Per-token and per-sequence log-probs, label-aligned, in float32.

Shift convention (docs/architecture.md): the model's logits at position ``t`` score the token
at position ``t + 1``. Every per-token array returned here is **label-aligned**:

    token_logps[r, t] = log p(input_ids[r, t] | input_ids[r, :t]) = log_softmax(logits[r, t - 1])[input_ids[r, t]]

Position 0 of a row, and with ``segment_ids`` the first token of every packed segment, is never
scored: its value is 0. Results are float32 whatever the logits' dtype (float64 when x64 is
enabled and the inputs are float64).

Chunked forms (``chunk_size``) process the sequence in chunks with ``lax.map`` and recompute
each chunk in the backward pass (``jax.checkpoint``), so neither pass holds a float32
``[batch, length, vocab]`` array; ``token_logps_from_hidden`` also never holds the full logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxalign.losses._checks import compute_dtype
from jaxalign.precision import mixed_einsum


def _check_ids(name: str, input_ids: jax.Array, leading: tuple[int, ...]) -> None:
    if tuple(input_ids.shape) != leading:
        raise ValueError(f"losses.{name}: input_ids must have shape {list(leading)}, got {list(input_ids.shape)}")
    if not jnp.issubdtype(input_ids.dtype, jnp.integer):
        raise ValueError(f"losses.{name}: input_ids must be integer token ids, got dtype {input_ids.dtype}")


def _check_chunk_size(name: str, chunk_size: int) -> None:
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"losses.{name}: chunk_size must be a positive int, got {chunk_size!r}")


def _next_tokens(input_ids: jax.Array) -> jax.Array:
    """``next[:, t] = input_ids[:, t + 1]``; the last column (nothing to predict) is 0."""
    return jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)


def _label_align(name: str, predicted: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """Moves ``predicted[:, t] = log p(token t+1)`` to label position ``t + 1``; 0 on unscored tokens."""
    aligned = jnp.concatenate([jnp.zeros_like(predicted[:, :1]), predicted[:, :-1]], axis=1)
    if segment_ids is None:
        return aligned
    if tuple(segment_ids.shape) != tuple(aligned.shape):
        raise ValueError(
            f"losses.{name}: segment_ids must have shape {list(aligned.shape)}, got {list(segment_ids.shape)}"
        )
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], dtype=bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return jnp.where(starts, jnp.zeros_like(aligned), aligned)


def _gather_logps(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """``log_softmax(logits)[labels]`` over the last axis, in the compute dtype."""
    logits = logits.astype(compute_dtype(logits))
    picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def _map_over_sequence(
    fn: Callable[..., jax.Array], sequences: tuple[jax.Array, ...], chunk_size: int, active: jax.Array | None = None
) -> jax.Array:
    """Applies ``fn`` to chunks of ``chunk_size`` positions (axis 1), one at a time.

    Every array in ``sequences`` is ``[B, L, ...]``; ``fn`` maps chunks ``[B, C, ...]`` to
    ``[B, C]``. Each chunk is rematerialised in the backward pass. With ``active`` (a scalar
    position count) only chunks starting below it run; the others give 0, skipped by
    ``lax.cond`` in both passes.
    """
    batch, length = sequences[0].shape[:2]
    num_chunks = -(-length // chunk_size)
    padded = num_chunks * chunk_size

    def to_chunks(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, [(0, 0), (0, padded - length)] + [(0, 0)] * (x.ndim - 2))
        x = x.reshape((batch, num_chunks, chunk_size) + x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    chunks = tuple(to_chunks(x) for x in sequences)
    if active is None:
        out = jax.lax.map(lambda chunk: jax.checkpoint(fn)(*chunk), chunks)
    else:
        starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size

        def run_or_skip(start: jax.Array, *chunk: jax.Array) -> jax.Array:
            skip = lambda *_: jnp.zeros((batch, chunk_size), jax.eval_shape(fn, *chunk).dtype)
            return jax.lax.cond(start < active, fn, skip, *chunk)

        out = jax.lax.map(lambda xs: jax.checkpoint(run_or_skip)(*xs), (starts, *chunks))
    return jnp.moveaxis(out, 0, 1).reshape(batch, padded)[:, :length]


def token_logps(
    logits: jax.Array,
    input_ids: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    chunk_size: int | None = None,
) -> jax.Array:
    """Label-aligned per-token log-probs ``[B, L]`` from logits ``[B, L, V]`` (any float dtype).

    With ``chunk_size`` the float32 log-softmax is computed ``chunk_size`` positions at a time
    (also in the backward pass), never over the whole ``[B, L, V]``; the result is the same.
    """
    if logits.ndim != 3:
        raise ValueError(f"losses.token_logps: logits must be [batch, length, vocab], got shape {list(logits.shape)}")
    _check_ids("token_logps", input_ids, tuple(logits.shape[:2]))
    labels = _next_tokens(input_ids)
    if chunk_size is None:
        predicted = _gather_logps(logits, labels)
    else:
        _check_chunk_size("token_logps", chunk_size)
        predicted = _map_over_sequence(_gather_logps, (logits, labels), chunk_size)
    return _label_align("token_logps", predicted, segment_ids)


def token_logps_from_hidden(
    hidden: jax.Array,
    unembedding: jax.Array,
    input_ids: jax.Array,
    *,
    chunk_size: int,
    segment_ids: jax.Array | None = None,
    loss_mask: jax.Array | None = None,
    row_groups: int | None = None,
) -> jax.Array:
    """Label-aligned per-token log-probs ``[B, L]`` from final hidden states, in chunks.

    ``logits = hidden @ unembedding`` (``[B, L, D] @ [D, V]``, accumulated in float32) is only
    ever formed for ``chunk_size`` positions at a time, in the forward and the backward pass, so
    the memory peak is ``O(B * chunk_size * V)`` instead of ``O(B * L * V)``. With bfloat16 (or
    float16) hidden states the product runs in that dtype (``mixed_einsum``); pass a float32
    ``unembedding`` to have its gradient accumulated over the chunks in float32.

    With ``loss_mask`` only the tokens it scores (``loss_mask > 0``) are computed; every other
    token gets 0. The predicting positions are stably sorted so that the scored ones come
    first, and only the chunks below the largest count run (``lax.cond``, decided on the
    device: shapes stay static). The sort is within each row (``row_groups=None``), or within
    each of ``row_groups`` groups of consecutive rows, whose positions then form one sequence
    (``chunk_size`` positions per group and chunk): with rows split over devices, one group
    per device keeps the gathers on their devices, and fewer groups waste fewer positions on
    the rows with fewer scored tokens than the fullest. For DPO, where the completions are
    about a third of the tokens, this skips most of the unembedding, the largest matmul of a
    small model's step. Where ``loss_mask > 0`` values and gradients equal those without it.
    """
    if hidden.ndim != 3 or unembedding.ndim != 2 or hidden.shape[-1] != unembedding.shape[0]:
        raise ValueError(
            "losses.token_logps_from_hidden: need hidden [batch, length, d_model] and unembedding "
            f"[d_model, vocab], got {list(hidden.shape)} and {list(unembedding.shape)}"
        )
    _check_ids("token_logps_from_hidden", input_ids, tuple(hidden.shape[:2]))
    _check_chunk_size("token_logps_from_hidden", chunk_size)
    dtype = compute_dtype(hidden, unembedding)

    def chunk_logps(hidden_chunk: jax.Array, labels_chunk: jax.Array) -> jax.Array:
        # The log-softmax runs on the chunk's B * C positions flattened. The product, on
        # XLA:CPU: in float32 one 2-D matmul is ~1.2x faster than [B, C, D] x [D, V]; in
        # bfloat16 keeping [B, C, D] gives the weight gradient two contracted dims, the form
        # that reaches the bfloat16 (AMX) kernels (3x faster than the 2-D form).
        # Low-precision hidden states: the unembedding is cast here, per chunk, so that its
        # gradient is summed over the chunks in the unembedding's own dtype (float32 master
        # weights stay float32; a cast before the loop would sum it in bfloat16).
        if jnp.dtype(hidden_chunk.dtype).itemsize < 4:
            weight = unembedding.astype(hidden_chunk.dtype)
            logits = mixed_einsum("bcd,dv->bcv", hidden_chunk, weight).reshape(-1, unembedding.shape[-1])
        else:
            flat = hidden_chunk.reshape(-1, hidden_chunk.shape[-1])
            logits = jnp.einsum("nd,dv->nv", flat, unembedding, preferred_element_type=dtype)
        return _gather_logps(logits, labels_chunk.reshape(-1)).reshape(labels_chunk.shape)

    labels = _next_tokens(input_ids)
    if loss_mask is None:
        predicted = _map_over_sequence(chunk_logps, (hidden, labels), chunk_size)
    else:
        if tuple(loss_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"losses.token_logps_from_hidden: loss_mask must have shape {list(input_ids.shape)}, "
                f"got {list(loss_mask.shape)}"
            )
        scored = _next_tokens(loss_mask) > 0
        rows, length = scored.shape
        groups = rows if row_groups is None else math.gcd(rows, row_groups)

        def grouped(x: jax.Array) -> jax.Array:  # [B, L, ...] -> [G, B / G * L, ...]
            return x.reshape((groups, rows // groups * length) + x.shape[2:])

        scored_by_group = grouped(scored)
        order = jnp.argsort(jnp.logical_not(scored_by_group), axis=1, stable=True)
        count = jnp.max(jnp.sum(scored_by_group, axis=1, dtype=jnp.int32))
        # Gathers along the group axis keep it: a batch whose groups sit on devices stays there.
        sorted_hidden = jnp.take_along_axis(grouped(hidden), order[..., None], axis=1)
        sorted_labels = jnp.take_along_axis(grouped(labels), order, axis=1)
        by_rank = _map_over_sequence(chunk_logps, (sorted_hidden, sorted_labels), chunk_size, active=count)
        predicted = jnp.take_along_axis(by_rank, jnp.argsort(order, axis=1), axis=1).reshape(rows, length)
        predicted = jnp.where(scored, predicted, jnp.zeros_like(predicted))
    return _label_align("token_logps_from_hidden", predicted, segment_ids)


def align_logits_to_labels(logits: jax.Array) -> jax.Array:
    """Shifts model logits ``[..., L, V]`` right by one so that row ``t`` scores token ``t``.

    ``aligned[..., t, :] = logits[..., t - 1, :]`` and ``aligned[..., 0, :] = 0`` (position 0 is
    never scored). This is the layout ``topk_kl``, ``dckd`` and ``adpa`` expect, matching the
    label-aligned teacher arrays of the batch.
    """
    pad = [(0, 0)] * (logits.ndim - 2) + [(1, 0), (0, 0)]
    return jnp.pad(logits[..., :-1, :], pad)


def sequence_logps(token_logps: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-row masked sums and token counts: ``(sum_t m_t * logp_t, sum_t m_t)``, each ``[B]``."""
    if token_logps.shape != loss_mask.shape:
        raise ValueError(
            f"losses.sequence_logps: token_logps {list(token_logps.shape)} and loss_mask "
            f"{list(loss_mask.shape)} must have the same shape"
        )
    mask = loss_mask.astype(token_logps.dtype)
    return jnp.sum(token_logps * mask, axis=-1), jnp.sum(mask, axis=-1)


def segment_logps(
    token_logps: jax.Array, loss_mask: jax.Array, sequence_ids: jax.Array, *, num_sequences: int
) -> tuple[jax.Array, jax.Array]:
    """Per-sequence masked sums and token counts ``[num_sequences]`` for padded or packed rows.

    ``sequence_ids[r, t]`` names the sequence token ``t`` of row ``r`` belongs to (-1 on
    padding, which is ignored); for a preference batch chosen ``p`` is ``p`` and rejected ``p``
    is ``P + p`` (docs/architecture.md), so ``num_sequences = 2 * P``.
    """
    if not (token_logps.shape == loss_mask.shape == sequence_ids.shape):
        raise ValueError(
            f"losses.segment_logps: token_logps {list(token_logps.shape)}, loss_mask {list(loss_mask.shape)} "
            f"and sequence_ids {list(sequence_ids.shape)} must have the same shape"
        )
    valid = sequence_ids >= 0
    ids = jnp.where(valid, sequence_ids, 0).reshape(-1)
    mask = jnp.where(valid, loss_mask.astype(token_logps.dtype), 0)
    sums = jax.ops.segment_sum((token_logps * mask).reshape(-1), ids, num_segments=num_sequences)
    counts = jax.ops.segment_sum(mask.reshape(-1), ids, num_segments=num_sequences)
    return sums, counts
