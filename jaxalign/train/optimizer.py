"""Optimizers and learning-rate schedules from the ``optimizer`` config group.

Schedule: linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then
``cosine`` (``end + (peak - end) * (1 + cos(pi * t / T)) / 2``), ``linear`` (straight line to
``end``) or ``constant`` over the remaining ``T = total_steps - warmup_steps`` steps, with
``end = end_factor * peak``. The update is: clip the global gradient norm to
``max_grad_norm`` (if > 0), then the optimizer (AdamW with decoupled weight decay, SGD with
optional momentum and weight decay, or Adafactor). Weight decay applies to parameters with
``ndim >= 2`` (matrices and embeddings), not to norms and biases.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax

__all__ = ["make_optimizer", "make_schedule"]


def make_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    """The learning rate as a function of the optimizer step (see module docstring)."""
    peak = config.learning_rate
    end = config.end_factor * peak
    warmup = min(config.warmup_steps, total_steps)
    rest = max(total_steps - warmup, 1)
    if config.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, rest, alpha=config.end_factor)
    elif config.schedule == "linear":
        decay = optax.linear_schedule(peak, end, rest)
    elif config.schedule == "constant":
        decay = optax.constant_schedule(peak)
    else:
        raise ValueError(f"optimizer.schedule must be cosine, linear or constant, got {config.schedule!r}")
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def _decay_mask(params: Any) -> Any:
    return jax.tree.map(lambda x: getattr(x, "ndim", 0) >= 2, params)


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(optimizer, schedule)`` for the ``optimizer`` config group."""
    schedule = make_schedule(config, total_steps)
    wd = config.weight_decay
    if config.name == "adamw":
        core = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=wd, mask=_decay_mask)
    elif config.name == "sgd":
        parts = [optax.add_decayed_weights(wd, mask=_decay_mask)] if wd else []
        core = optax.chain(*parts, optax.sgd(schedule, momentum=config.momentum or None))
    elif config.name == "adafactor":
        core = optax.adafactor(schedule, weight_decay_rate=wd or None, weight_decay_mask=_decay_mask)
    else:
        raise ValueError(f"optimizer.name must be adamw, sgd or adafactor, got {config.name!r}")
    if config.max_grad_norm > 0:
        core = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), core)
    return core, schedule
