"""The objective interface: what a train step optimises, and which batch keys it reads.

An ``Objective`` is a loss function plus what the step needs to know about it:

* ``loss_fn(forward, params, batch, reference) -> (loss, metrics)`` for one micro-batch:
  ``forward`` is the policy's ``jaxalign.scoring.Forward``, ``params`` the trained pytree
  (``{"model": ..., **extra}``), ``batch`` one micro-batch (docs/architecture.md), and
  ``reference`` the reference log-prob sums ``[sequences_per_pair * P]`` (None when the
  objective uses no reference or the run has none). ``loss`` is a weighted mean over the
  micro-batch's ``unit``s; ``metrics`` a flat dict of scalars, averaged the same way.
* ``batch_keys``: the batch keys the loss reads beyond the step's own (``STEP_KEYS``), e.g.
  teacher top-k arrays. A batch key that neither the step nor the objective reads is an
  error when the run is built, never silently dropped.
* ``unit``: ``pairs`` (real pairs, ``pair_mask``) or ``tokens`` (real scored tokens): the
  weight ``w_a`` of micro-batch ``a`` in the global batch, ``loss = sum_a (w_a / W) loss_a``.
* ``sequences_per_pair``: sequences per slot in ``sequence_ids`` (2; 3 with VPO reference
  samples; 1 for SFT). ``uses_reference``: whether ``reference`` is needed.
* ``init_extra(model_config, seed)``: extra trained parameters (the reward head), or None.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

__all__ = ["STEP_KEYS", "UNITS", "Objective", "real_token_mask", "unit_weight"]

Metrics = dict[str, jax.Array]
Batch = dict[str, jax.Array]
LossFn = Callable[[Any, Any, Batch, "jax.Array | None"], tuple[jax.Array, Metrics]]

# Keys every step reads: the token layout, the masks and the sequence/pair bookkeeping.
STEP_KEYS = ("input_ids", "positions", "segment_ids", "loss_mask", "sequence_ids", "pair_mask")
UNITS = ("pairs", "tokens")


@dataclasses.dataclass(frozen=True)
class Objective:
    """See the module docstring."""

    name: str
    loss_fn: LossFn
    unit: str = "pairs"
    batch_keys: tuple[str, ...] = ()
    sequences_per_pair: int = 2
    uses_reference: bool = False
    init_extra: Callable[[Any, int], dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise ValueError(f"objective {self.name!r}: unit must be one of {UNITS}, got {self.unit!r}")
        overlap = set(self.batch_keys) & set(STEP_KEYS)
        if overlap:
            raise ValueError(f"objective {self.name!r}: batch_keys {sorted(overlap)} are the step's own (STEP_KEYS)")

    def num_sequences(self, batch: Batch) -> int:
        """``S = sequences_per_pair * P`` of a micro-batch."""
        return self.sequences_per_pair * batch["pair_mask"].shape[-1]

    def weight(self, batch: Batch) -> jax.Array:
        """The batch's weight in the global batch (all micro-batches of ``[A, ...]`` at once)."""
        return unit_weight(self.unit, batch)


def real_token_mask(batch: Batch) -> jax.Array:
    """``loss_mask`` restricted to tokens of real (non-filler) sequences, float32 ``[R, L]``."""
    seq = batch["sequence_ids"]
    pair_mask = batch["pair_mask"]
    p = pair_mask.shape[0]
    pair = jnp.where(seq >= 0, seq % p, 0)
    real = (seq >= 0) & (pair_mask[pair] > 0)
    return jnp.where(real, batch["loss_mask"], 0.0).astype(jnp.float32)


def unit_weight(unit: str, batch: Batch) -> jax.Array:
    """Real pairs (``pairs``) or real scored tokens (``tokens``) of a batch, micro-batch axis or not."""
    if unit == "tokens":
        mask = jax.vmap(real_token_mask)(batch) if batch["pair_mask"].ndim == 2 else real_token_mask(batch)
        return jnp.sum(mask)
    return jnp.sum(batch["pair_mask"].astype(jnp.float32))
