"""Batch placement: which rows each process loads, and host-local -> global assembly."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxalign.parallel import DataShard, batch_sharding, data_shard, global_batch, make_mesh


def fake_mesh(process_grid: np.ndarray) -> SimpleNamespace:
    """A stand-in mesh whose device at each (data, fsdp, tensor) lives on the given process."""
    devices = np.vectorize(lambda p: SimpleNamespace(process_index=int(p)), otypes=[object])(process_grid)
    d, f, t = process_grid.shape
    return SimpleNamespace(shape={"data": d, "fsdp": f, "tensor": t}, devices=devices)


def test_single_process_loads_everything():
    assert data_shard(make_mesh({"data": 2, "fsdp": 2, "tensor": 2})) == DataShard(0, 1)


def test_two_hosts_split_the_data_axis():
    grid = np.array([0, 0, 0, 0, 1, 1, 1, 1]).reshape(2, 2, 2)  # host = data index
    mesh = fake_mesh(grid)
    assert [data_shard(mesh, p) for p in (0, 1)] == [DataShard(0, 2), DataShard(1, 2)]


def test_four_hosts_over_data_and_fsdp():
    grid = np.repeat(np.arange(4), 2).reshape(2, 2, 2)  # host = data * 2 + fsdp; tensor inside host
    mesh = fake_mesh(grid)
    assert [data_shard(mesh, p) for p in range(4)] == [DataShard(p, 4) for p in range(4)]


def test_tensor_axis_across_hosts_means_same_rows():
    grid = np.tile(np.array([0, 1]), 4).reshape(1, 4, 2)  # host = tensor index
    mesh = fake_mesh(grid)
    assert data_shard(mesh, 0) == data_shard(mesh, 1) == DataShard(0, 1)


def test_interleaved_hosts_are_rejected():
    grid = np.array([0, 1, 0, 1]).reshape(1, 4, 1)  # blocks 0,2 on host 0: not one contiguous range
    with pytest.raises(ValueError, match=r"process 0 holds batch blocks \[0, 2\] of 4"):
        data_shard(fake_mesh(grid), 0)


def test_global_batch_places_rows():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    assert batch_sharding(mesh).spec == P(("data", "fsdp"))
    rows = np.arange(8 * 3, dtype=np.int32).reshape(8, 3)
    out = global_batch({"input_ids": rows, "pair_mask": np.ones(4, np.float32)}, mesh)
    ids = out["input_ids"]
    assert ids.shape == (8, 3) and ids.sharding.spec == P(("data", "fsdp"))
    np.testing.assert_array_equal(np.asarray(ids), rows)
    # each device holds 2 consecutive rows: block data*2+fsdp, replicated over tensor
    for shard in ids.addressable_shards:
        start = shard.index[0].start
        np.testing.assert_array_equal(np.asarray(shard.data), rows[start : start + 2])
    with pytest.raises(ValueError, match=r"batch\['odd'\]: global leading size 6 .* not divisible by data\*fsdp = 4"):
        global_batch({"odd": np.zeros((6, 2))}, mesh)
