"""Optimizers and learning-rate schedules from the ``optimizer`` config group.

Schedule: linear warmup from 0 to ``learning_rate`` over ``warmup_steps``, then
``cosine`` (``end + (peak - end) * (1 + cos(pi * t / T)) / 2``), ``linear`` (straight line to
``end``) or ``constant`` over the remaining ``T = total_steps - warmup_steps`` steps, with
``end = end_factor * peak``. The update is: clip the global gradient norm to
``max_grad_norm`` (if > 0), then the optimizer (AdamW with decoupled weight decay, SGD with
optional momentum and weight decay, or Adafactor).

Weight decay (``weight_decay``) applies to the weights of linear maps and lookup tables
(projection kernels, ``lm_head``, embeddings, the reward head's ``kernel`` ``[D]``) and never
to norm parameters or biases, whatever their shape. The rule (``decays``), per leaf of the
params pytree, from its path and, for ``nnx.Variable`` leaves, its logical axes
(``out_sharding``, see ``jaxalign/models/README.md``):

* not decayed if any logical axis is ``norm`` (norm scales and LayerNorm biases, also
  stacked ``[layers, D]`` ones);
* not decayed if any name on its path is a norm module: contains ``norm`` (``norm``,
  ``input_layernorm``, ``post_attention_layernorm``, ``q_norm``) or is ``ln``/``ln_*``
  (GPT-2's ``ln_1``, ``ln_2``, ``ln_f``);
* not decayed if its own name is ``bias`` or ``scale`` (or ends in ``_bias``/``_scale``):
  every bias, e.g. Llama/Qwen q/k/v biases ``[heads, head_dim]`` or GPT-2's
  ``c_attn.bias [3, heads, head_dim]``;
* not decayed if it is a scalar or not floating point;
* decayed otherwise.

Names rather than ``ndim`` decide, so a 2-D bias or stacked norm scale is never decayed, and
the mask works on the params as the optimizer sees them: a dict holding an ``nnx.State``
(paths end in ``.value``), plain arrays, or ``nnx.Variable`` leaves.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

__all__ = ["decay_mask", "decays", "make_optimizer", "make_schedule"]


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


_NORM_MODULE = re.compile(r"norm|^ln(_.*)?$", re.IGNORECASE)
_NO_DECAY_LEAF = re.compile(r"(^|_)(bias|scale)$", re.IGNORECASE)


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def decays(names: tuple[str, ...], shape: tuple[int, ...], dtype: Any = jnp.float32,
           axes: tuple[str | None, ...] | None = None) -> bool:
    """Whether a parameter at path ``names`` (keys from the root, ``value`` attributes dropped)
    with this shape, dtype and logical ``axes`` (None when unknown) gets weight decay; see the
    module docstring."""
    if len(shape) == 0 or not jnp.issubdtype(dtype, jnp.floating):
        return False
    if axes is not None and "norm" in axes:
        return False
    if any(_NORM_MODULE.search(n) for n in names):
        return False
    return not (names and _NO_DECAY_LEAF.search(names[-1]))


def _leaf_decays(path: tuple[Any, ...], leaf: Any) -> bool:
    names = tuple(_key_name(k) for k in path)
    if names and names[-1] == "value":  # an nnx.Variable flattened to its value
        names = names[:-1]
    axes = None
    if isinstance(leaf, nnx.Variable):
        axes = leaf.get_metadata().get("out_sharding")
        leaf = leaf.get_value()
    return decays(names, tuple(getattr(leaf, "shape", ())), getattr(leaf, "dtype", jnp.float32),
                  tuple(axes) if axes else None)


def decay_mask(params: Any) -> Any:
    """A pytree of bools with ``params``' structure: True where weight decay applies.

    ``nnx.Variable`` leaves keep their node (holding a bool), so the mask has exactly the
    structure optax flattens ``params`` to.
    """
    def one(path: tuple[Any, ...], leaf: Any) -> Any:
        d = _leaf_decays(path, leaf)
        return jax.tree.map(lambda _: d, leaf) if isinstance(leaf, nnx.Variable) else d

    return jax.tree_util.tree_map_with_path(one, params, is_leaf=lambda x: isinstance(x, nnx.Variable))


def make_optimizer(
    config: ml_collections.ConfigDict, total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """``(optimizer, schedule)`` for the ``optimizer`` config group."""
    schedule = make_schedule(config, total_steps)
    wd = config.weight_decay
    if config.name == "adamw":
        core = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps, weight_decay=wd, mask=decay_mask)
    elif config.name == "sgd":
        parts = [optax.add_decayed_weights(wd, mask=decay_mask)] if wd else []
        core = optax.chain(*parts, optax.sgd(schedule, momentum=config.momentum or None))
    elif config.name == "adafactor":
        core = optax.adafactor(schedule, weight_decay_rate=wd or None, weight_decay_mask=decay_mask)
    else:
        raise ValueError(f"optimizer.name must be adamw, sgd or adafactor, got {config.name!r}")
    if config.max_grad_norm > 0:
        core = optax.chain(optax.clip_by_global_norm(config.max_grad_norm), core)
    return core, schedule
