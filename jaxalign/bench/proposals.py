"""Optimisations the measurements call for that belong in other packages: implemented here as
clearly separated proposals, switched on only inside a benchmark worker, so that their effect
is measured before they are applied where they belong.

``scored_token_logps`` (proposal for ``jaxalign.train.forward.token_logps``): DPO needs
log-probs only of the tokens its ``loss_mask`` scores (the completions), yet the trainer's
step projects every position of every row through the ``[D, V]`` unembedding. Here the
predicting positions are sorted so that the scored ones come first (a stable argsort of the
mask), their hidden states are gathered, and the unembedding and log-softmax run chunk by
chunk over that list; chunks that hold no scored position are skipped with ``lax.cond``
(in the forward and, being rematerialised, in the backward pass). The number of chunks run is
``ceil(scored / chunk)``, decided on the device, so shapes stay static and nothing is
recompiled. Results are scattered back, label-aligned, with 0 on unscored tokens: equal to
``forward.token_logps`` wherever ``loss_mask`` is 1.

``block_causal_attention`` (proposal for ``jaxalign.models.attention.dot_product_attention``
in the training forward, where queries and keys are the same positions): the queries are
taken ``block`` positions at a time and each block attends only to the keys up to its own
end, the rest being masked by causality anyway. That skips ``(n - 1) / (2 n)`` of the score
matrix for ``n`` blocks and keeps each block's scores small enough to stay in cache: on CPU
the ``[B, H, L, L]`` float32 scores and their softmax are memory-bound. Same result as the
full form on every query that sees at least one key (the masked scores it skips contribute
exactly 0); a fully masked (padding) query averages its block's key prefix instead of every
key: finite either way, and never read by a real token.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["block_causal_attention", "install_block_causal_attention", "install_scored_lm_head", "scored_token_logps"]


def scored_token_logps(
    hidden: jax.Array, unembedding: jax.Array, input_ids: jax.Array, loss_mask: jax.Array, *, chunk_size: int = 512
) -> jax.Array:
    """Label-aligned float32 log-probs ``[B, L]`` of the tokens with ``loss_mask > 0`` (0 elsewhere).

    ``out[r, t] = log_softmax(hidden[r, t - 1] @ unembedding)[input_ids[r, t]]`` where
    ``loss_mask[r, t] > 0``; the projection runs on ``chunk_size`` scored positions at a time.
    """
    b, length, d = hidden.shape
    if unembedding.shape[0] != d or input_ids.shape != (b, length) or loss_mask.shape != (b, length):
        raise ValueError(
            f"scored_token_logps: need hidden [B, L, D], unembedding [D, V], input_ids and loss_mask [B, L]; got "
            f"{list(hidden.shape)}, {list(unembedding.shape)}, {list(input_ids.shape)}, {list(loss_mask.shape)}"
        )
    if chunk_size < 1:
        raise ValueError(f"scored_token_logps: chunk_size must be >= 1, got {chunk_size}")
    n = b * length
    # Predicting position p of a row scores token p + 1.
    labels = jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1).reshape(n)
    scored = (jnp.concatenate([loss_mask[:, 1:], jnp.zeros_like(loss_mask[:, :1])], axis=1) > 0).reshape(n)
    order = jnp.argsort(jnp.logical_not(scored), stable=True)
    count = jnp.sum(scored.astype(jnp.int32))
    num_chunks = -(-n // chunk_size)
    pad = num_chunks * chunk_size - n
    h = jnp.pad(hidden.reshape(n, d)[order], [(0, pad), (0, 0)]).reshape(num_chunks, chunk_size, d)
    y = jnp.pad(labels[order], [(0, pad)]).reshape(num_chunks, chunk_size)
    starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk_size

    def project(h_c: jax.Array, y_c: jax.Array) -> jax.Array:
        logits = jnp.einsum("cd,dv->cv", h_c, unembedding, preferred_element_type=jnp.float32)
        picked = jnp.take_along_axis(logits, y_c[:, None], axis=-1)[:, 0]
        return picked - jax.nn.logsumexp(logits, axis=-1)

    def chunk(h_c: jax.Array, y_c: jax.Array, start: jax.Array) -> jax.Array:
        return jax.lax.cond(start < count, project, lambda *_: jnp.zeros((chunk_size,), jnp.float32), h_c, y_c)

    sorted_logps = jax.lax.map(lambda xs: jax.checkpoint(chunk)(*xs), (h, y, starts)).reshape(-1)[:n]
    predicted = jnp.zeros((n,), jnp.float32).at[order].set(sorted_logps)
    predicted = jnp.where(scored, predicted, 0.0).reshape(b, length)
    return jnp.concatenate([jnp.zeros_like(predicted[:, :1]), predicted[:, :-1]], axis=1)


def install_scored_lm_head(chunk_size: int = 512) -> None:
    """Replaces ``jaxalign.train.forward.token_logps`` in *this process* by the scored-only form
    (call before the train step is built; benchmark workers only)."""
    from jaxalign.train import forward

    def token_logps(graphdef: Any, params: Any, batch: dict[str, jax.Array], *, chunk: int = 0) -> jax.Array:
        hidden, model = forward.hidden_states(graphdef, params, batch)
        return scored_token_logps(hidden, model.unembedding(), batch["input_ids"], batch["loss_mask"],
                                  chunk_size=chunk or chunk_size)

    forward.token_logps = token_logps


def block_causal_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float, *, block: int = 64
) -> jax.Array:
    """``softmax(q k^T * scale, masked) v`` for ``q [B, L, H, Dh]``, ``k, v [B, L, KV, Dh]`` and a
    causal ``mask [B, L, L]``, one query block at a time over its key prefix (module docstring)."""
    b, length, h, dh = q.shape
    kv = k.shape[2]
    if k.shape[1] != length or mask.shape != (b, length, length):
        raise ValueError(
            f"block_causal_attention: needs queries and keys over the same positions and a [B, L, L] mask; got "
            f"q {list(q.shape)}, k {list(k.shape)}, mask {list(mask.shape)}"
        )
    outs = []
    for start in range(0, length, block):
        end = min(start + block, length)
        qg = q[:, start:end].reshape(b, end - start, kv, h // kv, dh)
        scores = jnp.einsum("bqkgd,bskd->bkgqs", qg, k[:, :end], preferred_element_type=jnp.float32) * scale
        scores = jnp.where(mask[:, None, None, start:end, :end], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bkgqs,bskd->bqkgd", probs, v[:, :end])
        outs.append(out.reshape(b, end - start, h, dh))
    return jnp.concatenate(outs, axis=1)


def install_block_causal_attention(block: int = 64) -> None:
    """Makes the models' attention use ``block_causal_attention`` when queries and keys cover the
    same positions (training and scoring forwards), in *this process* (benchmark workers only)."""
    from jaxalign.models import causal_lm

    original = causal_lm.dot_product_attention

    def attention(q, k, v, mask, scale):
        if q.shape[1] != k.shape[1] or q.shape[1] <= block:
            return original(q, k, v, mask, scale)
        return block_causal_attention(q, k, v, mask, scale, block=block)

    causal_lm.dot_product_attention = attention
