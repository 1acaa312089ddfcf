"""Peak memory of the process (CPU) and of the accelerator (GPU/TPU)."""

from __future__ import annotations

import resource
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["device_peak_bytes", "peak_rss_bytes"]


def peak_rss_bytes() -> int:
    """The process's peak resident set size in bytes (``VmHWM``; ``ru_maxrss`` elsewhere)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def device_peak_bytes(devices: Sequence[Any] | None = None) -> int | None:
    """The largest ``peak_bytes_in_use`` of ``devices`` (default: the first JAX device), or None
    where the backend keeps no statistics for one of them (CPU)."""
    if devices is None:
        import jax

        devices = jax.devices()[:1]
    peaks = [(d.memory_stats() or {}).get("peak_bytes_in_use") for d in devices]
    if not peaks or any(p is None for p in peaks):
        return None
    return int(max(peaks))
