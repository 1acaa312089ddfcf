"""Two local jax.distributed processes (4 fake devices each) == one process with 8 devices."""

from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
TOL = 1e-5
EXPECTED_SHARDS = {"data2-fsdp2-tensor2": [(0, 2), (1, 2)], "fsdp8": [(0, 2), (1, 2)]}
MESHES = {"data2-fsdp2-tensor2": {"data": 2, "fsdp": 2, "tensor": 2}, "fsdp8": {"fsdp": 8}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("mp")
    env = dict(os.environ)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]),
    )
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID"):
        env.pop(key, None)
    port = free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(HERE / "mp_worker.py"), str(port), str(i), str(out)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=150)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{log[-4000:]}"
    return [pickle.loads((out / f"process{i}.pkl").read_bytes()) for i in range(2)]


@pytest.mark.multiprocess
@pytest.mark.parametrize("name", list(MESHES))
def test_two_processes_match_one_process(two_process_results, toy_runs, name):
    reference = toy_runs(MESHES[name])
    shards = [r[name]["shard"] for r in two_process_results]
    assert shards == EXPECTED_SHARDS[name]  # each process loaded its own half of every batch
    for result in two_process_results:  # both processes see the same global result
        np.testing.assert_allclose(result[name]["losses"], reference["losses"], rtol=0, atol=TOL)
        for key in ("grads", "params"):
            for a, b in zip(jax.tree.leaves(result[name][key]), jax.tree.leaves(reference[key])):
                assert a.shape == b.shape
                np.testing.assert_allclose(a, b, rtol=0, atol=TOL)
