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
from jaxalign.train.checkpoint import RunCheckpoints
from jaxalign.train.config import config_diff, flatten
from jaxalign.train.metrics import MetricsLog, Progress, mean_metrics
from jaxalign.train.run import Run, RunError, prepare
from jaxalign.train.step import stack_micro_batches

__all__ = ["RESUMABLE_KEYS", "RunError", "RunResult", "evaluate", "train"]

# Config keys that may change when a run is resumed: the length of the run, logging cadence,
# and where it runs (mesh, multi-host start-up; the checkpoint is restored onto the new mesh).
RESUMABLE_KEYS = (
    "steps", "epochs", "log_every", "eval_every", "checkpoint_every", "progress_bar",
    "checkpoint.async_save", "checkpoint.export", "mesh.data", "mesh.fsdp", "mesh.tensor",
    *(f"distributed.{key}" for key in parallel.distributed_config()),
)
CONFIG_FILE = "config.json"


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


def _pad_rows(batch: dict[str, np.ndarray], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Right-pads every ``[R, L]`` array of a batch to ``length`` (masks 0, sequence id -1)."""
    current = batch["input_ids"].shape[1]
    if current == length:
        return batch
    fill = {"input_ids": pad_id, "sequence_ids": -1}
    out = dict(batch)
    for key in ("input_ids", "positions", "segment_ids", "loss_mask", "sequence_ids"):
        out[key] = np.pad(batch[key], [(0, 0), (0, length - current)], constant_values=fill.get(key, 0))
    return out


def _step_batches(run: Run) -> Iterator[dict[str, np.ndarray]]:
    """Stacked ``[A, ...]`` step batches from the train loader (micro-batches padded alike)."""
    loader = run.train_loader
    while True:
        micro = [next(loader) for _ in range(run.accum)]
        length = max(b["input_ids"].shape[1] for b in micro)
        yield stack_micro_batches([_pad_rows(b, length, loader.pad_id) for b in micro])


def evaluate(run: Run, params: Any) -> dict[str, float]:
    """Mean metrics over the held-out pairs (weighted by real pairs, or tokens for SFT), ``eval/``-prefixed."""
    loader = run.eval_loader
    if loader is None:
        return {}
    loader.set_state(run.eval_start)
    totals: dict[str, float] = {}
    weight = 0.0
    for i, batch in enumerate(loader):
        if run.config.eval.max_batches and i >= run.config.eval.max_batches:
            break
        metrics = jax.device_get(run.eval_step(params, run.device_batch(batch, stacked=False), run.reference_params))
        w = float(metrics.pop("weight"))
        weight += w
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + w * float(v)
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


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_at_step: int | None = None) -> RunResult:
    """Trains (or resumes) the run of ``config`` in ``workdir``; see the module docstring.

    ``stop_at_step`` ends this invocation early, after that optimizer step, with a
    checkpoint (as an interrupted job would); running ``train`` again resumes from it.
    """
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    checkpoints = RunCheckpoints(
        os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep, keep_best=config.checkpoint.keep_best,
        best_mode=config.checkpoint.best_mode, async_save=config.checkpoint.async_save,
    )
    latest = checkpoints.latest_step()
    if latest is not None:
        _check_resume(workdir, config)
    run = prepare(config, workdir)
    if run.is_main:
        _write_config(workdir, config)
    state = run.state
    if latest is not None:
        state, meta = checkpoints.restore(latest, state)
        try:
            run.train_loader.set_state(meta["loader"])
        except ValueError as e:
            raise RunError(f"cannot resume {workdir} at step {latest}: {e}") from None
    step = int(jax.device_get(state.step))
    c = run.config
    if run.is_main:
        print(f"data (train):\n{run.data_summary}", flush=True)
    # A fresh start drops metrics a crashed earlier attempt (no checkpoint yet) may have left.
    log = MetricsLog(workdir, enabled=run.is_main, resume_step=step if latest is not None else -1)
    progress = Progress(run.total_steps, step, enabled=run.is_main and c.progress_bar)

    eval_metrics: dict[str, float] = {}
    train_metrics: dict[str, float] = {}
    if step == 0 and c.eval.at_start and run.eval_loader is not None:
        eval_metrics = evaluate(run, state.params)
        log.write(0, eval_metrics)
    window: list[dict[str, Any]] = []
    batches = _step_batches(run)
    try:
        end = run.total_steps if stop_at_step is None else min(stop_at_step, run.total_steps)
        while step < end:
            host = next(batches)
            tokens = float(np.sum(host["segment_ids"] > 0))
            state, metrics = run.train_step(state, run.device_batch(host, stacked=True), run.reference_params)
            step += 1
            window.append(metrics)
            progress.update(step, tokens)
            last = step == run.total_steps
            if step % c.log_every == 0 or last:
                train_metrics = mean_metrics(window)
                train_metrics.update(progress.rates(step))
                window = []
                log.write(step, train_metrics)
                progress.show({
                    "loss": train_metrics["loss"], "tokens/s": train_metrics["tokens_per_second"],
                    **{k: v for k, v in eval_metrics.items() if k in _SHOWN},
                })
            checkpoint_due = step == end or (c.checkpoint_every and step % c.checkpoint_every == 0)
            eval_due = last or (c.eval_every and step % c.eval_every == 0)
            if run.eval_loader is not None and (eval_due or (checkpoint_due and c.checkpoint.keep_best)):
                eval_metrics = evaluate(run, state.params)
                log.write(step, eval_metrics)
                progress.show({
                    "loss": train_metrics.get("loss", float("nan")),
                    "tokens/s": train_metrics.get("tokens_per_second", float("nan")),
                    **{k: v for k, v in eval_metrics.items() if k in _SHOWN},
                })
            if checkpoint_due:
                meta = {"loader": run.train_loader.get_state(), "step": step}
                checkpoints.save(step, state, meta, eval_metrics if eval_due or c.checkpoint.keep_best else None)
        checkpoints.wait()
        finished = step == run.total_steps
        export_dir = _export(run, state) if c.checkpoint.export and finished else None
    finally:
        progress.close()
        log.close()
        checkpoints.close()
    return RunResult(
        workdir=workdir, step=step, resumed_from=latest, metrics_file=log.path,
        checkpoint_dir=checkpoints.directory, export_dir=export_dir, train_metrics=train_metrics,
        eval_metrics=eval_metrics, is_main_process=run.is_main,
    )
