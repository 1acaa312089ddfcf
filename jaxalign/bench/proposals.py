"""Optimisations that belong in other packages, implemented here as clearly separated
proposals and switched on only inside a benchmark worker, so that their effect is measured
before they are applied where they belong. (The scored-positions LM head started here and,
once measured, moved into ``jaxalign.losses.token_logps_from_hidden``.)

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

import jax
import jax.numpy as jnp

__all__ = ["block_causal_attention", "install_block_causal_attention"]


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
