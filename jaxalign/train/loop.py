"""The training loop: steps, periodic eval, metrics, checkpoints, resume, export.

``train(config, workdir)`` runs (or resumes) a run in ``workdir``:

1. the resolved config is written to ``WORKDIR/config.json``; if ``WORKDIR/checkpoints``
   holds a checkpoint, the saved config must equal the current one except for
   ``RESUMABLE_KEYS`` (e.g. ``steps``, to train longer), else ``RunError`` names the keys;
   the state and the data loader's position are restored from the latest checkpoint;
2. each optimizer step takes ``A = batch_size / micro_batch_size`` micro-batches from the
   loader (padded to one shape and stacked) and runs the jitted step through the step runner
   (``jaxalign.train.runner``). Device metrics are kept on the device and fetched only every
   ``log_every`` steps (their mean over the window is logged), so the host never waits for
   the device between log steps;
3. every ``eval_every`` steps (and at the start and the end) the held-out pairs are scored;
4. every ``checkpoint_every`` steps and at the end the state is saved (asynchronously) with
   the loader position; with ``checkpoint.keep_best`` the checkpoint steps are evaluated so
   that the best one can be kept;
5. at the end the policy is exported in Hugging Face format to ``WORKDIR/export`` (with the
   tokenizer; a reward model as the family's ``*ForSequenceClassification`` with ``num_labels=1``).

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

import contextlib
import dataclasses
import json
import math
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from flax import nnx

from jaxalign import models, parallel
from jaxalign.data.batching import stack_micro_batches
from jaxalign.models.lora import join_adapters, merge_adapters, save_adapter
from jaxalign.runtime.compilation_cache import CompilationCacheError, compilation_cache
from jaxalign.runtime.preemption import StopSignals
from jaxalign.runtime.profiling import PROFILE_DIR, StepTrace
from jaxalign.train.checkpoint import CheckpointError, RunCheckpoints, abstract_like
from jaxalign.train.config import ConfigError, config_diff, flatten, validate
from jaxalign.train.metrics import MetricsLog, Progress
from jaxalign.train.run import Run, RunError, prepare
from jaxalign.train.runner import SHOWN_EVAL, Cadence, Outcome, StepRunner

__all__ = ["RESUMABLE_KEYS", "STATUSES", "RunError", "RunResult", "evaluate", "export", "run_directory", "train"]

# Config keys that may change when a run is resumed: the length of the run (with a schedule
# that does not depend on it: see ``_check_resume``), logging cadence,
# where it runs (mesh, multi-host start-up; the checkpoint is restored onto the new mesh), the
# non-finite guard's patience, the reference cache's batch, the compilation cache, malloc's
# huge pages, the MFU's peak and profiling (none of them changes a trained number).
RESUMABLE_KEYS = (
    "steps", "epochs", "log_every", "eval_every", "checkpoint_every", "progress_bar",
    "checkpoint.async_save", "checkpoint.export", "mesh.data", "mesh.fsdp", "mesh.tensor",
    "max_consecutive_nonfinite", "reference.cache_batch_size", "compilation_cache_dir", "huge_pages",
    "peak_flops_per_device", "profile.steps", "profile.skip_steps", "debug.kill_at",
    *(f"distributed.{key}" for key in parallel.distributed_config()),
)
CONFIG_FILE = "config.json"
# How an invocation of ``train`` ended: all steps done; ``stop_at_step`` reached; a signal
# (checkpoint saved, rerun to resume); too many consecutive non-finite steps (checkpoint = last
# good state), or the last step reached with no step applied or a non-finite final eval.
STATUSES = ("finished", "stopped", "interrupted", "nonfinite")


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
    message: str = ""  # why an interrupted / nonfinite run stopped (or trained nothing usable), and what to do

    def summary(self) -> str:
        lines = [f"run directory: {self.workdir} (step {self.step})"]
        if self.resumed_from is not None and self.resumed_from == self.step:
            lines.append(f"already at step {self.step}: nothing left to train (raise --config.steps to train longer)")
        elif self.resumed_from is not None:
            lines.append(f"resumed from step {self.resumed_from}")
        tensorboard = os.path.join(self.workdir, "tensorboard")
        lines.append(f"metrics:       {self.metrics_file}")
        lines.append(f"TensorBoard:   {tensorboard} (view: pip install tensorboard; tensorboard --logdir {tensorboard})")
        lines.append(f"checkpoints:   {self.checkpoint_dir}")
        if self.export_dir:
            lines.append(f"export (HF):   {self.export_dir}")
        if self.eval_metrics:
            shown = {k: round(v, 4) for k, v in self.eval_metrics.items() if k in SHOWN_EVAL}
            label = "final eval:   " if self.status == "finished" else "last eval:    "
            lines.append(f"{label} {shown}")
        return "\n".join(lines)


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
        metrics = run.eval_step(params, run.place_eval(batch, stacked=False), run.reference_params)
        if pending is not None:
            add(pending)
        pending = metrics
    if pending is not None:
        add(pending)
    if weight == 0:
        return {}
    return {f"eval/{k}": v / weight for k, v in totals.items()}


def _check_resume(workdir: str, config: ml_collections.ConfigDict) -> None:
    """``RunError`` unless ``config`` may resume the run saved in ``workdir``: equal to its
    config but for ``RESUMABLE_KEYS``, and a changed length only with a constant schedule."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise RunError(f"{workdir} holds checkpoints but no {CONFIG_FILE}; cannot check that the config matches")
    with open(path, encoding="utf-8") as f:
        saved = flatten(json.load(f))
    current = flatten(config)
    differing = config_diff(saved, current, ignore=RESUMABLE_KEYS)
    if differing:
        lines = [f"  {k}: saved {saved.get(k, '<absent>')!r}, now {current.get(k, '<absent>')!r}" for k in differing]
        raise RunError(
            f"{workdir} holds a run with a different config; these keys differ:\n" + "\n".join(lines)
            + f"\n(only {', '.join(RESUMABLE_KEYS)} may change on resume; use another --workdir for a new run)"
        )
    length = [k for k in ("steps", "epochs") if saved.get(k) != current[k]]
    if length and config.optimizer.schedule != "constant":
        changes = ", ".join(f"{k} from {saved.get(k)!r} to {current[k]!r}" for k in length)
        raise RunError(
            f"{workdir}: {changes}, but optimizer.schedule = {config.optimizer.schedule!r} was laid out over the "
            "run's original length: the learning rate would jump. To train longer, start a new run from this "
            f"one's export (--config.model.path={os.path.join(workdir, 'export')} --workdir NEW_DIR), or use "
            "optimizer.schedule=constant, whose runs may be extended"
        )


def _write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def export(workdir: str, graphdef: Any, params: Any, tokenizer: Any, *, lora_base: Any = None,
           lora_alpha: float = 0.0, base_model: str = "") -> str:
    """``WORKDIR/export``: the policy (``params["model"]``) as an HF causal LM, or, when the
    params hold a reward head, the reward model as an HF sequence classifier
    (``models.save_pretrained``). With ``lora_base`` (the frozen base weights; ``params["model"]``
    are the adapters) the adapters are written in PEFT format to ``WORKDIR/export/adapter``
    (for ``base_model``) and merged into the exported weights, ``W + (alpha / r) A B``. Every
    process calls it."""
    out = os.path.join(workdir, "export")
    if lora_base is None:
        model = nnx.merge(graphdef, params["model"])
    else:
        model = nnx.merge(graphdef, join_adapters(lora_base, params["model"]))
        save_adapter(model, os.path.join(out, "adapter"), alpha=lora_alpha, base_model=base_model)
        merge_adapters(model)
    head = params["head"]["kernel"] if "head" in params else None
    models.save_pretrained(model, out, tokenizer=tokenizer, overwrite=True, reward_head=head)
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


def _unusable_result(outcome: Outcome) -> str:
    """Why a run that reached its last step trained nothing usable ("" when it did): no step
    was ever applied (every one non-finite), or the final eval is not finite."""
    state = outcome.state
    applied = int(jax.device_get(state.step)) - int(jax.device_get(state.nonfinite_steps))
    if applied == 0:
        return (f"no step was applied: all {outcome.step} steps had a non-finite loss or gradients and were "
                "skipped, so the parameters are the initial ones (nothing exported). Check that the sequences fit "
                "the model, lower the learning rate, or inspect the data")
    bad = sorted(k for k, v in outcome.eval_metrics.items() if not math.isfinite(v))
    if bad:
        return (f"the final eval is not finite ({', '.join(f'{k} = {outcome.eval_metrics[k]}' for k in bad)}): "
                "the trained parameters are not usable (nothing exported). Lower the learning rate or inspect "
                "the data")
    return ""


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None) -> RunResult:
    """Trains (or resumes) the run of ``config`` in ``workdir``; see the module docstring.

    ``stop_at_step`` ends this invocation early, after that optimizer step, with a
    checkpoint (as an interrupted job would); running ``train`` again resumes from it.
    SIGTERM/SIGINT during the steps end it the same way (status ``interrupted``).
    """
    workdir = os.path.abspath(workdir)
    with run_directory(config, workdir):
        return _train(config, workdir, stop_at_step)


@contextlib.contextmanager
def run_directory(config: ml_collections.ConfigDict, workdir: str) -> Iterator[None]:
    """What every driver does before building a run: validates ``config``, starts the
    multi-host runtime (before anything touches JAX's backend: Orbax does), creates ``workdir``
    and turns on the persistent compilation cache for the run's duration."""
    validate(config)
    parallel.initialize_distributed(config.distributed)
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create the run directory {workdir}: {e.strerror or e}") from None
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(compilation_cache(config.compilation_cache_dir, workdir))
        except CompilationCacheError as e:
            raise ConfigError(str(e)) from None
        yield


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
    runner = StepRunner(
        train_step=run.train_step, place=lambda host: run.place_train(host, stacked=True),
        cadence=Cadence.from_config(c), mesh=run.mesh, checkpoints=checkpoints, log=log, progress=progress,
        trace=trace, checkpoint_meta=lambda s: {"loader": run.train_loader.get_state(), "step": s},
        evaluate=(lambda params: evaluate(run, params)) if run.eval_loader is not None else None,
        reference_params=run.reference_params, flops_per_token=run.flops_per_token, peak_flops=run.peak_flops,
    )
    eval_metrics: dict[str, float] = {}
    if step == 0 and c.eval.at_start and run.eval_loader is not None:
        eval_metrics = evaluate(run, state.params)
        log.write(0, eval_metrics)
    end = run.total_steps if stop_at_step is None else min(stop_at_step, run.total_steps)
    export_dir = None
    # Signal handlers stay installed until the checkpoints are closed: a second signal can
    # never cut a save short.
    with StopSignals() as signals:
        try:
            outcome = runner.run(state, step=step, end=end, total=run.total_steps, batches=_step_batches(run),
                                 signals=signals, eval_metrics=eval_metrics)
            status, message = outcome.status, outcome.message
            if status == "finished" and outcome.step < run.total_steps:
                status = "stopped"
            if status == "finished":
                problem = _unusable_result(outcome)
                if problem:
                    status, message = "nonfinite", problem
            if status == "finished" and c.checkpoint.export:
                lora = c.lora.rank > 0
                export_dir = export(run.workdir, run.graphdef, outcome.state.params, run.tokenizer,
                                    lora_base=run.reference_params if lora else None, lora_alpha=c.lora.alpha,
                                    base_model=c.model.path)
        finally:
            trace.close()
            progress.close()
            log.close()
            checkpoints.close()
    return RunResult(
        workdir=workdir, step=outcome.step, resumed_from=latest, metrics_file=log.path,
        checkpoint_dir=checkpoints.directory, export_dir=export_dir, train_metrics=outcome.train_metrics,
        eval_metrics=outcome.eval_metrics, is_main_process=run.is_main, status=status, message=message,
    )
