"""The training loop: steps, periodic eval, metrics, checkpoints, resume, export.

``train(config, workdir)`` runs (or resumes) a run in ``workdir``:

1. the resolved config is written to ``WORKDIR/config.json``; if ``WORKDIR/checkpoints``
   holds a checkpoint, the saved config must equal the current one except for
   ``RESUMABLE_KEYS`` (e.g. ``steps``, to train longer), else ``RunError`` names the keys;
   the state and the data loader's position are restored from the latest checkpoint;
2. each optimizer step takes ``A = batch_size / micro_batch_size`` micro-batches from the
   loader (padded to one length and stacked) and runs the jitted step. Device metrics are
   kept on the device and fetched only every ``log_every`` steps (their mean over the
   window is logged), so the host never waits for the device between log steps;
3. every ``eval_every`` steps (and at the start and the end) the held-out pairs are scored;
4. every ``checkpoint_every`` steps and at the end the state is saved (asynchronously) with
   the loader position; with ``checkpoint.keep_best`` the checkpoint steps are evaluated so
   that the best one can be kept;
5. at the end the policy is exported in Hugging Face format to ``WORKDIR/export`` (with the
   tokenizer; a reward model's head goes to ``reward_head.safetensors`` beside it).

Compiled programs go to JAX's persistent compilation cache (``compilation_cache_dir``: by
default ``JAX_COMPILATION_CACHE_DIR`` if set, else ``WORKDIR/compilation_cache``), so a resumed
or restarted run loads them instead of compiling.

Stopping early (docs/fault_tolerance.md): on SIGTERM/SIGINT the loop finishes the step it is
in, saves a checkpoint at that step synchronously and returns with status ``interrupted``;
after ``max_consecutive_nonfinite`` consecutive non-finite (skipped) steps it saves the last
good state and returns with status ``nonfinite``. Both decisions are made identically on
every process. On resume an unusable newest checkpoint is reported and the newest usable
one is restored (``RunCheckpoints.restore_latest``), onto the current mesh.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxalign import models, parallel
from jaxalign.train.checkpoint import CheckpointError, RunCheckpoints, abstract_like
from jaxalign.train.compilation_cache import compilation_cache
from jaxalign.train.config import config_diff, flatten, validate
from jaxalign.train.metrics import MetricsLog, Progress, mean_metrics
from jaxalign.train.preemption import StopAgreement, StopSignals
from jaxalign.train.profiling import PROFILE_DIR, StepTrace
from jaxalign.train.run import Run, RunError, prepare
from jaxalign.train.step import stack_micro_batches
from jaxalign.train.utilisation import flop_rates, peak_memory

__all__ = ["RESUMABLE_KEYS", "STATUSES", "RunError", "RunResult", "evaluate", "train"]

# Config keys that may change when a run is resumed: the length of the run, logging cadence,
# where it runs (mesh, multi-host start-up; the checkpoint is restored onto the new mesh), the
# non-finite guard's patience, the reference cache's batch, the compilation cache, malloc's
# huge pages, the MFU's peak and profiling (none of them changes a trained number).
RESUMABLE_KEYS = (
    "steps", "epochs", "log_every", "eval_every", "checkpoint_every", "progress_bar",
    "checkpoint.async_save", "checkpoint.export", "mesh.data", "mesh.fsdp", "mesh.tensor",
    "max_consecutive_nonfinite", "reference.cache_batch_size", "compilation_cache_dir", "huge_pages",
    "peak_flops_per_device", "profile.steps", "profile.skip_steps",
    *(f"distributed.{key}" for key in parallel.distributed_config()),
)
CONFIG_FILE = "config.json"
# How an invocation of ``train`` ended: all steps done; ``stop_at_step`` reached; a signal
# (checkpoint saved, rerun to resume); too many consecutive non-finite steps (checkpoint = last
# good state).
STATUSES = ("finished", "stopped", "interrupted", "nonfinite")
# Metrics that are counters: logged with their last value in the window, not the mean.
COUNTER_METRICS = ("nonfinite_steps", "consecutive_nonfinite")


@dataclasses.dataclass
class RunResult:
    """Where a finished run put its outputs, and its last metrics."""

    workdir: str
    step: int
    resumed_from: int | None
    metrics_file: str
    checkpoint_dir: str
    export_dir: str | None
    train_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    is_main_process: bool
    status: str = "finished"  # one of STATUSES
    message: str = ""  # why an interrupted / nonfinite run stopped, and what to do

    def summary(self) -> str:
        lines = [f"run directory: {self.workdir} (step {self.step})"]
        if self.resumed_from is not None:
            lines.append(f"resumed from step {self.resumed_from}")
        lines.append(f"metrics:       {self.metrics_file} (TensorBoard: {os.path.join(self.workdir, 'tensorboard')})")
        lines.append(f"checkpoints:   {self.checkpoint_dir}")
        if self.export_dir:
            lines.append(f"export (HF):   {self.export_dir}")
        if self.eval_metrics:
            shown = {k: round(v, 4) for k, v in self.eval_metrics.items() if k in _SHOWN}
            lines.append(f"final eval:    {shown}")
        return "\n".join(lines)


_SHOWN = ("eval/loss", "eval/rewards/accuracies", "eval/rewards/margins", "eval/sft/nll")


def _step_batches(run: Run) -> Iterator[dict[str, np.ndarray]]:
    """Stacked ``[A, ...]`` step batches from the train loader."""
    loader = run.train_loader
    while True:
        yield stack_micro_batches([next(loader) for _ in range(run.accum)], pad_id=loader.pad_id)


def evaluate(run: Run, params: Any) -> dict[str, float]:
    """Mean metrics over the held-out pairs (weighted by real pairs, or tokens for SFT), ``eval/``-prefixed."""
    loader = run.eval_loader
    if loader is None:
        return {}
    loader.set_state(run.eval_start)
    totals: dict[str, float] = {}
    weight = 0.0

    def add(device_metrics: dict[str, jax.Array]) -> None:
        nonlocal weight
        metrics = jax.device_get(device_metrics)
        w = float(metrics.pop("weight"))
        weight += w
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + w * float(v)

    # Each batch's metrics are fetched after the next batch is dispatched: the device always
    # has the next batch queued while the host waits, and at most two batches are in flight.
    pending = None
    for i, batch in enumerate(loader):
        if run.config.eval.max_batches and i >= run.config.eval.max_batches:
            break
        metrics = run.eval_step(params, run.device_batch(batch, stacked=False), run.reference_params)
        if pending is not None:
            add(pending)
        pending = metrics
    if pending is not None:
        add(pending)
    if weight == 0:
        return {}
    return {f"eval/{k}": v / weight for k, v in totals.items()}


def _check_resume(workdir: str, config: ml_collections.ConfigDict) -> None:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise RunError(f"{workdir} holds checkpoints but no {CONFIG_FILE}; cannot check that the config matches")
    with open(path, encoding="utf-8") as f:
        saved = flatten(json.load(f))
    differing = config_diff(saved, flatten(config), ignore=RESUMABLE_KEYS)
    if differing:
        lines = [f"  {k}: saved {saved.get(k, '<absent>')!r}, now {flatten(config).get(k, '<absent>')!r}" for k in differing]
        raise RunError(
            f"{workdir} holds a run with a different config; these keys differ:\n" + "\n".join(lines)
            + f"\n(only {', '.join(RESUMABLE_KEYS)} may change on resume; use another --workdir for a new run)"
        )


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _export(run: Run, state: Any) -> str:
    out = os.path.join(run.workdir, "export")
    model = nnx.merge(run.graphdef, state.params["model"])
    models.save_pretrained(model, out, tokenizer=run.tokenizer, overwrite=True)
    if "head" in state.params and run.is_main:
        from safetensors.numpy import save_file

        head = {k: np.asarray(jax.device_get(v), np.float32).reshape(-1) for k, v in state.params["head"].items()}
        save_file(head, os.path.join(out, "reward_head.safetensors"))
    return out


def _restore(checkpoints: RunCheckpoints, run: Run, workdir: str) -> tuple[Any, int | None]:
    """``(state, restored step or None)``: the newest usable checkpoint placed on ``run.mesh``."""
    if not checkpoints.all_steps():
        return run.state, None
    target = abstract_like(run.state)
    run.state = None  # the fresh state's memory is not needed once the checkpoint is read
    try:
        restored = checkpoints.restore_latest(target)
    except CheckpointError as e:
        raise RunError(f"cannot resume {workdir}: {e}") from None
    if restored is None:
        raise RunError(f"cannot resume {workdir}: its checkpoints disappeared while starting")
    try:
        run.train_loader.set_state(restored.meta["loader"])
    except (KeyError, ValueError) as e:
        raise RunError(f"cannot resume {workdir} at step {restored.step}: {e}") from None
    state = restored.state
    limit = run.config.max_consecutive_nonfinite
    consecutive = int(jax.device_get(state.consecutive_nonfinite))
    if limit and consecutive >= limit:
        if run.is_main:
            print(
                f"warning: the checkpoint at step {restored.step} ended {consecutive} consecutive non-finite steps; "
                f"the count restarts at 0 (max_consecutive_nonfinite={limit})", flush=True,
            )
        zero = jax.device_put(np.zeros((), np.int32), state.consecutive_nonfinite.sharding)
        state = state.replace(consecutive_nonfinite=zero)
    return state, restored.step


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


def _show(progress: Progress, train_metrics: dict[str, float], eval_metrics: dict[str, float]) -> None:
    """The progress bar's postfix: the last logged loss and tokens/s, and the shown eval metrics."""
    progress.show({
        "loss": train_metrics.get("loss", float("nan")),
        "tokens/s": train_metrics.get("tokens_per_second", float("nan")),
        **({"mfu": train_metrics["mfu"]} if "mfu" in train_metrics else {}),
        **{k: v for k, v in eval_metrics.items() if k in _SHOWN},
    })


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None) -> RunResult:
    """Trains (or resumes) the run of ``config`` in ``workdir``; see the module docstring.

    ``stop_at_step`` ends this invocation early, after that optimizer step, with a
    checkpoint (as an interrupted job would); running ``train`` again resumes from it.
    SIGTERM/SIGINT during the steps end it the same way (status ``interrupted``).
    """
    workdir = os.path.abspath(workdir)
    validate(config)
    parallel.initialize_distributed(config.distributed)  # before anything touches JAX's backend (Orbax does)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create the run directory {workdir}: {e.strerror or e}") from None
    with compilation_cache(config.compilation_cache_dir, workdir):
        return _train(config, workdir, stop_at_step)


def _train(config: ml_collections.ConfigDict, workdir: str, stop_at_step: int | None) -> RunResult:
    checkpoints = RunCheckpoints(
        os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep, keep_best=config.checkpoint.keep_best,
        best_mode=config.checkpoint.best_mode, async_save=config.checkpoint.async_save,
    )
    if checkpoints.all_steps():
        _check_resume(workdir, config)
    run = prepare(config, workdir)
    if run.is_main:
        _write_config(workdir, config)
    state, latest = _restore(checkpoints, run, workdir)
    step = int(jax.device_get(state.step))
    c = run.config
    if run.is_main:
        print(f"data (train):\n{run.data_summary}", flush=True)
        print(f"compilation cache: {jax.config.jax_compilation_cache_dir or 'off'}", flush=True)
    # A fresh start drops metrics a crashed earlier attempt (no checkpoint yet) may have left.
    log = MetricsLog(workdir, enabled=run.is_main, resume_step=step if latest is not None else -1)
    progress = Progress(run.total_steps, step, enabled=run.is_main and c.progress_bar)
    trace = StepTrace(os.path.join(workdir, PROFILE_DIR), steps=c.profile.steps, skip=c.profile.skip_steps,
                      enabled=run.is_main)

    eval_metrics: dict[str, float] = {}
    train_metrics: dict[str, float] = {}
    if step == 0 and c.eval.at_start and run.eval_loader is not None:
        eval_metrics = evaluate(run, state.params)
        log.write(0, eval_metrics)
    window: list[dict[str, Any]] = []
    batches = _step_batches(run)
    status, message, export_dir = "finished", "", None
    limit = c.max_consecutive_nonfinite
    previous: dict[str, Any] | None = None  # the last step's metrics (read one step late by the guard)
    # Signal handlers stay installed until the checkpoints are closed: a second signal can
    # never cut a save short.
    with StopSignals() as signals:
        try:
            agreement = StopAgreement(run.mesh)
            end = run.total_steps if stop_at_step is None else min(stop_at_step, run.total_steps)
            while step < end:
                host = next(batches)
                tokens = float(np.sum(host["segment_ids"] > 0))
                batch = run.device_batch(host, stacked=True)
                state, metrics = trace.step(step + 1, run.train_step, state, batch, run.reference_params)
                step += 1
                window.append(metrics)
                progress.update(step, tokens, host["segment_ids"].size)
                # Stop decisions, identical on every process: a signal (agreed over processes)
                # or the guard's halt, known from the previous step's counter (never waiting on
                # the step just launched). A halted step changed nothing but the counters.
                consecutive = int(jax.device_get(previous["consecutive_nonfinite"])) if previous is not None else 0
                if agreement.update(signals.received is not None):
                    status = "interrupted"
                elif limit and consecutive >= limit:
                    status = "nonfinite"
                previous = metrics if limit else None
                last = step == run.total_steps
                if step % c.log_every == 0 or last or status != "finished":
                    train_metrics = mean_metrics(window, last=COUNTER_METRICS)
                    train_metrics.update(progress.rates(step))
                    train_metrics.update(flop_rates(train_metrics["tokens_per_second"], run.flops_per_token, run.peak_flops))
                    train_metrics.update(peak_memory(run.mesh.local_devices))
                    window = []
                    log.write(step, train_metrics)
                    _show(progress, train_metrics, eval_metrics)
                if status != "finished":  # save synchronously, then leave
                    checkpoints.save(step, state, {"loader": run.train_loader.get_state(), "step": step})
                    checkpoints.wait()
                    path = str(checkpoints.step_path(step))
                    if status == "interrupted":
                        message = _interrupted_message(step, signals.received, path)
                    else:
                        message = _nonfinite_message(step, consecutive, limit, path)
                    break
                checkpoint_due = step == end or (c.checkpoint_every and step % c.checkpoint_every == 0)
                eval_due = last or (c.eval_every and step % c.eval_every == 0)
                if run.eval_loader is not None and (eval_due or (checkpoint_due and c.checkpoint.keep_best)):
                    eval_metrics = evaluate(run, state.params)
                    log.write(step, eval_metrics)
                    _show(progress, train_metrics, eval_metrics)
                if checkpoint_due:
                    meta = {"loader": run.train_loader.get_state(), "step": step}
                    checkpoints.save(step, state, meta, eval_metrics if eval_due or c.checkpoint.keep_best else None)
            checkpoints.wait()
            if status == "finished" and step < run.total_steps:
                status = "stopped"
            if status == "finished" and c.checkpoint.export:
                export_dir = _export(run, state)
        finally:
            trace.close()
            progress.close()
            log.close()
            checkpoints.close()
    return RunResult(
        workdir=workdir, step=step, resumed_from=latest, metrics_file=log.path,
        checkpoint_dir=checkpoints.directory, export_dir=export_dir, train_metrics=train_metrics,
        eval_metrics=eval_metrics, is_main_process=run.is_main, status=status, message=message,
    )
