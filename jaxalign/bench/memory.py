"""Peak memory of the process (CPU) and of the accelerator (GPU/TPU)."""

from __future__ import annotations

import resource
import sys

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


def device_peak_bytes() -> int | None:
    """``peak_bytes_in_use`` of the first JAX device, or None where the backend keeps no stats (CPU)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats:
        return None
    value = stats.get("peak_bytes_in_use")
    return int(value) if value is not None else None
