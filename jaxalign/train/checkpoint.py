"""Run checkpoints with Orbax: the train state plus a JSON item (loader position, checksums).

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}``. ``state`` is the ``TrainState`` pytree
(params, optimizer state, step, RNG, guard counters), saved with ``StandardSave`` and
restored against an abstract target (shapes, dtypes, shardings), so optax state types come
back exactly and the state lands on whatever mesh the target describes (a checkpoint
written on 8 devices restores on 4 or 1). ``meta`` is a JSON dict (the data loader's
position, the step, a checksum of every array of the state, and the layout of the decoder's
layers, ``stacked`` or ``unrolled``: restoring into the other layout is a ``CheckpointError``
naming the ``model.scan_layers`` setting that reads it).

Atomicity (Orbax 0.12.8, ``AtomicRenameTemporaryPath`` on local and POSIX file systems): a
save writes ``<step>.orbax-checkpoint-tmp/``, writes ``commit_success.txt`` into it last and
renames it to ``<step>/``; a crash before the rename leaves only the temporary directory,
which Orbax ignores when listing steps and removes when that step is saved again. On GCS
(``CommitFileTemporaryPath``) the step directory is written in place and counts only once
``commit_success.txt`` exists. Either way an interrupted save never hides the previous
checkpoint.

Validation on resume (``restore_latest``), newest step first: the commit marker, readable
``_CHECKPOINT_METADATA``, ``state/_METADATA`` and ``meta/metadata`` and the OCDBT manifest
must exist; the arrays must read back; the meta's step must match; and every array's
checksum (``state_checksums``: ``sum_i bits(x_i) * (2 i + 1) mod 2^32``, exact integer
arithmetic, so independent of the mesh) must equal the saved one. Truncated or deleted
array files fail to read; overwritten bytes, which Orbax restores silently, fail the
checksum. An unusable
step is reported with an ``UnusableCheckpointWarning`` naming the step and the reason and
the next older one is tried; once one restores, the unusable newer ones are renamed to
``<step>.unusable`` (kept for inspection, out of Orbax's way). If every checkpoint is
unusable, ``CheckpointError`` is raised and nothing is renamed: a run never silently starts
from scratch over checkpoints it could not read.

Retention: the last ``keep`` checkpoints, plus (``keep_best``) the best one by an eval metric
(``min`` or ``max``); checkpoints are written asynchronously unless ``async_save=False``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

from jaxalign import parallel
from jaxalign.models.stacked import layout

__all__ = [
    "CheckpointError",
    "Restored",
    "RunCheckpoints",
    "UnusableCheckpoint",
    "UnusableCheckpointWarning",
    "abstract_like",
    "state_checksums",
]

TMP_SUFFIX = ".orbax-checkpoint-tmp"
LAYOUT_KEY = "layers_layout"  # meta: how the state stores the decoder's blocks (models.stacked.layout)
UNUSABLE_SUFFIX = ".unusable"
# Files every committed step has: path inside the step directory -> whether it is JSON.
REQUIRED_FILES = {
    "commit_success.txt": False,
    "_CHECKPOINT_METADATA": True,
    "state/_METADATA": True,
    "state/manifest.ocdbt": False,
    "meta/metadata": True,
}


class CheckpointError(RuntimeError):
    """Checkpoints exist but none of them can be restored; the message lists why."""


class UnusableCheckpoint(Exception):
    """One step's checkpoint cannot be restored (``step``, ``reason``)."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"checkpoint at step {step}: {reason}")
        self.step = step
        self.reason = reason


class UnusableCheckpointWarning(UserWarning):
    """A checkpoint was skipped on resume (or an interrupted save was found)."""


@dataclasses.dataclass
class Restored:
    step: int
    state: Any
    meta: dict[str, Any]
    skipped: list[UnusableCheckpoint]


def abstract_like(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (with shardings) mirroring ``tree``: a restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def _as_uint32(x: jax.Array) -> jax.Array:
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize not in unsigned:
        raise TypeError(f"cannot checksum an array of dtype {x.dtype}")
    return jax.lax.bitcast_convert_type(x, unsigned[x.dtype.itemsize]).astype(jnp.uint32)


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """``sum_i bits(x_i) * (2 i + 1) mod 2^32`` over the row-major index ``i`` (uint32 wraps)."""
    index = jnp.zeros(x.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(x.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis) * jnp.uint32(stride % 2**32)
        stride *= x.shape[axis]
    return jnp.sum(_as_uint32(x) * (index * jnp.uint32(2) + jnp.uint32(1)), dtype=jnp.uint32)


@jax.jit
def _checksums(leaves: list[jax.Array]) -> jax.Array:
    return jnp.stack([_leaf_checksum(x) for x in leaves])


def state_checksums(tree: Any) -> dict[str, int]:
    """``{leaf path: checksum}`` of every array of ``tree`` (one jitted call, one small transfer)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    if not flat:
        return {}
    values = np.asarray(jax.device_get(_checksums([leaf for _, leaf in flat])))
    return {jax.tree_util.keystr(path): int(v) for (path, _), v in zip(flat, values)}


def _dict_path(key: str) -> str:
    """A ``keystr`` path with attribute steps (``.params``) written as dict keys (``['params']``)."""
    return re.sub(r"\.(\w+)", r"['\1']", key)


def _first_line(error: BaseException, limit: int = 300) -> str:
    text = str(error).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(error).__name__}: {line[:limit]}"


class RunCheckpoints:
    """The checkpoints of one run directory."""

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        keep: int = 3,
        keep_best: str = "",
        best_mode: str = "min",
        async_save: bool = True,
    ):
        self.directory = os.path.abspath(os.fspath(directory))
        self.keep_best = keep_best
        self.best_mode = best_mode
        policies: list[pp.PreservationPolicy] = [pp.LatestN(n=max(keep, 1))]
        if keep_best:
            policies.append(
                pp.BestN(
                    get_metric_fn=lambda metrics: metrics[keep_best],
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        # best_fn/best_mode make Orbax persist each checkpoint's metrics (read by best_step).
        options = ocp.CheckpointManagerOptions(
            best_fn=(lambda metrics: metrics[keep_best]) if keep_best else None,
            best_mode=best_mode,
            preservation_policy=pp.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        """The newest saved step, or None when the directory holds no checkpoint."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def step_path(self, step: int) -> pathlib.Path:
        return pathlib.Path(self.directory) / str(step)

    def best_step(self) -> int | None:
        """The step kept as best by ``keep_best`` (None without it or before any eval)."""
        if not self.keep_best:
            return None
        ranked = []
        for step in self._manager.all_steps():
            metrics = self._manager.metrics(step)
            if metrics and self.keep_best in metrics:
                ranked.append((float(metrics[self.keep_best]), step))
        if not ranked:
            return None
        return (min(ranked) if self.best_mode == "min" else max(ranked))[1]

    def save(self, step: int, state: Any, meta: dict[str, Any], metrics: dict[str, float] | None = None) -> bool:
        """Starts saving ``state`` and ``meta`` (plus the state's checksums) at ``step`` (async).

        ``metrics`` rank keep-best; only the metric named by ``keep_best`` is passed on, so a
        checkpoint without that eval metric is retained by recency alone.
        """
        ranked = None
        if self.keep_best and metrics and self.keep_best in metrics:
            ranked = {self.keep_best: float(metrics[self.keep_best])}
        meta = {**meta, "checksums": state_checksums(state), LAYOUT_KEY: layout(state)}
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=ranked,
            force=True,
        )

    def problem(self, step: int) -> str | None:
        """Why the files of ``step`` cannot be a complete checkpoint (None if they look complete).

        Checks only the commit marker and the metadata files (no array is read).
        """
        path = self.step_path(step)
        if not path.is_dir():
            return f"{path} is not a directory"
        for name, is_json in REQUIRED_FILES.items():
            file = path / name
            if not file.exists():
                what = "commit marker" if name == "commit_success.txt" else "file"
                return f"{what} {name} is missing"
            if is_json:
                try:
                    json.loads(file.read_text())
                except (ValueError, OSError) as e:
                    return f"{name} is unreadable ({_first_line(e)})"
        return None

    def restore(self, step: int, target: Any, *, partial: bool = False) -> tuple[Any, dict[str, Any]]:
        """``(state, meta)`` saved at ``step``, placed like ``target`` (a state or ``abstract_like(state)``).

        ``partial``: ``target`` is a nested dict of a part of the state (e.g. ``{"params":
        {"model": abstract_params}}``, the policy alone); only that part is read and checked.
        Raises ``UnusableCheckpoint`` when the files are incomplete, unreadable, or their
        arrays do not match the saved checksums.
        """
        problem = self.problem(step)
        if problem:
            raise UnusableCheckpoint(step, problem)
        self._check_layout(step, target)
        abstract = abstract_like(target)
        if partial:
            state_args = ocp.args.PyTreeRestore(
                item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True
            )
        else:
            state_args = ocp.args.StandardRestore(abstract)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=state_args, meta=ocp.args.JsonRestore())
            )
        except Exception as e:  # Orbax/TensorStore raise many types for damaged files
            raise UnusableCheckpoint(step, f"reading it failed ({_first_line(e)})") from e
        state, meta = restored["state"], dict(restored["meta"])
        if meta.get("step", step) != step:
            raise UnusableCheckpoint(step, f"its meta says step {meta.get('step')!r}")
        meta.pop(LAYOUT_KEY, None)
        saved = meta.pop("checksums", None)
        if saved is not None:
            read = state_checksums(state)
            if partial:  # dict paths (['params']) against the state's attribute paths (.params)
                saved = {_dict_path(k): v for k, v in saved.items()}
                read = {_dict_path(k): v for k, v in read.items()}
                saved = {k: v for k, v in saved.items() if k in read}
            differing = sorted(k for k in set(saved) | set(read) if saved.get(k) != read.get(k))
            if differing:
                raise UnusableCheckpoint(
                    step, f"{len(differing)} array(s) differ from their saved checksum (first: {differing[0]})"
                )
        return state, meta

    def _check_layout(self, step: int, target: Any) -> None:
        """``CheckpointError`` when the checkpoint stores the decoder's layers in the other layout
        (stacked / unrolled, ``model.scan_layers``) than ``target``; checkpoints from before the
        layout was recorded hold unrolled layers."""
        wanted = layout(target)
        if wanted is None:
            return
        try:
            meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # damaged files: as in restore
            raise UnusableCheckpoint(step, f"reading its meta failed ({_first_line(e)})") from e
        saved = meta.get(LAYOUT_KEY) or "unrolled"
        if saved != wanted:
            raise CheckpointError(
                f"checkpoint at step {step} ({self.step_path(step)}) holds the decoder's layers {saved} but this run "
                f"builds them {wanted}; resume it with --config.model.scan_layers={'on' if saved == 'stacked' else 'off'}"
            )

    def restore_latest(self, target: Any, *, partial: bool = False, set_aside: bool = True) -> Restored | None:
        """The newest usable checkpoint, restored like ``target`` (``partial``: see ``restore``);
        None when there is none at all.

        Unusable newer steps are reported (``UnusableCheckpointWarning``) and, once an older one
        restored, renamed to ``<step>.unusable`` (unless ``set_aside`` is False: a reader such as
        the sampler changes nothing). Raises ``CheckpointError`` when checkpoints exist but none
        is usable (nothing is renamed then).
        """
        main = jax.process_index() == 0
        base = pathlib.Path(self.directory)
        if main and base.exists():
            for tmp in sorted(p.name for p in base.iterdir() if TMP_SUFFIX in p.name):
                warnings.warn(
                    f"{base / tmp}: an interrupted checkpoint save (ignored; the last committed checkpoint is used)",
                    UnusableCheckpointWarning, stacklevel=2,
                )
        steps = sorted(self.all_steps(), reverse=True)
        skipped: list[UnusableCheckpoint] = []
        for step in steps:
            try:
                state, meta = self.restore(step, target, partial=partial)
            except UnusableCheckpoint as e:
                skipped.append(e)
                if main:
                    warnings.warn(
                        f"checkpoint at step {step} ({self.step_path(step)}) is unusable: {e.reason}; "
                        "trying the previous one", UnusableCheckpointWarning, stacklevel=2,
                    )
                continue
            if skipped and set_aside:
                self._set_aside([e.step for e in skipped])
            return Restored(step=step, state=state, meta=meta, skipped=skipped)
        if skipped:
            reasons = "\n".join(f"  step {e.step}: {e.reason}" for e in skipped)
            raise CheckpointError(
                f"{self.directory} holds {len(skipped)} checkpoint(s) and none can be restored:\n{reasons}\n"
                "Nothing was changed. Repair or move them away to start this run from scratch, "
                "or use another workdir."
            )
        return None

    def _set_aside(self, steps: list[int]) -> None:
        """Renames unusable step directories to ``<step>.unusable[.n]`` (process 0) and rescans."""
        if jax.process_index() == 0:
            for step in steps:
                source = self.step_path(step)
                target = source.parent / f"{step}{UNUSABLE_SUFFIX}"
                n = 0
                while target.exists():
                    n += 1
                    target = source.parent / f"{step}{UNUSABLE_SUFFIX}.{n}"
                source.rename(target)
        parallel.barrier("jaxalign-checkpoints-set-aside")
        self._manager.reload()

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
