"""Devices for jaxalign: the mesh, the logical-axis rule table, batches, multi-host start-up.

See docs/architecture.md ("Parallelism") for the contract and docs/scaling.md for usage.
"""

from jaxalign.parallel.batch import DataShard, batch_sharding, data_shard, gathered_rows, global_batch
from jaxalign.parallel.distributed import (
    DistributedInfo,
    barrier,
    distributed_config,
    initialize_distributed,
    is_main_process,
)
from jaxalign.parallel.memory import ShardedBytes, sharded_bytes
from jaxalign.parallel.mesh import MESH_AXES, make_mesh, mesh_config, resolve_mesh_shape
from jaxalign.parallel.rules import (
    LOGICAL_AXIS_RULES,
    logical_to_spec,
    opt_state_shardings,
    param_shardings,
    sharding_fn,
    under_mesh,
    with_logical_constraint,
)
from jaxalign.parallel.sharded import create_sharded, shard_tree

__all__ = [
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "DataShard",
    "DistributedInfo",
    "ShardedBytes",
    "barrier",
    "batch_sharding",
    "create_sharded",
    "data_shard",
    "gathered_rows",
    "distributed_config",
    "global_batch",
    "initialize_distributed",
    "is_main_process",
    "logical_to_spec",
    "make_mesh",
    "mesh_config",
    "opt_state_shardings",
    "param_shardings",
    "resolve_mesh_shape",
    "shard_tree",
    "sharded_bytes",
    "sharding_fn",
    "under_mesh",
    "with_logical_constraint",
]
