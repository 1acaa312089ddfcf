"""Pairwise objectives: DPO (cDPO), IPO, hinge, rDPO, VPO and DOVE on sequence log-probs.

The policy's per-sequence log-prob sums ``[S]`` (chosen ``0..P-1``, rejected ``P..2P-1``,
VPO calibration samples ``2P..3P-1``) and the reference's (zeros without one: reference-free)
are split into the per-pair arrays and passed to ``losses.get(name)`` with
``weights = pair_mask``: the loss is a weighted mean over real pairs. VPO's calibration samples
are the chosen responses (``calibration = "chosen"``: ``pi_cal`` = the data's chosen
distribution) or the extra sequences (``"reference_samples"``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxalign import losses
from jaxalign.objectives.base import Objective

__all__ = ["PAIRWISE", "pairwise"]

PAIRWISE = ("dpo", "ipo", "hinge", "rdpo", "vpo", "dove")


def _split(x: jax.Array, p: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(chosen [P], rejected [P], calibration [P] or empty) of a per-sequence array."""
    return x[:p], x[p : 2 * p], x[2 * p :]


def _extra_inputs(name: str, options: Mapping[str, Any]) -> Callable[..., dict[str, jax.Array]]:
    """The loss's per-batch inputs beyond the four log-prob arrays: IPO's completion lengths,
    VPO's calibration log-probs."""
    if name == "ipo" and options.get("ipo_normalize", True):
        return lambda counts, policy, reference, p: {"chosen_lengths": counts[:p], "rejected_lengths": counts[p : 2 * p]}
    if name == "vpo":
        chosen = options.get("calibration", "chosen") == "chosen"

        def calibration(counts, policy, reference, p):
            (pc, _, pcal), (rc, _, rcal) = _split(policy, p), _split(reference, p)
            return {"policy_calibration_logps": pc if chosen else pcal,
                    "reference_calibration_logps": rc if chosen else rcal}

        return calibration
    return lambda *_: {}


def pairwise(name: str, hyperparameters: Mapping[str, Any], *, options: Mapping[str, Any] | None = None,
             uses_reference: bool = True) -> Objective:
    """The objective of pairwise loss ``name`` (``PAIRWISE``) called with ``hyperparameters``
    (e.g. ``beta``). ``options``: ``ipo_normalize`` (divide IPO's log-ratios by completion
    length, default True), ``calibration`` (VPO: ``chosen`` | ``reference_samples``).
    ``uses_reference=False``: reference-free (the reference log-probs are 0)."""
    if name not in PAIRWISE:
        raise ValueError(f"{name!r} is not a pairwise loss; pairwise losses: {', '.join(PAIRWISE)}")
    options = dict(options or {})
    loss = losses.get(name)
    extra = _extra_inputs(name, options)
    hyperparameters = dict(hyperparameters)
    calibration_rows = name == "vpo" and options.get("calibration", "chosen") == "reference_samples"

    def loss_fn(forward, params, batch, reference):
        pair_mask = batch["pair_mask"].astype(jnp.float32)
        p = pair_mask.shape[0]
        _, policy, counts = forward.sequence_logps(params["model"], batch, (3 if calibration_rows else 2) * p)
        reference = jnp.zeros_like(policy) if reference is None else reference
        (pc, pr, _), (rc, rr, _) = _split(policy, p), _split(reference, p)
        return loss(pc, pr, rc, rr, weights=pair_mask, **hyperparameters, **extra(counts, policy, reference, p))

    return Objective(name=name, loss_fn=loss_fn, unit="pairs", sequences_per_pair=3 if calibration_rows else 2,
                     uses_reference=uses_reference)
