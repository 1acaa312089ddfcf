"""The devices' peak FLOP/s: the vendor's data-sheet figure for accelerators, measured on CPU.

``vendor_peak`` looks an accelerator's dense peak up by its ``device_kind``.
``measured_matmul_peak`` times ``C = A @ B`` for square ``n x n`` operands (``2 n^3`` FLOPs)
under ``jax.jit`` and returns the best of ``repeats`` timed runs (after one compile-and-warm
run): the highest FLOP/s this backend reaches on this machine for that dtype, which is the
denominator of the CPU MFU (``tools/bench.py``).
"""

from __future__ import annotations

import time

__all__ = ["VENDOR_PEAKS", "measured_matmul_peak", "vendor_peak"]

# Dense (no sparsity) peak FLOP/s from the vendors' data sheets, by dtype.
VENDOR_PEAKS: dict[str, dict[str, float]] = {
    "H100 SXM": {"bfloat16": 989.4e12, "float16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12},
    "H100 PCIe": {"bfloat16": 756.0e12, "float16": 756.0e12, "tf32": 378.0e12, "float32": 51.2e12},
    "H200": {"bfloat16": 989.4e12, "float16": 989.4e12, "tf32": 494.7e12, "float32": 66.9e12},
    "A100": {"bfloat16": 312.0e12, "float16": 312.0e12, "tf32": 156.0e12, "float32": 19.5e12},
    "TPU v5e": {"bfloat16": 197.0e12},
    "TPU v5p": {"bfloat16": 459.0e12},
}
# device_kind substrings -> VENDOR_PEAKS key (first match wins).
_KINDS = (("H100 PCIe", "H100 PCIe"), ("H100", "H100 SXM"), ("H200", "H200"), ("A100", "A100"),
          ("v5 lite", "TPU v5e"), ("v5e", "TPU v5e"), ("v5p", "TPU v5p"))


def vendor_peak(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """The data-sheet dense peak FLOP/s of ``device_kind`` for ``dtype``; None when unknown."""
    for fragment, key in _KINDS:
        if fragment.lower() in device_kind.lower():
            return VENDOR_PEAKS[key].get(dtype)
    return None


def measured_matmul_peak(n: int = 3072, dtype: str = "float32", repeats: int = 5) -> dict[str, float]:
    """``{"flops_per_s", "seconds", "n", ...}``: best FLOP/s of an ``n x n`` matmul under jit."""
    import jax
    import jax.numpy as jnp

    if n < 1 or repeats < 1:
        raise ValueError(f"measured_matmul_peak needs n >= 1 and repeats >= 1, got n={n}, repeats={repeats}")
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.dtype(dtype))
    # Low-precision operands accumulate in float32, as the trainer's products do (jaxalign.precision).
    matmul = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.promote_types(x.dtype, jnp.float32)))
    matmul(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"flops_per_s": 2.0 * n**3 / best, "seconds": best, "median_seconds": sorted(times)[len(times) // 2],
            "n": n, "dtype": dtype, "repeats": repeats}
