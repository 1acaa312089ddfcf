"""Metric outputs of a run: ``WORKDIR/metrics.jsonl``, TensorBoard events, a progress bar.

``metrics.jsonl`` holds one JSON object per logged step: ``{"step": n, "loss": ..., ...}``;
evaluation entries carry ``eval/``-prefixed keys (``eval/loss``, ``eval/rewards/accuracies``,
...). TensorBoard scalars go to ``WORKDIR/tensorboard``. Only process 0 writes (``enabled``).
On resume from step ``k`` the entries with ``step > k`` (written after that checkpoint by the
interrupted run) are dropped so that the file reads like one uninterrupted run (``k = -1``:
a fresh start, every old entry is dropped).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

__all__ = ["HARDWARE_METRICS", "MetricsLog", "Progress", "mean_metrics", "read_metrics"]

METRICS_FILE = "metrics.jsonl"
# Logged metrics that measure the hardware and the batch layout, not training: they differ
# between identical runs (timings) or meshes (rows per batch).
HARDWARE_METRICS = (
    "steps_per_second", "tokens_per_second", "real_token_fraction", "model_flops_per_second", "mfu",
    "peak_device_memory_gib", "peak_host_memory_gib",
)


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of ``WORKDIR/metrics.jsonl`` (empty list when absent)."""
    path = os.path.join(os.fspath(workdir), METRICS_FILE)
    if not os.path.exists(path):
        return []
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not a JSON object ({e.msg})") from None
    return entries


def _json_value(value: Any) -> Any:
    value = float(value)
    return value if math.isfinite(value) else str(value)


def mean_metrics(history: list[Mapping[str, Any]], last: tuple[str, ...] = ()) -> dict[str, float]:
    """Fetches a window of per-step device metrics (one host transfer) and averages each key;
    the keys in ``last`` (counters) take the window's last value instead."""
    host = jax.device_get(history)
    keys = host[0].keys()
    return {
        k: float(np.asarray(host[-1][k], np.float64)) if k in last
        else float(np.mean([np.asarray(h[k], np.float64) for h in host]))
        for k in keys
    }


class MetricsLog:
    """Appends logged metrics to JSONL and TensorBoard (no-op unless ``enabled``)."""

    def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self.path = os.path.join(os.fspath(workdir), METRICS_FILE)
        self._tb = None
        if not enabled:
            return
        os.makedirs(os.fspath(workdir), exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            kept = [e for e in read_metrics(workdir) if int(e.get("step", 0)) <= resume_step]
            with open(self.path, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(e) + "\n" for e in kept)
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(
            os.path.join(os.fspath(workdir), "tensorboard"),
            purge_step=None if resume_step is None else max(resume_step + 1, 0),
        )

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One entry ``{"step": step, **metrics}`` (non-finite values written as strings)."""
        if not self.enabled:
            return
        entry = {"step": int(step), **{k: _json_value(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
        for key, value in metrics.items():
            self._tb.add_scalar(key, float(value), int(step))
        self._tb.flush()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """A tqdm bar over optimizer steps with steps/s, tokens/s and loss (ETA from tqdm)."""

    def __init__(self, total: int, initial: int, *, enabled: bool = True):
        self._bar = None
        self._last_time = time.perf_counter()
        self._last_step = initial
        self._tokens = 0.0
        self._positions = 0.0
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, tokens: float, positions: float) -> None:
        """Advances the bar to ``step``; this step's batch (host count) held ``tokens`` real
        tokens in ``positions`` row positions."""
        self._tokens += tokens
        self._positions += positions
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def rates(self, step: int) -> dict[str, float]:
        """``steps_per_second``, ``tokens_per_second`` and ``real_token_fraction`` (real tokens
        over row positions: 1 - the padding's share) since the previous call (resets)."""
        now = time.perf_counter()
        elapsed = max(now - self._last_time, 1e-9)
        rates = {
            "steps_per_second": (step - self._last_step) / elapsed,
            "tokens_per_second": self._tokens / elapsed,
            "real_token_fraction": self._tokens / max(self._positions, 1.0),
        }
        self._last_time, self._last_step, self._tokens, self._positions = now, step, 0.0, 0.0
        return rates

    def describe(self, text: str) -> None:
        """The bar's description (e.g. "compiling" while the first step compiles; "" clears it)."""
        if self._bar is not None:
            self._bar.set_description_str(text)

    def show(self, values: Mapping[str, float]) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in values.items()}, refresh=False)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
