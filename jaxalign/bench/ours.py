"""The jaxalign side of the benchmark: the trainer's own run assembly and jitted step.

A variant is built exactly as ``python -m jaxalign.train`` builds a run
(``jaxalign.train.run.prepare`` on a config from ``base_config()``) and stepped as the
trainer's loop steps it (host batch -> ``Run.place_train`` -> ``Run.train_step``, metrics
left on the device), without eval, checkpoints or logging.

With ``cache_dir`` shared, the first precomputed variant of a run builds the reference cache
inside ``prepare`` (timed in ``prepare_s``) and the others load it.

Steady state: before the first timed window every batch shape the loader yields in the steps
the benchmark runs (``planned_steps``: packed batches vary in rows, padded ones in length) is
compiled ahead of time (one ``lower().compile()`` per shape, timed as ``compile_s``), run
once, and ``warmup_steps`` more steps are run. A window then runs ``n`` steps back to back
and waits for the last one; its time covers batch assembly on the host and the device work.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["OursBench", "OursVariant", "ablation_ladder", "with_tcmalloc", "without_huge_pages"]


@dataclass(frozen=True)
class OursVariant:
    """One jaxalign configuration: which of the throughput features are on."""

    name: str
    reference: str = "frozen"  # frozen (reference forward in the step) | precomputed (cache)
    packing: bool = False  # several sequences per row (segment ids)
    bucketing: bool = True  # pad each batch to the smallest bucket that fits (else to max_length)
    chunked_logps: bool = True  # log-probs from hidden states in chunks (else one [R, L, V] chunk)
    dtype: str = "float32"  # compute dtype (model.dtype; parameters and optimizer stay float32)
    remat: str = "none"  # per-layer rematerialisation policy
    scored_lm_head: bool = True  # unembedding only at scored positions (else every position, as before)
    block_attention: bool = True  # query blocks over their causal key prefix (else one full score matrix)
    allocator: str = ""  # malloc library LD_PRELOADed into the worker ("" = the C library's)
    huge_pages: bool = True  # malloc's transparent huge pages, as python -m jaxalign.train runs (config.huge_pages)

    @property
    def on_the_fly_reference(self) -> bool:
        return self.reference == "frozen"


TCMALLOC = "tcmalloc_minimal"  # gperftools' malloc (Debian/Ubuntu: libtcmalloc-minimal4)


def with_tcmalloc(variant: OursVariant) -> OursVariant:
    """``variant`` under gperftools' malloc (``jaxalign/+tcmalloc`` on the last ladder step): it
    keeps freed memory for reuse, where glibc maps the large temporaries XLA:CPU allocates for
    every call afresh and faults them in again every step. A deployment choice, not a trainer
    feature: outside the ladder and the headline."""
    return dataclasses.replace(variant, name="jaxalign/+tcmalloc", allocator=TCMALLOC)


def without_huge_pages(variant: OursVariant) -> OursVariant:
    """``variant`` with malloc's 4 KiB pages (``jaxalign/-huge-pages`` on the last ladder step),
    as the trainer ran before ``config.huge_pages``: the in-run factor of the huge pages."""
    return dataclasses.replace(variant, name="jaxalign/-huge-pages", huge_pages=False)


def ablation_ladder() -> list[OursVariant]:
    """The trainer's throughput features switched on one at a time, each variant adding one
    to the previous: ``+reference-cache`` has every feature in float32, ``+bfloat16`` computes
    in bfloat16 (float32 master weights, log-softmax and loss), like TRL's default autocast."""
    base = OursVariant("jaxalign/baseline", bucketing=False, chunked_logps=False, scored_lm_head=False,
                       block_attention=False)
    steps = [
        ("jaxalign/+bucketing", {"bucketing": True}),
        ("jaxalign/+chunked-logps", {"chunked_logps": True}),
        ("jaxalign/+scored-lm-head", {"scored_lm_head": True}),
        ("jaxalign/+block-attention", {"block_attention": True}),
        ("jaxalign/+packing", {"packing": True}),
        ("jaxalign/+reference-cache", {"reference": "precomputed"}),
        ("jaxalign/+bfloat16", {"dtype": "bfloat16"}),
    ]
    out = [base]
    for name, change in steps:
        out.append(dataclasses.replace(out[-1], name=name, **change))
    return out


def make_config(workload: dict[str, Any], variant: OursVariant, *, batch: int, seed: int, learning_rate: float,
                cache_dir: str = ""):
    """The trainer config of ``variant`` on the workload (validated). ``cache_dir``: where the
    reference log-prob cache is kept ("" = the run directory's)."""
    from jaxalign.data.batching import bucket_ladder
    from jaxalign.train.config import base_config, validate

    max_length = workload["max_length"]
    c = base_config()
    c.seed = seed
    c.steps = 1_000_000  # only the schedule reads it: the benchmark stops by itself
    c.progress_bar = False
    c.model.path = workload["model_dir"]
    c.model.dtype = variant.dtype
    c.model.remat = variant.remat
    c.model.logits_chunk = 0 if variant.chunked_logps else max_length
    c.model.lm_head = "scored" if variant.scored_lm_head else "all"
    c.model.query_block = c.model.query_block if variant.block_attention else 0
    c.data.train = workload["pairs_file"]
    c.data.format = "standard"
    c.data.eval_pairs = 0
    c.data.max_length = max_length
    c.data.max_prompt_length = max_length - 1
    c.data.batch_size = batch
    c.data.packing = variant.packing
    c.data.buckets = bucket_ladder(max_length) if variant.bucketing else (max_length,)
    c.loss.name = "dpo"
    c.loss.beta = 0.1
    c.reference.mode = variant.reference
    c.reference.cache_dir = cache_dir
    c.optimizer.name = "adamw"
    c.optimizer.learning_rate = learning_rate
    c.optimizer.schedule = "constant"
    c.mesh.data = c.mesh.fsdp = c.mesh.tensor = 1
    return validate(c)


class OursBench:
    """Worker-side state of one jaxalign variant (see the module docstring)."""

    def __init__(self, workload: dict[str, Any], variant: OursVariant, *, batch: int, warmup_steps: int,
                 planned_steps: int, workdir: str, seed: int = 0, learning_rate: float = 1e-6, cache_dir: str = ""):
        self.workload, self.variant, self.cache_dir = workload, variant, cache_dir
        self.batch, self.warmup_steps, self.planned_steps = batch, warmup_steps, planned_steps
        self.workdir, self.seed, self.learning_rate = workdir, seed, learning_rate
        self.run: Any = None
        self.state: Any = None
        self.metrics: Any = None

    # -- set-up ------------------------------------------------------------------------------

    def _host_step_batch(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from jaxalign.data.batching import stack_micro_batches

        return stack_micro_batches([batch])

    def _shape_batches(self) -> list[dict[str, np.ndarray]]:
        """One real batch of every ``[rows, length]`` the loader yields in the ``planned_steps``
        steps the benchmark runs from the loader's start (packing: rows vary, padding: length)."""
        loader = self.run.train_loader
        first: dict[tuple[int, int], tuple[int, int]] = {}
        epoch, left = 0, self.planned_steps
        while left > 0:
            shapes = loader.batch_shapes(epoch)[:left]
            for k, shape in enumerate(shapes):
                first.setdefault(shape, (epoch, k))
            epoch, left = epoch + 1, left - len(shapes)
        return [loader.batch_at(e, k) for e, k in first.values()]

    def setup(self) -> dict[str, Any]:
        import jax

        from jaxalign.train.run import prepare

        config = make_config(self.workload, self.variant, batch=self.batch, seed=self.seed,
                             learning_rate=self.learning_rate, cache_dir=self.cache_dir)
        cached = bool(self.cache_dir) and os.path.isdir(self.cache_dir) and bool(os.listdir(self.cache_dir))
        start = time.perf_counter()
        self.run = prepare(config, self.workdir)
        prepare_s = time.perf_counter() - start
        self.state = self.run.state
        info: dict[str, Any] = {"prepare_s": prepare_s,
                                "built_reference_cache": self.variant.reference == "precomputed" and not cached}
        compile_s, shapes = 0.0, []
        step = self.run.train_step
        for batch in self._shape_batches():
            device = self.run.place_train(self._host_step_batch(batch), stacked=True)
            t = time.perf_counter()
            step.lower(self.state, device, self.run.reference_params).compile()
            compile_s += time.perf_counter() - t
            shapes.append(list(batch["input_ids"].shape))
            self.state, self.metrics = step(self.state, device, self.run.reference_params)
        jax.block_until_ready(self.state)
        t = time.perf_counter()
        self.window(self.warmup_steps)
        info.update(compile_s=compile_s, compiled_shapes=shapes, warmup_s=time.perf_counter() - t,
                    batches_per_epoch=self.run.train_loader.batches_in_epoch(0),
                    pairs_per_epoch=len(self.run.train_loader.examples),
                    pack_rows=getattr(self.run.train_loader, "pack_rows", None))
        return info

    # -- measurement -------------------------------------------------------------------------

    def window(self, steps: int) -> dict[str, Any]:
        """Runs ``steps`` steps and waits for the last; counts pairs and tokens on the host."""
        import jax

        run = self.run
        pairs = tokens = slots = completion = 0.0
        start = time.perf_counter()
        for _ in range(steps):
            host = self._host_step_batch(next(run.train_loader))
            pairs += float(host["pair_mask"].sum())
            tokens += float(np.count_nonzero(host["segment_ids"]))
            slots += float(host["segment_ids"].size)
            completion += float(host["loss_mask"].sum())
            self.state, self.metrics = run.train_step(self.state, run.place_train(host, stacked=True),
                                                      run.reference_params)
        jax.block_until_ready(self.state)
        seconds = time.perf_counter() - start
        return {"steps": steps, "seconds": seconds, "pairs": pairs, "tokens": tokens, "row_slots": slots,
                "completion_tokens": completion}

    def finish(self) -> dict[str, Any]:
        import jax

        from jaxalign.perf.memory import device_peak_bytes, peak_rss_bytes

        loss = float(jax.device_get(self.metrics["loss"])) if self.metrics is not None else math.nan
        return {"peak_rss_bytes": peak_rss_bytes(), "device_peak_bytes": device_peak_bytes(), "last_loss": loss,
                "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                "pid": os.getpid()}


def serve_ours(conn, **kwargs: Any) -> None:
    """Worker entry point: serves ``OursBench(**kwargs)`` on ``conn``."""
    from jaxalign.bench.session import serve

    serve(OursBench(**kwargs), conn)
