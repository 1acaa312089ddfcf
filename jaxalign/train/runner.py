"""The step runner: optimizer steps over an iterator of batches, with the run's hooks.

``StepRunner.run(state, step=s, end=e, batches=it)`` runs steps ``s+1..e``, each on the next
host step batch of ``it`` (``[A, ...]`` micro-batches stacked), and around them:

* **metrics**: device metrics stay on the device and are fetched every ``log_every`` steps
  (their window mean is logged, counters their last value), with the host-measured rates,
  model FLOP/s, MFU and peak memory (``jaxalign.perf.utilisation``);
* **eval**: every ``eval_every`` steps and at the run's last step (``total``), and at every
  checkpoint when the best one is kept (``evaluate(params) -> metrics``);
* **checkpoints**: every ``checkpoint_every`` steps and at ``end``, with ``checkpoint_meta(step)``
  (e.g. the loader's position) beside the state;
* **profiling**: the ``StepTrace`` window;
* **stopping**: a stop signal (agreed over processes) or ``max_consecutive_nonfinite``
  skipped steps save a checkpoint synchronously and end the run with status ``interrupted``
  or ``nonfinite`` and a message saying what to do. Both decisions are identical on every
  process; the guard's counter is read one step late, never waiting on the step just launched.

The offline trainer (``jaxalign.train.loop``) and the online and distillation drivers drive
their steps through it; what each owns is where its batches come from and what it does
between calls.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from jaxalign.perf.utilisation import flop_rates, peak_memory
from jaxalign.runtime.preemption import StopAgreement, StopSignals
from jaxalign.runtime.profiling import StepTrace
from jaxalign.train.checkpoint import RunCheckpoints
from jaxalign.train.metrics import MetricsLog, Progress, mean_metrics

__all__ = ["COUNTER_METRICS", "SHOWN_EVAL", "Cadence", "Outcome", "StepRunner"]

# Metrics that are counters: logged with their last value in the window, not the mean.
COUNTER_METRICS = ("nonfinite_steps", "consecutive_nonfinite")
# Eval metrics shown on the progress bar and in a run's summary.
SHOWN_EVAL = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/sft/nll", "eval/reward_mean")


@dataclasses.dataclass(frozen=True)
class Cadence:
    """When the runner logs, evaluates and checkpoints, and when the guard stops it."""

    log_every: int = 10
    eval_every: int = 0
    checkpoint_every: int = 0
    eval_at_checkpoints: bool = False  # keep-best needs a score at every checkpoint
    max_consecutive_nonfinite: int = 0

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> Cadence:
        return cls(log_every=config.log_every, eval_every=config.eval_every,
                   checkpoint_every=config.checkpoint_every, eval_at_checkpoints=bool(config.checkpoint.keep_best),
                   max_consecutive_nonfinite=config.max_consecutive_nonfinite)


@dataclasses.dataclass
class Outcome:
    """Where a ``run`` call ended: the state and step, ``status`` (``finished``: reached
    ``end``; ``interrupted``; ``nonfinite``), a message for the latter two, the last metrics."""

    state: Any
    step: int
    status: str
    message: str
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]


def _interrupted_message(step: int, received: str | None, path: str) -> str:
    cause = received or "a signal to another process"
    return f"interrupted by {cause} after step {step}: checkpoint saved at {path}; rerun the same command to resume"


def _nonfinite_message(step: int, consecutive: int, limit: int, path: str) -> str:
    first, last_good = step - consecutive, step - 1 - consecutive
    return (
        f"stopped: {consecutive} consecutive steps ({first}..{step - 1}) had a non-finite loss or gradients and were "
        f"skipped (max_consecutive_nonfinite={limit}; step {step} was not applied either). The checkpoint at step "
        f"{step} ({path}) holds the parameters of step {last_good}, the last good one. Lower the learning rate or "
        "inspect those batches; rerunning the command resumes from it."
    )


@dataclasses.dataclass
class StepRunner:
    """See the module docstring. ``place(host_batch) -> device batch``; ``flops_per_token`` and
    ``peak_flops`` (None: unknown) give the logged model FLOP/s and MFU."""

    train_step: Callable[..., tuple[Any, dict[str, jax.Array]]]
    place: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]]
    cadence: Cadence
    mesh: Mesh
    checkpoints: RunCheckpoints
    log: MetricsLog
    progress: Progress
    trace: StepTrace
    checkpoint_meta: Callable[[int], dict[str, Any]]
    evaluate: Callable[[Any], dict[str, float]] | None = None
    reference_params: Any = None
    flops_per_token: int = 0
    peak_flops: float | None = None

    def show(self, train_metrics: dict[str, float], eval_metrics: dict[str, float]) -> None:
        """The progress bar's postfix: the last logged loss and tokens/s, and the shown eval metrics."""
        self.progress.show({
            "loss": train_metrics.get("loss", float("nan")),
            "tokens/s": train_metrics.get("tokens_per_second", float("nan")),
            **({"mfu": train_metrics["mfu"]} if "mfu" in train_metrics else {}),
            **{k: v for k, v in eval_metrics.items() if k in SHOWN_EVAL},
        })

    def _log_window(self, step: int, window: list[dict[str, Any]]) -> dict[str, float]:
        metrics = mean_metrics(window, last=COUNTER_METRICS)
        metrics.update(self.progress.rates(step))
        metrics.update(flop_rates(metrics["tokens_per_second"], self.flops_per_token, self.peak_flops))
        metrics.update(peak_memory(self.mesh.local_devices))
        self.log.write(step, metrics)
        return metrics

    def run(self, state: Any, *, step: int, end: int, total: int, batches: Iterator[dict[str, np.ndarray]],
            signals: StopSignals, eval_metrics: dict[str, float] | None = None, checkpoint_end: bool = True,
            wait: bool = True) -> Outcome:
        """Steps ``step+1..end`` of a run of ``total`` steps (see the module docstring).
        ``checkpoint_end=False``: no checkpoint at ``end`` unless ``checkpoint_every`` falls
        there; ``wait=False``: return while an asynchronous save may still be writing (the
        caller waits on ``checkpoints`` later)."""
        c = self.cadence
        limit = c.max_consecutive_nonfinite
        agreement = StopAgreement(self.mesh)
        eval_metrics = dict(eval_metrics or {})
        train_metrics: dict[str, float] = {}
        window: list[dict[str, Any]] = []
        previous: dict[str, Any] | None = None  # the last step's metrics (read one step late by the guard)
        status, message = "finished", ""
        first = True
        while step < end:
            host = next(batches)
            if first:  # the first call compiles the step (seconds to minutes) before it runs
                self.progress.describe("compiling")
            state, metrics = self.trace.step(step + 1, self.train_step, state, self.place(host), self.reference_params)
            if first:
                self.progress.describe("")
                first = False
            step += 1
            window.append(metrics)
            self.progress.update(step, float(np.sum(host["segment_ids"] > 0)), host["segment_ids"].size)
            # A halted step changed nothing but the counters.
            consecutive = int(jax.device_get(previous["consecutive_nonfinite"])) if previous is not None else 0
            if agreement.update(signals.received is not None):
                status = "interrupted"
            elif limit and consecutive >= limit:
                status = "nonfinite"
            previous = metrics if limit else None
            last = step == total
            if step % c.log_every == 0 or last or status != "finished":
                train_metrics, window = self._log_window(step, window), []
                self.show(train_metrics, eval_metrics)
            if status != "finished":  # save synchronously, then leave
                self.checkpoints.save(step, state, self.checkpoint_meta(step))
                self.checkpoints.wait()
                path = str(self.checkpoints.step_path(step))
                if status == "interrupted":
                    message = _interrupted_message(step, signals.received, path)
                else:
                    message = _nonfinite_message(step, consecutive, limit, path)
                break
            checkpoint_due = (checkpoint_end and step == end) or (c.checkpoint_every and step % c.checkpoint_every == 0)
            eval_due = last or (c.eval_every and step % c.eval_every == 0)
            if self.evaluate is not None and (eval_due or (checkpoint_due and c.eval_at_checkpoints)):
                eval_metrics = self.evaluate(state.params)
                self.log.write(step, eval_metrics)
                self.show(train_metrics, eval_metrics)
            if checkpoint_due:
                scored = eval_due or c.eval_at_checkpoints
                self.checkpoints.save(step, state, self.checkpoint_meta(step), eval_metrics if scored else None)
        if wait:
            self.checkpoints.wait()
        return Outcome(state, step, status, message, train_metrics, eval_metrics)
