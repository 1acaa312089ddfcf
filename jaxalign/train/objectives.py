"""Training objectives: which loss of ``jaxalign.losses`` a config names, and what it is fed.

An ``Objective`` turns the per-sequence quantities the step computed into ``(loss, metrics)``
for one micro-batch. Three kinds:

* ``pairwise`` (dpo/cDPO, ipo, hinge, rdpo, vpo, dove): policy and reference sequence
  log-probs ``[2P]`` (chosen ``0..P-1``, rejected ``P..2P-1``), split into the four per-pair
  arrays and passed with ``weights = pair_mask``; the loss is a weighted mean over pairs.
  Without a reference (``reference.mode = "none"``) the reference log-probs are 0
  (reference-free). VPO's calibration samples are the chosen responses
  (``vpo_calibration = "chosen"``: ``pi_cal`` = the data's chosen distribution) or extra
  sequences ``2P..3P-1`` of the batch (``"reference_samples"``).
* ``sft``: token-mean NLL over the batch's ``loss_mask`` (filler examples excluded); under
  gradient accumulation it is normalised by the global batch's token count.
* ``reward``: Bradley-Terry on scalar rewards of the chosen and rejected sequences.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_collections

from jaxalign import losses

__all__ = ["Objective", "make_objective"]

Metrics = dict[str, jax.Array]

PAIRWISE = ("dpo", "ipo", "hinge", "rdpo", "vpo", "dove")


@dataclasses.dataclass(frozen=True)
class Objective:
    """What the step computes for a loss.

    ``kind``: ``pairwise`` | ``sft`` | ``reward``. ``sequences_per_pair``: sequences per pair
    in the batch's ``sequence_ids`` (2, or 3 with VPO reference samples). ``unit``: what the
    loss is a mean over (``pairs`` or ``tokens``), which sets the gradient-accumulation
    weights. ``uses_reference``: whether reference log-probs are needed. ``pairwise_fn``
    maps ``(policy_sums, policy_counts, reference_sums, pair_mask)`` to ``(loss, metrics)``.
    """

    name: str
    kind: str
    unit: str
    sequences_per_pair: int
    uses_reference: bool
    pairwise_fn: Callable[..., tuple[jax.Array, Metrics]] | None = None
    reward_margin: float = 0.0


def _split(x: jax.Array, num_pairs: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(chosen [P], rejected [P], calibration [P] or empty) of a per-sequence array."""
    return x[:num_pairs], x[num_pairs : 2 * num_pairs], x[2 * num_pairs :]


def _pairwise_fn(cfg: ml_collections.ConfigDict) -> Callable[..., tuple[jax.Array, Metrics]]:
    name, beta = cfg.name, cfg.beta

    def fn(policy: jax.Array, counts: jax.Array, reference: jax.Array, pair_mask: jax.Array):
        p = pair_mask.shape[0]
        pc, pr, pcal = _split(policy, p)
        rc, rr, rcal = _split(reference, p)
        args = (pc, pr, rc, rr)
        if name == "dpo":
            return losses.dpo(*args, beta=beta, label_smoothing=cfg.label_smoothing, weights=pair_mask)
        if name == "ipo":
            lengths = {}
            if cfg.ipo_normalize:
                lengths = {"chosen_lengths": counts[:p], "rejected_lengths": counts[p : 2 * p]}
            return losses.ipo(*args, beta=beta, weights=pair_mask, **lengths)
        if name == "hinge":
            return losses.hinge(*args, beta=beta, weights=pair_mask)
        if name == "rdpo":
            return losses.rdpo(*args, beta=beta, epsilon=cfg.epsilon, weights=pair_mask)
        if name == "dove":
            return losses.dove(*args, beta=beta, weights=pair_mask)
        if name == "vpo":
            if cfg.vpo_calibration == "chosen":
                pcal, rcal = pc, rc
            return losses.vpo(
                *args,
                policy_calibration_logps=pcal,
                reference_calibration_logps=rcal,
                beta=beta,
                alpha=cfg.vpo_alpha,
                mode=cfg.vpo_mode,
                weights=pair_mask,
            )
        raise ValueError(f"loss.name {name!r} is not a pairwise loss")

    return fn


def make_objective(loss: ml_collections.ConfigDict, reference_mode: str) -> Objective:
    """The objective for the ``loss`` config group and ``reference.mode``."""
    if loss.name in PAIRWISE:
        calibration_rows = loss.name == "vpo" and loss.vpo_calibration == "reference_samples"
        return Objective(
            name=loss.name,
            kind="pairwise",
            unit="pairs",
            sequences_per_pair=3 if calibration_rows else 2,
            uses_reference=reference_mode != "none",
            pairwise_fn=_pairwise_fn(loss),
        )
    if loss.name == "sft":
        return Objective(name="sft", kind="sft", unit="tokens", sequences_per_pair=1, uses_reference=False)
    if loss.name == "bradley_terry":
        return Objective(
            name="bradley_terry",
            kind="reward",
            unit="pairs",
            sequences_per_pair=2,
            uses_reference=False,
            reward_margin=loss.reward_margin,
        )
    raise ValueError(f"loss.name {loss.name!r} is not supported by the trainer")


def reward_loss(objective: Objective, rewards: jax.Array, pair_mask: jax.Array) -> tuple[jax.Array, Metrics]:
    """Bradley-Terry on rewards ``[2P]`` (chosen then rejected)."""
    p = pair_mask.shape[0]
    margin = objective.reward_margin or None
    return losses.bradley_terry(rewards[:p], rewards[p : 2 * p], margin=margin, weights=pair_mask)


def sft_loss(token_logps: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, Metrics]:
    """Token-mean NLL; the ``sft/tokens`` count is left to the step (it is not a mean)."""
    loss, metrics = losses.sft(token_logps, loss_mask)
    return loss, {k: v for k, v in metrics.items() if k != "sft/tokens"}


def real_token_mask(batch: dict[str, jax.Array]) -> jax.Array:
    """``loss_mask`` restricted to tokens of real (non-filler) sequences, float32 ``[R, L]``."""
    seq = batch["sequence_ids"]
    pair_mask = batch["pair_mask"]
    p = pair_mask.shape[0]
    pair = jnp.where(seq >= 0, seq % p, 0)
    real = (seq >= 0) & (pair_mask[pair] > 0)
    return jnp.where(real, batch["loss_mask"], 0.0).astype(jnp.float32)
