"""Multi-host start-up: ``jax.distributed.initialize`` from the config or the environment.

Resolution, first match wins (must run before any JAX computation):

1. already initialised, or ``enabled=False``: nothing to do;
2. ``num_processes == 1`` (config or ``JAX_NUM_PROCESSES``): single process, nothing to do;
3. an explicit coordinator (``coordinator_address`` or ``JAX_COORDINATOR_ADDRESS``): initialise
   with it, ``num_processes`` and ``process_id`` from the config or ``JAX_NUM_PROCESSES`` /
   ``JAX_PROCESS_ID`` (when a cluster JAX can detect provides them, they may be omitted);
4. ``auto_detect`` and a multi-process cluster environment JAX knows (SLURM with
   ``SLURM_NTASKS > 1``, Open MPI with ``OMPI_COMM_WORLD_SIZE > 1``, a Cloud TPU VM):
   ``jax.distributed.initialize()`` with no addresses, JAX reads them itself. On SLURM and
   Open MPI JAX then assumes one process per GPU (it shows each process only GPU
   ``local rank``); for one process per node pass everything explicitly (as
   ``tools/launch_slurm.sh`` does) or set ``local_device_ids``;
5. otherwise: single process, nothing to do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jax
import ml_collections

_log = logging.getLogger(__name__)

_KEYS = (
    "enabled",
    "coordinator_address",
    "num_processes",
    "process_id",
    "local_device_ids",
    "auto_detect",
    "initialization_timeout",
    "heartbeat_timeout",
)


def distributed_config() -> ml_collections.ConfigDict:
    """Default ``config.distributed`` section (every field optional; env/cluster fill the gaps)."""
    return ml_collections.ConfigDict(
        {
            "enabled": True,  # False: never call jax.distributed.initialize
            "coordinator_address": "",  # "host:port" of process 0; "" = JAX_COORDINATOR_ADDRESS or auto
            "num_processes": 0,  # total processes; 0 = JAX_NUM_PROCESSES or auto
            "process_id": -1,  # this process's rank; -1 = JAX_PROCESS_ID or auto
            "local_device_ids": "",  # e.g. "0,1"; "" = all local devices (or JAX_LOCAL_DEVICE_IDS)
            "auto_detect": True,  # use JAX's SLURM / Open MPI / Cloud TPU detection
            "initialization_timeout": 300,  # seconds to wait for all processes to connect
            "heartbeat_timeout": 100,  # seconds without heartbeat before a process is declared dead
        }
    )


@dataclass(frozen=True)
class DistributedInfo:
    """What :func:`initialize_distributed` did and where this process stands."""

    process_index: int
    process_count: int
    method: str  # "single", "explicit", "auto", or "already"


def _as_dict(config: Any) -> dict[str, Any]:
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        raw = config.to_dict()
    elif isinstance(config, Mapping):
        raw = dict(config)
    else:
        raise TypeError(f"distributed config must be a ConfigDict or mapping, got {type(config).__name__}")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ValueError(f"distributed config: unknown key(s) {unknown}; allowed keys are {list(_KEYS)}")
    return raw


def _int_setting(cfg: dict[str, Any], key: str, env: str, unset: int) -> int | None:
    """Config value if set (!= ``unset``), else the environment variable, else None."""
    value = cfg.get(key, unset)
    if value is not None and value != unset:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"distributed.{key} must be an int, got {value!r}")
        return value
    text = os.environ.get(env, "").strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {env}={text!r} is not an integer") from None


def cluster_environment() -> str | None:
    """Name of a multi-process cluster environment JAX can auto-configure from, else None."""
    env = os.environ
    if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1") or 1) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return "openmpi"
    try:
        from jax._src.cloud_tpu_init import running_in_cloud_tpu_vm
    except ImportError:  # private module moved: fall back to environment hints
        running_in_cloud_tpu_vm = "TPU_WORKER_ID" in env or "TPU_WORKER_HOSTNAMES" in env
    if running_in_cloud_tpu_vm:
        return "tpu"
    return None


def initialize_distributed(config: Any = None) -> DistributedInfo:
    """Starts ``jax.distributed`` as the config/environment says; a no-op for one process.

    Args:
      config: the ``config.distributed`` section (see :func:`distributed_config`), a mapping
        with a subset of its keys, or None (= all defaults).
    """
    cfg = _as_dict(config)
    if jax.distributed.is_initialized():
        return DistributedInfo(jax.process_index(), jax.process_count(), "already")
    if not cfg.get("enabled", True):
        return DistributedInfo(0, 1, "single")

    address = (cfg.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS", "")).strip()
    num_processes = _int_setting(cfg, "num_processes", "JAX_NUM_PROCESSES", 0)
    process_id = _int_setting(cfg, "process_id", "JAX_PROCESS_ID", -1)
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"distributed.num_processes must be >= 1, got {num_processes}")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"distributed.process_id={process_id} is outside [0, num_processes={num_processes})")
    if num_processes == 1:
        return DistributedInfo(0, 1, "single")

    ids = cfg.get("local_device_ids") or None
    if isinstance(ids, str):
        try:
            ids = [int(i) for i in ids.split(",") if i.strip()]
        except ValueError:
            raise ValueError(f"distributed.local_device_ids must look like '0,1,2', got {cfg['local_device_ids']!r}") from None
    timeouts = {
        "initialization_timeout": int(cfg.get("initialization_timeout", 300)),
        "heartbeat_timeout_seconds": int(cfg.get("heartbeat_timeout", 100)),
    }
    cluster = cluster_environment() if cfg.get("auto_detect", True) else None

    if address:
        if cluster is None and (num_processes is None or process_id is None):
            raise ValueError(
                f"distributed: coordinator_address={address!r} is set but "
                f"num_processes={num_processes} / process_id={process_id} are not, and no cluster "
                "environment (SLURM, Open MPI, Cloud TPU) can supply them; set distributed.num_processes "
                "and distributed.process_id (or JAX_NUM_PROCESSES / JAX_PROCESS_ID)"
            )
        method = "explicit"
        kwargs = {"coordinator_address": address, "num_processes": num_processes, "process_id": process_id}
        if num_processes is not None and process_id is not None:
            # Everything is explicit: keep JAX's cluster detection out, or on SLURM it would
            # restrict each process to GPU ``SLURM_LOCALID`` (one process per GPU assumed).
            kwargs["cluster_detection_method"] = "deactivate"
    elif cluster is not None:
        method = "auto"
        kwargs = {"num_processes": num_processes, "process_id": process_id}
    elif num_processes is not None or process_id is not None:
        raise ValueError(
            f"distributed: num_processes={num_processes} / process_id={process_id} are set but no "
            "coordinator_address (or JAX_COORDINATOR_ADDRESS) and no cluster environment was found"
        )
    else:
        return DistributedInfo(0, 1, "single")

    _log.info("jax.distributed.initialize(%s) [%s, cluster=%s]", kwargs, method, cluster)
    try:
        jax.distributed.initialize(local_device_ids=ids, **kwargs, **timeouts)
    except RuntimeError as err:
        raise RuntimeError(
            f"jax.distributed.initialize failed ({method}, {kwargs}): {err}. It must run before any "
            "JAX computation, and every process must reach the coordinator within "
            f"{timeouts['initialization_timeout']} s"
        ) from err
    return DistributedInfo(jax.process_index(), jax.process_count(), method)


def is_main_process() -> bool:
    """True on process 0, the one that writes logs and metrics."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (no-op for one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
