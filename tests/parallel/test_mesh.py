"""make_mesh: sizes from the config, -1 resolution, errors, axis types, device order."""

from __future__ import annotations

from types import SimpleNamespace

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import AxisType

from jaxalign.parallel import MESH_AXES, make_mesh, mesh_config
from jaxalign.parallel.mesh import _device_grid, _dcn_factors


@pytest.mark.parametrize(
    "config, shape",
    [
        ({"data": 8}, (8, 1, 1)),
        ({"fsdp": 8}, (1, 8, 1)),
        ({"data": 2, "fsdp": 2, "tensor": 2}, (2, 2, 2)),
        ({"data": -1, "tensor": 2}, (4, 1, 2)),
        ({"data": 2, "fsdp": -1}, (2, 4, 1)),
        ({"data": 1, "fsdp": 2, "tensor": -1}, (1, 2, 4)),
        (None, (8, 1, 1)),
    ],
)
def test_mesh_shapes(config, shape):
    mesh = make_mesh(config)
    assert mesh.axis_names == MESH_AXES
    assert tuple(mesh.shape[a] for a in MESH_AXES) == shape
    assert mesh.axis_types == (AxisType.Auto,) * 3
    assert sorted(d.id for d in mesh.devices.flat) == list(range(8))


def test_default_config_section_and_configdict():
    cfg = mesh_config()
    assert cfg.to_dict() == {"data": -1, "fsdp": 1, "tensor": 1}
    cfg.fsdp = 4
    mesh = make_mesh(cfg)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "tensor": 1}
    assert make_mesh(ml_collections.ConfigDict({"tensor": 8})).shape["tensor"] == 8


def test_one_device_mesh():
    mesh = make_mesh({"data": -1}, devices=jax.devices()[:1])
    assert mesh.devices.shape == (1, 1, 1)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"data": -1, "fsdp": -1}, r"at most one axis may be -1"),
        ({"data": 3, "fsdp": -1}, r"fixed axes multiply to 3, which does not divide the 8 available devices"),
        ({"data": 2, "fsdp": 2}, r"data\*fsdp\*tensor = 4 but there are 8 devices"),
        ({"data": 4, "fsdp": 4}, r"= 16 but there are 8 devices"),
        ({"data": 0, "fsdp": -1}, r"mesh.data must be >= 1 or -1"),
        ({"fsdp": -2}, r"mesh.fsdp must be >= 1 or -1"),
        ({"fsdp": 2.0, "data": -1}, r"mesh.fsdp must be an int"),
        ({"model": 2, "data": -1}, r"unknown key\(s\) \['model'\]"),
    ],
)
def test_mesh_errors(config, message):
    with pytest.raises(ValueError, match=message):
        make_mesh(config)


def test_dcn_factors_put_hosts_on_outer_axes():
    assert _dcn_factors((2, 2, 2), 2) == (2, 1, 1)
    assert _dcn_factors((1, 8, 1), 2) == (1, 2, 1)
    assert _dcn_factors((2, 4, 2), 4) == (2, 2, 1)
    assert _dcn_factors((1, 1, 8), 4) == (1, 1, 4)
    assert _dcn_factors((3, 1, 1), 2) is None


def _fake_devices(processes: int, per_process: int) -> list[SimpleNamespace]:
    # Interleave ids so that plain id order would mix hosts along every axis.
    return [
        SimpleNamespace(id=i * processes + p, process_index=p, platform="cpu", device_kind="cpu")
        for p in range(processes)
        for i in range(per_process)
    ]


@pytest.mark.parametrize(
    "shape, host_axis",
    [((2, 2, 2), 0), ((1, 4, 2), 1), ((4, 1, 2), 0)],
)
def test_multi_host_order_keeps_inner_axes_on_one_host(shape, host_axis):
    grid = _device_grid(shape, _fake_devices(processes=2, per_process=4))
    processes = np.vectorize(lambda d: d.process_index)(grid)
    # Moving along the host axis's outer half changes host; the tensor axis never does.
    assert np.all(processes == processes[:, :, :1]), processes
    half = shape[host_axis] // 2
    first = np.take(processes, range(half), axis=host_axis)
    second = np.take(processes, range(half, shape[host_axis]), axis=host_axis)
    assert np.all(first == 0) and np.all(second == 1), processes
