"""A fixed-size key/value cache for incremental decoding (a plain pytree, jit-friendly)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class KVCache:
    """Per-layer keys/values ``[B, KV, S, Dh]`` (head-major: a decode step reads each head's keys
    contiguously, with no transpose of the cache) plus, per slot, the segment id and position.
    For stacked layers (``ModelConfig.scan_layers``) ``keys``/``values`` are one array each,
    ``[layers, B, KV, S, Dh]``, scanned together with the blocks; otherwise a tuple per layer.

    Slots ``[0, index)`` are written; unwritten slots have segment id 0, so attention ignores
    them. A decode call writes its tokens at slots ``index, index + 1, ...`` and advances
    ``index`` (the same for every row; left padding is handled by segment ids, not offsets).
    """

    keys: tuple[jax.Array, ...] | jax.Array
    values: tuple[jax.Array, ...] | jax.Array
    segment_ids: jax.Array  # int32 [B, S]
    positions: jax.Array  # int32 [B, S]
    index: jax.Array  # int32 scalar

    @property
    def size(self) -> int:
        return self.segment_ids.shape[1]

    @classmethod
    def empty(cls, num_layers: int, batch: int, size: int, kv_heads: int, head_dim: int, dtype, *,
              stacked: bool = False) -> KVCache:
        if stacked:
            keys = values = jnp.zeros((num_layers, batch, kv_heads, size, head_dim), dtype)
        else:
            keys = values = (jnp.zeros((batch, kv_heads, size, head_dim), dtype),) * num_layers
        return cls(
            keys=keys,
            values=values,
            segment_ids=jnp.zeros((batch, size), jnp.int32),
            positions=jnp.zeros((batch, size), jnp.int32),
            index=jnp.zeros((), jnp.int32),
        )

    def repeat_rows(self, n: int) -> KVCache:
        """The cache with each row repeated ``n`` times (row ``b * n + s`` is copy ``s`` of row ``b``)."""
        row_axis = 0 if isinstance(self.keys, tuple) else 1  # stacked: [layers, B, ...]
        keys, values = jax.tree.map(lambda x: jnp.repeat(x, n, axis=row_axis), (self.keys, self.values))
        return KVCache(keys, values, jnp.repeat(self.segment_ids, n, axis=0), jnp.repeat(self.positions, n, axis=0),
                       self.index)


def write_slots(buffer: jax.Array, new: jax.Array, index: jax.Array, axis: int = 1) -> jax.Array:
    """Write ``new`` into ``buffer`` at slots ``index .. index + T - 1`` of ``axis`` (``[B, S]``
    per-slot arrays: axis 1; head-major keys/values ``[B, KV, S, Dh]``: axis 2)."""
    return jax.lax.dynamic_update_slice_in_dim(buffer, new.astype(buffer.dtype), index, axis=axis)
