"""From this process's host batches to the global device arrays a step reads.

``BatchPlacer(mesh, shard_count, keys, host_keys, lookups)`` places the ``keys`` a step reads
(``jaxalign.train.step.device_keys``: the step's own, the objective's, the precomputed
reference's) as global arrays whose rows are split over the mesh's ``(data, fsdp)`` axes.
``lookups`` add keys on the host before placement (the reference cache: ``example_index`` ->
``ref_*_logps``). ``check_keys`` refuses, when a run is built, a batch that lacks a key the
step reads or holds one that nothing reads: nothing is silently dropped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["BATCH_AXES", "HOST_KEYS", "BatchPlacer", "check_keys"]

BATCH_AXES = ("data", "fsdp")
# Keys that stay on the host: example_index keys the reference cache and the reports.
HOST_KEYS = ("example_index",)

Lookup = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


def check_keys(batch_keys: Iterable[str], *, device_keys: Sequence[str], added: Sequence[str] = (),
               where: str = "the training batches") -> None:
    """``ValueError`` naming the keys ``where`` lacks (read by the step, not ``added`` on the
    host) or holds that nothing reads (neither a device key nor a host key)."""
    present = set(batch_keys)
    missing = sorted(set(device_keys) - present - set(added))
    unread = sorted(present - set(device_keys) - set(HOST_KEYS))
    problems = []
    if missing:
        problems.append(f"lack the key(s) {missing} that the step or the objective reads")
    if unread:
        problems.append(f"hold the key(s) {unread} that neither the step nor the objective reads (an objective "
                        "must list the batch keys it reads in its batch_keys)")
    if problems:
        raise ValueError(f"{where} " + " and ".join(problems))


class BatchPlacer:
    """See the module docstring. ``shard_count``: the data shards (processes) a global batch
    is split into; each process passes its own rows."""

    def __init__(self, mesh: Mesh, shard_count: int, keys: Sequence[str], lookups: Sequence[Lookup] = ()):
        self.mesh, self.shard_count, self.keys, self.lookups = mesh, shard_count, tuple(keys), tuple(lookups)

    def __call__(self, host: dict[str, np.ndarray], *, stacked: bool) -> dict[str, jax.Array]:
        """``stacked`` batches have the leading micro-batch axis ``[A, ...]``; rows (axis 1) are split."""
        host = dict(host)
        for lookup in self.lookups:
            host.update(lookup(host))
        spec = PartitionSpec(None, BATCH_AXES) if stacked else PartitionSpec(BATCH_AXES)
        sharding = NamedSharding(self.mesh, spec)
        axis = 1 if stacked else 0
        out = {}
        for key in self.keys:
            value = np.asarray(host[key])
            shape = list(value.shape)
            shape[axis] *= self.shard_count
            out[key] = jax.make_array_from_process_local_data(sharding, value, tuple(shape))
        return out
