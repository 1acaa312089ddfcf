"""Stopping a run cleanly: SIGTERM/SIGINT handlers and the processes' agreement on when.

``StopSignals`` (a context manager around the training loop) replaces the handlers of
SIGTERM and SIGINT: the first signal only records its name (the loop finishes the step it is
in, saves a checkpoint synchronously and exits); every later one is ignored with a message,
so a second Ctrl-C or a scheduler's repeated SIGTERM cannot interrupt the checkpoint being
written (a SIGKILL still can, and then the previous checkpoint stays usable: Orbax commits a
checkpoint by renaming its temporary directory). The old handlers come back on exit.

With several processes a signal reaches them at different steps (or reaches only one), but
all of them must save the same step together. ``StopAgreement`` makes the decision a
collective: at every step each process contributes its flag to a tiny jitted maximum over
all devices, and the result of step ``i`` is read at step ``i + 1`` (the host never waits
for the step it has just launched). Every process therefore stops after the same step.
With one process the flag is used directly, after the current step.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["StopAgreement", "StopSignals"]

HANDLED = (signal.SIGTERM, signal.SIGINT)


def _say(message: str) -> None:
    """Writes to stderr without Python's buffered IO (safe inside a signal handler)."""
    os.write(2, (message + "\n").encode())


class StopSignals:
    """Records the first SIGTERM/SIGINT instead of dying; see the module docstring.

    ``received`` is the first signal's name (``"SIGTERM"``) or None. Installs nothing when
    not on the main thread (Python delivers signals only there).
    """

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = name
            _say(f"jaxalign.train: received {name}; finishing the current step, then saving a checkpoint and exiting")
        else:
            _say(
                f"jaxalign.train: received {name} again; ignored while the run stops and writes its checkpoint "
                "(SIGKILL aborts it; the previous checkpoint stays usable)"
            )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in HANDLED:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class StopAgreement:
    """Whether any process asked to stop, decided identically on all of them.

    ``update(flag)`` is called once per step with this process's flag and returns True when
    the run must stop now. One process: ``flag`` itself. Several: the maximum of all
    processes' flags of the previous call (a jitted reduction over ``mesh``'s devices,
    launched now and read at the next call), so all processes return True at the same call.
    """

    def __init__(self, mesh: Mesh):
        self.collective = jax.process_count() > 1
        self._pending: jax.Array | None = None
        if self.collective:
            self._sharding = NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names)))  # one flag per device
            self._size = mesh.devices.size
            self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def update(self, flag: bool) -> bool:
        if not self.collective:
            return flag
        value = np.array([int(flag)], np.int32)
        shards = [jax.device_put(value, d) for d in self._sharding.addressable_devices]
        flags = jax.make_array_from_single_device_arrays((self._size,), self._sharding, shards)
        previous, self._pending = self._pending, self._any(flags)
        return previous is not None and bool(jax.device_get(previous))
