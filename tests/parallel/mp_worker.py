"""One process of the two-process test: ``python mp_worker.py PORT PROCESS_ID OUT_DIR``.

Starts jax.distributed on 127.0.0.1 (4 fake CPU devices per process via XLA_FLAGS set by the
parent), trains the toy model on two 8-device meshes spanning both processes (each process
feeding only its own rows) and, on process 0, writes the gathered results to OUT_DIR.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import jax

from jaxalign import parallel

MESHES = {"data2-fsdp2-tensor2": {"data": 2, "fsdp": 2, "tensor": 2}, "fsdp8": {"fsdp": 8}}


def main() -> None:
    port, process_id, out_dir = int(sys.argv[1]), int(sys.argv[2]), Path(sys.argv[3])
    info = parallel.initialize_distributed(
        {
            "coordinator_address": f"127.0.0.1:{port}",
            "num_processes": 2,
            "process_id": process_id,
            "initialization_timeout": 60,
            "heartbeat_timeout": 30,
        }
    )
    assert (info.process_index, info.process_count, info.method) == (process_id, 2, "explicit"), info
    assert jax.local_device_count() == 4 and jax.device_count() == 8
    assert parallel.is_main_process() == (process_id == 0)

    import toy  # this script's directory is on sys.path

    results = {}
    for name, config in MESHES.items():
        mesh = parallel.make_mesh(config)
        results[name] = {"shard": tuple(parallel.data_shard(mesh)), **toy.train(mesh)}
    with open(out_dir / f"process{process_id}.pkl", "wb") as f:
        pickle.dump(results, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
