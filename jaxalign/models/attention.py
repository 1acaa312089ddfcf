"""Masked multi-head attention with grouped key/value heads, and the position/segment helpers.

Masking rule (docs/architecture.md): query ``q`` may attend key ``k`` when ``k`` is not after
``q`` in the row (or the cache), both carry the same non-zero segment id, and, with a sliding
window ``W``, ``pos(q) - pos(k) < W``. Padding has segment id 0 and sees nothing (its output is
finite but meaningless); packed sequences never see each other.
"""

from __future__ import annotations

from functools import partial

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
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, *, query_block: int = 0
) -> jax.Array:
    """``softmax(q k^T * scale, masked) v`` with ``q [B, Lq, H, Dh]``, ``k, v [B, Lk, KV, Dh]``.

    Query head ``h`` uses key/value head ``h // (H / KV)`` (HF's ``repeat_kv`` order). Scores and
    the softmax are float32; masked scores are the float32 minimum, so a fully masked (padding)
    query gets a finite average of the values it is shown.

    ``query_block > 0`` is for queries and keys at the same slots (a training or scoring
    forward, ``Lq == Lk``): queries are then taken ``query_block`` at a time and each block
    attends only to the keys up to its own last slot. The causal rule masks every later key
    anyway, so real queries get the same result while about half of the ``[B, H, L, L]``
    score matrix is never formed, and each block's scores stay small enough for the cache.
    Its backward pass is :func:`blocked_attention`'s (recomputed scores, no stored weights).
    """
    lq, lk = q.shape[1], k.shape[1]
    if query_block <= 0 or lq != lk or lq <= query_block:
        return _attention(q, k, v, mask, scale)
    k, v = _repeat_kv(k, q.shape[2]), _repeat_kv(v, q.shape[2])
    heads_first = lambda x: jnp.swapaxes(x, 1, 2)  # [B, L, H, Dh] <-> [B, H, L, Dh]
    out = blocked_attention(heads_first(q), heads_first(k), heads_first(v), mask, scale, query_block)
    return heads_first(out)


def _repeat_kv(x: jax.Array, heads: int) -> jax.Array:
    """HF's repeat_kv: query head h reads key/value head h // (heads / KV)."""
    groups = heads // x.shape[2]
    return jnp.repeat(x, groups, axis=2) if groups > 1 else x


_MASKED = jnp.finfo(jnp.float32).min


def _scores(q: jax.Array, k: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """Masked float32 scores ``[B, H, Lq, Lk]`` of ``q [B, H, Lq, Dh]`` against ``k [B, H, Lk, Dh]``."""
    scores = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    return jnp.where(mask[:, None], scores, _MASKED)


def _blocks(length: int, block: int) -> list[tuple[int, int]]:
    return [(start, min(start + block, length)) for start in range(0, length, block)]


@partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, block: int) -> jax.Array:
    """Causal-prefix attention by query blocks, heads first: ``q, k, v [B, H, L, Dh]`` (key/value
    heads already repeated), ``mask [B, L, L]``; query block ``[s, e)`` attends keys ``[0, e)``.

    Forward: per query block ``o = (w v) / sum w`` with ``w = exp(s - max s)``; only ``o``, the
    row maxima and the reciprocal row sums are kept (not the log-sum-exp: for a fully masked row
    ``max s + log(sum w)`` rounds back to the float32 minimum). Backward (FlashAttention's algebra,
    with the float32 scores recomputed from ``q`` and ``k``): ``p = exp(s - max s) / sum w``,
    ``dp = do v^T``, ``D = rowsum(do * o)``, ``ds = p (dp - D) scale`` on unmasked pairs.
    ``dk = ds^T q`` and ``dv = p^T do`` are formed key block by key block (keys ``[s, e)``
    against queries ``[s, L)``, key-major), so each key block's gradient is written once instead
    of summed over the query blocks that see it; ``dq = ds k`` query block by query block. Every
    product is then a batched matmul contracting the last axis of one operand with the middle
    axis of the other, the layouts XLA:CPU runs fastest (autodiff of the forward contracts the
    first matrix axis of both: up to 5x slower in bfloat16). Low-precision inputs give
    low-precision ``p`` and ``ds`` in the products (float32 accumulation), as FlashAttention does.
    """
    return _blocked_forward(q, k, v, mask, scale, block)[0]


def _blocked_forward(q, k, v, mask, scale, block):
    outs, peaks, inverses = [], [], []
    for start, end in _blocks(q.shape[2], block):
        scores = _scores(q[:, :, start:end], k[:, :, :end], mask[:, start:end, :end], scale)
        peak = jnp.max(scores, axis=-1, keepdims=True)
        weights = jnp.exp(scores - peak)
        inverse = 1.0 / jnp.sum(weights, axis=-1, keepdims=True)
        out = jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), v[:, :, :end], preferred_element_type=jnp.float32)
        outs.append(out * inverse)
        peaks.append(peak[..., 0])
        inverses.append(inverse[..., 0])
    out = jnp.concatenate(outs, axis=2).astype(q.dtype)
    stats = (jnp.concatenate(peaks, axis=2), jnp.concatenate(inverses, axis=2))  # [B, H, L] each
    return out, (q, k, v, mask, out, stats)


def _blocked_backward(scale, block, residuals, d_out):
    q, k, v, mask, out, (peak, inverse) = residuals
    low = q.dtype
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # D: [B, H, L]
    mm = partial(jnp.einsum, preferred_element_type=jnp.float32)
    dks, dvs, dqs = [], [], []
    for start, end in _blocks(q.shape[2], block):  # keys [start, end) against queries [start, L)
        visible = jnp.swapaxes(mask[:, start:, start:end], 1, 2)[:, None]  # [B, 1, Kb, Lq']
        scores_t = mm("bhkd,bhqd->bhkq", k[:, :, start:end], q[:, :, start:]) * scale
        p_t = jnp.exp(jnp.where(visible, scores_t, _MASKED) - peak[:, :, None, start:]) * inverse[:, :, None, start:]
        dvs.append(mm("bhkq,bhqd->bhkd", p_t.astype(low), d_out[:, :, start:]))
        dp_t = mm("bhkd,bhqd->bhkq", v[:, :, start:end], d_out[:, :, start:])
        ds_t = jnp.where(visible, p_t * (dp_t - delta[:, :, None, start:]) * scale, 0.0)
        dks.append(mm("bhkq,bhqd->bhkd", ds_t.astype(low), q[:, :, start:]))
    for start, end in _blocks(q.shape[2], block):  # queries [start, end) against keys [0, end)
        visible = mask[:, None, start:end, :end]
        scores = _scores(q[:, :, start:end], k[:, :, :end], mask[:, start:end, :end], scale)
        p = jnp.exp(scores - peak[:, :, start:end, None]) * inverse[:, :, start:end, None]
        dp = mm("bhqd,bhkd->bhqk", d_out[:, :, start:end], v[:, :, :end])
        ds = jnp.where(visible, p * (dp - delta[:, :, start:end, None]) * scale, 0.0)
        dqs.append(mm("bhqk,bhkd->bhqd", ds.astype(low), k[:, :, :end]))
    grads = (jnp.concatenate(g, axis=2).astype(x.dtype) for g, x in ((dqs, q), (dks, k), (dvs, v)))
    return (*grads, None)


blocked_attention.defvjp(_blocked_forward, _blocked_backward)


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
    """One masked attention over all the given keys. The weights ``exp(s - max s)`` are left
    unnormalised through the value product and the output is divided by their sum after it:
    one pass less over the ``[B, H, Lq, Lk]`` scores than normalising them first (the max is
    a constant shift, so it carries no gradient)."""
    k, v = _repeat_kv(k, q.shape[2]), _repeat_kv(v, q.shape[2])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask[:, None, :, :], scores, _MASKED)
    peak = jax.lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    weights = jnp.exp(scores - peak)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v, preferred_element_type=jnp.float32)
    total = jnp.moveaxis(jnp.sum(weights, axis=-1), 1, 2)  # [B, Lq, H]
    return (out / total[..., None]).astype(v.dtype)
