"""The device mesh: axes ``("data", "fsdp", "tensor")`` with sizes from the config.

* ``data``: pure data parallelism (params replicated, batch rows split).
* ``fsdp``: fully sharded data parallelism (batch rows split *and* large param dims split).
* ``tensor``: tensor parallelism (heads, MLP hidden units and vocabulary split).

Sizes come from a config (``ml_collections.ConfigDict`` or mapping) with keys ``data``,
``fsdp``, ``tensor``; a missing key means 1 and ``-1`` (at most one) means "all remaining
devices". The product of the sizes must equal the number of devices.

Device order: on one process (or one TPU slice) ``mesh_utils.create_device_mesh`` picks an
order that follows the physical interconnect. When devices span several granules (TPU slices,
or GPU/CPU processes, i.e. hosts) ``create_hybrid_device_mesh`` is used so that the slow
inter-host links (DCN) carry only the outer axes: the granule count is factored into
``data`` first, then ``fsdp``, then ``tensor``; ``tensor`` traffic thus stays inside a host
whenever the sizes allow it.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

MESH_AXES: tuple[str, str, str] = ("data", "fsdp", "tensor")

_log = logging.getLogger(__name__)


def mesh_config() -> ml_collections.ConfigDict:
    """Default ``config.mesh`` section: pure data parallelism over all devices."""
    return ml_collections.ConfigDict(
        {
            "data": -1,  # data-parallel replicas; -1 = all devices not used by the other axes
            "fsdp": 1,  # parameter/optimizer sharding (ZeRO-3 style) and batch split
            "tensor": 1,  # tensor parallelism over heads, MLP units and vocabulary
        }
    )


def mesh_config_dict(mesh_config: Any) -> dict[str, int]:
    """``{"data": d, "fsdp": f, "tensor": t}`` from a ConfigDict/mapping (-1 kept; None = data=-1)."""
    if mesh_config is None:
        raw: Mapping[str, Any] = {"data": -1}
    elif hasattr(mesh_config, "to_dict"):
        raw = mesh_config.to_dict()
    elif isinstance(mesh_config, Mapping):
        raw = mesh_config
    else:
        raise TypeError(
            f"mesh config must be a ConfigDict or a mapping with keys {MESH_AXES}, "
            f"got {type(mesh_config).__name__}"
        )
    unknown = sorted(set(raw) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh config: unknown key(s) {unknown}; allowed keys are {list(MESH_AXES)}")
    sizes = {}
    for axis in MESH_AXES:
        value = raw.get(axis, 1)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise ValueError(f"mesh config: mesh.{axis} must be an int (>= 1, or -1), got {value!r}")
        if value == 0 or value < -1:
            raise ValueError(f"mesh config: mesh.{axis} must be >= 1 or -1 (= the rest), got {value}")
        sizes[axis] = int(value)
    return sizes


def resolve_mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int, int]:
    """Sizes of ``(data, fsdp, tensor)`` for ``num_devices`` devices, with ``-1`` filled in."""
    sizes = mesh_config_dict(mesh_config)
    free = [axis for axis, size in sizes.items() if size == -1]
    if len(free) > 1:
        raise ValueError(f"mesh config: at most one axis may be -1, got {free} set to -1 in {sizes}")
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if free:
        if num_devices % fixed:
            raise ValueError(
                f"mesh config {sizes}: the fixed axes multiply to {fixed}, which does not divide "
                f"the {num_devices} available devices, so mesh.{free[0]}=-1 cannot be filled"
            )
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise ValueError(
            f"mesh config {sizes}: data*fsdp*tensor = {fixed} but there are {num_devices} devices; "
            f"the product must equal the device count (set one axis to -1 to use the rest)"
        )
    return sizes["data"], sizes["fsdp"], sizes["tensor"]


def _granule_of(device: Any) -> int:
    """The interconnect island a device belongs to: its TPU slice, else its process (host)."""
    slice_index = getattr(device, "slice_index", None)
    return int(slice_index) if slice_index is not None else int(device.process_index)


def _dcn_factors(shape: Sequence[int], num_granules: int) -> tuple[int, ...] | None:
    """Splits ``num_granules`` over the axes in order (data first); None if it cannot be split."""
    remaining, dcn = num_granules, []
    for size in shape:
        factor = math.gcd(size, remaining)
        dcn.append(factor)
        remaining //= factor
    return tuple(dcn) if remaining == 1 else None


def _device_grid(shape: tuple[int, ...], devices: Sequence[Any]) -> np.ndarray:
    """Arranges ``devices`` into an array of ``shape`` following the interconnect."""
    granules = {_granule_of(d) for d in devices}
    if len(granules) > 1:
        dcn = _dcn_factors(shape, len(granules))
        if dcn is not None:
            ici = tuple(s // f for s, f in zip(shape, dcn))
            try:
                return mesh_utils.create_hybrid_device_mesh(
                    ici,
                    dcn,
                    devices,
                    process_is_granule=getattr(devices[0], "slice_index", None) is None,
                )
            except (ValueError, AssertionError, NotImplementedError) as err:
                _log.warning("hybrid device mesh %s x %s failed (%s); using host-major order", ici, dcn, err)
        else:
            _log.warning(
                "mesh %s cannot be split over %d hosts/slices; using host-major device order",
                dict(zip(MESH_AXES, shape)),
                len(granules),
            )
        ordered = sorted(devices, key=lambda d: (_granule_of(d), d.process_index, d.id))
        return np.asarray(ordered, dtype=object).reshape(shape)
    try:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, AssertionError, NotImplementedError) as err:
        _log.warning("topology-aware device mesh failed (%s); using device-id order", err)
        return np.asarray(sorted(devices, key=lambda d: d.id), dtype=object).reshape(shape)


def make_mesh(mesh_config: Any = None, devices: Sequence[Any] | None = None) -> Mesh:
    """Builds the ``("data", "fsdp", "tensor")`` mesh with automatic (not explicit) axis types.

    Args:
      mesh_config: ConfigDict or mapping with integer ``data``, ``fsdp``, ``tensor`` (missing = 1,
        one of them may be -1 = the rest). ``None`` means ``{"data": -1}``: pure data
        parallelism over all devices.
      devices: devices to use (default ``jax.devices()``, i.e. all devices of all processes).
    """
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape(mesh_config, len(devices))
    grid = _device_grid(shape, devices)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
