"""The two sides of the sampling benchmark (``tools/bench_sample.py``), as worker processes.

* ``serve_jaxalign``: ``jaxalign.sampling.sample`` on the checkpoint loaded by
  ``jaxalign.models.from_pretrained`` (one program call: ``batch_size`` = the case's prompts,
  one bucket = the prompt length, no stop ids, so every row runs ``new_tokens`` steps).
* ``serve_transformers``: ``AutoModelForCausalLM.from_pretrained(...).generate`` on the same
  files, ``min_new_tokens = max_new_tokens`` (so it also produces exactly ``new_tokens``),
  ``top_k=0``, ``top_p=1`` (transformers' default ``top_k=50`` is switched off to match).
  With several samples per prompt, sampling uses ``num_return_sequences`` (transformers
  expands the prompts before the prefill); greedy refuses ``num_return_sequences > 1``, so
  the prompts are expanded the same way by hand (``repeat_interleave``): the same work.

Both answer the requests of ``jaxalign.bench.session.serve``: ``setup`` (load; a one-token
call twice, for the prefill estimate; the warm-up call, which compiles on our side),
``window`` (one timed call) and ``finish`` (peak memory). Memory of a call: the kernel's
high-water mark (``VmHWM``) is reset (``/proc/self/clear_refs`` 5) just before the call and
read after it, next to the resident set (``VmRSS``) just before it. ``cpu_s``: the process's
CPU time in the call (all threads), so ``cpu_s / seconds`` is how many cores it actually got
on a machine shared with other work. Compilation on our side:
the durations JAX reports (``jax.monitoring``: tracing, lowering, XLA compile) during a call.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Case", "kv_cache_bytes", "serve_jaxalign", "serve_transformers"]


@dataclass(frozen=True)
class Case:
    """One measured configuration: ``rows = prompts * samples`` sequences of ``new_tokens``."""

    rows: int
    samples: int
    temperature: float  # 0 = greedy
    new_tokens: int
    dtype: str = "float32"
    seed: int = 0

    @property
    def prompts(self) -> int:
        return self.rows // self.samples

    @property
    def mode(self) -> str:
        return "greedy" if self.temperature == 0 else f"sample T={self.temperature:g}"

    @property
    def label(self) -> str:
        return f"{self.rows}rows-{self.prompts}x{self.samples}-{'greedy' if self.temperature == 0 else 'sample'}"


def kv_cache_bytes(*, layers: int, rows: int, slots: int, kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Keys and values of every layer: ``2 * layers * rows * slots * kv_heads * head_dim * bytes``."""
    return 2 * layers * rows * slots * kv_heads * head_dim * dtype_bytes


def _status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Side:
    """Common timing and memory bookkeeping; subclasses define ``_load``, ``_call(new_tokens)``
    (returns generated tokens ``[rows, new]`` as numpy) and ``_weight_bytes``."""

    side = ""

    def __init__(self, *, model_dir: str, prompts: np.ndarray, case: dict[str, Any], threads: int):
        self.model_dir, self.case, self.threads = model_dir, Case(**case), threads
        self.prompts = np.asarray(prompts, np.int32)

    def _timed(self, new_tokens: int) -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        tokens = self._call(new_tokens)
        return time.perf_counter() - start, tokens

    def setup(self) -> dict[str, Any]:
        start = time.perf_counter()
        self._load()
        info: dict[str, Any] = {"side": self.side, "load_s": time.perf_counter() - start, "case": asdict(self.case),
                                "weight_bytes": self._weight_bytes(), **self._versions()}
        # The one-token calls first (prefill estimate), then the warm-up call at full length.
        c0 = self._compile_total()
        info["first_one_token_call_s"], _ = self._timed(1)
        c1 = self._compile_total()
        info["one_token_call_s"], _ = self._timed(1)
        info["first_call_s"], tokens = self._timed(self.case.new_tokens)
        c2 = self._compile_total()
        if c0 is not None:  # tracing + lowering + XLA compilation, as JAX reports them
            info["compile_one_token_s"], info["compile_s"] = c1 - c0, c2 - c1
        info["warmup_tokens"] = tokens.tolist() if self.case.temperature == 0 else None
        info["rss_after_setup_bytes"] = _status_kib("VmRSS")
        return info

    def window(self, _n: int) -> dict[str, Any]:
        reset = _reset_peak()
        before = _status_kib("VmRSS")
        c0 = self._compile_total()
        cpu = time.process_time()
        seconds, tokens = self._timed(self.case.new_tokens)
        cpu = time.process_time() - cpu
        peak = _status_kib("VmHWM")
        c1 = self._compile_total()
        return {"seconds": seconds, "cpu_s": cpu, "rows": int(tokens.shape[0]), "tokens": int(tokens.size),
                "rss_before_bytes": before, "call_peak_rss_bytes": peak if reset else None,
                "compile_s_in_call": None if c0 is None else c1 - c0, **self._after_call()}

    def _compile_total(self) -> float | None:
        return None

    def _after_call(self) -> dict[str, Any]:
        return {}

    def finish(self) -> dict[str, Any]:
        from jaxalign.perf.memory import peak_rss_bytes

        return {"peak_rss_bytes": peak_rss_bytes(), "pid": os.getpid()}


class JaxalignSide(_Side):
    side = "jaxalign"

    def _versions(self) -> dict[str, Any]:
        import jax

        return {"jax_version": jax.__version__, "backend": jax.default_backend(),
                "device_kind": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", "")}

    def _load(self) -> None:
        import jax.numpy as jnp
        from flax import nnx

        from jaxalign import models

        import jax

        self._compile_events: list[float] = []
        jax.monitoring.register_event_duration_secs_listener(
            lambda event, seconds, **_: self._compile_events.append(seconds)
            if event.startswith("/jax/core/compile/") else None)
        dtype = getattr(jnp, self.case.dtype)
        model = models.from_pretrained(self.model_dir, dtype=dtype, param_dtype=dtype)
        self.graphdef, self.params = nnx.split(model)
        self.pad_id = model.config.pad_token_id or 0
        self.prompt_list = [p for p in self.prompts[: self.case.prompts]]

    def _compile_total(self) -> float:
        return float(sum(self._compile_events))

    def _weight_bytes(self) -> int:
        import jax

        return int(sum(x.nbytes for x in jax.tree.leaves(self.params)))

    def _cache_size(self) -> int | None:
        from jaxalign.sampling import sampler

        size = getattr(sampler._compiled, "_cache_size", None)  # jit's count of compiled programs
        return size() if callable(size) else None

    def _call(self, new_tokens: int) -> np.ndarray:
        from jaxalign.sampling import SamplingConfig, sample

        c = self.case
        config = SamplingConfig(max_new_tokens=new_tokens, num_samples=c.samples, temperature=c.temperature,
                                top_p=1.0, top_k=0, seed=c.seed, stop_ids=(), pad_id=self.pad_id,
                                batch_size=c.prompts, buckets=(self.prompts.shape[1],))
        out = sample(self.graphdef, self.params, self.prompt_list, config)
        if int(out.mask.sum()) != out.mask.size:
            raise RuntimeError(f"jaxalign generated {int(out.mask.sum())} of {out.mask.size} tokens")
        return out.tokens.reshape(c.rows, new_tokens)

    def setup(self) -> dict[str, Any]:
        info = super().setup()
        info["compiled_programs"] = self._cache_size()
        return info

    def _after_call(self) -> dict[str, Any]:
        return {"compiled_programs": self._cache_size()}


class TransformersSide(_Side):
    side = "transformers"

    def _versions(self) -> dict[str, Any]:
        import torch
        import transformers

        return {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
                "torch_threads": torch.get_num_threads(),
                "attn_implementation": getattr(self.model.config, "_attn_implementation", None)}

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(self.threads)
        self.torch = torch
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, self.case.dtype),
                                                          local_files_only=True).eval()
        c = self.case
        ids = torch.as_tensor(self.prompts[: c.prompts], dtype=torch.long)
        greedy = c.temperature == 0
        if greedy and c.samples > 1:  # generate refuses num_return_sequences > 1 without sampling
            ids = ids.repeat_interleave(c.samples, dim=0)
        self.ids = ids
        self.kwargs = dict(do_sample=not greedy, num_return_sequences=1 if greedy else c.samples,
                           pad_token_id=self.model.config.pad_token_id, use_cache=True)
        if not greedy:  # transformers' default top_k=50 off, as ours
            self.kwargs.update(temperature=c.temperature, top_k=0, top_p=1.0)

    def _weight_bytes(self) -> int:
        return int(sum(p.numel() * p.element_size() for p in self.model.parameters()))

    def _call(self, new_tokens: int) -> np.ndarray:
        torch = self.torch
        torch.manual_seed(self.case.seed)
        with torch.inference_mode():
            out = self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), max_new_tokens=new_tokens,
                                      min_new_tokens=new_tokens, **self.kwargs)
        new = out[:, self.ids.shape[1]:]
        if new.shape != (self.case.rows, new_tokens):
            raise RuntimeError(f"transformers generated {tuple(new.shape)}, expected {(self.case.rows, new_tokens)}")
        return new.numpy()


def serve_jaxalign(conn, **kwargs: Any) -> None:
    from jaxalign.bench.session import serve

    serve(JaxalignSide(**kwargs), conn)


def serve_transformers(conn, **kwargs: Any) -> None:
    from jaxalign.bench.session import serve

    serve(TransformersSide(**kwargs), conn)
