"""Run checkpoints with Orbax: the train state plus a JSON item (loader position, counters).

Layout: ``WORKDIR/checkpoints/<step>/{state,meta}``. ``state`` is the ``TrainState`` pytree
(params, optimizer state, step, RNG), saved with ``StandardSave`` and restored against an
abstract target (shapes, dtypes, shardings) so optax state types and the mesh layout come
back exactly. ``meta`` is a JSON dict (the data loader's position, epoch, ...).

Retention: the last ``keep`` checkpoints, plus (``keep_best``) the best one by an eval metric
(``min`` or ``max``); checkpoints are written asynchronously unless ``async_save=False``.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

__all__ = ["RunCheckpoints", "abstract_like"]


def abstract_like(tree: Any) -> Any:
    """``jax.ShapeDtypeStruct`` leaves (with shardings) mirroring ``tree``: a restore target."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


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
        """Starts saving ``state`` and ``meta`` at ``step`` (async); ``metrics`` rank keep-best.

        Only metrics named by ``keep_best`` are passed on, so a checkpoint without that eval
        metric is retained by recency alone.
        """
        ranked = None
        if self.keep_best and metrics and self.keep_best in metrics:
            ranked = {self.keep_best: float(metrics[self.keep_best])}
        return self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=ranked,
            force=True,
        )

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """``(state, meta)`` saved at ``step``; ``target`` is a state or ``abstract_like(state)``."""
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_like(target)), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["state"], dict(restored["meta"])

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
