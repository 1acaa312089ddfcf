"""How much of the hardware the training steps use, for the logged metrics: model FLOP/s,
model FLOP utilisation (MFU) and peak memory.

Counted as the benchmark counts them (``jaxalign.perf.flops``): ``6N`` FLOPs per real
(non-padding) token for the policy's forward and backward, ``2N`` more when the frozen
reference runs inside the step (``2 N_reference`` for a reference of another size), with
``N`` = the decoder blocks' parameters + the unembedding matmul. Attention's score and value
products, padding and recomputation (remat) are not counted: the figure is useful work.
``mfu = model FLOP/s / peak``, the peak being that of this process's devices together.

Peak memory: the most any of this process's devices has held (``peak_bytes_in_use``) where
the backend keeps statistics (GPU, TPU), else the process's peak resident set (CPU).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jaxalign.perf.flops import mfu, param_counts, train_flops_per_token
from jaxalign.perf.memory import device_peak_bytes, peak_rss_bytes
from jaxalign.perf.peak import vendor_peak

__all__ = ["flop_rates", "flops_per_token", "peak_flops", "peak_memory"]

# model.dtype -> the data-sheet column its matrix products run at on a GPU (float32: TF32,
# JAX's default matmul precision there).
_PEAK_COLUMN = {"bfloat16": "bfloat16", "float16": "float16", "float32": "tf32"}


def flops_per_token(policy_config: Any, reference_config: Any | None = None) -> int:
    """``6 N_policy`` per real token, ``+ 2 N_reference`` when a reference runs in the step."""
    policy = train_flops_per_token(param_counts(policy_config).flop_params, reference_on_the_fly=False)
    if reference_config is None:
        return policy
    return policy + 2 * param_counts(reference_config).flop_params


def peak_flops(per_device: float, devices: Sequence[Any], dtype: str) -> float | None:
    """Peak FLOP/s of ``devices`` together: ``per_device`` each when > 0, else the data sheet's
    dense peak for their ``device_kind`` and ``dtype``; None when unknown (CPUs, unlisted kinds)."""
    if per_device > 0:
        return per_device * len(devices)
    sheet = vendor_peak(devices[0].device_kind, _PEAK_COLUMN[dtype])
    return sheet * len(devices) if sheet else None


def flop_rates(tokens_per_second: float, flops_per_token: int, peak: float | None) -> dict[str, float]:
    """``model_flops_per_second`` for a token rate, and ``mfu`` when the peak is known."""
    achieved = tokens_per_second * flops_per_token
    return {"model_flops_per_second": achieved, **({"mfu": mfu(achieved, peak)} if peak else {})}


def peak_memory(devices: Sequence[Any]) -> dict[str, float]:
    """``{"peak_device_memory_gib": ...}`` (the largest device peak) where the devices keep memory
    statistics, else ``{"peak_host_memory_gib": ...}`` (the process's peak resident set)."""
    peak = device_peak_bytes(devices)
    if peak is not None:
        return {"peak_device_memory_gib": peak / 2**30}
    return {"peak_host_memory_gib": peak_rss_bytes() / 2**30}
