"""The TRL side of the benchmark: ``trl.DPOTrainer`` (PyTorch, CPU) on the same weights and pairs.

TRL's defaults are kept except where the benchmark needs otherwise: ``use_cpu=True`` when
there is no CUDA device (TRL's default ``bf16=True`` refuses to start on such a machine
without it, and with it trains in bfloat16 autocast), ``max_steps`` (the benchmark stops the loop itself),
``save_strategy="no"``, ``report_to="none"``, ``disable_tqdm=True``, the batch size,
``max_length`` and the learning rate. Everything else (sigmoid DPO loss, beta 0.1, the
reference model on the fly, gradient checkpointing, AdamW, dataloader without workers,
logging every 10 steps) is TRL's default. A variant may change ``bf16``,
``gradient_checkpointing`` and ``precompute_ref_log_probs``.

Measurement: ``trainer.train()`` runs in the worker; a callback answers the parent's requests
at step boundaries, so TRL's own loop (data loading, collation, forward/backward, optimizer,
logging) is what is timed. A wrapper around TRL's collator records each batch's real tokens
and pairs in a FIFO that the callback consumes one batch per step.
"""

from __future__ import annotations

import os
import time
import traceback
from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = ["TRLVariant", "serve_trl", "trl_unavailable_reason"]


@dataclass(frozen=True)
class TRLVariant:
    """A TRL configuration (the fields that differ from TRL's defaults on a CPU machine)."""

    name: str
    bf16: bool = True  # TRL's default: bfloat16 autocast
    gradient_checkpointing: bool = True  # TRL's default
    precompute_ref_log_probs: bool = False  # TRL's default: reference forward in every step
    huge_pages: bool = False  # malloc's transparent huge pages (glibc.malloc.hugetlb=1; a plain python run has none)

    @property
    def on_the_fly_reference(self) -> bool:
        return not self.precompute_ref_log_probs


def trl_unavailable_reason() -> str | None:
    """None when torch, trl and datasets import; otherwise why not."""
    try:
        import datasets  # noqa: F401
        import torch  # noqa: F401
        import trl  # noqa: F401
    except ImportError as e:
        return f"TRL side skipped: {e} (install the 'parity' extra: torch==2.13.0, trl>=1.16)"
    return None


class _CountingCollator:
    """Calls TRL's collator and records each batch's counts (real tokens, pairs, row slots)."""

    def __init__(self, inner: Any, counts: deque):
        self.inner, self.counts = inner, counts

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        out = self.inner(examples)
        ids = out["input_ids"]
        self.counts.append({
            "tokens": float(out["attention_mask"].sum()),
            "pairs": float(ids.shape[0] // 2),
            "row_slots": float(ids.numel()),
            "completion_tokens": float(out["completion_mask"].sum()),
        })
        return out


def _make_callback(conn, warmup_steps: int, counts: deque, started: float):
    from transformers import TrainerCallback

    class Windows(TrainerCallback):
        """Answers the parent's requests at step ends (setup after the warm-up, then windows)."""

        def __init__(self):
            self.done = 0
            self.target: int | None = None
            self.totals: dict[str, float] = {}
            self.window_start = 0.0
            self.train_start = 0.0
            self.setup_info: dict[str, Any] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.train_start = time.perf_counter()
            self.setup_info["trainer_init_s"] = self.train_start - started
            if warmup_steps == 0:
                conn.send({**self.setup_info, "warmup_s": 0.0})
                self._await(control)

        def on_step_end(self, args, state, control, **kwargs):
            self.done += 1
            batch = counts.popleft()
            for k, v in batch.items():
                self.totals[k] = self.totals.get(k, 0.0) + v
            if self.target is None and self.done == warmup_steps:
                conn.send({**self.setup_info, "warmup_s": time.perf_counter() - self.train_start})
                self._await(control)
            elif self.target is not None and self.done == self.target:
                seconds = time.perf_counter() - self.window_start
                conn.send({"steps": self.done - self.first, "seconds": seconds, **self.totals})
                self._await(control)

        def _await(self, control):
            request = conn.recv()
            if request[0] == "window":
                self.first, self.target = self.done, self.done + int(request[1])
                self.totals = {}
                self.window_start = time.perf_counter()
            elif request[0] == "finish":
                control.should_training_stop = True
            else:
                raise ValueError(f"unknown request {request!r}")

    return Windows()


def _trainer(workload: dict[str, Any], variant: TRLVariant, *, batch: int, workdir: str, seed: int,
             learning_rate: float, callback: Any):
    import datasets
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    import torch

    args = DPOConfig(
        output_dir=workdir, use_cpu=not torch.cuda.is_available(), bf16=variant.bf16,
        gradient_checkpointing=variant.gradient_checkpointing,
        precompute_ref_log_probs=variant.precompute_ref_log_probs, per_device_train_batch_size=batch,
        max_length=workload["max_length"], learning_rate=learning_rate, max_steps=1_000_000,
        save_strategy="no", report_to="none", disable_tqdm=True, seed=seed,
    )
    dataset = datasets.Dataset.from_json(workload["pairs_file"])
    tokenizer = AutoTokenizer.from_pretrained(workload["model_dir"], local_files_only=True)
    return DPOTrainer(model=workload["model_dir"], args=args, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[callback])


def serve_trl(conn, *, workload: dict[str, Any], variant: TRLVariant, batch: int, warmup_steps: int,
              workdir: str, threads: int, seed: int = 0, learning_rate: float = 1e-6) -> None:
    """Worker entry point: builds the trainer on ``setup`` and runs ``train()``, whose callback
    serves the ``window`` and ``finish`` requests."""
    try:
        import torch

        from jaxalign.perf.memory import peak_rss_bytes

        torch.set_num_threads(threads)
        request = conn.recv()
        if request[0] != "setup":
            raise ValueError(f"expected a setup request first, got {request!r}")
        started = time.perf_counter()
        counts: deque = deque()
        callback = _make_callback(conn, warmup_steps, counts, started)
        trainer = _trainer(workload, variant, batch=batch, workdir=workdir, seed=seed,
                           learning_rate=learning_rate, callback=callback)
        callback.setup_info.update(
            mixed_precision=str(trainer.accelerator.mixed_precision), torch_threads=torch.get_num_threads(),
            torch_version=torch.__version__, pairs_per_epoch=len(trainer.train_dataset),
        )
        trainer.data_collator = _CountingCollator(trainer.data_collator, counts)
        trainer.train()
        loss = next((h.get("loss", h.get("train_loss")) for h in reversed(trainer.state.log_history)
                     if "loss" in h or "train_loss" in h), float("nan"))
        device_peak = int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None
        conn.send({"peak_rss_bytes": peak_rss_bytes(), "device_peak_bytes": device_peak, "last_loss": float(loss),
                   "pid": os.getpid()})
    except Exception:  # reported to the parent, which raises BenchError naming the worker
        conn.send({"error": traceback.format_exc()})
