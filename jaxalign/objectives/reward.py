"""Reward modelling: Bradley-Terry on scalar rewards of the chosen and rejected sequences.

The reward is ``h_last . w`` (``jaxalign.scoring.forward.sequence_rewards``), with the head
``{"kernel": [D]}`` trained beside the model as ``params["head"]``. It has no bias: only
reward differences enter the loss, so a bias would never get a gradient (and Hugging Face's
``*ForSequenceClassification`` score layer has none, so the export is exact).
"""

from __future__ import annotations

import jax.numpy as jnp

from jaxalign import losses
from jaxalign.objectives.base import Objective
from jaxalign.scoring.forward import init_reward_head

__all__ = ["bradley_terry"]


def bradley_terry(margin: float = 0.0) -> Objective:
    """Bradley-Terry with ``margin`` subtracted from the reward difference (0 = none)."""

    def loss_fn(forward, params, batch, reference):
        pair_mask = batch["pair_mask"].astype(jnp.float32)
        p = pair_mask.shape[0]
        rewards = forward.sequence_rewards(params["model"], params["head"], batch, 2 * p)
        return losses.bradley_terry(rewards[:p], rewards[p : 2 * p], margin=margin or None, weights=pair_mask)

    return Objective(name="bradley_terry", loss_fn=loss_fn, unit="pairs",
                     init_extra=lambda config, seed: {"head": init_reward_head(config.hidden_size, seed)})
