"""Transparent huge pages for the host memory XLA allocates through glibc's malloc (Linux).

XLA:CPU allocates the buffers of every call of a compiled step afresh and frees them when the
call ends. glibc's malloc maps large blocks with ``mmap`` and unmaps them on ``free``, so every
step faults its working memory in again, 4 KiB at a time: about 0.6 million page faults per
float32 step of the benchmark's DPO workload, 13% of its CPU time in the kernel. glibc >= 2.35 can
advise the kernel to back its mappings with 2 MiB transparent huge pages (the tunable
``glibc.malloc.hugetlb=1``); where the kernel's THP mode is ``madvise`` or ``always`` that step
then takes a few thousand faults and, in most measurements, runs 1.09-1.26x faster with the
same peak memory (docs/performance.md, which also says when it does not help).

Tunables are read once, when a process starts, so ``python -m jaxalign.train`` re-executes
itself once (same PID, same arguments) with ``GLIBC_TUNABLES`` extended, before it imports
JAX. It does so only where this was measured to help, a CPU host (``cpu_host``: XLA:CPU's
per-call buffers; on a GPU or TPU host the step's buffers live in device memory, and nobody
measured what the tunable does there), and only when it can take effect. Nothing happens:

* on a host with an accelerator: ``JAX_PLATFORMS`` names anything but ``cpu``, or, with
  ``JAX_PLATFORMS`` unset or empty, a device file of one is present (``/dev/nvidia<N>``,
  ``/dev/nvidiactl``, ``/dev/dxg`` (WSL2), ``/dev/kfd`` (ROCm), ``/dev/accel<N>`` (TPU v4),
  ``/dev/vfio/<N>`` (TPU v5e and later), ``/dev/neuron<N>``). ``JAX_PLATFORMS=cpu`` makes any
  host a CPU host (JAX will not use its accelerator);
* when ``glibc.malloc.hugetlb`` is already in ``GLIBC_TUNABLES`` (``=0`` opts out; the
  trainer's own switch is ``--config.huge_pages=False``);
* with another C library, glibc < 2.35, or THP ``never``.

``restart_environment`` is the whole decision; ``huge_page_environment`` is the part without
the host check (the benchmark starts its CPU workers with it).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

__all__ = [
    "TUNABLE", "cpu_host", "glibc_version", "huge_page_environment", "reexec_with_huge_pages",
    "restart_environment", "thp_mode",
]

TUNABLE = "glibc.malloc.hugetlb"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb
# Device files of accelerators JAX can use (cf. jax/_src/hardware_utils.py), relative to /dev.
ACCELERATOR_DEVICES = re.compile(r"^(nvidia\d+|nvidiactl|dxg|kfd|accel\d+|neuron\d+|vfio/\d+)$")


def _platforms(environ: Mapping[str, str]) -> list[str]:
    value = environ.get("JAX_PLATFORMS", "") or environ.get("JAX_PLATFORM_NAME", "")
    return [p.strip().lower() for p in value.split(",") if p.strip()]


def cpu_host(environ: Mapping[str, str], dev: str = "/dev") -> bool:
    """Whether JAX will compute on the CPU here, decided without importing JAX: from
    ``JAX_PLATFORMS`` (``JAX_PLATFORM_NAME`` if that is unset) when set, True iff it names
    only ``cpu``; otherwise True iff ``dev`` holds no accelerator device file
    (``ACCELERATOR_DEVICES``: NVIDIA, WSL2, ROCm, TPU, Neuron)."""
    platforms = _platforms(environ)
    if platforms:
        return all(p == "cpu" for p in platforms)
    try:
        names = os.listdir(dev)
    except OSError:
        return True
    if "vfio" in names:
        try:
            names += [f"vfio/{n}" for n in os.listdir(os.path.join(dev, "vfio"))]
        except OSError:
            pass
    return not any(ACCELERATOR_DEVICES.match(n) for n in names)


def glibc_version() -> tuple[int, int] | None:
    """The running glibc's ``(major, minor)``; None for another C library."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else None
    except (AttributeError, ValueError, OSError):  # no confstr, unknown name, another format
        return None


def thp_mode(path: str = THP_ENABLED) -> str:
    """The kernel's transparent-huge-page mode (``always``, ``madvise``, ``never``); "" if unknown."""
    try:
        with open(path, encoding="ascii") as f:
            text = f.read()
    except OSError:
        return ""
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return ""


def huge_page_environment(
    environ: Mapping[str, str], *, glibc: tuple[int, int] | None = None, thp: str | None = None
) -> dict[str, str]:
    """The variables to set on top of ``environ`` for malloc's huge pages: ``GLIBC_TUNABLES``
    with ``glibc.malloc.hugetlb=1`` appended, or {} when that would change nothing (the
    tunable is already there, whatever its value; the C library is not glibc >= 2.35; the
    kernel has no transparent huge pages to give). ``glibc``/``thp`` default to this
    machine's (``glibc_version()``, ``thp_mode()``)."""
    tunables = environ.get("GLIBC_TUNABLES", "")
    if any(item.split("=", 1)[0] == TUNABLE for item in tunables.split(":")):
        return {}
    glibc = glibc_version() if glibc is None else glibc
    thp = thp_mode() if thp is None else thp
    if glibc is None or glibc < MIN_GLIBC or thp not in ("always", "madvise"):
        return {}
    return {"GLIBC_TUNABLES": f"{tunables}:{TUNABLE}=1" if tunables else f"{TUNABLE}=1"}


def restart_environment(
    environ: Mapping[str, str], *, dev: str = "/dev", glibc: tuple[int, int] | None = None, thp: str | None = None
) -> dict[str, str]:
    """What the trainer's restart sets: ``huge_page_environment`` on a CPU host
    (``cpu_host(environ, dev)``), {} (no restart) on any other."""
    if not cpu_host(environ, dev):
        return {}
    return huge_page_environment(environ, glibc=glibc, thp=thp)


def reexec_with_huge_pages() -> None:
    """Replaces this process by the same command with ``restart_environment`` set (see the
    module docstring); returns without doing anything when that is empty. Call it first thing
    in a program's entry point: nothing done before survives."""
    changes = restart_environment(os.environ)
    if not changes:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **changes})
