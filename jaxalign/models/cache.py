"""A fixed-size key/value cache for incremental decoding (a plain pytree, jit-friendly)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """Per-layer keys/values ``[B, KV, S, Dh]`` (head-major: a decode step reads each head's keys
    contiguously, with no transpose of the cache) plus, per slot, the segment id and position.

    Slots ``[0, index)`` are written; unwritten slots have segment id 0, so attention ignores
    them. A decode call writes its tokens at slots ``index, index + 1, ...`` and advances
    ``index`` (the same for every row; left padding is handled by segment ids, not offsets).
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    segment_ids: jax.Array  # int32 [B, S]
    positions: jax.Array  # int32 [B, S]
    index: jax.Array  # int32 scalar

    @property
    def size(self) -> int:
        return self.segment_ids.shape[1]

    @classmethod
    def empty(cls, num_layers: int, batch: int, size: int, kv_heads: int, head_dim: int, dtype) -> KVCache:
        zeros = jnp.zeros((batch, kv_heads, size, head_dim), dtype)
        return cls(
            keys=(zeros,) * num_layers,
            values=(zeros,) * num_layers,
            segment_ids=jnp.zeros((batch, size), jnp.int32),
            positions=jnp.zeros((batch, size), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )


def write_slots(buffer: jax.Array, new: jax.Array, index: jax.Array, axis: int = 1) -> jax.Array:
    """Write ``new`` into ``buffer`` at slots ``index .. index + T - 1`` of ``axis`` (``[B, S]``
    per-slot arrays: axis 1; head-major keys/values ``[B, KV, S, Dh]``: axis 2)."""
    return jax.lax.dynamic_update_slice_in_dim(buffer, new.astype(buffer.dtype), index, axis=axis)
