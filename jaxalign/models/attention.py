"""Masked multi-head attention with grouped key/value heads, and the position/segment helpers.

Masking rule (docs/architecture.md): query ``q`` may attend key ``k`` when ``k`` is not after
``q`` in the row (or the cache), both carry the same non-zero segment id, and, with a sliding
window ``W``, ``pos(q) - pos(k) < W``. Padding has segment id 0 and sees nothing (its output is
finite but meaningless); packed sequences never see each other.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Position of each token inside its contiguous run of equal segment ids (0 on padding)."""
    idx = jnp.arange(segment_ids.shape[-1], dtype=jnp.int32)
    previous = jnp.pad(segment_ids[..., :-1], [(0, 0)] * (segment_ids.ndim - 1) + [(1, 0)], constant_values=-1)
    run_start = jax.lax.cummax(jnp.where(segment_ids != previous, idx, 0), axis=segment_ids.ndim - 1)
    return jnp.where(segment_ids != 0, idx - run_start, 0).astype(jnp.int32)


def resolve_positions_and_segments(
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    positions: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Fill in ``positions``/``segment_ids`` [B, L] the caller did not give.

    Without ``segment_ids``: 1 where ``attention_mask`` is set (everywhere without a mask), 0
    elsewhere; with both, the mask zeroes segment ids. Without ``positions``: the index of the
    token in its segment, so left and right padding give the same positions to real tokens.
    """
    if segment_ids is None:
        mask = jnp.ones(input_ids.shape, jnp.int32) if attention_mask is None else attention_mask
        segment_ids = (jnp.asarray(mask) != 0).astype(jnp.int32)
    else:
        segment_ids = jnp.asarray(segment_ids, jnp.int32)
        if attention_mask is not None:
            segment_ids = jnp.where(jnp.asarray(attention_mask) != 0, segment_ids, 0)
    if positions is None:
        positions = positions_from_segments(segment_ids)
    return jnp.asarray(positions, jnp.int32), segment_ids


def make_attention_mask(
    q_index: jax.Array,
    k_index: jax.Array,
    q_segments: jax.Array,
    k_segments: jax.Array,
    q_positions: jax.Array,
    k_positions: jax.Array,
    sliding_window: int | None = None,
) -> jax.Array:
    """Boolean ``[B, Lq, Lk]`` mask. ``*_index`` are slot indices ``[Lq]``/``[Lk]`` for causality."""
    causal = k_index[None, None, :] <= q_index[None, :, None]
    same = (q_segments[:, :, None] == k_segments[:, None, :]) & (q_segments[:, :, None] != 0)
    mask = causal & same
    if sliding_window is not None:
        mask &= (q_positions[:, :, None] - k_positions[:, None, :]) < sliding_window
    return mask


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, *, query_block: int = 0,
    head_major: bool = False,
) -> jax.Array:
    """``softmax(q k^T * scale, masked) v`` with ``q [B, Lq, H, Dh]``, ``k, v [B, Lk, KV, Dh]``
    (``head_major``: ``[B, KV, Lk, Dh]``, the KV cache's layout).

    Query head ``h`` uses key/value head ``h // (H / KV)`` (HF's ``repeat_kv`` order). Scores and
    the softmax are float32; masked scores are the float32 minimum, so a fully masked (padding)
    query gets a finite average of the values it is shown.

    ``query_block > 0`` is for queries and keys at the same slots (a training or scoring
    forward, ``Lq == Lk``): queries are then taken ``query_block`` at a time and each block
    attends only to the keys up to its own last slot. The causal rule masks every later key
    anyway, so real queries get the same result while about half of the ``[B, H, L, L]``
    score matrix is never formed, and each block's scores stay small enough for the cache.
    """
    if head_major:
        return _attention(q, k, v, mask, scale, head_major=True)
    lq, lk = q.shape[1], k.shape[1]
    if query_block <= 0 or lq != lk or lq <= query_block:
        return _attention(q, k, v, mask, scale)
    outs = []
    for start in range(0, lq, query_block):
        end = min(start + query_block, lq)
        outs.append(_attention(q[:, start:end], k[:, :end], v[:, :end], mask[:, start:end, :end], scale))
    return jnp.concatenate(outs, axis=1)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
               head_major: bool = False) -> jax.Array:
    """One masked attention over all the given keys. The weights ``exp(s - max s)`` are left
    unnormalised through the value product and the output is divided by their sum after it:
    one pass less over the ``[B, H, Lq, Lk]`` scores than normalising them first (the max is
    a constant shift, so it carries no gradient)."""
    head_axis, kv = (1, "bhkd") if head_major else (2, "bkhd")
    groups = q.shape[2] // k.shape[head_axis]
    if groups > 1:  # HF's repeat_kv: query head h reads key/value head h // groups
        k, v = jnp.repeat(k, groups, axis=head_axis), jnp.repeat(v, groups, axis=head_axis)
    scores = jnp.einsum(f"bqhd,{kv}->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, :, :], scores, jnp.finfo(jnp.float32).min)
    peak = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.exp(scores - peak)
    out = jnp.einsum(f"bhqk,{kv}->bqhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    total = jnp.moveaxis(jnp.sum(weights, axis=-1), 1, 2)  # [B, Lq, H]
    return (out / total[..., None]).astype(v.dtype)
