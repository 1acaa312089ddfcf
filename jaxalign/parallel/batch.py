"""Batches on the mesh: their sharding, which rows each process loads, host-local -> global.

The global batch's rows are split over ``("data", "fsdp")`` in row-major order of those two
mesh axes: block ``b = data_index * fsdp_size + fsdp_index`` of ``data * fsdp`` equal blocks
lives on the devices at those mesh coordinates (replicated over ``tensor``). A process
therefore needs only the blocks its own devices hold; :func:`data_shard` says which, and the
loader reads shard ``index`` of ``count`` (``count`` = number of distinct row ranges over all
processes, ``index`` = this process's range). Processes whose devices hold the same rows (a
``tensor`` axis spanning hosts) get the same index and must load the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

BATCH_AXES: tuple[str, str] = ("data", "fsdp")


class DataShard(NamedTuple):
    """This process loads row range ``index`` of ``count`` equal ranges of every global batch."""

    index: int
    count: int


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (leading axis) split over ``("data", "fsdp")``; all other dims replicated.

    The leading size of every batch array (``R`` rows, ``P`` pairs) must be divisible by
    ``data * fsdp``.
    """
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def _process_blocks(mesh: Mesh) -> dict[int, list[int]]:
    """Process index -> sorted batch-block indices held by its devices."""
    fsdp = mesh.shape["fsdp"]
    blocks: dict[int, set[int]] = {}
    for (d, f, _t), device in np.ndenumerate(mesh.devices):
        blocks.setdefault(int(device.process_index), set()).add(d * fsdp + f)
    return {p: sorted(b) for p, b in blocks.items()}


def data_shard(mesh: Mesh, process_index: int | None = None) -> DataShard:
    """Which equal slice of each global batch ``process_index`` (default: this process) loads."""
    process_index = jax.process_index() if process_index is None else process_index
    num_blocks = mesh.shape["data"] * mesh.shape["fsdp"]
    per_process = _process_blocks(mesh)
    if process_index not in per_process:
        raise ValueError(f"process {process_index} owns no device of the mesh {dict(mesh.shape)}")
    sizes = {len(b) for b in per_process.values()}
    for p, b in per_process.items():
        n = len(b)
        if len(sizes) != 1 or b != list(range(b[0], b[0] + n)) or b[0] % n:
            raise ValueError(
                f"mesh {dict(mesh.shape)}: process {p} holds batch blocks {b} of {num_blocks}; "
                "every process must hold one aligned contiguous range of equal size "
                "(build the mesh with jaxalign.parallel.make_mesh, which orders devices host-major)"
            )
    mine = per_process[process_index]
    n = len(mine)
    return DataShard(index=mine[0] // n, count=num_blocks // n)


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each process's rows (shard :func:`data_shard` of the global batch) into global arrays.

    Every array of ``local_batch`` holds this process's ``global_rows / count`` leading rows;
    the result is a dict of ``jax.Array`` with ``global_rows`` rows sharded by
    :func:`batch_sharding`. On one process this is a sharded ``device_put``.
    """
    sharding = batch_sharding(mesh)
    shard = data_shard(mesh)
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        if value.ndim == 0:
            raise ValueError(f"batch[{key!r}] is a scalar; batch arrays need a leading row axis")
        global_shape = (value.shape[0] * shard.count, *value.shape[1:])
        blocks = mesh.shape["data"] * mesh.shape["fsdp"]
        if global_shape[0] % blocks:
            raise ValueError(
                f"batch[{key!r}]: global leading size {global_shape[0]} (local {value.shape[0]} x "
                f"{shard.count} shards) is not divisible by data*fsdp = {blocks}"
            )
        out[key] = jax.make_array_from_process_local_data(sharding, value, global_shape)
    return out


def gathered_rows(local: np.ndarray) -> np.ndarray:
    """A host array of this process's rows of a global batch, as the rows of every process in
    process order (all-gathered across processes; itself on one process)."""
    if jax.process_count() == 1:
        return local
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(local, tiled=True))
