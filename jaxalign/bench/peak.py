"""The benchmark's peak-FLOP/s worker: JAX's measured matmul peak (``jaxalign.perf.peak``) and
the same measurement in PyTorch, which is what TRL's matmuls can reach.
"""

from __future__ import annotations

import time

from jaxalign.perf.peak import measured_matmul_peak, vendor_peak

__all__ = ["PeakBench", "serve_peak", "torch_matmul_peak"]


def torch_matmul_peak(n: int = 3072, dtype: str = "float32", repeats: int = 5) -> dict[str, float]:
    """The same measurement in PyTorch (CPU): what TRL's matmuls can reach (bfloat16 uses AMX
    where the CPU has it)."""
    import torch

    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=gen).to(dt)
    b = torch.randn(n, n, generator=gen).to(dt)
    a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    best = min(times)
    return {"flops_per_s": 2.0 * n**3 / best, "seconds": best, "n": n, "dtype": dtype, "repeats": repeats,
            "threads": torch.get_num_threads()}


class PeakBench:
    """Worker measuring the peaks on ``setup`` and on each ``window`` request (JAX float32 and
    bfloat16 with float32 accumulation; PyTorch float32/bfloat16 if asked)."""

    def __init__(self, *, n: int, repeats: int, torch_threads: int | None):
        self.n, self.repeats, self.torch_threads = n, repeats, torch_threads

    def setup(self) -> dict:
        import jax

        out = {"jax_float32": measured_matmul_peak(self.n, "float32", self.repeats),
               "jax_bfloat16": measured_matmul_peak(self.n, "bfloat16", self.repeats),
               "device_kind": jax.devices()[0].device_kind, "backend": jax.default_backend()}
        if out["backend"] != "cpu":
            out["vendor"] = {d: vendor_peak(out["device_kind"], d) for d in ("bfloat16", "tf32", "float32")}
        if self.torch_threads:
            import torch

            torch.set_num_threads(self.torch_threads)
            out["torch_float32"] = torch_matmul_peak(self.n, "float32", self.repeats)
            out["torch_bfloat16"] = torch_matmul_peak(self.n, "bfloat16", self.repeats)
        return out

    def window(self, steps: int) -> dict:
        """Measures again (the benchmark asks once more after the timed windows)."""
        return self.setup()

    def finish(self) -> dict:
        return {}


def serve_peak(conn, **kwargs) -> None:
    """Worker entry point for ``PeakBench``."""
    from jaxalign.bench.session import serve

    serve(PeakBench(**kwargs), conn)
