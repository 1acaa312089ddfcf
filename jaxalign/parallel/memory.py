"""How many bytes of a sharded pytree each device holds (no allocation: shapes and shardings only)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import numpy as np


class ShardedBytes(NamedTuple):
    """``total``: bytes of the whole tree; ``per_device``: bytes the fullest device holds."""

    total: int
    per_device: int


def sharded_bytes(tree: Any, shardings: Any) -> ShardedBytes:
    """Bytes of ``tree`` (arrays or ``ShapeDtypeStruct``) overall and on the fullest device.

    A leaf of shape ``s`` placed by ``sharding`` costs ``prod(sharding.shard_shape(s)) * itemsize``
    on each device holding a shard; replicated leaves cost their full size on every device.
    ``shardings`` has the structure of ``tree`` (e.g. from ``param_shardings``).
    """
    leaves = jax.tree.leaves(tree)
    sharding_leaves = jax.tree.leaves(shardings)
    if len(leaves) != len(sharding_leaves):
        raise ValueError(f"tree has {len(leaves)} leaves but shardings has {len(sharding_leaves)}")
    total = 0
    per_device: dict[Any, int] = {}
    for leaf, sharding in zip(leaves, sharding_leaves):
        itemsize = np.dtype(leaf.dtype).itemsize
        total += math.prod(leaf.shape) * itemsize
        shard = math.prod(sharding.shard_shape(tuple(leaf.shape))) * itemsize
        for device in sharding.device_set:
            per_device[device] = per_device.get(device, 0) + shard
    return ShardedBytes(total=total, per_device=max(per_device.values(), default=0))
