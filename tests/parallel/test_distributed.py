"""initialize_distributed: which call it makes for each config/environment, and its errors.

``jax.distributed.initialize`` itself is replaced by a recorder here (the real call is exercised
by test_multiprocess.py); these tests check the decisions and arguments.
"""

from __future__ import annotations

import jax
import pytest

from jaxalign.parallel import distributed_config, initialize_distributed, is_main_process
from jaxalign.parallel import distributed as dist

CLUSTER_VARS = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_JOB_ID", "SLURM_NTASKS",
    "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID", "OMPI_MCA_orte_hnp_uri", "OMPI_COMM_WORLD_SIZE",
    "TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES",
)


@pytest.fixture
def calls(monkeypatch):
    for var in CLUSTER_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(dist, "cluster_environment", _no_tpu_cluster_environment)
    recorded: list[dict] = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: recorded.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    return recorded


_real_cluster_environment = dist.cluster_environment


def _no_tpu_cluster_environment():
    # the real function, minus the Cloud TPU probe (this machine is not a TPU VM either way)
    name = _real_cluster_environment()
    return None if name == "tpu" else name


def test_defaults_are_single_process(calls):
    info = initialize_distributed(distributed_config())
    assert (info.process_index, info.process_count, info.method) == (0, 1, "single")
    assert initialize_distributed(None).method == "single"
    assert calls == []
    assert is_main_process()


def test_one_process_is_a_no_op(calls):
    info = initialize_distributed({"coordinator_address": "10.0.0.1:1234", "num_processes": 1, "process_id": 0})
    assert info.method == "single" and calls == []


def test_disabled(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    assert initialize_distributed({"enabled": False}).method == "single"
    assert calls == []


def test_explicit_from_config(calls):
    info = initialize_distributed(
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
         "initialization_timeout": 60, "heartbeat_timeout": 20, "local_device_ids": "0,1"}
    )
    assert info.method == "explicit"
    assert calls == [
        {"coordinator_address": "10.0.0.1:1234", "num_processes": 4, "process_id": 2,
         "cluster_detection_method": "deactivate", "local_device_ids": [0, 1],
         "initialization_timeout": 60, "heartbeat_timeout_seconds": 20}
    ]


def test_explicit_from_environment(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:8476")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    initialize_distributed(distributed_config())
    assert calls[0]["coordinator_address"] == "host0:8476"
    assert (calls[0]["num_processes"], calls[0]["process_id"]) == (2, 1)
    assert calls[0]["initialization_timeout"] == 300


def test_config_overrides_environment(calls, monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:8476")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    initialize_distributed({"coordinator_address": "host9:1", "num_processes": 3, "process_id": 0})
    assert (calls[0]["coordinator_address"], calls[0]["num_processes"], calls[0]["process_id"]) == ("host9:1", 3, 0)


def test_slurm_auto_detection(calls, monkeypatch):
    for var, value in {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "4", "SLURM_STEP_NODELIST": "n[1-4]",
                       "SLURM_PROCID": "3", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(var, value)
    assert dist.cluster_environment() == "slurm"
    info = initialize_distributed({"initialization_timeout": 120})
    assert info.method == "auto"
    # JAX reads the coordinator, count and rank from SLURM itself
    assert calls == [{"num_processes": None, "process_id": None, "local_device_ids": None,
                      "initialization_timeout": 120, "heartbeat_timeout_seconds": 100}]


def test_single_task_slurm_job_is_single_process(calls, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert dist.cluster_environment() is None
    assert initialize_distributed(None).method == "single" and calls == []


def test_auto_detect_off_ignores_cluster(calls, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert initialize_distributed({"auto_detect": False}).method == "single" and calls == []


@pytest.mark.parametrize(
    "config, message",
    [
        ({"coordinator_address": "h:1"}, r"coordinator_address='h:1' is set but num_processes=None / process_id=None"),
        ({"num_processes": 2, "process_id": 0}, r"no coordinator_address .* and no cluster environment"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 2}, r"process_id=2 is outside \[0, num_processes=2\)"),
        ({"num_processes": -3}, r"num_processes must be >= 1, got -3"),
        ({"num_processes": "2"}, r"distributed.num_processes must be an int"),
        ({"coordinator": "h:1"}, r"unknown key\(s\) \['coordinator'\]"),
        ({"coordinator_address": "h:1", "num_processes": 2, "process_id": 0, "local_device_ids": "a,b"},
         r"local_device_ids must look like '0,1,2'"),
    ],
)
def test_errors(calls, config, message):
    with pytest.raises(ValueError, match=message):
        initialize_distributed(config)
    assert calls == []


def test_bad_environment_value(calls, monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match=r"JAX_NUM_PROCESSES='two' is not an integer"):
        initialize_distributed(None)


def test_already_initialized_is_reported(monkeypatch):
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: True)
    assert initialize_distributed({"coordinator_address": "h:1"}).method == "already"


def test_explicit_inside_slurm_keeps_all_local_devices(calls, monkeypatch):
    # one process per node: JAX's SLURM detection must not pin each process to GPU SLURM_LOCALID
    for var, value in {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "n[1-2]",
                       "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "JAX_COORDINATOR_ADDRESS": "n1:12345",
                       "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}.items():
        monkeypatch.setenv(var, value)
    initialize_distributed(None)
    assert calls[0]["cluster_detection_method"] == "deactivate"
    assert calls[0]["local_device_ids"] is None


def test_explicit_address_with_cluster_filling_the_rest(calls, monkeypatch):
    for var, value in {"SLURM_JOB_ID": "77", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": "n[1-2]",
                       "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(var, value)
    initialize_distributed({"coordinator_address": "n1:12345"})
    assert calls[0]["coordinator_address"] == "n1:12345"
    assert calls[0]["num_processes"] is None and "cluster_detection_method" not in calls[0]
